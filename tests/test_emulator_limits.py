"""The emulator's account limits (caps on tasks at once, credits, balances, down, keys) over real sockets.

A plain aiohttp client talks to the emulator, so these tests pin the server side the
library's capacity gate and account stops are tested against.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from image_gen_async import AsyncSession, PollSettings
from image_gen_async.providers import EXAMPLE_MODELS
from image_gen_async.testing import Emulator, EmulatorConfig, EmulatorProcess
from image_gen_async.testing.__main__ import config_from, parse_args
from image_gen_async.testing._limits import (
    api_keys_problem,
    balances_problem,
    caps_problem,
    control_problem,
    credits_problem,
    keys_problem,
    providers_problem,
    retry_after_problem,
)
from image_gen_async.testing._state import RunningTasks

CHECKOUT = str(Path(__file__).resolve().parents[1])  # where ``benchmarks`` lives
KEY_A = "sk-limits-key-a"
KEY_B = "sk-limits-key-b"
PROVIDERS = ("get3w", "get3w_v3", "dh3", "nananobanana")
ACCOUNT = {"get3w": "get3w", "get3w_v3": "get3w", "dh3": "dh3", "nananobanana": "nananobanana"}
NANA = "/api/v1/generate"
BUSY_TEXT = "Server is busy, too many concurrent tasks. Please retry later."
CAP_REFUSAL: dict[str, tuple[int, dict[str, Any]]] = {
    "get3w": (429, {"code": 429, "error": "Rate limit exceeded"}),
    "get3w_v3": (429, {"code": 429, "message": "Rate limit exceeded", "data": None}),
    "dh3": (429, {"code": 429, "message": "too many concurrent tasks"}),
}
DROPPED = aiohttp.ClientConnectionError


@dataclass
class Answer:
    """What one request got back."""

    status: int
    body: Any
    headers: dict[str, str]


def auth(key: str) -> dict[str, str]:
    """The Authorization header of `key`."""
    return {"Authorization": f"Bearer {key}"}


def create_request(provider: str, prompt: str, mode: str) -> tuple[str, dict[str, Any], dict[str, str]]:
    """Path, JSON body and query of a create on `provider` (mode matters to nananobanana and v1)."""
    if provider == "get3w":
        query = {"sync": "true"} if mode == "sync" else {}
        return "/v1/google/nano-banana-pro/text-to-image", {"prompt": prompt}, query
    if provider == "get3w_v3":
        return "/api/v3/get3w/flux-dev", {"prompt": prompt}, {}
    if provider == "dh3":
        return "/api/v1/task/create", {"model": "nano-banana", "nano_banana_input": {"prompt": prompt}}, {}
    return NANA, {"prompt": prompt, "mode": mode}, {}


async def create(
    http: aiohttp.ClientSession,
    provider: str,
    key: str = KEY_A,
    prompt: str = "a red fox",
    mode: str = "async",
    **extra: Any,
) -> Answer:
    """One create; its status, JSON body (text for event streams) and headers."""
    path, body, query = create_request(provider, prompt, mode)
    async with http.post(path, json=body | extra, params=query, headers=auth(key)) as resp:
        content = await resp.text() if resp.content_type == "text/event-stream" else await resp.json()
        return Answer(resp.status, content, dict(resp.headers))


async def get(http: aiohttp.ClientSession, path: str, key: str | None = KEY_A, **query: str) -> Answer:
    """One GET, with `key` (None: no Authorization header)."""
    headers = auth(key) if key is not None else {}
    async with http.get(path, params=query, headers=headers) as resp:
        return Answer(resp.status, await resp.json(), dict(resp.headers))


def accepted(answer: Answer) -> bool:
    """Whether a create made a task (dh3 says so in its body code)."""
    refused_in_body = isinstance(answer.body, dict) and answer.body.get("code", 200) != 200
    return answer.status == 200 and not refused_in_body


async def until_all_finished(emu: Emulator) -> None:
    """Wait out every task's clock: the emulator derives each one's end from its finish time."""
    latest = max((task.finish_at for task in emu.tasks.values()), default=0.0)
    await asyncio.sleep(max(0.0, latest - time.monotonic()) + 0.01)


async def eventually(predicate: Callable[[], bool], tries: int = 300) -> None:
    """Wait (bounded) for a condition another coroutine makes true."""
    for _ in range(tries):
        if predicate():
            return
        await asyncio.sleep(0.005)
    raise AssertionError("condition never became true")


def most_overlapping(emu: Emulator, account: str, key_of: Callable[[str], str]) -> dict[str, int]:
    """From the tasks themselves: the most unfinished at any instant, per key (a sweep over ends)."""
    events: dict[str, list[tuple[float, int]]] = {}
    for task in emu.tasks.values():
        if ACCOUNT[task.provider] == account:
            key = key_of(task.id)
            events.setdefault(key, []).extend([(task.created_at, 1), (task.finish_at, -1)])
    result = {}
    for key, marks in events.items():
        level = peak = 0
        for _, step in sorted(marks, key=lambda mark: (mark[0], mark[1])):  # ends before starts at ties
            level += step
            peak = max(peak, level)
        result[key] = peak
    return result


@pytest.fixture
async def emu() -> AsyncIterator[Emulator]:
    async with Emulator(EmulatorConfig(duration=0.3, dh3_qps=None)) as emulator:
        yield emulator


@pytest.fixture
async def http(emu: Emulator) -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(emu.url) as session:
        yield session


# --- the checks and the counting, as tables ------------------------------------------------------


@pytest.mark.parametrize(
    ("check", "value", "problem"),
    [
        (caps_problem, {}, None),
        (caps_problem, {"get3w": 20, "dh3": 1, "nananobanana": 10}, None),
        (caps_problem, {"get3w_v3": 2}, "shares the get3w account"),
        (caps_problem, {"openai": 2}, "accounts are get3w, dh3, nananobanana"),
        (caps_problem, {"dh3": 0}, "positive integer"),
        (caps_problem, {"dh3": True}, "positive integer"),
        (caps_problem, {"dh3": 1.5}, "positive integer"),
        (caps_problem, {"dh3": None}, "positive integer"),
        (caps_problem, [("dh3", 1)], "must map"),
        (balances_problem, {KEY_A: 0, KEY_B: 5}, None),
        (balances_problem, {KEY_A: -1}, "integers >= 0"),
        (balances_problem, {"": 1}, "non-empty strings"),
        (balances_problem, {KEY_A: None}, "integers >= 0"),
        (providers_problem, {"dh3", "get3w_v3"}, None),
        (providers_problem, ["dh4"], "among get3w, get3w_v3, dh3, nananobanana"),
        (providers_problem, "dh3", "list of provider names"),
        (keys_problem, [KEY_A], None),
        (keys_problem, [""], "non-empty strings"),
        (keys_problem, KEY_A, "list of API keys"),
        (credits_problem, 0, None),
        (credits_problem, -1, "integer >= 0"),
        (credits_problem, 1.0, "integer >= 0"),
        (retry_after_problem, None, None),
        (retry_after_problem, 0, None),
        (retry_after_problem, 2.5, None),
        (retry_after_problem, -1, ">= 0"),
        (retry_after_problem, float("nan"), ">= 0"),
        (retry_after_problem, float("inf"), ">= 0"),
        (retry_after_problem, "2", ">= 0"),
        (api_keys_problem, None, None),
        (api_keys_problem, {"get3w": KEY_A}, None),
        (api_keys_problem, {"get3w": ""}, "non-empty strings"),
        (api_keys_problem, {"nope": KEY_A}, "providers must be among"),
    ],
)
def test_limit_checks(check: Callable[[object], str | None], value: object, problem: str | None) -> None:
    found = check(value)
    if problem is None:
        assert found is None
    else:
        assert found is not None and problem in found
        assert KEY_A not in found  # a problem text never repeats what was given: it may be a key


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        ({}, None),
        ({"max_concurrent": {"dh3": None}, "get3w_balance": {KEY_A: None}}, None),
        ({"credits": 5, "down": [], "revoked_keys": [], "capacity_retry_after": None}, None),
        ([], "JSON object"),
        (None, "JSON object"),
        ({"credit": 5}, "unknown fields ['credit']"),
        ({"max_concurrent": {"get3w_v3": 1}}, "shares the get3w account"),
        ({"credits": 5, "down": "dh3"}, "list of provider names"),
    ],
)
def test_control_body_checks(body: object, problem: str | None) -> None:
    found = control_problem(body)
    assert found is None if problem is None else (found is not None and problem in found)


def test_running_tasks_count_each_task_until_its_finish_time() -> None:
    running = RunningTasks()
    for finish_at in (3.0, 1.0, 2.0, 2.0):
        running.add(finish_at)
    assert [running.count(now) for now in (0.5, 0.99, 1.0, 1.5, 2.0, 2.9, 3.0)] == [4, 4, 3, 3, 1, 1, 0]


def test_emulator_refuses_a_cap_on_get3w_v3_alone() -> None:
    with pytest.raises(ValueError, match="shares the get3w account"):
        Emulator(EmulatorConfig(max_concurrent={"get3w_v3": 1}))


# --- caps on tasks at once -------------------------------------------------------------------


@pytest.mark.parametrize("provider", PROVIDERS)
async def test_a_create_over_the_cap_is_refused_in_the_providers_words_and_makes_nothing(
    emu: Emulator, http: aiohttp.ClientSession, provider: str
) -> None:
    emu.config.max_concurrent = {ACCOUNT[provider]: 2}
    first, second = await create(http, provider), await create(http, provider)
    refused = await create(http, provider)
    assert accepted(first) and accepted(second)
    busy = {"error": BUSY_TEXT, "type": "server_busy", "activeTasks": 2}
    status, body = CAP_REFUSAL.get(provider, (503, busy))
    assert (refused.status, refused.body) == (status, body)
    assert "Retry-After" not in refused.headers  # the docs do not say one exists: none by default
    assert len(emu.tasks) == emu.stats.creates[provider] == 2
    assert emu.stats.create_requests[provider] == 3
    assert emu.stats.capacity_refusals == {provider: 1}
    assert emu.stats.rate_limited[provider] == 0  # a capacity refusal is not a QPS limit
    assert emu.stats.peak_running[ACCOUNT[provider]] == {KEY_A: 2}
    assert emu.running(provider, KEY_A) == 2


async def test_dh3_sends_its_capacity_refusal_under_http_200_when_it_sends_errors_so(
    emu: Emulator, http: aiohttp.ClientSession
) -> None:
    emu.config.max_concurrent = {"dh3": 1}
    emu.config.dh3_errors_under_http_200 = True
    assert accepted(await create(http, "dh3"))
    refused = await create(http, "dh3")
    assert (refused.status, refused.body) == (200, {"code": 429, "message": "too many concurrent tasks"})
    assert not accepted(refused) and len(emu.tasks) == 1


@pytest.mark.parametrize("provider", PROVIDERS)
async def test_capacity_retry_after_is_sent_when_configured(
    emu: Emulator, http: aiohttp.ClientSession, provider: str
) -> None:
    emu.config.max_concurrent = {ACCOUNT[provider]: 1}
    emu.config.capacity_retry_after = 1.5
    assert "Retry-After" not in (await create(http, provider)).headers
    assert (await create(http, provider)).headers["Retry-After"] == "1.5"


async def test_a_slot_is_given_back_when_its_task_completes_or_fails(
    emu: Emulator, http: aiohttp.ClientSession
) -> None:
    emu.config.duration = 0.1
    emu.config.max_concurrent = {"nananobanana": 2}
    failing = await create(http, "nananobanana", prompt="[fail] a fox")
    assert accepted(failing) and accepted(await create(http, "nananobanana"))
    assert (await create(http, "nananobanana")).body["activeTasks"] == 2
    await until_all_finished(emu)
    polled = await get(http, NANA, id=failing.body["generationId"])
    assert polled.body["data"]["processingStatus"] == "failed"
    assert emu.running("nananobanana", KEY_A) == 0
    assert accepted(await create(http, "nananobanana")) and accepted(await create(http, "nananobanana"))
    assert emu.stats.capacity_refusals["nananobanana"] == 1


@pytest.mark.parametrize("blocked_mode", ["async", "sync", "stream"])
async def test_nananobanana_sync_tasks_hold_a_slot_and_every_mode_meets_the_cap(
    emu: Emulator, http: aiohttp.ClientSession, blocked_mode: str
) -> None:
    emu.config.max_concurrent = {"nananobanana": 1}
    emu.credits = 10
    holder = asyncio.create_task(create(http, "nananobanana", mode="sync"))
    await eventually(lambda: emu.running("nananobanana", KEY_A) == 1)
    refused = await create(http, "nananobanana", mode=blocked_mode)
    assert (refused.status, refused.body["activeTasks"], refused.body["type"]) == (503, 1, "server_busy")
    assert emu.credits == 9  # the refusal took nothing ("credits refunded")
    held = await holder
    assert held.status == 200 and held.body["success"] is True
    assert emu.running("nananobanana", KEY_A) == 0  # the sync answer came when its task ended
    assert accepted(await create(http, "nananobanana", mode=blocked_mode))
    assert len(emu.tasks) == 2


async def test_get3w_v1_and_v3_share_one_cap_per_key(emu: Emulator, http: aiohttp.ClientSession) -> None:
    emu.config.max_concurrent = {"get3w": 2}
    assert accepted(await create(http, "get3w")) and accepted(await create(http, "get3w_v3"))
    v1, v3 = await create(http, "get3w"), await create(http, "get3w_v3")
    assert (v1.status, v1.body) == CAP_REFUSAL["get3w"]
    assert (v3.status, v3.body) == CAP_REFUSAL["get3w_v3"]
    assert emu.stats.capacity_refusals == {"get3w": 1, "get3w_v3": 1}
    assert emu.stats.peak_running["get3w"] == {KEY_A: 2}
    assert emu.running("get3w", KEY_A) == emu.running("get3w_v3", KEY_A) == 2
    assert accepted(await create(http, "get3w_v3", key=KEY_B))  # another key is another account


async def test_caps_are_per_key_and_per_account(emu: Emulator, http: aiohttp.ClientSession) -> None:
    emu.config.max_concurrent = {"nananobanana": 1}
    answers = [await create(http, "nananobanana", key) for key in (KEY_A, KEY_A, KEY_B, KEY_B)]
    assert [accepted(answer) for answer in answers] == [True, False, True, False]
    assert emu.stats.peak_running["nananobanana"] == {KEY_A: 1, KEY_B: 1}
    assert all([accepted(await create(http, "dh3")) for _ in range(3)])  # dh3 has no cap here
    assert emu.stats.peak_running["dh3"] == {KEY_A: 3}


async def test_the_cap_holds_at_every_instant_under_a_burst_of_retrying_clients(emu: Emulator) -> None:
    emu.config.duration, emu.config.duration_spread = 0.04, 0.5
    emu.config.max_concurrent = {"nananobanana": 5}
    keys: dict[str, str] = {}
    active_seen: list[int] = []

    async def job(http: aiohttp.ClientSession, key: str) -> None:
        while not accepted(answer := await create(http, "nananobanana", key)):
            active_seen.append(answer.body["activeTasks"])
            await asyncio.sleep(0.005)  # the client's own back-off before it asks again
        keys[answer.body["generationId"]] = key

    async with aiohttp.ClientSession(emu.url) as http:
        await asyncio.gather(*(job(http, key) for key in [KEY_A] * 30 + [KEY_B] * 10))
    stats = emu.stats
    assert stats.creates["nananobanana"] == 40
    assert stats.create_requests["nananobanana"] == 40 + stats.capacity_refusals["nananobanana"]
    assert stats.capacity_refusals["nananobanana"] > 0 and set(active_seen) == {5}
    assert stats.peak_running["nananobanana"] == {KEY_A: 5, KEY_B: 5}
    assert most_overlapping(emu, "nananobanana", keys.__getitem__) == {KEY_A: 5, KEY_B: 5}


@pytest.mark.parametrize("provider", PROVIDERS)
async def test_without_caps_nothing_is_refused(
    emu: Emulator, http: aiohttp.ClientSession, provider: str
) -> None:
    answers = await asyncio.gather(*(create(http, provider) for _ in range(20)))
    assert all(accepted(answer) for answer in answers)
    assert not emu.stats.capacity_refusals
    assert emu.stats.peak_running[ACCOUNT[provider]] == {KEY_A: 20}


async def test_reset_stats_keeps_the_running_tasks(emu: Emulator, http: aiohttp.ClientSession) -> None:
    emu.config.max_concurrent = {"dh3": 1}
    assert accepted(await create(http, "dh3"))
    emu.reset_stats()
    assert not accepted(await create(http, "dh3"))
    assert emu.stats.capacity_refusals == {"dh3": 1} and emu.stats.creates["dh3"] == 0


# --- money -------------------------------------------------------------------------------------


async def test_credits_route_needs_a_key_and_models_route_does_not(
    emu: Emulator, http: aiohttp.ClientSession
) -> None:
    emu.credits = 42
    assert (await get(http, "/api/v1/credits")).body == {"data": {"credits": 42}}
    anonymous = await get(http, "/api/v1/credits", key=None)
    assert (anonymous.status, anonymous.body) == (401, {"error": "Invalid API key"})
    models = await get(http, "/api/v1/models", key=None)
    assert models.status == 200
    assert [(m["name"], m["creditsCost"], m["requiresPro"]) for m in models.body["data"]] == [
        ("nano-banana", 1, False),
        ("nano-banana-pro", 2, True),
    ]
    fields = {
        "name",
        "displayName",
        "creditsCost",
        "supportsImageInput",
        "supportsAspectRatio",
        "requiresPro",
    }
    assert all(set(model) == fields for model in models.body["data"])


async def test_out_of_credits_answers_402_makes_nothing_and_a_top_up_lets_creates_in(
    emu: Emulator, http: aiohttp.ClientSession
) -> None:
    emu.credits = 3
    pro = await create(http, "nananobanana", selectedModel="nano-banana-pro")
    assert (pro.body["creditsUsed"], pro.body["remainingCredits"]) == (2, 1)
    short = await create(http, "nananobanana", selectedModel="nano-banana-pro")
    assert (short.status, short.body) == (402, {"error": "Insufficient credits"})
    last = await create(http, "nananobanana")
    assert (last.body["creditsUsed"], last.body["remainingCredits"]) == (1, 0)
    for mode in ("async", "sync", "stream"):
        refused = await create(http, "nananobanana", mode=mode)
        assert (refused.status, refused.body) == (402, {"error": "Insufficient credits"})
    assert emu.stats.payment_refusals == {"nananobanana": 4}
    assert len(emu.tasks) == emu.stats.creates["nananobanana"] == 2
    assert (await get(http, "/api/v1/credits")).body == {"data": {"credits": 0}}
    polled = await get(http, NANA, id=pro.body["generationId"])
    assert polled.body["data"]["creditsUsed"] == 2
    emu.credits = 5  # the top-up
    topped = await create(http, "nananobanana")
    assert accepted(topped) and topped.body["remainingCredits"] == 4
    assert (await get(http, "/api/v1/credits")).body == {"data": {"credits": 4}}


async def test_credits_are_checked_before_the_cap(emu: Emulator, http: aiohttp.ClientSession) -> None:
    emu.config.max_concurrent = {"nananobanana": 1}
    emu.credits = 1
    assert accepted(await create(http, "nananobanana"))
    assert (await create(http, "nananobanana")).status == 402
    assert not emu.stats.capacity_refusals and emu.stats.payment_refusals == {"nananobanana": 1}


async def test_get3w_balance_per_key_is_shared_by_v1_and_v3_and_can_be_topped_up(
    emu: Emulator, http: aiohttp.ClientSession
) -> None:
    emu.config.max_concurrent = {"get3w": 2}
    emu.get3w_balance = {KEY_A: 3}
    assert accepted(await create(http, "get3w")) and accepted(await create(http, "get3w_v3"))
    assert not accepted(await create(http, "get3w"))  # over the cap: costs nothing
    assert emu.get3w_balance == {KEY_A: 1}
    await until_all_finished(emu)
    assert accepted(await create(http, "get3w_v3"))
    v1, v3 = await create(http, "get3w"), await create(http, "get3w_v3")
    assert (v1.status, v1.body) == (403, {"code": 403, "error": "Insufficient balance"})
    assert (v3.status, v3.body) == (403, {"code": 403, "message": "Insufficient balance", "data": None})
    assert emu.stats.payment_refusals == {"get3w": 1, "get3w_v3": 1}
    assert emu.stats.creates["get3w"] + emu.stats.creates["get3w_v3"] == 3
    assert accepted(await create(http, "get3w", key=KEY_B))  # a key without a balance is unlimited
    emu.get3w_balance[KEY_A] = 1
    assert accepted(await create(http, "get3w_v3", prompt="[fail] a fox"))
    assert (await create(http, "get3w")).status == 403  # a failed task is not refunded


# --- providers down, keys changed ----------------------------------------------------------------


@pytest.mark.parametrize("provider", PROVIDERS)
async def test_a_down_provider_loses_every_connection_until_it_is_back(
    emu: Emulator, http: aiohttp.ClientSession, provider: str
) -> None:
    other = "dh3" if provider != "dh3" else "nananobanana"
    assert accepted(await create(http, provider))
    emu.config.down.add(provider)
    with pytest.raises(DROPPED):
        await create(http, provider)
    with pytest.raises(DROPPED):
        await create(http, provider, mode="sync")
    assert accepted(await create(http, other))
    assert emu.stats.down_drops == {provider: 2}
    assert emu.stats.create_requests[provider] == 1 == sum(t.provider == provider for t in emu.tasks.values())
    emu.config.down.clear()
    assert accepted(await create(http, provider))


async def raw_get(emu: Emulator, target: str) -> bytes:
    """Every byte the server sends back for one GET on its own connection, until it closes.

    A raw socket: aiohttp's client repeats a GET once by itself when the connection drops."""
    host, port = emu.url.removeprefix("http://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    headers = {"Host": host, "Authorization": f"Bearer {KEY_A}", "Connection": "close"}
    head = f"GET {target} HTTP/1.1\r\n" + "".join(f"{name}: {value}\r\n" for name, value in headers.items())
    writer.write(head.encode() + b"\r\n")
    try:
        return await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()


async def test_a_down_provider_drops_polls_and_credit_queries_too(
    emu: Emulator, http: aiohttp.ClientSession
) -> None:
    started = await create(http, "nananobanana")
    poll_target = f"{NANA}?id={started.body['generationId']}"
    assert (await raw_get(emu, poll_target)).startswith(b"HTTP/1.1 200")
    emu.config.down = {"nananobanana"}
    assert await raw_get(emu, poll_target) == b""  # closed without a byte of answer
    assert await raw_get(emu, "/api/v1/credits") == b""
    assert emu.stats.down_drops == {"nananobanana": 2} and emu.stats.polls["nananobanana"] == 1


async def test_keys_changed_or_revoked_at_runtime_are_refused_with_401(
    emu: Emulator, http: aiohttp.ClientSession
) -> None:
    emu.config.api_keys = {"get3w": KEY_A}
    assert accepted(await create(http, "get3w")) and accepted(await create(http, "get3w_v3"))
    emu.config.api_keys = {"get3w": KEY_B}
    v1, v3 = await create(http, "get3w"), await create(http, "get3w_v3")
    assert (v1.status, v1.body) == (401, {"code": 401, "error": "Invalid or revoked API key"})
    assert (v3.status, v3.body) == (401, {"code": 401, "message": "Invalid API key", "data": None})
    assert accepted(await create(http, "get3w", key=KEY_B))
    emu.config.revoked_keys.add(KEY_B)
    assert (await create(http, "get3w", key=KEY_B)).status == 401
    nana = await create(http, "nananobanana", key=KEY_B)  # no configured key: any but a revoked one
    assert (nana.status, nana.body) == (401, {"error": "Invalid API key"})
    assert accepted(await create(http, "nananobanana", key=KEY_A))
    assert len(emu.tasks) == 4


# --- the control route, the process and the command line -------------------------------------------


async def test_control_route_changes_limits_while_serving(emu: Emulator, http: aiohttp.ClientSession) -> None:
    changes = {
        "max_concurrent": {"nananobanana": 1},
        "credits": 2,
        "get3w_balance": {KEY_A: 0},
        "down": ["dh3"],
        "capacity_retry_after": 3,
    }
    async with http.post("/_emulator/control", json=changes) as resp:
        assert resp.status == 200
        state = await resp.json()
    assert state["max_concurrent"] == {"nananobanana": 1} and state["credits"] == 2
    assert accepted(await create(http, "nananobanana"))
    refused = await create(http, "nananobanana")
    assert (refused.status, refused.body["activeTasks"], refused.headers["Retry-After"]) == (503, 1, "3")
    assert (await create(http, "get3w")).status == 403
    with pytest.raises(DROPPED):
        await create(http, "dh3")
    shown = await get(http, "/_emulator/control", key=None)
    assert shown.body["running"] == {"nananobanana": {KEY_A: 1}} and shown.body["down"] == ["dh3"]
    undo = {"max_concurrent": {"nananobanana": None}, "down": []}
    async with http.post("/_emulator/control", json=undo) as resp:
        assert resp.status == 200 and (await resp.json())["max_concurrent"] == {}
    assert accepted(await create(http, "nananobanana")) and accepted(await create(http, "dh3"))
    stats = (await get(http, "/_emulator/stats", key=None)).body
    assert stats["capacity_refusals"] == {"nananobanana": 1}
    assert stats["payment_refusals"] == {"get3w": 1} and stats["down_drops"] == {"dh3": 1}
    assert stats["peak_running"]["nananobanana"] == {KEY_A: 2}


async def test_control_route_refuses_a_bad_body_and_applies_none_of_it(
    emu: Emulator, http: aiohttp.ClientSession
) -> None:
    before = emu.credits
    async with http.post("/_emulator/control", json={"credits": 1, "max_concurrent": {"dh3": 0}}) as resp:
        assert resp.status == 400
        assert "positive integer" in (await resp.json())["error"]
    async with http.post("/_emulator/control", data=b"not json") as resp:
        assert resp.status == 400
    assert emu.credits == before and emu.config.max_concurrent == {}


async def test_emulator_process_takes_limits_from_flags_and_changes_at_runtime() -> None:
    flags = [
        *("--duration", "0.5", "--max-concurrent", "nananobanana=1", "--credits", "2"),
        *("--get3w-balance", f"{KEY_A}=0", "--capacity-retry-after", "2", "--no-record"),
    ]
    async with EmulatorProcess(*flags) as process, aiohttp.ClientSession(process.url) as http:
        assert accepted(await create(http, "nananobanana"))
        busy = await create(http, "nananobanana")
        assert (busy.status, busy.body["activeTasks"], busy.headers["Retry-After"]) == (503, 1, "2")
        assert (await create(http, "get3w")).status == 403
        state = await process.control(max_concurrent={"nananobanana": 2}, get3w_balance={KEY_A: 1})
        assert state["running"] == {"nananobanana": {KEY_A: 1}} and state["credits"] == 1
        assert accepted(await create(http, "nananobanana")) and accepted(await create(http, "get3w"))
        assert (await create(http, "nananobanana")).status == 402  # credits: 2 spent
        with pytest.raises(ValueError, match="shares the get3w account"):
            await process.control(max_concurrent={"get3w_v3": 1})
        stats = await process.stats()
    assert stats["capacity_refusals"] == {"nananobanana": 1}
    assert stats["payment_refusals"] == {"get3w": 1, "nananobanana": 1}
    assert stats["peak_running"] == {"nananobanana": {KEY_A: 2}, "get3w": {KEY_A: 1}}


def test_command_line_flags_build_the_limits() -> None:
    config = config_from(
        parse_args(
            [
                *("--max-concurrent", "nananobanana=10", "--max-concurrent", "get3w=20", "--credits", "5"),
                *("--get3w-balance", "sk-with=equals=3", "--capacity-retry-after", "1.5"),
            ]
        )
    )
    assert config.max_concurrent == {"nananobanana": 10, "get3w": 20}
    assert (config.credits, config.capacity_retry_after) == (5, 1.5)
    assert config.get3w_balance == {"sk-with=equals": 3}  # the key is what stands before the last "="
    defaults = config_from(parse_args([]))
    assert (defaults.max_concurrent, defaults.get3w_balance, defaults.capacity_retry_after) == ({}, {}, None)
    assert defaults.credits == EmulatorConfig().credits


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (["--max-concurrent", "get3w_v3=2"], "--max-concurrent"),
        (["--max-concurrent", "nananobanana=0"], "--max-concurrent"),
        (["--max-concurrent", "nananobanana"], "--max-concurrent"),
        (["--max-concurrent", "dh3=many"], "--max-concurrent"),
        (["--credits", "-1"], "--credits"),
        (["--get3w-balance", "sk-limits-secret=lots"], "--get3w-balance"),
        (["--get3w-balance", "sk-limits-secret=-2"], "--get3w-balance"),
        (["--capacity-retry-after", "nan"], "--capacity-retry-after"),
    ],
)
def test_bad_limit_flags_exit_2_naming_the_flag_not_the_key(
    flags: list[str], named: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as stopped:
        parse_args(flags)
    assert stopped.value.code == 2
    stderr = capsys.readouterr().err
    assert named in stderr and "sk-limits-secret" not in stderr


async def test_emulator_process_runs_another_module_that_serves_the_same_way(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The polling benchmark's emulator: the same APIs, and a route that says when each
    # task ends and when its latest poll arrived (on the clock this process shares).
    # (The child finds ``benchmarks`` from the checkout, wherever pytest was started.)
    # Its seed draws the jobs' durations: the child's first job takes what seed 3's does here.
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [CHECKOUT, os.environ.get("PYTHONPATH")])))
    monkeypatch.syspath_prepend(CHECKOUT)
    from benchmarks.polling import emulator_config

    first_durations = []
    for seed in (0, 3):
        async with (
            Emulator(emulator_config(None, seed)) as alike,
            AsyncSession(
                api_keys={"dh3": KEY_A}, base_urls={"dh3": alike.url}, rate_limits={"dh3": None}
            ) as session,
        ):
            task_id = (await session.dh3.submit(EXAMPLE_MODELS["dh3"], prompt="a red fox")).task_id
            first_durations.append(alike.tasks[task_id].duration)
    async with (
        EmulatorProcess("none", "--seed", "3", module="benchmarks._pollserver") as process,
        AsyncSession(
            api_keys={"dh3": KEY_A},
            base_urls={"dh3": process.url},
            rate_limits={"dh3": None},
            polling=PollSettings(first_poll=0.5, min_interval=0.01, max_interval=0.1),
        ) as session,
    ):
        handle = await session.dh3.submit(EXAMPLE_MODELS["dh3"], prompt="a red fox")
        await handle
        seen_done = time.monotonic()
        async with aiohttp.ClientSession() as http, http.get(f"{process.url}/_bench/tasks") as answer:
            tasks = await answer.json()
    finish_at, duration, last_poll = tasks[handle.task_id]
    assert duration == pytest.approx(1.0, abs=0.1)  # the benchmark's jobs: 1 s +- 10 %
    assert duration == first_durations[1] != first_durations[0]
    assert finish_at <= last_poll <= seen_done
