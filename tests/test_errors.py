"""Errors, retries and the never-pay-twice rule, against real faults on real sockets."""

from __future__ import annotations

import asyncio
import logging
import socket
from typing import Any

import pytest
from aiohttp import web

from image_gen_async import (
    APIError,
    AsyncSession,
    AuthenticationError,
    ConfigurationError,
    ImageGenError,
    InvalidRequestError,
    NotFoundError,
    ProtocolError,
    RateLimitError,
    ServerError,
    SubmitUncertainError,
    TaskStatus,
    TaskTimeoutError,
    TransportError,
)
from image_gen_async.testing import Emulator, Faults

from .conftest import CLIENTS, FAST_POLLING, KEYS, MODELS, SessionFactory, json_answer


@pytest.mark.parametrize("name", CLIENTS)
async def test_create_429_is_waited_out_uncounted(
    make_session: SessionFactory, emulator: Emulator, name: str
) -> None:
    """A 429 made nothing: the job asks again, and no retry is counted against it.

    dh3's and nananobanana's 429 is a rate (the limiter slows down); Get3W's is its documented
    "too many concurrent tasks" (the capacity gate counts the refusal).
    """
    emulator.config.faults = Faults(retry_after=0.05)
    session = make_session(rate_limits={name: 1000.0})
    emulator.script(name, "create", "429", times=2)
    handle = await session.client(name).submit(MODELS[name], prompt="a fox")
    await handle
    assert handle.retries == 0
    assert emulator.stats.create_requests[name] == 3
    assert emulator.stats.creates[name] == 1
    client = session.client(name)
    if name.startswith("get3w"):
        assert client.capacity.refusals == 2
    else:
        assert client.limiter.current_rate is not None and client.limiter.current_rate < 1000.0


async def test_create_429_gives_up_with_rate_limit_error_at_the_deadline(
    make_session: SessionFactory, emulator: Emulator
) -> None:
    session = make_session(create_retries=0)
    emulator.config.faults = Faults(retry_after=0.01)
    emulator.script("dh3", "create", "429", times=1000)
    with pytest.raises(RateLimitError) as caught:
        await session.dh3.submit("nano-banana-pro", prompt="a fox", timeout=0.3)
    assert caught.value.status == 429 and caught.value.retry_after == pytest.approx(0.01)
    assert emulator.stats.create_requests["dh3"] >= 2  # create_retries=0 does not bound refusals
    assert emulator.stats.creates["dh3"] == 0


@pytest.mark.parametrize("name", CLIENTS)
async def test_create_503_without_task_is_waited_out(
    session: AsyncSession, emulator: Emulator, name: str
) -> None:
    emulator.config.faults = Faults(retry_after=None)
    emulator.script(name, "create", "503", times=2)
    handle = await session.client(name).submit(MODELS[name], prompt="a fox")
    await handle
    assert handle.retries == 0 and session._engine.refusals == 2  # refusals, not retries
    assert emulator.stats.create_requests[name] == 3 and emulator.stats.creates[name] == 1


@pytest.mark.parametrize("fault", ["500", "502", "drop_before", "drop_after", "non_json"])
@pytest.mark.parametrize("name", CLIENTS)
async def test_ambiguous_create_is_never_retried(
    session: AsyncSession, emulator: Emulator, name: str, fault: str
) -> None:
    emulator.script(name, "create", fault)
    with pytest.raises(SubmitUncertainError) as caught:
        await session.client(name).submit(MODELS[name], prompt="a fox")
    error = caught.value
    assert error.provider == name and error.model == MODELS[name]
    assert error.request_body is not None
    assert emulator.stats.create_requests[name] == 1
    assert KEYS[name] not in str(error) and KEYS[name] not in repr(error)


async def test_connect_error_is_retried_then_reported(make_session: SessionFactory) -> None:
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    session = make_session(base_urls={"dh3": f"http://127.0.0.1:{port}"}, create_retries=2)
    with pytest.raises(TransportError) as caught:
        await session.dh3.submit("nano-banana-pro", prompt="a fox")
    assert "dh3 POST /api/v1/task/create" in str(caught.value)
    assert "cannot connect" in str(caught.value)


async def test_connect_error_then_success_is_retried(
    make_session: SessionFactory, emulator: Emulator
) -> None:
    """The create is retried when the connection was refused: nothing reached the provider."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    standby = Emulator(emulator.config)
    session = make_session(base_urls={"dh3": f"http://127.0.0.1:{port}"}, create_retries=50, retry_cap=0.02)
    refused = asyncio.Event()

    class OnRetry(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "create retry" in record.getMessage():
                refused.set()

    watcher = OnRetry()
    logging.getLogger("image_gen_async").addHandler(watcher)
    attempt = asyncio.ensure_future(session.dh3.submit("nano-banana-pro", prompt="a fox"))
    try:
        await refused.wait()  # the first attempt was refused before the server existed
    finally:
        logging.getLogger("image_gen_async").removeHandler(watcher)
    await standby.start(host="127.0.0.1", port=port)
    try:
        handle = await attempt
        await handle
        assert handle.retries >= 1
        assert standby.stats.creates["dh3"] == 1
    finally:
        await standby.close()


@pytest.mark.parametrize("fault", ["500", "502", "503", "429", "drop_before", "non_json", "slow"])
@pytest.mark.parametrize("name", CLIENTS)
async def test_poll_faults_are_retried(
    make_session: SessionFactory, emulator: Emulator, name: str, fault: str
) -> None:
    session = make_session(read_timeout=0.2)
    emulator.config.faults = Faults(retry_after=0.01, slow_seconds=0.3)  # past the read timeout
    emulator.script(name, "poll", fault, times=2)
    handle = await session.client(name).submit(MODELS[name], prompt="a fox")
    result = await handle
    assert result.status is TaskStatus.COMPLETED
    # aiohttp itself retries a GET once on a dropped connection, so one drop reaches us.
    assert handle.retries == (1 if fault == "drop_before" else 2)
    assert emulator.stats.creates[name] == 1


async def test_poll_retries_exhausted_fail_the_handle(
    make_session: SessionFactory, emulator: Emulator
) -> None:
    session = make_session(poll_retries=1)
    emulator.script("dh3", "poll", "500", times=5)
    handle = await session.dh3.submit("nano-banana-pro", prompt="a fox")
    with pytest.raises(ServerError) as caught:
        await handle
    assert caught.value.status == 500 and caught.value.provider == "dh3"
    assert handle.retries == 1


async def test_wrong_key_is_authentication_error(make_session: SessionFactory, emulator: Emulator) -> None:
    wrong = "sk-wrong-key-abcdef"
    session = make_session(api_keys={name: wrong for name in CLIENTS})
    for name in CLIENTS:
        with pytest.raises(AuthenticationError) as caught:
            await session.client(name).submit(MODELS[name], prompt="a fox")
        assert caught.value.status == 401 and caught.value.provider == name
        assert wrong not in str(caught.value) and wrong not in repr(caught.value)
    # Never retried: a 401 is a final answer, and it stops the key. Get3W's two APIs are one
    # account: after v1's 401, v3 sends nothing with that key.
    assert {name: emulator.stats.create_requests[name] for name in CLIENTS} == {
        "get3w": 1,
        "get3w_v3": 0,
        "dh3": 1,
        "nananobanana": 1,
    }
    assert all(isinstance(session.client(name).blocked, AuthenticationError) for name in CLIENTS)


@pytest.mark.parametrize("name", CLIENTS)
async def test_unknown_task_is_not_found(session: AsyncSession, name: str) -> None:
    handle = session.client(name).resume("no-such-task", MODELS[name])
    with pytest.raises(NotFoundError):
        await handle


async def test_missing_key_is_a_configuration_error(emulator: Emulator) -> None:
    async with AsyncSession(base_urls={"dh3": emulator.url}, env={}) as session:
        with pytest.raises(ConfigurationError, match="DH3_API_KEY"):
            await session.dh3.submit("nano-banana-pro", prompt="a fox")
    assert emulator.stats.create_requests["dh3"] == 0


async def test_keys_from_environment_and_v3_fallback(emulator: Emulator) -> None:
    env = {"GET3W_API_KEY": KEYS["get3w"], "DH3_API_KEY": KEYS["dh3"]}
    async with AsyncSession(
        base_urls={"get3w": emulator.url, "dh3": emulator.url}, env=env, polling=FAST_POLLING
    ) as session:
        assert session.get3w_v3.base_url == emulator.url
        emulator.config.api_keys = {"get3w_v3": KEYS["get3w"], "dh3": KEYS["dh3"]}
        handles = [
            await session.get3w_v3.submit(MODELS["get3w_v3"], prompt="a fox", timeout=5),
            await session.dh3.submit("nano-banana-pro", prompt="a fox", timeout=5),
        ]
        await asyncio.gather(*handles)


async def test_keys_never_leak(make_session: SessionFactory, emulator: Emulator, caplog: Any) -> None:
    caplog.set_level(logging.DEBUG, logger="image_gen_async")
    session = make_session()
    emulator.script("dh3", "poll", "500")
    handle = await session.dh3.submit("nano-banana-pro", prompt="a fox")
    await handle
    visible = " ".join(
        [repr(session), str(session), repr(session.dh3), repr(handle), repr(await handle), caplog.text]
    )
    assert "GET /api/v1/task/get -> 500" in caplog.text.replace("dh3 ", "")
    assert "retry" in caplog.text
    for key in KEYS.values():
        assert key not in visible


async def test_session_use_after_close(make_session: SessionFactory) -> None:
    session = make_session()
    await session.close()
    assert session.closed
    with pytest.raises(ConfigurationError, match="closed"):
        await session.dh3.submit("nano-banana-pro", prompt="a fox")


async def test_close_ends_waiting_handles(make_session: SessionFactory, emulator: Emulator) -> None:
    session = make_session()
    handle = await session.dh3.submit("nano-banana-pro", prompt="long one [slow]")
    await session.close()
    with pytest.raises(ConfigurationError, match="resume"):
        await handle


def test_bad_configuration_is_refused() -> None:
    with pytest.raises(ConfigurationError, match="unknown client 'dh4'"):
        AsyncSession(api_keys={"dh4": "x"})
    with pytest.raises(ConfigurationError, match="http"):
        AsyncSession(base_urls={"dh3": "ftp://example.test"})
    with pytest.raises(ConfigurationError):
        AsyncSession(rate_limits={"dh3": 0})
    with pytest.raises(ConfigurationError, match="unknown client"):
        AsyncSession().client("midjourney")


async def test_protocol_error_names_the_field(make_session: SessionFactory, odd_server: Any) -> None:
    url = await odd_server(
        {
            "POST /api/v1/task/create": json_answer({"code": 200, "message": "ok", "task_id": "t1"}),
            "GET /api/v1/task/get": json_answer(
                {"code": 200, "nano_banana_pro_output": {"task_id": "t1", "images": []}}
            ),
        }
    )
    session = make_session(base_urls={"dh3": url})
    handle = await session.dh3.submit("nano-banana-pro", prompt="a fox")
    with pytest.raises(ProtocolError) as caught:
        await handle
    assert caught.value.field == "$.nano_banana_pro_output.status"
    assert "required field missing" in str(caught.value)


async def test_strict_types_refuse_coercion(make_session: SessionFactory, odd_server: Any) -> None:
    url = await odd_server(
        {
            "POST /api/v1/generate": json_answer(
                {"success": "false", "generationId": "g1", "imageUrls": ["https://x.test/a.png"]}
            ),
        }
    )
    session = make_session(base_urls={"nananobanana": url})
    with pytest.raises(SubmitUncertainError) as caught:
        await session.nananobanana.generate("nano-banana", prompt="a fox")
    cause = caught.value.__cause__
    assert isinstance(cause, ProtocolError) and cause.field == "$.success"


async def test_dh3_error_code_under_http_200(make_session: SessionFactory, emulator: Emulator) -> None:
    emulator.config.dh3_errors_under_http_200 = True
    session = make_session(api_keys={"dh3": "sk-wrong-key-abcdef"})
    with pytest.raises(AuthenticationError):
        await session.dh3.submit("nano-banana-pro", prompt="a fox")


async def test_dh3_qps_answer_under_http_200_is_waited_out(
    make_session: SessionFactory, emulator: Emulator
) -> None:
    emulator.config.dh3_errors_under_http_200 = True
    emulator.config.faults = Faults(retry_after=0.01)
    emulator.script("dh3", "create", "429")
    session = make_session()
    handle = await session.dh3.submit("nano-banana-pro", prompt="a fox")
    await handle
    assert handle.retries == 0 and emulator.stats.create_requests["dh3"] == 2
    assert emulator.stats.creates["dh3"] == 1


@pytest.mark.parametrize(
    ("status", "body", "kind"),
    [
        (402, {"error": "Insufficient credits"}, "PaymentRequiredError"),
        (403, {"error": "API access not enabled"}, "PermissionDeniedError"),
        (400, {"error": "Missing prompt"}, "BadRequestError"),
    ],
)
async def test_nananobanana_error_bodies(
    make_session: SessionFactory, odd_server: Any, status: int, body: Any, kind: str
) -> None:
    url = await odd_server({"POST /api/v1/generate": json_answer(body, status)})
    session = make_session(base_urls={"nananobanana": url})
    with pytest.raises(APIError) as caught:
        await session.nananobanana.submit("nano-banana", prompt="a fox")
    assert type(caught.value).__name__ == kind
    assert caught.value.status == status and caught.value.message == body["error"]


async def test_get3w_v3_error_envelope(make_session: SessionFactory, odd_server: Any) -> None:
    body = {"code": 403, "message": "Account issue", "data": None}
    url = await odd_server({"POST /api/v3/{model:.+}": json_answer(body, 200)})
    session = make_session(base_urls={"get3w_v3": url})
    with pytest.raises(ImageGenError) as caught:
        await session.get3w_v3.submit(MODELS["get3w_v3"], prompt="a fox")
    assert type(caught.value).__name__ == "PermissionDeniedError"


async def test_error_answer_naming_a_task_is_never_retried(
    make_session: SessionFactory, odd_server: Any
) -> None:
    creates = 0

    async def create(request: web.Request) -> web.Response:
        nonlocal creates
        creates += 1
        body = {"code": 500, "message": "upstream rate limit exceeded", "task_id": "t1"}
        return web.json_response(body, status=500)

    url = await odd_server({"POST /api/v1/task/create": create})
    session = make_session(base_urls={"dh3": url})
    with pytest.raises(SubmitUncertainError) as caught:
        await session.dh3.submit("nano-banana-pro", prompt="a fox")
    assert caught.value.task_id == "t1" and creates == 1


def exception_chain(error: BaseException | None) -> list[BaseException]:
    chain = []
    while error is not None and error not in chain:
        chain.append(error)
        error = error.__cause__ or error.__context__
    return chain


async def test_key_never_rides_along_in_an_exception_chain(make_session: SessionFactory) -> None:
    async def malformed(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 2xx WHAT\r\nContent-Length: 2\r\n\r\n{}")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(malformed, "127.0.0.1", 0)
    try:
        port = server.sockets[0].getsockname()[1]
        session = make_session(base_urls={"dh3": f"http://127.0.0.1:{port}"})
        with pytest.raises(ImageGenError) as caught:
            await session.dh3.submit("nano-banana-pro", prompt="a fox")
        chain = exception_chain(caught.value)
        assert len(chain) >= 2  # the cause is kept, as our own TransportError
        assert not any(KEYS["dh3"] in repr(e) or KEYS["dh3"] in str(e) for e in chain)
        assert not any(type(e).__module__.startswith("aiohttp") for e in chain)
    finally:
        server.close()
        await server.wait_closed()


async def test_rate_limit_holds_while_the_pool_is_busy(
    make_session: SessionFactory, emulator: Emulator
) -> None:
    """Creates released while no connection is free must not leave together once one is."""
    # Scaled: 20/s and holders of 0.5 s still queue ten creates behind the busy pool.
    emulator.config.dh3_qps = 20
    emulator.config.durations = {"nano-banana": 0.5}
    session = make_session(pool_size=2, rate_limits={"dh3": 20.0, "nananobanana": None})
    holders = [
        asyncio.ensure_future(session.nananobanana.generate("nano-banana", prompt=f"hold {i}"))
        for i in range(2)
    ]
    handles = await asyncio.gather(
        *(session.dh3.submit("nano-banana-pro", prompt=f"fox {i}") for i in range(25))
    )
    await asyncio.gather(*handles, *holders)
    assert emulator.stats.creates["dh3"] == 25
    assert emulator.stats.rate_limited["dh3"] == 0
    assert emulator.stats.max_creates_in_1s["dh3"] <= 20


async def test_deadline_bounds_a_hanging_poll(make_session: SessionFactory, odd_server: Any) -> None:
    async def hang(request: web.Request) -> web.Response:
        await asyncio.sleep(2)  # far past the handle's deadline
        return web.json_response({})

    url = await odd_server(
        {
            "POST /api/v1/task/create": json_answer({"code": 200, "message": "ok", "task_id": "t1"}),
            "GET /api/v1/task/get": hang,
        }
    )
    session = make_session(base_urls={"dh3": url}, read_timeout=30)
    handle = await session.dh3.submit("nano-banana-pro", prompt="a fox", timeout=0.3)
    with pytest.raises(TaskTimeoutError):
        await asyncio.wait_for(handle.wait(), 5)


async def test_poll_outage_is_ridden_out_until_the_deadline(
    make_session: SessionFactory, emulator: Emulator
) -> None:
    emulator.script("dh3", "poll", "503", times=12)
    emulator.config.faults = Faults(retry_after=None)
    session = make_session()
    handle = await session.dh3.submit("nano-banana-pro", prompt="a fox")
    assert (await handle).ok and handle.retries == 12


async def test_cancelled_generate_stops_its_polling(make_session: SessionFactory, emulator: Emulator) -> None:
    session = make_session()
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(session.dh3.generate("nano-banana-pro", prompt="long one [slow]"), 0.1)
    (abandoned,) = emulator.tasks

    def polls_of_abandoned() -> int:
        return sum(1 for r in emulator.requests if r.kind == "poll" and r.query.get("task_id") == abandoned)

    at_cancel = polls_of_abandoned()
    later = await session.dh3.submit("nano-banana-pro", prompt="long one [slow]")
    await later  # long after the cancel: the abandoned job got no more polls
    assert later.polls > 3
    assert polls_of_abandoned() <= at_cancel + 1  # one may have been on the wire already


async def test_parameters_that_are_not_json_are_refused_before_sending(
    session: AsyncSession, emulator: Emulator
) -> None:
    with pytest.raises(InvalidRequestError, match="not JSON"):
        await session.dh3.submit("nano-banana-pro", prompt="a fox", seed=object())
    assert emulator.stats.create_requests["dh3"] == 0


def test_keys_with_spaces_are_refused_and_pasted_newlines_trimmed() -> None:
    with pytest.raises(ConfigurationError, match="dh3"):
        AsyncSession(api_keys={"dh3": "sk one two"})
    assert AsyncSession(api_keys={"dh3": "sk-abc\n"}).dh3._target.key is not None


async def test_redirect_is_a_configuration_error(make_session: SessionFactory, odd_server: Any) -> None:
    async def moved(request: web.Request) -> web.Response:
        return web.Response(status=308, headers={"Location": "https://elsewhere.test/api/v1/task/create"})

    url = await odd_server({"POST /api/v1/task/create": moved})
    session = make_session(base_urls={"dh3": url})
    with pytest.raises(ConfigurationError, match=r"elsewhere\.test"):
        await session.dh3.submit("nano-banana-pro", prompt="a fox")


async def test_same_origin_poll_url_is_followed(make_session: SessionFactory, odd_server: Any) -> None:
    seen: list[str] = []
    base = ""

    async def create(request: web.Request) -> web.Response:
        data = {"id": "p1", "status": "created", "urls": {"get": f"{base}/custom/poll/p1"}}
        return web.json_response({"code": 200, "message": "success", "data": data})

    async def poll(request: web.Request) -> web.Response:
        seen.append(request.path)
        data = {"id": "p1", "status": "completed", "outputs": ["https://o.test/1.png"]}
        return web.json_response({"code": 200, "message": "success", "data": data})

    base = await odd_server({"POST /api/v3/{model:.+}": create, "GET /custom/poll/{id}": poll})
    session = make_session(base_urls={"get3w_v3": base})
    result = await (await session.get3w_v3.submit(MODELS["get3w_v3"], prompt="a fox"))
    assert result.ok and seen == ["/custom/poll/p1"]
