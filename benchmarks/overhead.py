"""Client CPU per 1000 jobs against a hand-written raw-aiohttp loop making the same requests."""

from __future__ import annotations

import asyncio
import time

import aiohttp

from image_gen_async.testing import EmulatorProcess

from ._common import Row, session_for

JOBS = 1000
DURATION = 0.2
TARGET = 1.3


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
    """Alternate the two twice and keep each one's best, against an emulator in its own process."""
    async with EmulatorProcess("--dh3-qps", "none", "--duration", str(DURATION), "--no-record") as emulator:
        ours_cpu: list[float] = []
        raw_cpu: list[float] = []
        polls: list[int] = []
        for _ in range(2):
            cpu, polls = await ours(emulator.url)
            ours_cpu.append(cpu)
            raw_cpu.append(await raw(emulator.url, polls))
    best_ours, best_raw = min(ours_cpu), min(raw_cpu)
    ratio = best_ours / best_raw
    requests = JOBS + sum(polls)
    return [
        Row(
            "client overhead",
            f"CPU s per 1000 jobs ({requests / JOBS:.1f} requests/job)",
            f"{best_ours:.2f} s ({ratio:.2f}x)",
            f"{best_raw:.2f} s raw aiohttp",
            f"<= {TARGET}x",
            ratio <= TARGET,
        )
    ]
