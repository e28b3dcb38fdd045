"""The poll planner: units kept apart, bad estimates contained, bursts sharing their polls.

Tables on the planner itself (its decisions are pure), then the same over real sockets
against the emulator, counting the polls the server received.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Sequence

import pytest

from image_gen_async import PollSettings
from image_gen_async._polling import (
    CENSORED_REACH,
    COHORT,
    FIRST_STEP_STRETCH,
    WIDE_STEPS,
    PollPlanner,
    clean_estimate,
    estimate_range,
    first_poll_cap,
)
from image_gen_async.testing import Emulator, EmulatorConfig

from .conftest import KEYS, MODELS, SessionFactory

SETTINGS = PollSettings()  # growth 8 %, first poll 5 s, intervals 0.25 s to 30 s
KEY = ("get3w", "m")
BAD_ESTIMATES = [1e-6, 1e5, 1e308, 0.0, -1.0, -0.0, math.nan, math.inf, -math.inf]


def _taught(planner: PollPlanner, seconds: float, estimate: float | None, jobs: int = 40) -> None:
    """``jobs`` completed jobs of ``seconds`` ± 10 %, each bracketed by polls 4 % either side."""
    for i in range(jobs):
        duration = seconds * (0.9 + 0.2 * i / (jobs - 1))
        planner.completed(KEY, ("taught", i), duration * 0.96, duration * 1.04, estimate)


def _first_poll(planner: PollPlanner, estimate: float | None) -> float:
    return planner.next_poll_age(KEY, estimate, None, SETTINGS)


# 13. What was taught (seconds of a job, the estimate it carried: None for generate()) and
# what a new job carries -> where its first poll lands (seconds). The seeds' numbers: 28 s
# jobs, estimate 52. Before the fix, seconds taught without an estimate were read as
# ratios: 28 x 52 = 1456 s.
UNITS = [
    pytest.param(28.0, None, 52.0, (24.0, 28.0), id="generate teaches seconds, submit reads seconds"),
    pytest.param(28.0, None, None, (24.0, 28.0), id="seconds, read without an estimate"),
    pytest.param(28.0, 52.0, 52.0, (24.0, 28.0), id="ratios, same estimate"),
    pytest.param(28.0, 52.0, 104.0, (48.0, 56.0), id="ratios follow the job's own estimate"),
    pytest.param(28.0, 52.0, None, (24.0, 28.0), id="estimated jobs teach seconds too"),
]


@pytest.mark.parametrize(("seconds", "taught_estimate", "estimate", "expected"), UNITS)
def test_units_are_kept_apart(
    seconds: float, taught_estimate: float | None, estimate: float | None, expected: tuple[float, float]
) -> None:
    planner = PollPlanner()
    _taught(planner, seconds, taught_estimate)
    low, high = expected
    assert low <= _first_poll(planner, estimate) <= high


def test_seconds_from_generate_do_not_turn_into_ratios_once_estimates_arrive() -> None:
    planner = PollPlanner()
    _taught(planner, 28.0, None)  # generate(): seconds only
    before = _first_poll(planner, 52.0)
    _taught(planner, 28.0, 52.0, jobs=10)  # then submit()s with their estimate
    after = _first_poll(planner, 52.0)
    assert 24.0 <= before <= 28.0 and 24.0 <= after <= 28.0
    assert planner.upper_bound(KEY, 52.0) == pytest.approx(28 * 1.1 * 1.04)


# 14. Estimates a plan can use: (given, settings) -> (used, taken as given).
CLEAN = [
    (52.0, SETTINGS, (52.0, True)),
    (7, SETTINGS, (7.0, True)),
    (1e-6, SETTINGS, (0.5, False)),  # clamped to 2 x min_interval
    (1e5, SETTINGS, (21600.0, False)),  # clamped to 720 x max_interval (6 h)
    (1e308, SETTINGS, (21600.0, False)),
    (1e-6, SETTINGS.scaled(0.01), (0.005, False)),  # relative to the settings
    (0.0, SETTINGS, (None, False)),
    (-3.0, SETTINGS, (None, False)),
    (math.nan, SETTINGS, (None, False)),
    (math.inf, SETTINGS, (None, False)),
    (None, SETTINGS, (None, False)),
    ("52", SETTINGS, (None, False)),
    (True, SETTINGS, (None, False)),
]


@pytest.mark.parametrize(("given", "settings", "expected"), CLEAN)
def test_clean_estimate(given: object, settings: PollSettings, expected: tuple[float | None, bool]) -> None:
    used, as_given = clean_estimate(given, settings)
    assert as_given is expected[1]
    assert used == (pytest.approx(expected[0]) if expected[0] is not None else None)


def test_estimate_range_and_first_poll_cap() -> None:
    assert estimate_range(SETTINGS) == (0.5, 21600.0)
    assert first_poll_cap(SETTINGS, None) == 300.0
    assert first_poll_cap(SETTINGS, 900.0) == 900.0  # jobs were seen taking longer
    assert first_poll_cap(PollSettings(first_poll=600.0), None) == 600.0


@pytest.mark.parametrize("bad", BAD_ESTIMATES)
def test_a_bad_estimate_plans_a_sane_first_poll(bad: float) -> None:
    planner = PollPlanner()
    first = _first_poll(planner, bad)
    assert 0.0 < first <= 300.0  # never later than max(first_poll, 10 x max_interval)
    later = planner.next_poll_age(KEY, bad, first, SETTINGS)
    assert first + SETTINGS.min_interval <= later <= first + SETTINGS.max_interval
    upper = planner.upper_bound(KEY, bad)
    assert upper is None or upper <= 2 * 21600.0


@pytest.mark.parametrize("bad", BAD_ESTIMATES)
def test_one_bad_estimate_does_not_poison_the_others(bad: float) -> None:
    planner = PollPlanner()
    _taught(planner, 28.0, 52.0)
    before = (_first_poll(planner, 52.0), _first_poll(planner, None), planner.upper_bound(KEY, 52.0))
    # The job with the bad estimate plans from the seconds learned (its estimate says nothing).
    assert _first_poll(planner, bad) <= 300.0
    planner.running(KEY, "odd", 20.0, bad)
    planner.completed(KEY, "odd", 26.0, 28.0, bad)  # an ordinary 27 s job, whatever it said
    after = (_first_poll(planner, 52.0), _first_poll(planner, None), planner.upper_bound(KEY, 52.0))
    assert after == pytest.approx(before, rel=0.03)


def test_a_job_far_off_its_estimate_teaches_seconds_not_ratios() -> None:
    planner = PollPlanner()
    _taught(planner, 28.0, 52.0)
    before = _first_poll(planner, 52.0)
    planner.completed(KEY, "odd", 26.0, 28.0, 2.0)  # in range, but 14x off: teaches no ratio
    assert _first_poll(planner, 52.0) == pytest.approx(before, rel=0.03)
    assert planner.upper_bound(KEY, 52.0) == pytest.approx(28 * 1.1 * 1.04)


def test_cold_jobs_share_their_polls() -> None:
    # 20 jobs accepted together at 0, nothing known: after their first poll, COHORT (5) look
    # per step and the rest are told to sleep on, until something completes.
    now = [1.0]
    planner = PollPlanner(clock=lambda: now[0])
    settings = PollSettings(first_poll=1.0, min_interval=0.001)
    jobs = [f"job{i}" for i in range(20)]
    # (Each job's last poll age tells it apart, as the follower's own clock readings do.)
    last = {job: 1.0 + i * 1e-9 for i, job in enumerate(jobs)}
    for job in jobs:
        planner.running(KEY, job, last[job], None)  # every first poll said running
    for step in range(5):
        now[0] = max(last.values()) * 1.08
        polled = [job for job in jobs if planner.next_poll_age(KEY, None, last[job], settings) <= now[0]]
        assert len(polled) == COHORT, step
        for i, job in enumerate(polled):
            last[job] = now[0] + i * 1e-9
            planner.running(KEY, job, last[job], None)
    # A completion makes it warm: every job that slept is free to look now.
    planner.completed(KEY, jobs[0], last[jobs[0]], now[0], None)
    slept = [job for job in jobs if last[job] < now[0] / 1.08]
    assert len(slept) == 20 - COHORT
    assert all(planner.next_poll_age(KEY, None, last[job], settings) <= now[0] for job in slept)


async def test_generate_then_submit_polls_by_the_seconds_learned(make_session: SessionFactory) -> None:
    # Get3W v1 jobs of 0.1 s whose estimate says 5 s. generate() teaches seconds; submit()
    # then looks at about 0.1 s, not at the estimate's 2.25 s, nor at 0.1 x 5 = 0.5 s.
    config = EmulatorConfig(duration=0.1, estimate_bias=50.0, api_keys=dict(KEYS))
    async with Emulator(config) as emulator:
        session = make_session(
            base_urls={"get3w": emulator.url},
            polling=PollSettings(first_poll=0.02, min_interval=0.005, max_interval=0.1),
        )
        for i in range(4):
            await session.get3w.generate(MODELS["get3w"], prompt=f"sync {i}")
        polls_before = emulator.stats.polls["get3w"]
        started = time.monotonic()
        handle = await session.get3w.submit(MODELS["get3w"], prompt="async")
        await handle
        assert handle.estimated_duration == pytest.approx(5.0)
        assert time.monotonic() - started < 0.3
        assert emulator.stats.polls["get3w"] - polls_before == handle.polls <= 3


@pytest.mark.alone
async def test_bad_estimates_leave_no_job_unpolled(make_session: SessionFactory) -> None:
    config = EmulatorConfig(duration=0.1, api_keys=dict(KEYS))
    async with Emulator(config) as emulator:
        session = make_session(
            base_urls={"get3w": emulator.url},
            # The first poll comes by 10 x max_interval = 0.2 s, whatever the estimate.
            polling=PollSettings(first_poll=0.02, min_interval=0.005, max_interval=0.02),
        )
        warm = await asyncio.gather(
            *(session.get3w.submit(MODELS["get3w"], prompt=f"w{i}") for i in range(8))
        )
        await asyncio.gather(*warm)
        # Estimates of 0 (none), 0.001 s, 1e4 s and 1e307 s, one job each.
        for bias in (0.0, 0.01, 1e5, 1e308):
            emulator.config.estimate_bias = bias
            started = time.monotonic()
            odd = await session.get3w.submit(MODELS["get3w"], prompt=f"odd {bias}")
            await odd
            assert time.monotonic() - started < 0.5, bias
        emulator.config.estimate_bias = 1.0
        polls_before = emulator.stats.polls["get3w"]
        later = await asyncio.gather(
            *(session.get3w.submit(MODELS["get3w"], prompt=f"l{i}") for i in range(8))
        )
        await asyncio.gather(*later)
        # The odd ones taught nothing wrong: the jobs after them poll as cheaply as before.
        assert emulator.stats.polls["get3w"] - polls_before == sum(h.polls for h in later) <= 8 * 3


async def test_a_burst_with_nothing_known_shares_its_polls(make_session: SessionFactory) -> None:
    # 20 dh3 jobs (no estimate) of 0.5 s gathered at once, first poll at 0.1 s: alone, each
    # would poll ~22 times at 8 % a step. A few look for all until one is done (with so few
    # jobs the lookers' share is large: about 7 polls a job).
    config = EmulatorConfig(duration=0.5, dh3_qps=None, api_keys=dict(KEYS))
    async with Emulator(config) as emulator:
        session = make_session(
            base_urls={"dh3": emulator.url},
            polling=PollSettings(first_poll=0.1, min_interval=0.005, max_interval=0.1),
        )
        handles = await asyncio.gather(
            *(session.dh3.submit(MODELS["dh3"], prompt=f"b {i}") for i in range(20))
        )
        await asyncio.gather(*handles)
        assert emulator.stats.polls["dh3"] == sum(h.polls for h in handles) <= 20 * 12


async def test_the_first_completion_wakes_the_jobs_asleep_on_the_others(make_session: SessionFactory) -> None:
    # 20 dh3 jobs of exactly 0.3 s gathered at once; each step doubles the age (0.05, 0.1,
    # 0.2, 0.4 ...). A few look for all: the one step that sees jobs done (0.4) also tells
    # the others to sleep on, to 0.8. The first job seen done wakes them: all are seen done
    # together, not one whole step (0.4 s) apart.
    config = EmulatorConfig(duration=0.3, duration_spread=0.0, dh3_qps=None, api_keys=dict(KEYS))
    async with Emulator(config) as emulator:
        session = make_session(
            base_urls={"dh3": emulator.url},
            polling=PollSettings(growth=1.0, first_poll=0.05, min_interval=0.005, max_interval=1.0),
        )
        handles = await asyncio.gather(
            *(session.dh3.submit(MODELS["dh3"], prompt=f"w {i}") for i in range(20))
        )
        done: list[float] = []
        for handle in handles:
            handle.add_done_callback(lambda _: done.append(time.monotonic()))
        await asyncio.gather(*handles)
        assert max(done) - min(done) < 0.2
        # And the few looked for all: far fewer polls than 20 jobs x 4 steps each.
        assert emulator.stats.polls["dh3"] < 20 * 3


def test_jobs_woken_after_sleeping_do_not_drag_the_bound_down() -> None:
    # 50 jobs of 0.9-1.1 s (evenly), no estimate. Every 5th looked at each step of a grid 8 %
    # apart; the others slept from 0.6 s on their polls, and were woken by the first seen
    # done, at the grid's first step past 1.0 s: their brackets span 0.6-1.02 s. Spread evenly
    # over that, they would put the 3rd percentile near 0.86; shaped as the narrow brackets
    # are, it stays near the true 0.906.
    planner = PollPlanner(settings=PollSettings())
    grid = [0.75 * 1.08**k for k in range(12)]
    wake = next(age for age in grid if age > 1.0)
    for i in range(50):
        duration = 0.9 + 0.2 * (i + 0.5) / 50
        if i % 5 == 0 or duration > wake:
            seen_running = max(age for age in grid if age < duration)
            planner.completed(KEY, i, seen_running, min(age for age in grid if age >= duration), None)
        else:
            planner.completed(KEY, i, 0.6, wake, None)
    assert planner.lower_bound(KEY, None) == pytest.approx(0.906, rel=0.02)


def test_a_first_polls_bracket_is_not_wide_and_plans_at_another_growth_do_not_move_the_bound() -> None:
    # Done at its first poll, a job's bracket runs from CENSORED_REACH steps below the bound
    # to the stretched step above it: under WIDE_STEPS, so spread as measured, not reshaped.
    growth = PollSettings().growth
    first_poll = (1 + growth) ** CENSORED_REACH * (1 + growth * FIRST_STEP_STRETCH)
    assert first_poll < (1 + growth) ** WIDE_STEPS

    # The brackets' widths are judged at the session's growth, whatever growth a plan comes
    # with (half of it while creates wait for capacity): the bound is the same either way.
    def taught(keen: bool) -> float | None:
        planner = PollPlanner(settings=PollSettings())
        for i in range(72):
            if i == 64 and keen:
                planner.next_poll_age(KEY, None, None, PollSettings(growth=growth / 2))
            duration = 27.0 * (0.9 + 0.2 * ((i * 37) % 72 + 0.5) / 72)
            # The quicker half done at their first poll, the others a step after a running one.
            width = first_poll if duration < 27.0 else 1 + growth
            planner.completed(KEY, i, duration * 1.02 / width, duration * 1.02, None)
        return planner.lower_bound(KEY, None)

    assert taught(keen=True) == pytest.approx(taught(keen=False))


def _planner_told(
    done: list[tuple[float, float]],
    running: Sequence[tuple[float, float]] = (),
    *,
    history: int = 128,
    exact: bool = False,
) -> PollPlanner:
    """A planner told, in time order, of jobs done, each (accepted, duration) and bracketed
    2 % below its end (``exact``: known to the second, as callbacks are), and of jobs seen
    still running, each (accepted, age)."""
    now = [0.0]
    planner = PollPlanner(history=history, clock=lambda: now[0])
    events = [(accepted + duration, 1, i, duration) for i, (accepted, duration) in enumerate(done)]
    events += [(accepted + age, 0, i, age) for i, (accepted, age) in enumerate(running)]
    for now[0], kind, i, age in sorted(events):
        if kind:
            planner.completed(KEY, ("done", i), age if exact else age * 0.98, age, None)
        else:
            planner.running(KEY, ("running", i), age, None)
    return planner


def test_a_burst_whose_quick_part_is_done_first_does_not_leave_its_slow_part_behind() -> None:
    # Bursts of 32 jobs of 1.0-1.155 s, accepted a millisecond apart, every other one (by
    # duration) in the first half, each burst done quickest first, into a history of 48. Kept
    # by when they were done, the plans after the second burst would read it and the slowest
    # half of the first: the bound 3.6 % higher. The jobs kept by when they were accepted,
    # all done, are a fair sample: the bound stays where one burst puts it.
    durations = [1.0 + 0.005 * i for i in range(32)]
    done: list[tuple[float, float]] = []
    bounds = []
    for start in (0.0, 10.0, 20.0, 30.0):
        done += [(start + 0.001 * (i % 2 * 16 + i // 2), durations[i]) for i in range(32)]
        bounds.append(_planner_told(done, history=48).lower_bound(KEY, None))
    assert bounds[0] is not None
    for bound in bounds[1:]:
        assert bound == pytest.approx(bounds[0], rel=0.005)


def test_after_a_burst_larger_than_the_history_the_bound_is_not_its_slowest_jobs() -> None:
    # 1000 jobs of 0.9-1.1 s accepted within 0.1 s, done quickest first, history 128: the
    # last 128 done are the slowest (the bound read off them is 1.04 s); the next burst plans
    # from the 128 accepted last, near the true 0.906.
    done = [(0.0001 * i, 0.9 + 0.2 * ((i * 389) % 1000 + 0.5) / 1000) for i in range(1000)]
    assert _planner_told(done).lower_bound(KEY, None) == pytest.approx(0.906, rel=0.02)


def test_a_burst_accepted_at_one_clock_tick_is_read_whole() -> None:
    # 300 jobs of 0.9-1.1 s stamped with one time (a coarse clock), done quickest first: the
    # 128 latest by acceptance would be the last done, the slowest. The group is read whole.
    done = [(5.0, 0.9 + 0.2 * ((i * 7) % 300 + 0.5) / 300) for i in range(300)]
    assert _planner_told(done).lower_bound(KEY, None) == pytest.approx(0.906, rel=0.02)


def test_a_stuck_job_does_not_hold_the_bound_on_the_jobs_before_it() -> None:
    # 200 jobs of 2 s, one job that never ends (seen running), then 400 of 1 s: the jobs
    # settled before the stuck one are stale once 128 accepted after it are done.
    done = [(0.01 * i, 2.0 * (0.9 + 0.2 * ((i * 7) % 200 + 0.5) / 200)) for i in range(200)]
    done += [(10.0 + 0.01 * i, 0.9 + 0.2 * ((i * 7) % 400 + 0.5) / 400) for i in range(400)]
    planner = _planner_told(done, [(5.0, 3.0)])
    assert planner.lower_bound(KEY, None) == pytest.approx(0.906, rel=0.03)


@pytest.mark.parametrize("polled", [True, False], ids=["polled", "by callback"])
def test_with_more_jobs_in_flight_than_the_history_holds_it_is_not_narrowed_to_the_quick(
    polled: bool,
) -> None:
    # 40 jobs a second of 9-11 s, seen 20 s in: about 400 in flight, and of those accepted
    # 9-11 s ago only the quick half is done. Kept by when they were accepted, the last 128
    # done would be 40 of those and 88 before them: the bound 3 % low. The jobs seen running
    # say which are settled (all accepted before the oldest of them); jobs done by callback
    # leave that unknown, and the last 128 done are kept (a fair sample at a steady rate).
    now, spread = 20.0, [9.0 + 2.0 * ((i * 37) % 100 + 0.5) / 100 for i in range(100)]
    jobs = [(i / 40, spread[i % 100]) for i in range(1000)]
    done = [(accepted, duration) for accepted, duration in jobs if accepted + duration <= now]
    running = [(accepted, now - accepted) for accepted, duration in jobs if accepted + duration > now]
    planner = _planner_told(done, running if polled else (), exact=not polled)
    assert planner.lower_bound(KEY, None) == pytest.approx(9.06, rel=0.015)
    assert planner.upper_bound(KEY, None) == pytest.approx(11.0, rel=0.01)
