"""The router: one model sold by several providers and keys, each job sent where it starts soonest.

``session.router([Target("dh3", "nano-banana-pro"), Target("get3w", "...")])`` makes one
*lane* per target and key. A job goes to a lane that can start it now (healthy, a free place
in its key's capacity window, a rate-limit turn now): the first such lane in list order when
every target weighs the same, else by smooth weighted round-robin. When none can, jobs wait
first come, first served, woken when a lane frees a place or a timed turn comes due.

The create itself is the engine's, on that lane's key, so pacing and the rules of "never pay
twice" are those of a client. A create refused with certainty (capacity, rate, a request that
never went out, a stopped key) moves the job to another lane; one that may have reached a
provider (``SubmitUncertainError``) is never sent again anywhere; a task that ran and failed is
run again elsewhere only with ``rerun_failed=True`` (it is paid again).
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import logging
from collections import Counter, deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import attrs

from . import _config as checks
from ._capacity import Slot
from ._engine import Created, Unplaced
from ._handle import TaskHandle, result_of
from ._transport import Target as Lane_
from .errors import (
    AdmissionTimeoutError,
    ConfigurationError,
    ContentPolicyError,
    ImageGenError,
    InvalidRequestError,
    SessionClosedError,
    SubmitUncertainError,
    TaskFailedError,
    TransportError,
)
from .models import TaskResult
from .providers import CODECS, HttpRequest

if TYPE_CHECKING:
    from ._session import AsyncSession, ProviderClient

log = logging.getLogger("image_gen_async")

HEALTHY = "healthy"
CIRCUIT_OPEN = "circuit open"
BACKING_OFF = "backing off"
# A lane answering only errors (not sent, uncertain, 5xx) this many creates in a row backs off.
ERRORS_IN_A_ROW = 3


def _target_provider(instance: Target, attribute: Any, value: Any) -> None:
    if not isinstance(value, str) or value not in CODECS:
        raise ConfigurationError(
            f"Target.provider must be one of {', '.join(CODECS)}, got {checks.shown(value)}"
        )


def _target_model(instance: Target, attribute: Any, value: Any) -> None:
    if not isinstance(value, str) or not value.strip():
        raise ConfigurationError(f"Target.model must be a non-empty str, got {checks.shown(value)}")


def _target_weight(value: object) -> float:
    return checks.positive_number("Target.weight", value)


@attrs.frozen
class Target:
    """One provider's name for the model: ``Target("dh3", "nano-banana-pro", weight=2.0)``.

    ``provider`` is a client name (get3w, get3w_v3, dh3, nananobanana), ``model`` that
    provider's model id; ``weight`` shares jobs among lanes that can all start one now.
    """

    provider: str = attrs.field(validator=_target_provider)
    model: str = attrs.field(validator=_target_model)
    weight: float = attrs.field(default=1.0, kw_only=True, converter=_target_weight)


@attrs.frozen
class LaneStats:
    """One lane (target and key) as the router saw it; ``router.stats[label]``.

    ``in_flight``: tasks created here and not done (plus creates on the wire); ``created``:
    creates accepted; ``refused``: creates refused with certainty (nothing made); ``failed_over``:
    jobs moved on from here: after such a refusal (to whichever lane can start them next), or
    after their task failed here (a rerun, with ``rerun_failed``);
    ``failed``: creates or tasks that ended in an error here; ``credits``: credits the provider
    said these tasks used (where it says); ``health``: healthy, circuit open or backing off.
    """

    label: str
    provider: str
    model: str
    in_flight: int
    created: int
    refused: int
    failed_over: int
    failed: int
    credits: float
    health: str


def lane_label(provider: str, model: str, key: str | None) -> str:
    """A lane's stable name: provider, model and a short fingerprint of the key (never the key)."""
    fingerprint = hashlib.sha256(key.encode()).hexdigest()[:8] if key else "nokey"
    return f"{provider}:{model}#{fingerprint}"


def smooth_pick(weights: Sequence[float], current: Sequence[float]) -> tuple[int, list[float]]:
    """Smooth weighted round-robin (nginx's): the index chosen and the new running scores.

    Each candidate gains its weight, the highest score wins and pays the total back: over any
    run, each is chosen in proportion to its weight, interleaved rather than in bursts.
    """
    scores = [score + weight for score, weight in zip(current, weights, strict=True)]
    chosen = max(range(len(scores)), key=lambda index: scores[index])
    scores[chosen] -= sum(weights)
    return chosen, scores


def next_backoff(previous: float, base: float, cap: float) -> float:
    """A lane's next back-off: ``base`` at first, doubling up to ``cap``."""
    return base if previous <= 0 else min(cap, previous * 2)


def lane_health(blocked: bool, backing_off: bool) -> str:
    """What ``stats`` says of a lane: its circuit open, backing off after errors, or healthy."""
    if blocked:
        return CIRCUIT_OPEN
    return BACKING_OFF if backing_off else HEALTHY


def moves_on(reason: str) -> bool:
    """Whether a refusal rules the lane out for this job (the request never went out, the key is
    stopped), rather than only for now (capacity or rate: it may take the job later)."""
    return reason in ("not sent", "stopped")


def may_rerun(error: BaseException | None) -> bool:
    """A failed task worth running again elsewhere: a model failure, not a content-policy stop
    (another provider's check would stop it too)."""
    return isinstance(error, TaskFailedError) and not isinstance(error, ContentPolicyError)


class _LaneSlot(Slot):
    """A capacity slot that also wakes the router once it is given back."""

    __slots__ = ("_inner", "_on_release")

    def __init__(self, inner: Slot, on_release: Callable[[], None]) -> None:
        super().__init__(None)
        self._inner = inner
        self._on_release = on_release

    def release(self) -> None:
        if not self.released:
            self.released = True
            self._inner.release()
            self._on_release()


class _Lane:
    """One target with one key: its client, counters and health."""

    def __init__(self, target: Target, client: ProviderClient, engine_target: Lane_, order: int) -> None:
        self.target = target
        self.client = client
        self.engine_target = engine_target
        self.order = order
        self.label = lane_label(target.provider, target.model, engine_target.secret)
        self.score = 0.0  # smooth weighted round-robin
        self.in_flight = self.created = self.refused = self.failed_over = self.failed = 0
        self.credits = 0.0
        self.errors = 0  # errors in a row
        self.backoff = 0.0
        self.backoff_until = 0.0
        self.needs_probe = False  # after a back-off, one job goes first
        self.probing = False
        self.cool_until = 0.0  # after a rate refusal by an unpaced limiter

    @property
    def model(self) -> str:
        return self.target.model

    def stats(self) -> LaneStats:
        return LaneStats(
            label=self.label,
            provider=self.target.provider,
            model=self.target.model,
            in_flight=self.in_flight,
            created=self.created,
            refused=self.refused,
            failed_over=self.failed_over,
            failed=self.failed,
            credits=self.credits,
            health=lane_health(self.engine_target.account.blocked is not None, self.needs_probe),
        )


@attrs.define(eq=False)
class _Job:
    """One job's requests per lane (built once, checked before anything is sent) and deadline."""

    prompt: str
    requests: dict[_Lane, HttpRequest]
    timeout: float | None
    before_create: Callable[[], object] | None
    on_route: Callable[[str], object] | None = None
    sync: bool = False  # generate(): lanes whose API has a sync mode answer with the result


@attrs.define(eq=False)
class _Waiter:
    """A job waiting for a lane: ``seq`` its place in the router's line, ``key`` which lanes it can
    use (waiters with the same key compete for the same places, so they queue together)."""

    lanes: list[_Lane]
    future: asyncio.Future[_Lane]
    seq: int
    key: tuple[int, ...]


class Router:
    """Jobs for one model spread over several providers and keys; made by ``session.router()``."""

    def __init__(self, session: AsyncSession, lanes: list[_Lane], *, rerun_failed: bool) -> None:
        self._session = session
        self._lanes = lanes
        self._by_label = {lane.label: lane for lane in lanes}
        self._rerun_failed = rerun_failed
        self._weighted = len({lane.target.weight for lane in lanes}) > 1
        # Waiters by the lanes they can use, each line first come first served; ``_seq`` orders
        # the lines' heads, so the oldest waiter that some lane can take goes first.
        self._lines: dict[tuple[int, ...], deque[_Waiter]] = {}
        self._seq = itertools.count()
        self._waiting = 0
        # Places handed to a waiter that has not yet sent: per account (gate) and limiter.
        self._pending_accounts: Counter[int] = Counter()
        self._pending_limiters: Counter[int] = Counter()
        self._timer: asyncio.TimerHandle | None = None
        self._reruns: set[asyncio.Task[None]] = set()
        settings = session._engine.settings
        self._backoff_base, self._backoff_cap = settings.retry_base, settings.retry_cap

    def __repr__(self) -> str:
        return f"<Router {', '.join(self.lanes)}>"

    @property
    def rerun_failed(self) -> bool:
        """Whether a task that failed is run again on another lane (``session.router(rerun_failed=)``)."""
        return self._rerun_failed

    @property
    def lanes(self) -> tuple[str, ...]:
        """Every lane's label, in preference order (``"dh3:nano-banana-pro#1a2b3c4d"``)."""
        return tuple(lane.label for lane in self._lanes)

    @property
    def stopped(self) -> bool:
        """True while every lane's key is stopped (its circuit open): no job can be created now."""
        return all(lane.engine_target.account.blocked is not None for lane in self._lanes)

    @property
    def stats(self) -> dict[str, LaneStats]:
        """Each lane's counters and health, by label (a snapshot)."""
        return {lane.label: lane.stats() for lane in self._lanes}

    # --- the calls ------------------------------------------------------------------

    async def submit(
        self,
        *,
        prompt: str,
        timeout: float | None = None,
        before_create: Callable[[], object] | None = None,
        on_route: Callable[[str], object] | None = None,
        **params: Any,
    ) -> TaskHandle:
        """Create the job on the lane that can start it soonest; its handle once accepted.

        ``params`` use the common names (``aspect_ratio``, ``resolution``, ``output_format``,
        ``image_urls``, ``seed``), translated by each target's codec; a lane whose provider
        cannot take them is never used for this job, and if none can, ``InvalidRequestError``
        is raised before anything is sent. ``timeout`` bounds the wait for a lane and the
        handle; ``before_create()`` runs before each create goes out (as on a client), and
        ``on_route(label)`` before that, each time a lane is tried (a journal can record where
        the job may be made). ``handle.provider`` and ``handle.route`` say where the job went.
        """
        return await self._submit(prompt, timeout, before_create, params, sync=False, on_route=on_route)

    async def generate(self, *, prompt: str, timeout: float | None = None, **params: Any) -> TaskResult:
        """Submit and wait for the result; a lane whose API has a sync mode answers with it, as
        a client's ``generate()`` does (its place is given back the moment the answer arrives)."""
        return await result_of(await self._submit(prompt, timeout, None, params, sync=True))

    async def _submit(
        self,
        prompt: str,
        timeout: float | None,
        before_create: Callable[[], object] | None,
        params: Mapping[str, Any],
        *,
        sync: bool,
        on_route: Callable[[str], object] | None = None,
    ) -> TaskHandle:
        timeout = checks.call_timeout(timeout)
        self._session._engine.check_open()
        job = _Job(prompt, self._requests(prompt, params, sync), timeout, before_create, on_route, sync)
        handle = await self._place(job, set())
        if not self._rerun_failed:
            return handle
        return self._rerunning(job, handle)

    def resume(
        self,
        task_id: str,
        route: str,
        *,
        estimated_duration: float | None = None,
        timeout: float | None = None,
    ) -> TaskHandle:
        """A handle for a task a lane created earlier (``handle.route``): polls it with that lane's
        provider and key, never creates."""
        lane = self._by_label.get(route) if isinstance(route, str) else None
        if lane is None:
            raise ConfigurationError(
                f"no lane {route!r} in this router; its lanes: {', '.join(self.lanes)}"
                if isinstance(route, str)
                else f"route must be a lane's label (a str), got {checks.shown(route)}"
            )
        handle = lane.client.resume(
            task_id, lane.model, estimated_duration=estimated_duration, timeout=timeout
        )
        self._track(lane, handle)
        return handle

    def _close(self) -> None:
        """The session is closing: every waiting job ends now with ``SessionClosedError``."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for line in self._lines.values():
            for waiter in line:
                if not waiter.future.done():
                    waiter.future.set_exception(
                        SessionClosedError("the session closed while the job waited for a lane; nothing sent")
                    )
        self._lines.clear()
        self._waiting = 0
        for rerun in list(self._reruns):
            rerun.cancel()

    # --- placing a job --------------------------------------------------------------

    def _requests(self, prompt: str, params: Mapping[str, Any], sync: bool) -> dict[_Lane, HttpRequest]:
        """Each lane's create, built by its codec (which checks the documented limits): a lane
        that refuses the job is left out; none left is ``InvalidRequestError``, nothing sent."""
        built: dict[Target, HttpRequest | InvalidRequestError] = {}
        for lane in self._lanes:
            if lane.target not in built:
                codec = lane.engine_target.codec
                try:
                    built[lane.target] = codec.submit_request(
                        lane.model, prompt, params, webhook_url=None, sync=sync and codec.has_sync_mode
                    )
                except InvalidRequestError as error:
                    built[lane.target] = error
        requests = {
            lane: request
            for lane in self._lanes
            if isinstance(request := built[lane.target], HttpRequest)
        }
        if not requests:
            why = "; ".join(f"{t.provider}:{t.model}: {error}" for t, error in built.items())
            raise InvalidRequestError(f"no target can take this job: {why}")
        return requests

    async def _place(self, job: _Job, ruled_out: set[_Lane]) -> TaskHandle:
        """Admit the job on a lane and create it there; a certain refusal tries again elsewhere."""
        deadline = self._session._engine.deadline(job.timeout)
        last: ImageGenError | None = None
        while True:
            lanes = [lane for lane in job.requests if lane not in ruled_out]
            if not lanes:
                assert last is not None
                raise last
            lane = await self._admit(lanes, deadline)
            try:
                created = await self._create(lane, job, deadline)
            except Unplaced as unplaced:
                last = unplaced.error
                self._unplaced(lane, unplaced)
                if moves_on(unplaced.reason):
                    ruled_out.add(lane)
                continue
            return self._follow(lane, created, job)

    async def _create(self, lane: _Lane, job: _Job, deadline: float) -> Created:
        """The engine's create on ``lane`` (its place was reserved by ``_admit``)."""
        target = lane.engine_target
        self._pending_accounts[id(target.account)] -= 1
        self._pending_limiters[id(target.limiter)] -= 1
        if lane.probing:
            target.account.unblock()  # the probe: a stopped key refuses again at no cost
        lane.in_flight += 1
        engine = self._session._engine
        sync = job.sync and target.codec.has_sync_mode
        # Sync mode, as a client's generate(): the exchange is the job, bounded by its timeout.
        read_timeout = None
        if sync:
            read_timeout = engine.settings.sync_timeout
            if job.timeout is not None:
                read_timeout = min(job.timeout, read_timeout)
        try:
            if job.on_route is not None:
                job.on_route(lane.label)
            created = await engine.create(
                target,
                lane.model,
                job.requests[lane],
                deadline=deadline,
                before_send=job.before_create,
                hold_uncertain=lambda: self._hold(lane),
                read_timeout=read_timeout,
                exchange_limit=job.timeout if sync else None,
                eager=sync,
                failover=True,
            )
        except Unplaced:
            lane.in_flight -= 1
            raise
        except BaseException as error:
            lane.in_flight -= 1
            lane.failed += isinstance(error, Exception)  # a cancelled submit is no failure
            if isinstance(error, SubmitUncertainError | TransportError):
                self._erred(lane)  # transport failures and 5xx: the lane's health
            else:
                lane.probing = False
            self._serve()
            raise
        lane.created += 1
        lane.errors = 0
        lane.backoff = 0.0
        lane.needs_probe = lane.probing = False
        if created.snapshot.credits_used is not None:
            lane.credits += created.snapshot.credits_used
        self._serve()  # an accepted create may have widened the lane's window
        return created

    def _hold(self, lane: _Lane) -> float | None:
        """As a client's: how long an uncertain create keeps its place; the router wakes then too."""
        hold = lane.client._hold_uncertain(lane.model)
        if hold:
            asyncio.get_running_loop().call_later(hold + 0.001, self._serve)
        return hold

    def _follow(self, lane: _Lane, created: Created, job: _Job) -> TaskHandle:
        slot = _LaneSlot(created.slot, self._serve)
        took = None
        if job.sync and lane.engine_target.codec.has_sync_mode:
            # Timed from when the request went out: exact when sync mode answered with the result.
            elapsed = asyncio.get_running_loop().time() - created.sent_at
            took = (elapsed, elapsed)
        handle = lane.client._follow(
            created.snapshot,
            lane.model,
            created.retries,
            job.timeout,
            took=took,
            slot=slot,
        )
        self._track(lane, handle, counted=True)
        return handle

    def _track(self, lane: _Lane, handle: TaskHandle, *, counted: bool = False) -> None:
        """Name the lane on the handle; count it in flight until it is done."""
        handle.route = lane.label
        if not counted:
            lane.in_flight += 1
            if handle._slot is not None:
                handle._slot = _LaneSlot(handle._slot, self._serve)

        def done(finished: TaskHandle) -> None:
            lane.in_flight -= 1
            if not finished.cancelled() and finished.exception() is not None:
                lane.failed += 1

        handle.add_done_callback(done)

    def _unplaced(self, lane: _Lane, unplaced: Unplaced) -> None:
        """A certain refusal: count it, and let it shape the lane's health."""
        lane.refused += 1
        lane.failed_over += 1
        now = asyncio.get_running_loop().time()
        log.info("%s refused a create (%s): %s; trying another lane", lane.label, unplaced.reason, unplaced)
        if unplaced.reason == "stopped":
            self._back_off(lane, now)
        elif unplaced.reason == "not sent":
            self._erred(lane)
        elif unplaced.reason == "rate":
            lane.cool_until = now + self._backoff_base
        lane.probing = False  # a capacity or rate refusal proves little: the next job probes again
        self._serve()

    def _erred(self, lane: _Lane) -> None:
        lane.errors += 1
        if lane.errors >= ERRORS_IN_A_ROW or lane.probing:
            self._back_off(lane, asyncio.get_running_loop().time())

    def _back_off(self, lane: _Lane, now: float) -> None:
        lane.backoff = next_backoff(lane.backoff, self._backoff_base, self._backoff_cap)
        lane.backoff_until = now + lane.backoff
        lane.needs_probe = True
        lane.probing = False
        log.warning("%s: skipped for %.2f s, then one job probes it", lane.label, lane.backoff)

    # --- reruns ---------------------------------------------------------------------

    def _rerunning(self, job: _Job, first: TaskHandle) -> TaskHandle:
        """The user's handle: the first task's, or, when it fails, its rerun's on another lane."""
        outer = TaskHandle(task_id=first.task_id, provider=first.provider, model=first.model)
        tried: set[_Lane] = set()

        def link(inner: TaskHandle) -> None:
            outer.task_id, outer.provider, outer.model = inner.task_id, inner.provider, inner.model
            outer.route, outer.estimated_duration = inner.route, inner.estimated_duration
            inner.on_status(outer.observe)
            outer._on_cancel = lambda: _cancelled(inner.cancel())
            inner.add_done_callback(finished)

        def finished(inner: TaskHandle) -> None:
            if outer.done():
                return
            if inner.cancelled():
                outer.cancel()
                return
            error = inner.exception()
            if error is None:
                outer.credits_used = inner.credits_used
                outer.resolve(inner.result())
                return
            lane = self._by_label[inner.route or ""]
            tried.add(lane)
            if not may_rerun(error) or all(other in tried for other in job.requests):
                outer.fail(error)
                return
            lane.failed_over += 1
            log.warning("%s task %s failed; run again elsewhere (paid again)", lane.label, inner.task_id)
            rerun = asyncio.get_running_loop().create_task(self._rerun(job, set(tried), outer, link))
            self._reruns.add(rerun)
            rerun.add_done_callback(self._reruns.discard)
            outer._on_cancel = lambda: _cancelled(rerun.cancel())

        link(first)
        return outer

    async def _rerun(
        self, job: _Job, tried: set[_Lane], outer: TaskHandle, link: Callable[[TaskHandle], None]
    ) -> None:
        try:
            handle = await self._place(job, tried)
        except asyncio.CancelledError:
            outer.cancel()
            raise
        except BaseException as error:
            outer.fail(error)
            return
        if outer.done():
            handle.cancel()
        else:
            link(handle)

    # --- admission: FIFO across the router ------------------------------------------

    async def _admit(self, lanes: list[_Lane], deadline: float) -> _Lane:
        """A lane that can start the job now, its place reserved; else wait first come, first served."""
        if not self._waiting:
            lane = self._choose(lanes)
            if lane is not None:
                self._reserve(lane)
                return lane
        key = tuple(lane.order for lane in lanes)
        waiter = _Waiter(lanes, asyncio.get_running_loop().create_future(), next(self._seq), key)
        self._lines.setdefault(key, deque()).append(waiter)
        self._waiting += 1
        self._serve()  # older waiters may want other lanes than this one
        try:
            async with asyncio.timeout_at(deadline):
                return await waiter.future
        except BaseException as error:
            future = waiter.future
            if future.done() and not future.cancelled() and future.exception() is None:
                self._unreserve(future.result())  # woken with a place, then cancelled: hand it on
                self._serve()
            elif not future.done() or future.cancelled():
                # Still in its line (a timeout or a cancel cancels the awaited future itself):
                # skipped there, and no longer counted as waiting.
                future.cancel()
                self._waiting -= 1
            if isinstance(error, TimeoutError):
                raise AdmissionTimeoutError(
                    f"router: no lane could start the job within its deadline ({', '.join(self.lanes)}); "
                    "nothing was sent"
                ) from None
            raise

    def _serve(self) -> None:
        """Hand lanes that can start a job to the waiters, oldest first."""
        if self._session._engine.closed or not self._waiting:
            return
        # Handing out only takes places, so a line whose head found no lane stays stuck in
        # this pass: each line is asked until it is stuck, not each waiter.
        stuck: set[tuple[int, ...]] = set()
        while True:
            head = self._oldest_head(stuck)
            if head is None:
                break
            lane = self._choose(head.lanes)
            if lane is None:
                stuck.add(head.key)
                continue
            self._lines[head.key].popleft()
            self._waiting -= 1
            self._reserve(lane)
            head.future.set_result(lane)
        if self._waiting:
            self._arm()

    def _oldest_head(self, stuck: set[tuple[int, ...]]) -> _Waiter | None:
        """The oldest waiter at the head of a line not stuck (waiters gone are dropped)."""
        oldest = None
        for key, line in list(self._lines.items()):
            while line and line[0].future.done():
                line.popleft()
            if not line:
                del self._lines[key]
            elif key not in stuck and (oldest is None or line[0].seq < oldest.seq):
                oldest = line[0]
        return oldest

    def _arm(self) -> None:
        """One timer at the soonest moment a lane a waiter could use comes due (a rate turn, the
        end of a back-off); places freed by finished tasks wake the waiters themselves."""
        loop = asyncio.get_running_loop()
        now = loop.time()
        # Every lane, not only the waiters' (they are few): an early wake finds nothing to do.
        due = min((t for lane in self._lanes if (t := self._due(lane, now)) is not None), default=None)
        if due is None:
            return
        if self._timer is not None:
            if self._timer.when() <= due and self._timer.when() > now:
                return
            self._timer.cancel()
        self._timer = loop.call_at(due, self._ring)

    def _ring(self) -> None:
        self._timer = None
        self._serve()

    def _due(self, lane: _Lane, now: float) -> float | None:
        """When ``lane`` could next start a job, if that is a known moment after now."""
        paused = getattr(lane.engine_target.account.gate, "paused_until", 0.0)
        times = [t for t in (lane.backoff_until, lane.cool_until, paused) if t > now]
        limiter = lane.engine_target.limiter
        wait_time = getattr(limiter, "wait_time", None)
        if wait_time is not None and not self._pending_limiters[id(limiter)]:
            wait = wait_time()
            if wait > 0:
                times.append(now + wait)
        return max(times) if times else None

    def _choose(self, lanes: Iterable[_Lane]) -> _Lane | None:
        """The lane to take a job now: first that can in list order, or by weight; None if none can."""
        now = asyncio.get_running_loop().time()
        ready = [lane for lane in lanes if self._can_start(lane, now)]
        if not ready:
            return None
        if not self._weighted or len(ready) == 1:
            return ready[0]
        chosen, scores = smooth_pick([lane.target.weight for lane in ready], [lane.score for lane in ready])
        for lane, score in zip(ready, scores, strict=True):
            lane.score = score
        return ready[chosen]

    def _can_start(self, lane: _Lane, now: float) -> bool:
        """Healthy (or due for its probe), a free place in its key's window, a rate turn now."""
        target = lane.engine_target
        account = target.account
        if account.blocked is not None and not lane.needs_probe:
            self._back_off(lane, now)  # stopped by a create the router did not make
        if now < lane.backoff_until or now < lane.cool_until or lane.probing:
            return False
        gate = account.gate
        if getattr(gate, "paused_until", 0.0) > now:
            return False  # refused with nothing of ours in flight: the gate holds every create a while
        window, in_flight = getattr(gate, "window", None), getattr(gate, "in_flight", 0)
        if window is not None and in_flight + self._pending_accounts[id(account)] >= window:
            return False
        limiter = target.limiter
        if limiter.rate is None:
            return True
        wait_time = getattr(limiter, "wait_time", None)
        if self._pending_limiters[id(limiter)]:
            return False  # one turn at a time: the next is known only once this one is taken
        return wait_time is None or wait_time() <= 0

    def _reserve(self, lane: _Lane) -> None:
        """Hold a place for a job about to be sent on ``lane``; after a back-off it is the probe."""
        self._pending_accounts[id(lane.engine_target.account)] += 1
        self._pending_limiters[id(lane.engine_target.limiter)] += 1
        lane.probing = lane.needs_probe  # one probe at a time: the lane is skipped until it ends

    def _unreserve(self, lane: _Lane) -> None:
        """A reserved job was cancelled before it was sent."""
        self._pending_accounts[id(lane.engine_target.account)] -= 1
        self._pending_limiters[id(lane.engine_target.limiter)] -= 1
        lane.probing = False


def _cancelled(_: object) -> None:
    """An ``_on_cancel`` hook's answer: no hold of the capacity slot (the inner handle holds it)."""
    return None


def make_router(
    session: AsyncSession,
    targets: object,
    targets_by_client: Mapping[str, Sequence[Lane_]],
    rerun_failed: bool,
) -> Router:
    """``session.router()``: one lane per target and key, every value checked first."""
    from ._session import ProviderClient

    if isinstance(targets, str | bytes) or not isinstance(targets, Sequence) or not targets:
        raise ConfigurationError("targets must be a non-empty list of Target")
    if not isinstance(rerun_failed, bool):
        raise ConfigurationError(f"rerun_failed must be a bool, got {checks.shown(rerun_failed)}")
    lanes: list[_Lane] = []
    for index, target in enumerate(targets):
        if not isinstance(target, Target):
            raise ConfigurationError(f"targets[{index}] must be a Target, got {checks.shown(target)}")
        if any((t.provider, t.model) == (target.provider, target.model) for t in targets[:index]):
            raise ConfigurationError(f"targets[{index}] repeats {target.provider}:{target.model}")
        keyed = [t for t in targets_by_client[target.provider] if t.key is not None]
        if not keyed:
            codec = CODECS[target.provider]
            raise ConfigurationError(
                f"targets[{index}]: no API key for {target.provider}: pass api_keys="
                f"{{'{target.provider}': ...}} or set {codec.env_var}"
            )
        for engine_target in keyed:
            client = session._client_for(engine_target)
            assert isinstance(client, ProviderClient)
            lanes.append(_Lane(target, client, engine_target, len(lanes)))
    return Router(session, lanes, rerun_failed=rerun_failed)


__all__ = ["LaneStats", "Router", "Target", "lane_label", "smooth_pick"]
