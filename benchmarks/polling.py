"""Polling efficiency: polls per job and detection lag, cold and warm, against two raw pollers.

Modelled on real services: one ``estimated_duration`` per model that is off by 0.5x, 1x
or 2x (or none at all), actual durations spread ±10 % around their mean. Two ways of
submitting: a steady rate (50 per second; cold = the first 50, warm = the next 200) and
bursts of 50 gathered at once, each once the one before is done (cold = the first burst,
for a model nothing is known about; warm = the next four). Time is scaled: a 27 s job
takes 1 s, so 3 s polling becomes 0.111 s.

The emulator runs in its own process (``_pollserver``), as a provider would: in ours, its
CPU time would delay our polls, and 27x more than against real jobs, since the clock is
scaled and CPU time is not. Detection lag is measured there: from a job's end to the
arrival of the poll that found it done. The lag as the caller saw it (its done callback:
the answer's way back and its handling in our loop) is shown next to it.

The baselines are hand-written aiohttp loops: the provider documents' own (poll every 3 s), one told
the durations' spread exactly (``known_spread``), which shows where the targets sit: what a
schedule with nothing left to learn reaches here; and, for bursts, one told the exact
duration of every job done so far (``LearnedExactly``), a reference point for learning from
the jobs before, with none of the library's blind spots: a burst of 50 is a small sample of
the spread.

The emulator's seed (``--seed``) draws the jobs' durations; the table is seed 0's.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Awaitable, Callable, Sequence

import aiohttp
import attrs
from aiohttp import web
from aiohttp.typedefs import Handler

from image_gen_async import TaskHandle
from image_gen_async.testing import Emulator, EmulatorConfig, EmulatorProcess

from ._common import MODELS, SCALED_POLLING, TIME_SCALE, Row, p95, session_for

DURATION = 1.0
SPREAD = 0.1
# The known-spread poller sees its 5th-percentile job this late: the rest of the 10 % goes to
# round trips and timers (a burst's 50 polls at once take about that much).
KNOWN_LAG = 0.085
RATE = 50.0
BURST = 50
COLD = 50
WARM = 200
FIXED_INTERVAL = 3.0 * TIME_SCALE
COLD_TARGET = 6.0
WARM_TARGET = 1.7
LAG_TARGET = 0.10
MODES = ("steady", "burst")
SCENARIOS: Sequence[tuple[str, str, float | None]] = (
    ("estimate 0.5x", "get3w", 0.5),
    ("estimate 1x", "get3w", 1.0),
    ("estimate 2x", "get3w", 2.0),
    ("no estimate", "dh3", None),
)

Start = Callable[[int], Awaitable[None]]


@attrs.frozen
class Outcome:
    """Polls per job and p95 detection lag (share of the job's duration), cold and warm."""

    cold_polls: float
    warm_polls: float
    cold_lag: float
    warm_lag: float
    cold_seen_lag: float  # as the caller saw it: at its done callback
    warm_seen_lag: float


def emulator_config(bias: float | None, seed: int = 0) -> EmulatorConfig:
    return EmulatorConfig(
        duration=DURATION,
        duration_spread=SPREAD,
        estimate_bias=bias or 1.0,
        dh3_qps=None,
        record_requests=False,
        seed=seed,
    )


def watch_polls(emulator: Emulator) -> dict[str, float]:
    """Task id -> when its latest poll arrived at the server (polling stops at the one that
    saw it done). Installed before the emulator starts; costs a dict write per request."""
    arrivals: dict[str, float] = {}

    @web.middleware
    async def note(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.method == "GET":
            task_id = request.match_info.get("id") or request.query.get("task_id")
            if task_id:
                arrivals[task_id] = time.monotonic()
        return await handler(request)

    emulator.app.middlewares.append(note)
    return arrivals


# Per task id: when it ends, how long it takes, when its latest poll arrived (monotonic;
# None: never polled).
Report = dict[str, tuple[float, float, float | None]]


def server(bias: float | None, seed: int) -> EmulatorProcess:
    """The emulator for one scenario, in its own process (see the module docstring)."""
    return EmulatorProcess(
        "none" if bias is None else str(bias), "--seed", str(seed), module="benchmarks._pollserver"
    )


async def report(emulator: EmulatorProcess) -> Report:
    async with aiohttp.ClientSession() as http, http.get(f"{emulator.url}/_bench/tasks") as answer:
        answer.raise_for_status()
        result: Report = await answer.json()
        return result


def lags(tasks: Report, when: Sequence[tuple[str, float]]) -> list[float]:
    """Each job's detection lag as a share of its duration, ``when`` it was seen done."""
    shares = []
    for task_id, at in when:
        finish_at, duration, _ = tasks[task_id]
        shares.append(max(0.0, at - finish_at) / duration)
    return shares


def polled_last(tasks: Report, task_id: str) -> float:
    """When the poll that saw ``task_id`` done arrived (every job is polled at least once)."""
    arrived = tasks[task_id][2]
    if arrived is None:
        raise RuntimeError(f"task {task_id} ended without a poll reaching the server")
    return arrived


def summarise(tasks: Report, polls: list[int], resolved: list[tuple[str, float]]) -> Outcome:
    """Split the jobs into cold and warm and measure each part."""
    at_server = lags(tasks, [(task_id, polled_last(tasks, task_id)) for task_id, _ in resolved])
    at_caller = lags(tasks, resolved)
    return Outcome(
        sum(polls[:COLD]) / COLD,
        sum(polls[COLD:]) / WARM,
        p95(at_server[:COLD]),
        p95(at_server[COLD:]),
        p95(at_caller[:COLD]),
        p95(at_caller[COLD:]),
    )


async def steady(start_one: Start, wait_all: Callable[[], Awaitable[None]]) -> None:
    """Call ``start_one(i)`` for every job at RATE per second, then wait for them all."""
    began = time.monotonic()
    for i in range(COLD + WARM):
        await start_one(i)
        await asyncio.sleep(max(0.0, began + (i + 1) / RATE - time.monotonic()))
    await wait_all()


async def bursts(start_one: Start, wait_all: Callable[[], Awaitable[None]]) -> None:
    """Bursts of BURST jobs gathered at once, each once the one before is done: COLD, then WARM."""
    for first in range(0, COLD + WARM, BURST):
        await asyncio.gather(*(start_one(i) for i in range(first, min(first + BURST, COLD + WARM))))
        await wait_all()


SUBMIT = {"steady": steady, "burst": bursts}


async def ours(mode: str, client: str, bias: float | None, seed: int = 0) -> Outcome:
    """The library, learning as it goes."""
    async with server(bias, seed) as emulator, session_for(emulator.url) as session:
        handles: dict[int, TaskHandle] = {}
        resolved: dict[str, float] = {}

        async def start(i: int) -> None:
            handle = await session.client(client).submit(MODELS[client], prompt=f"poll {i}")
            handle.add_done_callback(lambda done: resolved.setdefault(done.task_id, time.monotonic()))
            handles[i] = handle

        async def wait_all() -> None:
            await asyncio.gather(*handles.values())

        await SUBMIT[mode](start, wait_all)
        ordered = [handles[i] for i in range(COLD + WARM)]
        seen = [(h.task_id, resolved[h.task_id]) for h in ordered]
        return summarise(await report(emulator), [h.polls for h in ordered], seen)


# Seconds to sleep before a job's next poll, given its polls so far and its age now.
Schedule = Callable[[int, float], float]


def every(interval: float) -> Schedule:
    """The provider documents' own loop: poll at once, then sleep ``interval`` after each answer."""
    return lambda polls, age: 0.0 if polls == 0 else interval


def known_spread() -> Schedule:
    """A poller told the durations' spread exactly (what no client is told): its first poll is
    where the 5th-percentile job is seen KNOWN_LAG late, then each comes the library's growth
    step later. A reference point: a schedule with the spread's own first poll, round trips and
    all (one that read the seed's jobs could do better, or worse: see ``LearnedExactly``)."""
    fifth = DURATION * (1 - SPREAD + 2 * SPREAD * 0.05)
    first = fifth * (1 + KNOWN_LAG)
    return ladder(first)


def ladder(first: float) -> Schedule:
    """Poll at age ``first``, then each the library's growth step later."""
    growth = 1 + SCALED_POLLING.growth
    return lambda polls, age: max(0.0, first * growth**polls - age)


class LearnedExactly:
    """A poller told, after each burst, the exact duration of every job done so far (what no
    client is told; it sees no brackets, no censoring): known_spread's rule, read off the
    latest HISTORY of them instead of the spread. The first burst, before anything is done,
    runs on known_spread's schedule."""

    HISTORY = 128

    def __init__(self) -> None:
        self.schedule = known_spread()

    def __call__(self, polls: int, age: float) -> float:
        return self.schedule(polls, age)

    def learn(self, tasks: Report) -> None:
        done = sorted(tasks.values(), key=lambda task: task[0] - task[1])[-self.HISTORY :]
        # "exclusive": read from a sample, the inclusive method places a low quantile late.
        fifth = statistics.quantiles([duration for _, duration, _ in done], n=20, method="exclusive")[0]
        self.schedule = ladder(fifth * (1 + KNOWN_LAG))


async def raw_poller(
    mode: str, schedule: Schedule, seed: int, learn: Callable[[Report], None] | None = None
) -> Outcome:
    """A hand-written aiohttp loop (no estimate: it does not read one) polling on ``schedule``;
    ``learn`` is told the server's report after each burst (or once all are done)."""
    async with server(None, seed) as emulator, aiohttp.ClientSession() as http:
        headers = {"Authorization": "Bearer bench-key"}
        polls = [0] * (COLD + WARM)
        resolved = [("", 0.0)] * (COLD + WARM)
        jobs: list[asyncio.Task[None]] = []

        async def follow(slot: int, task_id: str, accepted: float) -> None:
            count = 0
            while True:
                await asyncio.sleep(schedule(count, time.monotonic() - accepted))
                count += 1
                async with http.get(
                    f"{emulator.url}/api/v1/task/get", params={"task_id": task_id}, headers=headers
                ) as answer:
                    status = (await answer.json())["nano_banana_pro_output"]["status"]
                if status in ("success", "fail"):
                    polls[slot] = count
                    resolved[slot] = (task_id, time.monotonic())
                    return

        async def start(i: int) -> None:
            body = {"model": "nano-banana-pro", "nano_banana_pro_input": {"prompt": f"raw {i}"}}
            async with http.post(f"{emulator.url}/api/v1/task/create", json=body, headers=headers) as answer:
                task_id = (await answer.json())["task_id"]
            jobs.append(asyncio.ensure_future(follow(i, task_id, time.monotonic())))

        async def wait_all() -> None:
            await asyncio.gather(*jobs)
            if learn is not None:
                learn(await report(emulator))

        await SUBMIT[mode](start, wait_all)
        return summarise(await report(emulator), polls, resolved)


@attrs.frozen
class Baselines:
    """The raw pollers of one way of submitting (``learned``: bursts only)."""

    fixed: Outcome
    known: Outcome
    learned: Outcome | None


def lag_pair(outcome: Outcome) -> str:
    """The lag cells: at the server cold / warm, and (at the caller)."""
    return (
        f"{outcome.cold_lag:.1%} / {outcome.warm_lag:.1%} "
        f"({outcome.cold_seen_lag:.1%} / {outcome.warm_seen_lag:.1%})"
    )


def rows_for(mode: str, label: str, outcome: Outcome, baselines: Baselines) -> list[Row]:
    """The three rows of one scenario: polls per job cold and warm, and the lag."""
    fixed, known, learned = baselines.fixed, baselines.known, baselines.learned
    learned_polls = "" if learned is None else f"; {learned.warm_polls:.2f} learned exactly"
    learned_lag = "" if learned is None else f"; {learned.warm_lag:.1%} warm learned exactly"
    cold_label = f"first {COLD}" if mode == "steady" else f"{COLD} at once"
    warm_label = f"next {WARM}" if mode == "steady" else f"then {WARM // BURST} x {BURST}"
    return [
        Row(
            "polling",
            f"{mode}, {label}: polls/job cold ({cold_label})",
            f"{outcome.cold_polls:.2f}",
            f"{fixed.cold_polls:.2f} fixed 3 s; {known.cold_polls:.2f} known spread",
            f"<= {COLD_TARGET:g}",
            outcome.cold_polls <= COLD_TARGET,
        ),
        Row(
            "polling",
            f"{mode}, {label}: polls/job warm ({warm_label})",
            f"{outcome.warm_polls:.2f}",
            f"{fixed.warm_polls:.2f} fixed 3 s; {known.warm_polls:.2f} known spread{learned_polls}",
            f"<= {WARM_TARGET:g}",
            outcome.warm_polls <= WARM_TARGET,
        ),
        Row(
            "polling",
            f"{mode}, {label}: detection lag p95 cold / warm (at the caller)",
            lag_pair(outcome),
            f"{lag_pair(fixed)} fixed 3 s; {lag_pair(known)} known spread{learned_lag}",
            f"<= {LAG_TARGET:.0%}",
            max(outcome.cold_lag, outcome.warm_lag) <= LAG_TARGET,
        ),
    ]


async def run(
    modes: Sequence[str] = MODES, scenarios: Sequence[str] | None = None, seed: int = 0
) -> list[Row]:
    """Every scenario in each way of submitting, each next to the raw pollers'."""
    rows = []
    for mode in modes:
        fixed = await raw_poller(mode, every(FIXED_INTERVAL), seed)
        known = await raw_poller(mode, known_spread(), seed)
        learned = None
        if mode == "burst":
            learner = LearnedExactly()
            learned = await raw_poller(mode, learner, seed, learner.learn)
        baseline = Baselines(fixed, known, learned)
        for label, client, bias in SCENARIOS:
            if scenarios is None or label in scenarios:
                rows += rows_for(mode, label, await ours(mode, client, bias, seed), baseline)
    return rows
