"""Sync-mode concurrency: 1000 nananobanana generate calls held open 2 s each."""

from __future__ import annotations

import asyncio
import time

from image_gen_async import ImageGenError
from image_gen_async.testing import EmulatorProcess

from ._common import Row, session_for

CALLS = 1000
HOLD = 2.0


async def generate_all(url: str, pool_size: int) -> tuple[float, int]:
    """Wall seconds for CALLS concurrent sync generates, and how many failed."""
    async with session_for(url, pool_size=pool_size, connect_timeout=1.0) as session:
        started = time.monotonic()
        outcomes = await asyncio.gather(
            *(session.nananobanana.generate("nano-banana", prompt=f"sync {i}") for i in range(CALLS)),
            return_exceptions=True,
        )
        failed = sum(1 for o in outcomes if isinstance(o, ImageGenError | Exception))
        return time.monotonic() - started, failed


async def run() -> list[Row]:
    rows = []
    async with EmulatorProcess("--duration", str(HOLD), "--no-record") as emulator:
        for pool in (CALLS, 100):
            took, failed = await generate_all(emulator.url, pool)
            waves = -(-CALLS // pool)
            rows.append(
                Row(
                    "sync mode",
                    f"{CALLS} generates held {HOLD:g} s, pool {pool}",
                    f"{took:.1f} s, {failed} failed",
                    f"{waves * HOLD:.0f} s ({waves} wave{'s' if waves > 1 else ''})",
                    "0 failed",
                    failed == 0,
                )
            )
    return rows
