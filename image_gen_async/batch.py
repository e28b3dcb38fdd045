"""Batch pipelines: many prompts through one provider into a folder, resumable after a crash.

``run_batch`` reads job specs lazily, keeps at most ``concurrency`` jobs in flight,
journals each job around every provider call (``_journal``), saves the outputs and
appends one line per finished job to ``results.jsonl``. Rerun on the same directory,
it polls the jobs that have a task id, skips finished ones and never resends a create
that may have gone out unless told to (``resubmit_uncertain``).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import IO, Any, Literal, cast

import attrs

from ._journal import FINAL_STATES, JobRow, Journal
from ._session import AsyncSession, ProviderClient
from .download import DEFAULT_MAX_BYTES
from .errors import (
    ConfigurationError,
    ImageGenError,
    NotFoundError,
    SubmitUncertainError,
    TaskFailedError,
)
from .models import TaskResult

log = logging.getLogger("image_gen_async")

RESULTS_NAME = "results.jsonl"
JOURNAL_NAME = "journal.sqlite"
LOCK_NAME = ".batch.lock"
DEFAULT_CONCURRENCY = 64
# Keys a job spec cannot carry: they are fixed per batch or belong to the library.
RESERVED_KEYS = frozenset({"model", "timeout", "before_create"})
# How often the reading loop yields while it skips jobs finished in an earlier run.
YIELD_EVERY = 256

Status = Literal["done", "failed", "uncertain"]


@attrs.frozen
class InvalidSpec:
    """A job line that is not a JSON object; it ends as a failed job and is never sent."""

    text: str
    reason: str


JobSpec = Mapping[str, Any]


def read_jsonl(path: str | os.PathLike[str]) -> Iterator[JobSpec | InvalidSpec | None]:
    """Job specs from a JSONL file, read lazily: one item per line, ``None`` for a blank line.

    Each line is an object with ``prompt`` and any provider parameters
    (``{"prompt": "a fox", "aspect_ratio": "16:9"}``). Blank lines keep their number,
    so a job's number is its line in the file.
    """
    with open(path, encoding="utf-8") as file:
        for text in file:
            if not text.strip():
                yield None
                continue
            try:
                value = json.loads(text)
            except ValueError as error:
                yield InvalidSpec(text, f"not JSON: {error}")
                continue
            yield value if isinstance(value, Mapping) else InvalidSpec(text, "not a JSON object")


def read_results(out_dir: str | os.PathLike[str]) -> Iterator[dict[str, Any]]:
    """The lines of a batch's results.jsonl, read lazily (a retried job may have a later line)."""
    with open(Path(out_dir) / RESULTS_NAME, encoding="utf-8") as file:
        for text in file:
            yield json.loads(text)


def count_jobs(path: str | os.PathLike[str]) -> int:
    """Non-blank lines of a JSONL file, counted without holding it in memory."""
    with open(path, encoding="utf-8") as file:
        return sum(1 for text in file if text.strip())


@attrs.define
class BatchStats:
    """Counts over the whole batch (earlier runs included), updated as jobs finish."""

    total: int | None = None
    done: int = 0
    failed: int = 0
    uncertain: int = 0
    unfinished: int = 0
    in_flight: int = 0
    created: int = 0
    resumed: int = 0
    skipped: int = 0
    started: float = attrs.Factory(time.monotonic)
    ended: float | None = None

    def add(self, status: Status) -> None:
        """Count one more job ending as ``status``."""
        setattr(self, status, getattr(self, status) + 1)

    @property
    def finished(self) -> int:
        """Jobs with their line in results.jsonl: done, failed or uncertain."""
        return self.done + self.failed + self.uncertain

    @property
    def ok(self) -> bool:
        """True when every job is done: nothing failed, uncertain or left unfinished."""
        return not (self.failed or self.uncertain or self.unfinished)

    @property
    def elapsed(self) -> float:
        """Seconds the run took (so far, while it runs)."""
        return (self.ended or time.monotonic()) - self.started


@attrs.frozen
class _Job:
    line: int
    spec_hash: str
    prompt: str
    params: Mapping[str, Any]
    # The task to poll before (or instead of) creating one.
    task_id: str | None = None
    estimated_duration: float | None = None
    # Create anew when the task to poll turns out failed or unknown (--retry-failed).
    create_if_lost: bool = False


def spec_hash(spec: JobSpec | InvalidSpec) -> str:
    """A short digest of a job spec, to notice an input file changed between runs."""
    if isinstance(spec, InvalidSpec):
        canonical = spec.text.strip()
    else:
        canonical = json.dumps(spec, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def _spec_problem(spec: JobSpec) -> str | None:
    if not isinstance(spec.get("prompt"), str):
        return 'the job has no "prompt" string'
    reserved = sorted(RESERVED_KEYS & set(spec))
    if reserved:
        return f"key {reserved[0]!r} cannot be set per job"
    return None


class _ResultsFile:
    """results.jsonl, cut back to what the journal committed, then appended line by line."""

    def __init__(self, path: Path, committed: int) -> None:
        self._file: IO[bytes] = open(path, "ab")  # noqa: SIM115 - closed by close()
        self._descriptor = self._file.fileno()
        if self._file.tell() > committed:
            # Lines written after the journal's last commit belong to jobs the journal will
            # run again: drop them so no job gets two lines for one outcome.
            self._file.truncate(committed)
            self._file.seek(committed)

    def append(self, record: Mapping[str, Any]) -> int:
        """Write one line and flush it; the file size after it."""
        self._file.write(json.dumps(record, ensure_ascii=False).encode() + b"\n")
        self._file.flush()
        return self._file.tell()

    def durable(self) -> None:
        """fsync what was appended (blocking; safe from a worker thread while lines are added)."""
        os.fsync(self._descriptor)

    def close(self) -> None:
        self._file.close()


@contextlib.contextmanager
def _exclusive(out_dir: Path) -> Iterator[None]:
    """One run per output directory at a time (POSIX advisory lock; none on Windows)."""
    try:
        import fcntl
    except ImportError:  # Windows
        yield
        return
    with open(out_dir / LOCK_NAME, "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConfigurationError(f"another batch is running on {out_dir}") from None
        yield


@contextlib.contextmanager
def _opened(
    out_dir: Path, journal: Path | None, provider: str, model: str
) -> Iterator[tuple[Journal, _ResultsFile]]:
    """The output directory locked, its journal and results.jsonl open, stale ``*.part`` removed."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with _exclusive(out_dir), Journal(journal or out_dir / JOURNAL_NAME, provider, model) as db:
        for leftover in out_dir.glob("*.part"):  # from a download cut short by a crash
            leftover.unlink(missing_ok=True)
        results = _ResultsFile(out_dir / RESULTS_NAME, db.results_size)
        try:
            yield db, results
        finally:
            results.close()


@attrs.frozen
class _Options:
    """How a run treats its jobs (see ``run_batch``)."""

    download: bool = True
    retry_failed: bool = False
    resubmit_uncertain: bool = False
    max_bytes: int = DEFAULT_MAX_BYTES
    timeout: float | None = None


@attrs.define(eq=False)
class _Batch:
    """One run of a batch: the loop that feeds jobs and what each job does."""

    session: AsyncSession
    client: ProviderClient
    model: str
    out_dir: Path
    journal: Journal
    results: _ResultsFile
    stats: BatchStats
    options: _Options
    on_progress: Callable[[BatchStats], None] | None

    def notify(self) -> None:
        if self.on_progress is not None:
            self.on_progress(self.stats)

    async def feed(self, jobs: Iterable[JobSpec | InvalidSpec | None], concurrency: int) -> None:
        """Start jobs as slots free up; at most ``concurrency`` run at once."""
        slots = asyncio.Semaphore(concurrency)
        running: set[asyncio.Task[None]] = set()

        def release(task: asyncio.Task[None]) -> None:
            running.discard(task)
            slots.release()

        try:
            for line, spec in enumerate(jobs, 1):
                job = None if spec is None else self.admit(line, spec)
                if job is None:
                    if line % YIELD_EVERY == 0:
                        await asyncio.sleep(0)  # let running jobs progress while skipping
                    continue
                await slots.acquire()
                task = asyncio.create_task(self.run(job), name=f"image_gen_async batch job {line}")
                running.add(task)
                task.add_done_callback(release)
            while running:
                await asyncio.gather(*running)
        except BaseException:
            for task in running:
                task.cancel()
            await asyncio.gather(*running, return_exceptions=True)
            raise

    def admit(self, line: int, spec: JobSpec | InvalidSpec) -> _Job | None:
        """What to do with job ``line`` given the journal: a job to run, or None (nothing to run)."""
        digest = spec_hash(spec)
        row = self.journal.get(line)
        if row is not None and row.spec_hash != digest:
            raise ConfigurationError(
                f"job {line} is not the one {self.journal.path} recorded: the input changed "
                "since the last run; use another output directory"
            )
        if row is not None and self._skip(row):
            return None
        problem = spec.reason if isinstance(spec, InvalidSpec) else _spec_problem(spec)
        if isinstance(spec, InvalidSpec) or problem is not None:
            self.finish(line, digest, "failed", prompt=None, error=f"invalid job: {problem}")
            return None
        prompt = spec["prompt"]
        params = {key: value for key, value in spec.items() if key != "prompt"}
        if row is None or row.state == "pending":
            return _Job(line, digest, prompt, params)
        if row.state == "creating" and not self.options.resubmit_uncertain:
            self.finish(
                line,
                digest,
                "uncertain",
                prompt=prompt,
                error="the create was in flight when an earlier run stopped; it may have been "
                "made: rerun with --resubmit-uncertain to send it again",
            )
            return None
        # submitted/downloading: poll; failed or uncertain being retried: poll a known task
        # first and create only if it is gone; creating being resubmitted: create.
        retrying = row.state in ("failed", "uncertain", "creating")
        return _Job(line, digest, prompt, params, row.task_id, row.estimated_duration, retrying)

    def _skip(self, row: JobRow) -> bool:
        """True (and counted) for a job finished in an earlier run that stays as it is."""
        if row.state not in FINAL_STATES:
            return False
        if row.state == "failed" and self.options.retry_failed:
            return False
        if row.state == "uncertain" and self.options.resubmit_uncertain:
            return False
        self.stats.add(cast(Status, row.state))  # a final state is a Status
        self.stats.skipped += 1
        return True

    async def run(self, job: _Job) -> None:
        """One job to its end; the journal is written before and after each provider call."""
        self.stats.in_flight += 1
        self.notify()
        try:
            await self._run(job)
        finally:
            self.stats.in_flight -= 1
            self.notify()

    async def _run(self, job: _Job) -> None:
        task_id = job.task_id
        try:
            result = await self._result(job)
        except SubmitUncertainError as error:
            self.finish(
                job.line, job.spec_hash, "uncertain", job.prompt, error=str(error), task_id=error.task_id
            )
            return
        except ImageGenError as error:
            if not isinstance(error, TaskFailedError) and self._polling(job.line):
                # The task exists and may still finish (a poll gave up, a timeout, a 5xx
                # after the retries): it stays paid for, and a rerun polls it again.
                log.warning("batch job %d left unfinished: %s", job.line, error)
                self.stats.unfinished += 1
                return
            row = self.journal.get(job.line)
            task_id = (
                getattr(getattr(error, "result", None), "task_id", None)
                or (row.task_id if row is not None else None)
                or task_id
            )
            self.finish(job.line, job.spec_hash, "failed", job.prompt, error=str(error), task_id=task_id)
            return
        files: list[str] = []
        if self.options.download:
            self.journal.downloading(job.line)
            try:
                paths = await self.session.download(result, self.out_dir, max_bytes=self.options.max_bytes)
            except ImageGenError as error:
                self.finish(
                    job.line, job.spec_hash, "failed", job.prompt, error=str(error), task_id=result.task_id
                )
                return
            files = [path.name for path in paths]
        self.finish(
            job.line, job.spec_hash, "done", job.prompt, task_id=result.task_id, files=files, urls=result.urls
        )

    def _polling(self, line: int) -> bool:
        row = self.journal.get(line)
        return row is not None and row.state in ("submitted", "downloading")

    async def _result(self, job: _Job) -> TaskResult:
        """The task's result: polled when the task exists, else created (journaled around it)."""
        if job.task_id is not None:
            self.stats.resumed += 1
            handle = self.client.resume(
                job.task_id,
                self.model,
                estimated_duration=job.estimated_duration,
                timeout=self.options.timeout,
            )
            try:
                return await handle
            except (TaskFailedError, NotFoundError):
                if not job.create_if_lost:
                    raise
                log.info("batch job %d: task %s is gone or failed; creating it again", job.line, job.task_id)
        self.journal.pending(job.line, job.spec_hash)
        handle = await self.client.submit(
            self.model,
            prompt=job.prompt,
            timeout=self.options.timeout,
            before_create=lambda: self._creating(job.line),
            **job.params,
        )
        self.journal.submitted(job.line, handle.task_id, handle.estimated_duration)
        self.stats.created += 1
        return await handle

    async def _creating(self, line: int) -> None:
        """Record that job ``line``'s create goes out, durably, before it is sent.

        The fsyncs run in a worker thread: on a real disk they take milliseconds, and the
        event loop has other jobs to serve. results.jsonl goes first, so every line written
        before this create is durable with the journal commits that count it (a job that
        finishes while the fsyncs run may still lose its line to a power loss; its files
        and journal row stay). If the fsync fails or the wait is cancelled, the create is
        never sent, and the row says so.
        """
        self.journal.creating(line)
        try:
            await asyncio.to_thread(self._durable)
        except BaseException:
            self.journal.not_sent(line)
            raise

    def _durable(self) -> None:
        self.results.durable()
        self.journal.durable()

    def finish(
        self,
        line: int,
        digest: str,
        status: Status,
        prompt: str | None,
        *,
        error: str | None = None,
        task_id: str | None = None,
        files: list[str] | None = None,
        urls: tuple[str, ...] = (),
    ) -> None:
        """Append the job's results line, then commit its final state with the file's new size."""
        record = {
            "line": line,
            "prompt": prompt,
            "task_id": task_id,
            "status": status,
            "files": files or [],
            "urls": list(urls),
            "error": error,
        }
        size = self.results.append(record)
        self.journal.finish(
            line, status, spec_hash=digest, task_id=task_id, files=files or [], error=error, results_size=size
        )
        self.stats.add(status)
        self.notify()


async def run_batch(
    session: AsyncSession,
    client_name: str,
    model: str,
    jobs: Iterable[JobSpec | InvalidSpec | None],
    *,
    out_dir: str | os.PathLike[str],
    journal: str | os.PathLike[str] | None = None,
    download: bool = True,
    concurrency: int = DEFAULT_CONCURRENCY,
    retry_failed: bool = False,
    resubmit_uncertain: bool = False,
    max_bytes: int = DEFAULT_MAX_BYTES,
    timeout: float | None = None,
    total: int | None = None,
    on_progress: Callable[[BatchStats], None] | None = None,
) -> BatchStats:
    """Run every job of ``jobs`` on ``client_name``/``model``; files and results.jsonl go to ``out_dir``.

    ``jobs`` yields job specs (``{"prompt": ..., **params}``), numbered from 1 in order;
    ``None`` items are placeholders (blank lines) and skipped. It is read lazily, so it may
    be a generator over millions of lines. The journal defaults to
    ``out_dir/journal.sqlite``; rerunning with the same one resumes. ``retry_failed`` runs
    failed jobs again (polling their task first when they have one), ``resubmit_uncertain``
    sends again the creates that may have reached the provider (this can pay twice).
    ``timeout`` is each job's deadline; ``total`` (if known) and ``on_progress(stats)``
    serve progress displays. Raises ``ConfigurationError`` for a missing key, a journal of
    another batch or a changed input.
    """
    if concurrency < 1:
        raise ConfigurationError("concurrency must be at least 1")
    client = session.client(client_name)
    client.check_ready()
    directory = Path(out_dir)
    stats = BatchStats(total=total)
    with _opened(directory, None if journal is None else Path(journal), client.name, model) as (db, results):
        options = _Options(download, retry_failed, resubmit_uncertain, max_bytes, timeout)
        batch = _Batch(session, client, model, directory, db, results, stats, options, on_progress)
        try:
            await batch.feed(jobs, concurrency)
        finally:
            stats.ended = time.monotonic()
    return stats
