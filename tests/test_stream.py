"""nananobanana's stream mode: progress from the events, polling when the stream drops, and a
stream that lies, trickles, floods or stops early never costs a second create."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from aiohttp import web

from image_gen_async import (
    AsyncSession,
    InvalidRequestError,
    NotSupportedError,
    SubmitUncertainError,
    TaskFailedError,
    TaskStatus,
    TaskTimeoutError,
)
from image_gen_async._events import MAX_LINE_BYTES, EventTooLarge, SseDecoder
from image_gen_async.testing import Emulator

from .conftest import KEYS, MODELS, SessionFactory

MODEL = MODELS["nananobanana"]
TASK = "gen-1"
URL = "https://cdn.example/gen-1.png"


def event(**fields: Any) -> bytes:
    return b"data: " + json.dumps(fields).encode() + b"\n\n"


STARTED = event(type="status", message="Generation started", progress=0, generationId=TASK)
RUNNING = event(type="status", message="Generating image", progress=30, generationId=TASK)
COMPLETE = event(type="complete", progress=100, generationId=TASK, data={"success": True, "imageUrls": [URL]})
# The documented shape: PROVIDERS.md's events carry no generationId at all.
BARE_STARTED = event(type="status", message="Generation started", progress=0)
BARE_RUNNING = event(type="status", message="Generating image", progress=30)
BARE_COMPLETE = event(type="complete", progress=100, data={"success": True, "imageUrls": [URL]})

# What the stream does after its events: end cleanly, cut the connection, or go quiet.
Ending = str


class StreamServer:
    """A nananobanana of our own whose stream create sends exactly ``events`` then ``ending``;
    its poll answers ``completed`` (counted, as are creates)."""

    def __init__(
        self, events: list[bytes], ending: Ending = "eof", *, poll_status: str = "completed"
    ) -> None:
        self.events = events
        self.ending = ending
        self.poll_status = poll_status
        self.creates = 0
        self.polls = 0
        self.modes: list[str] = []
        self.accepts: list[str] = []
        self.hung_up = asyncio.Event()

    def routes(self) -> dict[str, Callable[[web.Request], Awaitable[web.StreamResponse]]]:
        return {"POST /api/v1/generate": self.create, "GET /api/v1/generate": self.poll}

    async def create(self, request: web.Request) -> web.StreamResponse:
        self.creates += 1
        body = await request.json()
        self.modes.append(body.get("mode"))
        self.accepts.append(request.headers.get("Accept", ""))
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        try:
            for chunk in self.events:
                await response.write(chunk)
            if self.ending == "drop":
                assert request.transport is not None
                request.transport.close()
                return response
            if self.ending == "hang":
                while True:  # quiet until the client hangs up
                    await asyncio.sleep(0.01)
                    await response.write(b"")
                    if request.transport is None or request.transport.is_closing():
                        break
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            self.hung_up.set()
        return response

    async def poll(self, request: web.Request) -> web.Response:
        self.polls += 1
        record: dict[str, Any] = {"id": request.query["id"], "processingStatus": self.poll_status}
        if self.poll_status == "completed":
            record["outputImageUrls"] = [URL]
        return web.json_response({"data": record})


async def test_generate_stream_reports_progress_and_statuses_on_the_emulator(
    make_session: SessionFactory, emulator: Emulator
) -> None:
    emulator.config.duration = 0.2
    session = make_session()
    progress: list[tuple[float, str | None]] = []
    result = await session.nananobanana.generate(
        MODEL, prompt="a fox", stream=True, on_progress=lambda done, message: progress.append((done, message))
    )
    assert result.ok and result.urls
    assert [done for done, _ in progress] == [0, 30, 100]
    assert progress[1][1] == "Generating image"
    assert emulator.stats.creates["nananobanana"] == 1
    assert emulator.stats.polls.get("nananobanana", 0) == 0  # the stream said it all
    sent = [r for r in emulator.requests if r.method == "POST"]
    assert sent[-1].json["mode"] == "stream"


async def test_submit_stream_updates_go_queued_processing_completed(
    make_session: SessionFactory, emulator: Emulator
) -> None:
    emulator.config.duration = 0.2
    session = make_session()
    handle = await session.nananobanana.submit(MODEL, prompt="a fox", stream=True)
    assert [status async for status in handle.updates()] == [
        TaskStatus.QUEUED,
        TaskStatus.PROCESSING,
        TaskStatus.COMPLETED,
    ]
    assert handle.progress == 100 and handle.polls == 0


@pytest.mark.parametrize("ending", ["eof", "drop"])
async def test_a_stream_that_drops_midway_falls_back_to_polling(
    server_session: Callable[..., Awaitable[AsyncSession]], ending: Ending
) -> None:
    server = StreamServer([STARTED, RUNNING], ending)
    session = await server_session(server)
    seen: list[float] = []
    result = await session.nananobanana.generate(
        MODEL, prompt="a fox", stream=True, on_progress=lambda done, _: seen.append(done)
    )
    assert result.ok and result.task_id == TASK and list(result.urls) == [URL]
    assert seen == [0, 30]
    assert server.creates == 1 and server.polls >= 1
    assert server.modes == ["stream"] and server.accepts == ["text/event-stream"]


async def test_a_quiet_stream_is_dropped_after_the_read_timeout_and_polled(
    server_session: Callable[..., Awaitable[AsyncSession]],
) -> None:
    server = StreamServer([STARTED], "hang")
    session = await server_session(server, read_timeout=0.2)
    result = await session.nananobanana.generate(MODEL, prompt="a fox", stream=True)
    assert result.ok and server.creates == 1 and server.polls >= 1
    await asyncio.wait_for(server.hung_up.wait(), 5)  # the quiet connection was let go


async def test_a_stream_that_ends_before_naming_its_task_is_uncertain_and_not_resent(
    server_session: Callable[..., Awaitable[AsyncSession]],
) -> None:
    server = StreamServer([b": heartbeat\n\n", b"data: not json\n\n", event(type="status", progress=0)])
    session = await server_session(server)
    with pytest.raises(SubmitUncertainError):
        await session.nananobanana.generate(MODEL, prompt="a fox", stream=True)
    assert server.creates == 1 and server.polls == 0


async def test_a_flood_line_is_cut_at_its_cap_and_costs_no_second_create(
    server_session: Callable[..., Awaitable[AsyncSession]],
) -> None:
    server = StreamServer([b"data: " + b"x" * (MAX_LINE_BYTES + 10)])
    session = await server_session(server)
    with pytest.raises(SubmitUncertainError):
        await session.nananobanana.generate(MODEL, prompt="a fox", stream=True)
    assert server.creates == 1


async def test_a_flood_after_the_task_is_named_falls_back_to_polling(
    server_session: Callable[..., Awaitable[AsyncSession]],
) -> None:
    server = StreamServer([STARTED, b"data: " + b"x" * (MAX_LINE_BYTES + 10)], "hang")
    session = await server_session(server)
    result = await session.nananobanana.generate(MODEL, prompt="a fox", stream=True)
    assert result.ok and server.creates == 1 and server.polls >= 1


async def test_events_about_another_task_are_passed_over(
    server_session: Callable[..., Awaitable[AsyncSession]],
) -> None:
    other = event(type="complete", generationId="gen-2", data={"success": True, "imageUrls": ["https://x/2.png"]})
    server = StreamServer([STARTED, other, b"data: {\n\n", RUNNING, COMPLETE])
    session = await server_session(server)
    result = await session.nananobanana.generate(MODEL, prompt="a fox", stream=True)
    assert result.task_id == TASK and list(result.urls) == [URL]
    assert server.polls == 0


async def test_an_error_event_fails_the_task_once(
    server_session: Callable[..., Awaitable[AsyncSession]],
) -> None:
    failed = event(type="error", message="Upstream model error", generationId=TASK, data={"success": False})
    server = StreamServer([STARTED, failed])
    session = await server_session(server)
    with pytest.raises(TaskFailedError, match="Upstream model error"):
        await session.nananobanana.generate(MODEL, prompt="a fox", stream=True)
    assert server.creates == 1 and server.polls == 0


async def test_a_stream_that_completes_without_any_id_keeps_its_images(
    server_session: Callable[..., Awaitable[AsyncSession]],
) -> None:
    bare = event(type="complete", progress=100, data={"success": True, "imageUrls": [URL]})
    server = StreamServer([event(type="status", progress=0), bare])
    session = await server_session(server)
    result = await session.nananobanana.generate(MODEL, prompt="a fox", stream=True)
    assert list(result.urls) == [URL] and result.task_id.startswith("stream-")
    assert server.creates == 1


async def test_the_deadline_ends_a_stream_that_never_finishes(
    server_session: Callable[..., Awaitable[AsyncSession]],
) -> None:
    server = StreamServer([STARTED], "hang", poll_status="processing")
    session = await server_session(server)
    with pytest.raises(TaskTimeoutError):
        await session.nananobanana.generate(MODEL, prompt="a fox", stream=True, timeout=0.5)
    assert server.creates == 1 and server.polls >= 1  # the last look before the deadline


async def test_cancelling_the_handle_lets_go_of_the_stream(
    server_session: Callable[..., Awaitable[AsyncSession]],
) -> None:
    server = StreamServer([STARTED], "hang")
    session = await server_session(server)
    handle = await session.nananobanana.submit(MODEL, prompt="a fox", stream=True)
    handle.cancel()
    await asyncio.wait_for(server.hung_up.wait(), 5)
    assert handle.cancelled() and server.polls == 0


async def test_closing_the_session_ends_a_streaming_handle(
    server_session: Callable[..., Awaitable[AsyncSession]],
) -> None:
    server = StreamServer([STARTED], "hang")
    session = await server_session(server)
    handle = await session.nananobanana.submit(MODEL, prompt="a fox", stream=True)
    await session.close()
    with pytest.raises(Exception, match="session closed"):
        await handle
    await asyncio.wait_for(server.hung_up.wait(), 5)


async def test_a_capacity_refusal_of_a_stream_create_waits_its_turn(
    make_session: SessionFactory, emulator: Emulator
) -> None:
    emulator.config.duration = 0.1
    emulator.config.max_concurrent = {"nananobanana": 1}
    session = make_session()
    results = await asyncio.gather(
        *(session.nananobanana.generate(MODEL, prompt=f"fox {n}", stream=True) for n in range(3))
    )
    assert all(result.ok for result in results)
    assert emulator.stats.creates["nananobanana"] == 3
    assert emulator.stats.peak_running["nananobanana"][KEYS["nananobanana"]] == 1


@pytest.mark.parametrize("name", ["get3w", "get3w_v3", "dh3"])
async def test_stream_elsewhere_is_not_supported_and_sends_nothing(
    make_session: SessionFactory, emulator: Emulator, name: str
) -> None:
    session = make_session()
    with pytest.raises(NotSupportedError, match="no stream mode"):
        await session.client(name).generate(MODELS[name], prompt="a fox", stream=True)
    assert sum(emulator.stats.create_requests.values()) == 0


async def test_stream_with_a_webhook_is_refused_before_sending(
    make_session: SessionFactory, emulator: Emulator
) -> None:
    session = make_session()
    with pytest.raises(InvalidRequestError, match="webhook"):
        await session.nananobanana.submit(MODEL, prompt="a fox", stream=True, webhook_url="https://x/cb")
    assert sum(emulator.stats.create_requests.values()) == 0


@pytest.mark.parametrize(
    ("chunks", "events"),
    [
        ([b"data: a\n\n"], [b"a"]),
        ([b"data: a\r\n\r\n"], [b"a"]),
        ([b"data: a\r", b"\n\r", b"\n"], [b"a"]),
        ([b"data: a\rdata: b\r\r"], [b"a\nb"]),
        ([b"da", b"ta: {\"x\"", b": 1}\n", b"\n"], [b'{"x": 1}']),
        ([b": heartbeat\n\n"], [b""]),
        ([b"event: status\nid: 7\nretry: 10\ndata:x\n\n"], [b"x"]),
        ([b"\n\n\n"], []),
        ([b"data: a\n"], []),  # not finished until its blank line
    ],
)
def test_the_event_decoder_table(chunks: list[bytes], events: list[bytes]) -> None:
    decoder = SseDecoder()
    assert [data for chunk in chunks for data in decoder.feed(chunk)] == events


def test_the_event_decoder_caps_a_line_and_an_event() -> None:
    with pytest.raises(EventTooLarge):
        SseDecoder().feed(b"x" * (MAX_LINE_BYTES + 1))
    decoder = SseDecoder()
    with pytest.raises(EventTooLarge):
        for _ in range(8):
            decoder.feed(b"data: " + b"y" * (MAX_LINE_BYTES // 4) + b"\n")


async def test_the_cli_shows_a_streamed_jobs_progress(
    emulator: Emulator, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from image_gen_async import cli

    emulator.config.duration = 0.2
    monkeypatch.setenv("NANANOBANANA_API_KEY", KEYS["nananobanana"])
    argv = ["generate", "--provider", "nananobanana", "--model", MODEL, "--base-url", emulator.url]
    code = await asyncio.to_thread(cli.main, [*argv, "--prompt", "a fox", "--stream"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "queued 0%" in out and "processing 30%" in out and ": completed" in out
    assert out.count("processing 30%") == 1
    assert emulator.stats.creates["nananobanana"] == 1 and not emulator.stats.polls.get("nananobanana")
    code = await asyncio.to_thread(cli.main, [*argv, "--prompt", "a fox", "--stream", "--provider", "dh3"])
    assert code == 2 and "no stream mode" in capsys.readouterr().err


async def test_a_documented_stream_that_drops_before_naming_its_task_is_uncertain_not_polled(
    server_session: Callable[..., Awaitable[AsyncSession]],
) -> None:
    server = StreamServer([BARE_STARTED, BARE_RUNNING], "drop")
    session = await server_session(server)
    seen: list[float] = []
    handle = await session.nananobanana.submit(
        MODEL, prompt="a fox", stream=True, on_progress=lambda done, _: seen.append(done)
    )
    assert handle.task_id.startswith("stream-")  # ours: the events name none
    with pytest.raises(SubmitUncertainError, match="cannot be polled"):
        await handle
    assert seen == [0, 30] and server.creates == 1 and server.polls == 0


async def test_an_id_named_late_replaces_the_provisional_one_and_is_polled(
    server_session: Callable[..., Awaitable[AsyncSession]],
) -> None:
    server = StreamServer([BARE_STARTED, RUNNING], "drop")  # the second event names gen-1
    session = await server_session(server)
    handle = await session.nananobanana.submit(MODEL, prompt="a fox", stream=True)
    result = await handle
    assert handle.task_id == TASK and result.task_id == TASK
    assert server.creates == 1 and server.polls >= 1
