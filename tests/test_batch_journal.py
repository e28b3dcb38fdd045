"""A journal that cannot account for its directory is refused; a journal that fails mid-run
never leaves a paid task unnamed nor a never-sent job uncertain."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp.web
import pytest

from image_gen_async import ConfigurationError
from image_gen_async._journal import Journal
from image_gen_async.batch import JOURNAL_NAME, RESULTS_NAME, JobSpec, check_tail, run_batch
from image_gen_async.testing import Emulator

from .batch_helpers import names, results, state_counts, states
from .conftest import KEYS, MODELS, SessionFactory
from .test_cli import cli

DH3 = MODELS["dh3"]


def prompts(count: int) -> Iterator[JobSpec]:
    return ({"prompt": f"a fox, take {i}"} for i in range(count))


async def finished_batch(session: Any, out: Path, count: int = 4) -> bytes:
    """A batch run to its end in ``out``; the bytes of its results.jsonl."""
    stats = await run_batch(session, "dh3", DH3, prompts(count), out_dir=out)
    assert stats.done == count
    return (out / RESULTS_NAME).read_bytes()


def lose_journal(out: Path) -> None:
    for suffix in ("", "-wal", "-shm"):
        (out / f"{JOURNAL_NAME}{suffix}").unlink(missing_ok=True)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("deleted", "journal .* is missing"),
        ("emptied", r"is empty \(0 bytes\)"),
        ("overwritten", "not a readable batch journal"),
        ("cut short", "not a readable batch journal"),
        ("deleted with the results", "saved outputs"),
    ],
)
async def test_a_directory_with_results_but_no_usable_journal_is_refused(
    session: Any, emulator: Emulator, tmp_path: Path, damage: str, message: str
) -> None:
    before = await finished_batch(session, tmp_path, count=40)
    journal = tmp_path / JOURNAL_NAME
    if damage == "deleted":
        lose_journal(tmp_path)
    elif damage == "emptied":
        journal.write_bytes(b"")
    elif damage == "overwritten":
        journal.write_bytes(b"not a database at all, " * 400)
    elif damage == "cut short":
        assert journal.stat().st_size > 8192
        os.truncate(journal, 8192)
    else:
        lose_journal(tmp_path)
        (tmp_path / RESULTS_NAME).unlink()
    with pytest.raises(ConfigurationError, match=message) as refused:
        await run_batch(session, "dh3", DH3, prompts(40), out_dir=tmp_path)
    assert str(tmp_path) in str(refused.value) and "nothing was sent" in str(refused.value)
    assert emulator.stats.create_requests["dh3"] == 40
    if damage != "deleted with the results":
        assert (tmp_path / RESULTS_NAME).read_bytes() == before  # not truncated


async def test_a_journal_deleted_while_its_wal_remains_is_refused(session: Any, tmp_path: Path) -> None:
    await finished_batch(session, tmp_path)
    (tmp_path / JOURNAL_NAME).rename(tmp_path / "elsewhere.sqlite")
    (tmp_path / f"{JOURNAL_NAME}-wal").write_bytes(b"\0" * 4096)
    with pytest.raises(ConfigurationError, match="WAL"):
        await run_batch(session, "dh3", DH3, prompts(4), out_dir=tmp_path / ".")


async def test_a_fresh_directory_with_unrelated_files_runs(session: Any, tmp_path: Path) -> None:
    (tmp_path / "jobs.jsonl").write_text('{"prompt": "a fox"}\n')
    (tmp_path / "notes.txt").write_text("mine")
    stats = await run_batch(session, "dh3", DH3, prompts(2), out_dir=tmp_path)
    assert stats.done == 2


# --- a real kill, then the WAL lost ---------------------------------------------------------


def batch_args(source: Path, out: Path, url: str) -> tuple[str, ...]:
    args = ("batch", str(source), "--provider", "dh3", "--model", DH3, "-o", str(out), "--base-url", url)
    fast = ("--first-poll", "0.02", "--min-poll-interval", "0.005", "--concurrency", "4", "--rate", "500")
    return (*args, *fast)


async def start_batch(source: Path, out: Path, url: str) -> asyncio.subprocess.Process:
    env = {k: v for k, v in os.environ.items() if not k.endswith("_API_KEY")} | {"DH3_API_KEY": KEYS["dh3"]}
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "image_gen_async", *batch_args(source, out, url),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env,
    )  # fmt: skip


async def until_done(process: asyncio.subprocess.Process, out: Path, count: int) -> None:
    deadline = time.monotonic() + 30
    while state_counts(out).get("done", 0) < count:
        assert time.monotonic() < deadline and process.returncode is None, "the batch made no progress"
        await asyncio.sleep(0.005)  # the next look at the journal, not a wait for an event


@pytest.mark.parametrize("checkpointed", [False, True], ids=["before-a-checkpoint", "after-a-checkpoint"])
async def test_a_batch_killed_whose_wal_is_then_lost_is_refused_by_the_cli(
    emulator: Emulator, tmp_path: Path, checkpointed: bool
) -> None:
    source = tmp_path / "jobs.jsonl"
    source.write_text("".join(json.dumps({"prompt": f"a fox, take {i}"}) + "\n" for i in range(400)))
    out = tmp_path / "out"
    process = await start_batch(source, out, emulator.url)
    try:
        await until_done(process, out, 5)
        if checkpointed:
            # What SQLite does on its own every 1000 pages: copy the WAL into the main file.
            with contextlib.closing(sqlite3.connect(out / JOURNAL_NAME)) as db:
                db.execute("PRAGMA wal_checkpoint(PASSIVE)")
            await until_done(process, out, 15)
    finally:
        process.send_signal(signal.SIGKILL)
        await process.wait()
    assert (out / f"{JOURNAL_NAME}-wal").stat().st_size > 0  # the kill left commits only there
    (out / f"{JOURNAL_NAME}-wal").unlink()
    (out / f"{JOURNAL_NAME}-shm").unlink(missing_ok=True)
    before, creates = (out / RESULTS_NAME).read_bytes(), emulator.stats.create_requests["dh3"]

    # The rerun in-process: the kill above is what needed a child process.
    code, _, err = await cli(*batch_args(source, out, emulator.url), keys={"DH3_API_KEY": KEYS["dh3"]})
    assert code == 2, err
    expected = "lost commits" if checkpointed else "holds no batch"
    # The kill may land inside one of SQLite's own checkpoints (the batch writes on): without
    # its WAL the main file is then torn, and refused as unreadable. Either way, nothing sent.
    torn = checkpointed and "malformed" in err
    assert (expected in err or torn) and str(out) in err
    assert emulator.stats.create_requests["dh3"] == creates  # nothing sent
    assert (out / RESULTS_NAME).read_bytes() == before


# --- commits that fail mid-run ----------------------------------------------------------------


def journal_refusing(out: Path, state: str) -> None:
    """A journal whose commits of ``state`` fail, as SQLite fails them when the disk is full."""
    out.mkdir(parents=True, exist_ok=True)
    Journal(out / JOURNAL_NAME, "dh3", DH3).close()
    with contextlib.closing(sqlite3.connect(out / JOURNAL_NAME)) as db:
        db.execute(
            f"CREATE TRIGGER refuse_{state} BEFORE UPDATE OF state ON jobs WHEN NEW.state = '{state}' "
            "BEGIN SELECT RAISE(ABORT, 'database or disk is full'); END"
        )


def space_freed(out: Path, state: str) -> None:
    with contextlib.closing(sqlite3.connect(out / JOURNAL_NAME)) as db:
        db.execute(f"DROP TRIGGER refuse_{state}")


async def test_a_failed_submitted_commit_names_the_paid_task_and_a_rerun_keeps_it(
    make_session: SessionFactory, emulator: Emulator, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    journal_refusing(tmp_path, "submitted")
    session = make_session()
    with caplog.at_level(logging.ERROR, "image_gen_async"):
        stats = await run_batch(session, "dh3", DH3, prompts(3), out_dir=tmp_path, concurrency=1)
    (task_id,) = emulator.tasks  # the provider made and billed it
    assert stats.stopped is not None and "journal could not be written" in stats.stopped
    assert (stats.created, stats.uncertain, stats.done) == (1, 1, 0)
    named = [r for r in caplog.records if task_id in r.getMessage()]
    assert named and all(word in named[0].getMessage() for word in ("dh3", DH3, "paid"))
    (line,) = results(tmp_path)
    assert (line["line"], line["status"], line["task_id"]) == (1, "uncertain", task_id)

    space_freed(tmp_path, "submitted")
    again = await run_batch(make_session(), "dh3", DH3, prompts(3), out_dir=tmp_path)
    assert (again.done, again.uncertain, again.created) == (2, 1, 2)
    assert states(tmp_path) == {1: "uncertain", 2: "done", 3: "done"}
    assert [r["task_id"] for r in results(tmp_path) if r["line"] == 1] == [task_id]  # kept, once
    # Asked to, the rerun polls that task instead of creating the job again.
    jobs = prompts(3)
    resumed = await run_batch(make_session(), "dh3", DH3, jobs, out_dir=tmp_path, resubmit_uncertain=True)
    assert (resumed.done, resumed.resumed, resumed.created) == (3, 1, 0)
    assert emulator.stats.creates["dh3"] == 3 and len(names(tmp_path)) == 3


async def test_a_failed_creating_commit_sends_nothing_and_leaves_the_job_pending(
    make_session: SessionFactory, emulator: Emulator, tmp_path: Path
) -> None:
    journal_refusing(tmp_path, "creating")
    stats = await run_batch(make_session(), "dh3", DH3, prompts(3), out_dir=tmp_path, concurrency=1)
    assert stats.stopped is not None and "journal could not be written" in stats.stopped
    assert (stats.pending, stats.uncertain, stats.failed) == (1, 0, 0)
    assert states(tmp_path) == {1: "pending"} and emulator.stats.create_requests["dh3"] == 0

    space_freed(tmp_path, "creating")
    again = await run_batch(make_session(), "dh3", DH3, prompts(3), out_dir=tmp_path)
    assert (again.done, again.uncertain, again.created) == (3, 0, 3)
    assert emulator.stats.creates["dh3"] == 3


# --- a real full disk -----------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs (needs the right to mount, as root in CI; skipped elsewhere)."""
    point = tmp_path / "small"
    point.mkdir()
    try:
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(point)], check=True, capture_output=True
        )
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("needs the right to mount a small tmpfs")
    try:
        yield point
    finally:
        subprocess.run(["umount", "-l", str(point)], check=False, capture_output=True)


def fill(path: Path) -> None:
    """Write ``path`` until the filesystem has no byte left."""
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT)
    try:
        while True:
            os.write(descriptor, b"\0" * 4096)
    except OSError:
        pass
    finally:
        os.close(descriptor)


@pytest.fixture
async def filling_provider(small_disk: Path) -> AsyncIterator[tuple[str, list[str]]]:
    """A dh3 look-alike that fills the disk while it makes the task, then answers with its id."""
    made: list[str] = []

    async def create(request: aiohttp.web.Request) -> aiohttp.web.Response:
        fill(small_disk / "filler")
        made.append(f"paid-{len(made) + 1}")
        return aiohttp.web.json_response({"code": 200, "message": "ok", "task_id": made[-1]})

    app = aiohttp.web.Application()
    app.router.add_post("/api/v1/task/create", create)
    runner = aiohttp.web.AppRunner(app, shutdown_timeout=0.1)
    await runner.setup()
    await aiohttp.web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}", made
    finally:
        await runner.cleanup()


async def test_a_disk_full_after_the_create_was_answered_names_the_task_in_the_log(
    make_session: SessionFactory,
    emulator: Emulator,
    small_disk: Path,
    filling_provider: tuple[str, list[str]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    url, made = filling_provider
    out = small_disk / "out"
    session = make_session(base_urls={"dh3": url})
    with caplog.at_level(logging.ERROR, "image_gen_async"):
        stats = await run_batch(session, "dh3", DH3, prompts(3), out_dir=out, concurrency=1)
    assert made == ["paid-1"] and stats.stopped is not None and "journal" in stats.stopped
    logged = [r.getMessage() for r in caplog.records if "paid-1" in r.getMessage()]
    assert logged and all(word in logged[0] for word in ("dh3", DH3, "paid for"))
    assert results(out) == []  # nothing torn left behind: the line could not be written whole

    (small_disk / "filler").unlink()  # space freed; the rest of the batch runs on
    again = await run_batch(make_session(), "dh3", DH3, prompts(3), out_dir=out)
    assert (again.done, again.uncertain, again.created) == (2, 1, 2)
    assert emulator.stats.creates["dh3"] == 2 and made == ["paid-1"]


# --- the tail rule, as a table ----------------------------------------------------------------


def journal_with_row(out: Path, state: str | None) -> Journal:
    """A journal whose job 1 is in ``state`` (None: no row), by the journal's own steps."""
    journal = Journal(out / JOURNAL_NAME, "dh3", DH3)
    steps = ["pending", "creating", "submitted", "downloading"]
    if state is None:
        return journal
    if state == "done":
        journal.finish(1, "done", spec_hash="h", task_id="t", files=[], error=None, results_size=0)
        return journal
    for step in steps[: steps.index(state) + 1]:
        if step == "pending":
            journal.pending(1, "h")
        elif step == "submitted":
            journal.submitted(1, "t", None)
        else:
            getattr(journal, step)(1)
    return journal


@pytest.mark.parametrize(
    ("state", "status", "task_id", "verdict"),
    [
        (None, "done", "t", "refused"),  # the journal lost the job: a run would create it again
        (None, "uncertain", None, "refused"),  # it may have been made
        (None, "failed", None, "dropped"),  # nothing was sent for it: running it again is free
        ("pending", "done", "t", "refused"),
        ("pending", "failed", "t0", "dropped"),  # --retry-failed reset it, the new create refused
        ("creating", "uncertain", None, "dropped"),  # the rerun reports it uncertain again
        ("creating", "uncertain", "t", "recovered"),  # answered, the commit failed: keep its id
        ("creating", "done", "t", "recovered"),
        ("submitted", "done", "t", "dropped"),  # polled again
        ("downloading", "failed", "t", "dropped"),
        ("done", "done", "t", "dropped"),
    ],
)
def test_which_lines_past_the_last_commit_the_journal_covers(
    tmp_path: Path, state: str | None, status: str, task_id: str | None, verdict: str
) -> None:
    record = {"line": 1, "prompt": "p", "task_id": task_id, "status": status, "files": [], "error": None}
    (tmp_path / RESULTS_NAME).write_text(json.dumps(record) + "\n{torn")
    with journal_with_row(tmp_path, state) as journal:
        try:
            recovered = check_tail(tmp_path, journal)
        except ConfigurationError as error:
            assert verdict == "refused" and "lost commits" in str(error)
            return
    assert verdict == ("recovered" if recovered else "dropped")
    assert recovered in ({}, {1: record})
