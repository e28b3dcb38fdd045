"""Each provider end to end over real sockets: submit, poll, result, sync mode, failures."""

from __future__ import annotations

import asyncio

import pytest

from image_gen_async import (
    AsyncSession,
    ContentPolicyError,
    InvalidRequestError,
    TaskFailedError,
    TaskResult,
    TaskStatus,
)
from image_gen_async.testing import Emulator

from .conftest import CLIENTS, KEYS, MODELS


def creates(emulator: Emulator, provider: str) -> list[dict]:  # type: ignore[type-arg]
    return [r.json for r in emulator.requests if r.provider == provider and r.kind == "create"]


def polls(emulator: Emulator, provider: str) -> list:  # type: ignore[type-arg]
    return [r for r in emulator.requests if r.provider == provider and r.kind == "poll"]


def assert_completed(result: TaskResult, provider: str, model: str) -> None:
    assert result.status is TaskStatus.COMPLETED and result.ok
    assert result.provider == provider
    assert result.model == model
    assert result.error is None
    assert len(result.urls) >= 1 and all(url.startswith("http") for url in result.urls)
    assert result.raw is not None


@pytest.mark.parametrize("name", CLIENTS)
async def test_submit_poll_result(session: AsyncSession, emulator: Emulator, name: str) -> None:
    handle = await session.client(name).submit(MODELS[name], prompt="a red fox in the snow")
    assert handle.provider == name and handle.model == MODELS[name]
    result = await handle
    assert_completed(result, name, MODELS[name])
    assert result.task_id == handle.task_id
    assert handle.done() and handle.status is TaskStatus.COMPLETED
    assert handle.polls >= 1 and handle.polls == len(polls(emulator, name))
    assert emulator.stats.creates[name] == 1
    every = [r for r in emulator.requests if r.provider == name and r.kind in ("create", "poll")]
    assert {r.headers["Authorization"] for r in every} == {f"Bearer {KEYS[name]}"}
    assert handle.finished_at is not None and handle.finished_at >= handle.submitted_at


async def test_get3w_v1_wire_format(session: AsyncSession, emulator: Emulator) -> None:
    handle = await session.get3w.submit(
        MODELS["get3w"], prompt="A sunset", aspect_ratio="16:9", resolution="1k", channel="stable"
    )
    await handle
    create = next(r for r in emulator.requests if r.kind == "create")
    assert create.method == "POST" and create.path == "/v1/google/nano-banana-pro/text-to-image"
    assert create.query == {}
    assert create.json == {
        "prompt": "A sunset",
        "aspect_ratio": "16:9",
        "resolution": "1k",
        "channel": "stable",
    }
    assert {r.path for r in polls(emulator, "get3w")} == {f"/v1/requests/{handle.task_id}"}
    assert handle.estimated_duration is not None


async def test_get3w_v3_wire_format(session: AsyncSession, emulator: Emulator) -> None:
    handle = await session.get3w_v3.submit(
        MODELS["get3w_v3"], prompt="A cat in space", seed=7, webhook_url="https://example.test/hook"
    )
    await handle
    create = next(r for r in emulator.requests if r.kind == "create")
    assert create.path == "/api/v3/get3w/flux-dev"
    assert create.json == {"prompt": "A cat in space", "seed": 7, "webhook_url": "https://example.test/hook"}
    assert {r.path for r in polls(emulator, "get3w_v3")} == {f"/api/v3/predictions/{handle.task_id}"}


async def test_dh3_wire_format(session: AsyncSession, emulator: Emulator) -> None:
    handle = await session.dh3.submit(
        "nano-banana-pro",
        prompt="a red fox",
        aspect_ratio="21:9",
        resolution="2k",
        image_urls=["https://example.test/a.jpg"],
        webhook_url="https://example.test/cb",
    )
    result = await handle
    assert creates(emulator, "dh3") == [
        {
            "model": "nano-banana-pro",
            "nano_banana_pro_input": {
                "prompt": "a red fox",
                "aspect_ratio": "21:9",
                "resolution": "2K",
                "image_urls": ["https://example.test/a.jpg"],
            },
            "callback_url": "https://example.test/cb",
        }
    ]
    assert {(r.path, r.query["task_id"]) for r in polls(emulator, "dh3")} == {
        ("/api/v1/task/get", handle.task_id)
    }
    output = result.outputs[0]
    # The ImageFile numbers come as strings and are read as ints.
    assert isinstance(output.width, int) and output.width > 0
    assert isinstance(output.file_size, int) and output.file_size > 0
    assert output.content_type == "image/png"


async def test_nananobanana_wire_format(session: AsyncSession, emulator: Emulator) -> None:
    handle = await session.nananobanana.submit(
        "nano-banana", prompt="a cat", aspect_ratio="16:9", image_urls=["https://example.test/in.png"]
    )
    await handle
    assert creates(emulator, "nananobanana") == [
        {
            "prompt": "a cat",
            "selectedModel": "nano-banana",
            "aspectRatio": "16:9",
            "referenceImageUrls": ["https://example.test/in.png"],
            "mode": "async",
        }
    ]
    assert {(r.path, r.query["id"]) for r in polls(emulator, "nananobanana")} == {
        ("/api/v1/generate", handle.task_id)
    }


@pytest.mark.parametrize("name", ["get3w", "nananobanana"])
async def test_generate_uses_sync_mode(session: AsyncSession, emulator: Emulator, name: str) -> None:
    result = await session.client(name).generate(MODELS[name], prompt="a lighthouse")
    assert_completed(result, name, MODELS[name])
    assert polls(emulator, name) == []
    create = next(r for r in emulator.requests if r.kind == "create")
    if name == "get3w":
        assert create.query == {"sync": "true"}
    else:
        assert create.json["mode"] == "sync"


@pytest.mark.parametrize("name", ["get3w_v3", "dh3"])
async def test_generate_polls_without_sync_mode(session: AsyncSession, emulator: Emulator, name: str) -> None:
    result = await session.client(name).generate(MODELS[name], prompt="a lighthouse")
    assert_completed(result, name, MODELS[name])
    assert len(polls(emulator, name)) >= 1


@pytest.mark.parametrize("name", CLIENTS)
async def test_failed_task_raises_with_result(session: AsyncSession, emulator: Emulator, name: str) -> None:
    handle = await session.client(name).submit(MODELS[name], prompt="this one will [fail]")
    with pytest.raises(TaskFailedError) as caught:
        await handle
    assert not isinstance(caught.value, ContentPolicyError)
    result = caught.value.result
    assert result.status is TaskStatus.FAILED and result.task_id == handle.task_id
    assert result.error and "Upstream model error" in result.error
    assert result.urls == ()
    assert handle.status is TaskStatus.FAILED
    assert isinstance(handle.exception(), TaskFailedError)
    assert handle.task_id in emulator.stats.failed_tasks
    # Awaiting again gives the same answer.
    with pytest.raises(TaskFailedError):
        await handle


@pytest.mark.parametrize("name", CLIENTS)
async def test_content_safety_failure(session: AsyncSession, name: str) -> None:
    handle = await session.client(name).submit(MODELS[name], prompt="something [nsfw]")
    with pytest.raises(ContentPolicyError) as caught:
        await handle
    assert caught.value.result.status is TaskStatus.FAILED


async def test_nananobanana_sync_warning_is_content_policy(session: AsyncSession) -> None:
    with pytest.raises(ContentPolicyError) as caught:
        await session.nananobanana.generate("nano-banana", prompt="something [nsfw]")
    assert caught.value.result.raw["warning"] is True


async def test_get3w_sync_failure(session: AsyncSession) -> None:
    with pytest.raises(TaskFailedError):
        await session.get3w.generate(MODELS["get3w"], prompt="sync [fail]")


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"prompt": "ab"}, "3-20000"),
        ({"prompt": "x" * 20001}, "3-20000"),
        ({"prompt": "a fox", "image_urls": [f"https://example.test/{i}.png" for i in range(9)]}, "at most 8"),
        ({"prompt": "a fox", "image_urls": "https://example.test/one.png"}, "list"),
        ({"prompt": "a fox", "aspect_ratio": "7:3"}, "aspect_ratio"),
        ({"prompt": "a fox", "resolution": "8K"}, "resolution"),
        ({"prompt": "a fox", "output_format": "gif"}, "output_format"),
        ({"prompt": "   "}, "prompt"),
    ],
)
async def test_dh3_limits_checked_before_sending(
    session: AsyncSession,
    emulator: Emulator,
    params: dict,
    message: str,  # type: ignore[type-arg]
) -> None:
    with pytest.raises(InvalidRequestError, match=message) as caught:
        await session.dh3.submit("nano-banana-pro", **params)
    assert isinstance(caught.value, ValueError)
    assert emulator.stats.create_requests["dh3"] == 0


async def test_dh3_limits_at_the_edges_are_accepted(session: AsyncSession, emulator: Emulator) -> None:
    urls = [f"https://example.test/{i}.png" for i in range(8)]
    handles = await asyncio.gather(
        session.dh3.submit("nano-banana-pro", prompt="abc"),
        session.dh3.submit("nano-banana-pro", prompt="x" * 20000, image_urls=urls, aspect_ratio="auto"),
    )
    await asyncio.gather(*handles)
    assert emulator.stats.creates["dh3"] == 2


@pytest.mark.parametrize(
    ("name", "model", "params"),
    [
        ("get3w", "google/nano-banana-pro", {}),
        ("get3w", "google/../../etc/passwd/x", {}),
        ("get3w", MODELS["get3w"], {"channel": "premium"}),
        ("get3w_v3", "get3w/flux dev", {}),
        ("nananobanana", "nano-banana", {"webhook_url": "https://example.test/hook"}),
        ("nananobanana", "nano-banana", {"mode": "stream"}),
        ("nananobanana", "nano-banana", {"aspect_ratio": "1:1", "aspectRatio": "1:1"}),
    ],
)
async def test_bad_requests_rejected_before_sending(
    session: AsyncSession,
    emulator: Emulator,
    name: str,
    model: str,
    params: dict,  # type: ignore[type-arg]
) -> None:
    with pytest.raises(InvalidRequestError):
        await session.client(name).submit(model, prompt="a fox", **params)
    assert sum(emulator.stats.create_requests.values()) == 0


async def test_v3_poll_url_followed_only_on_the_configured_origin(
    session: AsyncSession, emulator: Emulator, caplog: pytest.LogCaptureFixture
) -> None:
    emulator.config.v3_poll_origin = "http://evil.invalid:9"
    handle = await session.get3w_v3.submit(MODELS["get3w_v3"], prompt="a fox")
    result = await handle
    assert result.ok
    # Every poll reached the configured origin: the key never went to evil.invalid.
    assert len(polls(emulator, "get3w_v3")) == handle.polls >= 1
    assert "another origin" in caplog.text


def test_same_origin_path_rule() -> None:
    from yarl import URL

    from image_gen_async._capacity import Account, LocalGate
    from image_gen_async._engine import Target
    from image_gen_async._ratelimit import RateLimiter
    from image_gen_async.providers import CODECS

    account = Account("get3w", LocalGate("get3w", None))
    target = Target(
        "get3w_v3", CODECS["get3w_v3"], URL("https://api.get3w.com"), None, RateLimiter(None), account
    )
    assert target.same_origin_path("https://api.get3w.com/api/v3/predictions/p1/result") == (
        "/api/v3/predictions/p1/result"
    )
    # Relative URLs are read against the origin; fragments are dropped.
    assert target.same_origin_path("/api/v3/predictions/p1?x=1#top") == "/api/v3/predictions/p1?x=1"
    for foreign in (
        "http://api.get3w.com/api/v3/predictions/p1",
        "https://api.get3w.com.evil.test/api/v3/predictions/p1",
        "https://api.get3w.com@evil.test/api/v3/predictions/p1",
        "https://api.get3w.com:8443/api/v3/predictions/p1",
        "//evil.test/api/v3/predictions/p1",
    ):
        assert target.same_origin_path(foreign) is None
