"""Accepted task → resolved handle: the poll loop, the webhook wait, and finishing.

``Follow`` is the one owner of every accepted task of a session until its handle is done.
Each task has a ``Follower`` driven by event-loop timers: a sleeping job holds a timer, not
a task (with 100,000 jobs in flight most are asleep, and a coroutine each would be a task,
a frame, a sleep future and a context for the garbage collector to walk). A task exists
only while a poll is on the wire.

The schedule is the planner's, planned again on every timer, since other jobs may have
shown that this one cannot be done yet. Deadlines are kept to the poll: every exchange
and every retry wait ends by the handle's deadline, and a job is always polled at least
once before it (a plan that lands past it is pulled in to a last look).
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
from typing import Any

import attrs

from . import _json
from ._engine import Engine
from ._events import EventStream
from ._handle import TaskHandle
from ._polling import PollPlanner, webhook_wait
from ._transport import Target, describe
from .errors import (
    AuthenticationError,
    ContentPolicyError,
    ImageGenError,
    SessionClosedError,
    SubmitUncertainError,
    TaskFailedError,
    TaskTimeoutError,
    TransportError,
)
from .models import TaskResult, TaskStatus
from .providers import HttpRequest, Snapshot

log = logging.getLogger("image_gen_async")

# A timer may fire this much before its time (the loop's clock resolution): close enough.
SLACK = 0.001
# The last look before a deadline comes this share of the job's time (at most LAST_LOOK_MAX s) early.
LAST_LOOK_SHARE = 0.1
LAST_LOOK_MAX = 1.0
# Sleeping polls planned again per turn of the loop when a kind's first job completes.
WAKE_BATCH = 1000


class Follow:
    """Every accepted task of a session until its handle is done: polled, or waited for by webhook."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.settings = engine.settings
        self.planner = PollPlanner(engine.settings.polling.history, settings=engine.settings.polling)
        polling = engine.settings.polling
        self.keen = attrs.evolve(polling, growth=polling.growth / 2, min_interval=polling.min_interval / 2)
        self.followers: set[Follower] = set()
        self.telemetry: Any = None  # an otel.Telemetry, when the session has one

    def start(
        self,
        target: Target,
        handle: TaskHandle,
        snapshot: Snapshot,
        timeout: float | None,
        *,
        webhook: bool = False,
        learn: bool = True,
        events: EventStream | None = None,
    ) -> None:
        """Follow an accepted task to its end in the background (after a webhook wait, if any).

        ``events``: the open stream of a stream create, read until the job ends; polling takes
        over if it drops. ``learn=False`` (a resumed task, whose ages do not count from its start) keeps its
        polls out of the planner's history. Never raises: the task exists, so whatever goes
        wrong ends on its handle, which carries the task id for ``client.resume()``.
        """
        if self.engine.closed:
            if events is not None:
                events.close()
            handle.fail(
                SessionClosedError(
                    f"the session closed as {target.name} accepted task {handle.task_id}; "
                    "it may still finish: client.resume() picks it up"
                )
            )
            return
        try:
            follower = Follower(self, target, handle, snapshot, timeout, learn=learn)
            handle._on_cancel = follower.cancel
            self.followers.add(follower)
            follower.begin(webhook=webhook, events=events)
        except Exception as error:
            if events is not None:
                events.close()
            handle.fail(error)

    async def close(self) -> None:
        """Stop every follower; their handles end with ``SessionClosedError`` (the tasks may still finish)."""
        followers = list(self.followers)
        polls = [follower.polling for follower in followers if follower.polling is not None]
        for follower in followers:
            follower.cancel()
        await asyncio.gather(*polls, return_exceptions=True)
        for follower in followers:
            handle = follower.handle
            handle.fail(
                SessionClosedError(
                    f"session closed while waiting for {handle.provider} task {handle.task_id}; "
                    "it may still finish: client.resume() picks it up"
                )
            )

    def poll_request(self, target: Target, handle: TaskHandle, poll_url: str | None) -> HttpRequest:
        """The codec's status call, or the server's own poll URL when it is on our origin."""
        if poll_url:
            path = target.same_origin_path(poll_url)
            if path is not None:
                return HttpRequest("GET", path)
            log.warning(
                "%s task %s: ignoring a poll URL on another origin (or not http); polling %s instead",
                target.name,
                handle.task_id,
                target.origin,
            )
        return target.codec.poll_request(handle.task_id, handle.model)

    def settle_from_callback(self, target: Target, handle: TaskHandle, snapshot: Snapshot) -> bool:
        """Apply a webhook's news to a handle; True when it ended the task (the poller stops)."""
        handle.observe(snapshot.status)
        if snapshot.result is None:
            return False
        on_cancel, handle._on_cancel = handle._on_cancel, None
        if on_cancel is not None:
            on_cancel()  # the follower stops: the callback said it all
        took = time.time() - handle.submitted_at
        self.finish(target, handle, snapshot.result, (took, took))
        return True

    def wake(self, key: tuple[str, str]) -> None:
        """Plan again every sleeping poll of ``key``: its first completion ends the cold plans.

        Cold, most jobs of a kind sleep while a few look for them all (see ``_polling``); the
        first one seen done says the others may be done too, sooner than their timers say.
        A thousand at a time, each batch in its own turn of the loop: with 100,000 asleep the
        loop is never held for long.
        """
        self._wake_batch([follower for follower in self.followers if follower.key == key])

    def _wake_batch(self, sleepers: list[Follower]) -> None:
        batch, rest = sleepers[:WAKE_BATCH], sleepers[WAKE_BATCH:]
        for follower in batch:
            follower.wake()
        if rest:
            asyncio.get_running_loop().call_soon(self._wake_batch, rest)

    def finish(
        self,
        target: Target,
        handle: TaskHandle,
        result: TaskResult,
        took: tuple[float, float] | None,
    ) -> None:
        """Resolve a handle from a terminal result.

        ``took`` brackets a completed job's duration for the planner: the last age it was seen
        running (0 if never) and the age it was seen done; equal when known exactly.
        """
        if result.status is TaskStatus.COMPLETED:
            if took is not None:
                key = (target.name, handle.model)
                cold = not self.planner.warm(key)
                self.planner.completed(key, handle, took[0], took[1], handle.estimated_duration)
                if cold:
                    # After this handle is resolved (its result waits for nobody's timers).
                    asyncio.get_running_loop().call_soon(self.wake, key)
            handle.resolve(result)
        else:
            handle.fail(failure_error(target, result))


def failure_error(target: Target, result: TaskResult) -> TaskFailedError:
    """The error for a failed task (``ContentPolicyError`` for a safety stop), the key masked."""
    if result.error:
        masked = target.mask(result.error)
        if masked != result.error:
            result = attrs.evolve(result, error=masked)
    return ContentPolicyError(result) if target.codec.content_policy(result) else TaskFailedError(result)


def stream_step(
    status: TaskStatus, progress: float | None, event: Snapshot
) -> tuple[TaskStatus, float | None]:
    """What a stream event moves on: its status and progress, never backwards.

    A second "Generation started" (progress 0) must not send a running job back to queued,
    and a progress bar that fell would only confuse: such parts of an event change nothing
    (the progress returned is None).
    """
    back_to_queued = event.status is TaskStatus.QUEUED and status is not TaskStatus.QUEUED
    rising = event.progress is not None and (progress is None or event.progress > progress)
    return (status if back_to_queued else event.status), (event.progress if rising else None)


class Follower:
    """Polls one accepted task until it ends, fails or passes its deadline; resolves its handle."""

    __slots__ = (
        "_context",
        "_events",
        "_follow",
        "_handle",
        "_key",
        "_last_look",
        "_last_poll",
        "_last_running",
        "_learn",
        "_loop",
        "_provisional",
        "_request",
        "_target",
        "_task",
        "_timer",
        "_timer_polls",
        "_url",
        "_warned",
        "accepted",
        "deadline",
    )

    def __init__(
        self,
        follow: Follow,
        target: Target,
        handle: TaskHandle,
        snapshot: Snapshot,
        timeout: float | None,
        *,
        learn: bool = True,
    ) -> None:
        self._follow = follow
        # A resumed job's ages count from the resume, not from its start: they teach nothing.
        self._learn = learn
        self._target = target
        self._handle = handle
        self._loop = asyncio.get_running_loop()
        # Ages count from now, when the create's answer came back. (From when it went out
        # would be early by the server's backlog: a burst of creates queues there.)
        self.accepted = self._loop.time()
        span = follow.settings.task_timeout if timeout is None else timeout
        self.deadline = self.accepted + span
        self._last_look = self.deadline - min(LAST_LOOK_MAX, span * LAST_LOOK_SHARE)
        self._key = (target.name, handle.model)
        self._request = follow.poll_request(target, handle, snapshot.poll_url)
        self._url = target.url(self._request.path)
        self._last_poll: float | None = None
        self._last_running = 0.0
        self._warned = False
        # Polls run in the submitter's context (log correlation ids and the like), copied once.
        self._context = contextvars.copy_context()
        self._timer: asyncio.TimerHandle | None = None
        self._timer_polls = False  # the timer is the next poll's (not a webhook wait's)
        self._task: asyncio.Task[None] | None = None
        self._events: EventStream | None = None  # a stream create's open stream, while read
        # The task id is ours until an event names the provider's: no poll can find it.
        self._provisional = snapshot.provisional

    def begin(self, *, webhook: bool = False, events: EventStream | None = None) -> None:
        """Start polling; with a webhook, only once the callback is clearly late; with a stream,
        only if it drops before the job ends."""
        if events is not None:
            self._events = events
            task = self._loop.create_task(self._listen(events))
            self._task = None if task.done() else task
        elif webhook:
            self._await_callback()
        else:
            self._plan()

    @property
    def key(self) -> tuple[str, str]:
        """The provider and model whose history plans this job's polls."""
        return self._key

    def wake(self) -> None:
        """Plan the next poll again now, if one is asleep on a timer (see ``Follow.wake``)."""
        if self._timer is not None and self._timer_polls:
            self._timer.cancel()
            self._plan()

    @property
    def handle(self) -> TaskHandle:
        """The job's handle."""
        return self._handle

    @property
    def polling(self) -> asyncio.Task[None] | None:
        """The poll on the wire right now, if any."""
        return self._task

    def cancel(self) -> float | None:
        """Stop: no further poll, and the one on the wire (if any) is cancelled.

        Returns how much longer the task is likely to run at the provider (the longest job of
        its model seen, less its age), or None when that is not known.
        """
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._task is not None:
            self._task.cancel()
            self._task = None
        if self._events is not None:
            self._events.close()  # also when its reader was cancelled before it ran
            self._events = None
        self._leave()
        longest = self._follow.planner.upper_bound(self._key, self._handle.estimated_duration)
        if longest is None:
            return None
        return max(0.0, longest * 1.25 - (self._loop.time() - self.accepted))

    def _await_callback(self) -> None:
        """Wait for the callback, re-planning the safety net as the model's durations become known.

        The wait is re-read at ages that double from ``webhook_grace``: jobs whose callbacks
        did come in teach the planner how long the model takes, and a lost callback is then
        noticed by that, not by the wait fixed at submit time.
        """
        self._timer = None
        follow, now = self._follow, self._loop.time()
        upper = follow.planner.upper_bound(self._key, self._handle.estimated_duration)
        due = min(self.accepted + webhook_wait(upper, follow.settings.polling), self._last_look)
        if due <= now + SLACK:
            log.info("%s task %s: no callback yet, polling", self._target.name, self._handle.task_id)
            self._plan()
            return
        recheck = now + max(follow.settings.polling.webhook_grace, now - self.accepted)
        self._timer = self._loop.call_at(min(due, recheck), self._await_callback, context=self._context)
        self._timer_polls = False

    def _plan(self) -> None:
        """Arm the timer for the next poll, or send it now if it is due."""
        self._timer = None
        try:
            now = self._loop.time()
            if now >= self.deadline and self._last_poll is not None:
                raise self._late(now)
            if now >= self._last_look and self._last_poll is None:
                self._poll_now()  # a paid task is looked at once, however short its deadline
                return
            follow = self._follow
            # While creates wait for this key's capacity, a job seen done late keeps a slot
            # idle: its polls come at half the growth.
            settings = follow.keen if self._target.account.gate.waiting else follow.settings.polling
            age = follow.planner.next_poll_age(
                self._key, self._handle.estimated_duration, self._last_poll, settings
            )
            due = self.accepted + age
            if due >= self._last_look:
                # Past the deadline's last look: poll then, once; after it, only the deadline.
                looked = self._last_poll is not None and self.accepted + self._last_poll >= self._last_look
                due = self.deadline if looked else max(now, self._last_look)
            if due > now + SLACK:
                self._timer = self._loop.call_at(due, self._plan, context=self._context)
                self._timer_polls = True
            else:
                self._poll_now()
        except Exception as error:  # every failure ends on the handle, never in a lost timer
            self._end(error)

    def _poll_now(self) -> None:
        # The task copies the context entered now (ours): under an eager task factory it
        # starts at once, and a context cannot be entered twice.
        task = self._loop.create_task(self._poll())
        self._task = None if task.done() else task

    async def _poll(self) -> None:
        follow, handle, target = self._follow, self._handle, self._target
        try:
            now = self._loop.time()
            last_poll_age = self._last_poll
            self._last_poll = last_poll = now - self.accepted
            try:
                # A first look due only at the last look (a tiny deadline) gets one whole exchange.
                deadline = self.deadline
                if last_poll_age is None and now >= self._last_look:
                    deadline = max(deadline, now + follow.engine.transport.exchange_limit())
                snapshot = await follow.engine.poll(
                    target,
                    handle.task_id,
                    handle.model,
                    self._request,
                    deadline=deadline,
                    url=self._url,
                    on_retry=self._on_retry,
                    past_deadline=self._late_after,
                )
            except ImageGenError as error:
                if isinstance(error, AuthenticationError):
                    target.account.block(error)  # the key was revoked: no more creates with it
                now = self._loop.time()
                if now >= self.deadline and not isinstance(error, TaskTimeoutError):
                    raise self._late(now) from None
                raise
            handle.polls += 1
            handle.observe(snapshot.status)
            if follow.telemetry is not None:
                follow.telemetry.polled(handle)
            if snapshot.unknown_status is not None and not self._warned:
                self._warned = True
                log.warning(
                    "%s task %s: unknown status %r, taken as still running",
                    target.name,
                    handle.task_id,
                    target.mask(snapshot.unknown_status[:80]),
                )
            if snapshot.result is not None:
                took = (self._last_running, last_poll) if self._learn else None
                follow.finish(target, handle, snapshot.result, took)
                self._end(None)
                return
            self._last_running = last_poll
            if self._learn:
                follow.planner.running(self._key, handle, last_poll, handle.estimated_duration)
        except asyncio.CancelledError:
            self._cancelled_from_outside("polling")
            raise
        except Exception as error:  # every failure ends on the handle, never in a lost task
            self._end(error)
            return
        self._task = None
        self._plan()

    async def _listen(self, events: EventStream) -> None:
        """Read the job's events until it ends; if the stream drops first, poll instead.

        Until the deadline's last look: then the poll loop takes its last look and times out.
        """
        try:
            try:
                dropped = await self._read_stream(events)
            finally:
                events.close()
                self._events = None
            if dropped is None:
                return  # the stream said how the job ended
            if self._provisional:
                self._end(self._lost(dropped))
                return
            task_id = self._handle.task_id
            log.info("%s task %s: event stream dropped (%s); polling", self._target.name, task_id, dropped)
        except asyncio.CancelledError:
            self._cancelled_from_outside("the event stream")
            raise
        except Exception as error:  # every failure ends on the handle, never in a lost task
            self._end(error)
            return
        self._task = None
        self._plan()

    async def _read_stream(self, events: EventStream) -> str | None:
        """Apply the stream's events to the handle; None once one ended the job, else why the
        stream ended first."""
        follow, handle, target = self._follow, self._handle, self._target
        try:
            async with asyncio.timeout_at(self._last_look):
                while (data := await events.next()) is not None:
                    snapshot = self._read_event(data) if data else None  # empty: a heartbeat
                    if snapshot is None:
                        continue
                    status, progress = stream_step(handle.status, handle.progress, snapshot)
                    handle.observe(status)
                    handle.report_progress(progress, snapshot.message)
                    if snapshot.result is not None:
                        age = self._loop.time() - self.accepted
                        follow.finish(target, handle, snapshot.result, (age, age) if self._learn else None)
                        self._end(None)
                        return None
        except TransportError as error:
            return describe(error)
        except TimeoutError:
            return "the deadline is near"
        return "it ended before the job did"

    def _cancelled_from_outside(self, what: str) -> None:
        """The task following the job was cancelled, and not by ``cancel()`` (which lets go of it
        first): nobody will follow this job any more, so its handle must say so."""
        if self._task is not None:
            handle = self._handle
            self._end(
                SessionClosedError(
                    f"{what} of {self._target.name} task {handle.task_id} was cancelled; "
                    "it may still finish: client.resume() picks it up"
                )
            )

    def _read_event(self, data: bytes) -> Snapshot | None:
        """One event about this job, or None for one to pass over (unreadable, another task's)."""
        handle, target = self._handle, self._target
        try:
            snapshot = target.codec.read_stream_event(handle.model, _json.loads(data), handle.task_id)
        except Exception:  # not JSON, the wrong shape, a value no document foresaw
            log.debug("%s task %s: an unreadable stream event, passed over", target.name, handle.task_id)
            return None
        if snapshot.task_id != handle.task_id and self._provisional:
            self._named(snapshot.task_id)
        elif snapshot.task_id != handle.task_id:
            if not self._warned:
                self._warned = True
                log.warning(
                    "%s task %s: a stream event about another task, passed over", target.name, handle.task_id
                )
            return None
        return snapshot

    def _named(self, task_id: str) -> None:
        """The stream named its task at last: the handle takes the provider's id, polls can find it."""
        handle, target = self._handle, self._target
        log.info("%s task %s is %s at the provider", target.name, handle.task_id, task_id)
        handle.task_id = task_id
        self._provisional = False
        self._request = target.codec.poll_request(task_id, handle.model)
        self._url = target.url(self._request.path)

    def _lost(self, why: str) -> SubmitUncertainError:
        """A stream that dropped before naming its task: it runs (and is billed) where no poll can find it."""
        handle = self._handle
        return SubmitUncertainError(
            f"the create's event stream dropped ({why}) before naming its generation: the task "
            "may run and be billed, but cannot be polled or resumed",
            provider=self._target.name,
            model=handle.model,
        )

    def _on_retry(self, tries: int, wait: float, error: ImageGenError) -> None:
        handle = self._handle
        handle.retries += 1
        log.warning(
            "%s poll of %s retry %d in %.2f s: %s",
            self._target.name,
            handle.task_id,
            tries,
            wait,
            describe(error),
        )

    def _late(self, now: float, last_error: ImageGenError | None = None) -> TaskTimeoutError:
        handle = self._handle
        why = f"; last poll failed: {describe(last_error)}" if last_error is not None else ""
        return TaskTimeoutError(
            f"{self._target.name} task {handle.task_id} not finished after "
            f"{now - self.accepted:.1f} s ({handle.polls} polls); it may still finish{why}",
            task_id=handle.task_id,
            provider=self._target.name,
        )

    def _late_after(self, error: ImageGenError) -> TaskTimeoutError:
        return self._late(self._loop.time(), error)

    def _end(self, error: Exception | None) -> None:
        self._task = None
        if error is not None:
            self._handle.fail(error)
        self._leave()

    def _leave(self) -> None:
        self._follow.planner.forget(self._key, self._handle)
        self._follow.followers.discard(self)
