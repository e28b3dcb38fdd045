"""Capacity: thousands of jobs against an account that runs 10 tasks at once.

The emulator (in its own process) enforces nananobanana's documented cap: past 10 unfinished
tasks per key a create is refused with 503 ``server_busy``. Measured: how much of the cap is
kept busy (the jobs' summed durations over cap x elapsed), how many creates were refused, and
the most tasks the server ever saw running. The baseline is what a careful user writes by
hand: an ``asyncio.Semaphore`` of exactly the right size around create-then-poll, polling
every 5 % of the job's duration.
"""

from __future__ import annotations

import asyncio
import time

import aiohttp

from image_gen_async import PollSettings
from image_gen_async.testing import EmulatorProcess

from ._common import Row, session_for

JOBS = 1000
CAP = 10
DURATION = 0.1
KEY = "bench-key"
BUSY_TARGET = 1 / 1.15  # elapsed within 1.15x of what the cap allows
REFUSAL_TARGET = 0.05
POLLING = PollSettings(first_poll=0.01, min_interval=0.002, max_interval=0.05)


def emulator() -> EmulatorProcess:
    return EmulatorProcess(
        "--duration", str(DURATION), "--max-concurrent", f"nananobanana={CAP}", "--no-record"
    )


async def ours(configured: bool) -> tuple[float, dict[str, object]]:
    """Elapsed seconds and the server's counters for JOBS gathered submits."""
    async with emulator() as server:
        caps = {"nananobanana": CAP} if configured else None
        async with session_for(server.url, polling=POLLING, max_concurrent=caps) as session:
            started = time.monotonic()
            handles = await asyncio.gather(
                *(session.nananobanana.submit("nano-banana", prompt=f"cap {i}") for i in range(JOBS))
            )
            results = await asyncio.gather(*handles, return_exceptions=True)
            elapsed = time.monotonic() - started
        failed = sum(1 for result in results if isinstance(result, BaseException))
        stats = await server.stats()
        stats["failed"] = failed
        return elapsed, stats


async def semaphore_baseline() -> tuple[float, dict[str, object]]:
    """A hand-written semaphore of the right size: create, poll every 5 % of the duration."""
    async with emulator() as server:
        headers = {"Authorization": f"Bearer {KEY}"}
        gate = asyncio.Semaphore(CAP)
        async with aiohttp.ClientSession(headers=headers) as http:

            async def job(i: int) -> None:
                async with gate:
                    body = {"prompt": f"cap {i}", "selectedModel": "nano-banana", "mode": "async"}
                    async with http.post(f"{server.url}/api/v1/generate", json=body) as answer:
                        task_id = (await answer.json())["generationId"]
                    while True:
                        await asyncio.sleep(DURATION * 0.05)
                        url = f"{server.url}/api/v1/generate?id={task_id}"
                        async with http.get(url) as answer:
                            status = (await answer.json())["data"]["processingStatus"]
                        if status in ("completed", "failed"):
                            return

            started = time.monotonic()
            await asyncio.gather(*(job(i) for i in range(JOBS)))
            elapsed = time.monotonic() - started
        stats = await server.stats()
        stats["failed"] = 0
        return elapsed, stats


def _busy(elapsed: float) -> float:
    return JOBS * DURATION / (CAP * elapsed)


def _refused(stats: dict[str, object]) -> int:
    refusals = stats.get("capacity_refusals")
    return int(refusals.get("nananobanana", 0)) if isinstance(refusals, dict) else 0


def _peak(stats: dict[str, object]) -> int:
    peaks = stats.get("peak_running")
    by_key = peaks.get("nananobanana", {}) if isinstance(peaks, dict) else {}
    return max(by_key.values(), default=0) if isinstance(by_key, dict) else 0


async def run() -> list[Row]:
    base_elapsed, base_stats = await semaphore_baseline()
    rows: list[Row] = []
    for configured in (False, True):
        elapsed, stats = await ours(configured)
        how = "max_concurrent=10" if configured else "cap learned"
        label = f"{JOBS} jobs gathered, cap {CAP} ({how})"
        busy, base_busy = _busy(elapsed), _busy(base_elapsed)
        rows += [
            Row(
                "capacity",
                f"{label}: share of the cap kept busy",
                f"{busy:.2f} ({elapsed:.1f} s)",
                f"{base_busy:.2f} ({base_elapsed:.1f} s) semaphore of 10",
                f">= {BUSY_TARGET:.2f}",
                busy >= BUSY_TARGET,
            ),
            Row(
                "capacity",
                f"{label}: refused creates / jobs",
                f"{_refused(stats)} / {JOBS}",
                f"{_refused(base_stats)} / {JOBS}",
                f"<= {REFUSAL_TARGET:.0%}",
                _refused(stats) <= REFUSAL_TARGET * JOBS,
            ),
            Row(
                "capacity",
                f"{label}: jobs failed; most running at the server",
                f"{stats['failed']}; {_peak(stats)}",
                f"0; {_peak(base_stats)}",
                f"0; <= {CAP}",
                stats["failed"] == 0 and _peak(stats) <= CAP,
            ),
        ]
    return rows
