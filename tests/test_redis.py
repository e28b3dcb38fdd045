"""RedisBackend on a real redis-server: one key's limit across processes, and webhook fan-in."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from image_gen_async import (
    AsyncSession,
    BackendUnavailableError,
    PollSettings,
    RedisBackend,
)
from image_gen_async import _redis_limit as redis_limit
from image_gen_async import _redis_relay as redis_relay
from image_gen_async.testing import Emulator, EmulatorProcess

from .conftest import KEYS, MODELS, SessionFactory

WORKER = Path(__file__).with_name("redis_worker.py")
SECRET = "whsec_test"  # the emulator signs Get3W v3 callbacks with this
# Callbacks come within milliseconds: no safety-net poll within a test's time.
PATIENT = PollSettings(first_poll=0.02, min_interval=0.005, max_interval=0.1, webhook_unknown_wait=30.0)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


class RedisServer:
    """A throwaway redis-server on a loopback port: no persistence, stopped after use."""

    def __init__(self, executable: str) -> None:
        self.executable = executable
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self._process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 10.0) -> None:
        # No persistence: nothing written to disk, nothing left behind.
        options = ["--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        self._process = subprocess.Popen(
            [self.executable, *options],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + timeout
        while not self.answers():
            if time.monotonic() > deadline or self._process.poll() is not None:
                self.stop()
                raise RuntimeError(f"redis-server did not come up on port {self.port}")
            time.sleep(0.02)

    def answers(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as connection:
                connection.sendall(b"PING\r\n")
                return connection.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is not None:
            process.terminate()
            process.wait(10)


def redis_executable() -> str:
    """redis-server's path; skip without it, except in CI, whose .ci/run installs it."""
    executable = shutil.which("redis-server")
    if executable is None:
        if os.environ.get("CI"):
            pytest.fail("redis-server is missing in CI: .ci/run should have installed it")
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    return executable


# The redis_url and namespace fixtures are in conftest.py (test_redis_capacity.py uses them too).


async def eventually(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    """Wait until ``condition()`` holds (news relayed through Redis takes a moment)."""
    for _ in range(int(timeout / 0.01)):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not met in time")


def fingerprint(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()[:16]


# The limit across processes.


async def run_workers(
    workers: int, *options: str, timeout: float = 60, before_go: Callable[[], Awaitable[object]] | None = None
) -> list[dict[str, Any]]:
    """``workers`` worker processes (forked by one redis_worker.py), started together; their reports.

    ``before_go`` is awaited while the workers start (e.g. the server they will use).
    """
    child = await asyncio.create_subprocess_exec(
        sys.executable,
        str(WORKER),
        *("--workers", str(workers), *options),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        start_new_session=True,  # its own process group: the forked workers end with it
    )
    assert child.stdin is not None and child.stdout is not None
    try:
        if before_go is not None:
            await before_go()
        for _ in range(workers):
            assert await asyncio.wait_for(child.stdout.readline(), 30) == b"ready\n"
        child.stdin.close()  # all start together
        lines = [await asyncio.wait_for(child.stdout.readline(), timeout) for _ in range(workers)]
        assert await child.wait() == 0
        return [json.loads(line) for line in lines]
    finally:
        if child.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(child.pid, signal.SIGKILL)
            await child.wait()


@pytest.mark.alone
async def test_three_processes_share_one_keys_limit(redis_url: str, namespace: str) -> None:
    # More creates than one second's worth, so the busiest second is measured, not the total; at
    # 20/s a worker may be late by up to 50 ms (a loaded machine) before two creates bunch.
    rate, jobs, workers = 20.0, 12, 3
    # The emulator in its own process, as a provider: in this one, a loaded test process would
    # bunch the arrivals that the workers sent evenly.
    # It starts while the workers do (its port chosen first), not before them.
    port = free_port()
    emulator = EmulatorProcess("--dh3-qps", str(rate), "--duration", "0.2", "--no-record", f"--port={port}")
    try:
        options = ("--redis", redis_url, "--namespace", namespace, "--emulator", f"http://127.0.0.1:{port}")
        options += ("--key", KEYS["dh3"], "--rate", str(rate), "--jobs", str(jobs))
        reports = await run_workers(workers, *options, timeout=40, before_go=emulator.start)
        stats = await emulator.stats()
    finally:
        await emulator.close()
    total = jobs * workers
    assert total > 1.5 * rate
    assert stats["creates"]["dh3"] == total and stats["create_requests"]["dh3"] == total
    assert stats["rate_limited"].get("dh3", 0) == 0
    assert stats["max_creates_in_1s"]["dh3"] <= rate
    assert sum(report["retries"] for report in reports) == 0
    seen = (total - 1) / (stats["last_create_at"]["dh3"] - stats["first_create_at"]["dh3"])
    assert seen >= 0.95 * rate, f"combined rate {seen:.2f}/s"
    # Fair: every worker got its turns all along, so all finish within a few slots of each other.
    lasts = [report["last"] for report in reports]
    assert max(lasts) - min(lasts) < 1.0


async def test_schedule_is_keyed_by_a_hash_of_the_api_key_and_expires(redis_url: str, namespace: str) -> None:
    backend = RedisBackend(redis_url, namespace=namespace)
    async with AsyncSession(api_keys={"dh3": KEYS["dh3"]}, limiter_backend=backend) as session:
        await session.dh3.limiter.acquire()
        keys = [key.decode() async for key in backend.redis.scan_iter(f"{namespace}:*")]
        assert keys == [f"{namespace}:limit:dh3:{fingerprint(KEYS['dh3'])}"]
        assert 0 < await backend.redis.pttl(keys[0]) <= 61_000
        dumped = repr(await backend.redis.hgetall(keys[0]))
    assert KEYS["dh3"] not in dumped and KEYS["dh3"] not in repr(backend)


async def test_waiters_sleep_until_their_slot_and_take_turns(redis_url: str, namespace: str) -> None:
    backends = [RedisBackend(redis_url, namespace=namespace) for _ in range(2)]
    limiters = [backend.limiter("dh3", "k", 50.0, 0.0, 60.0) for backend in backends]
    await backends[0].redis.config_resetstat()
    loop = asyncio.get_running_loop()
    started = loop.time()
    order: list[int] = []

    async def take(which: int) -> None:
        await limiters[which].acquire()
        order.append(which)

    await asyncio.gather(*(take(i % 2) for i in range(20)))
    assert loop.time() - started >= 19 * 0.02 * 0.95  # 50/s across both "processes"
    assert order.count(0) == order.count(1) == 10
    assert max(order[:10].count(0), order[:10].count(1)) <= 6  # turns, not one after the other
    calls = await backends[0].redis.info("commandstats")
    reservations = sum(v["calls"] for k, v in calls.items() if k in ("cmdstat_evalsha", "cmdstat_eval"))
    assert reservations <= 22  # one script call per create (+ loading the script): no polling
    for backend in backends:
        await backend.close()


async def test_a_429_slows_every_process_and_holds_the_schedule(redis_url: str, namespace: str) -> None:
    one_backend, other_backend = (RedisBackend(redis_url, namespace=namespace) for _ in range(2))
    one, other = (backend.limiter("dh3", "k", 10.0, 0.0, 60.0) for backend in (one_backend, other_backend))
    await one.acquire()
    one.penalize(0.4)
    one.penalize(0.4)  # the same overload seen twice within a second halves the pace once
    await asyncio.sleep(0.05)
    loop = asyncio.get_running_loop()
    started = loop.time()
    await other.acquire()
    assert loop.time() - started >= 0.3  # Retry-After holds the other process too
    assert other.current_rate == pytest.approx(5.0)
    for _ in range(15):  # successes anywhere bring the shared pace back (1.05 ** 15 > 2)
        other.reward()
    await other.acquire()
    assert other.current_rate == pytest.approx(10.0)
    await one_backend.close()
    await other_backend.close()


async def test_429_through_the_engine_is_shared(
    redis_url: str, namespace: str, make_session: SessionFactory, emulator: Emulator
) -> None:
    a, b = (
        make_session(rate_limits={"dh3": 50.0}, limiter_backend=RedisBackend(redis_url, namespace=namespace))
        for _ in range(2)
    )
    emulator.script("dh3", "create", "429")
    handle = await a.dh3.submit(MODELS["dh3"], prompt="a fox")
    assert handle.retries == 0 and (await handle).ok  # a refusal, not a retry
    assert emulator.stats.create_requests["dh3"] == 2
    await b.dh3.submit(MODELS["dh3"], prompt="a fox")
    rate = b.dh3.limiter.current_rate
    assert rate is not None and rate < 50.0


# Redis away: loud, or a local share.


@pytest.fixture
def stopped_redis() -> str:
    """The URL of a redis-server on a loopback port where none runs: connections are refused."""
    return RedisServer(redis_executable()).url


async def test_unreachable_redis_fails_loudly_and_sends_nothing(
    stopped_redis: str, make_session: SessionFactory, emulator: Emulator
) -> None:
    session = make_session(rate_limits={"dh3": 5.0}, limiter_backend=RedisBackend(stopped_redis))
    with pytest.raises(BackendUnavailableError, match="dh3 create limit"):
        await session.dh3.submit(MODELS["dh3"], prompt="a fox")
    session.webhooks.public_url = "http://127.0.0.1:9"
    with pytest.raises(BackendUnavailableError, match="webhook"):
        await session.get3w.submit(MODELS["get3w"], prompt="a fox", webhook=True)
    assert emulator.stats.create_requests["dh3"] == emulator.stats.create_requests["get3w"] == 0


async def test_fallback_share_paces_locally_then_returns_to_redis(
    make_session: SessionFactory,
    emulator: Emulator,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(redis_limit, "RETRY_REDIS_AFTER", 0.15)
    server = RedisServer(redis_executable())  # not started yet: Redis is away
    backend = RedisBackend(server.url, fallback_share=0.5)
    session = make_session(rate_limits={"dh3": 40.0}, limiter_backend=backend)
    loop = asyncio.get_running_loop()
    started = loop.time()
    with caplog.at_level(logging.WARNING, logger="image_gen_async"):
        handles = await asyncio.gather(
            *(session.dh3.submit(MODELS["dh3"], prompt=f"fox {i}") for i in range(6))
        )
        assert loop.time() - started >= 5 * 0.05  # 20/s: half the limit, never unlimited
        assert session.dh3.limiter.current_rate == pytest.approx(20.0)
        assert len([r for r in caplog.records if "pacing this process" in r.message]) == 1
        server.start()
        try:
            await asyncio.sleep(0.2)  # past the time to try Redis again
            await session.dh3.submit(MODELS["dh3"], prompt="back on the shared limit")
            assert any("answers again" in r.message for r in caplog.records)
            assert await backend.redis.exists(f"image_gen_async:limit:dh3:{fingerprint(KEYS['dh3'])}")
        finally:
            await session.close()
            server.stop()
    assert all([(await handle).ok for handle in handles])


def test_importing_without_redis_py_works() -> None:
    code = (
        "import sys; sys.modules['redis'] = None\n"
        "import image_gen_async as m\n"
        "try:\n    m.RedisBackend()\nexcept m.ConfigurationError as e:\n    print('needs:', e)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "image-gen-async[redis]" in done.stdout


# Webhook fan-in.


@pytest.mark.parametrize("name", ["get3w", "get3w_v3", "dh3"])
async def test_callback_reaching_another_instance_resolves_the_handle(
    redis_url: str, namespace: str, make_session: SessionFactory, emulator: Emulator, name: str
) -> None:
    emulator.config.webhook_duplicate = 1.0  # every callback is delivered twice
    backend_a, backend_b = (RedisBackend(redis_url, namespace=namespace) for _ in range(2))
    a, b = (
        make_session(polling=PATIENT, webhook_secrets={"get3w_v3": SECRET}, limiter_backend=backend)
        for backend in (backend_a, backend_b)
    )
    a.webhooks.public_url = await b.webhooks.listen()  # the provider only ever calls B
    handles = await asyncio.gather(
        *(a.client(name).submit(MODELS[name], prompt=f"fox {i}", webhook=True) for i in range(20))
    )
    results = await asyncio.gather(*handles)
    await emulator.wait_webhooks()
    sa, sb = a.webhooks.stats, b.webhooks.stats
    await eventually(lambda: sa.duplicates + sb.duplicates >= 20)  # the last relayed copies reach A
    assert all(r.ok for r in results)
    assert sum(h.polls for h in handles) == 0 and emulator.stats.polls[name] == 0
    assert emulator.stats.webhooks_sent[name] == 40  # every copy acknowledged
    assert sb.received == 40 and sb.resolved == 0 and sb.relayed >= 20
    assert sa.received == 0 and sa.resolved == 20
    assert sa.duplicates + sb.duplicates == 20  # each second copy counted once, somewhere
    assert a.webhooks.url_for(name).rsplit("/", 1)[1] == b.webhooks.url_for(name).rsplit("/", 1)[1]
    # Settled markers: a late replay to B is answered as a duplicate without reaching A.
    for handle in handles:
        assert await backend_b.redis.exists(f"{namespace}:settled:{name}:{handle.task_id}")
    replay = json.dumps(results[0].raw).encode()
    signature = hmac.new(SECRET.encode(), replay, hashlib.sha256).hexdigest()
    token = b.webhooks.url_for(name).rsplit("/", 1)[1]
    status, answer = await b.webhooks.handle(name, replay, {"X-Get3W-Signature": signature}, token=token)
    assert status == 200 and json.loads(answer)["duplicate"] is True
    assert sb.duplicates + sa.duplicates == 21 and sb.relayed <= 40


async def test_relay_listens_again_after_redis_restarts(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(redis_relay, "RECONNECT_PAUSE", 0.05)
    server = RedisServer(redis_executable())
    server.start()
    listener, sender = RedisBackend(server.url), RedisBackend(server.url)
    heard: list[str] = []
    try:
        await listener.webhook_relay().subscribe(lambda client, task_id, payload: heard.append(task_id))
        server.stop()
        await asyncio.sleep(0.2)
        server.start()
        for attempt in range(100):  # pub/sub keeps nothing: publish until the listener is back
            await sender.webhook_relay().publish("dh3", f"task-{attempt}", {})
            await asyncio.sleep(0.05)
            if heard:
                break
        assert heard
    finally:
        await listener.close()
        await sender.close()
        server.stop()


@pytest.fixture
async def slow_answers(emulator: Emulator) -> AsyncIterator[str]:
    """A proxy to the emulator that holds every create's answer back 0.3 s: callbacks win."""
    async with aiohttp.ClientSession() as http:

        async def forward(request: web.Request) -> web.Response:
            headers = {k: v for k, v in request.headers.items() if k in ("Authorization", "Content-Type")}
            async with http.request(
                request.method, emulator.url + request.path_qs, data=await request.read(), headers=headers
            ) as answer:
                body = await answer.read()
            if request.method == "POST":
                await asyncio.sleep(0.3)
            return web.Response(status=answer.status, body=body, content_type=answer.content_type)

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", forward)
        runner = web.AppRunner(app)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        try:
            yield f"http://127.0.0.1:{runner.addresses[0][1]}"
        finally:
            await runner.cleanup()


async def test_callback_before_the_create_answer_on_another_instance(
    redis_url: str, namespace: str, make_session: SessionFactory, emulator: Emulator, slow_answers: str
) -> None:
    a, b = (
        make_session(
            base_urls={"dh3": slow_answers},
            polling=PATIENT,
            limiter_backend=RedisBackend(redis_url, namespace=namespace, webhook_token="shared-token-123"),
        )
        for _ in range(2)
    )
    a.webhooks.public_url = await b.webhooks.listen()
    handles = await asyncio.gather(
        *(a.dh3.submit(MODELS["dh3"], prompt=f"fast fox {i}", webhook=True) for i in range(5))
    )
    # The callbacks came through B while A still waited for the creates' answers.
    assert all(h.done() and h.polls == 0 for h in handles)
    assert all([(await h).ok for h in handles])
    assert b.webhooks.stats.relayed == 5 and a.webhooks.stats.resolved == 5
    assert a.webhooks.url_for("dh3").endswith("/dh3/shared-token-123")
    async with aiohttp.ClientSession() as http:
        forged = b.webhooks.url_for("dh3").replace("shared-token-123", "guessed")
        async with http.post(forged, data=b"{}") as answer:
            assert answer.status == 401
