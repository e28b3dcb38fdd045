"""Batches through a router: each job's route journaled, a rerun polling the right provider and
key, one lane's account stop moving jobs to the others, and nothing created twice."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from image_gen_async import AsyncSession, ConfigurationError
from image_gen_async.batch import run_batch
from image_gen_async.testing import Emulator, EmulatorConfig

from .batch_helpers import journal_rows, results, wait_for
from .router_helpers import DH3, GET3W, NANA, THREE, prompts_created, session_on

KEYS = {"get3w": "sk-get3w", "dh3": "sk-dh3", "nananobanana": "sk-nana"}


def jobs(count: int) -> list[dict[str, Any]]:
    return [{"prompt": f"fox {index}", "aspect_ratio": "16:9"} for index in range(count)]


@pytest.fixture
async def emu() -> AsyncIterator[Emulator]:
    caps = {"get3w": 3, "dh3": 3, "nananobanana": 2}
    config = EmulatorConfig(duration=0.05, dh3_qps=None, max_concurrent=caps)
    async with Emulator(config) as emulator:
        yield emulator


def routes(out: Path) -> dict[int, str]:
    return dict(journal_rows(out, "SELECT line, route FROM jobs"))


def task_ids(out: Path) -> dict[int, str]:
    """Each job's task id once accepted (its route is journaled before: with its create)."""
    return dict(journal_rows(out, "SELECT line, task_id FROM jobs"))


async def test_a_routed_batch_records_each_jobs_route_and_spreads_the_jobs(
    emu: Emulator, tmp_path: Path
) -> None:
    async with session_on(emu) as session:
        router = session.router(THREE)
        stats = await run_batch(session, router, jobs(40), out_dir=tmp_path, concurrency=40)
    assert stats.done == 40 and stats.ok
    assert sum(emu.stats.creates.values()) == 40 and set(prompts_created(emu).values()) == {1}
    recorded = routes(tmp_path)
    assert set(recorded.values()) == set(router.lanes)  # every lane took some
    lines = {record["line"]: record for record in results(tmp_path)}
    assert all(lines[line]["route"] == route for line, route in recorded.items())
    for label, lane in router.stats.items():
        assert lane.created == sum(1 for route in recorded.values() if route == label)
    assert stats.done == len([record for record in lines.values() if record["files"]])


async def test_a_rerun_polls_each_task_on_its_own_route_and_creates_nothing(
    emu: Emulator, tmp_path: Path
) -> None:
    emu.config.duration = 0.5
    emu.config.max_concurrent = {}
    session = session_on(emu)
    router = session.router(THREE)
    batch = asyncio.create_task(run_batch(session, router, jobs(12), out_dir=tmp_path, concurrency=12))
    await wait_for(lambda: sum(emu.stats.creates.values()) == 12 and all(task_ids(tmp_path).values()))
    await session.close()  # every task made and journaled, none finished: left for a rerun
    first = await batch
    assert first.unfinished == 12 and first.done == 0
    async with session_on(emu) as session:
        stats = await run_batch(session, session.router(THREE), jobs(12), out_dir=tmp_path, concurrency=12)
    assert stats.done == 12 and stats.resumed == 12 and stats.created == 0
    assert sum(emu.stats.creates.values()) == 12
    # Each task was polled where it was made: every provider that made tasks was polled.
    made = {provider for provider, count in emu.stats.creates.items() if count}
    assert made <= {provider for provider, count in emu.stats.polls.items() if count}


async def test_one_lanes_account_stop_moves_the_batch_to_the_others(emu: Emulator, tmp_path: Path) -> None:
    emu.credits = 5  # nananobanana runs out after 5 jobs: 402 to every later create
    async with session_on(emu) as session:
        router = session.router([NANA, DH3, GET3W])
        stats = await run_batch(session, router, jobs(30), out_dir=tmp_path, concurrency=30)
    assert stats.done == 30 and stats.stopped is None
    assert emu.stats.creates["nananobanana"] == 5 and sum(emu.stats.creates.values()) == 30
    assert set(prompts_created(emu).values()) == {1}
    assert router.stats[router.lanes[0]].health == "circuit open"


async def test_the_batch_stops_when_every_lanes_key_is_stopped(emu: Emulator, tmp_path: Path) -> None:
    emu.config.revoked_keys = set(KEYS.values())
    async with session_on(emu) as session:
        router = session.router([DH3, NANA])
        stats = await run_batch(session, router, jobs(8), out_dir=tmp_path, concurrency=2)
    assert stats.stopped is not None and stats.account_stopped
    assert stats.done == 0 and sum(emu.stats.creates.values()) == 0


async def test_a_route_no_longer_in_the_router_leaves_its_job_for_a_later_run(
    emu: Emulator, tmp_path: Path
) -> None:
    emu.config.duration = 0.5
    emu.config.max_concurrent = {}
    session = session_on(emu)
    batch = asyncio.create_task(run_batch(session, session.router([DH3]), jobs(3), out_dir=tmp_path))
    await wait_for(lambda: len([t for t in task_ids(tmp_path).values() if t]) == 3)
    await session.close()
    await batch
    async with session_on(emu) as session:
        stats = await run_batch(session, session.router([NANA]), jobs(3), out_dir=tmp_path)
    assert stats.unfinished == 3 and stats.created == 0  # never created again elsewhere
    async with session_on(emu) as session:
        stats = await run_batch(session, session.router([NANA, DH3]), jobs(3), out_dir=tmp_path)
    assert stats.done == 3 and sum(emu.stats.creates.values()) == 3


async def test_a_client_batchs_directory_is_refused_to_a_router(emu: Emulator, tmp_path: Path) -> None:
    async with session_on(emu) as session:
        await run_batch(session, "dh3", DH3.model, jobs(2), out_dir=tmp_path)
        with pytest.raises(ConfigurationError, match="belongs to a batch on dh3"):
            await run_batch(session, session.router(THREE), jobs(2), out_dir=tmp_path)
    assert sum(emu.stats.creates.values()) == 2


async def test_routed_batch_arguments_are_checked_before_anything_is_sent(
    emu: Emulator, tmp_path: Path
) -> None:
    session: AsyncSession
    async with session_on(emu) as session:
        router = session.router(THREE)
        with pytest.raises(ConfigurationError, match="takes no model"):
            await run_batch(session, router, "a model", jobs(1), out_dir=tmp_path)  # type: ignore[arg-type]
        with pytest.raises(ConfigurationError, match="max_credits"):
            await run_batch(session, router, jobs(1), out_dir=tmp_path, max_credits=5)
    assert sum(emu.stats.create_requests.values()) == 0


async def test_the_cli_batch_routes_over_targets_and_resumes(
    emu: Emulator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from image_gen_async import cli

    for name, variable in (("get3w", "GET3W"), ("dh3", "DH3"), ("nananobanana", "NANANOBANANA")):
        monkeypatch.setenv(f"{variable}_API_KEY", KEYS[name])
    monkeypatch.delenv("COLUMNS", raising=False)  # a runner's terminal size would narrow the table
    source = tmp_path / "jobs.jsonl"
    source.write_text("".join(f'{{"prompt": "fox {index}"}}\n' for index in range(12)))
    targets = [f"--target={target.provider}:{target.model}" for target in THREE]
    argv = ["batch", str(source), "-o", str(tmp_path / "out"), *targets, "--base-url", emu.url]
    argv += ["--rate", "500", "--first-poll", "0.02", "--min-poll-interval", "0.005"]
    assert await asyncio.to_thread(cli.main, argv) == 0
    out = capsys.readouterr().out
    assert "targets" in out and "dh3:nano-banana-pro#" in out and "12/12 finished" in out
    assert sum(emu.stats.creates.values()) == 12
    assert await asyncio.to_thread(cli.main, argv) == 0  # a rerun: every job skipped, none created
    assert sum(emu.stats.creates.values()) == 12
    assert await asyncio.to_thread(cli.main, [*argv, "--provider", "dh3"]) == 2
    assert "not both" in capsys.readouterr().err
