"""nananobanana's stream mode against a hostile server written from the same documents: odd
answers to a stream create, odd events, floods, and streams held while the caller gives up.

Each server here is a tiny aiohttp app of the test's own; creates and polls are counted, and
what the caller got is asserted. Nothing sleeps in place of synchronising: the servers signal
with events, and durations are the server's own behaviour, scaled down."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from aiohttp import web

from image_gen_async import (
    AdmissionTimeoutError,
    AsyncSession,
    SessionClosedError,
    SubmitUncertainError,
    TaskFailedError,
    TaskStatus,
    TaskTimeoutError,
)
from image_gen_async._events import HEARTBEAT, MAX_EVENT_BYTES, EventTooLarge, SseDecoder
from image_gen_async._follow import stream_step
from image_gen_async.providers import Snapshot

from .test_stream import BARE_COMPLETE, BARE_RUNNING, BARE_STARTED, COMPLETE, MODEL, TASK, URL, event

POLL_URL = "https://cdn.example/gen-1-polled.png"


def status(progress: Any, task: str = TASK, **more: Any) -> bytes:
    return event(type="status", message="Generating image", progress=progress, generationId=task, **more)


STARTED = status(0)
HEARTBEAT_LINE = b": heartbeat\n\n"

Create = Callable[["Hostile", web.Request], Awaitable[web.StreamResponse]]


class Hostile:
    """A nananobanana whose create answers as ``create`` says; polls answer ``poll_status``
    (``completed`` with ``POLL_URL``). Creates, polls and hang-ups of a stream are counted."""

    def __init__(self, create: Create, *, poll_status: str = "completed") -> None:
        self._create = create
        self.poll_status = poll_status
        self.creates = 0
        self.polls = 0
        self.hang_ups = 0
        self.hung_up = asyncio.Event()
        self.got_create = asyncio.Event()
        self.release = asyncio.Event()  # set by a test: a held stream goes on
        self._hang_up = asyncio.Condition()

    def routes(self) -> dict[str, Callable[[web.Request], Awaitable[web.StreamResponse]]]:
        return {"POST /api/v1/generate": self.create, "GET /api/v1/generate": self.poll}

    async def create(self, request: web.Request) -> web.StreamResponse:
        self.creates += 1
        await request.read()
        self.got_create.set()
        return await self._create(self, request)

    async def poll(self, request: web.Request) -> web.Response:
        self.polls += 1
        record: dict[str, Any] = {"id": request.query["id"], "processingStatus": self.poll_status}
        if self.poll_status == "completed":
            record["outputImageUrls"] = [POLL_URL]
        return web.json_response({"data": record})

    async def stream(
        self,
        request: web.Request,
        chunks: list[bytes],
        *,
        hold: bool = False,
        heartbeat: float | None = None,
        gzip: bool = False,
        after_release: tuple[bytes, ...] = (),
        linger: bool = False,
    ) -> web.StreamResponse:
        """Send ``chunks``; with ``hold``, wait for ``release`` (heartbeats every ``heartbeat``
        s, if given), then send ``after_release``; with ``linger``, heartbeat on until the client
        hangs up. Each hang-up is counted."""
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        if gzip:
            response.enable_compression(web.ContentCoding.gzip)
        await response.prepare(request)
        try:
            for chunk in chunks:
                await response.write(chunk)
            await self._hold(request, response, heartbeat, hold)
            for chunk in after_release:
                await response.write(chunk)
            if linger:
                never = asyncio.Event()
                while True:
                    await self._heartbeat(request, response, never, 0.02)
            await response.write_eof()
        except (ConnectionError, asyncio.CancelledError):
            async with self._hang_up:
                self.hang_ups += 1
                self.hung_up.set()
                self._hang_up.notify_all()
        return response

    async def _hold(
        self, request: web.Request, response: web.StreamResponse, heartbeat: float | None, hold: bool
    ) -> None:
        while hold and not self.release.is_set():
            await self._heartbeat(request, response, self.release, heartbeat)

    @staticmethod
    async def _heartbeat(
        request: web.Request, response: web.StreamResponse, wake: asyncio.Event, every: float | None
    ) -> None:
        """Wait for ``wake`` at most ``every`` s, else send a heartbeat; a gone client raises."""
        try:
            await asyncio.wait_for(wake.wait(), every)
        except TimeoutError:
            await response.write(HEARTBEAT_LINE)
        if request.transport is None or request.transport.is_closing():
            raise ConnectionResetError

    async def wait_hang_ups(self, count: int) -> None:
        async with self._hang_up:
            await self._hang_up.wait_for(lambda: self.hang_ups >= count)


def streaming(chunks: list[bytes], **options: Any) -> Create:
    async def create(server: Hostile, request: web.Request) -> web.StreamResponse:
        return await server.stream(request, chunks, **options)

    return create


Maker = Callable[..., Awaitable[AsyncSession]]


# The create's answer is not a stream.


async def test_a_stream_create_answered_with_async_json_is_polled(server_session: Maker) -> None:
    async def create(server: Hostile, request: web.Request) -> web.StreamResponse:
        return web.json_response({"success": True, "async": True, "generationId": TASK, "message": "queued"})

    server = Hostile(create)
    session = await server_session(server)
    result = await session.nananobanana.generate(MODEL, prompt="a fox", stream=True)
    assert result.task_id == TASK and list(result.urls) == [POLL_URL]
    assert server.creates == 1 and server.polls >= 1


async def test_a_stream_create_answered_in_the_sync_shape_keeps_its_images(server_session: Maker) -> None:
    async def create(server: Hostile, request: web.Request) -> web.StreamResponse:
        return web.json_response(
            {"success": True, "generationId": TASK, "imageUrls": [URL], "creditsUsed": 1}
        )

    server = Hostile(create)
    session = await server_session(server)
    result = await session.nananobanana.generate(MODEL, prompt="a fox", stream=True)
    assert list(result.urls) == [URL] and server.creates == 1 and server.polls == 0


async def test_a_stream_create_answered_200_html_is_uncertain_and_not_resent(server_session: Maker) -> None:
    async def create(server: Hostile, request: web.Request) -> web.StreamResponse:
        return web.Response(text="<html>welcome</html>", content_type="text/html")

    server = Hostile(create)
    session = await server_session(server)
    with pytest.raises(SubmitUncertainError):
        await session.nananobanana.generate(MODEL, prompt="a fox", stream=True)
    assert server.creates == 1 and server.polls == 0


BUSY = {"error": "Server is busy, too many concurrent tasks. Please retry later.", "type": "server_busy"}


@pytest.mark.parametrize("as_stream", [False, True], ids=["json", "event-stream"])
async def test_a_503_server_busy_is_retried_then_streamed(server_session: Maker, as_stream: bool) -> None:
    async def create(server: Hostile, request: web.Request) -> web.StreamResponse:
        if server.creates == 1:
            if as_stream:
                body = b"data: " + json.dumps(BUSY | {"activeTasks": 10}).encode() + b"\n\n"
                return web.Response(status=503, body=body, content_type="text/event-stream")
            return web.json_response(BUSY | {"activeTasks": 10}, status=503)
        return await server.stream(request, [STARTED, COMPLETE])

    server = Hostile(create)
    session = await server_session(server)
    result = await session.nananobanana.generate(MODEL, prompt="a fox", stream=True)
    assert list(result.urls) == [URL]
    assert server.creates == 2 and server.polls == 0


# Odd but lawful event streams.


async def test_a_gzip_event_stream_is_read(server_session: Maker) -> None:
    server = Hostile(streaming([STARTED, status(40), COMPLETE], gzip=True))
    session = await server_session(server)
    seen: list[float] = []
    result = await session.nananobanana.generate(
        MODEL, prompt="a fox", stream=True, on_progress=lambda done, _: seen.append(done)
    )
    assert list(result.urls) == [URL] and seen == [0, 40, 100]
    assert server.creates == 1 and server.polls == 0


async def test_cr_line_endings_event_lines_and_ids_in_data_only(server_session: Maker) -> None:
    def cr(fields: dict[str, Any]) -> bytes:
        return b"event: message\rid: 3\rretry: 1\rdata: " + json.dumps(fields).encode() + b"\r\r"

    chunks = [
        cr({"type": "status", "progress": 0, "data": {"generationId": TASK}}),
        cr({"type": "status", "progress": 50, "data": {"generationId": TASK}}),
        cr(
            {
                "type": "complete",
                "progress": 100,
                "data": {"generationId": TASK, "success": True, "imageUrls": [URL]},
            }
        ),
    ]
    server = Hostile(streaming(chunks))
    session = await server_session(server)
    handle = await session.nananobanana.submit(MODEL, prompt="a fox", stream=True)
    result = await handle
    assert handle.task_id == TASK and list(result.urls) == [URL] and handle.progress == 100
    assert server.creates == 1 and server.polls == 0


async def test_a_byte_order_mark_does_not_hide_the_first_event(server_session: Maker) -> None:
    # The event-stream format strips one leading U+FEFF: the first event is still an event.
    server = Hostile(streaming([b"\xef\xbb\xbf" + STARTED], hold=True))
    session = await server_session(server, read_timeout=2.0)
    handle = await session.nananobanana.submit(MODEL, prompt="a fox", stream=True)
    assert handle.task_id == TASK and handle.progress == 0
    server.release.set()
    await handle
    assert server.creates == 1


async def test_events_after_the_final_one_change_nothing(server_session: Maker) -> None:
    late = event(type="error", message="oops", generationId=TASK, data={"success": False})
    server = Hostile(streaming([STARTED, COMPLETE, late, status(10)]))
    session = await server_session(server)
    handle = await session.nananobanana.submit(MODEL, prompt="a fox", stream=True)
    result = await handle
    assert list(result.urls) == [URL] and handle.status is TaskStatus.COMPLETED and handle.progress == 100


# Odd final events.


async def test_a_complete_event_with_success_false_fails_the_task(server_session: Maker) -> None:
    failed = event(type="complete", generationId=TASK, message="Upstream error", data={"success": False})
    server = Hostile(streaming([STARTED, failed]))
    session = await server_session(server)
    with pytest.raises(TaskFailedError):
        await session.nananobanana.generate(MODEL, prompt="a fox", stream=True)
    assert server.creates == 1 and server.polls == 0


@pytest.mark.parametrize(
    "data",
    [{"success": True}, {"success": True, "imageUrls": URL}, {"success": True, "imageUrls": []}, None],
    ids=["no-urls", "urls-a-string", "urls-empty", "no-data"],
)
async def test_a_complete_event_without_usable_urls_is_polled_not_failed(
    server_session: Maker, data: dict[str, Any] | None
) -> None:
    # A successful job is paid for: an event that forgot its URLs is no failure; the poll has them.
    done = event(type="complete", progress=100, generationId=TASK, data=data)
    server = Hostile(streaming([STARTED, done]))
    session = await server_session(server)
    result = await session.nananobanana.generate(MODEL, prompt="a fox", stream=True)
    assert result.ok and list(result.urls) == [POLL_URL]
    assert server.creates == 1 and server.polls >= 1


# Odd progress.


@pytest.mark.parametrize(
    ("sent", "seen"),
    [
        (["30"], [0, 30]),  # digits as a string: read best-effort
        ([float("nan")], [0]),
        ([float("inf")], [0]),
        ([-5], [0]),  # below 0: nothing new
        ([250], [0, 100]),  # over 100: capped
        ([60, 30, 0, 80], [0, 60, 80]),  # going backwards: not reported
    ],
    ids=["string", "nan", "inf", "negative", "over-100", "backwards"],
)
async def test_progress_stays_a_rising_number_from_0_to_100(
    server_session: Maker, sent: list[Any], seen: list[float]
) -> None:
    # json.dumps writes NaN and Infinity (1e309 reads as Infinity), as a careless server would.
    server = Hostile(streaming([STARTED, *(status(value) for value in sent)], hold=True))
    session = await server_session(server)
    reported: list[float] = []
    statuses: list[TaskStatus] = []
    handle = await session.nananobanana.submit(
        MODEL, prompt="a fox", stream=True, on_progress=lambda done, _: reported.append(done)
    )
    handle.on_status(statuses.append)
    server.release.set()
    await handle
    assert reported[: len(seen)] == seen
    assert all(0 <= value <= 100 for value in reported)
    assert handle.progress is not None and 0 <= handle.progress <= 100
    running = statuses[statuses.index(TaskStatus.PROCESSING) :] if TaskStatus.PROCESSING in statuses else []
    assert TaskStatus.QUEUED not in running


async def test_a_second_generation_started_does_not_send_the_status_back_to_queued(
    server_session: Maker,
) -> None:
    server = Hostile(streaming([STARTED, status(30), status(0), COMPLETE]))
    session = await server_session(server)
    handle = await session.nananobanana.submit(MODEL, prompt="a fox", stream=True)
    assert [seen async for seen in handle.updates()] == [
        TaskStatus.QUEUED,
        TaskStatus.PROCESSING,
        TaskStatus.COMPLETED,
    ]


# Floods: every event's bytes are bounded, and so is the work per byte.


def test_empty_data_lines_count_towards_the_event_cap() -> None:
    # "data:" lines join with newlines: an event of empty lines grows without bound otherwise.
    decoder = SseDecoder()
    with pytest.raises(EventTooLarge):
        for _ in range(MAX_EVENT_BYTES // 1024 + 2):
            decoder.feed(b"data:\n" * 1024)


def test_a_chunk_of_heartbeats_is_one_heartbeat() -> None:
    # Only liveness matters: ten thousand comments in one read are one sign of life, not 10,000 turns.
    decoder = SseDecoder()
    assert decoder.feed(b":\n" * 10_000) == [HEARTBEAT]
    assert decoder.feed(b":\n" * 10 + STARTED + b":\n" * 10) == [HEARTBEAT, STARTED[6:-2], HEARTBEAT]


async def test_a_flood_of_tiny_events_ends_the_job_once(server_session: Maker) -> None:
    flood = b"".join(status(n % 100) for n in range(5_000)) + b":\n" * 20_000
    server = Hostile(streaming([STARTED, flood, COMPLETE]))
    session = await server_session(server)
    result = await session.nananobanana.generate(MODEL, prompt="a fox", stream=True)
    assert list(result.urls) == [URL] and server.creates == 1 and server.polls == 0


# Time: heartbeats never stretch a deadline, nor a create's exchange.


async def test_heartbeats_do_not_keep_a_job_past_its_deadline(server_session: Maker) -> None:
    server = Hostile(streaming([STARTED], hold=True, heartbeat=0.02), poll_status="processing")
    session = await server_session(server)
    loop = asyncio.get_running_loop()
    began = loop.time()
    with pytest.raises(TaskTimeoutError):
        await session.nananobanana.generate(MODEL, prompt="a fox", stream=True, timeout=0.6)
    assert loop.time() - began < 3.0
    await asyncio.wait_for(server.hung_up.wait(), 5)
    assert server.creates == 1


async def test_a_first_event_after_the_exchange_limit_is_uncertain_and_not_resent(
    server_session: Maker,
) -> None:
    server = Hostile(streaming([HEARTBEAT_LINE], hold=True, heartbeat=0.02, after_release=(STARTED,)))
    session = await server_session(server, read_timeout=0.3, connect_timeout=0.2)
    with pytest.raises(SubmitUncertainError):
        await session.nananobanana.generate(MODEL, prompt="a fox", stream=True)
    await asyncio.wait_for(server.hung_up.wait(), 5)
    assert server.creates == 1 and server.polls == 0


# Giving up: streams let go, connections come back, orphans are named.


async def test_a_submit_cancelled_before_the_first_event_names_its_orphan_and_frees_the_pool(
    server_session: Maker,
) -> None:
    async def create(server: Hostile, request: web.Request) -> web.StreamResponse:
        if server.creates == 1:
            return await server.stream(
                request, [HEARTBEAT_LINE], hold=True, heartbeat=0.02, after_release=(STARTED,), linger=True
            )
        return await server.stream(request, [status(0, "gen-2"), COMPLETE.replace(b"gen-1", b"gen-2")])

    server = Hostile(create)
    session = await server_session(server, pool_size=1)
    submitting = asyncio.create_task(session.nananobanana.submit(MODEL, prompt="a fox", stream=True))
    await server.got_create.wait()
    submitting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await submitting
    server.release.set()  # the task is named only now, after the caller left
    await asyncio.wait_for(server.hung_up.wait(), 5)  # nobody reads the rest of the stream
    assert [orphan.task_id for orphan in session.orphans] == [TASK]
    # One connection in the pool: the next job gets it, so the first one was given back.
    result = await asyncio.wait_for(session.nananobanana.generate(MODEL, prompt="a hen", stream=True), 5)
    assert result.task_id == "gen-2" and server.creates == 2


async def test_closing_the_session_while_a_stream_create_waits_ends_it(server_session: Maker) -> None:
    server = Hostile(streaming([HEARTBEAT_LINE], hold=True, heartbeat=0.02, after_release=(STARTED,)))
    session = await server_session(server)
    submitting = asyncio.create_task(session.nananobanana.submit(MODEL, prompt="a fox", stream=True))
    await server.got_create.wait()
    loop = asyncio.get_running_loop()
    began = loop.time()
    await asyncio.wait_for(session.close(), 5)
    done, _ = await asyncio.wait({submitting}, timeout=5)
    submitting.cancel()
    assert submitting in done, "submit() still waits for its first event after session.close()"
    error = submitting.exception()
    assert isinstance(error, SessionClosedError | SubmitUncertainError), repr(error)
    assert loop.time() - began < 2.0
    await asyncio.wait_for(server.hung_up.wait(), 5)
    assert server.creates == 1


async def test_many_cancelled_streaming_handles_give_their_connections_back(server_session: Maker) -> None:
    jobs = 6

    async def create(server: Hostile, request: web.Request) -> web.StreamResponse:
        n = server.creates
        if n <= jobs:
            return await server.stream(request, [status(0, f"gen-{n}")], hold=True, heartbeat=0.02)
        return await server.stream(
            request, [status(0, f"gen-{n}"), COMPLETE.replace(b"gen-1", f"gen-{n}".encode())]
        )

    server = Hostile(create)
    session = await server_session(server, pool_size=jobs)
    handles = [await session.nananobanana.submit(MODEL, prompt=f"fox {n}", stream=True) for n in range(jobs)]
    for handle in handles:
        handle.cancel()
    # Every connection in the pool is free again: as many new streams run side by side.
    results = await asyncio.wait_for(
        asyncio.gather(
            *(session.nananobanana.generate(MODEL, prompt="hen", stream=True) for _ in range(jobs))
        ),
        5,
    )
    assert all(result.ok for result in results) and server.creates == 2 * jobs
    await asyncio.wait_for(server.wait_hang_ups(jobs), 5)
    assert server.polls == 0


async def test_streams_holding_the_whole_pool_do_not_starve_a_polled_job(server_session: Maker) -> None:
    async def create(server: Hostile, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        n = server.creates
        if body["mode"] == "stream":
            return await server.stream(request, [status(0, f"gen-{n}")], hold=True, heartbeat=0.02)
        return web.json_response({"success": True, "async": True, "generationId": f"gen-{n}"})

    server = Hostile(create)
    session = await server_session(server, pool_size=2, task_timeout=30.0)
    streams = [await session.nananobanana.submit(MODEL, prompt=f"fox {n}", stream=True) for n in range(2)]
    try:
        # Well before the streams' own deadline: the polled job must not wait for one to end.
        polled = await asyncio.wait_for(session.nananobanana.submit(MODEL, prompt="a hen", timeout=2.0), 3)
        result = await asyncio.wait_for(polled, 3)
        assert result.ok and server.polls >= 1
    finally:
        server.release.set()
        for handle in streams:
            handle.cancel()


def _event(status: TaskStatus, progress: float | None) -> Snapshot:
    return Snapshot(task_id=TASK, status=status, progress=progress)


@pytest.mark.parametrize(
    ("now", "progress", "event_status", "event_progress", "expected"),
    [
        (TaskStatus.QUEUED, None, TaskStatus.QUEUED, 0.0, (TaskStatus.QUEUED, 0.0)),
        (TaskStatus.QUEUED, 0.0, TaskStatus.PROCESSING, 30.0, (TaskStatus.PROCESSING, 30.0)),
        (TaskStatus.PROCESSING, 30.0, TaskStatus.QUEUED, 0.0, (TaskStatus.PROCESSING, None)),
        (TaskStatus.PROCESSING, 60.0, TaskStatus.PROCESSING, 30.0, (TaskStatus.PROCESSING, None)),
        (TaskStatus.PROCESSING, 60.0, TaskStatus.PROCESSING, None, (TaskStatus.PROCESSING, None)),
        (TaskStatus.PROCESSING, 60.0, TaskStatus.FAILED, 10.0, (TaskStatus.FAILED, None)),
        (TaskStatus.PROCESSING, 60.0, TaskStatus.COMPLETED, 100.0, (TaskStatus.COMPLETED, 100.0)),
    ],
)
def test_a_stream_step_never_goes_backwards(
    now: TaskStatus,
    progress: float | None,
    event_status: TaskStatus,
    event_progress: float | None,
    expected: tuple[TaskStatus, float | None],
) -> None:
    assert stream_step(now, progress, _event(event_status, event_progress)) == expected


# The documented shape: PROVIDERS.md's events carry no generationId at all (BARE_*).


async def test_a_stream_in_the_documented_shape_reports_its_progress(server_session: Maker) -> None:
    server = Hostile(streaming([BARE_STARTED, BARE_RUNNING, BARE_COMPLETE]))
    session = await server_session(server)
    seen: list[float] = []
    result = await session.nananobanana.generate(
        MODEL, prompt="a fox", stream=True, on_progress=lambda done, _: seen.append(done)
    )
    assert list(result.urls) == [URL] and server.creates == 1
    assert seen == [0, 30, 100]


async def test_a_documented_stream_longer_than_the_exchange_limit_keeps_its_images(
    server_session: Maker,
) -> None:
    async def create(server: Hostile, request: web.Request) -> web.StreamResponse:
        # The job's own length (the server's behaviour): heartbeats for about 0.8 s, then done.
        chunks = [BARE_STARTED, *([HEARTBEAT_LINE] * 40)]
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for chunk in chunks:
            await response.write(chunk)
            await asyncio.sleep(0.02)
        await response.write(BARE_COMPLETE)
        return response

    server = Hostile(create)
    session = await server_session(server, read_timeout=0.3, connect_timeout=0.2)
    result = await session.nananobanana.generate(MODEL, prompt="a fox", stream=True)
    assert list(result.urls) == [URL] and server.creates == 1


async def test_an_error_event_naming_no_task_fails_it_with_the_servers_words(server_session: Maker) -> None:
    # The documented events carry no id: an error event on the stream is the job's failure
    # (charged, as the documents say of a failed generation), never a reason to send again.
    busy = event(type="error", message="Server is busy, too many concurrent tasks. Please retry later.")
    server = Hostile(streaming([busy]))
    session = await server_session(server)
    with pytest.raises(TaskFailedError) as raised:
        await session.nananobanana.generate(MODEL, prompt="a fox", stream=True)
    assert server.creates == 1
    assert "Server is busy" in str(raised.value)  # the server's reason, not only ours


async def test_a_stream_create_waiting_for_a_connection_keeps_its_deadline(server_session: Maker) -> None:
    async def create(server: Hostile, request: web.Request) -> web.StreamResponse:
        return await server.stream(request, [status(0, f"gen-{server.creates}")], hold=True, heartbeat=0.02)

    server = Hostile(create)
    session = await server_session(server, pool_size=1)
    held = await session.nananobanana.submit(MODEL, prompt="a fox", stream=True)
    try:
        waiting = asyncio.create_task(
            session.nananobanana.submit(MODEL, prompt="a hen", stream=True, timeout=0.5)
        )
        done, _ = await asyncio.wait({waiting}, timeout=3)
        waiting.cancel()
        assert waiting in done  # given up at its deadline: nothing was sent, so that is safe
        assert isinstance(waiting.exception(), AdmissionTimeoutError)
        assert server.creates == 1
    finally:
        held.cancel()


@pytest.mark.parametrize(
    ("chunks", "events"),
    [
        ([b"\xef\xbb\xbfdata: a\n\n"], [b"a"]),
        ([b"\xef", b"\xbb", b"\xbfdata: a\n\n"], [b"a"]),  # the mark itself split across reads
        ([b"\xef\xbb\xbf\xef\xbb\xbfdata: a\n\ndata: b\n\n"], [b"b"]),  # only one is dropped
        ([b"data: a\n\n\xef\xbb\xbfdata: b\n\n"], [b"a"]),  # not at the start: part of the line
        ([b"\xef", b"data: a\n\n"], []),  # a start that is not the mark stays (no such field)
        ([b"data:\ndata:\n\n"], [b"\n"]),
    ],
)
def test_the_event_decoder_and_the_byte_order_mark(chunks: list[bytes], events: list[bytes]) -> None:
    decoder = SseDecoder()
    assert [data for chunk in chunks for data in decoder.feed(chunk)] == events
