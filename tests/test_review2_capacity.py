"""Second hostile review: capacity slots that are given back while their task may still run."""

from __future__ import annotations

import asyncio

import pytest

from image_gen_async import SubmitUncertainError
from image_gen_async.errors import TaskTimeoutError
from image_gen_async.testing import Emulator

from .batch_helpers import wait_for
from .conftest import SessionFactory

NANO = "nano-banana"


def peak(emulator: Emulator) -> int:
    """The most nananobanana tasks the emulator saw running at once for any key."""
    return max(emulator.stats.peak_running["nananobanana"].values(), default=0)


@pytest.mark.xfail(
    strict=True,
    reason="known limit, cold only: with no duration known for the model, "
    "a submit() cancelled after its create went out gives its slot back at once, while the "
    "create, read on in the background, makes a task (session.orphans): the cap is exceeded",
)
async def test_a_cancelled_submit_whose_create_went_out_keeps_its_slot(
    make_session: SessionFactory, emulator: Emulator
) -> None:
    emulator.config.duration = 0.5
    emulator.config.faults.slow_seconds = 0.2  # the first create's answer takes a while
    emulator.script("nananobanana", "create", "slow")
    session = make_session(max_concurrent={"nananobanana": 1})
    client = session.client("nananobanana")
    first = asyncio.create_task(client.submit(NANO, prompt="a fox"))
    await wait_for(lambda: emulator.stats.create_requests["nananobanana"] == 1)
    first.cancel()  # e.g. asyncio.wait_for(submit(), ...) running out
    second = await client.submit(NANO, prompt="a hare")
    await wait_for(lambda: len(session.orphans) == 1)  # the first create did make a task
    await second
    assert emulator.stats.creates["nananobanana"] == 2
    assert peak(emulator) <= 1  # max_concurrent=1, yet two of our tasks ran at once


@pytest.mark.xfail(
    strict=True,
    reason="known limit, cold only: an uncertain create (connection lost after the task was made) "
    "gives its slot back at once "
    "when the model has no duration history: the next create runs past max_concurrent",
)
async def test_an_uncertain_create_holds_its_slot_even_without_history(
    make_session: SessionFactory, emulator: Emulator
) -> None:
    emulator.config.duration = 0.5
    emulator.script("nananobanana", "create", "drop_after")  # made, then the answer is lost
    session = make_session(max_concurrent={"nananobanana": 1})
    client = session.client("nananobanana")
    with pytest.raises(SubmitUncertainError):
        await client.submit(NANO, prompt="a fox")
    second = await client.submit(NANO, prompt="a hare")
    await second
    assert emulator.stats.creates["nananobanana"] == 2
    assert peak(emulator) <= 1


@pytest.mark.xfail(
    strict=True,
    reason="known limit: a handle that times out (overdue: it may be stuck), or is cancelled while "
    "nothing is known of the model's durations, gives its "
    "slot back while its task still runs at the provider: the next create runs past max_concurrent",
)
@pytest.mark.parametrize("how", ["timeout", "cancel"])
async def test_a_handle_given_up_on_keeps_its_slot_while_its_task_runs(
    make_session: SessionFactory, emulator: Emulator, how: str
) -> None:
    emulator.config.duration = 0.4
    session = make_session(max_concurrent={"nananobanana": 1})
    client = session.client("nananobanana")
    first = await client.submit(NANO, prompt="a fox", timeout=0.1 if how == "timeout" else None)
    if how == "cancel":
        first.cancel()
    else:
        with pytest.raises(TaskTimeoutError):
            await first
    second = await client.submit(NANO, prompt="a hare")
    await second
    assert emulator.stats.creates["nananobanana"] == 2
    assert peak(emulator) <= 1
