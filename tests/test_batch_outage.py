"""Creates the batch could not send (provider or Redis unreachable, session closed): the jobs
stay pending, the batch pauses or stops and says why, and a rerun sends each exactly once."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from image_gen_async import RedisBackend
from image_gen_async._journal import Journal
from image_gen_async.batch import (
    JOURNAL_NAME,
    BatchStats,
    JobSpec,
    PauseSettings,
    pause_after,
    run_batch,
    submit_outcome,
)
from image_gen_async.errors import (
    AuthenticationError,
    BackendUnavailableError,
    BadRequestError,
    ConfigurationError,
    InvalidRequestError,
    NotFoundError,
    PaymentRequiredError,
    PermissionDeniedError,
    ProtocolError,
    RateLimitError,
    ServerError,
    SessionClosedError,
    SubmitUncertainError,
    TransportError,
)
from image_gen_async.testing import Emulator, EmulatorConfig

from .batch_helpers import closed_port, end_running_tasks, names, results, state_counts, states, wait_for
from .conftest import KEYS, MODELS, SessionFactory

DH3 = MODELS["dh3"]
QUICK = PauseSettings(first=0.01, cap=0.02, max_pauses=2)


def prompts(count: int) -> Iterator[JobSpec]:
    return ({"prompt": f"a fox, take {i}"} for i in range(count))


@pytest.mark.parametrize(
    ("error", "outcome"),
    [
        (SubmitUncertainError("dropped", provider="dh3", model=DH3), "uncertain"),
        (TransportError("connection refused"), "later"),
        (TransportError("certificate verify failed", transient=False), "stop"),
        (BackendUnavailableError("redis down"), "later"),
        (RateLimitError(429, provider="dh3"), "later"),
        (ServerError(503, provider="dh3"), "later"),
        (ServerError(502, provider="dh3"), "later"),
        (SessionClosedError("closed"), "stop"),
        (ConfigurationError("webhook_url needs a receiver"), "failed"),  # the job's call, not the session
        (AuthenticationError(401, provider="dh3"), "stop"),
        (PaymentRequiredError(402, provider="nananobanana"), "stop"),
        (PermissionDeniedError(403, provider="dh3"), "stop"),
        (sqlite3.OperationalError("database or disk is full"), "stop"),
        (OSError(28, "No space left on device"), "stop"),
        (InvalidRequestError("dh3: prompt must be 3-20000 characters"), "failed"),
        (BadRequestError(400, provider="dh3"), "failed"),
        (NotFoundError(404, provider="dh3"), "failed"),
        (ProtocolError("required field missing @ $.task_id"), "failed"),
    ],
    ids=lambda value: type(value).__name__ if isinstance(value, BaseException) else value,
)
def test_what_a_failed_create_means_for_its_job(error: BaseException, outcome: str) -> None:
    assert submit_outcome(error) == outcome


def test_pauses_double_up_to_the_cap_then_the_batch_stops() -> None:
    settings = PauseSettings(first=1.0, cap=5.0, max_pauses=4)
    assert [pause_after(n, settings) for n in range(1, 6)] == [1.0, 2.0, 4.0, 5.0, None]
    assert pause_after(1, PauseSettings(max_pauses=0)) is None
    for bad in ({"first": -1.0}, {"cap": float("nan")}, {"max_pauses": -1}, {"max_pauses": 1.5}):
        with pytest.raises(ConfigurationError, match="PauseSettings"):
            PauseSettings(**bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("timeout", [-1, 0, float("nan"), float("inf"), "10", True])
async def test_a_bad_job_timeout_is_refused_before_any_job_runs(
    session: Any, emulator: Emulator, tmp_path: Path, timeout: Any
) -> None:
    with pytest.raises(ConfigurationError, match="timeout"):
        await run_batch(session, "dh3", DH3, prompts(3), out_dir=tmp_path, timeout=timeout)
    assert emulator.stats.create_requests["dh3"] == 0 and names(tmp_path, "*") == []


async def test_a_provider_refusing_connections_leaves_every_job_pending_for_a_rerun(
    make_session: SessionFactory, emulator: Emulator, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    dead = f"http://127.0.0.1:{closed_port()}"
    refused = make_session(base_urls={"dh3": dead}, create_retries=1)
    with caplog.at_level(logging.WARNING, "image_gen_async"):
        stats = await run_batch(
            refused, "dh3", DH3, prompts(20), out_dir=tmp_path, concurrency=4, pauses=QUICK
        )
    assert stats.stopped is not None and "TransportError" in stats.stopped
    assert (stats.failed, stats.uncertain, stats.done, stats.created) == (0, 0, 0, 0)
    assert stats.pending == 4 and stats.pauses == 2 and not stats.ok  # the jobs in flight; no line read after
    # Never sent: back to pending (not creating, which a rerun would call uncertain), no results line.
    assert set(states(tmp_path).values()) == {"pending"}
    assert results(tmp_path) == []
    assert "batch paused" in caplog.text and "batch stopped" in caplog.text

    again = await run_batch(make_session(), "dh3", DH3, prompts(20), out_dir=tmp_path, concurrency=4)
    assert (again.done, again.created, again.uncertain, again.stopped) == (20, 20, 0, None)
    assert emulator.stats.creates["dh3"] == emulator.stats.create_requests["dh3"] == 20


async def test_an_outage_that_ends_within_the_pauses_loses_nothing(
    make_session: SessionFactory, tmp_path: Path
) -> None:
    port = closed_port()  # nothing listens there until the batch has paused once
    session = make_session(base_urls={"dh3": f"http://127.0.0.1:{port}"}, create_retries=0)
    paused = asyncio.Event()

    def track(stats: BatchStats) -> None:
        if stats.pauses:
            paused.set()

    pauses = PauseSettings(first=0.3, cap=0.3, max_pauses=3)
    batch = run_batch(
        session, "dh3", DH3, prompts(3), out_dir=tmp_path, concurrency=1, pauses=pauses, on_progress=track
    )
    run = asyncio.create_task(batch)
    await paused.wait()
    config = EmulatorConfig(duration=0.05, dh3_qps=None, api_keys=dict(KEYS))
    async with Emulator(config) as provider:  # the provider is back, on the same port
        await provider.close()
        await provider.start(port=port)
        stats = await run
        assert (stats.done, stats.failed, stats.pending, stats.stopped) == (3, 0, 0, None)
        assert stats.pauses >= 1 and provider.stats.creates["dh3"] == 3


async def test_unreachable_redis_sends_nothing_and_stops_with_the_jobs_pending(
    make_session: SessionFactory, emulator: Emulator, tmp_path: Path
) -> None:
    redis = RedisBackend(f"redis://127.0.0.1:{closed_port()}")
    session = make_session(rate_limits={"dh3": 50.0}, limiter_backend=redis)
    stop_at_once = PauseSettings(max_pauses=0)
    stats = await run_batch(session, "dh3", DH3, prompts(5), out_dir=tmp_path, pauses=stop_at_once)
    assert stats.stopped is not None and "BackendUnavailableError" in stats.stopped
    assert (stats.failed, stats.pending) == (0, 5)
    assert emulator.stats.create_requests["dh3"] == 0 and results(tmp_path) == []

    again = await run_batch(make_session(), "dh3", DH3, prompts(5), out_dir=tmp_path)
    assert (again.done, again.created) == (5, 5) and emulator.stats.creates["dh3"] == 5


async def test_a_session_closed_under_a_running_batch_stops_it_at_once(
    make_session: SessionFactory, emulator: Emulator, tmp_path: Path
) -> None:
    emulator.config.duration = 1.0  # the first jobs are still running when the session closes
    session = make_session()
    run = asyncio.create_task(run_batch(session, "dh3", DH3, prompts(10), out_dir=tmp_path, concurrency=2))
    await wait_for(lambda: state_counts(tmp_path).get("submitted") == 2)
    await session.close()
    stats = await asyncio.wait_for(run, 0.9)  # no pause, no wait for the running jobs to end
    assert stats.stopped is not None and "SessionClosedError" in stats.stopped
    assert (stats.unfinished, stats.failed, stats.uncertain, stats.done) == (2, 0, 0, 0)
    assert set(states(tmp_path).values()) <= {"submitted", "pending"} and results(tmp_path) == []
    assert emulator.stats.create_requests["dh3"] == 2  # nothing sent after the close

    emulator.config.duration = 0.05
    end_running_tasks(emulator)  # the rerun resumes them: no need to wait out their second
    again = await run_batch(make_session(), "dh3", DH3, prompts(10), out_dir=tmp_path)
    assert (again.done, again.resumed, again.created) == (10, 2, 8)
    assert emulator.stats.creates["dh3"] == 10


async def test_a_revoked_key_stops_the_batch_instead_of_failing_every_job(
    make_session: SessionFactory, emulator: Emulator, tmp_path: Path
) -> None:
    wrong_key = make_session(api_keys={"dh3": "sk-not-the-right-key-000"})
    stats = await run_batch(wrong_key, "dh3", DH3, prompts(6), out_dir=tmp_path, concurrency=2)
    assert stats.stopped is not None and "AuthenticationError" in stats.stopped
    assert (stats.failed, stats.pending) == (0, 2) and results(tmp_path) == []
    again = await run_batch(make_session(), "dh3", DH3, prompts(6), out_dir=tmp_path)
    assert (again.done, again.created) == (6, 6) and emulator.stats.creates["dh3"] == 6



async def test_a_stopped_batch_leaves_running_tasks_for_a_rerun_instead_of_polling_on(
    make_session: SessionFactory, emulator: Emulator, tmp_path: Path
) -> None:
    emulator.config.duration = 1.2
    # The journal refuses job 3's `creating` commit (as SQLite does on a full disk): the batch stops.
    Journal(tmp_path / JOURNAL_NAME, "dh3", DH3).close()
    with contextlib.closing(sqlite3.connect(tmp_path / JOURNAL_NAME)) as db:
        db.execute(
            "CREATE TRIGGER full BEFORE UPDATE OF state ON jobs WHEN NEW.state = 'creating' AND NEW.line = 3 "
            "BEGIN SELECT RAISE(ABORT, 'database or disk is full'); END"
        )
    run = asyncio.create_task(run_batch(make_session(), "dh3", DH3, prompts(3), out_dir=tmp_path))
    stats = await asyncio.wait_for(run, 1.0)  # well before the running tasks could end
    assert stats.stopped is not None and "journal could not be written" in stats.stopped
    assert (stats.unfinished, stats.pending, stats.failed, stats.done) == (2, 1, 0, 0)
    assert states(tmp_path) == {1: "submitted", 2: "submitted", 3: "pending"}

    with contextlib.closing(sqlite3.connect(tmp_path / JOURNAL_NAME)) as db:
        db.execute("DROP TRIGGER full")
    emulator.config.duration = 0.05  # for job 3, created by the rerun
    end_running_tasks(emulator)  # the rerun resumes them: no need to wait out their 1.2 s
    again = await run_batch(make_session(), "dh3", DH3, prompts(3), out_dir=tmp_path)
    assert (again.done, again.resumed, again.created) == (3, 2, 1)
    assert emulator.stats.creates["dh3"] == 3
