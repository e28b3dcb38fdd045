"""Scale: memory per job in flight, and jobs per second end to end with no provider limit."""

from __future__ import annotations

import asyncio
import gc
import sys
import time

import aiohttp

from image_gen_async.testing import EmulatorProcess

from ._common import Row, rss_bytes, session_for

TARGET_BYTES = 4096
THROUGHPUT_JOBS = 2000


async def memory_per_job(count: int) -> float:
    """RSS growth per handle with ``count`` jobs waiting between polls, in a fresh process.

    A process that ran other sections first would hand the new jobs memory it freed
    earlier, and the growth would read low.
    """
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "benchmarks.scale", str(count), stdout=asyncio.subprocess.PIPE
    )
    output, _ = await child.communicate()
    if child.returncode != 0:
        raise RuntimeError(f"the memory measurement for {count} jobs failed ({child.returncode})")
    return float(output.decode().split()[-1])


async def _measure_memory(count: int) -> float:
    """In this process: RSS growth per handle (resumed, so no creates are needed)."""
    async with session_for("http://127.0.0.1:9") as session:
        gc.collect()
        before = rss_bytes()
        handles = [
            session.dh3.resume(f"task-{i:09d}", "nano-banana-pro", estimated_duration=3600.0)
            for i in range(count)
        ]
        await asyncio.sleep(0.5)  # every job has planned its first poll and is asleep
        gc.collect()
        grown = rss_bytes() - before
        for handle in handles:
            handle.cancel()
        return grown / count


async def ours_throughput(url: str) -> float:
    """Jobs per second, submit to result, through the library."""
    async with session_for(url, pool_size=200) as session:
        started = time.monotonic()
        handles = await asyncio.gather(
            *(session.dh3.submit("nano-banana-pro", prompt=f"scale {i}") for i in range(THROUGHPUT_JOBS))
        )
        await asyncio.gather(*handles)
        return THROUGHPUT_JOBS / (time.monotonic() - started)


async def raw_throughput(url: str) -> float:
    """The same jobs by a raw aiohttp loop polling every 20 ms."""
    headers = {"Authorization": "Bearer bench-key"}
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=200)) as http:

        async def job(i: int) -> None:
            body = {"model": "nano-banana-pro", "nano_banana_pro_input": {"prompt": f"scale {i}"}}
            async with http.post(f"{url}/api/v1/task/create", json=body, headers=headers) as answer:
                task_id = (await answer.json())["task_id"]
            while True:
                await asyncio.sleep(0.02)
                async with http.get(
                    f"{url}/api/v1/task/get", params={"task_id": task_id}, headers=headers
                ) as answer:
                    if (await answer.json())["nano_banana_pro_output"]["status"] in ("success", "fail"):
                        return

        started = time.monotonic()
        await asyncio.gather(*(job(i) for i in range(THROUGHPUT_JOBS)))
        return THROUGHPUT_JOBS / (time.monotonic() - started)


async def run() -> list[Row]:
    rows = []
    for count in (10_000, 100_000):
        per_job = await memory_per_job(count)
        rows.append(
            Row(
                "scale",
                f"memory per job in flight ({count:,} jobs)",
                f"{per_job / 1024:.2f} KB",
                "",
                "<= 4 KB",
                per_job <= TARGET_BYTES,
            )
        )
    args = ("--dh3-qps", "none", "--duration", "0.1", "--no-record")
    async with EmulatorProcess(*args) as emulator:
        ours = await ours_throughput(emulator.url)
        raw = await raw_throughput(emulator.url)
    rows.append(
        Row(
            "scale",
            f"jobs/s end to end, no limit ({THROUGHPUT_JOBS} jobs of 0.1 s)",
            f"{ours:.0f} ({ours / raw:.2f}x)",
            f"{raw:.0f} raw aiohttp",
            "",
            None,
        )
    )
    return rows


if __name__ == "__main__":
    print(asyncio.run(_measure_memory(int(sys.argv[1]))))
