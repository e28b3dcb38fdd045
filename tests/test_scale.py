"""Rate limits, poll scheduling and the connection pool under many jobs."""

from __future__ import annotations

import asyncio
import itertools
import math

import pytest

from image_gen_async import AsyncSession, Limiter, LocalBackend, PollSettings, RateLimiter, TaskStatus
from image_gen_async._polling import FIRST_STEP_STRETCH, PollPlanner
from image_gen_async._ratelimit import Ticket
from image_gen_async.testing import Emulator, EmulatorConfig, EmulatorProcess

from .conftest import KEYS, MODELS, SessionFactory

SCALED_QPS = 200.0
JOBS = 400  # two seconds at the limit: enough sliding windows to see one overrun


@pytest.mark.alone
async def test_400_dh3_jobs_stay_under_the_limit(make_session: SessionFactory) -> None:
    # The emulator runs in its own process, as a provider would: in-process, the client's
    # own load would delay the server's clock and bunch arrivals that were sent evenly.
    args = ("--dh3-qps", str(SCALED_QPS), "--duration", "0.2", "--no-record")
    async with EmulatorProcess(*args) as emulator:
        session = make_session(
            base_urls={"dh3": emulator.url},
            rate_limits={"dh3": SCALED_QPS},
            polling=PollSettings(first_poll=0.1, min_interval=0.02, max_interval=0.5),
        )
        handles = await asyncio.gather(
            *(session.dh3.submit("nano-banana-pro", prompt=f"fox number {i}") for i in range(JOBS))
        )
        results = await asyncio.gather(*handles)
        stats = await emulator.stats()
    assert len({r.task_id for r in results}) == JOBS
    assert stats["creates"]["dh3"] == JOBS
    assert stats["create_requests"]["dh3"] == JOBS
    assert stats["rate_limited"].get("dh3", 0) == 0
    assert stats["max_creates_in_1s"]["dh3"] <= SCALED_QPS
    assert sum(h.retries for h in handles) == 0


async def test_limiter_is_shared_by_clients_with_the_same_key_only(emulator: Emulator) -> None:
    async with AsyncSession(api_keys={"dh3": KEYS["dh3"]}, rate_limits={"dh3": 5}) as one:
        assert one.dh3.limiter.rate == 5
        async with AsyncSession(api_keys={"get3w": "k"}, rate_limits={"get3w": 2.0}) as two:
            assert two.get3w.limiter.rate == 2.0
            assert two.get3w_v3.limiter.rate is None
            assert two.get3w_v3.limiter is not two.get3w.limiter
    assert AsyncSession(env={}).dh3.limiter.rate == 3.0  # dh3's documented default


async def test_limiter_is_fifo_and_paced() -> None:
    limiter = RateLimiter(50.0, margin=0.0)
    loop = asyncio.get_running_loop()
    order: list[int] = []
    times: list[float] = []

    async def take(i: int) -> None:
        await limiter.acquire()
        order.append(i)
        times.append(loop.time())

    await asyncio.gather(*(take(i) for i in range(10)))
    assert order == list(range(10))
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert min(gaps) >= 0.02 * 0.9  # never two in the same slot


async def test_cancelled_waiter_gives_its_slot_back() -> None:
    limiter = RateLimiter(10.0, margin=0.0)
    await limiter.acquire()
    waiter = asyncio.ensure_future(limiter.acquire())
    await asyncio.sleep(0)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    loop = asyncio.get_running_loop()
    started = loop.time()
    await limiter.acquire()
    assert loop.time() - started < 0.15  # one slot of 0.1 s, not two


def test_poll_plan_from_nothing_estimates_and_running_jobs() -> None:
    settings = PollSettings(first_poll=2.0, min_interval=0.25, max_interval=30.0, growth=0.08)
    planner = PollPlanner()
    key = ("dh3", "m")
    # Nothing known: first_poll, then 8 % more age per poll, within the interval bounds.
    assert planner.next_poll_age(key, None, None, settings) == 2.0
    assert planner.next_poll_age(key, None, 10.0, settings) == pytest.approx(10.8)
    assert planner.next_poll_age(key, None, 1.0, settings) == pytest.approx(1.25)
    assert planner.next_poll_age(key, None, 1000.0, settings) == pytest.approx(1030.0)
    # An estimate may be 2x too high: start just before half of it.
    assert planner.next_poll_age(key, 52.0, None, settings) == pytest.approx(52 * 0.45 * 1.08)
    # Nothing done yet and five jobs seen running at 20 s or more: the others need not look
    # before one step past 20 s (those five look for them).
    for job, age in enumerate([20.0, 21.0, 22.0, 23.0, 24.0, 3.0]):
        planner.running(key, job, age, None)
    assert planner.lower_bound(key, None) == pytest.approx(20 * 1.08)
    assert planner.next_poll_age(key, None, 5.0, settings) == pytest.approx(20 * 1.08)  # moved on
    planner.forget(key, 0)
    assert planner.lower_bound(key, None) == pytest.approx(3 * 1.08)  # the 5th oldest is now 3 s


def test_poll_plan_learns_the_low_tail_from_brackets() -> None:
    planner = PollPlanner()
    key = ("get3w", "m")
    # Durations 27 s ± 10 %, each seen between its last running poll and the done one.
    for i in range(100):
        duration = 27 * (0.9 + 0.2 * i / 99)
        planner.completed(key, i, duration * 0.96, duration * 1.04, 52.0)
    lower = planner.lower_bound(key, 52.0)
    assert lower is not None and 27 * 0.88 < lower < 27 * 0.93
    # Relative to the estimate: a model estimated 2x higher is expected to take 2x longer.
    assert planner.lower_bound(key, 104.0) == pytest.approx(2 * lower)
    upper = planner.upper_bound(key, 52.0)
    assert upper is not None and upper == pytest.approx(27 * 1.1 * 1.04)


def test_poll_plan_backs_off_when_most_jobs_are_done_at_the_first_poll() -> None:
    planner = PollPlanner()
    key = ("dh3", "m")
    planner.completed(key, 0, 0.0, 30.0, None)  # done at the first poll, 30 s
    assert planner.lower_bound(key, None) == pytest.approx(30 * 0.85)
    # Jobs of 10 s each, from nothing known: once one is done the first poll settles
    # within a step of 10 s, and stays there.
    planner = PollPlanner()
    settings = PollSettings()
    first = []
    for job in range(40):
        age = first_age = planner.next_poll_age(key, None, None, settings)
        last_running = 0.0
        while age < 10.0:
            planner.running(key, job, age, None)
            last_running, age = age, planner.next_poll_age(key, None, age, settings)
        planner.completed(key, job, last_running, age, None)
        first.append(first_age)
    assert all(10.0 / 1.08 < age < 10.0 * 1.08 for age in first[5:])


def test_poll_plan_warm_stretches_only_the_first_step() -> None:
    planner = PollPlanner()
    key = ("dh3", "m")
    settings = PollSettings(growth=0.08)
    for i in range(40):
        duration = 27 * (0.9 + 0.2 * i / 39)
        planner.completed(key, i, duration * 0.96, duration * 1.04, None)
    lower = planner.lower_bound(key, None)
    assert lower is not None
    first = planner.next_poll_age(key, None, None, settings)
    assert first == pytest.approx(lower * (1 + 0.08 * FIRST_STEP_STRETCH))
    # Later polls keep to one growth step: the stretch is for the first one only.
    assert planner.next_poll_age(key, None, 30.0, settings) == pytest.approx(30.0 * 1.08)


@pytest.mark.alone
@pytest.mark.parametrize("bias", [0.5, 1.0, 2.0])
async def test_polling_seeded_from_estimate_stays_cheap(make_session: SessionFactory, bias: float) -> None:
    # Jobs of 0.1 s: what is asserted is at most so many polls, which a slow loop only lowers.
    config = EmulatorConfig(duration=0.1, duration_spread=0.1, estimate_bias=bias, api_keys=dict(KEYS))
    async with Emulator(config) as emulator:
        session = make_session(
            base_urls={"get3w": emulator.url},
            polling=PollSettings(first_poll=0.05, min_interval=0.005, max_interval=0.5),
        )
        handle = await session.get3w.submit(MODELS["get3w"], prompt="a fox")
        await handle
        # Cold, from the estimate alone: polls start before half the estimate and grow 8 % a step.
        assert handle.estimated_duration == pytest.approx(0.1 * bias)
        assert handle.polls <= math.log(1.1 / (0.45 * bias)) / math.log(1.08) + 2
        cold = await asyncio.gather(
            *(session.get3w.submit(MODELS["get3w"], prompt=f"cold {i}") for i in range(9))
        )
        await asyncio.gather(*cold)
        warm = await asyncio.gather(
            *(session.get3w.submit(MODELS["get3w"], prompt=f"fox {i}") for i in range(20))
        )
        await asyncio.gather(*warm)
        assert sum(h.polls for h in warm) / len(warm) <= 3.0


async def test_polling_learns_without_an_estimate(make_session: SessionFactory) -> None:
    config = EmulatorConfig(duration=0.2, duration_spread=0.05, dh3_qps=None, api_keys=dict(KEYS))
    async with Emulator(config) as emulator:
        session = make_session(
            base_urls={"dh3": emulator.url},
            polling=PollSettings(first_poll=0.02, min_interval=0.005, max_interval=0.5),
        )
        first = await session.dh3.submit("nano-banana-pro", prompt="first")
        await first
        cold = await asyncio.gather(
            *(session.dh3.submit("nano-banana-pro", prompt=f"cold {i}") for i in range(9))
        )
        await asyncio.gather(*cold)
        warm = await asyncio.gather(
            *(session.dh3.submit("nano-banana-pro", prompt=f"fox {i}") for i in range(20))
        )
        await asyncio.gather(*warm)
        average = sum(h.polls for h in warm) / len(warm)
        # Nothing known: from first_poll up to 0.2 s at 8 % a step. Then learned.
        assert first.polls >= 15 and average <= 3.0


async def test_waiting_for_a_pooled_connection_is_not_a_connect_timeout(
    make_session: SessionFactory, emulator: Emulator
) -> None:
    emulator.config.duration = 0.3
    session = make_session(pool_size=10, connect_timeout=0.2)
    # Two waves of 0.3 s on 10 connections: the second waits 0.3 s for its connections, past 0.2 s.
    results = await asyncio.gather(
        *(session.nananobanana.generate("nano-banana", prompt=f"cat {i}") for i in range(20))
    )
    assert len(results) == 20
    assert emulator.stats.creates["nananobanana"] == 20


def test_poll_plan_warm_bound_stays_under_the_quickest_job_seen_done() -> None:
    planner = PollPlanner()
    key = ("dh3", "m")
    # Four jobs seen done in the same bracket and one quicker: the mirror alone would say
    # about 28 s, but a job was seen done by 27 s.
    for i in range(4):
        planner.completed(key, i, 28.0, 30.0, None)
    planner.completed(key, 4, 25.0, 27.0, None)
    assert planner.lower_bound(key, None) == pytest.approx(27.0 / 1.04)


def test_poll_plan_warm_is_not_held_back_by_stuck_jobs_or_a_freak_quick_one() -> None:
    planner = PollPlanner()
    key = ("dh3", "m")
    settings = PollSettings(growth=0.08)
    for i in range(50):
        planner.completed(key, i, 8.0, 10.0, None)  # jobs take 8-10 s
    learned = planner.next_poll_age(key, None, None, settings)
    for job in range(100, 105):
        planner.running(key, job, 900.0, None)  # five jobs stuck for 15 minutes
    # Once warm, the learned durations decide: old running jobs say nothing about new ones.
    assert planner.next_poll_age(key, None, None, settings) == pytest.approx(learned)
    # One job answered at once (a cache hit, say), another with a clock stepped back.
    planner.completed(key, 200, 0.0, 0.5, None)
    planner.completed(key, 201, 0.0, -3.0, None)
    assert planner.next_poll_age(key, None, None, settings) > 0.8 * learned


class _LimiterWithoutReady:
    """A limiter written to the protocol's required methods only (no ``ready()``)."""

    rate = None
    current_rate = None

    def __init__(self) -> None:
        self.acquired = 0
        self._inner = RateLimiter(None)

    async def acquire(self) -> Ticket:
        self.acquired += 1
        return await self._inner.acquire()

    def penalize(self, retry_after: float | None) -> None:
        self._inner.penalize(retry_after)

    def reward(self) -> None:
        self._inner.reward()


async def test_a_limiter_without_ready_is_asked_to_acquire(make_session: SessionFactory) -> None:
    limiter = _LimiterWithoutReady()

    class Backend(LocalBackend):
        def limiter(
            self, client: str, key_fingerprint: str, rate: float | None, margin: float, max_pause: float
        ) -> Limiter:
            return limiter

    session = make_session(limiter_backend=Backend())
    handle = await session.dh3.submit(MODELS["dh3"], prompt="a cat")
    assert (await handle).status is TaskStatus.COMPLETED
    assert limiter.acquired == 1
