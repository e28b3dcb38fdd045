"""Batch pipelines: many prompts through one provider into a folder, resumable after a crash.

``run_batch`` reads job specs lazily, keeps at most ``concurrency`` jobs in flight,
journals each job around every provider call (``_journal``), saves the outputs and
appends one line per finished job to ``results.jsonl``. Rerun on the same directory,
it polls the jobs that have a task id, skips finished ones and never resends a create
that may have gone out unless told to (``resubmit_uncertain``).

A directory holding outputs of an earlier run but no journal that covers them is refused
(``open_journal``, ``check_tail``): a fresh journal there would create every job again. Creates that
could not be sent for reasons that are not the job's own (provider unreachable, Redis
down, rate limited, session closed: ``submit_outcome``) leave the job ``pending``; the
batch pauses with backoff (``PauseSettings``) or stops, and says why in ``BatchStats.stopped``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import json
import logging
import math
import os
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Literal, Protocol, cast

import attrs

from . import _config, _json
from ._journal import FINAL_STATES, JOURNAL_FAILURES, JobRow, Journal, storable
from ._session import AsyncSession, ProviderClient
from .download import DEFAULT_MAX_BYTES, EXTENSIONS, OTHER_EXTENSION
from .errors import (
    AdmissionTimeoutError,
    AuthenticationError,
    BackendUnavailableError,
    ConfigurationError,
    ImageGenError,
    InvalidRequestError,
    NotFoundError,
    NotSupportedError,
    PaymentRequiredError,
    PermissionDeniedError,
    RateLimitError,
    ServerError,
    SessionClosedError,
    SubmitUncertainError,
    TaskFailedError,
    TransportError,
)
from .models import TaskResult

if TYPE_CHECKING:
    from ._handle import TaskHandle
    from .router import Router

# The journal of a batch through a router is bound to this name; each row records its route.
ROUTER_JOURNAL = "router"

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
#: What a failed ``submit()`` means for its job (see ``submit_outcome``).
SubmitOutcome = Literal["uncertain", "failed", "later", "stop"]
# Nothing was sent and nothing is wrong with the job: the same create may work in a while.
_LATER: tuple[type[Exception], ...] = (
    TransportError,
    BackendUnavailableError,
    RateLimitError,
    ServerError,
    AdmissionTimeoutError,
)
# The account cannot work now (bad key, no credits, no balance or access): nothing more is
# sent, but the tasks already running are followed to their end.
_ACCOUNT_STOPS: tuple[type[Exception], ...] = (
    AuthenticationError,
    PaymentRequiredError,
    PermissionDeniedError,
)
# Nothing was sent and no job can be sent until someone acts: a closed session, an account
# the provider refuses (key, credits, access), an unwritable journal. Any other refusal
# before sending (InvalidRequestError, a ConfigurationError about the call) is the job's:
# stopping on it would stop every rerun at the same line.
_STOP: tuple[type[Exception], ...] = (
    SessionClosedError,
    AuthenticationError,
    PaymentRequiredError,
    PermissionDeniedError,
)


def is_journal_failure(error: BaseException) -> bool:
    """The journal or the disk failed. (Our timeouts are TimeoutErrors, so OSErrors by descent:
    a job's deadline is never a disk failure.)"""
    return isinstance(error, JOURNAL_FAILURES) and not isinstance(error, ImageGenError)


def submit_outcome(error: BaseException) -> SubmitOutcome:
    """What a failed create means for its job: ``uncertain`` (it may exist: never resend),
    ``later`` (not sent, not the job's fault: it stays pending and the batch pauses),
    ``stop`` (not sent, and no job can be until someone acts: the batch stops) or
    ``failed`` (the job's own fault, e.g. a parameter the provider refuses).
    """
    if isinstance(error, SubmitUncertainError):
        return "uncertain"
    if isinstance(error, TransportError) and not error.transient:
        return "stop"  # e.g. a TLS certificate problem: asking again will not help
    if isinstance(error, _LATER):
        return "later"
    if isinstance(error, _STOP) or is_journal_failure(error):
        return "stop"
    return "failed"


@attrs.define
class CreditBudget:
    """At most ``limit`` credits for one run: a job starts only when what was spent, what running
    jobs may still cost and its own ``cost`` fit together (a job is charged at its create)."""

    limit: float
    cost: float
    spent: float = 0.0
    reserved: float = 0.0

    def reserve(self) -> bool:
        """Take ``cost`` for a job about to be sent; False (nothing taken) when it could exceed the limit."""
        if self.spent + self.reserved + self.cost > self.limit:
            return False
        self.reserved += self.cost
        return True

    def release(self) -> None:
        """The job was not sent: its reservation goes back."""
        self.reserved = max(0.0, self.reserved - self.cost)

    def settle(self, used: float | None) -> None:
        """The job's create was accepted: it cost ``used`` (its reservation when not reported)."""
        self.release()
        self.spent += self.cost if used is None else used


@attrs.frozen
class PauseSettings:
    """How a batch waits out creates that could not be sent (provider or Redis unreachable,
    rate limited or 5xx after the session's own retries).

    The first pause lasts ``first`` seconds, each next one twice as long up to ``cap``; after
    ``max_pauses`` pauses with no create getting through, the batch stops with its unsent
    jobs pending (a rerun sends them). ``max_pauses=0`` stops at the first such failure.
    """

    first: float = 1.0
    cap: float = 30.0
    max_pauses: int = 5

    def __attrs_post_init__(self) -> None:
        for name in ("first", "cap"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
                raise ConfigurationError(f"PauseSettings.{name} must be a finite number >= 0, got {value!r}")
        if not isinstance(self.max_pauses, int) or isinstance(self.max_pauses, bool) or self.max_pauses < 0:
            raise ConfigurationError(f"PauseSettings.max_pauses must be an int >= 0, got {self.max_pauses!r}")


def pause_after(failures: int, settings: PauseSettings) -> float | None:
    """Seconds to pause after the ``failures``-th outage in a row; None once the batch must stop."""
    if failures > settings.max_pauses:
        return None
    return min(settings.cap, settings.first * 2.0 ** min(failures - 1, 64))  # no float overflow


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
    # Bytes that are not UTF-8 become lone surrogates, so such a line fails as one job
    # (its text cannot be sent) instead of stopping the whole file.
    with open(path, encoding="utf-8", errors="surrogateescape") as file:
        for text in file:
            if not text.strip():
                yield None
                continue
            try:
                value = _json.loads(text)  # nested too deep is a ValueError too
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
    with open(path, encoding="utf-8", errors="surrogateescape") as file:
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
    # Jobs of this run never sent because the batch stopped: still pending, a rerun sends them.
    pending: int = 0
    # Pauses taken to wait out creates that could not be sent.
    pauses: int = 0
    # Why the batch stopped before its end (None: it ran to the end).
    stopped: str | None = None
    # The stop was the account's (401/402/403) or the credit budget: what ran was finished.
    account_stopped: bool = False
    # Credits the provider reported for this run's jobs (nananobanana ``creditsUsed``).
    credits_used: float = 0.0
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
        """True when every job is done: nothing failed, uncertain, unfinished or unsent."""
        return not (self.failed or self.uncertain or self.unfinished or self.pending or self.stopped)

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
    # Where the task went, in a batch through a router.
    route: str | None = None


def spec_hash(spec: JobSpec | InvalidSpec) -> str:
    """A short digest of a job spec, to notice an input file changed between runs."""
    if isinstance(spec, InvalidSpec):
        canonical = spec.text.strip()
    else:
        try:
            canonical = json.dumps(spec, sort_keys=True, separators=(",", ":"), default=str)
        except (ValueError, RecursionError):
            # Too deep to serialise: such a job is refused as invalid, whatever it held.
            canonical = "unserialisable job"
    return hashlib.sha256(canonical.encode("utf-8", "surrogatepass")).hexdigest()[:16]


def spec_problem(spec: JobSpec) -> str | None:
    """Why a job cannot be sent (checked before anything is), or None."""
    if not isinstance(spec.get("prompt"), str):
        return 'the job has no "prompt" string'
    reserved = sorted(RESERVED_KEYS & set(spec))
    if reserved:
        return f"key {reserved[0]!r} cannot be set per job"
    try:
        _json.dumps(dict(spec))  # what is sent must be JSON: no lone surrogate, NaN or odd type
    except ValueError as error:
        return f"the job cannot be sent as JSON: {error}"
    return None


def encode_record(record: Mapping[str, Any]) -> bytes:
    """One results line as UTF-8 JSON; text that is not valid Unicode (a lone surrogate in a
    provider's message) is written as ``\\u`` escapes instead of failing the write."""
    try:
        return _json.dumps(record)
    except ValueError:
        return json.dumps(record, ensure_ascii=True, default=str).encode("ascii")


class _ResultsFile:
    """results.jsonl, cut back to what the journal committed, then appended line by line."""

    def __init__(self, path: Path, committed: int) -> None:
        # Unbuffered: a write that fails (disk full) leaves nothing behind to be flushed later.
        self._file: IO[bytes] = open(path, "ab", buffering=0)  # noqa: SIM115 - closed by close()
        self._descriptor = self._file.fileno()
        self._size = self._file.seek(0, os.SEEK_END)
        if self._size > committed:
            # Lines written after the journal's last commit belong to jobs the journal will
            # run again: drop them so no job gets two lines for one outcome.
            self._file.truncate(committed)
            self._size = committed
        elif self._size < committed:
            log.warning(
                "%s is shorter than its journal recorded (%d < %d bytes): lines of earlier runs are "
                "missing from it; the journal still has every job's state",
                path,
                self._size,
                committed,
            )

    def append(self, record: Mapping[str, Any]) -> int:
        """Write one whole line; the file size after it. A line that cannot be written whole
        (disk full) is cut off again, so the next line never runs into a torn one."""
        line = memoryview(encode_record(record) + b"\n")
        try:
            while line:
                line = line[self._file.write(line) or 0 :]
        except OSError:
            with contextlib.suppress(OSError):
                os.ftruncate(self._descriptor, self._size)
            raise
        self._size = self._file.tell()
        return self._size

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


def earlier_outputs(out_dir: Path) -> str | None:
    """What in ``out_dir`` shows that a batch ran there: a non-empty results.jsonl or saved outputs."""
    results = out_dir / RESULTS_NAME
    if results.is_file() and results.stat().st_size > 0:
        return f"a non-empty {RESULTS_NAME}"
    kinds = {*EXTENSIONS.values(), OTHER_EXTENSION}
    for path in out_dir.iterdir():
        if path.suffix.lower() in kinds and path.is_file():
            return f"saved outputs ({path.name}, ...)"
    return None


def _refusal(out_dir: Path, evidence: str, journal_state: str) -> str:
    return (
        f"{out_dir} holds {evidence} from an earlier batch, but {journal_state}: a run now would "
        f"create every job again (paying twice) and overwrite {RESULTS_NAME}, so nothing was sent. "
        "Restore the journal (together with its -wal file) if you can; otherwise move the earlier "
        "outputs away or use another output directory"
    )


def open_journal(out_dir: Path, path: Path, provider: str, model: str) -> Journal:
    """The batch's journal, refused (``ConfigurationError``) when it cannot account for ``out_dir``.

    Missing, empty (0 bytes), unreadable, or holding no batch (its WAL lost before the
    first checkpoint) while the directory holds results or outputs: a journal started
    afresh there would send every job again. Checked before SQLite touches the file,
    which would otherwise drop a stray WAL.
    """
    evidence = earlier_outputs(out_dir)
    size = path.stat().st_size if path.exists() else None
    if not size:
        state = f"its journal {path} is " + ("missing" if size is None else "empty (0 bytes)")
        wal = Path(f"{os.path.realpath(path)}-wal")
        if wal.is_file() and wal.stat().st_size > 0:
            raise ConfigurationError(
                f"{state} but its WAL {wal} is there: restore the journal file; nothing was sent"
            )
        if evidence is not None:
            raise ConfigurationError(_refusal(out_dir, evidence, state))
    refuse_new = None
    if evidence is not None:
        lost = f"its journal {path} holds no batch (was its -wal file lost?)"
        refuse_new = _refusal(out_dir, evidence, lost)
    try:
        return Journal(path, provider, model, refuse_new=refuse_new)
    except sqlite3.DatabaseError as error:
        raise ConfigurationError(
            f"{path} is not a readable batch journal ({error}), so nothing was sent: restore it from a "
            "backup, or move it and the outputs beside it away to start afresh"
        ) from error


def names_paid_work(record: Mapping[str, Any]) -> bool:
    """True when a results line says its job reached the provider (a task, or maybe one)."""
    return record.get("task_id") is not None or record.get("status") in ("done", "uncertain")


def tail_records(path: Path, committed: int) -> Iterator[dict[str, Any]]:
    """The lines of results.jsonl past the journal's last commit, read lazily; a torn line is skipped."""
    if not path.is_file():
        return
    with open(path, "rb") as file:
        file.seek(committed)
        for raw in file:
            try:
                record = _json.loads(raw)
            except ValueError:
                continue  # the end of a line cut short by a crash
            if isinstance(record, dict) and isinstance(record.get("line"), int):
                yield record


def check_tail(out_dir: Path, journal: Journal) -> dict[int, dict[str, Any]]:
    """Refuse results the journal does not cover; the tail lines whose task the journal lost.

    A line past the last commit is normal: a job killed between its line and its commit,
    whose row still says where it was. But a line that names a task (or a maybe-made one)
    for a job the journal has no row for, or one it says was never sent, means the journal
    lost commits (its WAL deleted after a kill): a run would create that job again.
    A row left ``creating`` whose line names its task id gets that id back (``_recover``).
    """
    recovered: dict[int, dict[str, Any]] = {}
    for record in tail_records(out_dir / RESULTS_NAME, journal.results_size):
        if not names_paid_work(record):
            continue  # failed before anything was sent: running it again costs nothing
        line = record["line"]
        row = journal.get(line)
        # A pending row may have a failed line naming its old task: --retry-failed reset the
        # row, then the new create was refused before sending. Done or uncertain it cannot.
        if row is None or (row.state == "pending" and record.get("status") != "failed"):
            known = "has no row for it" if row is None else "says it was never sent"
            raise ConfigurationError(
                f"{out_dir / RESULTS_NAME} records job {line} ({record.get('status')}, task "
                f"{record.get('task_id')}) but the journal {journal.path} {known}: the journal lost "
                "commits (was its -wal file deleted?) and a run now could create that job again, so "
                "nothing was sent. Restore the journal with its -wal file, or move the outputs away "
                "or use another output directory"
            )
        if row.state == "creating" and isinstance(record.get("task_id"), str):
            recovered[line] = record
    return recovered


def _recover(journal: Journal, results: _ResultsFile, recovered: Mapping[int, Mapping[str, Any]]) -> None:
    """Give rows left ``creating`` the task their dropped results line named, so it is never lost.

    An ``uncertain`` line (its create answered but the journal could not record it) is
    committed as it was; any other (done, failed) puts the job back to ``submitted``, polled again.
    """
    for line, record in recovered.items():
        row = journal.get(line)
        task_id = str(record["task_id"])
        if row is None:
            continue
        if record.get("status") == "uncertain":
            size = results.append(record)
            error = record.get("error")
            journal.finish(
                line,
                "uncertain",
                spec_hash=row.spec_hash,
                task_id=task_id,
                files=[],
                error=error if isinstance(error, str) else None,
                results_size=size,
            )
        else:
            journal.submitted(line, task_id, None)
        log.warning("batch job %d: task %s recovered from a results line the journal had lost", line, task_id)


@contextlib.contextmanager
def _opened(
    out_dir: Path, journal: Path | None, provider: str, model: str
) -> Iterator[tuple[Journal, _ResultsFile]]:
    """The output directory locked, its journal checked and open, results.jsonl open, stale
    ``*.part`` removed."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with _exclusive(out_dir), open_journal(out_dir, journal or out_dir / JOURNAL_NAME, provider, model) as db:
        recovered = check_tail(out_dir, db)
        for leftover in out_dir.glob("*.part"):  # from a download cut short by a crash
            leftover.unlink(missing_ok=True)
        results = _ResultsFile(out_dir / RESULTS_NAME, db.results_size)
        try:
            _recover(db, results, recovered)
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


class _Held(Exception):
    """The job was not sent and stays pending: the batch stopped before it could be."""


class _Settled(Exception):
    """The job's outcome is already recorded (or logged); nothing more to do for it."""


class _Left(Exception):
    """The batch stopped while the job's task ran: no longer followed, a rerun polls it."""


class _Gate:
    """Where every create waits while the batch is paused, and learns that it stopped.

    Many jobs fail together in one outage: a failure counts (and starts a pause) only when
    its attempt began after the last pause, so 64 refused connections are one outage, not 64.
    """

    def __init__(
        self, settings: PauseSettings, stats: BatchStats, on_change: Callable[[], None] = lambda: None
    ) -> None:
        self.settings = settings
        self.stats = stats
        self._on_change = on_change  # progress displays show pauses and the stop
        self.round = 0  # pauses begun so far; an attempt remembers the round it started in
        self.failures = 0  # outages in a row with no create getting through
        self._open = asyncio.Event()
        self._open.set()
        self._timer: asyncio.TimerHandle | None = None
        self._watchers: set[Callable[[], None]] = set()

    @property
    def stopped(self) -> bool:
        return self.stats.stopped is not None

    async def enter(self) -> int:
        """Wait out a pause; the round this attempt belongs to. ``_Held`` once the batch stopped."""
        await self._open.wait()
        if self.stopped:
            raise _Held
        return self.round

    def watch(self, callback: Callable[[], None]) -> None:
        """Call ``callback()`` when the batch stops (until ``unwatch``)."""
        self._watchers.add(callback)

    def unwatch(self, callback: Callable[[], None]) -> None:
        self._watchers.discard(callback)

    def sent(self) -> None:
        """A create got through: the outage, if any, is over."""
        self.failures = 0

    def not_sent(self, round_: int, line: int, error: BaseException) -> None:
        """A create started in ``round_`` could not be sent: pause (longer each time) or stop."""
        if self.stopped or round_ != self.round:
            return  # a pause for this outage already began after this attempt started
        self.failures += 1
        wait = pause_after(self.failures, self.settings)
        if wait is None:
            self.stop(f"{self.failures} outage(s) in a row, creates not sent: {_describe(error)}")
            return
        self.round += 1
        self.stats.pauses += 1
        log.warning(
            "batch paused %.1f s: job %d's create could not be sent (%s); it stays pending",
            wait,
            line,
            _describe(error),
        )
        self._open.clear()
        self._timer = asyncio.get_running_loop().call_later(wait, self._open.set)
        self._on_change()

    def stop(self, reason: str, *, finish_running: bool = False) -> None:
        """Send nothing more; jobs waiting here stay pending. The first reason is kept.

        ``finish_running`` (an account stop, the credit budget): the tasks already running are
        still followed to their end; otherwise they are left for a rerun to poll.
        """
        if self.stopped:
            return
        self.stats.stopped = reason
        self.stats.account_stopped = finish_running
        log.error("batch stopped: %s; unsent jobs stay pending, rerun to send them", reason)
        if self._timer is not None:
            self._timer.cancel()
        self._open.set()  # wake the waiting jobs: they see the stop and leave
        if not finish_running:
            for callback in list(self._watchers):
                callback()
        self._on_change()


def _describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__


class _Destination(Protocol):
    """Where a batch's jobs go: one client and model, or a router over several targets."""

    @property
    def name(self) -> str:
        """How log lines and results name it."""

    @property
    def stopped(self) -> bool:
        """No create can be made until someone acts (the key's circuit, or every target's, is open)."""

    async def submit(
        self,
        *,
        prompt: str,
        timeout: float | None,
        before_create: Callable[[], object],
        on_route: Callable[[str], object],
        **params: Any,
    ) -> TaskHandle:
        """Create the job's task; ``on_route(label)`` before each target is tried (a router's)."""

    def resume(
        self, task_id: str, route: str | None, *, estimated_duration: float | None, timeout: float | None
    ) -> TaskHandle:
        """Follow a task an earlier run created (on ``route``, for a router)."""


@attrs.frozen
class _OneClient:
    """A batch on one client and model."""

    client: ProviderClient
    model: str

    @property
    def name(self) -> str:
        return self.client.name

    @property
    def stopped(self) -> bool:
        return self.client.blocked is not None

    async def submit(
        self,
        *,
        prompt: str,
        timeout: float | None,
        before_create: Callable[[], object],
        on_route: Callable[[str], object],
        **params: Any,
    ) -> TaskHandle:
        return await self.client.submit(
            self.model, prompt=prompt, timeout=timeout, before_create=before_create, **params
        )

    def resume(
        self, task_id: str, route: str | None, *, estimated_duration: float | None, timeout: float | None
    ) -> TaskHandle:
        return self.client.resume(task_id, self.model, estimated_duration=estimated_duration, timeout=timeout)


@attrs.frozen
class _Routed:
    """A batch through a router: each job on the lane that can start it, its route journaled."""

    router: Router

    @property
    def name(self) -> str:
        return ROUTER_JOURNAL

    @property
    def stopped(self) -> bool:
        return self.router.stopped

    async def submit(
        self,
        *,
        prompt: str,
        timeout: float | None,
        before_create: Callable[[], object],
        on_route: Callable[[str], object],
        **params: Any,
    ) -> TaskHandle:
        return await self.router.submit(
            prompt=prompt, timeout=timeout, before_create=before_create, on_route=on_route, **params
        )

    def resume(
        self, task_id: str, route: str | None, *, estimated_duration: float | None, timeout: float | None
    ) -> TaskHandle:
        if route is None:
            raise ConfigurationError(f"the journal names no route for task {task_id}: it cannot be polled")
        return self.router.resume(task_id, route, estimated_duration=estimated_duration, timeout=timeout)


@attrs.define(eq=False)
class _Batch:
    """One run of a batch: the loop that feeds jobs and what each job does."""

    session: AsyncSession
    dest: _Destination
    out_dir: Path
    journal: Journal
    results: _ResultsFile
    stats: BatchStats
    options: _Options
    on_progress: Callable[[BatchStats], None] | None
    gate: _Gate
    budget: CreditBudget | None = None

    def notify(self) -> None:
        if self.on_progress is not None:
            self.on_progress(self.stats)

    async def feed(self, jobs: Iterable[JobSpec | InvalidSpec | None], concurrency: int) -> None:
        """Start jobs as slots free up; at most ``concurrency`` run at once. Once the batch
        stopped, no further line is read: those jobs stay as they are for a rerun."""
        slots = asyncio.Semaphore(concurrency)
        running: set[asyncio.Task[None]] = set()

        def release(task: asyncio.Task[None]) -> None:
            running.discard(task)
            slots.release()

        try:
            for line, spec in enumerate(jobs, 1):
                if self.gate.stopped:
                    break
                try:
                    job = None if spec is None else self.admit(line, spec)
                except JOURNAL_FAILURES as error:
                    # Stop, not crash: a crash would cancel the creates on the wire (uncertain).
                    self.gate.stop(f"the journal or output directory failed: {_describe(error)}")
                    break
                if job is None:
                    if line % YIELD_EVERY == 0:
                        await asyncio.sleep(0)  # let running jobs progress while skipping
                    continue
                await slots.acquire()
                if self.gate.stopped:  # it stopped while this job waited for a slot
                    slots.release()
                    break
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
        problem = spec.reason if isinstance(spec, InvalidSpec) else spec_problem(spec)
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
        return _Job(line, digest, prompt, params, row.task_id, row.estimated_duration, retrying, row.route)

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
        """One job to its end; the journal is written before and after each provider call.

        A journal or disk that fails under a job stops the batch (every later job would
        fail the same way) instead of crashing it: the other jobs end as they can.
        """
        self.stats.in_flight += 1
        self.notify()
        try:
            await self._run(job)
        except _Held:
            self.stats.pending += 1
        except _Settled:
            pass
        except _Left:
            log.info("batch job %d left for a rerun to poll: the batch stopped", job.line)
            self.stats.unfinished += 1
        except ImageGenError as error:  # (a timeout is an OSError by descent: never the journal's)
            log.warning("batch job %d left unfinished: %s", job.line, error)
            self.stats.unfinished += 1
        except JOURNAL_FAILURES as error:
            log.error("batch job %d: the journal or output directory failed: %s", job.line, _describe(error))
            self.gate.stop(f"the journal or output directory failed: {_describe(error)}")
            self.stats.unfinished += 1
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
            account = isinstance(error, _ACCOUNT_STOPS)
            if submit_outcome(error) == "stop" and (not account or self.dest.stopped):
                # The session closed or the account is refused while a task was followed.
                self.gate.stop(_describe(error), finish_running=account)
            if not isinstance(error, TaskFailedError) and self._polling(job.line):
                # The task exists and may still finish (a poll gave up, a timeout, a 5xx
                # after the retries, the session closed): it stays paid for, and a rerun
                # polls it again.
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
            handle = self.dest.resume(
                job.task_id,
                job.route,
                estimated_duration=job.estimated_duration,
                timeout=self.options.timeout,
            )
            try:
                return await self._follow(handle)
            except (TaskFailedError, NotFoundError):
                if not job.create_if_lost:
                    raise
                log.info("batch job %d: task %s is gone or failed; creating it again", job.line, job.task_id)
        handle = await self._create(job)
        self.stats.created += 1
        self._record_task(job, handle)
        return await self._follow(handle)

    async def _follow(self, handle: TaskHandle) -> TaskResult:
        """The handle's result, unless the batch stops first: then its polling ends (an outage
        would keep it retrying until its deadline) and the task, journaled, waits for a rerun."""
        if not self.gate.stopped or self.stats.account_stopped:
            waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()

            def wake(*_: object) -> None:
                if not waiter.done():
                    waiter.set_result(None)

            handle.add_done_callback(wake)
            self.gate.watch(wake)
            try:
                await waiter
            finally:
                self.gate.unwatch(wake)
        if not handle.done():
            handle.cancel()
            raise _Left
        return handle.result()

    async def _create(self, job: _Job) -> TaskHandle:
        """Send job's create once the gate is open; back to ``pending`` whenever it was not sent.

        A failure that is not the job's own (``submit_outcome``: later / stop) keeps the
        job pending and pauses or stops the batch; the job tries again after a pause.
        """
        while True:
            round_ = await self.gate.enter()
            budget = self.budget
            if budget is not None and not budget.reserve():
                self.gate.stop(f"the credit budget of {budget.limit:g} is reached", finish_running=True)
                raise _Held
            try:
                self.journal.pending(job.line, job.spec_hash)
            except JOURNAL_FAILURES as error:
                if budget is not None:
                    budget.release()
                self.gate.stop(f"the journal could not be written: {_describe(error)}")
                raise _Held from error
            # The lane about to be tried (a router's) is journaled with "creating", durably
            # before the create goes out: an uncertain job then names where it may be made.
            tried: list[str] = []
            try:
                handle = await self.dest.submit(
                    prompt=job.prompt,
                    timeout=self.options.timeout,
                    before_create=functools.partial(self._creating_on, job.line, tried),
                    on_route=tried.append,
                    **job.params,
                )
            except Exception as error:
                outcome = submit_outcome(error)
                if outcome == "stop" and isinstance(error, _ACCOUNT_STOPS) and not self.dest.stopped:
                    outcome = "failed"  # a refusal of this job (one model's plan), not of the account
                if budget is not None:
                    # An uncertain create may have been charged: keep its reservation as spent.
                    budget.settle(None) if outcome == "uncertain" else budget.release()
                if outcome in ("uncertain", "failed"):
                    raise
                self._unsent(job.line)
                if is_journal_failure(error):
                    self.gate.stop(f"the journal could not be written: {_describe(error)}")
                elif outcome == "stop":
                    self.gate.stop(_describe(error), finish_running=isinstance(error, _ACCOUNT_STOPS))
                else:
                    self.gate.not_sent(round_, job.line, error)
                continue  # the gate holds it (a pause) or lets it go (stopped: _Held)
            self.gate.sent()
            if budget is not None:
                budget.settle(handle.credits_used)
            self.stats.credits_used += handle.credits_used or 0.0
            return handle

    def _record_task(self, job: _Job, handle: TaskHandle) -> None:
        """Commit the accepted task id; a duplicate id or a failed commit is settled here.

        The task is paid for from here on, so it is never left unnamed: a commit that fails
        (disk full) logs it as an ERROR and writes it to results.jsonl as best it can.
        """
        task_id, route = handle.task_id, handle.route  # a router's lane; None for one client
        try:
            other = self.journal.line_with_task(task_id, job.line, route)
            if other is None:
                self.journal.submitted(job.line, task_id, handle.estimated_duration, route)
                return
        except JOURNAL_FAILURES as error:
            handle.cancel()
            self._orphaned(job, handle, error)
            raise _Settled from error
        # Two creates answered with one id: one task cannot be both jobs' result, and this
        # create may have made a task of its own under an id nobody told us. Never polled.
        handle.cancel()
        log.warning(
            "batch jobs %d and %d were both answered with %s task %s: job %d is recorded uncertain",
            other,
            job.line,
            handle.provider,
            task_id,
            job.line,
        )
        self.finish(
            job.line,
            job.spec_hash,
            "uncertain",
            job.prompt,
            error=f"the provider answered this create with task {task_id}, which job {other} already "
            "has: this create may have made another task, or none; it is not polled",
        )
        raise _Settled

    def _orphaned(self, job: _Job, handle: TaskHandle, error: BaseException) -> None:
        """A paid task the journal could not record: named in the log and results.jsonl, then stop."""
        task_id = handle.task_id
        log.error(
            "batch job %d: %s %s accepted the create as task %s, but the journal could not record it "
            "(%s); the task is paid for: client.resume(%r, %r) picks it up",
            job.line,
            handle.provider,
            handle.model,
            task_id,
            _describe(error),
            task_id,
            handle.model,
        )
        record = self._record(
            job.line,
            "uncertain",
            job.prompt,
            task_id=task_id,
            error=f"accepted as {handle.provider} task {task_id}, but the journal could not record it: "
            f"{_describe(error)}",
        )
        try:
            self.results.append(record)  # the next run commits this line (check_tail)
        except OSError as write_error:
            log.error("batch job %d: results.jsonl cannot be written either: %s", job.line, write_error)
        self.stats.add("uncertain")
        self.gate.stop(f"the journal could not be written: {_describe(error)}")

    def _unsent(self, line: int) -> None:
        """Job ``line``'s create was not sent: its row goes back to ``pending``."""
        try:
            self.journal.not_sent(line)
        except JOURNAL_FAILURES as error:
            log.error(
                "batch job %d was never sent, but the journal could not record that (%s): if a rerun "
                "reports it uncertain, --resubmit-uncertain is safe for it",
                line,
                _describe(error),
            )
            self.gate.stop(f"the journal could not be written: {_describe(error)}")

    async def _creating_on(self, line: int, tried: list[str]) -> None:
        """``_creating`` on the lane a router tried last (none for one client)."""
        await self._creating(line, tried[-1] if tried else None)

    async def _creating(self, line: int, route: str | None = None) -> None:
        """Record that job ``line``'s create goes out, durably, before it is sent.

        The fsyncs run in a worker thread: on a real disk they take milliseconds, and the
        event loop has other jobs to serve. results.jsonl goes first, so every line written
        before this create is durable with the journal commits that count it (a job that
        finishes while the fsyncs run may still lose its line to a power loss; its files
        and journal row stay). If the commit, the fsync or anything after it fails or the
        wait is cancelled, the create is never sent, and the row says so.
        """
        try:
            self.journal.creating(line, route)
            await asyncio.to_thread(self._durable)
        except BaseException:
            self._unsent(line)
            raise

    def _durable(self) -> None:
        self.results.durable()
        self.journal.durable()

    def _record(
        self,
        line: int,
        status: Status,
        prompt: str | None,
        *,
        error: str | None = None,
        task_id: str | None = None,
        files: list[str] | None = None,
        urls: tuple[str, ...] = (),
    ) -> dict[str, Any]:
        record = {
            "line": line,
            "prompt": prompt,
            "task_id": task_id,
            "status": status,
            "files": files or [],
            "urls": list(urls),
            "error": storable(error),
        }
        if isinstance(self.dest, _Routed):
            row = self.journal.get(line)
            record["route"] = row.route if row is not None else None
        return record

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
        record = self._record(line, status, prompt, error=error, task_id=task_id, files=files, urls=urls)
        size = self.results.append(record)
        self.journal.finish(
            line, status, spec_hash=digest, task_id=task_id, files=files or [], error=error, results_size=size
        )
        self.stats.add(status)
        self.notify()


async def _credit_budget(client: ProviderClient, model: str, max_credits: float) -> CreditBudget:
    """The run's budget, priced by the provider's own model list; refused where it lists no price."""
    if isinstance(max_credits, bool) or not isinstance(max_credits, int | float) or not max_credits >= 0:
        raise ConfigurationError(f"max_credits must be a number of at least 0, got {max_credits!r}")
    try:
        models = await client.models()
    except NotSupportedError:
        raise ConfigurationError(f"max_credits: {client.name} reports no prices (no models list)") from None
    cost = next((info.credits_cost for info in models if info.name == model), None)
    if cost is None:
        raise ConfigurationError(f"max_credits: {client.name} lists no credit cost for model {model!r}")
    return CreditBudget(float(max_credits), cost)


Jobs = Iterable[JobSpec | InvalidSpec | None]


async def _destination(
    session: AsyncSession,
    client_name: object,
    model: object,
    jobs: Jobs | None,
    max_credits: float | None,
) -> tuple[_OneClient | _Routed, Jobs, CreditBudget | None]:
    """Where the jobs go (a client and model, or a router), the jobs, and the credit budget."""
    from .router import Router

    if isinstance(client_name, Router):
        if jobs is not None:
            raise ConfigurationError("run_batch(session, router, jobs) takes no model: its targets name them")
        if max_credits is not None:
            raise ConfigurationError("max_credits is for a batch on one client (its model has one price)")
        if client_name.rerun_failed:
            # A rerun's task would be one the journal never records: a crash while it runs would lose it.
            raise ConfigurationError(
                "a batch reruns failed jobs itself: pass retry_failed=True (--retry-failed) and a router "
                "made without rerun_failed"
            )
        if client_name.stopped:
            raise ConfigurationError("every lane of the router is stopped by an earlier answer; fix it first")
        return _Routed(client_name), cast(Jobs, model), None
    if not isinstance(client_name, str) or not isinstance(model, str) or jobs is None:
        raise ConfigurationError(
            "run_batch takes (session, client_name, model, jobs) or (session, router, jobs)"
        )
    client = session.client(client_name)
    client.check_ready()
    if client.blocked is not None:
        raise ConfigurationError(
            f"{client.name} is stopped by an earlier answer ({client.blocked}); fix the cause, then "
            "call client.unblock() (or use a new session) and run the batch again"
        )
    budget = None if max_credits is None else await _credit_budget(client, model, max_credits)
    return _OneClient(client, model), jobs, budget


async def run_batch(
    session: AsyncSession,
    client_name: str | Router,
    model: str | Jobs,
    jobs: Jobs | None = None,
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
    pauses: PauseSettings | None = None,
    max_credits: float | None = None,
) -> BatchStats:
    """Run every job of ``jobs`` on ``client_name``/``model``; files and results.jsonl go to ``out_dir``.

    ``run_batch(session, router, jobs, ...)`` runs them through a router instead
    (``session.router([...])``): each job on the lane that can start it soonest, the journal
    recording each job's route with its task id, so a rerun polls the right provider and key
    (a route no longer in the router leaves its job unfinished); one lane's account stop moves
    jobs to the others, and the batch stops only when every lane's key is stopped.

    ``jobs`` yields job specs (``{"prompt": ..., **params}``), numbered from 1 in order;
    ``None`` items are placeholders (blank lines) and skipped. It is read lazily, so it may
    be a generator over millions of lines. The journal defaults to
    ``out_dir/journal.sqlite``; rerunning with the same one resumes. ``retry_failed`` runs
    failed jobs again (polling their task first when they have one), ``resubmit_uncertain``
    sends again the creates that may have reached the provider (this can pay twice).
    ``timeout`` is each job's deadline; ``total`` (if known) and ``on_progress(stats)``
    serve progress displays.

    A create that could not be sent for a reason that is not the job's own (provider or
    Redis unreachable, rate limited, 5xx: nothing was sent) leaves the job pending and
    pauses the batch (``pauses``, default ``PauseSettings()``); after too many outages in
    a row, or at once when the session closes, the account is refused or the journal
    cannot be written, the batch stops: ``stats.stopped`` says why, ``stats.pending``
    counts the jobs left unsent, and a rerun sends them. An account stop (401 bad key, 402
    no credits, 403 no balance or access) stops sending at once but follows the running
    tasks to their end (``stats.account_stopped``).

    ``max_credits``: never start a job that could take this run past that many credits
    (the model's ``credits_cost`` from ``client.models()``; nananobanana); the batch then
    stops as for an account stop. ``stats.credits_used`` sums what the creates cost.

    Raises ``ConfigurationError`` for a missing key, a journal of another batch, a changed
    input, or a directory holding earlier results its journal does not cover (missing,
    empty, damaged or having lost commits): nothing is sent then.
    """
    # Checked before anything is read or sent: a bad value must not cost a paid create.
    concurrency = _config.whole_number("concurrency", concurrency, 1)
    max_bytes = _config.whole_number("max_bytes", max_bytes, 1, error=InvalidRequestError)
    if timeout is not None and (
        isinstance(timeout, bool) or not isinstance(timeout, int | float) or not 0 < timeout < math.inf
    ):
        # Checked once here: every job's submit() would refuse it, each as a failed job.
        raise ConfigurationError(f"timeout must be a number of seconds above 0, got {timeout!r}")
    where, jobs, budget = await _destination(session, client_name, model, jobs, max_credits)
    directory = Path(out_dir)
    stats = BatchStats(total=total)
    journal_path = None if journal is None else Path(journal)
    bound_model = where.model if isinstance(where, _OneClient) else ""
    with _opened(directory, journal_path, where.name, bound_model) as (db, results):
        options = _Options(download, retry_failed, resubmit_uncertain, max_bytes, timeout)
        gate = _Gate(pauses or PauseSettings(), stats, lambda: on_progress(stats) if on_progress else None)
        batch = _Batch(session, where, directory, db, results, stats, options, on_progress, gate, budget)
        try:
            await batch.feed(jobs, concurrency)
        finally:
            stats.ended = time.monotonic()
    return stats
