"""Polling efficiency: polls per job and detection lag, cold and warm, against fixed 3-second polling.

Modelled on real services: one ``estimated_duration`` per model that is off by 0.5x, 1x
or 2x (or none at all), actual durations spread ±10 % around their mean, jobs submitted
at a steady rate. Time is scaled: a 27 s job takes 1 s, so 3 s polling becomes 0.111 s.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence

import aiohttp
import attrs

from image_gen_async import TaskHandle
from image_gen_async.testing import Emulator, EmulatorConfig

from ._common import MODELS, TIME_SCALE, Row, p95, session_for

DURATION = 1.0
RATE = 50.0
COLD = 50
WARM = 200
FIXED_INTERVAL = 3.0 * TIME_SCALE
SCENARIOS: Sequence[tuple[str, str, float | None]] = (
    ("estimate 0.5x", "get3w", 0.5),
    ("estimate 1x", "get3w", 1.0),
    ("estimate 2x", "get3w", 2.0),
    ("no estimate", "dh3", None),
)


@attrs.frozen
class Outcome:
    """Polls per job and p95 detection lag (share of the job's duration), cold and warm."""

    cold_polls: float
    warm_polls: float
    cold_lag: float
    warm_lag: float


def emulator_config(bias: float | None) -> EmulatorConfig:
    return EmulatorConfig(
        duration=DURATION,
        duration_spread=0.1,
        estimate_bias=bias or 1.0,
        dh3_qps=None,
        record_requests=False,
    )


def summarise(emulator: Emulator, polls: list[int], resolved: list[tuple[str, float]]) -> Outcome:
    """Split the jobs into cold and warm and measure each part."""
    lags = []
    for task_id, when in resolved:
        task = emulator.tasks[task_id]
        lags.append(max(0.0, when - task.finish_at) / task.duration)
    return Outcome(
        sum(polls[:COLD]) / COLD,
        sum(polls[COLD:]) / WARM,
        p95(lags[:COLD]),
        p95(lags[COLD:]),
    )


async def steady(count: int, start_one: object) -> None:
    """Call ``start_one(i)`` ``count`` times at RATE per second."""
    began = time.monotonic()
    for i in range(count):
        await start_one(i)  # type: ignore[operator]
        await asyncio.sleep(max(0.0, began + (i + 1) / RATE - time.monotonic()))


async def ours(client: str, bias: float | None) -> Outcome:
    """The library, learning as it goes."""
    async with Emulator(emulator_config(bias)) as emulator, session_for(emulator.url) as session:
        handles: list[TaskHandle] = []
        resolved: dict[str, float] = {}

        async def start(i: int) -> None:
            handle = await session.client(client).submit(MODELS[client], prompt=f"poll {i}")
            handle.add_done_callback(lambda done: resolved.setdefault(done.task_id, time.monotonic()))
            handles.append(handle)

        await steady(COLD + WARM, start)
        await asyncio.gather(*handles)
        return summarise(
            emulator, [h.polls for h in handles], [(h.task_id, resolved[h.task_id]) for h in handles]
        )


async def fixed_interval() -> Outcome:
    """The seeds' own loop: poll, and sleep 3 s (scaled) until the task is done."""
    async with Emulator(emulator_config(None)) as emulator, aiohttp.ClientSession() as http:
        headers = {"Authorization": "Bearer bench-key"}
        polls: list[int] = []
        resolved: list[tuple[str, float]] = []
        jobs: list[asyncio.Task[None]] = []

        async def follow(slot: int, task_id: str) -> None:
            count = 0
            while True:
                count += 1
                async with http.get(
                    f"{emulator.url}/api/v1/task/get", params={"task_id": task_id}, headers=headers
                ) as answer:
                    status = (await answer.json())["nano_banana_pro_output"]["status"]
                if status in ("success", "fail"):
                    polls[slot] = count
                    resolved[slot] = (task_id, time.monotonic())
                    return
                await asyncio.sleep(FIXED_INTERVAL)

        async def start(i: int) -> None:
            body = {"model": "nano-banana-pro", "nano_banana_pro_input": {"prompt": f"fixed {i}"}}
            async with http.post(f"{emulator.url}/api/v1/task/create", json=body, headers=headers) as answer:
                task_id = (await answer.json())["task_id"]
            polls.append(0)
            resolved.append(("", 0.0))
            jobs.append(asyncio.ensure_future(follow(i, task_id)))

        await steady(COLD + WARM, start)
        await asyncio.gather(*jobs)
        return summarise(emulator, polls, resolved)


async def run() -> list[Row]:
    """Every scenario, then the fixed-interval baseline."""
    baseline = await fixed_interval()
    rows = []
    for label, client, bias in SCENARIOS:
        outcome = await ours(client, bias)
        rows += [
            Row(
                "polling",
                f"{label}: polls/job cold (first {COLD})",
                f"{outcome.cold_polls:.2f}",
                f"{baseline.cold_polls:.2f} fixed 3 s",
                "<= 8",
                outcome.cold_polls <= 8,
            ),
            Row(
                "polling",
                f"{label}: polls/job warm (next {WARM})",
                f"{outcome.warm_polls:.2f}",
                f"{baseline.warm_polls:.2f} fixed 3 s",
                "<= 2.0",
                outcome.warm_polls <= 2.0,
            ),
            Row(
                "polling",
                f"{label}: detection lag p95 cold / warm",
                f"{outcome.cold_lag:.1%} / {outcome.warm_lag:.1%}",
                f"{baseline.cold_lag:.1%} / {baseline.warm_lag:.1%} fixed 3 s",
                "<= 10%",
                max(outcome.cold_lag, outcome.warm_lag) <= 0.10,
            ),
        ]
    return rows
