"""Rate limits, poll scheduling and the connection pool under many jobs."""

from __future__ import annotations

import asyncio
import itertools

import pytest

from image_gen_async import AsyncSession, PollSettings, RateLimiter
from image_gen_async._polling import DurationLearner, next_delay
from image_gen_async.testing import Emulator, EmulatorConfig, EmulatorProcess

from .conftest import KEYS, MODELS, SessionFactory

SCALED_QPS = 200.0


async def test_1000_dh3_jobs_stay_under_the_limit(make_session: SessionFactory) -> None:
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
            *(session.dh3.submit("nano-banana-pro", prompt=f"fox number {i}") for i in range(1000))
        )
        results = await asyncio.gather(*handles)
        stats = await emulator.stats()
    assert len({r.task_id for r in results}) == 1000
    assert stats["creates"]["dh3"] == 1000
    assert stats["create_requests"]["dh3"] == 1000
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


def test_poll_schedule() -> None:
    settings = PollSettings(first_poll=2.0, min_interval=0.25, max_interval=30.0, growth=0.08)
    # Nothing known: the first poll comes at first_poll, then waits grow by cold_growth.
    assert next_delay(0.0, None, settings) == 2.0
    assert next_delay(10.0, None, settings) == pytest.approx(3.0)
    # Seeded: nothing before the lower bound, then waits of `growth` times the elapsed time.
    assert next_delay(0.0, 20.0, settings) == pytest.approx(21.6)
    assert next_delay(25.0, 20.0, settings) == pytest.approx(2.0)
    assert next_delay(1000.0, 20.0, settings) == 30.0
    assert next_delay(1.0, 0.1, settings) == 0.25


def test_learner_uses_estimates_then_history() -> None:
    learner = DurationLearner()
    key = ("get3w", "m")
    assert learner.lower_bound(key, None) is None
    assert learner.lower_bound(key, 52.0) == 26.0  # estimates can be 2x too high
    learner.record(key, 27.0, 52.0)
    learner.record(key, 30.0, 52.0)
    assert learner.lower_bound(key, 52.0) == pytest.approx(27.0)
    assert learner.lower_bound(key, 104.0) == pytest.approx(54.0)  # the ratio carries over
    assert learner.lower_bound(key, None) == 27.0


@pytest.mark.parametrize("bias", [0.5, 1.0, 2.0])
async def test_polling_seeded_from_estimate_stays_cheap(make_session: SessionFactory, bias: float) -> None:
    config = EmulatorConfig(duration=0.2, duration_spread=0.1, estimate_bias=bias, api_keys=dict(KEYS))
    async with Emulator(config) as emulator:
        session = make_session(
            base_urls={"get3w": emulator.url},
            polling=PollSettings(first_poll=0.05, min_interval=0.005, max_interval=0.5),
        )
        handle = await session.get3w.submit(MODELS["get3w"], prompt="a fox")
        await handle
        # Cold, from the estimate alone: polls start near half the estimate and grow 8 % a step.
        assert handle.estimated_duration == pytest.approx(0.2 * bias)
        assert handle.polls <= 16
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
        cold = await session.dh3.submit("nano-banana-pro", prompt="first")
        await cold
        warm = await asyncio.gather(
            *(session.dh3.submit("nano-banana-pro", prompt=f"fox {i}") for i in range(20))
        )
        await asyncio.gather(*warm)
        average = sum(h.polls for h in warm) / len(warm)
        assert cold.polls >= 5 and average <= 3.0 < cold.polls


async def test_waiting_for_a_pooled_connection_is_not_a_connect_timeout(
    make_session: SessionFactory, emulator: Emulator
) -> None:
    emulator.config.duration = 0.3
    session = make_session(pool_size=10, connect_timeout=0.2)
    results = await asyncio.gather(
        *(session.nananobanana.generate("nano-banana", prompt=f"cat {i}") for i in range(60))
    )
    assert len(results) == 60
    assert emulator.stats.creates["nananobanana"] == 60
