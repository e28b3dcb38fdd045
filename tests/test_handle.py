"""TaskHandle with asyncio's tools: gather, as_completed, wait_for, cancel, deadlines."""

from __future__ import annotations

import asyncio

import pytest

from image_gen_async import (
    AsyncSession,
    ConfigurationError,
    TaskHandle,
    TaskResult,
    TaskStatus,
    TaskTimeoutError,
)
from image_gen_async.testing import Emulator

from .batch_helpers import wait_for
from .conftest import SessionFactory


async def submit(session: AsyncSession, prompt: str = "a fox", **params: object) -> TaskHandle:
    return await session.dh3.submit("nano-banana-pro", prompt=prompt, **params)  # type: ignore[arg-type]


async def test_awaitable_many_times_and_result_methods(session: AsyncSession) -> None:
    handle = await submit(session)
    assert not handle.done()
    with pytest.raises(asyncio.InvalidStateError):
        handle.result()
    first = await handle
    second = await handle
    assert first is second is handle.result()
    assert handle.exception() is None
    assert isinstance(first, TaskResult)
    assert "dh3" in repr(handle) and handle.task_id in repr(handle)


async def test_gather_and_as_completed(session: AsyncSession, emulator: Emulator) -> None:
    handles = await asyncio.gather(*(submit(session, f"fox {i}") for i in range(20)))
    results = await asyncio.gather(*handles)
    assert [r.task_id for r in results] == [h.task_id for h in handles]
    more = await asyncio.gather(*(submit(session, f"cat {i}") for i in range(10)))
    seen = {(await future).task_id for future in asyncio.as_completed(more)}
    assert seen == {h.task_id for h in more}
    failing = await submit(session, "bad [fail]")
    outcome = await asyncio.gather(failing, handles[0], return_exceptions=True)
    assert isinstance(outcome[0], Exception) and isinstance(outcome[1], TaskResult)
    assert emulator.stats.creates["dh3"] == 31


async def test_wait_for_timeout_keeps_the_job(session: AsyncSession, emulator: Emulator) -> None:
    handle = await submit(session, "long [slow]")
    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(handle, 0.01)
    with pytest.raises(TimeoutError):
        await handle.wait(0.01)
    assert not handle.done()
    result = await handle.wait()
    assert result.status is TaskStatus.COMPLETED
    assert emulator.stats.creates["dh3"] == 1


async def test_cancelled_gather_does_not_stop_the_job(session: AsyncSession) -> None:
    handle = await submit(session, "long [slow]")
    waiter = asyncio.ensure_future(asyncio.gather(handle))
    await asyncio.sleep(0)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert (await handle).status is TaskStatus.COMPLETED


async def test_cancel_stops_polling(session: AsyncSession, emulator: Emulator) -> None:
    handle = await submit(session, "long [slow]")
    other = await submit(session, "long [slow]")
    assert handle.cancel()
    assert handle.cancelled() and handle.done()
    with pytest.raises(asyncio.CancelledError):
        await handle
    polls_when_cancelled = sum(
        1 for r in emulator.requests if r.kind == "poll" and r.query.get("task_id") == handle.task_id
    )
    await other  # the other job keeps being polled to its end, long after the cancel
    polls_after = sum(
        1 for r in emulator.requests if r.kind == "poll" and r.query.get("task_id") == handle.task_id
    )
    assert polls_after == polls_when_cancelled
    assert other.polls > polls_when_cancelled
    assert not handle.cancel()  # already done
    assert emulator.stats.creates["dh3"] == 2  # nothing resubmitted


async def test_deadline_raises_task_timeout(session: AsyncSession) -> None:
    handle = await submit(session, "long [slow]", timeout=0.1)
    with pytest.raises(TaskTimeoutError) as caught:
        await handle
    assert caught.value.task_id == handle.task_id
    assert isinstance(caught.value, TimeoutError)
    assert handle.polls >= 1


async def test_done_callbacks(session: AsyncSession) -> None:
    handle = await submit(session)
    called: asyncio.Future[TaskHandle] = asyncio.get_running_loop().create_future()
    handle.add_done_callback(called.set_result)
    assert await called is handle
    late: list[TaskHandle] = []
    handle.add_done_callback(late.append)
    await asyncio.sleep(0)  # callbacks of a done future run on the next loop turn
    assert late == [handle]


async def test_resume_polls_without_creating(make_session: SessionFactory, emulator: Emulator) -> None:
    first = make_session()
    handle = await submit(first)
    await first.close()
    second = make_session()
    resumed = second.dh3.resume(handle.task_id, "nano-banana-pro")
    result = await resumed
    assert result.task_id == handle.task_id
    assert emulator.stats.creates["dh3"] == 1
    # Its ages counted from the resume, not from its start: the planner learns nothing from it.
    assert not second._follow.planner.warm(("dh3", "nano-banana-pro"))


async def test_an_async_before_create_is_awaited_before_the_create_is_sent(
    session: AsyncSession, emulator: Emulator
) -> None:
    entered, release = asyncio.Event(), asyncio.Event()
    seen_by_server: list[int] = []

    async def record() -> None:
        entered.set()
        await release.wait()  # e.g. a journal's fsync, in a worker thread
        seen_by_server.append(emulator.stats.creates["dh3"])

    submit = session.dh3.submit("nano-banana-pro", prompt="a cat", before_create=record)
    submitting = asyncio.ensure_future(submit)
    await asyncio.wait_for(entered.wait(), 10)  # a regression would never call it
    assert emulator.stats.creates["dh3"] == 0
    release.set()
    handle = await submitting
    assert seen_by_server == [0]
    assert emulator.stats.creates["dh3"] == 1
    assert (await handle).status is TaskStatus.COMPLETED


async def test_an_awaited_handle_outlives_its_cancelled_awaiters(session: AsyncSession) -> None:
    handle = await session.dh3.submit("nano-banana-pro", prompt="a cat")
    waiters = [asyncio.ensure_future(_take(handle)) for _ in range(3)]
    await asyncio.sleep(0)
    waiters[0].cancel()
    results = await asyncio.gather(*waiters[1:])
    assert all(result.status is TaskStatus.COMPLETED for result in results)
    assert waiters[0].cancelled() and not handle.cancelled()
    assert (await handle) is results[0]  # done: awaiting again returns at once


async def _take(handle: TaskHandle) -> TaskResult:
    return await handle


async def test_a_poll_cancelled_from_outside_ends_its_handle(
    session: AsyncSession, emulator: Emulator
) -> None:
    handle = await session.dh3.submit("nano-banana-pro", prompt="a cat")
    emulator.config.faults.slow, emulator.config.faults.slow_seconds = 1.0, 0.3  # polls stay on the wire
    follower = next(follower for follower in session._follow.followers if follower.handle is handle)
    await wait_for(lambda: follower.polling is not None)
    assert follower.polling is not None
    follower.polling.cancel()  # e.g. an application cancelling every task at shutdown
    with pytest.raises(ConfigurationError, match="resume"):
        await handle
    assert follower not in session._follow.followers


@pytest.mark.skipif(not hasattr(asyncio, "eager_task_factory"), reason="eager tasks are Python 3.12+")
async def test_polling_under_an_eager_task_factory(session: AsyncSession) -> None:
    loop = asyncio.get_running_loop()
    loop.set_task_factory(asyncio.eager_task_factory)  # type: ignore[attr-defined]
    try:
        handles = [await session.dh3.submit("nano-banana-pro", prompt=f"a cat {i}") for i in range(5)]
        results = await asyncio.wait_for(asyncio.gather(*handles), 10)
    finally:
        loop.set_task_factory(None)
    assert all(result.status is TaskStatus.COMPLETED for result in results)
