"""The router: targets and keys, routing by preference, weight and FIFO, capability, failover, health."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from aiohttp import web

from image_gen_async import (
    AsyncSession,
    ConfigurationError,
    InvalidRequestError,
    PermissionDeniedError,
    SessionClosedError,
    SubmitUncertainError,
    Target,
    TaskFailedError,
)
from image_gen_async.errors import ContentPolicyError
from image_gen_async.models import TaskResult, TaskStatus
from image_gen_async.router import (
    BACKING_OFF,
    CIRCUIT_OPEN,
    HEALTHY,
    lane_health,
    lane_label,
    may_rerun,
    moves_on,
    next_backoff,
    smooth_pick,
)
from image_gen_async.testing import Emulator, EmulatorConfig

from .conftest import FAST_POLLING
from .router_helpers import DH3, GET3W, NANA, opened, prompts_created

# --- pure decisions, as tables ------------------------------------------------------


def test_smooth_weighted_round_robin_interleaves_in_proportion() -> None:
    scores = [0.0, 0.0, 0.0]
    picks = []
    for _ in range(7):
        chosen, scores = smooth_pick([5.0, 1.0, 1.0], scores)
        picks.append("abc"[chosen])
    assert "".join(picks) == "aabacaa"  # nginx's sequence for 5:1:1
    assert scores == [0.0, 0.0, 0.0]  # a whole round leaves every score where it started


@pytest.mark.parametrize(
    ("previous", "expected"), [(0.0, 0.5), (0.5, 1.0), (8.0, 16.0), (16.0, 20.0), (20.0, 20.0)]
)
def test_back_off_doubles_up_to_its_cap(previous: float, expected: float) -> None:
    assert next_backoff(previous, 0.5, 20.0) == expected


@pytest.mark.parametrize(
    ("blocked", "backing_off", "health"),
    [
        (False, False, HEALTHY),
        (False, True, BACKING_OFF),
        (True, False, CIRCUIT_OPEN),
        (True, True, CIRCUIT_OPEN),
    ],
)
def test_lane_health(blocked: bool, backing_off: bool, health: str) -> None:
    assert lane_health(blocked, backing_off) == health


@pytest.mark.parametrize(
    ("reason", "rules_out"), [("capacity", False), ("rate", False), ("not sent", True), ("stopped", True)]
)
def test_which_refusals_rule_a_lane_out_for_the_job(reason: str, rules_out: bool) -> None:
    assert moves_on(reason) is rules_out


def test_only_a_model_failure_is_run_again() -> None:
    failed = TaskResult(
        task_id="t", provider="dh3", model="m", status=TaskStatus.FAILED, error="Upstream model error"
    )
    assert may_rerun(TaskFailedError(failed))
    assert not may_rerun(ContentPolicyError(failed))
    assert not may_rerun(SubmitUncertainError("maybe made", provider="dh3", model="m"))
    assert not may_rerun(None)


def test_a_lane_label_names_no_key() -> None:
    label = lane_label("dh3", "nano-banana-pro", "sk-very-secret")
    assert label.startswith("dh3:nano-banana-pro#") and "secret" not in label
    assert label == lane_label("dh3", "nano-banana-pro", "sk-very-secret")  # stable across processes
    assert label != lane_label("dh3", "nano-banana-pro", "sk-other")


# --- configuration ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: Target("dh4", "m"), "Target.provider must be one of"),
        (lambda: Target(3, "m"), "Target.provider"),
        (lambda: Target("dh3", ""), "Target.model must be a non-empty str"),
        (lambda: Target("dh3", None), "Target.model"),
        (lambda: Target("dh3", "m", weight=0), "Target.weight"),
        (lambda: Target("dh3", "m", weight=float("inf")), "Target.weight"),
        (lambda: Target("dh3", "m", weight=True), "Target.weight"),
    ],
)
def test_a_bad_target_is_refused_naming_the_field(make: Any, message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        make()


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        ({"dh3": []}, r"api_keys\['dh3'\] is an empty list"),
        ({"dh3": ["k1", " k1 "]}, r"api_keys\['dh3'\]\[1\] repeats an earlier key"),
        ({"dh3": ["k1", 2]}, r"api_keys\['dh3'\]\[1\] must be a str"),
        ({"dh3": ["k1", ""]}, r"api_keys\['dh3'\]\[1\] is empty"),
        ({"dh3": {"k1"}}, r"api_keys\['dh3'\] must be a str, got a set"),
    ],
)
def test_bad_key_lists_are_refused_without_showing_a_key(keys: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigurationError, match=message) as caught:
        AsyncSession(api_keys=keys, env={})
    assert "k1" not in str(caught.value)


async def test_router_configuration_errors(sessions: list[AsyncSession], emu: Emulator) -> None:
    session = opened(sessions, emu, keys={"dh3": "sk-dh3"}, env={})
    with pytest.raises(ConfigurationError, match=r"targets\[1\]: no API key for get3w"):
        session.router([DH3, GET3W])
    with pytest.raises(ConfigurationError, match="non-empty list of Target"):
        session.router([])
    with pytest.raises(ConfigurationError, match=r"targets\[0\] must be a Target"):
        session.router([("dh3", "nano-banana-pro")])  # type: ignore[list-item]
    with pytest.raises(ConfigurationError, match=r"targets\[1\] repeats dh3:nano-banana-pro"):
        session.router([DH3, Target("dh3", "nano-banana-pro", weight=2)])
    router = session.router([DH3])
    with pytest.raises(ConfigurationError, match="no lane 'dh3:other#x' in this router"):
        router.resume("t1", "dh3:other#x")


# --- routing ------------------------------------------------------------------------


async def test_list_order_is_preference_until_the_first_target_is_full(
    sessions: list[AsyncSession], emu: Emulator
) -> None:
    session = opened(sessions, emu, max_concurrent={"get3w": 2, "dh3": 2})
    router = session.router([GET3W, DH3])
    handles = [await router.submit(prompt=f"job {index}") for index in range(4)]
    assert [handle.provider for handle in handles] == ["get3w", "get3w", "dh3", "dh3"]
    assert [handle.route for handle in handles] == [router.lanes[0]] * 2 + [router.lanes[1]] * 2
    await asyncio.gather(*handles)
    stats = router.stats
    assert [lane.created for lane in stats.values()] == [2, 2]
    assert all(lane.in_flight == 0 and lane.health == HEALTHY for lane in stats.values())


async def test_weights_share_jobs_among_targets_that_can_all_start(
    sessions: list[AsyncSession], emu: Emulator
) -> None:
    session = opened(sessions, emu, max_concurrent={"get3w": 100, "dh3": 100})
    router = session.router([Target("get3w", GET3W.model, weight=3), Target("dh3", DH3.model)])
    handles = [await router.submit(prompt=f"job {index}") for index in range(40)]
    assert [handle.provider for handle in handles[:4]] == ["get3w", "get3w", "dh3", "get3w"]
    assert emu.stats.creates["get3w"] == 30 and emu.stats.creates["dh3"] == 10
    await asyncio.gather(*handles)


async def test_jobs_wait_first_come_first_served_when_every_lane_is_full(
    sessions: list[AsyncSession], emu: Emulator
) -> None:
    emu.config.max_concurrent = {"dh3": 1}
    session = opened(sessions, emu, max_concurrent={"dh3": 1})
    router = session.router([DH3])
    results = await asyncio.gather(*(router.generate(prompt=f"job {index}") for index in range(6)))
    assert len(results) == 6
    assert [task.input["nano_banana_pro_input"]["prompt"] for task in emu.tasks.values()] == [
        f"job {index}" for index in range(6)
    ]
    assert max(emu.stats.peak_running["dh3"].values()) == 1
    assert emu.stats.capacity_refusals["dh3"] == 0  # waited for its place, never sent over the cap


async def test_two_keys_of_one_provider_are_two_lanes_each_with_its_own_cap(
    sessions: list[AsyncSession], emu: Emulator
) -> None:
    emu.config.max_concurrent = {"dh3": 2}
    session = opened(sessions, emu, keys={"dh3": ["sk-one", "sk-two"]}, max_concurrent={"dh3": 2})
    router = session.router([DH3])
    assert len(router.lanes) == 2 and not any("sk-" in label for label in router.lanes)
    results = await asyncio.gather(*(router.generate(prompt=f"job {index}") for index in range(12)))
    assert len({result.task_id for result in results}) == 12
    assert emu.stats.peak_running["dh3"] == {"sk-one": 2, "sk-two": 2}
    assert emu.stats.creates["dh3"] == 12 and emu.stats.capacity_refusals["dh3"] == 0
    assert sorted(lane.created for lane in router.stats.values()) == [6, 6]
    # The client itself keeps the first key.
    await session.dh3.generate(DH3.model, prompt="direct")
    assert emu.tasks[list(emu.tasks)[-1]].input["nano_banana_pro_input"]["prompt"] == "direct"
    assert emu.running("dh3", "sk-one") + emu.running("dh3", "sk-two") <= 1


async def test_a_capacity_refusal_moves_the_job_to_another_lane(
    sessions: list[AsyncSession], emu: Emulator
) -> None:
    # The key's cap is not configured: the first refusal shows it; the refused job goes elsewhere.
    emu.config.max_concurrent = {"nananobanana": 2}
    session = opened(sessions, emu)
    router = session.router([NANA, DH3])
    handles = await asyncio.gather(*(router.submit(prompt=f"job {index}") for index in range(6)))
    await asyncio.gather(*handles)
    assert emu.stats.capacity_refusals["nananobanana"] >= 1
    assert sum(emu.stats.creates.values()) == 6 and set(prompts_created(emu).values()) == {1}
    nana = router.stats[router.lanes[0]]
    assert nana.refused >= 1 and nana.failed_over == nana.refused and nana.created == 2


# --- parameters ---------------------------------------------------------------------


async def test_a_job_goes_only_where_its_parameters_are_documented(
    sessions: list[AsyncSession], emu: Emulator
) -> None:
    session = opened(sessions, emu)
    router = session.router([DH3, NANA])
    handle = await router.submit(prompt="wide", aspect_ratio="7:3")  # not in dh3's list
    assert handle.provider == "nananobanana"
    await handle
    handle = await router.submit(prompt="square", aspect_ratio="1:1")
    assert handle.provider == "dh3"
    await handle


async def test_a_job_no_target_can_take_is_refused_before_anything_is_sent(
    sessions: list[AsyncSession], emu: Emulator
) -> None:
    session = opened(sessions, emu)
    router = session.router([DH3, Target("dh3", "nano-banana")])
    with pytest.raises(
        InvalidRequestError, match=r"no target can take this job: dh3:nano-banana-pro: .*resolution"
    ):
        await router.submit(prompt="huge", resolution="8K")
    assert sum(emu.stats.create_requests.values()) == 0
    assert all(lane.refused == 0 and lane.created == 0 for lane in router.stats.values())


# --- never paying twice ---------------------------------------------------------------


async def test_an_uncertain_create_is_never_sent_again_anywhere(
    sessions: list[AsyncSession], emu: Emulator, odd_server: Any
) -> None:
    received: list[str] = []

    async def drop_after_reading(request: web.Request) -> web.StreamResponse:
        received.append((await request.json())["prompt"])
        assert request.transport is not None
        request.transport.close()  # the request arrived; no answer goes back
        return web.Response(status=499)

    odd = await odd_server({"POST /v1/google/nano-banana-pro/text-to-image": drop_after_reading})
    session = opened(sessions, emu, base_urls={"get3w": odd, "dh3": emu.url})
    router = session.router([GET3W, DH3])
    with pytest.raises(SubmitUncertainError):
        await router.submit(prompt="maybe made")
    assert received == ["maybe made"]
    assert sum(emu.stats.create_requests.values()) == 0
    lane = router.stats[router.lanes[0]]
    assert (lane.failed, lane.refused, lane.failed_over, lane.in_flight) == (1, 0, 0, 0)


@pytest.mark.parametrize("rerun_failed", [False, True])
async def test_a_failed_task_runs_again_elsewhere_only_when_asked(
    sessions: list[AsyncSession], emu: Emulator, rerun_failed: bool
) -> None:
    async with Emulator(EmulatorConfig(duration=0.05, failure_rate=1.0)) as failing:
        session = opened(sessions, failing, base_urls={"get3w": failing.url, "dh3": emu.url})
        router = session.router([GET3W, DH3], rerun_failed=rerun_failed)
        handle = await router.submit(prompt="runs once or twice")
        assert handle.provider == "get3w"
        if rerun_failed:
            result = await handle
            assert result.status is TaskStatus.COMPLETED
            assert handle.provider == "dh3" and handle.route == router.lanes[1]
            assert handle.task_id == result.task_id
        else:
            with pytest.raises(TaskFailedError):
                await handle
        assert failing.stats.creates["get3w"] == 1
        assert emu.stats.creates["dh3"] == (1 if rerun_failed else 0)
        get3w = router.stats[router.lanes[0]]
        assert get3w.failed == 1 and get3w.failed_over == (1 if rerun_failed else 0)


async def test_a_rerun_that_fails_everywhere_ends_with_the_last_failure(
    sessions: list[AsyncSession], emu: Emulator
) -> None:
    session = opened(sessions, emu)
    router = session.router([GET3W, DH3], rerun_failed=True)
    handle = await router.submit(prompt="[fail] everywhere")
    with pytest.raises(TaskFailedError):
        await handle
    assert emu.stats.creates["get3w"] == 1 and emu.stats.creates["dh3"] == 1  # once per lane, no more


# --- health ---------------------------------------------------------------------------


async def test_a_lane_refusing_connections_is_skipped_then_probed_back(
    sessions: list[AsyncSession], emu: Emulator
) -> None:
    async with Emulator(EmulatorConfig(duration=0.02, dh3_qps=None, keep_alive=False)) as dh3_emu:
        await dh3_emu.refuse_connections()
        session = opened(
            sessions, emu, base_urls={"get3w": emu.url, "dh3": dh3_emu.url}, retry_base=0.5, retry_cap=1.0
        )
        router = session.router([DH3, GET3W])
        dh3 = router.lanes[0]
        for index in range(5):
            handle = await router.submit(prompt=f"job {index}")
            assert handle.provider == "get3w"
            await handle
        # Three refused connections in a row; then the lane is skipped for its back-off.
        assert (router.stats[dh3].refused, router.stats[dh3].health) == (3, BACKING_OFF)
        assert emu.stats.creates["get3w"] == 5 and dh3_emu.stats.create_requests["dh3"] == 0
        await dh3_emu.accept_connections()
        # The back-off (0.5 s: long beside five short jobs, even on a loaded machine) runs out;
        # the next job probes the lane.
        await asyncio.sleep(0.55)
        handle = await router.submit(prompt="probe")
        assert handle.provider == "dh3"
        await handle
        assert (router.stats[dh3].health, router.stats[dh3].created) == (HEALTHY, 1)
        assert dh3_emu.stats.creates["dh3"] == 1


async def test_a_stopped_key_is_skipped_and_its_probe_costs_nothing(
    sessions: list[AsyncSession], emu: Emulator
) -> None:
    emu.credits = 0
    session = opened(sessions, emu, retry_base=0.5, retry_cap=1.0)
    router = session.router([NANA, DH3])
    nana = router.lanes[0]
    first = await router.submit(prompt="first")
    assert first.provider == "dh3"
    assert router.stats[nana].health == CIRCUIT_OPEN and router.stats[nana].refused == 1
    second = await router.submit(prompt="second")  # skipped: nothing sent to nananobanana
    assert second.provider == "dh3" and emu.stats.payment_refusals["nananobanana"] == 1
    emu.credits = 10  # topped up: after the back-off (0.5 s), one job probes and the lane is back
    await asyncio.sleep(0.55)
    third = await router.submit(prompt="third")
    assert third.provider == "nananobanana"
    await asyncio.gather(first, second, third)
    stats = router.stats[nana]
    assert (stats.health, stats.created, stats.credits) == (HEALTHY, 1, 1.0)
    assert sum(emu.stats.creates.values()) == 3


# --- resuming by lane -----------------------------------------------------------------


async def test_resume_by_label_polls_the_right_provider_with_the_right_key(
    sessions: list[AsyncSession], emu: Emulator
) -> None:
    keys = {"dh3": ["sk-one", "sk-two"], "get3w": "sk-get3w"}
    session = opened(sessions, emu, keys=keys, max_concurrent={"dh3": 1, "get3w": 1})
    router = session.router([DH3, GET3W])
    handles = [await router.submit(prompt=f"job {index}") for index in range(3)]
    routes = [(handle.task_id, handle.route) for handle in handles]
    assert len({route for _, route in routes}) == 3  # one per lane
    for handle in handles:
        handle.cancel()  # the process "dies": only the ids and lanes are left
    later = opened(sessions, emu, keys=keys)
    again = later.router([DH3, GET3W])
    assert again.lanes == router.lanes
    resumed = [again.resume(task_id, route) for task_id, route in routes]
    results = await asyncio.gather(*resumed)
    assert [result.task_id for result in results] == [task_id for task_id, _ in routes]
    assert sum(emu.stats.creates.values()) == 3  # polled, never created again
    polled_keys = {r.headers.get("Authorization") for r in emu.requests if r.kind == "poll"}
    assert {"Bearer sk-one", "Bearer sk-two", "Bearer sk-get3w"} <= polled_keys
    assert all(lane.in_flight == 0 for lane in again.stats.values())


async def test_polling_settings_are_the_sessions(sessions: list[AsyncSession], emu: Emulator) -> None:
    """generate() through the router: sync mode where the API has one, polling elsewhere."""
    session = opened(sessions, emu, polling=FAST_POLLING)
    router = session.router([GET3W, DH3])
    result = await router.generate(prompt="sync where it can")
    assert result.status is TaskStatus.COMPLETED
    assert emu.stats.polls["get3w"] == 0  # the answer was the result


async def test_on_route_names_each_lane_tried_before_its_create_goes_out(
    sessions: list[AsyncSession], emu: Emulator
) -> None:
    emu.credits = 0  # nananobanana refuses (402): the job moves on to dh3
    session = opened(sessions, emu)
    router = session.router([NANA, DH3])
    tried: list[tuple[str, int]] = []

    def on_route(label: str) -> None:
        tried.append((label, sum(emu.stats.create_requests.values())))

    handle = await router.submit(prompt="where to", on_route=on_route)
    await handle
    assert tried == [(router.lanes[0], 0), (router.lanes[1], 1)]
    assert handle.route == router.lanes[1]


async def test_closing_the_session_ends_the_jobs_waiting_for_a_lane(
    sessions: list[AsyncSession], emu: Emulator
) -> None:
    session = opened(sessions, emu, max_concurrent={"dh3": 1})
    router = session.router([DH3])
    first = await router.submit(prompt="holds the only place")
    waiting = asyncio.ensure_future(router.submit(prompt="waits for it"))
    await asyncio.sleep(0)  # let it join the line
    assert not waiting.done()
    await session.close()
    with pytest.raises(SessionClosedError, match="waited for a lane"):
        await waiting
    assert first.done() and emu.stats.creates["dh3"] == 1


async def test_a_lane_without_a_rate_turn_now_is_passed_over(
    sessions: list[AsyncSession], emu: Emulator
) -> None:
    session = opened(sessions, emu, rate_limits={"dh3": 4.0})
    router = session.router([DH3, GET3W])
    handles = await asyncio.gather(*(router.submit(prompt=f"job {index}") for index in range(10)))
    # dh3 is preferred, but its next turn is 0.25 s away: the other jobs start at once on Get3W.
    assert [handle.provider for handle in handles].count("dh3") == 1
    assert emu.stats.creates["get3w"] == 9 and emu.stats.rate_limited["dh3"] == 0
    await asyncio.gather(*handles)


@pytest.mark.alone
async def test_jobs_waiting_for_rate_turns_are_woken_when_each_comes_due(
    sessions: list[AsyncSession], emu: Emulator
) -> None:
    emu.config.dh3_qps = 4.0  # the server refuses a fifth create within a second
    session = opened(sessions, emu, rate_limits={"dh3": 4.0})
    router = session.router([DH3])
    loop = asyncio.get_running_loop()
    started = loop.time()
    handles = await asyncio.gather(*(router.submit(prompt=f"job {index}") for index in range(5)))
    took = loop.time() - started
    assert emu.stats.creates["dh3"] == 5 and emu.stats.rate_limited["dh3"] == 0
    # The fifth waits for the first to leave the server's second, and not much longer.
    assert 1.0 <= took < 1.4
    await asyncio.gather(*handles)


async def test_a_job_every_lane_refuses_ends_with_the_last_refusal(
    sessions: list[AsyncSession], emu: Emulator
) -> None:
    emu.credits = 0
    emu.get3w_balance = {"sk-get3w": 0}
    session = opened(sessions, emu)
    router = session.router([NANA, GET3W])
    assert not router.stopped
    with pytest.raises(PermissionDeniedError, match="Insufficient balance"):
        await router.submit(prompt="nowhere to go")
    assert router.stopped  # every key stopped: a batch can stop at once
    assert sum(emu.stats.creates.values()) == 0
    assert emu.stats.payment_refusals["nananobanana"] == 1 and emu.stats.payment_refusals["get3w"] == 1
    assert [lane.health for lane in router.stats.values()] == [CIRCUIT_OPEN, CIRCUIT_OPEN]
