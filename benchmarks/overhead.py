"""Client CPU per 1000 jobs against a hand-written raw-aiohttp loop making the same requests."""

from __future__ import annotations

import asyncio
import gc
import statistics
import time

import aiohttp

from image_gen_async.testing import EmulatorProcess

from ._common import Row, session_for

JOBS = 1000
DURATION = 0.2
TARGET = 1.3
PAIRS = 7


async def ours(url: str) -> tuple[float, list[int]]:
    """CPU seconds for JOBS dh3 jobs through the library, and the polls each took."""
    async with session_for(url, pool_size=200) as session:
        started = time.process_time()
        handles = await asyncio.gather(
            *(session.dh3.submit("nano-banana-pro", prompt=f"overhead {i}") for i in range(JOBS))
        )
        await asyncio.gather(*handles)
        return time.process_time() - started, [h.polls for h in handles]


async def raw(url: str, polls: list[int]) -> float:
    """CPU seconds for the same creates and the same number of polls per job, by hand."""
    headers = {"Authorization": "Bearer bench-key"}
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=200)) as http:

        async def job(i: int, count: int) -> None:
            body = {"model": "nano-banana-pro", "nano_banana_pro_input": {"prompt": f"overhead {i}"}}
            async with http.post(f"{url}/api/v1/task/create", json=body, headers=headers) as answer:
                task_id = (await answer.json())["task_id"]
            for _ in range(count):
                await asyncio.sleep(DURATION / max(count, 1))
                async with http.get(
                    f"{url}/api/v1/task/get", params={"task_id": task_id}, headers=headers
                ) as answer:
                    await answer.json()

        started = time.process_time()
        await asyncio.gather(*(job(i, count) for i, count in enumerate(polls)))
        return time.process_time() - started


async def run() -> list[Row]:
    """Alternate the two PAIRS times against an emulator in its own process; the median pair ratio.

    Each pair runs back to back from a freshly collected heap, so a neighbour's burst of
    load or a full garbage collection lands on one pair, not on one side of the table.
    """
    async with EmulatorProcess("--dh3-qps", "none", "--duration", str(DURATION), "--no-record") as emulator:
        await ours(emulator.url)  # warm-up: imports, first connections
        pairs: list[tuple[float, float]] = []
        polls: list[int] = []
        for _ in range(PAIRS):
            gc.collect()
            cpu, polls = await ours(emulator.url)
            gc.collect()
            pairs.append((cpu, await raw(emulator.url, polls)))
    ratios = sorted(mine / theirs for mine, theirs in pairs)
    ratio = statistics.median(ratios)
    requests = JOBS + sum(polls)
    return [
        Row(
            "client overhead",
            f"CPU s per 1000 jobs ({requests / JOBS:.1f} requests/job), median of {PAIRS} paired runs",
            f"{statistics.median(p[0] for p in pairs):.2f} s ({ratio:.2f}x; "
            f"pairs {ratios[0]:.2f}-{ratios[-1]:.2f}x)",
            f"{statistics.median(p[1] for p in pairs):.2f} s raw aiohttp",
            f"<= {TARGET}x",
            ratio <= TARGET,
        )
    ]
