"""Status updates from polls and webhooks, and cancelling a task at the provider."""

from __future__ import annotations

import asyncio

import pytest

from image_gen_async import NotSupportedError, PollSettings, TaskStatus
from image_gen_async.testing import Emulator

from .conftest import MODELS, SessionFactory

ORDER = [TaskStatus.QUEUED, TaskStatus.PROCESSING, TaskStatus.COMPLETED]


@pytest.mark.parametrize("name", ["get3w", "get3w_v3", "dh3", "nananobanana"])
async def test_status_callbacks_and_updates_follow_the_job_to_its_end(
    make_session: SessionFactory, emulator: Emulator, name: str
) -> None:
    emulator.config.duration = 0.2
    session = make_session()
    handle = await session.client(name).submit(MODELS[name], prompt="a fox")
    seen: list[TaskStatus] = []
    handle.on_status(seen.append)
    updates = [status async for status in handle.updates()]
    assert (await handle).ok
    assert updates[-1] is TaskStatus.COMPLETED and seen[-1] is TaskStatus.COMPLETED
    for statuses in (updates, seen):
        assert statuses == sorted(statuses, key=ORDER.index)  # forward only, each change once
        assert len(set(statuses)) == len(statuses)


async def test_updates_come_from_webhooks_too(make_session: SessionFactory, emulator: Emulator) -> None:
    polling = PollSettings(first_poll=0.02, min_interval=0.005, max_interval=0.1, webhook_unknown_wait=30.0)
    session = make_session(polling=polling)
    await session.webhooks.listen("127.0.0.1", 0)
    handle = await session.dh3.submit(MODELS["dh3"], prompt="a fox", webhook=True)
    updates = [status async for status in handle.updates()]
    assert updates[-1] is TaskStatus.COMPLETED and handle.polls == 0


async def test_a_failing_status_callback_does_not_stop_the_job(session: object, emulator: Emulator) -> None:
    handle = await session.dh3.submit(MODELS["dh3"], prompt="a fox")  # type: ignore[attr-defined]

    def broken(status: TaskStatus) -> None:
        raise RuntimeError("a caller's bug")

    handle.on_status(broken)
    assert (await handle).ok


async def test_updates_of_a_finished_handle_give_its_last_status(session: object) -> None:
    result = await session.nananobanana.generate(MODELS["nananobanana"], prompt="a fox")  # type: ignore[attr-defined]
    assert result.ok
    handle = await session.nananobanana.submit(MODELS["nananobanana"], prompt="a fox")  # type: ignore[attr-defined]
    await handle
    assert [status async for status in handle.updates()] == [TaskStatus.COMPLETED]


async def test_cancel_remote_deletes_a_get3w_v3_prediction(
    make_session: SessionFactory, emulator: Emulator
) -> None:
    emulator.config.duration = 5.0
    session = make_session()
    handle = await session.get3w_v3.submit(MODELS["get3w_v3"], prompt="a fox")
    assert handle.task_id in emulator.tasks
    await handle.cancel_remote()
    assert handle.task_id not in emulator.tasks  # gone at the provider
    deletes = [r for r in emulator.requests if r.method == "DELETE"]
    assert len(deletes) == 1 and deletes[0].path == f"/api/v3/predictions/{handle.task_id}"
    assert handle.cancelled() and session.get3w_v3.capacity.in_flight == 0


@pytest.mark.parametrize("name", ["get3w", "dh3", "nananobanana"])
async def test_cancel_remote_where_the_api_has_none_says_so_and_sends_nothing(
    make_session: SessionFactory, emulator: Emulator, name: str
) -> None:
    emulator.config.duration = 5.0
    session = make_session()
    handle = await session.client(name).submit(MODELS[name], prompt="a fox")
    with pytest.raises(NotSupportedError, match=name):
        await handle.cancel_remote()
    assert not handle.done()
    assert not [r for r in emulator.requests if r.method == "DELETE"]
    handle.cancel()
    await asyncio.sleep(0)
