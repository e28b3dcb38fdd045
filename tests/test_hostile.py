"""A hostile or odd server, each case on a tiny loopback server that answers exactly the bad thing.

Every test asserts what the server received (creates counted) and what the caller got: a
typed error, nothing paid twice, memory and time bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import gc
import logging
import socket
import struct
import tracemalloc
import types
import zlib
from collections import Counter
from functools import cache
from typing import Any

import pytest
from aiohttp import web

from image_gen_async import (
    AdmissionTimeoutError,
    ConfigurationError,
    DownloadError,
    ImageGenError,
    InvalidRequestError,
    Output,
    PollSettings,
    ProtocolError,
    SubmitUncertainError,
    TaskFailedError,
    TaskResult,
    TaskStatus,
    TaskTimeoutError,
    TransportError,
)
from image_gen_async._follow import Follower
from image_gen_async.testing import Emulator

from .batch_helpers import wait_for
from .conftest import KEYS, SessionFactory

DH3_MODEL = "nano-banana-pro"
DH3_CREATED = {"code": 200, "message": "ok", "task_id": "t1"}


def dh3_done(task_id: str, status: str = "success", **extra: Any) -> dict[str, Any]:
    output = {"task_id": task_id, "status": status, "images": [{"url": "https://x.test/a.png"}]} | extra
    return {"code": 200, "message": "Ok", "nano_banana_pro_output": output}


class Counted:
    """A handler that counts its calls and answers from a list (the last answer repeats)."""

    def __init__(self, *answers: Any, status: int = 200) -> None:
        self.calls = 0
        self.answers = answers
        self.status = status

    async def __call__(self, request: web.Request) -> web.StreamResponse:
        self.calls += 1
        await request.read()
        answer = self.answers[min(self.calls, len(self.answers)) - 1]
        if isinstance(answer, web.StreamResponse):
            return answer
        return web.json_response(answer, status=self.status)


# Never pay twice.


@pytest.mark.parametrize(
    ("status", "body"),
    [
        (500, {"code": 503, "message": "busy"}),
        (500, {"code": 429, "message": "rate limit"}),
        (502, {"code": 503, "message": "upstream busy"}),
        (504, {"code": 429}),
    ],
)
async def test_a_5xx_is_uncertain_whatever_its_body_says(
    make_session: SessionFactory, odd_server: Any, status: int, body: dict[str, Any]
) -> None:
    create = Counted(body, status=status)
    url = await odd_server({"POST /api/v1/task/create": create})
    session = make_session(base_urls={"dh3": url})
    with pytest.raises(SubmitUncertainError):
        await session.dh3.submit(DH3_MODEL, prompt="a fox")
    assert create.calls == 1


@pytest.mark.parametrize(
    ("status", "body", "task_id", "named"),
    [
        # Accepted, but the id is not text; an error naming the task: resume() can follow it.
        (200, {"code": 200, "message": "ok", "task_id": 12345}, "12345", ""),
        (409, {"code": 409, "message": "duplicate", "task_id": 12345}, "12345", ""),
        # Too long to follow, but named in the message.
        (200, {"code": 200, "message": "ok", "task_id": "T" * 2000}, None, "2000 characters, starting 'TTTT"),
    ],
)
async def test_an_odd_task_id_is_still_named_on_the_uncertain_error(
    make_session: SessionFactory,
    odd_server: Any,
    status: int,
    body: dict[str, Any],
    task_id: str | None,
    named: str,
) -> None:
    create = Counted(body, status=status)
    url = await odd_server({"POST /api/v1/task/create": create})
    session = make_session(base_urls={"dh3": url})
    with pytest.raises(SubmitUncertainError) as caught:
        await session.dh3.submit(DH3_MODEL, prompt="a fox")
    assert (create.calls, caught.value.task_id) == (1, task_id)
    assert named in str(caught.value)


@pytest.mark.parametrize("how", ["cancel", "wait_for"])
async def test_a_submit_cancelled_after_its_create_went_out_names_the_task(
    make_session: SessionFactory, odd_server: Any, caplog: pytest.LogCaptureFixture, how: str
) -> None:
    received, release = asyncio.Event(), asyncio.Event()

    async def slow_create(request: web.Request) -> web.Response:
        await request.read()
        received.set()
        await release.wait()
        return web.json_response({"code": 200, "message": "ok", "task_id": "t-paid"})

    url = await odd_server({"POST /api/v1/task/create": slow_create})
    session = make_session(base_urls={"dh3": url})
    caplog.set_level(logging.WARNING, "image_gen_async")
    if how == "cancel":
        submit = asyncio.ensure_future(session.dh3.submit(DH3_MODEL, prompt="a fox"))
        await received.wait()
        submit.cancel()
        with pytest.raises(asyncio.CancelledError):
            await submit
    else:
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(session.dh3.submit(DH3_MODEL, prompt="a fox"), 0.5)
        assert received.is_set()
    assert session.orphaned == 0  # the answer has not come yet
    release.set()
    await wait_for(lambda: session.orphaned == 1)
    orphan = session.orphans[0]
    assert (orphan.provider, orphan.model, orphan.task_id) == ("dh3", DH3_MODEL, "t-paid")
    assert "t-paid" in caplog.text and "resume" in caplog.text


async def test_a_submit_cancelled_before_sending_records_nothing(
    make_session: SessionFactory, emulator: Emulator
) -> None:
    session = make_session(rate_limits={"dh3": 1.0})
    await session.dh3.submit(DH3_MODEL, prompt="first")  # takes the one slot of this second
    second = asyncio.ensure_future(session.dh3.submit(DH3_MODEL, prompt="second"))
    await asyncio.sleep(0)  # it is now waiting for its rate-limit turn
    second.cancel()
    with pytest.raises(asyncio.CancelledError):
        await second
    assert session.orphaned == 0 and emulator.stats.creates["dh3"] == 1


@pytest.mark.parametrize("client", ["dh3", "get3w", "nananobanana"])
async def test_a_poll_answer_about_another_task_is_refused_and_retried(
    make_session: SessionFactory, odd_server: Any, client: str
) -> None:
    if client == "dh3":
        routes = {
            "POST /api/v1/task/create": Counted(DH3_CREATED),
            "GET /api/v1/task/get": Counted(dh3_done("someone-else"), dh3_done("t1")),
        }
        model = DH3_MODEL
    elif client == "get3w":
        routes = {
            "POST /v1/{model:.+}": Counted({"id": "t1", "status": "created"}),
            "GET /v1/requests/{id}": Counted(
                {"id": "someone-else", "status": "completed", "outputs": ["https://x.test/b.png"]},
                {"id": "t1", "status": "completed", "outputs": ["https://x.test/a.png"]},
            ),
        }
        model = "google/nano-banana-pro/text-to-image"
    else:
        routes = {
            "POST /api/v1/generate": Counted({"success": True, "async": True, "generationId": "t1"}),
            "GET /api/v1/generate": Counted(
                {"data": {"id": "someone-else", "processingStatus": "completed", "outputImageUrls": ["u"]}},
                {
                    "data": {
                        "id": "t1",
                        "processingStatus": "completed",
                        "outputImageUrls": ["https://x.test/a"],
                    }
                },
            ),
        }
        model = "nano-banana"
    url = await odd_server(routes)
    session = make_session(base_urls={client: url})
    handle = await session.client(client).submit(model, prompt="a fox")
    result = await handle
    assert result.task_id == "t1" and "someone-else" not in str(result.raw)
    polls = next(handler for route, handler in routes.items() if route.startswith("GET"))
    assert isinstance(polls, Counted) and polls.calls == 2 and handle.retries == 1


# Bounded under a hostile server.


@cache
def gzip_bomb(decoded: int) -> bytes:
    """A gzip body that inflates to ``decoded`` bytes of spaces (valid JSON whitespace) then ``{}``.

    Built from one packed MiB repeated, not by packing every MiB: milliseconds, not seconds.
    """
    block = b" " * (1 << 20)
    packer = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    first = packer.compress(block) + packer.flush(zlib.Z_FULL_FLUSH)  # with the gzip header
    # After a full flush the packer forgets what came before: each further MiB packs the same.
    again = packer.compress(block) + packer.flush(zlib.Z_FULL_FLUSH)
    end = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)  # the last deflate block, on its own
    last = end.compress(b"{}") + end.flush()
    count = decoded >> 20
    crc = 0
    for _ in range(count):
        crc = zlib.crc32(block, crc)
    crc = zlib.crc32(b"{}", crc)
    trailer = struct.pack("<II", crc, (decoded + 2) & 0xFFFFFFFF)
    return first + again * (count - 1) + last + trailer


BOMB_SIZE = 256 << 20  # 256 MiB decoded, about 256 KiB on the wire


def bomb_answer() -> web.Response:
    return web.Response(
        body=gzip_bomb(BOMB_SIZE), headers={"Content-Encoding": "gzip", "Content-Type": "application/json"}
    )


async def _peak_while(call: Any) -> tuple[BaseException | None, int]:
    tracemalloc.start()
    try:
        try:
            await call
        except ImageGenError as error:
            return error, tracemalloc.get_traced_memory()[1]
        return None, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


async def test_a_gzip_bomb_is_cut_at_the_decoded_cap(make_session: SessionFactory, odd_server: Any) -> None:
    create = Counted(bomb_answer())
    polls = Counted(bomb_answer())
    url = await odd_server({"POST /api/v1/task/create": create, "GET /api/v1/task/get": polls})
    session = make_session(base_urls={"dh3": url})
    error, peak = await _peak_while(session.dh3.submit(DH3_MODEL, prompt="a fox"))
    assert isinstance(error, SubmitUncertainError) and create.calls == 1
    assert peak < 64 << 20, f"{peak} bytes at peak for a 256 MiB bomb"

    url = await odd_server({"POST /api/v1/task/create": Counted(DH3_CREATED), "GET /api/v1/task/get": polls})
    handle = await make_session(base_urls={"dh3": url}).dh3.submit(DH3_MODEL, prompt="a fox")
    error, peak = await _peak_while(handle)
    assert isinstance(error, TransportError) and "cap" in str(error)
    assert peak < 64 << 20 and polls.calls == 1


async def test_a_gzip_bomb_download_is_cut_at_max_bytes(
    make_session: SessionFactory, odd_server: Any, tmp_path: Any
) -> None:
    async def image(request: web.Request) -> web.Response:
        headers = {"Content-Encoding": "gzip", "Content-Type": "image/png"}
        return web.Response(body=gzip_bomb(BOMB_SIZE), headers=headers)

    url = await odd_server({"GET /a.png": image})
    session = make_session()
    result = TaskResult(
        task_id="t1",
        provider="dh3",
        model=DH3_MODEL,
        status=TaskStatus.COMPLETED,
        outputs=(Output(f"{url}/a.png"),),
    )
    error, peak = await _peak_while(session.download(result, tmp_path, max_bytes=1 << 20))
    assert isinstance(error, DownloadError) and "cap" in str(error)
    assert peak < 64 << 20 and list(tmp_path.iterdir()) == []


def trickle(status: int = 200) -> Any:
    """A handler that answers one byte every 50 ms, forever (a space is JSON whitespace)."""

    async def handler(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(status=status, headers={"Content-Type": "application/json"})
        await response.prepare(request)
        while True:
            await response.write(b" ")
            await asyncio.sleep(0.05)

    return handler


def stall(status: int = 200) -> Any:
    """A handler that sends its headers and then nothing, for longer than any test waits."""

    async def handler(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(status=status, headers={"Content-Type": "application/json"})
        await response.prepare(request)
        await asyncio.sleep(30)
        return response

    return handler


async def test_a_server_gone_quiet_is_named_by_the_read_timeout_not_the_exchange_limit(
    make_session: SessionFactory, odd_server: Any
) -> None:
    # aiohttp's read timeout is a TimeoutError too: the error says which clock ran out.
    url = await odd_server({"POST /api/v1/task/create": stall()})
    session = make_session(base_urls={"dh3": url}, read_timeout=0.2)
    with pytest.raises(SubmitUncertainError, match=r"no data for 0\.2 s"):
        await session.dh3.submit(DH3_MODEL, prompt="a fox")


async def test_a_connect_that_times_out_is_retried_and_named_by_the_connect_timeout(
    make_session: SessionFactory, caplog: pytest.LogCaptureFixture
) -> None:
    # A listening socket whose accept queue is full: a new connect gets no answer at all,
    # so aiohttp's own connect clock runs out. Nothing was sent: the create is tried again,
    # and the error says which clock ran out (not the exchange's limit, not the deadline).
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(0)
    queued = []
    for _ in range(3):
        filler = socket.socket()
        filler.setblocking(False)
        with contextlib.suppress(BlockingIOError):  # it completes in the kernel's queue
            filler.connect(server.getsockname())
        queued.append(filler)
    caplog.set_level(logging.WARNING, "image_gen_async")
    url = "http://{}:{}".format(*server.getsockname())
    session = make_session(base_urls={"dh3": url}, connect_timeout=0.2, create_retries=1)
    try:
        with pytest.raises(TransportError, match=r"no connection within 0\.2 s") as caught:
            await session.dh3.submit(DH3_MODEL, prompt="a fox", timeout=30)
        assert not isinstance(caught.value, SubmitUncertainError | AdmissionTimeoutError)
        assert "create retry 1" in caplog.text
    finally:
        for sock in (*queued, server):
            sock.close()


async def test_a_trickling_server_cannot_hold_a_create_or_a_poll_past_its_limits(
    make_session: SessionFactory, odd_server: Any
) -> None:
    loop = asyncio.get_running_loop()
    url = await odd_server({"POST /api/v1/task/create": trickle()})
    session = make_session(base_urls={"dh3": url}, connect_timeout=0.2, read_timeout=0.3)
    started = loop.time()
    with pytest.raises(SubmitUncertainError, match="no complete answer"):
        await session.dh3.submit(DH3_MODEL, prompt="a fox")
    assert loop.time() - started < 2.0  # the exchange limit is 0.5 s; sock_read alone never trips

    url = await odd_server(
        {"POST /api/v1/task/create": Counted(DH3_CREATED), "GET /api/v1/task/get": trickle()}
    )
    session = make_session(base_urls={"dh3": url}, pool_size=2)
    handles = [await session.dh3.submit(DH3_MODEL, prompt=f"fox {i}", timeout=0.5) for i in range(2)]
    started = loop.time()
    for handle in handles:
        with pytest.raises(TaskTimeoutError):
            await handle
    assert loop.time() - started < 1.0  # the deadline bounds the poll on the wire


async def test_a_deadline_is_kept_through_retry_waits(make_session: SessionFactory, odd_server: Any) -> None:
    busy = web.json_response({"code": 503, "message": "busy"}, status=503, headers={"Retry-After": "30"})
    url = await odd_server(
        {"POST /api/v1/task/create": Counted(DH3_CREATED), "GET /api/v1/task/get": Counted(busy)}
    )
    session = make_session(base_urls={"dh3": url}, retry_cap=30.0)
    loop = asyncio.get_running_loop()
    handle = await session.dh3.submit(DH3_MODEL, prompt="a fox", timeout=1.0)
    started = loop.time()
    with pytest.raises(TaskTimeoutError, match="503"):
        await handle
    assert loop.time() - started < 1.3


DEEP = b"[" * 100_000 + b"]" * 100_000


async def test_json_nested_100k_deep_is_a_typed_error(make_session: SessionFactory, odd_server: Any) -> None:
    async def deep(request: web.Request) -> web.Response:
        return web.Response(body=DEEP, content_type="application/json")

    create = Counted(web.Response(body=DEEP, content_type="application/json"))
    url = await odd_server({"POST /api/v1/task/create": create})
    with pytest.raises(SubmitUncertainError):
        await make_session(base_urls={"dh3": url}).dh3.submit(DH3_MODEL, prompt="a fox")
    assert create.calls == 1

    url = await odd_server({"POST /api/v1/task/create": Counted(DH3_CREATED), "GET /api/v1/task/get": deep})
    handle = await make_session(base_urls={"dh3": url}, poll_retries=1).dh3.submit(DH3_MODEL, prompt="a fox")
    with pytest.raises(ProtocolError, match="not JSON"):
        await handle


async def test_a_lone_surrogate_is_refused_before_sending(session: Any, emulator: Emulator) -> None:
    for name, model in (("dh3", DH3_MODEL), ("nananobanana", "nano-banana")):
        with pytest.raises(InvalidRequestError, match="surrogate"):
            await session.client(name).submit(model, prompt="a fox \ud800")
    assert sum(emulator.stats.create_requests.values()) == 0


@pytest.mark.parametrize(
    "poll_url", ["javascript:alert(1)", "data:text/plain,hi", "mailto:a@b.test", "//[::1"]
)
async def test_a_poll_url_that_is_not_http_falls_back_to_the_documented_route(
    make_session: SessionFactory, odd_server: Any, poll_url: str
) -> None:
    created = {
        "code": 200,
        "message": "success",
        "data": {"id": "p1", "status": "created", "urls": {"get": poll_url}},
    }
    done = {
        "code": 200,
        "message": "success",
        "data": {"id": "p1", "status": "completed", "outputs": ["https://x"]},
    }
    polls = Counted(done)
    url = await odd_server(
        {"POST /api/v3/{model:.+}": Counted(created), "GET /api/v3/predictions/{id}": polls}
    )
    handle = await make_session(base_urls={"get3w_v3": url}).get3w_v3.submit("get3w/flux-dev", prompt="a fox")
    assert (await handle).ok and polls.calls == 1


# Polling that cannot be poisoned.


async def test_an_unknown_status_word_warns_once_per_job(
    make_session: SessionFactory, odd_server: Any, caplog: pytest.LogCaptureFixture
) -> None:
    uploading = dh3_done("t1", status="uploading")
    polls = Counted(uploading, uploading, uploading, uploading, dh3_done("t1"))
    url = await odd_server({"POST /api/v1/task/create": Counted(DH3_CREATED), "GET /api/v1/task/get": polls})
    caplog.set_level(logging.WARNING, "image_gen_async")
    handle = await make_session(base_urls={"dh3": url}).dh3.submit(DH3_MODEL, prompt="a fox")
    assert (await handle).ok and handle.polls == 5
    assert caplog.text.count("unknown status 'uploading'") == 1


async def test_a_huge_estimate_still_gets_a_poll_before_the_deadline(
    make_session: SessionFactory, emulator: Emulator
) -> None:
    emulator.config.estimate_bias = 1e6  # estimated_duration: 20,000 s for a 0.02 s job
    handle = await make_session().get3w.submit(
        "google/nano-banana-pro/text-to-image", prompt="a fox", timeout=0.5
    )
    assert handle.estimated_duration is not None and handle.estimated_duration > 1000
    assert (await handle).ok and handle.polls >= 1


async def test_lost_callbacks_are_noticed_by_what_the_other_jobs_taught(
    make_session: SessionFactory, emulator: Emulator
) -> None:
    emulator.config.webhook_drop = 0.3
    polling = PollSettings(
        first_poll=0.02, min_interval=0.005, max_interval=0.1, webhook_grace=0.05, webhook_unknown_wait=60.0
    )
    session = make_session(polling=polling)
    await session.webhooks.listen("127.0.0.1", 0)
    handles = await asyncio.gather(
        *(session.dh3.submit(DH3_MODEL, prompt=f"fox {i}", webhook=True) for i in range(30))
    )
    async with asyncio.timeout(10):  # not the 60 s fixed at submit time
        results = await asyncio.gather(*handles)
    assert all(result.ok for result in results)
    polled = [handle for handle in handles if handle.polls]
    assert polled and len(polled) < len(handles)  # the lost ones polled; the others did not


async def test_sync_jobs_are_timed_from_when_their_request_went_out(
    make_session: SessionFactory, emulator: Emulator
) -> None:
    session = make_session(rate_limits={"nananobanana": 4.0})
    results = await asyncio.gather(
        *(session.nananobanana.generate("nano-banana", prompt=f"f{i}") for i in range(3))
    )
    assert all(result.ok for result in results)
    # The later jobs waited about 0.25 s and 0.5 s for their turn; none of that is job time.
    longest = session._follow.planner.upper_bound(("nananobanana", "nano-banana"), None)
    assert longest is not None and longest < 0.4


# Secrets stay secret.


async def test_the_key_is_masked_in_what_a_server_echoes(
    make_session: SessionFactory, odd_server: Any
) -> None:
    key = KEYS["dh3"]
    redirect = web.Response(status=302, headers={"Location": f"https://elsewhere.test/{key}/x?token={key}"})
    url = await odd_server({"POST /api/v1/task/create": Counted(redirect)})
    with pytest.raises(ConfigurationError) as redirected:
        await make_session(base_urls={"dh3": url}).dh3.submit(DH3_MODEL, prompt="a fox")
    echoed = Counted({"code": 500, "message": f"bad key {key}"}, status=500)
    url = await odd_server({"POST /api/v1/task/create": echoed})
    with pytest.raises(SubmitUncertainError) as uncertain:
        await make_session(base_urls={"dh3": url}).dh3.submit(DH3_MODEL, prompt="a fox")
    failed = Counted(dh3_done("t1", status="fail", err_msg=f"upstream refused {key}"))
    url = await odd_server({"POST /api/v1/task/create": Counted(DH3_CREATED), "GET /api/v1/task/get": failed})
    with pytest.raises(TaskFailedError) as task_failed:
        await (await make_session(base_urls={"dh3": url}).dh3.submit(DH3_MODEL, prompt="a fox"))
    for caught in (redirected, uncertain, task_failed):
        text = f"{caught.value} {caught.value!r} {caught.value.__cause__}"
        assert key not in text and "***" in text
    assert key not in str(task_failed.value.result.error)


async def test_poll_retries_zero_means_no_download_retries(
    make_session: SessionFactory, odd_server: Any, tmp_path: Any, caplog: pytest.LogCaptureFixture
) -> None:
    served: Counter[str] = Counter()

    async def unavailable(request: web.Request) -> web.Response:
        served[request.path] += 1
        return web.Response(status=503)

    url = await odd_server({"GET /{name}": unavailable})
    result = TaskResult(
        task_id="t1",
        provider="dh3",
        model=DH3_MODEL,
        status=TaskStatus.COMPLETED,
        outputs=(Output(f"{url}/a.png?X-Amz-Signature=s3cr3t"),),
    )
    with pytest.raises(DownloadError):
        await make_session(poll_retries=0).download(result, tmp_path)
    assert served["/a.png"] == 1
    served.clear()
    caplog.set_level(logging.WARNING, "image_gen_async")
    with pytest.raises(DownloadError):
        await make_session(poll_retries=2).download(result, tmp_path)
    assert served["/a.png"] == 3 and "s3cr3t" not in caplog.text


async def test_a_download_transport_error_names_no_presigned_query(
    make_session: SessionFactory, tmp_path: Any, caplog: pytest.LogCaptureFixture
) -> None:
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    result = TaskResult(
        task_id="t1",
        provider="dh3",
        model=DH3_MODEL,
        status=TaskStatus.COMPLETED,
        outputs=(Output(f"http://127.0.0.1:{port}/a.png?X-Amz-Signature=s3cr3t"),),
    )
    caplog.set_level(logging.DEBUG, "image_gen_async")
    with pytest.raises(TransportError) as caught:
        await make_session(poll_retries=1).download(result, tmp_path)
    assert "s3cr3t" not in str(caught.value) and "s3cr3t" not in caplog.text


class Marker:
    """Something a caller keeps in a contextvar, to see whether a finished handle holds it."""


MARKER: contextvars.ContextVar[Marker | None] = contextvars.ContextVar("marker", default=None)


def reachable_from(root: object) -> list[object]:
    """What ``root`` holds, transitively, short of the event loop, modules and classes."""
    seen, todo, found = {id(root)}, [root], []
    while todo:
        item = todo.pop()
        found.append(item)
        if isinstance(item, asyncio.AbstractEventLoop | type | types.ModuleType):
            continue
        for referent in gc.get_referents(item):
            if id(referent) not in seen:
                seen.add(id(referent))
                todo.append(referent)
    return found


async def test_a_finished_handle_holds_neither_its_follower_nor_the_submitters_context(
    session: Any,
) -> None:
    async def submit() -> Any:
        MARKER.set(Marker())  # inside this task's own copy of the context
        return await session.dh3.submit(DH3_MODEL, prompt="a fox")

    handle = await asyncio.ensure_future(submit())
    assert (await handle).ok
    held = reachable_from(handle)
    assert not any(isinstance(item, Marker | contextvars.Context | Follower) for item in held)
    assert handle._on_cancel is None and not session._follow.followers
