"""Hostile review of the reshaped engine: creates, polls, reads and downloads.

Each test is a reproduction on loopback of something still wrong on main, marked
``xfail(strict=True)`` so the suite stays green until it is fixed (then it XPASSes and
the mark must go). Servers are tiny aiohttp apps answering exactly the bad thing; every
test asserts what the server received and what the caller got.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
import tracemalloc
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from image_gen_async import (
    ImageGenError,
    Output,
    ServerError,
    SubmitUncertainError,
    TaskResult,
    TaskStatus,
)
from image_gen_async._transport import MAX_ANSWER_BYTES

from .batch_helpers import wait_for
from .conftest import SessionFactory

DH3_MODEL = "nano-banana-pro"
NB_MODEL = "nano-banana"
V1_MODEL = "google/nano-banana-pro/text-to-image"
V1_CREATE = "POST /v1/google/nano-banana-pro/text-to-image"
NB_CREATED = {"success": True, "async": True, "generationId": "g1", "message": "queued"}
# A whole number JSON carries exactly, too large for a float: 401 digits (the parser's limit is 4300).
HUGE = int("1" + "0" * 400)
# Just under the decoded cap of a status answer.
MAX_SAFE_BYTES = MAX_ANSWER_BYTES - 1024


class Counted:
    """A handler that counts its calls and answers from a list (the last answer repeats)."""

    def __init__(self, *answers: Any, status: int = 200, headers: dict[str, str] | None = None) -> None:
        self.calls = 0
        self.answers = answers
        self.status = status
        self.headers = headers or {}

    async def __call__(self, request: web.Request) -> web.StreamResponse:
        self.calls += 1
        await request.read()
        answer = self.answers[min(self.calls, len(self.answers)) - 1]
        return web.json_response(answer, status=self.status, headers=self.headers)


def _typed_or_handle(outcome: object) -> bool:
    return not isinstance(outcome, BaseException) or isinstance(outcome, ImageGenError)


# Lose nothing that was paid for.


async def test_review_cancel_as_the_answer_lands_loses_the_paid_task(
    make_session: SessionFactory, odd_server: Any
) -> None:
    # The caller's wait_for/cancel fires in the same loop turn the create's answer completes
    # (any timeout racing an answer under load). The task was made and billed.
    received, release = asyncio.Event(), asyncio.Event()
    calls = 0

    async def create(request: web.Request) -> web.Response:
        nonlocal calls
        calls += 1
        await request.read()
        received.set()
        await release.wait()
        return web.json_response(NB_CREATED)

    url = await odd_server({"POST /api/v1/generate": create})
    session = make_session(base_urls={"nananobanana": url})
    submit = asyncio.ensure_future(session.nananobanana.submit(NB_MODEL, prompt="a fox"))
    await received.wait()
    sending = [t for t in asyncio.all_tasks() if t.get_coro().__qualname__ == "Transport.send"]  # type: ignore[union-attr]
    assert len(sending) == 1
    # Cancel the submit exactly when its exchange is done (after asyncio.shield passed the result on).
    sending[0].add_done_callback(lambda _: submit.cancel())
    release.set()
    with pytest.raises(asyncio.CancelledError):
        await submit
    assert calls == 1
    # Paid, so it must be named: an orphan with its id (and a WARNING), as for any cancelled sent create.
    assert [o.task_id for o in session.orphans] == ["g1"]


@pytest.mark.parametrize(
    ("client", "route", "model", "answer", "task_id"),
    [
        ("get3w", V1_CREATE, V1_MODEL, {"id": "t1", "status": "created", "estimated_duration": HUGE}, "t1"),
        ("nananobanana", "POST /api/v1/generate", NB_MODEL, NB_CREATED | {"creditsUsed": HUGE}, "g1"),
        ("nananobanana", "POST /api/v1/generate", NB_MODEL, NB_CREATED | {"remainingCredits": HUGE}, "g1"),
    ],
)
async def test_review_huge_number_in_an_informational_field_of_a_create_answer(
    make_session: SessionFactory,
    odd_server: Any,
    client: str,
    route: str,
    model: str,
    answer: dict[str, Any],
    task_id: str,
) -> None:
    # The create was accepted (and paid); an odd *informational* number must not lose it.
    create = Counted(answer)
    url = await odd_server({route: create})
    session = make_session(base_urls={client: url})
    try:
        outcome: object = await session.client(client).submit(model, prompt="a fox")
    except Exception as error:  # what escapes is the finding
        outcome = error
    assert create.calls == 1
    # Today: a bare OverflowError from submit(), the task id nowhere.
    assert _typed_or_handle(outcome), repr(outcome)
    assert getattr(outcome, "task_id", None) == task_id


async def test_review_superscript_digit_code_escapes_untyped_after_the_create(
    make_session: SessionFactory, odd_server: Any
) -> None:
    create = Counted({"code": "²", "message": "ok", "task_id": "t1"})
    url = await odd_server({"POST /api/v1/task/create": create})
    session = make_session(base_urls={"dh3": url})
    with pytest.raises(ImageGenError) as caught:  # today: ValueError
        await session.dh3.submit(DH3_MODEL, prompt="a fox")
    assert create.calls == 1
    assert isinstance(caught.value, SubmitUncertainError) and caught.value.task_id == "t1"


@pytest.mark.parametrize(
    ("client", "routes", "model"),
    [
        (
            "get3w",
            {
                V1_CREATE: {"id": "t1", "status": "created"},
                "GET /v1/requests/t1": {
                    "id": "t1",
                    "status": "completed",
                    "outputs": ["https://x.test/a.png"],
                    "timings": {"inference": HUGE},
                },
            },
            V1_MODEL,
        ),
        (
            "dh3",
            {
                "POST /api/v1/task/create": {"code": 200, "message": "ok", "task_id": "t1"},
                "GET /api/v1/task/get": {
                    "code": 200,
                    "message": "Ok",
                    "nano_banana_pro_output": {
                        "task_id": "t1",
                        "status": "success",
                        "images": [{"url": "https://x.test/a.png", "width": HUGE}],
                    },
                },
            },
            DH3_MODEL,
        ),
        (
            "dh3",
            {
                "POST /api/v1/task/create": {"code": 200, "message": "ok", "task_id": "t1"},
                "GET /api/v1/task/get": {"code": "²", "message": "Ok"},
            },
            DH3_MODEL,
        ),
    ],
)
async def test_review_hostile_number_in_a_poll_answer_fails_the_handle_untyped(
    make_session: SessionFactory, odd_server: Any, client: str, routes: dict[str, Any], model: str
) -> None:
    handlers = {route: Counted(body) for route, body in routes.items()}
    url = await odd_server(dict(handlers))
    session = make_session(base_urls={client: url}, task_timeout=1.0)
    handle = await session.client(client).submit(model, prompt="a fox")
    outcome = await asyncio.gather(handle, return_exceptions=True)
    assert sum(h.calls for route, h in handlers.items() if route.startswith("POST")) == 1
    assert _typed_or_handle(outcome[0]), repr(outcome[0])  # today: OverflowError / ValueError


async def test_review_huge_active_tasks_in_a_busy_refusal(
    make_session: SessionFactory, odd_server: Any
) -> None:
    busy = {"error": "Server is busy", "type": "server_busy", "activeTasks": HUGE}
    calls = 0

    async def create(request: web.Request) -> web.Response:
        nonlocal calls
        calls += 1
        await request.read()
        return web.json_response(busy if calls == 1 else NB_CREATED, status=503 if calls == 1 else 200)

    url = await odd_server({"POST /api/v1/generate": create})
    session = make_session(base_urls={"nananobanana": url})
    handle = await asyncio.wait_for(session.nananobanana.submit(NB_MODEL, prompt="a fox"), 3.0)
    assert handle.task_id == "g1" and calls == 2


# Never pay twice.


async def test_review_get3w_503_whose_body_says_server_error_is_sent_again(
    make_session: SessionFactory, odd_server: Any
) -> None:
    # Get3W documents no 503 at all; its 500 body is {"code": 500, "error": "Server error"}. A
    # gateway passing that on as 503 after the task was made gets the create sent again and again.
    create = Counted({"code": 500, "error": "Server error"}, status=503)
    url = await odd_server({V1_CREATE: create})
    session = make_session(base_urls={"get3w": url})
    with pytest.raises(ImageGenError) as caught:
        await session.get3w.submit(V1_MODEL, prompt="a fox", timeout=0.5)
    assert create.calls == 1, f"{create.calls} creates for one job"
    assert isinstance(caught.value, SubmitUncertainError)


@pytest.mark.parametrize(("code", "expected"), [("500", "uncertain"), ("401", "circuit"), ("402", "circuit")])
async def test_review_dh3_digit_string_codes_are_read_as_400(
    make_session: SessionFactory, odd_server: Any, code: str, expected: str
) -> None:
    # success_code() accepts "200" as a digit string; the same server's errors come as "500", "401".
    create = Counted({"code": code, "message": "failed"})
    url = await odd_server({"POST /api/v1/task/create": create})
    session = make_session(base_urls={"dh3": url})
    with pytest.raises(ImageGenError) as caught:
        await session.dh3.submit(DH3_MODEL, prompt="a fox")
    assert create.calls == 1
    if expected == "uncertain":  # a server error may have made the task; BadRequestError says it did not
        assert isinstance(caught.value, SubmitUncertainError), repr(caught.value)
    else:  # a key/credit stop opens the circuit
        assert session.dh3.blocked is not None, repr(caught.value)


# Bounded in time.


@pytest.mark.parametrize("call", ["credits", "models"])
async def test_review_credits_and_models_never_return_against_a_5xx(
    make_session: SessionFactory, odd_server: Any, call: str
) -> None:
    answer = Counted({"error": "Server error"}, status=500)
    url = await odd_server({"GET /api/v1/credits": answer, "GET /api/v1/models": answer})
    session = make_session(base_urls={"nananobanana": url})
    started = time.monotonic()
    with pytest.raises(ServerError):
        # Today it retries forever (poll_retries=None means "until the deadline", and there is none).
        await asyncio.wait_for(getattr(session.nananobanana, call)(), 1.5)
    assert time.monotonic() - started < 1.5
    assert answer.calls >= 1


def _refused_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_review_create_retries_outlive_the_submit_deadline(make_session: SessionFactory) -> None:
    # Connection refused: nothing is sent, so each try is a counted retry with a backoff wait.
    # 16 waits of up to 0.15 s (full jitter) sum to about 1.2 s; the job's deadline is 0.3 s.
    session = make_session(
        base_urls={"dh3": f"http://127.0.0.1:{_refused_port()}"},
        create_retries=16,
        retry_base=0.15,
        retry_cap=0.15,
    )
    started = time.monotonic()
    with pytest.raises(ImageGenError):
        await session.dh3.submit(DH3_MODEL, prompt="a fox", timeout=0.3)
    assert time.monotonic() - started <= 0.5


async def test_review_sync_generate_outlives_its_timeout_against_a_trickle(
    make_session: SessionFactory, odd_server: Any
) -> None:
    async def trickle(request: web.Request) -> web.StreamResponse:
        await request.read()
        response = web.StreamResponse(status=200, headers={"Content-Type": "application/json"})
        await response.prepare(request)
        for _ in range(100):  # one byte every 0.1 s: never a read timeout, never an answer
            await response.write(b" ")
            await asyncio.sleep(0.1)
        return response

    url = await odd_server({"POST /api/v1/generate": trickle})
    session = make_session(base_urls={"nananobanana": url}, connect_timeout=3.0)
    started = time.monotonic()
    with pytest.raises(SubmitUncertainError):
        await asyncio.wait_for(session.nananobanana.generate(NB_MODEL, prompt="a fox", timeout=0.3), 1.5)
    assert time.monotonic() - started <= 0.8


# Typed errors, secrets.


@pytest.mark.parametrize("host", ["xn--.com", "a" * 70 + ".example"])
async def test_review_download_of_an_idna_bad_host_escapes_untyped(
    make_session: SessionFactory, odd_server: Any, tmp_path: Path, host: str
) -> None:
    create = Counted({"code": 200, "message": "ok", "task_id": "t1"})
    done = {
        "code": 200,
        "message": "Ok",
        "nano_banana_pro_output": {
            "task_id": "t1",
            "status": "success",
            "images": [{"url": f"http://{host}/a.png"}],
        },
    }
    url = await odd_server({"POST /api/v1/task/create": create, "GET /api/v1/task/get": Counted(done)})
    session = make_session(base_urls={"dh3": url})
    result = await (await session.dh3.submit(DH3_MODEL, prompt="a fox"))
    assert result.status is TaskStatus.COMPLETED
    with pytest.raises(ImageGenError):  # today: UnicodeError
        await session.download(result, tmp_path)
    assert not any(tmp_path.iterdir())  # noqa: ASYNC240 - a look at a test directory


async def test_review_unknown_status_warning_shows_an_echoed_key(
    make_session: SessionFactory, odd_server: Any, caplog: pytest.LogCaptureFixture
) -> None:
    from .conftest import KEYS

    key = KEYS["get3w"]
    create = Counted({"id": "t1", "status": "created"})
    poll = Counted(
        {"id": "t1", "status": f"bad key {key}"},
        {"id": "t1", "status": "completed", "outputs": ["https://x.test/a.png"]},
    )
    url = await odd_server({V1_CREATE: create, "GET /v1/requests/t1": poll})
    session = make_session(base_urls={"get3w": url})
    caplog.set_level(logging.DEBUG, "image_gen_async")
    result = await (await session.get3w.submit(V1_MODEL, prompt="a fox"))
    assert result.ok and poll.calls == 2
    assert key not in caplog.text


# Bounded in memory and in connections.


async def test_review_an_answer_under_the_byte_cap_parses_to_25x_its_size(
    make_session: SessionFactory, odd_server: Any
) -> None:
    # 8 MiB of "{}," is 2.8 million dicts: ~200 MiB parsed (half that here), and TaskResult.raw keeps
    # it all. A pool of 100 such polls peaks near 20 GB; every finished result a caller holds keeps it.
    padding = b"{}," * (MAX_SAFE_BYTES // 6)  # 4 MiB: half the cap
    done = b'{"id":"t1","status":"completed","outputs":["https://x.test/a.png"],"pad":[' + padding + b"{}]}"

    async def poll(request: web.Request) -> web.Response:
        return web.Response(body=done, content_type="application/json")

    create = Counted({"id": "t1", "status": "created"})
    url = await odd_server({V1_CREATE: create, "GET /v1/requests/t1": poll})
    session = make_session(base_urls={"get3w": url})
    handle = await session.get3w.submit(V1_MODEL, prompt="a fox")
    tracemalloc.start()
    try:
        result = await handle
        held, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert result.ok and create.calls == 1
    assert peak < 64 << 20, f"{peak >> 20} MiB at peak for one {len(done) >> 20} MiB answer"
    assert held < 16 << 20, f"{held >> 20} MiB held by one finished result"


async def test_review_slow_downloads_starve_every_create_and_poll(
    make_session: SessionFactory, odd_server: Any, tmp_path: Path
) -> None:
    # Two output files served a byte every 0.1 s take a pool of 2 for ten minutes: the next
    # job cannot even send its create.
    connected = 0

    async def trickle(request: web.Request) -> web.StreamResponse:
        nonlocal connected
        connected += 1
        response = web.StreamResponse(status=200, headers={"Content-Type": "image/png"})
        await response.prepare(request)
        for _ in range(100):
            await response.write(b"x")
            await asyncio.sleep(0.1)
        return response

    create = Counted({"id": "t1", "status": "created"})
    done = {"id": "t1", "status": "completed", "outputs": ["https://x.test/a.png"]}
    routes = {V1_CREATE: create, "GET /v1/requests/t1": Counted(done), "GET /files/{name}": trickle}
    url = await odd_server(routes)
    session = make_session(base_urls={"get3w": url}, pool_size=2)
    slow = [
        TaskResult(
            task_id=f"old{i}",
            provider="get3w",
            model=V1_MODEL,
            status=TaskStatus.COMPLETED,
            outputs=(Output(url=f"{url}/files/{i}.png"),),
        )
        for i in range(2)
    ]
    downloads = [asyncio.ensure_future(session.download(result, tmp_path)) for result in slow]
    try:
        await wait_for(lambda: connected == 2, 2.0)

        async def job() -> TaskResult:
            return await (await session.get3w.submit(V1_MODEL, prompt="a fox"))

        result = await asyncio.wait_for(job(), 1.5)
        assert result.ok and create.calls == 1
    finally:
        for download in downloads:
            download.cancel()
        await asyncio.gather(*downloads, return_exceptions=True)


# Bad ids and bad input.


async def test_review_a_lone_surrogate_task_id_fails_the_handle_untyped(
    make_session: SessionFactory, odd_server: Any
) -> None:
    # Valid JSON ("t\ud800" escaped) from a paid create; the id can never be put in a URL.
    calls = 0

    async def create(request: web.Request) -> web.Response:
        nonlocal calls
        calls += 1
        await request.read()
        return web.Response(body=b'{"id": "t\\ud800", "status": "created"}', content_type="application/json")

    url = await odd_server({V1_CREATE: create})
    session = make_session(base_urls={"get3w": url}, task_timeout=1.0)
    outcomes = []
    try:
        outcomes.append(
            await asyncio.gather(await session.get3w.submit(V1_MODEL, prompt="a fox"), return_exceptions=True)
        )
    except Exception as error:  # a typed refusal at submit is fine too
        outcomes.append([error])
    try:
        outcomes.append(
            await asyncio.gather(session.get3w.resume("r\ud800", V1_MODEL), return_exceptions=True)
        )
    except Exception as error:
        outcomes.append([error])
    assert calls == 1
    assert all(_typed_or_handle(outcome[0]) for outcome in outcomes), outcomes


@pytest.mark.parametrize("model", [None, "", 7])
async def test_review_nananobanana_sends_a_create_for_a_model_that_is_not_a_name(
    make_session: SessionFactory, odd_server: Any, model: Any
) -> None:
    create = Counted(NB_CREATED)
    url = await odd_server({"POST /api/v1/generate": create})
    session = make_session(base_urls={"nananobanana": url})
    with pytest.raises(ImageGenError):
        await session.nananobanana.submit(model, prompt="a fox")
    assert create.calls == 0


@pytest.mark.parametrize("timeout", [1e-300, 1e-9])
async def test_review_a_tiny_timeout_pays_for_a_task_it_never_looks_at(
    make_session: SessionFactory, odd_server: Any, timeout: float
) -> None:
    # timeout=0 is refused before sending ("a deadline that cannot work must not cost a task");
    # 1e-9 is the same deadline, yet the create goes out and the handle ends with 0 polls.
    create = Counted({"id": "t1", "status": "created"})
    done = Counted({"id": "t1", "status": "completed", "outputs": ["https://x.test/a.png"]})
    url = await odd_server({V1_CREATE: create, "GET /v1/requests/t1": done})
    session = make_session(base_urls={"get3w": url})
    try:
        handle = await session.get3w.submit(V1_MODEL, prompt="a fox", timeout=timeout)
    except ImageGenError:
        assert create.calls == 0  # refused before sending: fine
        return
    await asyncio.gather(handle, return_exceptions=True)
    assert done.calls >= 1, "a paid task was never polled before its deadline"
