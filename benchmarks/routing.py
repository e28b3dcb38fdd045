"""Routing: one model's jobs over three providers whose accounts each run a few tasks at once.

The emulator (in its own process) caps each account (Get3W 6, dh3 5, nananobanana 4 tasks
at once). Measured: the router's throughput next to what the summed caps allow, and the
baseline of the best single target alone (what a user bound to one provider's SDK gets),
every job gathered at once; with the cap learned from refusals and configured.
"""

from __future__ import annotations

import asyncio
import time

from image_gen_async import PollSettings, Target
from image_gen_async.testing import EmulatorProcess

from ._common import Row, session_for

JOBS = 1200
DURATION = 0.1
CAPS = {"get3w": 6, "dh3": 5, "nananobanana": 4}
TARGETS = [
    Target("get3w", "google/nano-banana-pro/text-to-image"),
    Target("dh3", "nano-banana-pro"),
    Target("nananobanana", "nano-banana"),
]
SHARE_TARGET = 1 / 1.15  # within 1.15x of the time the summed capacity allows
POLLING = PollSettings(first_poll=0.01, min_interval=0.002, max_interval=0.05)


def emulator() -> EmulatorProcess:
    caps = [arg for account, cap in CAPS.items() for arg in ("--max-concurrent", f"{account}={cap}")]
    return EmulatorProcess("--duration", str(DURATION), "--dh3-qps", "none", "--no-record", *caps)


async def routed(configured: bool) -> tuple[float, dict[str, object]]:
    """Elapsed seconds and the server's counters for JOBS gathered router jobs."""
    async with emulator() as server:
        caps = dict(CAPS) if configured else None
        async with session_for(server.url, polling=POLLING, max_concurrent=caps) as session:
            router = session.router(TARGETS)
            started = time.monotonic()
            results = await asyncio.gather(
                *(router.generate(prompt=f"route {i}") for i in range(JOBS)), return_exceptions=True
            )
            elapsed = time.monotonic() - started
        stats = await server.stats()
        stats["failed"] = sum(1 for result in results if isinstance(result, BaseException))
        return elapsed, stats


async def best_single(configured: bool) -> float:
    """Elapsed seconds for JOBS / 4 jobs on the target with the largest cap alone, scaled to JOBS."""
    best = max(TARGETS, key=lambda target: CAPS[target.provider])
    jobs = JOBS // 4  # the same per-place load, in a quarter of the jobs
    async with emulator() as server:
        caps = {best.provider: CAPS[best.provider]} if configured else None
        async with session_for(server.url, polling=POLLING, max_concurrent=caps) as session:
            client = session.client(best.provider)
            started = time.monotonic()
            await asyncio.gather(*(client.generate(best.model, prompt=f"one {i}") for i in range(jobs)))
            return (time.monotonic() - started) * JOBS / jobs


async def run() -> list[Row]:
    rows: list[Row] = []
    summed = sum(CAPS.values())
    ideal = JOBS * DURATION / summed
    for configured in (False, True):
        single = await best_single(configured)
        elapsed, stats = await routed(configured)
        how = "caps configured" if configured else "caps learned"
        label = f"{JOBS} jobs gathered over 3 targets capped {'/'.join(map(str, CAPS.values()))} ({how})"
        share = ideal / elapsed
        creates = stats["creates"] if isinstance(stats["creates"], dict) else {}
        split = "/".join(str(creates.get(account, 0)) for account in CAPS)
        rows += [
            Row(
                "routing",
                f"{label}: throughput / summed capacity",
                f"{share:.2f} ({JOBS / elapsed:.0f} jobs/s, {elapsed:.1f} s)",
                f"{ideal / single:.2f} ({JOBS / single:.0f} jobs/s) best single target (cap 6)",
                f">= {SHARE_TARGET:.2f}",
                share >= SHARE_TARGET,
            ),
            Row(
                "routing",
                f"{label}: speed-up over the best single target",
                f"{single / elapsed:.2f}x",
                "1.00x",
                f"~{summed / max(CAPS.values()):.2f}x (summed / best cap)",
                None,
            ),
            Row(
                "routing",
                f"{label}: creates / jobs (split get3w/dh3/nananobanana); failed",
                f"{sum(creates.values())} / {JOBS} ({split}); {stats['failed']}",
                "",
                "equal; 0",
                sum(creates.values()) == JOBS and stats["failed"] == 0,
            ),
        ]
    return rows
