"""The planner driven the way the poll follower drives it, on a simulated clock (no sockets).

Each job plans its next poll's age, sleeps until then and plans again (other jobs may have
moved it on), polls, and reports what it saw; a poll takes ``RTT``, and the client sends
them one at a time, ``SEND_COST`` each (the fifty woken at a burst's first completion go
out over some 30 ms, as they do against the emulator). Runs in milliseconds,
so the schedule's figures (polls per job, detection lag) can be pinned as a table here;
the benchmark (``python -m benchmarks polling``) measures the same against the emulator.
"""

from __future__ import annotations

import bisect
import heapq
import math
import random
import statistics
from collections.abc import Sequence

import attrs
import pytest

from image_gen_async._polling import SLACK, PollPlanner, PollSettings

SETTINGS = PollSettings().scaled(1 / 27)  # a 27 s job takes 1 s, as in the benchmark
RTT = 0.002
SEND_COST = 0.0006
LATE = 0.003
KEY = ("sim", "model")


@attrs.define(eq=False)
class Job:
    """One simulated job: when it was accepted, how long it takes, what the poller has seen."""

    index: int
    accepted: float
    duration: float
    estimate: float | None
    last_poll: float | None = None
    last_running: float = 0.0
    polls: int = 0
    seen_done: float | None = None
    timer: int = 0  # the current timer's number: an older one fired is stale


@attrs.define
class Sim:
    """A tiny event loop: timers and poll answers, in time order."""

    planner: PollPlanner
    rng: random.Random
    settings: PollSettings = attrs.field(factory=lambda: SETTINGS)
    now: float = 0.0
    events: list[tuple[float, int, str, Job, int]] = attrs.Factory(list)
    seq: int = 0
    asleep: dict[Job, None] = attrs.Factory(dict)  # in the order they fell asleep
    sending_until: float = 0.0  # the client is busy sending polls until then

    def at(self, when: float, kind: str, job: Job) -> None:
        self.seq += 1
        heapq.heappush(self.events, (when, self.seq, kind, job, job.timer))

    def plan(self, job: Job) -> None:
        age = self.planner.next_poll_age(KEY, job.estimate, job.last_poll, self.settings)
        due = job.accepted + age
        if due > self.now + SLACK:
            # Timers fire a little late on a busy loop.
            self.at(due + self.rng.uniform(0.0, LATE), "timer", job)
            self.asleep[job] = None
        else:
            self.asleep.pop(job, None)
            sent = max(self.now, self.sending_until)
            self.sending_until = sent + SEND_COST
            job.last_poll = sent - job.accepted
            self.at(sent + self.rng.uniform(RTT / 2, 2 * RTT), "answer", job)

    def answer(self, job: Job) -> None:
        job.polls += 1
        sent = job.last_poll
        assert sent is not None
        if sent >= job.duration:
            job.seen_done = self.now
            cold = not self.planner.warm(KEY)
            self.planner.completed(KEY, job, job.last_running, sent, job.estimate)
            if cold:  # as the follower does: the first completion wakes the sleepers
                for sleeper in list(self.asleep):
                    sleeper.timer += 1
                    self.plan(sleeper)
            return
        job.last_running = sent
        self.planner.running(KEY, job, sent, job.estimate)
        self.plan(job)

    def run(self) -> None:
        while self.events:
            self.now, _, kind, job, timer = heapq.heappop(self.events)
            if kind == "timer" and timer != job.timer:
                continue  # woken since: planned again
            if kind == "answer":
                self.answer(job)
            else:  # submitted, or a timer fired: plan again
                self.plan(job)


@attrs.frozen
class Figures:
    """Polls per job and the p95 detection lag (share of the job's duration)."""

    polls: float
    lag: float


def figures(jobs: Sequence[Job]) -> Figures:
    lags = [((job.seen_done or 0.0) - job.accepted - job.duration) / job.duration for job in jobs]
    lag = statistics.quantiles(lags, n=20, method="inclusive")[18]
    return Figures(sum(job.polls for job in jobs) / len(jobs), lag)


def simulate(
    mode: str, bias: float | None, *, cold: int = 50, warm: int = 200, seed: int = 1
) -> tuple[Figures, Figures]:
    """The benchmark's scenarios: jobs of 1 s ± 10 %, steady at 50/s or bursts of 50."""
    rng = random.Random(seed)
    sim = Sim(PollPlanner(clock=lambda: sim.now), random.Random(seed + 1000))
    jobs: list[Job] = []

    def job(index: int, at: float) -> Job:
        made = Job(index, at, rng.uniform(0.9, 1.1), bias)
        jobs.append(made)
        return made

    if mode == "steady":
        for i in range(cold + warm):
            sim.at(i / 50, "submit", job(i, i / 50))
        sim.run()
    else:
        for first in range(0, cold + warm, 50):
            start = sim.now
            for i in range(first, first + 50):
                # The creates of a burst are answered one after another, a little apart.
                at = start + rng.uniform(0.0, 0.04)
                sim.at(at, "submit", job(i, at))
            sim.run()
    return figures(jobs[:cold]), figures(jobs[cold:]) if warm else Figures(0.0, 0.0)


# (mode, estimate bias) -> the most polls per job cold, warm (100 jobs), and the p95 lag, from 2 seeds.
# What the planner reaches in simulation (see the module docstring); the bounds leave room
# for the seeds, not for a worse schedule. (The simulation's lag runs 1-2 points above the
# benchmark's: it counts to the answer's arrival, on timers that fire up to 3 ms late.)
EXPECTED = [
    ("steady", 0.5, 4.0, 1.7, 0.13),
    ("steady", 1.0, 3.0, 1.7, 0.13),
    ("steady", 2.0, 2.2, 1.7, 0.13),
    ("steady", None, 4.3, 1.7, 0.13),
    ("burst", 0.5, 4.5, 1.7, 0.13),
    ("burst", 1.0, 3.6, 1.7, 0.13),
    ("burst", 2.0, 2.4, 1.7, 0.13),
    ("burst", None, 4.7, 1.7, 0.13),
]


@pytest.mark.parametrize(("mode", "bias", "cold_polls", "warm_polls", "lag"), EXPECTED)
def test_simulated_schedule(
    mode: str, bias: float | None, cold_polls: float, warm_polls: float, lag: float
) -> None:
    runs = [simulate(mode, bias, warm=100, seed=seed) for seed in range(2)]
    assert statistics.mean(cold.polls for cold, _ in runs) <= cold_polls
    assert statistics.mean(warm.polls for _, warm in runs) <= warm_polls
    assert statistics.median(max(cold.lag, warm.lag) for cold, warm in runs) <= lag


def test_a_burst_shares_its_polls_before_anything_is_known() -> None:
    # 50 jobs at once, no estimate: each alone would poll from first_poll (0.185) to ~1 s
    # at 8 % a step, about 23 polls. A few look for all; the rest poll about twice.
    cold, _ = simulate("burst", None, warm=0)
    assert cold.polls <= 6


def _report() -> None:
    for mode in ("steady", "burst"):
        for bias in (0.5, 1.0, 2.0, None):
            rows = [simulate(mode, bias, seed=seed) for seed in range(5)]
            cold = statistics.mean(r[0].polls for r in rows)
            warm = statistics.mean(r[1].polls for r in rows)
            lag_c = max(r[0].lag for r in rows)
            lag_w = max(r[1].lag for r in rows)
            print(f"{mode:6} {bias!s:5} cold {cold:5.2f} warm {warm:5.2f} lag {lag_c:6.1%} {lag_w:6.1%}")


if __name__ == "__main__":
    _report()


def schedule_figures(ages: Sequence[float], durations: Sequence[float]) -> Figures | None:
    """Polls per job and p95 lag if every job is polled at ``ages`` (None: some job outlives them)."""
    polls, lags = 0, []
    for duration in durations:
        index = bisect.bisect_left(ages, duration)
        if index == len(ages):
            return None
        polls += index + 1
        lags.append((ages[index] - duration) / duration)
    return Figures(polls / len(durations), statistics.quantiles(lags, n=20, method="inclusive")[18])


def best_schedule(spread: float, lag: float, step: float = 0.005) -> Figures:
    """The fewest polls per job any schedule of 2 or 3 polls reaches with a p95 lag <= ``lag``,
    for durations spread evenly over 1 +- ``spread`` and known exactly (a search on a grid)."""
    durations = [1 - spread + 2 * spread * (k + 0.5) / 400 for k in range(400)]
    top = 1 + spread
    best = Figures(math.inf, 0.0)
    first = 1 - spread
    while first < top:
        second = first + step
        while second < top + step:
            ages = [first, second] if second >= top else [first, second, top]
            found = schedule_figures(ages, durations)
            if found is not None and found.lag <= lag and found.polls < best.polls:
                best = found
            second += step
        first += step
    return best


# The floor (durations +-10 %, known exactly; no timer, round trip or estimate error): p95 lag
# allowed to the schedule itself -> the fewest polls per job. 1.7 needs ~8.7 % of the 10 %.
FLOOR = [(0.10, 1.50), (0.09, 1.65), (0.085, 1.72), (0.08, 1.80)]


@pytest.mark.parametrize(("lag", "polls"), FLOOR)
def test_the_floor_of_a_known_spread(lag: float, polls: float) -> None:
    best = best_schedule(0.1, lag)
    assert best.polls == pytest.approx(polls, abs=0.02)
    assert best.lag <= lag
