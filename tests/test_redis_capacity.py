"""RedisGate on a real redis-server: one key's capacity window and slots shared by processes.

Each ``RedisGate`` made here has its own process token, so two of them in one test are two
processes as far as Redis can tell; the crash and scale-out tests use real processes.
"""

from __future__ import annotations

import asyncio
import logging
import re
import signal
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from aiohttp import web
from redis.asyncio import Redis

from image_gen_async import AdmissionTimeoutError, BackendUnavailableError, RedisBackend
from image_gen_async import _redis_limit as redis_limit
from image_gen_async._capacity import SLOW_START, Slot
from image_gen_async._redis_capacity import LEASE, RedisGate, fallback_places
from image_gen_async.testing import Emulator

from . import test_redis
from .conftest import KEYS, MODELS, SessionFactory
from .test_redis import WORKER, RedisServer, fingerprint, redis_executable

GateFactory = Callable[..., RedisGate]


# The Redis server and namespace fixtures are test_redis.py's (imported above).


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_url)
    yield client
    await client.aclose()


@pytest.fixture
def gate_key(namespace: str) -> str:
    return f"{namespace}:capacity:nananobanana:{fingerprint(KEYS['nananobanana'])}"


@pytest.fixture
async def gates(redis: Redis, gate_key: str) -> AsyncIterator[GateFactory]:
    """RedisGates on one key, each as if in a process of its own; closed after the test."""
    made: list[RedisGate] = []

    def make(limit: int | None, **options: Any) -> RedisGate:
        gate = RedisGate(redis, gate_key, f"p{len(made)}", limit, **options)
        made.append(gate)
        return gate

    yield make
    for gate in made:
        await gate.close()


async def until(check: Callable[[], Awaitable[bool]], timeout: float = 5.0) -> None:
    """Wait until ``await check()`` holds (what a background task tells Redis takes a moment)."""
    for _ in range(int(timeout / 0.005)):
        if await check():
            return
        await asyncio.sleep(0.005)
    raise AssertionError("condition not met in time")


async def script_calls(redis: Redis) -> int:
    stats = await redis.info("commandstats")
    return sum(int(stats.get(name, {}).get("calls", 0)) for name in ("cmdstat_evalsha", "cmdstat_eval"))


def test_fallback_places_are_a_share_of_the_cap_and_at_least_one() -> None:
    table = [  # (limit, last seen window, share) -> places
        ((10, 8, 0.25), 2),
        ((10, 8, 0.5), 5),
        ((None, 12, 0.5), 6),
        ((3, 8, 0.1), 1),
        ((None, 1, 0.25), 1),
        ((10, 8, 1.0), 10),
    ]
    for (limit, window, share), places in table:
        assert fallback_places(limit, window, share) == places, (limit, window, share)


# The semaphore: places shared, leases, waiting.


async def test_a_release_in_one_process_wakes_a_waiter_in_another_at_once(
    gates: GateFactory, redis: Redis, gate_key: str
) -> None:
    a, b = gates(2), gates(2)
    first = await a.admit(None)
    await a.admit(None)
    loop = asyncio.get_running_loop()
    waiting = asyncio.ensure_future(b.admit(None))
    calls = await script_calls(redis)
    await asyncio.sleep(0.4)  # the window stays full this long: b must wait without hammering Redis
    assert not waiting.done()
    # Tries at 0, 0.05, 0.15, 0.35 s of backoff (and the calls counted here): no tight loop.
    assert await script_calls(redis) - calls <= 6
    released = loop.time()
    first.release()
    await asyncio.wait_for(waiting, 2)
    # The next backoff try is 0.35 s away: the release message woke b.
    assert loop.time() - released < 0.2
    assert await redis.zcard(f"{gate_key}:leases") == 2
    assert (a.in_flight, b.in_flight, b.shared_in_flight) == (1, 1, 2)


async def test_waiters_are_served_in_order_and_cancelled_or_late_ones_take_nothing(
    gates: GateFactory, redis: Redis, gate_key: str
) -> None:
    gate = gates(1)
    held = await gate.admit(None)
    order: list[int] = []

    async def wait(i: int) -> Slot:
        slot = await gate.admit(None)
        order.append(i)
        return slot

    waiters = [asyncio.ensure_future(wait(i)) for i in range(4)]
    await asyncio.sleep(0)  # one loop step: each waiter queues, in the order made
    assert gate.waiting  # the engine polls keener while creates wait
    waiters[1].cancel()
    loop = asyncio.get_running_loop()
    with pytest.raises(AdmissionTimeoutError, match="nothing was sent"):
        await gate.admit(loop.time() + 0.05)
    for i in (0, 2, 3):
        held.release()
        held = await asyncio.wait_for(waiters[i], 2)
    assert order == [0, 2, 3]
    assert waiters[1].cancelled() and not gate.waiting
    assert await redis.zcard(f"{gate_key}:leases") == 1  # nobody left a lease behind
    held.release()
    await until(lambda: _zcard_is(redis, f"{gate_key}:leases", 0))


async def test_a_refused_create_asks_again_at_the_head_of_the_queue(gates: GateFactory) -> None:
    gate = gates(1)
    held = await gate.admit(None)
    later = asyncio.ensure_future(gate.admit(None))
    await asyncio.sleep(0)  # one loop step: it queues
    again = asyncio.ensure_future(gate.admit(None, first=True))
    await asyncio.sleep(0)
    held.release()
    slot = await asyncio.wait_for(again, 2)
    assert not later.done()
    slot.release()
    (await asyncio.wait_for(later, 2)).release()


async def _zcard_is(redis: Redis, key: str, count: int) -> bool:
    return bool(await redis.zcard(key) == count)


async def test_a_process_that_keeps_retaking_its_places_leaves_a_waiting_one_its_share(
    gates: GateFactory, redis: Redis, gate_key: str
) -> None:
    a, b = gates(4), gates(4)
    held = [await a.admit(None) for _ in range(4)]
    wanted = [asyncio.ensure_future(b.admit(None)) for _ in range(2)]
    await until(lambda: _zcard_is(redis, f"{gate_key}:waiting", 1))  # b waits, and says so
    retakes = []
    for _ in range(2):  # a gives a place back and asks for one at once, in the same breath
        held.pop().release()
        retakes.append(asyncio.ensure_future(a.admit(None)))
    await asyncio.wait_for(asyncio.gather(*wanted), 2)  # both freed places went to b
    assert not any(retake.done() for retake in retakes)
    assert (a.in_flight, b.in_flight) == (2, 2)
    for slot in wanted:
        slot.result().release()
    await asyncio.wait_for(asyncio.gather(*retakes), 2)


async def test_a_crashed_holders_places_come_back_after_its_lease(
    gates: GateFactory, redis_url: str, namespace: str, gate_key: str
) -> None:
    lease = 0.2
    holder = await asyncio.create_subprocess_exec(
        sys.executable,
        str(WORKER),
        *("--redis", redis_url, "--namespace", namespace, "--gate-key", gate_key),
        *("--hold", "2", "--max-concurrent", "2", "--lease", str(lease)),
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert holder.stdout is not None
        assert await asyncio.wait_for(holder.stdout.readline(), 30) == b"held\n"
        gate = gates(2)
        loop = asyncio.get_running_loop()
        # The holder renews its leases: no place for more than three leases' time.
        with pytest.raises(AdmissionTimeoutError):
            await gate.admit(loop.time() + 3.5 * lease)
        holder.send_signal(signal.SIGKILL)
        await holder.wait()
        killed = loop.time()
        await gate.admit(loop.time() + 5)
        await gate.admit(loop.time() + 5)
        assert loop.time() - killed < lease + 1.2  # the lease, then a backoff try at most a second on
    finally:
        if holder.returncode is None:
            holder.kill()
            await holder.wait()


async def test_a_refusal_shrinks_the_window_of_every_process(
    gates: GateFactory, redis: Redis, gate_key: str
) -> None:
    a, b = gates(None), gates(None)  # learned
    mine = [await a.admit(None) for _ in range(3)]
    [await b.admit(None) for _ in range(2)]
    extra = await a.admit(None)
    a.refused(extra, None, None)  # refused with 5 other tasks of the key in flight, in two processes
    await until(lambda: _field_is(redis, gate_key, "window", 5))
    loop = asyncio.get_running_loop()
    with pytest.raises(AdmissionTimeoutError):
        await b.admit(loop.time() + 0.1)
    assert (b.window, b.shared_in_flight, a.refusals) == (5, 5, 1)
    mine[0].release()
    await asyncio.wait_for(b.admit(None), 2)
    # activeTasks below what is in flight (others use the key too): the server's word wins.
    a.refused(mine[1], 2, None)
    await until(lambda: _field_is(redis, gate_key, "window", 2))


async def test_the_learned_window_grows_with_accepted_creates_in_any_process(
    gates: GateFactory, redis: Redis, gate_key: str
) -> None:
    a, b = gates(None), gates(None)
    slots = [await a.admit(None) for _ in range(8)]
    for slot in slots:  # until the first refusal: one more place per SLOW_START accepted creates
        a.accepted(slot)
    grown = 8 + 8 // SLOW_START
    await until(lambda: _field_is(redis, gate_key, "window", grown))
    more = [await asyncio.wait_for(b.admit(None), 2) for _ in range(grown - 8)]
    assert (b.window, b.shared_in_flight) == (grown, grown)
    loop = asyncio.get_running_loop()
    with pytest.raises(AdmissionTimeoutError):
        await b.admit(loop.time() + 0.1)
    # Configured: never past the limit, whatever is accepted.
    c = gates(10)
    for slot in slots[:4]:
        c.accepted(slot)
    await until(lambda: _field_is(redis, gate_key, "window", 10))
    for slot in [*slots, *more]:
        slot.release()


async def test_a_refusal_with_nothing_of_ours_in_flight_pauses_every_process(
    gates: GateFactory, redis: Redis, gate_key: str
) -> None:
    a, b = gates(None), gates(None)
    only = await a.admit(None)
    a.refused(only, None, 0.3)  # others hold the key's capacity: wait Retry-After, then try one
    await until(lambda: _field_is(redis, gate_key, "window", 1))
    loop = asyncio.get_running_loop()
    asked = loop.time()
    await asyncio.wait_for(b.admit(None), 2)
    assert loop.time() - asked >= 0.2


async def test_a_refusal_advising_no_wait_still_pauses_for_the_gates_own_pause(
    gates: GateFactory, redis: Redis, gate_key: str
) -> None:
    # Retry-After: 0 may lengthen the pause, never shorten it: asked again at once, a server
    # that refuses every create would be sent thousands.
    a, b = gates(None, pause=0.3), gates(None, pause=0.3)
    only = await a.admit(None)
    a.refused(only, None, 0.0)
    await until(lambda: _field_is(redis, gate_key, "window", 1))
    loop = asyncio.get_running_loop()
    asked = loop.time()
    await asyncio.wait_for(b.admit(None), 2)
    assert loop.time() - asked >= 0.2


async def test_a_resumed_task_occupies_a_place_even_over_the_window(
    gates: GateFactory, redis: Redis, gate_key: str
) -> None:
    a, b = gates(1), gates(1)
    await a.admit(None)
    resumed = a.occupy()
    await until(lambda: _zcard_is(redis, f"{gate_key}:leases", 2))
    loop = asyncio.get_running_loop()
    with pytest.raises(AdmissionTimeoutError):
        await b.admit(loop.time() + 0.1)
    assert b.shared_in_flight == 2
    resumed.release()
    await until(lambda: _zcard_is(redis, f"{gate_key}:leases", 1))


async def test_leases_held_through_a_redis_restart_are_counted_again(gate_key: str) -> None:
    server = RedisServer(redis_executable())
    server.start()
    backend = RedisBackend(server.url)  # its client: time limits on every command, retries
    redis = backend.redis
    a = RedisGate(redis, gate_key, "a", 1, lease=0.6)  # renewed every 0.2 s
    b = RedisGate(redis, gate_key, "b", 1)
    try:
        await a.admit(None)
        server.stop()  # no persistence: Redis comes back empty, the task still runs
        await asyncio.sleep(0.3)  # a renewal falls in the outage
        server.start()
        await until(lambda: _zcard_is(redis, f"{gate_key}:leases", 1))  # the next renewal re-adds it
        loop = asyncio.get_running_loop()
        with pytest.raises(AdmissionTimeoutError):
            await b.admit(loop.time() + 0.2)
    finally:
        await a.close()
        await b.close()
        await backend.close()
        server.stop()


async def _field_is(redis: Redis, key: str, name: str, value: int) -> bool:
    got = await redis.hget(key, name)
    return got is not None and int(got) == value


async def test_gate_keys_name_a_hash_of_the_key_and_expire(
    make_session: SessionFactory, redis_url: str, namespace: str
) -> None:
    backend = RedisBackend(redis_url, namespace=namespace)
    session = make_session(limiter_backend=backend)
    handle = await session.nananobanana.submit(MODELS["nananobanana"], prompt="a fox")
    assert (await handle).ok
    prefix = f"{namespace}:capacity:nananobanana:{fingerprint(KEYS['nananobanana'])}"
    keys = [key.decode() async for key in backend.redis.scan_iter(f"{namespace}:*")]
    assert keys and all(key.startswith(prefix) for key in keys), keys
    assert not any(KEYS["nananobanana"] in key for key in keys)
    for key in keys:
        assert 0 < await backend.redis.pttl(key) <= LEASE * 1000 + redis_limit.IDLE_TTL_MS


# Redis away: loud, or a local share.


async def test_unreachable_redis_fails_admission_loudly_and_sends_nothing(
    make_session: SessionFactory, emulator: Emulator
) -> None:
    server = RedisServer(redis_executable())  # never started: connections are refused
    session = make_session(limiter_backend=RedisBackend(server.url))
    with pytest.raises(BackendUnavailableError, match=re.escape("nananobanana create limit (tasks at once)")):
        await session.nananobanana.submit(MODELS["nananobanana"], prompt="a fox")
    assert emulator.stats.create_requests["nananobanana"] == 0


async def test_fallback_share_runs_a_local_share_then_returns_to_redis(
    make_session: SessionFactory,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(redis_limit, "RETRY_REDIS_AFTER", 0.1)
    server = RedisServer(redis_executable())  # not started yet: Redis is away
    backend = RedisBackend(server.url, fallback_share=0.5)
    session = make_session(limiter_backend=backend, max_concurrent={"nananobanana": 4})
    client = session.nananobanana
    with caplog.at_level(logging.WARNING, logger="image_gen_async"):
        handles = await asyncio.gather(
            *(client.submit(MODELS["nananobanana"], prompt=f"fox {i}") for i in range(5))
        )
        assert client.capacity.window == 2  # half the cap of 4, never unlimited
        assert all([(await handle).ok for handle in handles])
        assert len([r for r in caplog.records if "at most 2 tasks at once" in r.message]) == 1
        server.start()
        try:
            await asyncio.sleep(0.15)  # past the time to try Redis again
            handle = await client.submit(MODELS["nananobanana"], prompt="back on the shared capacity")
            assert any("back on the shared capacity" in r.message for r in caplog.records)
            assert client.capacity.window == 4
            key = f"image_gen_async:capacity:nananobanana:{fingerprint(KEYS['nananobanana'])}"
            assert await backend.redis.exists(key)
            assert (await handle).ok
        finally:
            await session.close()
            server.stop()


# The scenario (with three processes rather than four): one key, a server that runs 10 tasks at once.


class CappedServer:
    """A nananobanana stand-in that runs ``cap`` tasks per key at once (503 ``server_busy`` past it).

    Counts creates, refusals, the peak of tasks running (by their duration) and the peak of
    tasks created whose end the client has not yet been told (what a slot covers).
    """

    def __init__(self, cap: int, duration: float) -> None:
        self.cap = cap
        self.duration = duration
        self.ends: dict[str, float] = {}  # task id -> end, on the loop clock
        self.keys: dict[str, str] = {}  # task id -> key
        self.untold: set[str] = set()
        self.creates = self.refusals = self.peak_running = self.peak_untold = 0

    def running(self, key: str, now: float) -> int:
        return sum(1 for task, end in self.ends.items() if end > now and self.keys[task] == key)

    async def generate(self, request: web.Request) -> web.Response:
        now = asyncio.get_running_loop().time()
        key = request.headers.get("Authorization", "")
        if request.method == "GET":
            task = request.query["id"]
            done = now >= self.ends[task]
            if done:
                self.untold.discard(task)
            record = {"id": task, "processingStatus": "completed" if done else "processing"}
            if done:
                record["outputImageUrls"] = [f"http://127.0.0.1:9/{task}.png"]  # type: ignore[assignment]
            return web.json_response({"data": record})
        await request.json()
        active = self.running(key, now)
        if active >= self.cap:
            self.refusals += 1
            body = {"error": "Server is busy", "type": "server_busy", "activeTasks": active}
            return web.json_response(body, status=503)
        task = uuid.uuid4().hex
        self.ends[task], self.keys[task] = now + self.duration, key
        self.untold.add(task)
        self.creates += 1
        self.peak_running = max(self.peak_running, active + 1)
        self.peak_untold = max(self.peak_untold, len(self.untold))
        return web.json_response({"success": True, "async": True, "generationId": task})


@pytest.fixture
async def capped() -> AsyncIterator[tuple[CappedServer, str]]:
    server = CappedServer(cap=10, duration=0.03)
    app = web.Application()
    app.router.add_route("*", "/api/v1/generate", server.generate)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield server, f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


WORKERS = 3  # processes sharing one key: enough to share, few enough to start quickly


async def run_workers(
    url: str, redis_url: str, namespace: str, jobs: int, *options: str
) -> list[dict[str, Any]]:
    """``WORKERS`` worker processes on one nananobanana key, started together; their reports."""
    return await test_redis.run_workers(
        WORKERS,
        *("--redis", redis_url, "--namespace", namespace, "--emulator", url),
        *("--client", "nananobanana", "--model", MODELS["nananobanana"], "--key", KEYS["nananobanana"]),
        *("--jobs", str(jobs), "--first-poll", "0.02", *options),
    )


@pytest.mark.alone
async def test_three_processes_learn_and_share_one_keys_cap(
    capped: tuple[CappedServer, str], redis_url: str, namespace: str
) -> None:
    server, url = capped
    # The learning costs refusals: a few at the start, then one now and then as the window
    # probes for more (2-4 % of creates in all). The bound below is a share of them: 600 in
    # all, so one run's share is not off by more than its margin (with 400, 1 run in 8 was).
    jobs = 200
    reports = await run_workers(url, redis_url, namespace, jobs)
    total = WORKERS * jobs
    assert sum(report["jobs"] for report in reports) == total  # every job completed (asserted ok in each)
    assert server.creates == total
    assert server.peak_running <= server.cap
    assert server.refusals <= 0.05 * total, f"{server.refusals} refused creates"
    assert sum(report["refusals"] for report in reports) == server.refusals
    assert sum(report["retries"] for report in reports) == 0  # a refusal is no create retry
    assert max(report["first"] for report in reports) < min(report["last"] for report in reports)


async def test_three_processes_with_a_configured_cap_never_exceed_it(
    capped: tuple[CappedServer, str], redis_url: str, namespace: str
) -> None:
    server, url = capped
    jobs = 30
    reports = await run_workers(url, redis_url, namespace, jobs, "--max-concurrent", "10")
    assert server.creates == WORKERS * jobs and server.refusals == 0
    # Never more tasks created and not yet seen finished than the cap, and the cap kept full.
    assert server.peak_untold == server.cap
    # Every process had its turns all along: none waited until the others were done.
    firsts = [report["first"] for report in reports]
    lasts = [report["last"] for report in reports]
    assert max(firsts) < min(lasts)
