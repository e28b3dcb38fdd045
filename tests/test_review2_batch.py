"""Second hostile review: batch stops that are not the account's or the journal's.

``AdmissionTimeoutError`` and ``TaskTimeoutError`` subclass ``TimeoutError``, itself an ``OSError``,
and ``JOURNAL_FAILURES`` holds ``OSError``: batch.py's ``isinstance(error, JOURNAL_FAILURES)`` and
``submit_outcome`` (``_STOP`` holds ``*JOURNAL_FAILURES``) take these timeouts for a broken journal.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from image_gen_async import PollSettings
from image_gen_async._journal import JOURNAL_FAILURES
from image_gen_async.batch import PauseSettings, is_journal_failure, run_batch, submit_outcome
from image_gen_async.errors import AdmissionTimeoutError, TaskTimeoutError
from image_gen_async.testing import Emulator

from .batch_helpers import state_counts
from .conftest import KEYS, SessionFactory
from .test_cli import cli, write_jobs

NANO = "nano-banana"
QUICK = PollSettings(first_poll=0.005, min_interval=0.002, max_interval=0.05)


@pytest.mark.parametrize(
    "error",
    [
        TaskTimeoutError("not finished after 0.3 s", task_id="t1", provider="nananobanana"),
        AdmissionTimeoutError("no capacity within the job's deadline"),
    ],
)
def test_a_timeout_is_never_a_reason_to_stop_the_batch(error: Exception) -> None:
    assert submit_outcome(error) in ("later", "failed")
    # What batch._create and batch._run do with it next: neither may read it as a journal failure.
    assert isinstance(error, JOURNAL_FAILURES) and not is_journal_failure(error)


async def test_one_slow_job_timing_out_does_not_stop_the_batch(
    make_session: SessionFactory, emulator: Emulator, tmp_path: Path
) -> None:
    emulator.config.duration = 0.05
    jobs = [{"prompt": f"a fox, take {i}"} for i in range(20)]
    jobs[0] = {"prompt": "a fox [slow]"}  # the emulator runs it 10x longer than the job's timeout
    stats = await run_batch(
        make_session(polling=QUICK),
        "nananobanana",
        NANO,
        iter(jobs),
        out_dir=tmp_path,
        download=False,
        timeout=0.3,
        concurrency=2,
    )
    assert stats.stopped is None, stats.stopped
    assert stats.done == 19 and stats.unfinished == 1  # only the slow one is left for a rerun to poll
    assert emulator.stats.creates["nananobanana"] == 20
    assert state_counts(tmp_path) == {"done": 19, "submitted": 1}


async def test_waiting_for_capacity_past_a_deadline_pauses_and_is_not_a_journal_failure(
    make_session: SessionFactory, emulator: Emulator, tmp_path: Path
) -> None:
    emulator.config.duration = 0.05
    emulator.config.max_concurrent = {"nananobanana": 2}
    stats = await run_batch(
        make_session(polling=QUICK, max_concurrent={"nananobanana": 2}),
        "nananobanana",
        NANO,
        ({"prompt": f"a fox, take {i}"} for i in range(30)),
        out_dir=tmp_path,
        download=False,
        timeout=0.25,  # 20 jobs queue for 2 places of 0.05 s tasks: the last wait ~0.5 s
        concurrency=20,
        pauses=PauseSettings(first=0.05, cap=0.1, max_pauses=10),
    )
    assert "journal" not in (stats.stopped or ""), stats.stopped
    assert stats.unfinished == 0  # no running task abandoned
    assert stats.ok and stats.done == 30
    assert emulator.stats.creates["nananobanana"] == 30


async def test_the_cli_finishes_the_other_lines_when_one_job_times_out(
    emulator: Emulator, tmp_path: Path
) -> None:
    emulator.config.duration = 0.05
    source = write_jobs(tmp_path / "jobs.jsonl", ["a fox [slow]"] + [f"a fox, take {i}" for i in range(11)])
    out = tmp_path / "out"
    args = ("batch", str(source), "--provider", "nananobanana", "--model", NANO, "-o", str(out))
    args += ("--base-url", emulator.url, "--no-download")
    args += ("--first-poll", "0.01", "--min-poll-interval", "0.005")
    args += ("--timeout", "0.3")
    args += ("--max-concurrent", "2", "--max-credits", "50", "--concurrency", "2")
    code, stdout, stderr = await cli(*args, keys={"NANANOBANANA_API_KEY": KEYS["nananobanana"]})
    assert code == 1, stdout + stderr  # the slow job is left unfinished: a rerun polls it
    assert state_counts(out) == {"done": 11, "submitted": 1}, stdout + stderr
    assert emulator.stats.creates["nananobanana"] == 12
