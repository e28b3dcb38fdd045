"""Hostile answers and bad input lines: each ends as one job's outcome, never as a crashed batch."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp.web
import pytest

from image_gen_async.batch import read_jsonl, run_batch

from .batch_helpers import journal_rows, names, results, write_lines
from .conftest import KEYS, MODELS, SessionFactory

DH3 = MODELS["dh3"]
PNG = b"\x89PNG\r\n\x1a\n" + b"\0" * 32


class OneIdServer:
    """A dh3 look-alike that answers every create with the same task id and records what it got."""

    def __init__(self, poll_answer: Callable[[str], dict[str, Any]]) -> None:
        self.events: list[str] = []
        self.poll_answer = poll_answer
        self.url = ""

    async def create(self, request: aiohttp.web.Request) -> aiohttp.web.Response:
        self.events.append("create")
        return aiohttp.web.json_response({"code": 200, "message": "ok", "task_id": "same-1"})

    async def get(self, request: aiohttp.web.Request) -> aiohttp.web.Response:
        self.events.append("poll")
        body = {"code": 200, "message": "ok", "nano_banana_pro_output": self.poll_answer(self.url)}
        return aiohttp.web.json_response(body)

    async def image(self, request: aiohttp.web.Request) -> aiohttp.web.Response:
        self.events.append("download")
        return aiohttp.web.Response(body=PNG, content_type="image/png")


def succeeded(url: str) -> dict[str, Any]:
    return {"task_id": "same-1", "status": "success", "images": [{"url": f"{url}/img.png"}]}


def failed_with_bad_text(url: str) -> dict[str, Any]:
    return {"task_id": "same-1", "status": "fail", "err_msg": "upstream said \ud800 and gave up"}


async def serve(server: OneIdServer) -> AsyncIterator[OneIdServer]:
    app = aiohttp.web.Application()
    app.router.add_post("/api/v1/task/create", server.create)
    app.router.add_get("/api/v1/task/get", server.get)
    app.router.add_get("/img.png", server.image)
    runner = aiohttp.web.AppRunner(app, shutdown_timeout=0.1)
    await runner.setup()
    await aiohttp.web.TCPSite(runner, "127.0.0.1", 0).start()
    server.url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    try:
        yield server
    finally:
        await runner.cleanup()


@pytest.fixture
async def one_id() -> AsyncIterator[OneIdServer]:
    async for server in serve(OneIdServer(succeeded)):
        yield server


async def test_two_creates_answered_with_one_task_id_are_not_both_done(
    make_session: SessionFactory, one_id: OneIdServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    session = make_session(base_urls={"dh3": one_id.url}, api_keys=KEYS)
    jobs = [{"prompt": "a red fox"}, {"prompt": "a blue fox"}]
    with caplog.at_level(logging.WARNING, "image_gen_async"):
        stats = await run_batch(session, "dh3", DH3, jobs, out_dir=tmp_path, concurrency=1)
    assert (stats.done, stats.uncertain, stats.created) == (1, 1, 2)
    assert one_id.events.count("create") == 2
    # The second job's "task" is never followed: nothing after its create.
    assert one_id.events[one_id.events.index("create", 1) :] == ["create"]
    first, second = sorted(results(tmp_path), key=lambda record: record["line"])
    assert first["status"] == "done" and first["task_id"] == "same-1"
    assert second["status"] == "uncertain" and second["task_id"] is None
    assert "same-1" in second["error"] and "job 1" in second["error"]
    assert journal_rows(tmp_path, "SELECT line, state, task_id FROM jobs ORDER BY line") == [
        (1, "done", "same-1"),
        (2, "uncertain", None),
    ]
    assert names(tmp_path) == ["same-1_0.png"]
    assert "jobs 1 and 2 were both answered with dh3 task same-1" in caplog.text

    # A rerun keeps it that way: nothing is sent, the uncertain job is not polled as job 1's task.
    again = await run_batch(session, "dh3", DH3, jobs, out_dir=tmp_path)
    assert (again.done, again.uncertain, again.created, again.resumed) == (1, 1, 0, 0)
    assert one_id.events.count("create") == 2


async def test_the_same_id_at_once_leaves_one_job_done_and_one_uncertain(
    make_session: SessionFactory, one_id: OneIdServer, tmp_path: Path
) -> None:
    session = make_session(base_urls={"dh3": one_id.url}, api_keys=KEYS)
    jobs = [{"prompt": f"fox number {i}"} for i in range(4)]
    stats = await run_batch(session, "dh3", DH3, jobs, out_dir=tmp_path, concurrency=4)
    assert (stats.done, stats.uncertain, stats.created) == (1, 3, 4)
    assert names(tmp_path) == ["same-1_0.png"]


async def test_a_provider_message_that_is_not_unicode_is_written_not_crashed_on(
    make_session: SessionFactory, tmp_path: Path
) -> None:
    async for server in serve(OneIdServer(failed_with_bad_text)):
        session = make_session(base_urls={"dh3": server.url}, api_keys=KEYS)
        stats = await run_batch(session, "dh3", DH3, [{"prompt": "a red fox"}], out_dir=tmp_path)
        assert stats.failed == 1
        (line,) = results(tmp_path)
        assert line["status"] == "failed" and "upstream said" in line["error"]
        again = await run_batch(session, "dh3", DH3, [{"prompt": "a red fox"}], out_dir=tmp_path)
        assert (again.failed, again.skipped) == (1, 1) and server.events.count("create") == 1


DEEP = "[" * 100_000 + "]" * 100_000


async def test_a_line_nested_100k_deep_fails_alone_and_the_batch_goes_on(
    session: Any, emulator: Any, tmp_path: Path
) -> None:
    source = write_lines(
        tmp_path / "jobs.jsonl",
        [
            json.dumps({"prompt": "a fox in the snow"}),
            DEEP,
            '{"prompt": "a fox", "extra": ' + DEEP + "}",
            json.dumps({"prompt": "a fox in the rain"}),
        ],
    )
    out = tmp_path / "out"
    stats = await run_batch(session, "dh3", DH3, read_jsonl(source), out_dir=out)
    assert (stats.done, stats.failed) == (2, 2)
    by_line = {r["line"]: r for r in results(out)}
    assert all("nested too deeply" in by_line[line]["error"] for line in (2, 3))
    assert emulator.stats.create_requests["dh3"] == 2


async def test_text_that_is_not_unicode_is_refused_before_anything_is_sent(
    session: Any, emulator: Any, tmp_path: Path
) -> None:
    source = tmp_path / "jobs.jsonl"
    source.write_bytes(
        b'{"prompt": "a fox \\ud800 in the snow"}\n'  # a lone surrogate, escaped as JSON allows
        b'{"prompt": "a fox \xff in the rain"}\n'  # a byte that is not UTF-8
        b'{"prompt": "a fox", "seed": NaN}\n'  # not JSON either, though Python reads it
        b'{"prompt": "a fox at dawn"}\n'
    )
    out = tmp_path / "out"
    for _ in range(2):  # the rerun, too, reads and writes them without crashing
        stats = await run_batch(session, "dh3", DH3, read_jsonl(source), out_dir=out)
        assert (stats.done, stats.failed) == (1, 3)
    by_line = {r["line"]: r for r in results(out)}
    assert [by_line[line]["status"] for line in (1, 2, 3, 4)] == ["failed"] * 3 + ["done"]
    assert all("cannot be sent as JSON" in by_line[line]["error"] for line in (1, 2, 3))
    assert emulator.stats.create_requests["dh3"] == 1
