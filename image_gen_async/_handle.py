"""TaskHandle: one accepted job, awaitable any number of times.

A handle is small (slots, one future) and does no waiting of its own: whoever follows
the task (``_follow``, or a webhook) resolves it, and hangs a cancel hook on it meanwhile.
Each await waits on a future of its own, so a caller's timeout or cancellation
(``asyncio.wait_for``, a cancelled ``gather``) never stops the job: only
``handle.cancel()`` does.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Generator
from typing import Any

from ._capacity import Slot
from ._config import number_in
from .errors import InvalidRequestError, NotSupportedError, TaskFailedError
from .models import TaskResult, TaskStatus


def _wake(waiter: asyncio.Future[None], _: object) -> None:
    if not waiter.done():
        waiter.set_result(None)


log = logging.getLogger("image_gen_async")


class TaskHandle:
    """A job the provider has accepted: its id, live status and, once done, its result."""

    __slots__ = (
        "__weakref__",
        "_cancel_remote",
        "_future",
        "_listeners",
        "_on_cancel",
        "_on_progress",
        "_slot",
        "credits_used",
        "estimated_duration",
        "finished_at",
        "model",
        "polls",
        "progress",
        "provider",
        "retries",
        "route",
        "status",
        "submitted_at",
        "task_id",
    )

    def __init__(
        self,
        *,
        task_id: str,
        provider: str,
        model: str,
        status: TaskStatus = TaskStatus.QUEUED,
        estimated_duration: float | None = None,
        retries: int = 0,
    ) -> None:
        self.task_id = task_id
        self.provider = provider
        self.model = model
        self.status = status
        self.estimated_duration = estimated_duration
        self.polls = 0
        self.retries = retries
        self.submitted_at = time.time()
        self.finished_at: float | None = None
        # What the create cost, where the provider says (nananobanana ``creditsUsed``).
        self.credits_used: float | None = None
        # The router's lane that made the task ("dh3:nano-banana-pro#1a2b3c4d"), else None.
        self.route: str | None = None
        self._future: asyncio.Future[TaskResult] = asyncio.get_running_loop().create_future()
        # Stops whoever follows the task; dropped once the handle is done, so a finished
        # handle keeps nothing of its follower (nor the submitter's context) alive.
        self._on_cancel: Callable[[], object] | None = None
        # The task's place in its key's capacity window, given back once the handle is done.
        self._slot: Slot | None = None
        # Status callbacks (``on_status``, ``updates``); None until the first one, to stay small.
        self._listeners: list[Callable[[TaskStatus], object]] | None = None
        # Cancels the task at the provider, where its API can (set by the client).
        self._cancel_remote: Callable[[], Awaitable[None]] | None = None
        # How far along the job is (0-100), where the provider reports it (a stream), and who listens.
        self.progress: float | None = None
        self._on_progress: list[Callable[[float, str | None], object]] | None = None

    def __repr__(self) -> str:
        return (
            f"<TaskHandle {self.provider} {self.task_id} {self.model} {self.status.value} polls={self.polls}>"
        )

    def __await__(self) -> Generator[Any, None, TaskResult]:
        # Each await waits on a future of its own, so cancelling the awaiter cancels only
        # that (what asyncio.shield does, with less machinery per await).
        future = self._future
        if not future.done():
            waiter = future.get_loop().create_future()
            wake = functools.partial(_wake, waiter)
            future.add_done_callback(wake)
            try:
                yield from waiter
            finally:
                future.remove_done_callback(wake)
        return future.result()

    def done(self) -> bool:
        """True once the task finished, failed, timed out or was cancelled."""
        return self._future.done()

    def cancelled(self) -> bool:
        """True if ``cancel()`` stopped the waiting."""
        return self._future.cancelled()

    def result(self) -> TaskResult:
        """The result; raises the task's error, or ``InvalidStateError`` if not done yet."""
        return self._future.result()

    def exception(self) -> BaseException | None:
        """The error the task ended with, if any (``InvalidStateError`` if not done yet)."""
        return self._future.exception()

    def cancel(self) -> bool:
        """Stop waiting and polling. Nothing is sent to the provider and nothing resubmitted."""
        on_cancel, self._on_cancel = self._on_cancel, None
        # The follower says how much longer the task is likely to run at the provider: its
        # capacity slot stays taken that long (the task still counts against the cap).
        hold = on_cancel() if on_cancel is not None else None
        cancelled = self._future.cancel()
        self._give_back(hold if isinstance(hold, int | float) else None)
        if cancelled:
            self.finished_at = time.time()
            log.info("%s task %s: waiting cancelled", self.provider, self.task_id)
        return cancelled

    async def wait(self, timeout: float | None = None) -> TaskResult:
        """Await the result for at most ``timeout`` seconds; on timeout the job keeps going."""
        if timeout is not None:
            timeout = number_in("timeout", timeout, 0.0, math.inf, error=InvalidRequestError)
        return await asyncio.wait_for(asyncio.shield(self._future), timeout)

    def on_status(self, callback: Callable[[TaskStatus], object]) -> None:
        """Call ``callback(status)`` on every status change seen (queued → processing → done)."""
        if self._listeners is None:
            self._listeners = []
        self._listeners.append(callback)

    def on_progress(self, callback: Callable[[float, str | None], object]) -> None:
        """Call ``callback(progress, message)`` as the provider reports progress (0-100).

        Only streams report it (nananobanana ``stream=True``); polls carry a status only.
        """
        if self._on_progress is None:
            self._on_progress = []
        self._on_progress.append(callback)

    async def updates(self) -> AsyncIterator[TaskStatus]:
        """The statuses as they change: the current one first, the terminal one last.

        Ends once the handle is done (with the job's error raised only by ``await handle``).
        """
        changes: asyncio.Queue[TaskStatus | None] = asyncio.Queue()
        self.on_status(changes.put_nowait)
        self._future.add_done_callback(lambda _: changes.put_nowait(None))
        try:
            last = self.status
            yield last
            while not self._future.done() or not changes.empty():
                status = await changes.get()
                if status is None:
                    break
                if status is not last:
                    last = status
                    yield status
        finally:
            if self._listeners is not None and changes.put_nowait in self._listeners:
                self._listeners.remove(changes.put_nowait)

    async def cancel_remote(self) -> None:
        """Cancel the task at the provider (Get3W v3 ``DELETE /api/v3/predictions/{id}``), then
        stop waiting. ``NotSupportedError`` where the provider's API has no cancel call."""
        if self._cancel_remote is None:
            raise NotSupportedError(f"{self.provider} has no call to cancel a task in its API")
        await self._cancel_remote()
        self.cancel()

    def add_done_callback(self, callback: Callable[[TaskHandle], object]) -> None:
        """Call ``callback(handle)`` once the handle is done (at once if it already is)."""
        self._future.add_done_callback(lambda _: callback(self))

    # Engine side.

    def _give_back(self, after: float | None = None) -> None:
        slot, self._slot = self._slot, None
        if slot is None:
            return
        if after is not None and after > 0:
            asyncio.get_running_loop().call_later(after, slot.release)
        else:
            slot.release()

    def observe(self, status: TaskStatus) -> None:
        """Record the status seen on the wire (a poll or a webhook), logging and telling changes."""
        if status is not self.status:
            log.info("%s task %s: %s -> %s", self.provider, self.task_id, self.status.value, status.value)
            self.status = status
            self._tell(self._listeners, "status", status)

    def report_progress(self, progress: float | None, message: str | None) -> None:
        """Record the progress a stream event reported, telling listeners when it moved."""
        if progress is None or progress == self.progress:
            return
        self.progress = progress
        self._tell(self._on_progress, "progress", progress, message)

    def _tell(self, listeners: list[Callable[..., object]] | None, what: str, *news: object) -> None:
        """Call each listener with ``news``; a failing one is logged, never stops the job."""
        for listener in list(listeners or ()):
            try:
                listener(*news)
            except Exception:  # a caller's callback must not stop the job
                log.exception("%s task %s: a %s callback failed", self.provider, self.task_id, what)

    def resolve(self, result: TaskResult) -> None:
        """Finish with the provider's final answer (first answer wins)."""
        if not self._future.done():
            self._on_cancel = None
            self._give_back()
            self.observe(result.status)
            self.finished_at = time.time()
            self._future.set_result(result)

    def fail(self, error: BaseException) -> None:
        """Finish with an error (first answer wins)."""
        if not self._future.done():
            self._on_cancel = None
            self._give_back()
            if isinstance(error, TaskFailedError):
                self.observe(TaskStatus.FAILED)
            self.finished_at = time.time()
            self._future.set_exception(error)
            # A handle's error is its owner's to read; asyncio need not warn when they never do.
            self._future.exception()
            log.info("%s task %s: ended with %s", self.provider, self.task_id, type(error).__name__)


async def result_of(handle: TaskHandle) -> TaskResult:
    """``await handle`` for a caller that waits for the result itself (``generate()``):
    cancelled, it cancels the handle, since nobody is left to take the result."""
    try:
        return await handle
    except asyncio.CancelledError:
        handle.cancel()  # stop polling for it
        raise
