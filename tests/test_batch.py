"""run_batch against the emulator: scale, bounded reading, the journal and resuming."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from image_gen_async import ConfigurationError
from image_gen_async._journal import Journal
from image_gen_async.batch import (
    JOURNAL_NAME,
    RESULTS_NAME,
    BatchStats,
    JobSpec,
    count_jobs,
    read_jsonl,
    run_batch,
)
from image_gen_async.testing import Emulator

from .batch_helpers import append, names, results, states, wait_for
from .conftest import MODELS, SessionFactory

DH3 = MODELS["dh3"]


def prompts(count: int, fail_every: int = 0) -> Iterator[JobSpec]:
    for i in range(count):
        marker = " [fail]" if fail_every and i % fail_every == fail_every - 1 else ""
        yield {"prompt": f"fox number {i}{marker}", "aspect_ratio": "1:1"}


async def test_300_jobs_stream_through_with_bounded_reading(
    make_session: SessionFactory, emulator: Emulator, tmp_path: Path
) -> None:
    emulator.config.record_requests = False
    session = make_session()
    jobs_count, concurrency = 300, 64  # several times the concurrency: lines read as slots free
    seen = BatchStats()
    widest = 0

    def jobs() -> Iterator[JobSpec]:
        nonlocal widest
        for number, spec in enumerate(prompts(jobs_count, fail_every=100), 1):
            # Lines are read only as slots free up: never more than `concurrency` ahead.
            widest = max(widest, number - seen.finished)
            yield spec

    def track(stats: BatchStats) -> None:
        nonlocal seen
        seen = stats
        assert stats.in_flight <= concurrency

    stats = await run_batch(
        session, "dh3", DH3, jobs(), out_dir=tmp_path, concurrency=concurrency, on_progress=track
    )
    failing = jobs_count // 100
    assert (stats.done, stats.failed) == (jobs_count - failing, failing)
    assert (stats.uncertain, stats.unfinished) == (0, 0)
    assert widest <= concurrency + 1
    assert emulator.stats.creates["dh3"] == jobs_count
    lines = results(tmp_path)
    assert sorted(r["line"] for r in lines) == list(range(1, jobs_count + 1))
    files = names(tmp_path)
    assert files == sorted(f for r in lines for f in r["files"]) and len(files) == jobs_count - failing
    assert all(r["error"] == "" or r["status"] == "done" or "Upstream" in r["error"] for r in lines)
    assert set(states(tmp_path).values()) == {"done", "failed"}


async def test_a_rerun_skips_finished_jobs_and_writes_no_line_twice(
    make_session: SessionFactory, emulator: Emulator, tmp_path: Path
) -> None:
    session = make_session()
    first = await run_batch(session, "dh3", DH3, prompts(10, fail_every=5), out_dir=tmp_path)
    assert (first.done, first.failed) == (8, 2)
    again = await run_batch(session, "dh3", DH3, prompts(10, fail_every=5), out_dir=tmp_path)
    assert (again.done, again.failed, again.skipped, again.created) == (8, 2, 10, 0)
    assert emulator.stats.creates["dh3"] == 10 and len(results(tmp_path)) == 10


async def test_killed_mid_poll_resumes_by_polling(
    make_session: SessionFactory, emulator: Emulator, tmp_path: Path
) -> None:
    emulator.config.duration = 0.5
    session = make_session()
    # 8 jobs: all in flight at once even where a session admits only a few creates at first.
    run = asyncio.create_task(run_batch(session, "dh3", DH3, prompts(8), out_dir=tmp_path))
    await wait_for(lambda: list(states(tmp_path).values()).count("submitted") == 8)
    run.cancel()  # in-process stand-in for a crash; the SIGKILL test in test_cli does it for real
    with pytest.raises(asyncio.CancelledError):
        await run
    stats = await run_batch(make_session(), "dh3", DH3, prompts(8), out_dir=tmp_path)
    assert (stats.done, stats.resumed, stats.created) == (8, 8, 0)
    assert emulator.stats.creates["dh3"] == 8


async def test_a_create_in_flight_at_a_crash_is_uncertain_until_resubmitted_on_request(
    make_session: SessionFactory, emulator: Emulator, tmp_path: Path
) -> None:
    emulator.config.faults.slow_seconds = 0.3
    emulator.script("dh3", "create", "slow")
    session = make_session()
    run = asyncio.create_task(run_batch(session, "dh3", DH3, prompts(1), out_dir=tmp_path))
    await wait_for(lambda: emulator.stats.create_requests["dh3"] == 1)  # it reached the provider
    assert states(tmp_path) == {1: "creating"}
    run.cancel()
    with pytest.raises(asyncio.CancelledError):
        await run
    await wait_for(lambda: emulator.stats.creates["dh3"] == 1)  # and the provider made the task

    stats = await run_batch(make_session(), "dh3", DH3, prompts(1), out_dir=tmp_path)
    assert (stats.uncertain, stats.created) == (1, 0)
    (line,) = results(tmp_path)
    assert line["status"] == "uncertain" and "--resubmit-uncertain" in line["error"]
    stats = await run_batch(make_session(), "dh3", DH3, prompts(1), out_dir=tmp_path)
    assert (stats.uncertain, stats.skipped, stats.created) == (1, 1, 0)

    # Only the explicit flag sends it again, and here that pays twice: the reason for the flag.
    stats = await run_batch(make_session(), "dh3", DH3, prompts(1), out_dir=tmp_path, resubmit_uncertain=True)
    assert (stats.done, stats.created) == (1, 1)
    assert emulator.stats.creates["dh3"] == 2
    assert [r["status"] for r in results(tmp_path)] == ["uncertain", "done"]


async def test_an_ambiguous_create_is_recorded_uncertain_and_never_resent(
    session: Any, emulator: Emulator, tmp_path: Path
) -> None:
    emulator.script("dh3", "create", "drop_after")  # made, then the connection dropped
    stats = await run_batch(session, "dh3", DH3, prompts(3), out_dir=tmp_path)
    assert (stats.done, stats.uncertain) == (2, 1)
    stats = await run_batch(session, "dh3", DH3, prompts(3), out_dir=tmp_path)
    assert (stats.done, stats.uncertain, stats.created) == (2, 1, 0)
    assert emulator.stats.creates["dh3"] == 3


async def test_retry_failed_polls_a_finished_task_before_creating_again(
    session: Any, emulator: Emulator, tmp_path: Path
) -> None:
    stats = await run_batch(session, "dh3", DH3, prompts(2), out_dir=tmp_path, max_bytes=10)
    assert stats.failed == 2 and "cap" in results(tmp_path)[0]["error"]
    stats = await run_batch(session, "dh3", DH3, prompts(2), out_dir=tmp_path, retry_failed=True)
    assert (stats.done, stats.resumed, stats.created) == (2, 2, 0)
    assert emulator.stats.creates["dh3"] == 2 and len(names(tmp_path)) == 2


async def test_retry_failed_creates_again_when_the_task_itself_failed(
    session: Any, emulator: Emulator, tmp_path: Path
) -> None:
    await run_batch(session, "dh3", DH3, prompts(2, fail_every=2), out_dir=tmp_path)
    jobs = prompts(2, fail_every=2)
    stats = await run_batch(session, "dh3", DH3, jobs, out_dir=tmp_path, retry_failed=True)
    assert (stats.done, stats.failed, stats.skipped, stats.created) == (1, 1, 1, 1)
    assert emulator.stats.creates["dh3"] == 3


async def test_bad_lines_fail_without_a_create(session: Any, emulator: Emulator, tmp_path: Path) -> None:
    source = tmp_path / "jobs.jsonl"
    source.write_text('{"prompt": "a fox"}\n\nnot json\n[1, 2]\n{"size": 3}\n{"prompt": "x", "model": "m"}\n')
    out = tmp_path / "out"
    assert count_jobs(source) == 5
    stats = await run_batch(session, "dh3", DH3, read_jsonl(source), out_dir=out)
    assert (stats.done, stats.failed) == (1, 4)
    by_line = {r["line"]: r for r in results(out)}
    assert sorted(by_line) == [1, 3, 4, 5, 6]  # numbered by file line; the blank line is no job
    assert "not JSON" in by_line[3]["error"] and "prompt" in by_line[5]["error"]
    assert emulator.stats.creates["dh3"] == 1


async def test_a_changed_input_or_another_provider_is_refused(session: Any, tmp_path: Path) -> None:
    await run_batch(session, "dh3", DH3, prompts(2), out_dir=tmp_path)
    with pytest.raises(ConfigurationError, match="input changed"):
        await run_batch(session, "dh3", DH3, [{"prompt": "something else"}], out_dir=tmp_path)
    with pytest.raises(ConfigurationError, match="another output directory"):
        await run_batch(session, "get3w", MODELS["get3w"], prompts(2), out_dir=tmp_path)


async def test_results_written_after_the_last_commit_are_dropped(session: Any, tmp_path: Path) -> None:
    await run_batch(session, "dh3", DH3, prompts(2), out_dir=tmp_path)
    # As if killed between writing a line and committing the job's state:
    append(tmp_path / RESULTS_NAME, '{"line": 2, "status": "done"}\n')
    await run_batch(session, "dh3", DH3, prompts(2), out_dir=tmp_path)
    assert sorted(r["line"] for r in results(tmp_path)) == [1, 2]


async def test_one_run_per_directory_and_a_missing_key_fails_first(
    make_session: SessionFactory, tmp_path: Path
) -> None:
    session = make_session()
    first = asyncio.create_task(run_batch(session, "dh3", DH3, prompts(5), out_dir=tmp_path))
    await wait_for(lambda: (tmp_path / JOURNAL_NAME).exists())
    with pytest.raises(ConfigurationError, match="another batch"):
        await run_batch(session, "dh3", DH3, prompts(5), out_dir=tmp_path)
    assert (await first).done == 5
    keyless = make_session(api_keys={}, env={})
    with pytest.raises(ConfigurationError, match="DH3_API_KEY"):
        await run_batch(keyless, "dh3", DH3, prompts(1), out_dir=tmp_path / "other")
    assert not (tmp_path / "other").exists()


async def test_a_poll_that_gives_up_leaves_a_paid_job_unfinished(
    make_session: SessionFactory, emulator: Emulator, tmp_path: Path
) -> None:
    emulator.script("dh3", "poll", "500", times=3)
    stats = await run_batch(make_session(poll_retries=0), "dh3", DH3, prompts(3), out_dir=tmp_path)
    assert stats.unfinished == 3 and stats.failed == 0
    stats = await run_batch(make_session(), "dh3", DH3, prompts(3), out_dir=tmp_path)
    assert (stats.done, stats.resumed, stats.created) == (3, 3, 0)
    assert emulator.stats.creates["dh3"] == 3


def test_journal_makes_a_creating_commit_durable_and_can_take_it_back(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "journal.sqlite", "dh3", "nano-banana-pro")
    journal.pending(1, "digest")
    journal.creating(1)
    journal.durable()
    journal.pending(2, "digest")
    journal.creating(2)
    journal.durable()  # the WAL's descriptor, opened by the first creating(), is kept
    journal.not_sent(2)  # its fsync failed: the create never went out
    journal.close()
    reopened = Journal(tmp_path / "journal.sqlite", "dh3", "nano-banana-pro")
    rows = reopened.get(1), reopened.get(2)
    reopened.close()
    assert [row.state if row else None for row in rows] == ["creating", "pending"]


async def test_a_symlinked_journal_works(
    make_session: SessionFactory, emulator: Emulator, tmp_path: Path
) -> None:
    (tmp_path / "real").mkdir()
    link = tmp_path / "journal.sqlite"
    link.symlink_to(tmp_path / "real" / "journal.sqlite")
    stats = await run_batch(make_session(), "dh3", DH3, prompts(3), out_dir=tmp_path / "out", journal=link)
    assert stats.done == 3 and emulator.stats.creates["dh3"] == 3
    assert (tmp_path / "real" / "journal.sqlite").exists()
