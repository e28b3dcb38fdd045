"""The router's headline runs: summed throughput over three capped targets, and failover that pays once."""

from __future__ import annotations

import asyncio
import gc

import pytest

from image_gen_async import TaskResult
from image_gen_async.testing import Emulator, EmulatorConfig, EmulatorProcess

from .router_helpers import DH3, GET3W, NANA, prompts_created, session_on

CAPS = {"get3w": 12, "dh3": 10, "nananobanana": 8}
DURATION = 0.2
JOBS = 600


@pytest.mark.alone
async def test_600_jobs_over_three_capped_targets_take_the_summed_capacity() -> None:
    """Within 1.15x of what the summed caps allow: 600 jobs / (12 + 10 + 8) places x 0.2 s = 4 s."""
    # The emulator runs in its own process, as providers would: in-process, its work would
    # share the client's event loop and the round trips would be the measure.
    caps = [arg for account, cap in CAPS.items() for arg in ("--max-concurrent", f"{account}={cap}")]
    async with EmulatorProcess("--duration", str(DURATION), "--dh3-qps", "none", "--no-record", *caps) as emu:
        session = session_on(emu, max_concurrent=dict(CAPS))
        async with session:
            router = session.router([GET3W, DH3, NANA])
            loop = asyncio.get_running_loop()
            # Timed from a freshly collected heap, as the benchmarks are: late in a suite the
            # heap holds every earlier test's leftovers, which each collection would walk.
            gc.collect()
            gc.freeze()
            try:
                started = loop.time()
                jobs = (router.generate(prompt=f"job {index}") for index in range(JOBS))
                results = await asyncio.gather(*jobs)
                took = loop.time() - started
            finally:
                gc.unfreeze()
            lanes = {lane.provider: lane for lane in router.stats.values()}
        stats = await emu.stats()
    bound = JOBS / sum(CAPS.values()) * DURATION
    print(f"{JOBS} jobs in {took:.2f} s, {took / bound:.2f} x the bound; {stats['creates']}")
    assert len({result.task_id for result in results}) == JOBS
    assert sum(stats["creates"].values()) == JOBS and not stats["capacity_refusals"]
    assert took <= 1.15 * bound, f"{took / bound:.2f} x the bound"
    for account, cap in CAPS.items():
        assert max(stats["peak_running"][account].values()) == cap  # every place used, none over
        # Each target took jobs in proportion to what it can run at once.
        assert abs(stats["creates"][account] / JOBS - cap / sum(CAPS.values())) < 0.05
        assert lanes[account].created == stats["creates"][account] and lanes[account].in_flight == 0


async def test_out_of_credits_and_refused_connections_mid_run_pay_each_job_once() -> None:
    """nananobanana runs out of credits after 50 jobs and Get3W starts refusing connections
    mid-run: every job is done, each created exactly once, the later ones on dh3."""
    jobs, get3w_before_down = 300, 30
    config = EmulatorConfig(duration=0.05, dh3_qps=None, max_concurrent=dict(CAPS), credits=50)
    # Get3W on an emulator of its own, each connection closed after its answer, so that once
    # it stops listening every next request is refused before anything is sent.
    get3w_config = EmulatorConfig(duration=0.05, max_concurrent={"get3w": 6}, keep_alive=False)
    async with Emulator(config) as emu, Emulator(get3w_config) as get3w_emu:
        urls = {"get3w": get3w_emu.url, "dh3": emu.url, "nananobanana": emu.url}
        session = session_on(emu, max_concurrent=dict(CAPS), base_urls=urls)
        async with session:
            router = session.router([GET3W, NANA, DH3])
            gate = session.get3w.capacity
            down_at: list[int] = []

            async def job(index: int) -> TaskResult:
                result = await router.generate(prompt=f"job {index}")
                made = get3w_emu.stats.creates["get3w"]
                # Down only while every Get3W place is a task the server already made (generate()
                # is one exchange there): no create of ours can be caught half-sent.
                if (
                    not down_at
                    and made >= get3w_before_down
                    and get3w_emu.running("get3w", "sk-get3w") == gate.in_flight
                ):
                    await get3w_emu.refuse_connections()
                    down_at.append(made)
                return result

            results = await asyncio.gather(*(job(index) for index in range(jobs)))
            stats = {lane.provider: lane for lane in router.stats.values()}
        assert down_at, "Get3W never went down"
        creates = emu.stats.creates + get3w_emu.stats.creates
        assert len({result.task_id for result in results}) == jobs
        assert sum(creates.values()) == jobs
        assert set(prompts_created(emu, get3w_emu).values()) == {1}  # no job created twice
        assert creates["nananobanana"] == 50 and emu.stats.payment_refusals["nananobanana"] >= 1
        assert creates["get3w"] == down_at[0]  # nothing reached Get3W once it refused connections
        assert creates["dh3"] == jobs - 50 - down_at[0]
        assert stats["nananobanana"].health == "circuit open" and stats["nananobanana"].refused >= 1
        assert stats["nananobanana"].credits == 50
        assert stats["get3w"].health == "backing off" and stats["get3w"].refused >= 1
        assert stats["dh3"].health == "healthy" and stats["dh3"].refused == 0
        assert [lane.created for lane in stats.values()] == [creates["get3w"], 50, creates["dh3"]]
        assert all(lane.in_flight == 0 and lane.failed == 0 for lane in stats.values())
