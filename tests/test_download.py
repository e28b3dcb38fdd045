"""session.download against the emulator and against a hostile server, over real sockets."""

from __future__ import annotations

import struct
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web

from image_gen_async import AsyncSession, DownloadError, Output, TaskResult, TaskStatus
from image_gen_async.download import extension_for, safe_task_id
from image_gen_async.testing import Emulator, make_png

from .batch_helpers import names
from .conftest import CLIENTS, KEYS, MODELS, SessionFactory

PNG = make_png(8, 4)


def png_size(data: bytes) -> tuple[int, int]:
    """Width and height from a PNG's IHDR chunk."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def completed(task_id: str, *urls: str) -> TaskResult:
    """A finished task as a provider would report it."""
    return TaskResult(
        task_id=task_id,
        provider="dh3",
        model="nano-banana-pro",
        status=TaskStatus.COMPLETED,
        outputs=tuple(Output(url=url) for url in urls),
    )


async def test_outputs_are_saved_under_our_name_in_the_requested_shape(
    session: AsyncSession, emulator: Emulator, tmp_path: Path
) -> None:
    result = await session.dh3.generate(MODELS["dh3"], prompt="a wide fox", aspect_ratio="16:9")
    (path,) = await session.download(result, tmp_path / "out")
    assert path == tmp_path / "out" / f"{result.task_id}_0.png"
    assert png_size(path.read_bytes()) == (64, 36)  # the emulator's 64 px, shaped 16:9
    assert names(tmp_path / "out", "*") == [path.name]  # no *.part left behind
    # Output URLs live on storage hosts: no key travels with a download.
    (fetch,) = [r for r in emulator.requests if r.kind == "file"]
    assert "Authorization" not in fetch.headers
    assert all(key not in str(fetch.headers) for key in KEYS.values())


@pytest.mark.parametrize("client", CLIENTS)
async def test_every_api_serves_pngs_of_the_requested_shape(
    session: AsyncSession, tmp_path: Path, client: str
) -> None:
    result = await session.client(client).generate(MODELS[client], prompt="a tall fox", aspect_ratio="3:4")
    (path,) = await session.download(result, tmp_path)
    assert png_size(path.read_bytes()) == (48, 64)


async def test_a_file_already_saved_is_not_fetched_again(
    session: AsyncSession, emulator: Emulator, tmp_path: Path
) -> None:
    result = await session.get3w.generate(MODELS["get3w"], prompt="a fox")
    first = await session.download(result, tmp_path)
    second = await session.download(result, tmp_path)
    assert first == second and emulator.stats.downloads == 1


def test_file_names_come_from_the_task_id_only() -> None:
    assert safe_task_id("abc-123_x.y") == "abc-123_x.y"
    hostile = safe_task_id("../../etc/passwd")
    assert "/" not in hostile and not hostile.startswith(".")
    assert safe_task_id(".hidden").startswith("_")
    assert safe_task_id("a/b") != safe_task_id("a_b")  # a changed id gets a hash of the original
    assert len(safe_task_id("x" * 1000)) < 140
    assert safe_task_id("")
    assert [extension_for(t) for t in ("image/png", "IMAGE/JPEG; q=1", "image/webp", "text/html", None)] == [
        ".png",
        ".jpg",
        ".webp",
        ".bin",
        ".bin",
    ]


# --- a hostile storage host and a hostile dh3 ----------------------------------------------


class Hostile:
    """A loopback server that misbehaves on purpose; `hits` counts requests per path."""

    def __init__(self) -> None:
        self.hits: dict[str, int] = {}
        self.headers: list[dict[str, str]] = []
        self.failures_left = 0
        self.url = ""

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/api/v1/task/create", self.create)
        app.router.add_get("/api/v1/task/get", self.get)
        app.router.add_get("/{name}", self.file)
        return app

    async def create(self, request: web.Request) -> web.Response:
        return web.json_response({"code": 200, "message": "ok", "task_id": "../../evil"})

    async def get(self, request: web.Request) -> web.Response:
        image = {"url": f"{self.url}/png", "content_type": "image/png", "file_name": "../../escaped.png"}
        output = {"task_id": "../../evil", "status": "success", "images": [image]}
        return web.json_response({"code": 200, "message": "Ok", "nano_banana_pro_output": output})

    async def file(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        self.hits[name] = self.hits.get(name, 0) + 1
        self.headers.append(dict(request.headers))
        if name == "flaky" and self.failures_left > 0:
            self.failures_left -= 1
            return web.Response(status=503, headers={"Retry-After": "0"})
        if name == "missing":
            return web.Response(status=404)
        if name == "big":  # a Content-Length over the cap
            return web.Response(body=b"x" * 5000, content_type="image/png")
        if name == "endless":  # chunked, no length: only the count of bytes can stop it
            response = web.StreamResponse(headers={"Content-Type": "image/png"})
            response.enable_chunked_encoding()
            await response.prepare(request)
            for _ in range(50):
                await response.write(b"y" * 1000)
            await response.write_eof()
            return response
        if name == "jpeg":
            return web.Response(body=b"\xff\xd8\xff", content_type="image/jpeg")
        if name == "odd":
            return web.Response(body=b"??", content_type="application/x-unknown")
        return web.Response(body=PNG, content_type="image/png")


@pytest.fixture
async def hostile() -> AsyncIterator[Hostile]:
    server = Hostile()
    runner = web.AppRunner(server.app(), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    server.url = f"http://{host}:{port}"
    yield server
    await runner.cleanup()


async def test_a_servers_file_name_and_task_id_never_choose_the_path(
    make_session: SessionFactory, hostile: Hostile, tmp_path: Path
) -> None:
    session = make_session(base_urls={"dh3": hostile.url})
    result = await session.dh3.generate(MODELS["dh3"], prompt="a fox")
    assert result.outputs[0].file_name == "../../escaped.png"
    out = tmp_path / "a" / "b"
    (path,) = await session.download(result, out)
    assert path.parent == out and path.name == f"{safe_task_id('../../evil')}_0.png"
    assert path.read_bytes() == PNG
    assert names(tmp_path, "*") == [path.name]
    assert all("Authorization" not in headers for headers in hostile.headers)


@pytest.mark.parametrize("name", ["big", "endless"])
async def test_a_body_over_the_cap_leaves_no_file(
    session: AsyncSession, hostile: Hostile, tmp_path: Path, name: str
) -> None:
    with pytest.raises(DownloadError, match="cap"):
        await session.download(completed("t1", f"{hostile.url}/{name}"), tmp_path, max_bytes=4000)
    assert names(tmp_path, "*") == []
    assert hostile.hits[name] == 1  # not retried: it would only be too large again


@pytest.mark.parametrize("url", ["file:///etc/passwd", "ftp://127.0.0.1/x.png", "/relative/x.png"])
async def test_only_http_urls_are_fetched(
    session: AsyncSession, hostile: Hostile, tmp_path: Path, url: str
) -> None:
    # The refused URL comes second: nothing of the result is fetched once any URL is refused.
    with pytest.raises(DownloadError, match="only http"):
        await session.download(completed("t2", f"{hostile.url}/png", url), tmp_path)
    assert names(tmp_path, "*") == [] and hostile.hits == {}


async def test_transient_errors_are_retried_and_others_are_not(
    session: AsyncSession, hostile: Hostile, tmp_path: Path
) -> None:
    hostile.failures_left = 2
    (path,) = await session.download(completed("t3", f"{hostile.url}/flaky"), tmp_path)
    assert path.read_bytes() == PNG and hostile.hits["flaky"] == 3
    with pytest.raises(DownloadError, match="HTTP 404"):
        await session.download(completed("t4", f"{hostile.url}/missing"), tmp_path)
    assert hostile.hits["missing"] == 1


async def test_extension_follows_the_content_type(
    session: AsyncSession, hostile: Hostile, tmp_path: Path
) -> None:
    paths = await session.download(completed("t5", f"{hostile.url}/jpeg", f"{hostile.url}/odd"), tmp_path)
    assert [p.name for p in paths] == ["t5_0.jpg", "t5_1.bin"]


async def test_a_disk_error_is_a_download_error(
    session: AsyncSession, hostile: Hostile, tmp_path: Path
) -> None:
    blocker = tmp_path / "not-a-directory"
    blocker.write_bytes(b"")
    with pytest.raises(DownloadError):
        await session.download(completed("t9", f"{hostile.url}/png"), blocker / "out")
