"""The webhook receiver under a hostile sender, over real sockets on loopback.

Slow headers and bodies are dropped within the read timeout, a wrong token is refused
before any body is read, connections beyond the cap are closed at once, a gzip bomb is
refused before it inflates, deep JSON is a 400, kept callbacks stay under their byte cap,
and ``listen()`` on a taken port fails cleanly.
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import socket
import struct
import tracemalloc
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from functools import cache
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from yarl import URL

from image_gen_async import AsyncSession, ConfigurationError, PollSettings, TaskFailedError
from image_gen_async.testing import Emulator
from image_gen_async.webhooks import EARLY_TTL, must_evict

from .conftest import CLIENTS, SessionFactory

PATIENT = PollSettings(first_poll=0.02, min_interval=0.005, max_interval=0.1, webhook_unknown_wait=30.0)
MODEL = "nano-banana-pro"
Listening = Callable[..., Awaitable[AsyncSession]]


@pytest.fixture
def listening(make_session: SessionFactory) -> Listening:
    """A session whose receiver listens on loopback with a scaled-down read timeout."""

    async def make(read_timeout: float = 0.3, **listen: Any) -> AsyncSession:
        session = make_session(polling=PATIENT)
        session.webhooks.read_timeout = read_timeout
        await session.webhooks.listen("127.0.0.1", 0, **listen)
        return session

    return make


def dh3_callback(task_id: str, status: str = "fail", **extra: Any) -> bytes:
    output = {"task_id": task_id, "status": status, "err_msg": "from the test"} | extra
    return json.dumps({"code": 200, "message": "Ok", "nano_banana_pro_output": output}).encode()


async def send_head(
    url: URL, *, length: int | None, body: bytes = b"", headers: str = ""
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Open a connection and send a POST's head and the first ``body`` bytes (maybe not all of it)."""
    reader, writer = await asyncio.open_connection(url.host, url.port)
    sized = f"Content-Length: {length}\r\n" if length is not None else ""
    writer.write(f"POST {url.raw_path} HTTP/1.1\r\nHost: x\r\n{sized}{headers}\r\n".encode() + body)
    await writer.drain()
    return reader, writer


async def until_closed(reader: asyncio.StreamReader) -> bytes:
    """Everything the server sends before it closes the connection."""
    try:
        return await reader.read()
    except ConnectionResetError:
        return b""


def status_of(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1]) if answer else 0


# 11: slow senders and the token checked first.


async def test_a_slow_body_is_dropped_within_the_read_timeout(listening: Listening) -> None:
    session = await listening(read_timeout=0.3)
    loop = asyncio.get_running_loop()
    started = loop.time()
    reader, writer = await send_head(URL(session.webhooks.url_for("dh3")), length=1000, body=b'{"code": 2')
    answer = await asyncio.wait_for(until_closed(reader), 2.0)
    took = loop.time() - started
    writer.close()
    assert status_of(answer) == 408
    assert 0.25 <= took < 0.9
    assert session.webhooks.stats.timed_out == 1


async def test_slow_headers_are_dropped_within_the_read_timeout(listening: Listening) -> None:
    session = await listening(read_timeout=0.3)
    url = URL(session.webhooks.url_for("dh3"))
    loop = asyncio.get_running_loop()
    started = loop.time()
    reader, writer = await asyncio.open_connection(url.host, url.port)
    writer.write(f"POST {url.raw_path} HTTP/1.1\r\nHost: x\r\n".encode())  # and never the blank line
    await writer.drain()
    answer = await asyncio.wait_for(until_closed(reader), 2.0)
    took = loop.time() - started
    writer.close()
    assert answer == b"" and 0.25 <= took < 0.9


async def test_wrong_token_or_client_is_refused_before_the_body_is_read(listening: Listening) -> None:
    """Fifty senders of a 1 MiB body that never comes: each refused at once, none waits for the timeout."""
    session = await listening(read_timeout=5.0)
    good = URL(session.webhooks.url_for("dh3"))
    forged = good.with_path(good.path.rsplit("/", 1)[0] + "/not-the-token")
    unknown_client = good.with_path(good.path.replace("/dh3/", "/nope/"))
    loop = asyncio.get_running_loop()
    started = loop.time()
    opened = await asyncio.gather(
        *(send_head(url, length=1 << 20, body=b"x" * 100) for url in [forged] * 40 + [unknown_client] * 10)
    )
    answers = await asyncio.wait_for(asyncio.gather(*(until_closed(r) for r, _ in opened)), 4.0)
    took = loop.time() - started
    for _, writer in opened:
        writer.close()
    assert [status_of(a) for a in answers] == [401] * 40 + [404] * 10
    assert took < 1.0  # well inside the 5 s a body read would have been allowed
    stats = session.webhooks.stats
    assert (stats.rejected, stats.timed_out, stats.received) == (50, 0, 50)


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts this process's descriptors")
async def test_connections_beyond_the_cap_are_closed_and_callbacks_still_come(listening: Listening) -> None:
    session = await listening(read_timeout=0.5, max_connections=16)
    url = URL(session.webhooks.url_for("dh3"))
    descriptors = len(os.listdir("/proc/self/fd"))
    opened = []
    for _ in range(100):
        reader, writer = await asyncio.open_connection(url.host, url.port)
        writer.write(b"POST / HTTP/1.1\r\nHost: x\r\n")  # headers that never end
        opened.append((reader, writer))
    reads = [asyncio.ensure_future(until_closed(reader)) for reader, _ in opened]
    # 84 are closed at once; the 16 the server holds stay open until the read timeout.
    refused = []
    for closed in asyncio.as_completed(reads, timeout=0.4):
        refused.append(await closed)
        if len(refused) == 84:
            break
    assert refused == [b""] * 84 and session.webhooks.stats.refused_connections == 84
    assert sum(not read.done() for read in reads) == 16
    # The 100 client ends are ours; the server side holds 16, not 100.
    assert len(os.listdir("/proc/self/fd")) <= descriptors + 100 + 16 + 2
    held = await asyncio.wait_for(asyncio.gather(*reads), 2.0)
    assert held == [b""] * 100  # the held ones dropped by the read timeout, answered nothing
    for _, writer in opened:
        writer.close()
    handle = await session.dh3.submit(MODEL, prompt="a fox", webhook=True)
    assert (await handle).ok and handle.polls == 0


# 8: decoded bytes capped; a gzip bomb refused before it inflates.


@cache
def gzip_bomb() -> bytes:
    """1 MiB of gzip that inflates to 1 GiB of zeros (a valid stream, trailer and all)."""
    block = bytes(1 << 20)
    packer = zlib.compressobj(9, zlib.DEFLATED, 31)
    first = packer.compress(block) + packer.flush(zlib.Z_FULL_FLUSH)
    # After a full flush the packer forgets what came before: each further MiB packs the same.
    again = packer.compress(block) + packer.flush(zlib.Z_FULL_FLUSH)
    crc = 0
    for _ in range(1024):
        crc = zlib.crc32(block, crc)
    return first + again * 1023 + b"\x03\x00" + struct.pack("<II", crc, (1 << 30) & 0xFFFFFFFF)


async def mounted(session: AsyncSession) -> AsyncIterator[str]:
    """The receiver mounted in an aiohttp app of the test's own (aiohttp undoes the encoding)."""
    app = web.Application()
    app.add_subapp("/hooks/", session.webhooks.app())
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}/hooks"
    finally:
        await runner.cleanup()


@pytest.mark.parametrize("where", ["listen", "mounted"])
async def test_a_gzip_bomb_is_refused_before_it_is_sent_whole(
    listening: Listening, make_session: SessionFactory, where: str
) -> None:
    bomb = gzip_bomb()
    assert len(bomb) < 1.1 * (1 << 20)
    if where == "listen":
        session = await listening(read_timeout=5.0)
        url = URL(session.webhooks.url_for("dh3"))
        answer = await post_prefix(url, bomb)
    else:
        session = make_session(polling=PATIENT)
        async for base in mounted(session):
            session.webhooks.public_url = base
            answer = await post_prefix(URL(session.webhooks.url_for("dh3")), bomb, until_eof=False)
    # 64 KiB of it sent (64 MiB if inflated whole): refused with the rest never sent.
    assert status_of(answer) == 413
    assert session.webhooks.stats.too_large == 1


async def post_prefix(url: URL, body: bytes, *, until_eof: bool = True) -> bytes:
    """Send a gzip body's head and first 64 KiB only, and read the answer."""
    reader, writer = await send_head(
        url, length=len(body), body=body[: 64 * 1024], headers="Content-Encoding: gzip\r\n"
    )
    try:
        if until_eof:  # listen()'s server closes a connection whose body it did not read
            return await asyncio.wait_for(until_closed(reader), 2.0)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 2.0)
        return head
    finally:
        writer.close()


def encoded(body: bytes, encoding: str) -> bytes:
    wbits = {"gzip": 31, "deflate": 15, "raw-deflate": -15}[encoding]
    packer = zlib.compressobj(6, zlib.DEFLATED, wbits)
    return packer.compress(body) + packer.flush()


@pytest.mark.parametrize(
    ("where", "encoding"),
    [("listen", "gzip"), ("listen", "deflate"), ("listen", "raw-deflate"), ("mounted", "gzip")],
)
async def test_a_compressed_callback_is_read(
    listening: Listening, make_session: SessionFactory, emulator: Emulator, where: str, encoding: str
) -> None:
    emulator.config.duration = 1.0  # [slow]: 10 s, so the emulator's own callback never comes first
    session = await listening() if where == "listen" else make_session(polling=PATIENT)
    handle = await _slow_job_when_listening(session, where)
    wire = encoded(dh3_callback(handle.task_id), encoding)
    header = "deflate" if encoding == "raw-deflate" else encoding

    async def deliver() -> int:
        async with aiohttp.ClientSession(auto_decompress=False) as http:
            url = session.webhooks.url_for("dh3")
            async with http.post(url, data=wire, headers={"Content-Encoding": header}) as answer:
                return answer.status

    if where == "listen":
        assert await deliver() == 200
    else:
        async for base in mounted(session):
            session.webhooks.public_url = base
            assert await deliver() == 200
    with pytest.raises(TaskFailedError, match="from the test"):
        await handle
    assert handle.polls == 0


async def _slow_job_when_listening(session: AsyncSession, where: str) -> Any:
    if where == "mounted":
        session.webhooks.public_url = "http://127.0.0.1:9/hooks"  # replaced before the callback
    return await session.dh3.submit(MODEL, prompt="long one [slow]", webhook=True)


async def test_an_unknown_encoding_is_refused(listening: Listening) -> None:
    session = await listening()
    async with aiohttp.ClientSession() as http:
        url = session.webhooks.url_for("dh3")
        async with http.post(url, data=b"\x00\x01", headers={"Content-Encoding": "br"}) as answer:
            assert answer.status == 415
        async with http.post(url, data=b"not gzip", headers={"Content-Encoding": "gzip"}) as answer:
            assert answer.status == 400
    assert session.webhooks.stats.malformed == 2


# 10: JSON nested too deep is malformed, not a crash.


async def test_deeply_nested_json_is_a_400(listening: Listening, emulator: Emulator) -> None:
    emulator.config.duration = 1.0  # [slow]: 10 s, still running after every post below
    session = await listening()
    handle = await session.dh3.submit(MODEL, prompt="long one [slow]", webhook=True)
    deep_list = b"[" * 100_000 + b"]" * 100_000
    nested: Any = {"task_id": handle.task_id, "status": "success"}
    for _ in range(900):  # parses, but a recursive look for the task id goes too deep
        nested = {"data": nested}
    deep_ids = json.dumps(nested).encode()
    async with aiohttp.ClientSession() as http:
        url = session.webhooks.url_for("dh3")
        for body in (deep_list, deep_ids):
            async with http.post(url, data=body) as answer:
                assert answer.status == 400
    token = session.webhooks.url_for("dh3").rsplit("/", 1)[1]
    assert (await session.webhooks.handle("dh3", deep_list, {}, token=token))[0] == 400
    assert session.webhooks.stats.malformed == 3
    assert not handle.done()


# 11: kept callbacks bounded by bytes.


@pytest.mark.parametrize(
    ("count", "size", "age", "evict"),
    [
        (10, 100, 0.0, False),
        (4097, 100, 0.0, True),  # over the count
        (10, 16 * 1024 * 1024 + 1, 0.0, True),  # over the bytes
        (10, 16 * 1024 * 1024, 0.0, False),
        (1, 1, EARLY_TTL, True),  # too old
        (1, 1, EARLY_TTL - 1, False),
    ],
)
def test_must_evict(count: int, size: int, age: float, evict: bool) -> None:
    assert must_evict(count, size, 1000.0 - age, 1000.0, (4096, 16 * 1024 * 1024)) is evict


async def test_kept_callbacks_stay_under_their_byte_cap(listening: Listening) -> None:
    """16 unknown callbacks of 32 KiB (a list of 16k numbers each once parsed) hold at most the cap."""
    session = await listening()
    session.webhooks.max_early_bytes = 64 * 1024
    padding = [0] * (16 * 1024)
    bodies = [dh3_callback(f"nobody-{i}", "success", pad=padding) for i in range(16)]
    url = session.webhooks.url_for("dh3")
    async with aiohttp.ClientSession() as http:
        gc.collect()
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            for body in bodies:
                async with http.post(url, data=body) as answer:
                    assert answer.status == 200 and (await answer.json())["known"] is False
            gc.collect()
            held = tracemalloc.get_traced_memory()[0] - before
        finally:
            tracemalloc.stop()
    assert session.webhooks.stats.unknown == 16
    assert 0 < session.webhooks.early_bytes <= 64 * 1024
    assert held < 512 * 1024  # kept parsed, as before, they held over 2 MiB


@pytest.fixture
async def early_dh3(
    make_session: SessionFactory, emulator: Any
) -> AsyncIterator[tuple[AsyncSession, list[int]]]:
    """A session whose dh3 is a lookalike that calls back before it answers the create.

    It delivers the task's callback, then one unknown callback padded by each entry of
    ``fillers`` (bytes), and only then answers with the task id: a callback that beat
    its create's answer back.
    """
    fillers: list[int] = []

    async def create(request: web.Request) -> web.Response:
        callback_url = (await request.json())["callback_url"]
        bodies = [dh3_callback("early-1")]
        bodies += [dh3_callback(f"filler-{i}", "success", pad="x" * n) for i, n in enumerate(fillers)]
        async with aiohttp.ClientSession() as http:
            for body in bodies:
                async with http.post(callback_url, data=body) as answer:
                    assert answer.status == 200
        return web.json_response({"code": 200, "message": "Ok", "task_id": "early-1"})

    app = web.Application()
    app.router.add_post("/api/v1/task/create", create)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    origins = dict.fromkeys(CLIENTS, emulator.url) | {"dh3": f"http://127.0.0.1:{runner.addresses[0][1]}"}
    session = make_session(polling=PATIENT, base_urls=origins)
    await session.webhooks.listen()
    try:
        yield session, fillers
    finally:
        await runner.cleanup()


async def test_a_callback_before_its_create_answer_is_kept_and_applied(
    early_dh3: tuple[AsyncSession, list[int]],
) -> None:
    session, fillers = early_dh3
    session.webhooks.max_early_bytes = 64 * 1024
    fillers.extend([16 * 1024] * 2)  # 32 KiB more: the task's callback still fits
    handle = await session.dh3.submit(MODEL, prompt="a fox", webhook=True)
    assert handle.done() and handle.polls == 0  # applied as the handle appeared
    with pytest.raises(TaskFailedError, match="from the test"):
        await handle
    assert session.webhooks.early_bytes <= 64 * 1024


async def test_the_oldest_kept_callback_goes_when_the_bytes_run_out(
    early_dh3: tuple[AsyncSession, list[int]],
) -> None:
    session, fillers = early_dh3
    session.webhooks.max_early_bytes = 64 * 1024
    fillers.extend([24 * 1024] * 3)  # 72 KiB after it: the task's callback is dropped first
    handle = await session.dh3.submit(MODEL, prompt="a fox", webhook=True)
    assert not handle.done()  # left to the polling safety net
    assert 48 * 1024 < session.webhooks.early_bytes <= 64 * 1024
    assert session.webhooks.stats.unknown == 4


# 20: listen() on a port in use.


def live_runners() -> int:
    """aiohttp runners set up and not cleaned up, in this process."""
    return sum(isinstance(o, web.AppRunner) and o.server is not None for o in gc.get_objects())


async def test_listen_on_a_port_in_use_fails_cleanly_and_can_be_retried(
    make_session: SessionFactory,
) -> None:
    session = make_session(polling=PATIENT)
    before = live_runners()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ConfigurationError, match=f"cannot listen on 127.0.0.1:{port}"):
            await session.webhooks.listen("127.0.0.1", port)
    assert live_runners() == before  # the runner made for it was cleaned up
    assert session.webhooks.public_url is None
    url = await session.webhooks.listen("127.0.0.1", 0)
    assert session.webhooks.public_url == url
    handle = await session.dh3.submit(MODEL, prompt="a fox", webhook=True)
    assert (await handle).ok and handle.polls == 0
