"""Webhook mode over real sockets: callbacks resolve handles once; forgeries and losses are handled."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web
from yarl import URL

from image_gen_async import (
    AsyncSession,
    ConfigurationError,
    InvalidRequestError,
    PollSettings,
    TaskFailedError,
    TaskStatus,
)
from image_gen_async.testing import Emulator

from .conftest import MODELS, SessionFactory

WEBHOOK_CLIENTS = ("get3w", "get3w_v3", "dh3")
SECRET = "whsec_test"  # the emulator signs v3 callbacks with this by default
# Callbacks come within milliseconds; the polling safety net starts after these.
# For callbacks that never resolve (dropped, forged): the safety-net poll comes soon.
SAFETY_NET = PollSettings(
    first_poll=0.02, min_interval=0.005, max_interval=0.1, webhook_grace=0.1, webhook_unknown_wait=0.15
)
PATIENT = PollSettings(first_poll=0.02, min_interval=0.005, max_interval=0.1, webhook_unknown_wait=30.0)


@pytest.fixture
async def hooked(make_session: SessionFactory) -> AsyncIterator[AsyncSession]:
    """A session whose receiver listens on loopback; no safety-net poll within a test's time."""
    session = make_session(polling=PATIENT, webhook_secrets={"get3w_v3": SECRET})
    await session.webhooks.listen("127.0.0.1", 0)
    yield session


def polls_of(emulator: Emulator, name: str) -> int:
    return emulator.stats.polls[name]


@pytest.mark.parametrize("name", WEBHOOK_CLIENTS)
async def test_100_jobs_resolved_by_callback_with_no_polls(
    hooked: AsyncSession, emulator: Emulator, name: str
) -> None:
    handles = await asyncio.gather(
        *(hooked.client(name).submit(MODELS[name], prompt=f"fox {i}", webhook=True) for i in range(100))
    )
    results = await asyncio.gather(*handles)
    assert all(r.status is TaskStatus.COMPLETED and r.urls for r in results)
    assert sum(h.polls for h in handles) == 0 and polls_of(emulator, name) == 0
    assert emulator.stats.creates[name] == 100
    assert hooked.webhooks.stats.resolved == 100
    # The provider was told a per-client URL carrying the session's token.
    webhooks = {task.webhook for task in emulator.tasks.values()}
    assert len(webhooks) == 1
    (url,) = webhooks
    assert url is not None and url.startswith(f"{hooked.webhooks.public_url}/{name}/")
    assert len(url.rsplit("/", 1)[1]) >= 24


async def test_failed_task_by_callback(hooked: AsyncSession) -> None:
    handle = await hooked.dh3.submit("nano-banana-pro", prompt="bad [fail]", webhook=True)
    with pytest.raises(TaskFailedError):
        await handle
    assert handle.polls == 0


@pytest.mark.parametrize("name", WEBHOOK_CLIENTS)
async def test_duplicated_deliveries_resolve_once(
    hooked: AsyncSession, emulator: Emulator, name: str
) -> None:
    emulator.config.webhook_duplicate = 1.0
    handles = await asyncio.gather(
        *(hooked.client(name).submit(MODELS[name], prompt=f"fox {i}", webhook=True) for i in range(20))
    )
    await asyncio.gather(*handles)
    await emulator.wait_webhooks()
    stats = hooked.webhooks.stats
    assert stats.resolved == 20 and stats.duplicates == 20
    assert emulator.stats.webhooks_sent[name] == 40  # every copy was acknowledged, so no retries


async def test_forged_signature_is_refused(make_session: SessionFactory, emulator: Emulator) -> None:
    session = make_session(polling=SAFETY_NET, webhook_secrets={"get3w_v3": "a-different-secret"})
    await session.webhooks.listen()
    handle = await session.get3w_v3.submit(MODELS["get3w_v3"], prompt="a fox", webhook=True)
    result = await handle  # the signed callback fails verification, polling finds the result
    assert result.ok and handle.polls >= 1
    await emulator.wait_webhooks()
    assert session.webhooks.stats.rejected >= 1 and session.webhooks.stats.resolved == 0


async def test_wrong_token_and_malformed_bodies(hooked: AsyncSession, emulator: Emulator) -> None:
    emulator.config.duration = 0.05  # [slow]: 0.5 s, longer than the posts below on a loaded machine
    handle = await hooked.dh3.submit("nano-banana-pro", prompt="long one [slow]", webhook=True)
    good_url = hooked.webhooks.url_for("dh3")
    forged_url = good_url.rsplit("/", 1)[0] + "/not-the-token"
    body = {
        "code": 200,
        "message": "Ok",
        "nano_banana_pro_output": {"task_id": handle.task_id, "status": "fail", "err_msg": "forged"},
    }
    async with aiohttp.ClientSession() as http:

        async def post(url: str, data: bytes, **headers: str) -> int:
            async with http.post(url, data=data, headers=headers) as answer:
                return answer.status

        assert await post(forged_url, json.dumps(body).encode()) == 401
        assert await post(good_url, b"<html>not json</html>") == 400
        assert await post(good_url, json.dumps({"code": 200}).encode()) == 400
        assert await post(good_url, b"x" * (2 * 1024 * 1024)) == 413
        assert await post(hooked.webhooks.url_for("dh3").replace("/dh3/", "/nope/"), b"{}") == 404
        unknown = dict(body, nano_banana_pro_output={"task_id": "someone-else", "status": "success"})
        assert await post(good_url, json.dumps(unknown).encode()) == 200
    assert not handle.done()  # nothing forged or malformed resolved it
    stats = hooked.webhooks.stats
    assert (stats.rejected, stats.malformed, stats.too_large, stats.unknown) == (2, 2, 1, 1)
    assert (await handle).ok  # the real callback still resolves it
    assert handle.polls == 0


@pytest.mark.parametrize("name", WEBHOOK_CLIENTS)
async def test_dropped_callbacks_are_recovered_by_polling(
    make_session: SessionFactory, emulator: Emulator, name: str
) -> None:
    emulator.config.webhook_drop = 1.0
    session = make_session(polling=SAFETY_NET, webhook_secrets={"get3w_v3": SECRET})
    await session.webhooks.listen()
    handles = await asyncio.gather(
        *(session.client(name).submit(MODELS[name], prompt=f"fox {i}", webhook=True) for i in range(10))
    )
    results = await asyncio.gather(*handles)
    assert all(r.ok for r in results)
    assert all(h.polls >= 1 for h in handles)
    assert session.webhooks.stats.resolved == 0


async def test_dh3_callback_retries_until_acknowledged(
    make_session: SessionFactory, emulator: Emulator
) -> None:
    """A receiver that fails twice gets dh3's retries (up to 3) and still resolves the job."""
    session = make_session(polling=PATIENT)
    failures_left = 2

    async def flaky(request: web.Request) -> web.StreamResponse:
        nonlocal failures_left
        if failures_left:
            failures_left -= 1
            return web.Response(status=503)
        return await session.webhooks.aiohttp_handler(request)

    app = web.Application()
    app.router.add_post("/{client}/{token}", flaky)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        session.webhooks.public_url = f"http://127.0.0.1:{runner.addresses[0][1]}"
        handle = await session.dh3.submit("nano-banana-pro", prompt="a fox", webhook=True)
        assert (await handle).ok and handle.polls == 0
        assert emulator.stats.webhook_attempts["dh3"] == 3
    finally:
        await runner.cleanup()


async def test_webhook_option_errors(hooked: AsyncSession, make_session: SessionFactory) -> None:
    with pytest.raises(InvalidRequestError, match="no webhook mode"):
        await hooked.nananobanana.submit("nano-banana", prompt="a cat", webhook=True)
    with pytest.raises(InvalidRequestError, match="not both"):
        await hooked.dh3.submit("nano-banana-pro", prompt="a cat", webhook=True, webhook_url="https://x.test")
    bare = make_session()
    with pytest.raises(ConfigurationError, match="listen"):
        await bare.dh3.submit("nano-banana-pro", prompt="a cat", webhook=True)


async def test_mounted_in_an_aiohttp_app(make_session: SessionFactory, emulator: Emulator) -> None:
    session = make_session(polling=PATIENT, webhook_secrets={"get3w_v3": SECRET})
    app = web.Application()
    app.add_subapp("/hooks/", session.webhooks.app())
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        port = runner.addresses[0][1]
        session.webhooks.public_url = f"http://127.0.0.1:{port}/hooks"
        handle = await session.get3w_v3.submit(MODELS["get3w_v3"], prompt="a fox", webhook=True)
        assert (await handle).ok and handle.polls == 0
    finally:
        await runner.cleanup()


async def test_signed_v3_callback_resolves(make_session: SessionFactory, emulator: Emulator) -> None:
    """A callback signed as Get3W documents (hex HMAC-SHA256 of the raw body) is accepted."""
    emulator.config.webhook_drop = 1.0  # we deliver it ourselves
    session = make_session(polling=PATIENT, webhook_secrets={"get3w_v3": "s3cret"})
    await session.webhooks.listen()
    handle = await session.get3w_v3.submit(MODELS["get3w_v3"], prompt="a fox", webhook=True)
    prediction = {
        "id": handle.task_id,
        "model": MODELS["get3w_v3"],
        "status": "completed",
        "outputs": ["https://o.test/1.png"],
    }
    body = json.dumps(prediction).encode()
    signature = hmac.new(b"s3cret", body, hashlib.sha256).hexdigest()
    url = session.webhooks.url_for("get3w_v3")
    async with aiohttp.ClientSession() as http:
        async with http.post(url, data=body, headers={"X-Get3W-Signature": "0" * 64}) as answer:
            assert answer.status == 401
        async with http.post(url, data=body, headers={"X-Get3W-Signature": signature}) as answer:
            assert answer.status == 200
    result = await handle
    assert result.urls == ("https://o.test/1.png",) and handle.polls == 0


async def test_a_callback_split_over_several_segments_is_read_whole(
    hooked: AsyncSession, emulator: Emulator
) -> None:
    emulator.config.duration = 1.0  # [slow]: 10 s, so the emulator's own callback never comes first
    handle = await hooked.dh3.submit("nano-banana-pro", prompt="long one [slow]", webhook=True)
    body = json.dumps(
        {
            "code": 200,
            "message": "Ok",
            "nano_banana_pro_output": {"task_id": handle.task_id, "status": "fail", "err_msg": "boom"},
        }
    ).encode()
    url = URL(hooked.webhooks.url_for("dh3"))
    reader, writer = await asyncio.open_connection(url.host, url.port)
    head = (
        f"POST {url.raw_path} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    writer.write(head.encode() + body[:20])
    await writer.drain()
    await asyncio.sleep(0.05)  # not a wait for anything: it makes the rest arrive as a second segment
    writer.write(body[20:])
    await writer.drain()
    status_line = await reader.readline()
    writer.close()
    assert b" 200 " in status_line
    with pytest.raises(TaskFailedError):
        await handle
