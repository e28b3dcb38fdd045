"""The webhook token is a secret: never in an exception message, a log line or a repr."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from image_gen_async import (
    AsyncSession,
    ConfigurationError,
    ImageGenError,
    PollSettings,
    SubmitUncertainError,
    TaskFailedError,
)
from image_gen_async.testing import Emulator
from image_gen_async.webhooks import masked_url

from .conftest import CLIENTS, MODELS, SessionFactory

SAFETY_NET = PollSettings(
    first_poll=0.02, min_interval=0.005, max_interval=0.1, webhook_grace=0.2, webhook_unknown_wait=0.3
)
WEBHOOK_CLIENTS = ("get3w", "get3w_v3", "dh3")


def token_of(session: AsyncSession) -> str:
    return session.webhooks.url_for("dh3").rsplit("/", 1)[1]


def test_masked_url() -> None:
    assert masked_url("http://h.test:8/hooks/dh3/s3cr3t") == "http://h.test:8/hooks/dh3/***"
    assert masked_url("s3cr3t") == "***"


async def test_the_receiver_never_shows_its_token(
    make_session: SessionFactory, emulator: Emulator, caplog: pytest.LogCaptureFixture
) -> None:
    """Every refusal and resolution the receiver logs, and its messages and reprs, with the token masked."""
    caplog.set_level(logging.DEBUG)
    emulator.config.webhook_drop = 0.5  # some by callback, some by the polling safety net
    session = make_session(polling=SAFETY_NET, webhook_secrets={"get3w_v3": "whsec_test"})
    session.webhooks.read_timeout = 0.2
    await session.webhooks.listen()
    token = token_of(session)
    handles = await asyncio.gather(
        *(session.client(name).submit(MODELS[name], prompt="a fox", webhook=True) for name in WEBHOOK_CLIENTS)
    )
    await asyncio.gather(*handles)
    emulator.config.duration = 1.0  # [slow]: 10 s, so the posts below come before its own callback
    slow = await session.dh3.submit("nano-banana-pro", prompt="long one [slow]", webhook=True)
    url = session.webhooks.url_for("dh3")
    echo = f"could not reach {url}"  # a provider's failure text that quotes the callback URL
    output = {"task_id": slow.task_id, "status": "fail", "err_msg": echo}
    failed = {"code": 200, "message": "Ok", "nano_banana_pro_output": output}
    async with aiohttp.ClientSession() as http:
        for target, body, headers in [
            (url.replace(token, "forged"), b"{}", {}),
            (url, b"not json", {}),
            (url, b"x" * (2 << 20), {}),
            (session.webhooks.url_for("get3w_v3"), b'{"id": "x"}', {"X-Get3W-Signature": "0" * 64}),
            (url, json.dumps(failed).encode(), {}),
        ]:
            async with http.post(target, data=body, headers=headers) as answer:
                await answer.read()
    with pytest.raises(TaskFailedError) as caught:
        await slow
    assert "/dh3/***" in str(caught.value) and token not in caught.value.result.error
    # A body that never comes (408), on a raw connection.
    port = int(str(session.webhooks.public_url).rsplit(":", 1)[1])
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"POST /dh3/{token} HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n{{".encode())
    await writer.drain()
    assert b" 408 " in await reader.readline()
    writer.close()
    with pytest.raises(ConfigurationError) as listening:
        await session.webhooks.listen()
    shown = [caplog.text, str(listening.value), repr(session.webhooks), repr(session.webhooks.stats)]
    shown += [repr(handle) for handle in (*handles, slow)]
    assert session.webhooks.stats.timed_out == 1 and session.webhooks.stats.rejected == 2
    assert all(token not in text for text in shown)


# What the engine shows of a create's answer (its error text, a redirect's Location, a
# failed task's text) quotes whatever the provider echoed, the callback URL included.


@pytest.fixture
async def echoing(make_session: SessionFactory) -> AsyncIterator[tuple[AsyncSession, dict[str, str]]]:
    """A session on a server that quotes each request (URL and body) back in the way ``mode`` says."""
    mode = {"mode": "drop", "callback": ""}

    async def route(request: web.Request) -> web.StreamResponse:
        whole = f"{request.url} {await request.text()}"
        if mode["mode"] == "error":
            return web.json_response({"code": 400, "message": f"bad request: {whole}"}, status=400)
        if mode["mode"] == "redirect":
            raise web.HTTPFound(location=f"http://elsewhere.test/?u={whole}")
        if mode["mode"] == "fail":
            if request.method == "POST":
                mode["callback"] = whole
                return web.json_response({"code": 200, "message": "Ok", "task_id": "t-1"})
            output = {"task_id": "t-1", "status": "fail", "err_msg": f"callback failed: {mode['callback']}"}
            return web.json_response({"code": 200, "message": "Ok", "nano_banana_pro_output": output})
        assert request.transport is not None
        request.transport.close()  # read, then gone: the create may have been made
        return web.Response()

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", route)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    origin = f"http://127.0.0.1:{runner.addresses[0][1]}"
    session = make_session(polling=SAFETY_NET, base_urls=dict.fromkeys(CLIENTS, origin), create_retries=0)
    await session.webhooks.listen()
    try:
        yield session, mode
    finally:
        await runner.cleanup()


async def _error_of(session: AsyncSession, name: str) -> ImageGenError:
    with pytest.raises(ImageGenError) as caught:
        handle = await session.client(name).submit(MODELS[name], prompt="a fox", webhook=True)
        await handle
    return caught.value


def _shown(error: ImageGenError) -> list[str]:
    return [str(error), repr(error), repr(getattr(error, "request_body", None))]


@pytest.mark.parametrize("name", WEBHOOK_CLIENTS)
async def test_an_uncertain_create_does_not_show_the_token(
    echoing: tuple[AsyncSession, dict[str, Any]], caplog: pytest.LogCaptureFixture, name: str
) -> None:
    session, _ = echoing
    caplog.set_level(logging.DEBUG)
    error = await _error_of(session, name)
    assert isinstance(error, SubmitUncertainError)
    assert all(token_of(session) not in text for text in [*_shown(error), caplog.text])


@pytest.mark.parametrize(("mode", "name"), [("error", "dh3"), ("error", "get3w"), ("redirect", "get3w_v3"),
                                            ("fail", "dh3")])
async def test_an_answer_quoting_the_callback_url_does_not_show_the_token(
    echoing: tuple[AsyncSession, dict[str, Any]], caplog: pytest.LogCaptureFixture, mode: str, name: str
) -> None:
    session, modes = echoing
    modes["mode"] = mode
    caplog.set_level(logging.DEBUG)
    error = await _error_of(session, name)
    assert all(token_of(session) not in text for text in [*_shown(error), caplog.text])
