"""Rate-limit fidelity: 1000 dh3 creates at a scaled QPS, as the server counts them."""

from __future__ import annotations

import asyncio
import time

from image_gen_async.testing import EmulatorProcess

from ._common import Row, session_for

CREATES = 1000
QPS = 50.0


async def run() -> list[Row]:
    """Submit CREATES jobs at once under a QPS limit; compare the achieved pace with the limit."""
    args = ("--dh3-qps", str(QPS), "--duration", "0.05", "--no-record")
    async with EmulatorProcess(*args) as emulator:
        async with session_for(emulator.url, rate_limits={"dh3": QPS}) as session:
            accepted: list[float] = []

            async def submit(i: int) -> None:
                await session.dh3.submit("nano-banana-pro", prompt=f"limit {i}")
                accepted.append(time.monotonic())

            await asyncio.gather(*(submit(i) for i in range(CREATES)))
        stats = await emulator.stats()
    achieved = (len(accepted) - 1) / (max(accepted) - min(accepted))
    busiest = stats["max_creates_in_1s"].get("dh3", 0)
    refused = stats["rate_limited"].get("dh3", 0)
    return [
        Row(
            "rate limit",
            f"achieved rate / limit ({QPS:g}/s)",
            f"{achieved / QPS:.3f}",
            "1.000",
            ">= 0.97",
            achieved / QPS >= 0.97,
        ),
        Row(
            "rate limit",
            "max creates in any 1 s (server side)",
            str(busiest),
            f"{QPS:g}",
            f"<= {QPS:g}",
            busiest <= QPS,
        ),
        Row("rate limit", "429s answered", str(refused), "0", "0", refused == 0),
        Row(
            "rate limit",
            "creates / jobs",
            f"{stats['creates'].get('dh3', 0)} / {CREATES}",
            "",
            "equal",
            stats["creates"].get("dh3", 0) == CREATES,
        ),
    ]
