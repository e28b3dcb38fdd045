"""The router's headline runs: summed throughput over three capped targets, and failover that pays once."""

from __future__ import annotations

import asyncio
import time

from image_gen_async.testing import Emulator, EmulatorConfig

from .router_helpers import DH3, GET3W, NANA, prompts_created, session_on

CAPS = {"get3w": 6, "dh3": 5, "nananobanana": 4}
DURATION = 0.1
JOBS = 600


async def test_600_jobs_over_three_capped_targets_take_the_summed_capacity() -> None:
    config = EmulatorConfig(duration=DURATION, dh3_qps=None, max_concurrent=dict(CAPS), record_requests=False)
    async with Emulator(config) as emu:
        session = session_on(emu, max_concurrent=dict(CAPS))
        async with session:
            router = session.router([GET3W, DH3, NANA])
            started = time.monotonic()

            async def job(index: int) -> str:
                result = await router.generate(prompt=f"job {index}")
                return result.task_id

            done = await asyncio.gather(*(job(index) for index in range(JOBS)))
            took = time.monotonic() - started
        bound = JOBS / sum(CAPS.values()) * DURATION
        created = sum(emu.stats.creates.values())
        print(f"{JOBS} jobs in {took:.2f} s, {took / bound:.2f} x the bound; {dict(emu.stats.creates)}")
        assert len(set(done)) == JOBS and created == JOBS
        assert set(prompts_created(emu).values()) == {1}
        assert took <= 1.15 * bound
        for account, cap in CAPS.items():
            assert 0 < max(emu.stats.peak_running[account].values()) <= cap
        # Each target took jobs in proportion to what it can run at once.
        for target in (GET3W, DH3, NANA):
            share = emu.stats.creates[target.provider] / JOBS
            assert abs(share - CAPS[target.provider] / sum(CAPS.values())) < 0.05
