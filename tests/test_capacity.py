"""Account limits: the capacity gate, account stops and credits, against the emulator's caps."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from image_gen_async import (
    AdmissionTimeoutError,
    AsyncSession,
    AuthenticationError,
    NotSupportedError,
    PaymentRequiredError,
    PermissionDeniedError,
    PollSettings,
    ServerError,
)
from image_gen_async._capacity import (
    GROWTH_PER_WINDOW,
    INITIAL_WINDOW,
    SLOW_START,
    LocalGate,
    is_passing_fault,
)
from image_gen_async.testing import Emulator, EmulatorProcess

from .conftest import KEYS, MODELS, SessionFactory

NANO = "nano-banana"
QUICK = PollSettings(first_poll=0.005, min_interval=0.002, max_interval=0.05)
# A capacity-bound run: a job seen done late keeps a slot idle, so polls come closer together.
KEEN = PollSettings(growth=0.04, first_poll=0.005, min_interval=0.002, max_interval=0.05)


def peak(emulator: Emulator, account: str) -> int:
    return max(emulator.stats.peak_running[account].values(), default=0)


# The gate on its own.


async def test_a_configured_gate_admits_up_to_its_limit_then_first_come_first_served() -> None:
    gate = LocalGate("nananobanana", 2)
    first, second = await gate.admit(None), await gate.admit(None)
    order: list[int] = []

    async def wait(n: int) -> None:
        slot = await gate.admit(None)
        order.append(n)
        slot.release()

    waiters = [asyncio.ensure_future(wait(n)) for n in range(3)]
    await asyncio.sleep(0)
    assert order == [] and gate.in_flight == 2
    first.release()
    second.release()
    await asyncio.gather(*waiters)
    assert order == [0, 1, 2] and gate.in_flight == 0


async def test_a_waiter_out_of_deadline_or_cancelled_takes_no_place() -> None:
    gate = LocalGate("get3w", 1)
    held = await gate.admit(None)
    loop = asyncio.get_running_loop()
    with pytest.raises(AdmissionTimeoutError, match="nothing was sent"):
        await gate.admit(loop.time() + 0.01)
    cancelled = asyncio.ensure_future(gate.admit(None))
    await asyncio.sleep(0)
    cancelled.cancel()
    with pytest.raises(asyncio.CancelledError):
        await cancelled
    after = asyncio.ensure_future(gate.admit(None))
    held.release()
    (await after).release()
    assert gate.in_flight == 0


async def test_a_place_handed_to_a_waiter_cancelled_meanwhile_goes_to_the_next() -> None:
    gate = LocalGate("dh3", 1)
    held = await gate.admit(None)
    first = asyncio.ensure_future(gate.admit(None))
    second = asyncio.ensure_future(gate.admit(None))
    await asyncio.sleep(0)
    held.release()  # the place goes to `first`...
    first.cancel()  # ...which is cancelled before it runs
    with pytest.raises(asyncio.CancelledError):
        await first
    (await second).release()
    assert gate.in_flight == 0


async def test_a_learned_window_grows_fast_until_a_refusal_then_slowly() -> None:
    gate = LocalGate("nananobanana", None)
    assert gate.window == INITIAL_WINDOW
    slots = [await gate.admit(None) for _ in range(INITIAL_WINDOW)]
    for slot in slots:
        gate.accepted(slot)
    assert gate.window == INITIAL_WINDOW + INITIAL_WINDOW // SLOW_START
    refused = await gate.admit(None)
    gate.refused(refused, active=None, retry_after=None)  # 8 in flight: the cap is 8
    assert gate.window == INITIAL_WINDOW and gate.refusals == 1
    slots[0].release()
    slots[0] = await gate.admit(None)
    for _ in range(GROWTH_PER_WINDOW * INITIAL_WINDOW - 1):
        gate.accepted(slots[0])
    assert gate.window == INITIAL_WINDOW
    gate.accepted(slots[0])
    assert gate.window == INITIAL_WINDOW + 1


@pytest.mark.parametrize(
    ("ours", "accepted_at", "in_a_row", "passing"),
    [
        (5, 9, 1, True),  # 9 were running a moment ago: one refusal at 5 is a fault
        (5, 5, 1, False),  # refused where the last creates went through: the cap
        (5, 9, 2, False),  # refused twice in a row: the cap (others took the key's capacity)
        (0, 9, 1, False),  # nothing of ours runs: others hold the cap
        (5, 0, 1, False),  # nothing accepted since the window shrank
    ],
)
def test_a_lone_refusal_below_what_was_just_accepted_is_a_passing_fault(
    ours: int, accepted_at: int, in_a_row: int, passing: bool
) -> None:
    assert is_passing_fault(ours, accepted_at, in_a_row) is passing


async def test_accepts_of_creates_sent_before_a_refusal_do_not_excuse_the_next_one() -> None:
    # Slow start with creates on the wire: answers come back out of order. An accept of a
    # create admitted before a refused one says nothing against the cap; only a later one does.
    gate = LocalGate("nananobanana", None)
    first = [await gate.admit(None) for _ in range(8)]
    gate.accepted(first[0])
    early = await gate.admit(None)
    for slot in first[1:]:
        gate.accepted(slot)
    wire = [await gate.admit(None) for _ in range(7)]
    gate.accepted(early)  # 16 in flight at this accept
    assert gate.learning and gate.in_flight == 16
    gate.refused(wire[3], active=None, retry_after=None)  # a lone refusal at 15: taken as a fault
    assert gate.learning and gate.window >= 16
    gate.accepted(wire[1])  # sent before the refused create: no evidence either way
    gate.refused(wire[4], active=None, retry_after=None)
    assert not gate.learning and gate.window == 14  # the second refusal in a row is the cap
    assert gate.in_flight == gate.window  # at the cap: nothing more goes out


async def test_random_refusals_do_not_collapse_the_window() -> None:
    gate = LocalGate("get3w", None)
    slots = [await gate.admit(None) for _ in range(8)]
    for slot in slots:
        gate.accepted(slot)
    slots += [await gate.admit(None) for _ in range(8)]
    gate.refused(slots.pop(), active=None, retry_after=None)  # the first refusal: taken as the cap
    assert gate.window == 15
    for turn in range(100):  # then one refusal in five creates, as a flaky server gives
        slots.pop().release()
        slot = await gate.admit(None)
        if turn % 5 == 4:
            gate.refused(slot, active=None, retry_after=None)
            slot = await gate.admit(None)
        gate.accepted(slot)
        slots.append(slot)
    assert gate.window >= 15 and gate.refusals == 21


async def test_active_tasks_can_shrink_the_window_below_what_is_in_flight() -> None:
    gate = LocalGate("nananobanana", None)
    slots = [await gate.admit(None) for _ in range(6)]
    gate.refused(slots.pop(), active=3, retry_after=None)  # other processes hold some of the cap
    assert gate.window == 3


async def test_a_refusal_with_nothing_in_flight_pauses_then_tries_one() -> None:
    gate = LocalGate("get3w", None)
    loop = asyncio.get_running_loop()
    gate.refused(await gate.admit(None), active=None, retry_after=0.05)
    started = loop.time()
    (await gate.admit(None)).release()
    assert loop.time() - started >= 0.04 and gate.window == 1


# Against the emulator's caps: thousands of jobs wait their turn instead of failing.


async def gathered_against_a_cap(jobs: int, cap: int, duration: float) -> tuple[float, dict[str, Any]]:
    """``jobs`` submits gathered at once against an account running ``cap`` tasks (cap learned);
    the emulator in its own process (its own core). Elapsed seconds and the server's counters."""
    args = ("--duration", str(duration), "--max-concurrent", f"nananobanana={cap}", "--no-record")
    async with EmulatorProcess(*args) as emulator:
        async with AsyncSession(
            api_keys={"nananobanana": KEYS["nananobanana"]},
            base_urls={"nananobanana": emulator.url},
            polling=QUICK,
            retry_base=0.01,
            retry_cap=0.05,
        ) as session:
            loop = asyncio.get_running_loop()
            started = loop.time()
            handles = await asyncio.gather(
                *(session.nananobanana.submit(NANO, prompt=f"f{i}") for i in range(jobs))
            )
            results = await asyncio.gather(*handles)
            elapsed = loop.time() - started
        stats = await emulator.stats()
    assert all(result.ok for result in results)
    assert stats["creates"]["nananobanana"] == jobs
    assert max(stats["peak_running"]["nananobanana"].values()) <= cap
    return elapsed, stats


@pytest.mark.alone
async def test_1000_jobs_gathered_against_a_cap_of_10_all_complete_with_few_refusals() -> None:
    jobs = 1000
    _, stats = await gathered_against_a_cap(jobs, 10, 0.01)
    refusals = stats["capacity_refusals"].get("nananobanana", 0)
    assert refusals <= 0.05 * jobs, refusals


@pytest.mark.alone
async def test_the_cap_is_kept_full() -> None:
    """Elapsed within 1.15x of what the cap allows (jobs long enough that a loopback round trip
    per turn is not the measure; benchmarks/capacity.py runs the 1000-job figure)."""
    jobs, cap, duration = 60, 10, 0.25  # long enough that a loaded machine's round trips are not it
    elapsed, _ = await gathered_against_a_cap(jobs, cap, duration)
    assert elapsed <= 1.15 * jobs * duration / cap, elapsed


@pytest.mark.alone
async def test_get3w_429_cap_learned_the_same_way(make_session: SessionFactory, emulator: Emulator) -> None:
    jobs, cap = 1000, 20  # refusals come in the first overshoot only: enough jobs to see that
    emulator.config.duration = 0.03
    emulator.config.max_concurrent = {"get3w": cap}
    emulator.config.record_requests = False
    session = make_session(polling=QUICK)
    handles = await asyncio.gather(
        *(session.get3w.submit(MODELS["get3w"], prompt=f"f{i}") for i in range(jobs))
    )
    assert all(result.ok for result in await asyncio.gather(*handles))
    assert emulator.stats.creates["get3w"] == jobs
    assert emulator.stats.capacity_refusals["get3w"] <= 0.05 * jobs, emulator.stats.capacity_refusals
    assert all(handle.retries == 0 for handle in handles)


async def test_a_configured_cap_is_never_exceeded(make_session: SessionFactory, emulator: Emulator) -> None:
    emulator.config.duration = 0.02
    emulator.config.max_concurrent = {"nananobanana": 4}
    session = make_session(polling=QUICK, max_concurrent={"nananobanana": 4})
    handles = await asyncio.gather(*(session.nananobanana.submit(NANO, prompt=f"f{i}") for i in range(60)))
    assert all(result.ok for result in await asyncio.gather(*handles))
    assert emulator.stats.capacity_refusals["nananobanana"] == 0 and peak(emulator, "nananobanana") == 4


async def test_sync_generate_holds_its_slot_while_it_runs(
    make_session: SessionFactory, emulator: Emulator
) -> None:
    emulator.config.duration = 0.02
    session = make_session(polling=QUICK, max_concurrent={"nananobanana": 3})
    results = await asyncio.gather(*(session.nananobanana.generate(NANO, prompt=f"f{i}") for i in range(24)))
    assert all(result.ok for result in results)
    assert peak(emulator, "nananobanana") == 3 and session.nananobanana.capacity.in_flight == 0


async def test_waiting_for_capacity_is_bounded_by_the_jobs_deadline(
    make_session: SessionFactory, emulator: Emulator
) -> None:
    emulator.config.duration = 5.0
    session = make_session(max_concurrent={"dh3": 1})
    running = await session.dh3.submit(MODELS["dh3"], prompt="long")
    with pytest.raises(AdmissionTimeoutError):
        await session.dh3.submit(MODELS["dh3"], prompt="waits", timeout=0.1)
    waiting = asyncio.ensure_future(session.dh3.submit(MODELS["dh3"], prompt="cancelled"))
    await asyncio.sleep(0.01)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert emulator.stats.create_requests["dh3"] == 1
    running.cancel()
    assert session.dh3.capacity.in_flight == 0


async def test_a_cancelled_handle_keeps_its_place_while_its_task_is_likely_to_run(
    make_session: SessionFactory, emulator: Emulator
) -> None:
    emulator.config.duration = 0.15
    session = make_session(polling=QUICK, max_concurrent={"dh3": 1})
    assert (await (await session.dh3.submit(MODELS["dh3"], prompt="teaches 0.15 s"))).ok
    handle = await session.dh3.submit(MODELS["dh3"], prompt="cancelled")
    handle.cancel()  # the task runs on at the provider, and still counts against the cap
    assert session.dh3.capacity.in_flight == 1
    assert (await (await session.dh3.submit(MODELS["dh3"], prompt="next"))).ok
    assert emulator.stats.capacity_refusals["dh3"] == 0 and session.dh3.capacity.in_flight == 0


async def test_a_resumed_task_holds_a_place(make_session: SessionFactory, emulator: Emulator) -> None:
    emulator.config.duration = 0.05
    first = make_session(polling=QUICK)
    handle = await first.dh3.submit(MODELS["dh3"], prompt="a fox")
    second = make_session(polling=QUICK, max_concurrent={"dh3": 1})
    resumed = second.dh3.resume(handle.task_id, MODELS["dh3"])
    assert second.dh3.capacity.in_flight == 1
    assert (await resumed).ok and second.dh3.capacity.in_flight == 0


# Account stops: one answer that says the key cannot work stops every create of that key.


async def test_out_of_credits_stops_the_key_and_fails_the_waiting_creates_at_once(
    make_session: SessionFactory, emulator: Emulator
) -> None:
    emulator.credits = 5
    session = make_session(polling=QUICK)
    outcomes = await asyncio.gather(
        *(session.nananobanana.submit(NANO, prompt=f"f{i}") for i in range(40)), return_exceptions=True
    )
    accepted = [outcome for outcome in outcomes if not isinstance(outcome, BaseException)]
    refused = [outcome for outcome in outcomes if isinstance(outcome, PaymentRequiredError)]
    assert len(accepted) == 5 and len(refused) == 35
    assert emulator.stats.creates["nananobanana"] == 5
    assert emulator.stats.payment_refusals["nananobanana"] <= INITIAL_WINDOW  # the first round only
    assert isinstance(session.nananobanana.blocked, PaymentRequiredError)
    before = emulator.stats.create_requests["nananobanana"]
    with pytest.raises(PaymentRequiredError):
        await session.nananobanana.submit(NANO, prompt="later")
    assert emulator.stats.create_requests["nananobanana"] == before  # nothing sent
    assert all([(await handle).ok for handle in accepted])  # what was in flight finishes
    emulator.credits = 10
    session.nananobanana.unblock()
    assert (await (await session.nananobanana.submit(NANO, prompt="after a top-up"))).ok


@pytest.mark.parametrize(
    ("setup", "error"),
    [
        ("revoked", AuthenticationError),
        ("balance", PermissionDeniedError),
    ],
)
async def test_a_revoked_key_or_no_balance_stops_both_get3w_apis(
    make_session: SessionFactory, emulator: Emulator, setup: str, error: type[Exception]
) -> None:
    assert emulator.config.api_keys is not None
    emulator.config.api_keys.pop("get3w_v3")  # one Get3W account: v3 takes v1's key
    if setup == "revoked":
        emulator.config.revoked_keys = {KEYS["get3w"]}
    else:
        emulator.get3w_balance[KEYS["get3w"]] = 0
    session = make_session(api_keys={name: key for name, key in KEYS.items() if name != "get3w_v3"})
    with pytest.raises(error):
        await session.get3w.submit(MODELS["get3w"], prompt="a fox")
    with pytest.raises(error):
        await session.get3w_v3.submit(MODELS["get3w_v3"], prompt="a fox")
    assert emulator.stats.create_requests["get3w"] == 1 and emulator.stats.create_requests["get3w_v3"] == 0
    assert isinstance(session.get3w_v3.blocked, error)


async def test_a_5xx_storm_does_not_open_the_circuit(
    make_session: SessionFactory, emulator: Emulator
) -> None:
    emulator.script("dh3", "create", "503", times=3)
    session = make_session()
    assert (await (await session.dh3.submit(MODELS["dh3"], prompt="a fox"))).ok
    assert session.dh3.blocked is None
    emulator.script("dh3", "create", "500")
    with pytest.raises(Exception) as caught:
        await session.dh3.submit(MODELS["dh3"], prompt="a fox")
    assert not isinstance(caught.value, ServerError | PaymentRequiredError) and session.dh3.blocked is None


# Credits.


async def test_credits_models_and_what_each_task_cost(session: Any, emulator: Emulator) -> None:
    emulator.credits = 50
    assert await session.nananobanana.credits() == 50
    models = await session.nananobanana.models()
    assert {model.name for model in models} >= {"nano-banana", "nano-banana-pro"}
    assert next(model for model in models if model.name == "nano-banana").credits_cost == 1
    handle = await session.nananobanana.submit(NANO, prompt="a fox")
    result = await handle
    assert result.credits_used == 1 and session.nananobanana.remaining_credits == 49
    synced = await session.nananobanana.generate("nano-banana-pro", prompt="a fox")
    assert synced.credits_used == 2
    for name in ("dh3", "get3w", "get3w_v3"):
        with pytest.raises(NotSupportedError):
            await session.client(name).credits()
        with pytest.raises(NotSupportedError):
            await session.client(name).models()
