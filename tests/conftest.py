"""Shared fixtures: a real emulator on loopback and sessions pointed at it, on scaled-down time."""

from __future__ import annotations

import fcntl
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

import pytest
from aiohttp import web

from image_gen_async import AsyncSession, PollSettings
from image_gen_async.providers import EXAMPLE_MODELS
from image_gen_async.testing import Emulator, EmulatorConfig

CLIENTS = ("get3w", "get3w_v3", "dh3", "nananobanana")
MODELS = EXAMPLE_MODELS
KEYS = {name: f"sk-secret-{name}-0123456789" for name in CLIENTS}
FAST_POLLING = PollSettings(first_poll=0.02, min_interval=0.005, max_interval=0.1)
# What every test session shares: polling and retries on the emulator's scaled-down time.
FAST: dict[str, Any] = {"polling": FAST_POLLING, "retry_base": 0.01, "retry_cap": 0.05, "task_timeout": 20.0}

SessionFactory = Callable[..., AsyncSession]


@pytest.fixture(autouse=True)
def _alone_or_beside_others(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[None]:
    """A test marked ``alone`` (it times itself against a bound, or counts what load changes)
    runs while no other xdist worker runs a test; the others run side by side.

    Every test holds a shared lock on a file all workers see, an ``alone`` one the exclusive
    lock; each takes a turnstile first, so a waiting ``alone`` test is not passed by a stream
    of shared ones.
    """
    root = Path(tmp_path_factory.getbasetemp()).parent  # shared by the workers of one run
    alone = request.node.get_closest_marker("alone") is not None
    with open(root / "tests.turnstile", "a") as turnstile, open(root / "tests.lock", "a") as lock:
        fcntl.flock(turnstile, fcntl.LOCK_EX)
        fcntl.flock(lock, fcntl.LOCK_EX if alone else fcntl.LOCK_SH)
        fcntl.flock(turnstile, fcntl.LOCK_UN)
        yield


@pytest.fixture
async def emulator() -> AsyncIterator[Emulator]:
    config = EmulatorConfig(duration=0.02, dh3_qps=None, api_keys=dict(KEYS))
    async with Emulator(config) as emu:
        yield emu


@pytest.fixture
async def emu() -> AsyncIterator[Emulator]:
    """An emulator taking any key, so that several keys of one provider are several accounts
    (the router tests'; modules with an ``emu`` of their own use theirs)."""
    async with Emulator(EmulatorConfig(duration=0.05, dh3_qps=None)) as emulator:
        yield emulator


@pytest.fixture
async def sessions() -> AsyncIterator[list[AsyncSession]]:
    """Sessions a test opens (``router_helpers.opened``), closed after it."""
    made: list[AsyncSession] = []
    yield made
    for session in made:
        await session.close()


@pytest.fixture
async def make_session(emulator: Emulator) -> AsyncIterator[SessionFactory]:
    """Sessions on the emulator with fast polling and retries; closed after the test."""
    made: list[AsyncSession] = []

    def make(**overrides: Any) -> AsyncSession:
        options: dict[str, Any] = {
            "api_keys": KEYS,
            "base_urls": dict.fromkeys(CLIENTS, emulator.url),
            "rate_limits": {"dh3": None},
            **FAST,
        } | overrides
        session = AsyncSession(**options)
        made.append(session)
        return session

    yield make
    for session in made:
        await session.close()


@pytest.fixture
async def session(make_session: SessionFactory) -> AsyncSession:
    return make_session()


# A small server of our own for answers the emulator never gives: wrong shapes.

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@pytest.fixture
async def odd_server() -> AsyncIterator[Callable[[dict[str, Handler]], Awaitable[str]]]:
    runners: list[web.AppRunner] = []

    async def serve(routes: dict[str, Handler]) -> str:
        app = web.Application()
        for route, handler in routes.items():
            method, path = route.split(" ", 1)
            app.router.add_route(method, path, _as_coroutine_function(handler))
        runner = web.AppRunner(app, shutdown_timeout=0.1)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        runners.append(runner)
        port = runner.addresses[0][1]
        return f"http://127.0.0.1:{port}"

    yield serve
    for runner in runners:
        await runner.cleanup()


class Routes(Protocol):
    """A tiny server of a test's own: its routes, ``"METHOD /path" -> handler``."""

    def routes(self) -> dict[str, Handler]: ...


ServerSession = Callable[..., Awaitable[AsyncSession]]


@pytest.fixture
async def server_session(
    odd_server: Callable[[dict[str, Handler]], Awaitable[str]],
) -> AsyncIterator[ServerSession]:
    """``await server_session(server, client="nananobanana", **options)``: ``server`` served on
    loopback and a session whose ``client`` points at it, fast polling and retries."""
    sessions: list[AsyncSession] = []

    async def make(server: Routes, client: str = "nananobanana", **options: Any) -> AsyncSession:
        url = await odd_server(server.routes())
        settings: dict[str, Any] = {"api_keys": KEYS, "base_urls": {client: url}, **FAST} | options
        session = AsyncSession(**settings)
        sessions.append(session)
        return session

    yield make
    for session in sessions:
        await session.close()


def _as_coroutine_function(handler: Handler) -> Handler:
    """aiohttp wants ``async def`` handlers; a callable object is wrapped in one."""

    async def handle(request: web.Request) -> web.StreamResponse:
        return await handler(request)

    return handle


def json_answer(body: Any, status: int = 200) -> Handler:
    async def handler(request: web.Request) -> web.Response:
        return web.json_response(body, status=status)

    return handler


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    """A real redis-server on a loopback port, for this module's tests."""
    from .test_redis import RedisServer, redis_executable

    server = RedisServer(redis_executable())
    server.start()
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture
def namespace() -> str:
    """A fresh namespace per test, so tests on one server never share a schedule."""
    return f"test-{uuid.uuid4().hex[:8]}"
