"""The provider emulator itself, spoken to over real sockets with a raw aiohttp client."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import struct
import time
import zlib
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from image_gen_async.testing import Emulator, EmulatorConfig, Faults, make_png
from image_gen_async.testing.__main__ import config_from, parse_args

KEY = "sk-emulator-test"
AUTH = {"Authorization": f"Bearer {KEY}"}
PROVIDERS = ("get3w", "get3w_v3", "dh3", "nananobanana")
V1_MODEL = "google/nano-banana-pro/text-to-image"
V1_PATH = f"/v1/{V1_MODEL}"
V3_PATH = "/api/v3/get3w/flux-dev"
DH3_CREATE = "/api/v1/task/create"
DH3_GET = "/api/v1/task/get"
NANA = "/api/v1/generate"
TERMINAL = {"completed", "failed", "success", "fail"}
FAILED_WORDS = {"failed", "fail"}
DROPPED = (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError)


# --- helpers: one place that knows each API's request and answer shapes ----------------


def create_request(provider: str, prompt: str = "a red fox") -> tuple[str, dict[str, Any]]:
    """Path and JSON body of an async create on `provider`."""
    if provider == "get3w":
        return V1_PATH, {"prompt": prompt}
    if provider == "get3w_v3":
        return V3_PATH, {"prompt": prompt}
    if provider == "dh3":
        return DH3_CREATE, {"model": "nano-banana-pro", "nano_banana_pro_input": {"prompt": prompt}}
    return NANA, {"prompt": prompt, "mode": "async"}


def task_id_of(provider: str, body: dict[str, Any]) -> str:
    """The task id in a create answer."""
    if provider == "get3w":
        return str(body["id"])
    if provider == "get3w_v3":
        return str(body["data"]["id"])
    if provider == "dh3":
        return str(body["task_id"])
    return str(body["generationId"])


def poll_request(provider: str, task_id: str) -> tuple[str, dict[str, str]]:
    """Path and query of a status GET."""
    if provider == "get3w":
        return f"/v1/requests/{task_id}", {}
    if provider == "get3w_v3":
        return f"/api/v3/predictions/{task_id}", {}
    if provider == "dh3":
        return DH3_GET, {"task_id": task_id}
    return NANA, {"id": task_id}


def status_and_error(provider: str, body: dict[str, Any]) -> tuple[str, str | None]:
    """The status word and error text of a poll answer."""
    if provider == "get3w":
        return body["status"], body["error"]
    if provider == "get3w_v3":
        return body["data"]["status"], body["data"].get("error")
    if provider == "dh3":
        out = body["nano_banana_pro_output"]
        return out["status"], out.get("err_msg")
    return body["data"]["processingStatus"], body["data"].get("errorMessage")


async def submit(http: aiohttp.ClientSession, provider: str, prompt: str = "a red fox") -> str:
    """Create a task and return its id."""
    path, body = create_request(provider, prompt)
    async with http.post(path, json=body) as resp:
        assert resp.status == 200, await resp.text()
        return task_id_of(provider, await resp.json())


async def poll(http: aiohttp.ClientSession, provider: str, task_id: str) -> dict[str, Any]:
    """One status GET, asserted to be HTTP 200."""
    path, params = poll_request(provider, task_id)
    async with http.get(path, params=params) as resp:
        assert resp.status == 200, await resp.text()
        answer: dict[str, Any] = await resp.json()
        return answer


async def poll_until_done(
    http: aiohttp.ClientSession, provider: str, task_id: str, tries: int = 500
) -> tuple[list[str], dict[str, Any]]:
    """Poll every 10 ms until terminal; return the distinct statuses seen and the last body."""
    seen: list[str] = []
    for _ in range(tries):
        body = await poll(http, provider, task_id)
        status, _ = status_and_error(provider, body)
        if not seen or seen[-1] != status:
            seen.append(status)
        if status in TERMINAL:
            return seen, body
        await asyncio.sleep(0.01)
    raise AssertionError(f"{provider} task {task_id} never finished: {seen}")


async def eventually(predicate: Any, tries: int = 300) -> None:
    """Wait (bounded) for a condition another task makes true."""
    for _ in range(tries):
        if predicate():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition never became true")


def png_size(data: bytes) -> tuple[int, int]:
    """Width and height from a PNG's IHDR, checking the signature on the way."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


class Receiver:
    """A webhook receiver that answers the queued statuses, then 200."""

    def __init__(self) -> None:
        self.statuses: list[int] = []
        self.calls: list[tuple[dict[str, str], bytes]] = []
        self.url = ""

    async def handle(self, request: web.Request) -> web.Response:
        self.calls.append((dict(request.headers), await request.read()))
        return web.Response(status=self.statuses.pop(0) if self.statuses else 200)


# --- fixtures ----------------------------------------------------------------------------


@pytest.fixture
async def emu() -> AsyncIterator[Emulator]:
    async with Emulator(EmulatorConfig(duration=0.05, dh3_qps=None)) as emulator:
        yield emulator


@pytest.fixture
async def http(emu: Emulator) -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(emu.url, headers=AUTH) as session:
        yield session


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    rec = Receiver()
    app = web.Application()
    app.router.add_post("/hook", rec.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    host, port = runner.addresses[0][:2]
    rec.url = f"http://{host}:{port}/hook"
    yield rec
    await runner.cleanup()


# --- flows per API -------------------------------------------------------------------------


EXPECTED_STATUSES = {
    "get3w": ["created", "processing", "completed"],
    "get3w_v3": ["created", "processing", "completed"],
    "dh3": ["queuing", "processing", "success"],
    "nananobanana": ["processing", "completed"],
}


@pytest.mark.parametrize("provider", PROVIDERS)
async def test_create_poll_complete_walks_the_documented_statuses(
    emu: Emulator, http: aiohttp.ClientSession, provider: str
) -> None:
    emu.config.duration = 0.3
    task_id = await submit(http, provider)
    seen, _ = await poll_until_done(http, provider, task_id)
    assert seen == EXPECTED_STATUSES[provider]
    assert emu.stats.creates[provider] == 1
    assert emu.stats.create_requests[provider] == 1
    assert emu.stats.polls[provider] == len(emu.requests) - 1
    assert emu.tasks[task_id].provider == provider


async def test_get3w_v1_async_answer_and_result_fields(emu: Emulator, http: aiohttp.ClientSession) -> None:
    emu.config.durations = {V1_MODEL: 0.08}
    emu.config.estimate_bias = 2.5
    async with http.post(V1_PATH, json={"prompt": "a fox", "channel": "economy"}) as resp:
        created = await resp.json()
    assert set(created) == {"id", "status", "estimated_duration"}
    assert created["status"] == "created"
    assert created["estimated_duration"] == pytest.approx(0.2)
    first = await poll(http, "get3w", created["id"])
    assert first["outputs"] == [] and first["timings"] is None and first["code"] == 0
    _, done = await poll_until_done(http, "get3w", created["id"])
    assert set(done) == {"id", "model", "status", "code", "outputs", "timings", "error", "created_at"}
    assert done["model"] == V1_MODEL
    assert (done["code"], done["error"]) == (0, None)
    assert done["timings"]["total"] == 80
    assert sum(v for k, v in done["timings"].items() if k != "total") == 80
    assert time.strptime(done["created_at"], "%Y-%m-%dT%H:%M:%S")
    assert done["outputs"][0].startswith(emu.url + "/files/")


async def test_get3w_v1_sync_waits_for_the_result(emu: Emulator, http: aiohttp.ClientSession) -> None:
    async with http.post(V1_PATH, params={"sync": "true"}, json={"prompt": "a fox"}) as resp:
        body = await resp.json()
    assert body["status"] == "completed" and len(body["outputs"]) == 1
    assert emu.tasks[body["id"]].state() == "completed"


@pytest.mark.parametrize(
    "body", [{}, {"prompt": ""}, {"prompt": "x", "channel": "premium"}, {"prompt": 3}], ids=str
)
async def test_get3w_v1_invalid_parameters(http: aiohttp.ClientSession, body: dict[str, Any]) -> None:
    async with http.post(V1_PATH, json=body) as resp:
        assert resp.status == 400
        assert await resp.json() == {"code": 400, "error": "Invalid parameters"}


async def test_get3w_v1_unknown_request_is_404(http: aiohttp.ClientSession) -> None:
    async with http.get("/v1/requests/nope") as resp:
        assert resp.status == 404
        assert await resp.json() == {"code": 404, "error": "Not found"}


async def test_get3w_v3_envelope_prediction_result_and_delete(
    emu: Emulator, http: aiohttp.ClientSession
) -> None:
    async with http.post(V3_PATH, json={"prompt": "a cat in space", "seed": 7}) as resp:
        created = await resp.json()
    assert (created["code"], created["message"]) == (200, "success")
    data = created["data"]
    assert data["id"].startswith("pred_") and data["model"] == "get3w/flux-dev"
    assert data["status"] == "created" and data["created_at"].endswith("Z")
    assert data["urls"]["get"] == f"{emu.url}/api/v3/predictions/{data['id']}"
    _, done = await poll_until_done(http, "get3w_v3", data["id"])
    pred = done["data"]
    assert pred["input"] == {"prompt": "a cat in space", "seed": 7}
    assert pred["timings"]["inference"] == 50 and pred["completed_at"].endswith("Z")
    assert pred["has_nsfw_contents"] == [] and "error" not in pred and len(pred["outputs"]) == 1
    async with http.get(f"/api/v3/predictions/{data['id']}/result") as resp:
        assert (await resp.json())["data"] == pred
    async with http.delete(f"/api/v3/predictions/{data['id']}") as resp:
        assert await resp.json() == {"code": 200, "message": "success", "data": None}
    async with http.get(f"/api/v3/predictions/{data['id']}") as resp:
        assert resp.status == 404
        assert await resp.json() == {"code": 404, "message": "Not found", "data": None}


async def test_get3w_v3_poll_origin_override(emu: Emulator, http: aiohttp.ClientSession) -> None:
    emu.config.v3_poll_origin = "http://evil.invalid:9"
    async with http.post(V3_PATH, json={"prompt": "x"}) as resp:
        data = (await resp.json())["data"]
    assert data["urls"]["get"] == f"http://evil.invalid:9/api/v3/predictions/{data['id']}"


async def test_get3w_v3_missing_prompt_is_400(http: aiohttp.ClientSession) -> None:
    async with http.post(V3_PATH, json={"width": 512}) as resp:
        assert resp.status == 400
        assert await resp.json() == {"code": 400, "message": "Invalid parameters", "data": None}


async def test_dh3_image_files_are_strings_matching_the_served_png(
    emu: Emulator, http: aiohttp.ClientSession
) -> None:
    emu.config.image_size = (32, 16)
    task_id = await submit(http, "dh3")
    _, done = await poll_until_done(http, "dh3", task_id)
    assert (done["code"], done["message"]) == (200, "Ok")
    output = done["nano_banana_pro_output"]
    assert set(output) == {"task_id", "status", "images"} and output["task_id"] == task_id
    (image,) = output["images"]
    assert set(image) == {"url", "content_type", "file_name", "file_size", "width", "height"}
    assert all(isinstance(value, str) for value in image.values())
    async with http.get(image["url"]) as resp:
        data = await resp.read()
        assert resp.content_type == "image/png"
    assert png_size(data) == (32, 16)
    assert (image["width"], image["height"], image["file_size"]) == ("32", "16", str(len(data)))
    assert image["file_name"] == image["url"].rsplit("/", 1)[-1]
    assert emu.stats.downloads == 1


@pytest.mark.parametrize(
    "inp",
    [
        {"prompt": "ab"},
        {"prompt": "x" * 20001},
        {"prompt": "a fox", "image_urls": [f"http://x/{i}.png" for i in range(9)]},
        {"prompt": "a fox", "aspect_ratio": "7:3"},
        {"prompt": "a fox", "resolution": "1k"},
        {"prompt": "a fox", "output_format": "webp"},
    ],
    ids=["short", "long", "9-images", "ratio", "resolution", "format"],
)
async def test_dh3_documented_limits_are_400(
    emu: Emulator, http: aiohttp.ClientSession, inp: dict[str, Any]
) -> None:
    async with http.post(DH3_CREATE, json={"model": "nano-banana-pro", "nano_banana_pro_input": inp}) as resp:
        assert resp.status == 400
        body = await resp.json()
    assert body["code"] == 400 and body["message"].startswith("invalid parameter")
    assert emu.stats.creates["dh3"] == 0


async def test_dh3_accepts_every_documented_value(http: aiohttp.ClientSession) -> None:
    inp = {
        "prompt": "x" * 20000,
        "image_urls": [f"http://x/{i}.png" for i in range(8)],
        "aspect_ratio": "21:9",
        "resolution": "4K",
        "output_format": "jpg",
    }
    async with http.post(DH3_CREATE, json={"model": "nano-banana-pro", "nano_banana_pro_input": inp}) as resp:
        body = await resp.json()
    assert body["code"] == 200 and body["message"] == "ok" and len(body["task_id"]) == 32


async def test_dh3_unknown_task_and_errors_under_http_200(emu: Emulator, http: aiohttp.ClientSession) -> None:
    async with http.get(DH3_GET, params={"task_id": "0" * 32}) as resp:
        assert resp.status == 404
        assert await resp.json() == {"code": 404, "message": "task not found"}
    emu.config.dh3_errors_under_http_200 = True
    async with http.get(DH3_GET, params={"task_id": "0" * 32}) as resp:
        assert resp.status == 200
        assert await resp.json() == {"code": 404, "message": "task not found"}


async def test_dh3_qps_limit_answers_429_and_counts_arrivals(
    emu: Emulator, http: aiohttp.ClientSession
) -> None:
    emu.config.dh3_qps = 3
    emu.config.faults.retry_after = 0.25
    path, body = create_request("dh3")

    async def create() -> tuple[int, dict[str, Any], str | None]:
        async with http.post(path, json=body) as resp:
            return resp.status, await resp.json(), resp.headers.get("Retry-After")

    answers = await asyncio.gather(*(create() for _ in range(5)))
    assert sorted(status for status, _, _ in answers) == [200, 200, 200, 429, 429]
    limited = [(b, ra) for status, b, ra in answers if status == 429]
    assert all(b == {"code": 429, "message": "rate limit exceeded"} and ra == "0.25" for b, ra in limited)
    assert emu.stats.max_creates_in_1s["dh3"] == 5
    assert emu.stats.rate_limited["dh3"] == 2
    assert (emu.stats.creates["dh3"], emu.stats.create_requests["dh3"]) == (3, 5)


async def test_dh3_qps_window_slides(emu: Emulator, http: aiohttp.ClientSession) -> None:
    emu.config.dh3_qps = 2
    emu.config.dh3_errors_under_http_200 = True
    path, body = create_request("dh3")
    codes = []
    for _ in range(3):
        async with http.post(path, json=body) as resp:
            assert resp.status == 200
            codes.append((await resp.json())["code"])
    assert codes == [200, 200, 429]
    await asyncio.sleep(max(0.0, emu.requests[2].at + 1.0 - time.monotonic()) + 0.02)  # the clock must pass
    async with http.post(path, json=body) as resp:
        assert (await resp.json())["code"] == 200
    assert emu.stats.max_creates_in_1s["dh3"] == 3


async def test_nananobanana_sync_async_poll_credits_and_models(
    emu: Emulator, http: aiohttp.ClientSession
) -> None:
    async with http.post(NANA, json={"prompt": "a cute cat"}) as resp:
        sync = await resp.json()
    assert set(sync) == {"success", "generationId", "imageUrls", "creditsUsed", "remainingCredits"}
    assert sync["success"] is True and sync["creditsUsed"] == 1 and sync["remainingCredits"] == 999_999
    async with http.post(
        NANA, json={"prompt": "a cat", "mode": "async", "selectedModel": "nano-banana"}
    ) as resp:
        started = await resp.json()
    assert started == {
        "success": True,
        "async": True,
        "generationId": started["generationId"],
        "message": "Generation started",
        "creditsUsed": 1,
        "remainingCredits": 999_998,
    }
    first = (await poll(http, "nananobanana", started["generationId"]))["data"]
    assert first["outputImageUrls"] is None and first["processingStatus"] == "processing"
    _, done = await poll_until_done(http, "nananobanana", started["generationId"])
    data = done["data"]
    assert set(data) == {
        "id",
        "prompt",
        "outputImageUrls",
        "modelUsed",
        "processingStatus",
        "creditsUsed",
        "createdAt",
    }
    assert (data["prompt"], data["modelUsed"], len(data["outputImageUrls"])) == ("a cat", "nano-banana", 1)
    async with http.get("/api/v1/credits") as resp:
        assert await resp.json() == {"data": {"credits": 999_998}}
    async with aiohttp.ClientSession() as anonymous, anonymous.get(emu.url + "/api/v1/models") as resp:
        models = (await resp.json())["data"]
    assert {
        "name",
        "displayName",
        "creditsCost",
        "supportsImageInput",
        "supportsAspectRatio",
        "requiresPro",
    } == set(models[0])


async def test_nananobanana_request_errors(emu: Emulator, http: aiohttp.ClientSession) -> None:
    for body in ({}, {"prompt": "x", "mode": "batch"}):
        async with http.post(NANA, json=body) as resp:
            assert resp.status == 400
            assert isinstance((await resp.json())["error"], str)
    async with http.get(NANA, params={"id": "nope"}) as resp:
        assert resp.status == 404
    emu.credits = 0
    async with http.post(NANA, json={"prompt": "x", "mode": "async"}) as resp:
        assert resp.status == 402
        assert await resp.json() == {"error": "Insufficient credits"}
    assert emu.stats.creates["nananobanana"] == 0


async def test_nananobanana_stream_events(http: aiohttp.ClientSession) -> None:
    async with http.post(NANA, json={"prompt": "a cat", "mode": "stream"}) as resp:
        assert resp.content_type == "text/event-stream"
        text = await resp.text()
    events = [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: ")]
    assert [e["type"] for e in events] == ["status", "status", "complete"]
    assert [e["progress"] for e in events] == [0, 30, 100]
    assert events[-1]["data"]["success"] is True and len(events[-1]["data"]["imageUrls"]) == 1
    assert len({e["generationId"] for e in events}) == 1


# --- prompt markers --------------------------------------------------------------------------


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize(
    ("marker", "error"), [("[fail]", "Upstream model error"), ("[nsfw]", "Content safety check failed")]
)
async def test_failure_markers(
    emu: Emulator, http: aiohttp.ClientSession, provider: str, marker: str, error: str
) -> None:
    task_id = await submit(http, provider, f"a fox {marker}")
    _, body = await poll_until_done(http, provider, task_id)
    status, text = status_and_error(provider, body)
    assert status in FAILED_WORDS and text == error
    assert emu.stats.failed_tasks == {task_id}
    if provider == "get3w":
        assert body["code"] == 500 and body["outputs"] == []
    if provider == "dh3":
        assert "images" not in body["nano_banana_pro_output"]


async def test_nananobanana_sync_markers(http: aiohttp.ClientSession) -> None:
    async with http.post(NANA, json={"prompt": "x [nsfw]"}) as resp:
        warning = await resp.json()
    assert resp.status == 200
    assert (warning["success"], warning["warning"], warning["message"]) == (
        False,
        True,
        "Content safety check failed",
    )
    assert {"generationId", "creditsUsed", "remainingCredits"} <= set(warning)
    async with http.post(NANA, json={"prompt": "x [fail]"}) as resp:
        failed = await resp.json()
    assert (failed["success"], failed["error"], failed["creditsUsed"]) == (False, "Upstream model error", 1)


@pytest.mark.parametrize("provider", PROVIDERS)
async def test_slow_marker_takes_ten_times_longer(
    emu: Emulator, http: aiohttp.ClientSession, provider: str
) -> None:
    task_id = await submit(http, provider, "a fox [slow]")
    assert emu.tasks[task_id].duration == pytest.approx(0.5)
    status, _ = status_and_error(provider, await poll(http, provider, task_id))
    assert status not in TERMINAL


async def test_failure_rate_and_spread_are_seeded(emu: Emulator, http: aiohttp.ClientSession) -> None:
    emu.config.failure_rate = 0.5
    emu.config.duration_spread = 0.5
    ids = [await submit(http, "dh3") for _ in range(20)]
    durations = [emu.tasks[i].duration for i in ids]
    assert all(0.025 <= d <= 0.075 for d in durations) and len(set(durations)) > 1
    assert 0 < len(emu.stats.failed_tasks) < 20
    assert emu.stats.failed_tasks == {i for i in ids if emu.tasks[i].outcome == "failed"}


# --- auth ------------------------------------------------------------------------------------


AUTH_CASES: dict[str, tuple[dict[str, Any], ...]] = {
    "get3w": (
        {"code": 401, "error": "Missing Authorization header"},
        {"code": 401, "error": "Invalid Authorization format, expected: Bearer <api_key>"},
        {"code": 401, "error": "Invalid or revoked API key"},
    ),
    "get3w_v3": ({"code": 401, "message": "Invalid API key", "data": None},) * 3,
    "dh3": ({"code": 401, "message": "invalid api key"},) * 3,
    "nananobanana": ({"error": "Invalid API key"},) * 3,
}


@pytest.mark.parametrize("provider", PROVIDERS)
async def test_auth_failures_use_each_providers_error_body(emu: Emulator, provider: str) -> None:
    emu.config.api_keys = {provider: KEY}
    missing, malformed, wrong = AUTH_CASES[provider]
    path, body = create_request(provider)
    headers: list[tuple[dict[str, str], dict[str, Any]]] = [
        ({}, missing),
        ({"Authorization": f"Token {KEY}"}, malformed),
        ({"Authorization": "Bearer sk-wrong"}, wrong),
    ]
    async with aiohttp.ClientSession(emu.url) as raw:
        for header, expected in headers:
            async with raw.post(path, json=body, headers=header) as resp:
                assert resp.status == 401
                assert await resp.json() == expected
        async with raw.post(path, json=body, headers=AUTH) as resp:
            assert resp.status == 200
    assert (emu.stats.create_requests[provider], emu.stats.creates[provider]) == (4, 1)


async def test_v3_falls_back_to_the_get3w_key(emu: Emulator, http: aiohttp.ClientSession) -> None:
    emu.config.api_keys = {"get3w": KEY}
    assert await submit(http, "get3w_v3")


# --- scripted and random faults ------------------------------------------------------------------


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("fault", ["500", "502", "503", "429"])
async def test_scripted_create_errors_create_nothing(
    emu: Emulator, http: aiohttp.ClientSession, provider: str, fault: str
) -> None:
    emu.config.faults.retry_after = 0.05
    emu.script(provider, "create", fault)
    path, body = create_request(provider)
    async with http.post(path, json=body) as resp:
        assert resp.status == int(fault)
        answer = await resp.json()
        retry_after = resp.headers.get("Retry-After")
    assert retry_after == ("0.05" if fault in ("429", "503") else None)
    assert "id" not in json.dumps(answer).replace("activeTasks", "")
    if provider == "nananobanana" and fault == "503":
        assert answer["type"] == "server_busy" and answer["activeTasks"] == 10
    assert emu.stats.creates[provider] == 0 and not emu.tasks
    assert emu.stats.rate_limited[provider] == (1 if fault == "429" else 0)
    assert await submit(http, provider)  # the script is consumed


@pytest.mark.parametrize("provider", PROVIDERS)
async def test_scripted_poll_faults_in_order(
    emu: Emulator, http: aiohttp.ClientSession, provider: str
) -> None:
    task_id = await submit(http, provider)
    emu.config.faults.retry_after = None
    emu.script(provider, "poll", "503")
    emu.script(provider, "poll", "non_json")
    emu.script(provider, "poll", "drop", times=2)  # aiohttp itself retries a dropped GET once
    path, params = poll_request(provider, task_id)
    async with http.get(path, params=params) as resp:
        assert resp.status == 503 and "Retry-After" not in resp.headers
    async with http.get(path, params=params) as resp:
        assert resp.status == 200 and resp.content_type == "text/html"
        assert "upstream error" in await resp.text()
    with pytest.raises(DROPPED):
        async with http.get(path, params=params) as resp:
            await resp.read()
    await poll(http, provider, task_id)
    assert emu.stats.polls[provider] == 5


@pytest.mark.parametrize("provider", PROVIDERS)
async def test_dropped_creates_before_and_after(
    emu: Emulator, http: aiohttp.ClientSession, provider: str, caplog: pytest.LogCaptureFixture
) -> None:  # POSTs are never retried by aiohttp, so the keep-alive session shows the drops
    caplog.set_level(logging.DEBUG)
    path, body = create_request(provider)
    emu.script(provider, "create", "drop_before")
    with pytest.raises(DROPPED):
        async with http.post(path, json=body) as resp:
            await resp.read()
    assert emu.stats.creates[provider] == 0
    emu.script(provider, "create", "drop_after")
    with pytest.raises(DROPPED):
        async with http.post(path, json=body) as resp:
            await resp.read()
    assert emu.stats.creates[provider] == 1 and len(emu.tasks) == 1
    assert emu.stats.create_requests[provider] == 2
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


async def test_scripted_slow_delays_the_answer(emu: Emulator, http: aiohttp.ClientSession) -> None:
    emu.config.faults.slow_seconds = 0.15
    emu.script("get3w", "create", "slow")
    started = time.monotonic()
    await submit(http, "get3w")
    assert time.monotonic() - started >= 0.15
    assert emu.stats.faults_injected[("get3w", "create", "slow")] == 1


def test_script_rejects_unknown_names() -> None:
    emulator = Emulator()
    for args in (("nope", "create", "500"), ("dh3", "download", "500"), ("dh3", "poll", "418")):
        with pytest.raises(ValueError):
            emulator.script(*args)


async def test_random_faults_at_full_rate(emu: Emulator, http: aiohttp.ClientSession) -> None:
    task_id = await submit(http, "dh3")
    path, body = create_request("dh3")
    emu.config.faults = Faults(create_429=1.0, poll_5xx=1.0)
    async with http.post(path, json=body) as resp:
        assert resp.status == 429
    async with http.get(DH3_GET, params={"task_id": task_id}) as resp:
        assert resp.status in (500, 502, 503)
    emu.config.faults = Faults(create_drop_after=1.0, poll_non_json=1.0)
    with pytest.raises(DROPPED):
        async with http.post(path, json=body) as resp:
            await resp.read()
    async with http.get(DH3_GET, params={"task_id": task_id}) as resp:
        assert resp.content_type == "text/html"
    emu.config.faults = Faults(create_drop_before=1.0, poll_drop=1.0)
    for request in (http.post(path, json=body), http.get(DH3_GET, params={"task_id": task_id})):
        with pytest.raises(DROPPED):
            async with request as resp:
                await resp.read()
    assert emu.stats.creates["dh3"] == 2 and emu.stats.rate_limited["dh3"] == 1


async def test_random_503_only_on_nananobanana_async(emu: Emulator, http: aiohttp.ClientSession) -> None:
    emu.config.faults.create_503 = 1.0
    async with http.post(NANA, json={"prompt": "x", "mode": "async"}) as resp:
        assert resp.status == 503 and (await resp.json())["type"] == "server_busy"
    async with http.post(NANA, json={"prompt": "x"}) as resp:
        assert resp.status == 200


async def test_random_faults_are_reproducible_from_the_seed() -> None:
    async def statuses() -> list[int]:
        config = EmulatorConfig(duration=0.05, seed=7, faults=Faults(poll_5xx=0.5))
        async with Emulator(config) as emulator, aiohttp.ClientSession(emulator.url, headers=AUTH) as http:
            task_id = await submit(http, "get3w")
            seen = []
            for _ in range(12):
                async with http.get(f"/v1/requests/{task_id}") as resp:
                    seen.append(resp.status)
            return seen

    first, second = await statuses(), await statuses()
    assert first == second and 200 in first and len(set(first)) > 1


# --- webhooks ---------------------------------------------------------------------------------


async def test_dh3_callback_retried_until_200(
    emu: Emulator, http: aiohttp.ClientSession, receiver: Receiver
) -> None:
    emu.config.dh3_callback_retry_delay = 0.01
    receiver.statuses = [500, 201]
    path, body = create_request("dh3")
    async with http.post(path, json={**body, "callback_url": receiver.url}) as resp:
        task_id = (await resp.json())["task_id"]
    await asyncio.wait_for(emu.wait_webhooks(), 5)
    assert len(receiver.calls) == 3
    payloads = [json.loads(raw) for _, raw in receiver.calls]
    assert payloads[0] == payloads[2] == await poll(http, "dh3", task_id)
    assert payloads[0]["nano_banana_pro_output"]["status"] == "success"
    assert (emu.stats.webhook_attempts["dh3"], emu.stats.webhooks_sent["dh3"]) == (3, 1)


async def test_dh3_callback_gives_up_after_three_retries(
    emu: Emulator, http: aiohttp.ClientSession, receiver: Receiver
) -> None:
    emu.config.dh3_callback_retry_delay = 0.01
    receiver.statuses = [500] * 10
    path, body = create_request("dh3", "a fox [fail]")
    async with http.post(path, json={**body, "callback_url": receiver.url}) as resp:
        assert resp.status == 200
    await asyncio.wait_for(emu.wait_webhooks(), 5)
    assert len(receiver.calls) == 4
    output = json.loads(receiver.calls[0][1])["nano_banana_pro_output"]
    assert (output["status"], output["err_msg"]) == ("fail", "Upstream model error")
    assert (emu.stats.webhook_attempts["dh3"], emu.stats.webhooks_failed["dh3"]) == (4, 1)


async def test_v3_webhook_is_the_signed_prediction(
    emu: Emulator, http: aiohttp.ClientSession, receiver: Receiver
) -> None:
    async with http.post(V3_PATH, json={"prompt": "x", "webhook_url": receiver.url}) as resp:
        task_id = (await resp.json())["data"]["id"]
    await asyncio.wait_for(emu.wait_webhooks(), 5)
    ((headers, raw),) = receiver.calls
    expected = hmac.new(b"whsec_test", raw, hashlib.sha256).hexdigest()
    assert headers["X-Get3W-Signature"] == expected
    assert json.loads(raw) == (await poll(http, "get3w_v3", task_id))["data"]
    assert emu.stats.webhooks_sent["get3w_v3"] == 1


async def test_v1_webhook_body_matches_the_poll_and_knobs(
    emu: Emulator, http: aiohttp.ClientSession, receiver: Receiver
) -> None:
    emu.config.webhook_duplicate = 1.0
    async with http.post(V1_PATH, params={"webhook": receiver.url}, json={"prompt": "x"}) as resp:
        created = await resp.json()
    assert created["status"] == "created"
    await asyncio.wait_for(emu.wait_webhooks(), 5)
    assert len(receiver.calls) == 2 and "X-Get3W-Signature" not in receiver.calls[0][0]
    assert json.loads(receiver.calls[0][1]) == await poll(http, "get3w", created["id"])
    emu.config.webhook_duplicate = 0.0
    emu.config.webhook_drop = 1.0
    async with http.post(V1_PATH, params={"webhook": receiver.url}, json={"prompt": "x"}) as resp:
        assert resp.status == 200
    await asyncio.wait_for(emu.wait_webhooks(), 5)
    assert len(receiver.calls) == 2 and emu.stats.webhooks_sent["get3w"] == 2


async def test_close_cancels_pending_webhooks_cleanly(receiver: Receiver) -> None:
    emulator = Emulator(EmulatorConfig(duration=0.01, webhook_delay=30.0))
    await emulator.start()
    async with aiohttp.ClientSession(emulator.url, headers=AUTH) as http:
        await submit(http, "get3w_v3", "x")
        async with http.post(V3_PATH, json={"prompt": "x", "webhook_url": receiver.url}) as resp:
            assert resp.status == 200
    started = time.monotonic()
    await emulator.close()
    assert time.monotonic() - started < 2 and not receiver.calls


# --- files, records, lifecycle, command line ---------------------------------------------------


def test_make_png_is_a_valid_png() -> None:
    data = make_png(3, 2, (1, 2, 3))
    assert png_size(data) == (3, 2)
    idat = data.index(b"IDAT")
    (length,) = struct.unpack(">I", data[idat - 4 : idat])
    assert zlib.decompress(data[idat + 4 : idat + 4 + length]) == (b"\x00" + b"\x01\x02\x03" * 3) * 2
    assert data.endswith(b"IEND\xaeB`\x82")


async def test_files_before_completion_and_unknown_are_404(
    emu: Emulator, http: aiohttp.ClientSession
) -> None:
    emu.config.duration = 5.0
    task_id = await submit(http, "get3w")
    for path in (f"/files/{task_id}/0.png", "/files/nope/0.png"):
        async with http.get(path) as resp:
            assert resp.status == 404
    assert emu.stats.downloads == 2


async def test_requests_are_recorded_and_stats_reset(emu: Emulator, http: aiohttp.ClientSession) -> None:
    task_id = await submit(http, "dh3")
    await poll(http, "dh3", task_id)
    create, get = emu.requests
    assert (create.provider, create.kind, create.method, create.path) == ("dh3", "create", "POST", DH3_CREATE)
    assert create.headers["Authorization"] == AUTH["Authorization"]
    assert create.json == create_request("dh3")[1]
    assert (get.kind, get.query, get.json) == ("poll", {"task_id": task_id}, None)
    emu.reset_stats()
    assert not emu.requests and emu.stats.creates["dh3"] == 0 and task_id in emu.tasks
    emu.config.record_requests = False
    await poll(http, "dh3", task_id)
    assert not emu.requests and emu.stats.polls["dh3"] == 1


async def test_close_releases_the_port() -> None:
    first = Emulator()
    url = await first.start()
    port = int(url.rsplit(":", 1)[1])
    await first.close()
    second = Emulator()
    assert await second.start(port=port) == url
    await second.close()


def test_command_line_builds_the_config() -> None:
    args = parse_args(
        ["--port", "0", "--duration", "2", "--dh3-qps", "none", "--api-key", "dh3=k", "--image-size", "8x4"]
    )
    config = config_from(args)
    assert (config.duration, config.dh3_qps, config.api_keys, config.image_size) == (
        2.0,
        None,
        {"dh3": "k"},
        (8, 4),
    )
