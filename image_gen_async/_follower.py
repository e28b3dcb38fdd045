"""One job's polls, driven by event-loop timers: a sleeping job holds a timer, not a task.

With 100,000 jobs in flight most of them are asleep between polls. A coroutine per job
would keep a task, a frame, a sleep future and a context alive for each, and every one
of them is work for the garbage collector; a timer is one small handle. A task exists
only while a poll is on the wire.

The schedule is the planner's: on each timer the next poll's age is planned again,
since other jobs may have shown that this one cannot be done yet.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
from typing import TYPE_CHECKING

from ._polling import webhook_wait
from .errors import ConfigurationError, ImageGenError, TaskTimeoutError

if TYPE_CHECKING:
    from ._engine import Engine, Target
    from ._handle import TaskHandle
    from .providers import Snapshot

log = logging.getLogger("image_gen_async")

# A timer may fire this much before its time (the loop's clock resolution): close enough.
SLACK = 0.001


class Follower:
    """Polls one accepted task until it ends, fails or passes its deadline; resolves its handle."""

    __slots__ = (
        "_context",
        "_engine",
        "_handle",
        "_key",
        "_last_poll",
        "_last_running",
        "_learn",
        "_loop",
        "_request",
        "_target",
        "_task",
        "_timer",
        "_url",
        "accepted",
        "deadline",
    )

    def __init__(
        self,
        engine: Engine,
        target: Target,
        handle: TaskHandle,
        snapshot: Snapshot,
        timeout: float | None,
        *,
        learn: bool = True,
    ) -> None:
        self._engine = engine
        # A resumed job's ages count from the resume, not from its start: they teach nothing.
        self._learn = learn
        self._target = target
        self._handle = handle
        self._loop = asyncio.get_running_loop()
        # Ages count from now, when the create's answer came back.
        self.accepted = self._loop.time()
        self.deadline = self.accepted + (engine.settings.task_timeout if timeout is None else timeout)
        self._key = (target.name, handle.model)
        self._request = engine.poll_request(target, handle, snapshot.poll_url)
        self._url = target.url(self._request.path)
        self._last_poll: float | None = None
        self._last_running = 0.0
        # Polls run in the submitter's context (log correlation ids and the like), copied once.
        self._context = contextvars.copy_context()
        self._timer: asyncio.TimerHandle | None = None
        self._task: asyncio.Task[None] | None = None

    def begin(self, *, webhook: bool = False) -> None:
        """Start polling; with a webhook, only once the callback is clearly late."""
        if webhook:
            upper = self._engine.planner.upper_bound(self._key, self._handle.estimated_duration)
            wait = webhook_wait(upper, self._engine.settings.polling)
            self._timer = self._loop.call_at(
                min(self.accepted + wait, self.deadline), self._no_callback, context=self._context
            )
        else:
            self._plan()

    @property
    def handle(self) -> TaskHandle:
        """The job's handle."""
        return self._handle

    @property
    def polling(self) -> asyncio.Task[None] | None:
        """The poll on the wire right now, if any."""
        return self._task

    def cancel(self) -> None:
        """Stop: no further poll, and the one on the wire (if any) is cancelled."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._task is not None:
            self._task.cancel()
            self._task = None
        self._leave()

    def _no_callback(self) -> None:
        log.info("%s task %s: no callback yet, polling", self._target.name, self._handle.task_id)
        self._plan()

    def _plan(self) -> None:
        """Arm the timer for the next poll, or send it now if it is due."""
        self._timer = None
        try:
            now = self._loop.time()
            if now >= self.deadline:
                raise self._late(now)
            planner = self._engine.planner
            settings = self._engine.settings.polling
            age = planner.next_poll_age(self._key, self._handle.estimated_duration, self._last_poll, settings)
            due = self.accepted + age
            if due > now + SLACK:
                self._timer = self._loop.call_at(min(due, self.deadline), self._plan, context=self._context)
            else:
                # The task copies the context entered now (ours): under an eager task factory
                # it starts at once, and a context cannot be entered twice.
                task = self._loop.create_task(self._poll())
                self._task = None if task.done() else task
        except Exception as error:  # every failure ends on the handle, never in a lost timer
            self._end(error)

    async def _poll(self) -> None:
        engine, handle, target = self._engine, self._handle, self._target
        try:
            now = self._loop.time()
            self._last_poll = last_poll = now - self.accepted
            remaining = self.deadline - now
            poll = engine.poll(target, handle, self._request, budget=remaining, url=self._url)
            try:
                if remaining > engine.settings.read_timeout + engine.settings.retry_cap:
                    # Far from the deadline one poll cannot pass it, and backoff's own
                    # budget ends its retries there: no timer needed.
                    snapshot = await poll
                else:
                    async with asyncio.timeout(max(0.0, remaining)):
                        snapshot = await poll
            except TimeoutError:
                raise self._late(self._loop.time()) from None
            except ImageGenError:
                now = self._loop.time()
                if now >= self.deadline:
                    raise self._late(now) from None
                raise
            handle.polls += 1
            handle.observe(snapshot.status)
            if snapshot.result is not None:
                took = (self._last_running, last_poll) if self._learn else None
                engine.finish(target, handle, snapshot.result, took)
                self._end(None)
                return
            self._last_running = last_poll
            if self._learn:
                engine.planner.running(self._key, handle, last_poll, handle.estimated_duration)
        except asyncio.CancelledError:
            if self._task is not None:
                # Cancelled from outside (not by cancel(), which lets go of the task first):
                # nobody will poll this job any more, so its handle must say so.
                self._end(
                    ConfigurationError(
                        f"polling of {target.name} task {handle.task_id} was cancelled; "
                        "it may still finish: client.resume() picks it up"
                    )
                )
            raise
        except Exception as error:  # every failure ends on the handle, never in a lost task
            self._end(error)
            return
        self._task = None
        self._plan()

    def _late(self, now: float) -> TaskTimeoutError:
        handle = self._handle
        return TaskTimeoutError(
            f"{self._target.name} task {handle.task_id} not finished after "
            f"{now - self.accepted:.1f} s ({handle.polls} polls); it may still finish",
            task_id=handle.task_id,
            provider=self._target.name,
        )

    def _end(self, error: Exception | None) -> None:
        self._task = None
        if error is not None:
            self._handle.fail(error)
        self._leave()

    def _leave(self) -> None:
        self._engine.planner.forget(self._key, self._handle)
        self._engine.followers.discard(self)
