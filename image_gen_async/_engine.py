"""The engine: a create and a status read, each as pace → send → classify → retry.

It never looks inside a provider's JSON (the codecs read it) and decides nothing itself:
``_classify`` says what an outcome means, ``_retry`` how long to keep asking. What is
left here is putting the facts together: was the request sent, what came back, what the
codec makes of it.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple, TypeVar

import attrs
from yarl import URL

from . import _json
from ._capacity import Slot
from ._classify import Failure, Verdict, classify_create, classify_poll
from ._events import EventStream, EventTooLarge
from ._polling import PollSettings
from ._ratelimit import Limiter, Ticket
from ._retry import Retry, RetryBudget, backoff_steps, next_wait, retrying
from ._transport import (
    Answer,
    AnswerTooLarge,
    Target,
    Transport,
    describe,
    retry_after_seconds,
    without_query,
)
from .errors import (
    AdmissionTimeoutError,
    APIError,
    ConfigurationError,
    ImageGenError,
    InvalidRequestError,
    ProtocolError,
    SubmitUncertainError,
    TransportError,
    api_error,
)
from .providers import Codec, ErrorReport, HttpRequest, Refusal, Snapshot

log = logging.getLogger("image_gen_async")
T = TypeVar("T")

# Creates cancelled after they went out, remembered for the user to resume.
ORPHANS_KEPT = 1000
_NOT_JSON: Any = object()


@attrs.frozen
class EngineSettings:
    """Timeouts and retry limits shared by every client of a session."""

    pool_size: int = 100
    connect_timeout: float = 10.0
    read_timeout: float = 60.0
    sync_timeout: float = 300.0
    task_timeout: float = 3600.0
    create_retries: int = 4
    poll_retries: int | None = None
    retry_base: float = 0.5
    retry_cap: float = 20.0
    polling: PollSettings = attrs.Factory(PollSettings)
    download_timeout: float = 600.0


@attrs.frozen
class OrphanedTask:
    """A create that went out while its ``submit()`` was cancelled: the provider may run (and bill) it.

    ``task_id`` is None when no readable answer came back. Follow it with
    ``session.client(provider).resume(task_id, model)``.
    """

    provider: str
    model: str
    task_id: str | None


class Created(NamedTuple):
    """An accepted create: what it said, its retries, when it went out (loop clock), its slot;
    for a stream create, the open stream of the job's further events (the caller's to close)."""

    snapshot: Snapshot
    retries: int
    sent_at: float
    slot: Slot
    refusals: int
    events: EventStream | None = None


class Refused(Exception):
    """A create refused for capacity or rate: nothing was made (not a retry: the job waits its turn)."""

    def __init__(self, error: ImageGenError, refusal: Refusal) -> None:
        super().__init__(str(error))
        self.error = error
        self.refusal = refusal


class Unplaced(Exception):
    """With ``failover=True``: a create refused with certainty, nothing made; the caller may
    send the job elsewhere. ``reason``: "capacity", "rate", "not sent" or "stopped" (the key)."""

    def __init__(self, error: ImageGenError, reason: str) -> None:
        super().__init__(str(error))
        self.error = error
        self.reason = reason


class CreateReading(NamedTuple):
    """What a create's answer says: the snapshot if accepted, else the error and what it means."""

    snapshot: Snapshot | None
    error: ImageGenError | None
    verdict: Verdict
    task_id: str | None
    refusal: Refusal | None


class Reading(NamedTuple):
    """What an answer says, before anyone decides what to do with it."""

    body: Any  # the JSON, or _NOT_JSON
    report: ErrorReport | None  # the error the codec reads in it, if any
    error: ImageGenError | None  # the error to raise for it, if it is not a success
    failure: Failure | None


def encode_body(request: HttpRequest) -> bytes | None:
    """The request's JSON body; parameters JSON cannot carry are refused before anything is sent."""
    if request.json is None:
        return None
    try:
        return _json.dumps(request.json)
    except ValueError as error:
        raise InvalidRequestError(f"parameters are not JSON: {error}") from None


def read_answer(
    target: Target, answer: Answer, error_of: Callable[[int, Any], ErrorReport | None] | None = None
) -> Reading:
    """The answer's JSON and the error it carries (as an ``APIError``), keys masked in any text."""
    codec, status = target.codec, answer.status
    if 300 <= status < 400:
        location = target.mask(without_query(answer.headers.get("Location", "?")))
        error: ImageGenError = ConfigurationError(
            f"{codec.name}: the server redirects (HTTP {status}) to {location!r}; "
            "set base_urls to the origin it means"
        )
        return Reading(_NOT_JSON, None, error, None)
    try:
        body: Any = _json.loads(answer.raw)
    except ValueError:
        body = _NOT_JSON
    if body is _NOT_JSON and status < 400:
        snippet = target.mask(answer.raw[:80].decode("utf-8", "replace"))
        error = ProtocolError(f"{codec.name}: answer is not JSON (HTTP {status}): {snippet!r}", field="$")
        return Reading(body, None, error, Failure.NOT_JSON)
    try:
        report = (error_of or codec.error_of)(status, None if body is _NOT_JSON else body)
    except Exception as odd:
        return Reading(body, None, unreadable(codec, odd), Failure.BAD_SHAPE)
    if report is None:
        return Reading(body, None, None, None)
    error = api_error(
        report.status,
        report.code,
        target.mask(report.message),
        provider=codec.name,
        retry_after=retry_after_seconds(answer.headers),
    )
    return Reading(body, report, error, None)


def transport_failure(error: TransportError) -> Failure:
    """Which way an exchange failed: no answer, an answer over its cap, or TLS (final)."""
    if isinstance(error, AnswerTooLarge | EventTooLarge):
        return Failure.TOO_LARGE
    return Failure.NO_ANSWER if error.transient else Failure.TLS


class Engine:
    """Owns the connection pool and the create and poll pipelines."""

    def __init__(self, settings: EngineSettings) -> None:
        self.settings = settings
        self.transport = Transport(
            pool_size=settings.pool_size,
            connect_timeout=settings.connect_timeout,
            read_timeout=settings.read_timeout,
        )
        self.create_budget = RetryBudget(settings.create_retries + 1, settings.retry_base, settings.retry_cap)
        tries = None if settings.poll_retries is None else settings.poll_retries + 1
        self.poll_budget = RetryBudget(tries, settings.retry_base, settings.retry_cap)
        self.orphans: deque[OrphanedTask] = deque(maxlen=ORPHANS_KEPT)
        self.orphaned = 0
        self.refusals = 0  # creates refused for capacity or rate, in this session

    @property
    def closed(self) -> bool:
        return self.transport.closed

    def check_open(self) -> None:
        """Raise ``SessionClosedError`` once the session is closed."""
        self.transport.http()

    def deadline(self, timeout: float | None) -> float:
        """A job's deadline (loop clock): its own ``timeout`` from now, else ``task_timeout``."""
        span = self.settings.task_timeout if timeout is None else timeout
        return asyncio.get_running_loop().time() + span

    async def close(self) -> None:
        await self.transport.close()

    async def create(
        self,
        target: Target,
        model: str,
        request: HttpRequest,
        *,
        read_timeout: float | None = None,
        before_send: Callable[[], object] | None = None,
        deadline: float | None = None,
        hold_uncertain: Callable[[], float | None] | None = None,
        exchange_limit: float | None = None,
        eager: bool = False,
        stream: bool = False,
        failover: bool = False,
    ) -> Created:
        """Admit, pace and send a create; retry only what cannot have made a task.

        Admission first: the account's circuit (an answer that stopped the key fails every
        create at once) and its capacity gate (FIFO, until ``deadline`` on the loop clock),
        then the rate-limit turn, so no turn is held while waiting for capacity. A refusal
        (429, 503 naming no task) made nothing: the job waits for capacity or rate and asks
        again, and no retry is counted. Whether a request can have reached the provider is
        known: its limiter ticket is stamped once it has a connection. ``before_send()`` runs
        before each attempt goes out (awaited if it returns an awaitable). A ``submit()``
        cancelled after its request went out keeps reading the answer in the background and
        records the task it made (``session.orphans``). The accepted create's slot is the
        caller's to release when the task is done. ``deadline`` also bounds the rate-limit
        wait and every retry; an exchange once started runs to its own limit
        (``exchange_limit``, else the session's), since cutting it short would leave it
        uncertain. ``hold_uncertain()``: seconds an uncertain create keeps its slot (its task
        may be running), or None to give it back at once. ``eager`` (sync mode): take a place
        at once while no cap is known. ``stream``: the answer is an event stream, accepted
        with its first event that names the task (one that ends first is uncertain).
        ``failover`` (a router's create): what is refused with certainty (capacity, rate, a
        request that never went out, a stopped key) raises ``Unplaced`` at once instead of
        waiting or retrying here, so the job can go elsewhere.
        """
        body = encode_body(request)
        until = is_json_object if stream else None
        events: EventStream | None = None
        limit = exchange_limit or self.transport.exchange_limit(read_timeout)
        account = target.account
        retries = refusals = 0
        sent_at = 0.0
        went_out = False  # a cancelled create that had gone out

        loop = asyncio.get_running_loop()

        async def attempt() -> Snapshot:
            nonlocal sent_at, events
            limiter = target.limiter
            ticket = _ready(limiter)
            if ticket is None:
                try:
                    async with asyncio.timeout_at(deadline):
                        ticket = await limiter.acquire()
                except TimeoutError:
                    raise AdmissionTimeoutError(
                        f"{target.name}: no rate-limit turn within the job's deadline; nothing was sent"
                    ) from None
            try:
                account.check(target.name)  # the circuit may have opened while this create waited
                if before_send is not None:
                    pending = before_send()
                    if inspect.isawaitable(pending):
                        await pending
                    account.check(target.name)  # ... or while the journal made its record durable
                if deadline is not None and loop.time() >= deadline:
                    # Never cut a create short at the deadline (that would make it uncertain):
                    # past it, none is started.
                    raise AdmissionTimeoutError(f"{target.name}: the job's deadline passed; nothing was sent")
                answer = await self._send_create(
                    target, model, request, body, limit, read_timeout, ticket, until, deadline
                )
            except asyncio.CancelledError:
                nonlocal went_out
                went_out = ticket.was_sent  # its task may be made: the slot is held (below)
                raise
            except TransportError as error:
                verdict = classify_create(
                    sent=ticket.was_sent, http_status=None, failure=transport_failure(error)
                )
                if failover and verdict is Verdict.RETRY:
                    raise Unplaced(error, "not sent") from None
                raise self._create_outcome(verdict, target, model, request, error, None) from None
            finally:
                if not ticket.was_sent:
                    ticket.abandon()
            sent_at = ticket.at or 0.0
            read = read_create(target, model, answer)
            if read.verdict is Verdict.ACCEPTED and read.snapshot is not None:
                limiter.reward()
                events = answer.events
                return read.snapshot
            if answer.events is not None:
                answer.events.close()
            assert read.error is not None
            if read.verdict is Verdict.REFUSED and read.refusal is not None:
                if not read.refusal.capacity:
                    limiter.penalize(getattr(read.error, "retry_after", None))
                raise Refused(read.error, read.refusal)
            raise self._create_outcome(read.verdict, target, model, request, read.error, read.task_id)

        def on_retry(tries: int, wait: float, error: ImageGenError) -> None:
            nonlocal retries
            retries += 1
            log.warning("%s create retry %d in %.2f s: %s", target.name, tries, wait, describe(error))

        waits = backoff_steps(self.settings.retry_base, self.settings.retry_cap)
        again = False  # a create refused for capacity asks again at the head of the queue
        # The last rate refusal: a deadline that passes after one is that refusal's, not a
        # "nothing was sent" (the creates went out, and were refused).
        rate_refusal: ImageGenError | None = None
        while True:
            try:
                account.check(target.name)
            except APIError as stop:
                if failover:
                    raise Unplaced(stop, "stopped") from None
                raise
            gate = account.gate
            if eager and getattr(gate, "learning", False):
                # A sync create is the whole job: its answer (the growth signal) comes only at
                # the job's end, so while no cap is known it does not wait for the window.
                slot = gate.occupy()
            else:
                try:
                    slot = await gate.admit(deadline, first=again)
                except AdmissionTimeoutError:
                    if rate_refusal is not None:
                        raise rate_refusal from None
                    if not refusals:
                        raise
                    # Creates did go out: each was refused, and none made a task.
                    raise AdmissionTimeoutError(
                        f"{target.name}: no capacity within the job's deadline; {refusals} "
                        "creates were refused for capacity, none made a task"
                    ) from None
            again = False
            try:
                snapshot = await retrying(attempt, self.create_budget, deadline=deadline, on_retry=on_retry)
            except Refused as refused:
                refusals += 1
                self.refusals += 1
                error, refusal = refused.error, refused.refusal
                retry_after = getattr(error, "retry_after", None)
                if refusal.capacity:
                    account.gate.refused(slot, refusal.active, retry_after)
                    if failover:
                        raise Unplaced(error, "capacity") from None
                    again = True
                    continue  # the gate holds the next try until a task of this key finishes
                slot.release()
                if failover:
                    raise Unplaced(error, "rate") from None
                rate_refusal = error
                # A rate refusal: the limiter slows down; an unpaced one needs a wait of its own.
                wait = next_wait(waits, retry_after, self.settings.retry_cap)
                if deadline is not None and loop.time() + wait >= deadline:
                    raise error from None
                log.info("%s create refused (rate): %s; again in %.2f s", target.name, describe(error), wait)
                await asyncio.sleep(wait)
                continue
            except BaseException as error:
                # A create that may have made a task (uncertain, or cancelled once it went out)
                # keeps its place as long as the model's jobs run, when that is known.
                uncertain = isinstance(error, SubmitUncertainError) or went_out
                hold = hold_uncertain() if hold_uncertain is not None and uncertain else None
                if hold:
                    loop.call_later(hold, slot.release)  # its task may hold the place that long
                else:
                    slot.release()
                if isinstance(error, APIError) and target.codec.stops_account(
                    ErrorReport(error.status, error.code, error.message)
                ):
                    account.block(error)
                    if failover:
                        raise Unplaced(error, "stopped") from None
                if isinstance(error, AdmissionTimeoutError) and rate_refusal is not None:
                    raise rate_refusal from None
                raise
            account.gate.accepted(slot)
            if snapshot.remaining_credits is not None:
                account.remaining_credits = snapshot.remaining_credits
            return Created(snapshot, retries, sent_at, slot, refusals, events)

    async def _send_create(
        self,
        target: Target,
        model: str,
        request: HttpRequest,
        body: bytes | None,
        limit: float,
        read_timeout: float | None,
        ticket: Ticket,
        until: Callable[[bytes], bool] | None = None,
        deadline: float | None = None,
    ) -> Answer:
        """The create's exchange, shielded: cancelled once sent, it is read to its end in the background.

        Its wait for a pooled connection ends at the job's ``deadline`` (nothing sent by then).
        """
        sending = asyncio.ensure_future(
            self.transport.send(
                target,
                request,
                body=body,
                limit=limit,
                read_timeout=read_timeout,
                ticket=ticket,
                until=until,
                connect_by=deadline,
            )
        )
        try:
            return await asyncio.shield(sending)
        except asyncio.CancelledError:
            if not ticket.was_sent:
                sending.cancel()  # nothing went out: nothing to recover
                raise
            if sending.done():
                self._orphaned(target, model, sending)  # answered in the very turn it was cancelled
            else:
                sending.add_done_callback(lambda done: self._orphaned(target, model, done))
            raise

    def _orphaned(self, target: Target, model: str, sending: asyncio.Future[Answer]) -> None:
        """A cancelled submit's create has been answered: name the task it made, loudly."""
        task_id = None
        if not sending.cancelled() and sending.exception() is None:
            answer = sending.result()
            if answer.events is not None:
                answer.events.close()  # nobody follows it: the task is named below, for resume()
            read = read_create(target, model, answer)
            task_id = read.snapshot.task_id if read.snapshot is not None else read.task_id
            if read.verdict in (Verdict.REFUSED, Verdict.FAILED):
                return  # refused with certainty: nothing was made
        self.orphans.append(OrphanedTask(target.name, model, task_id))
        self.orphaned += 1
        log.warning(
            "%s: submit() was cancelled after its create went out; model %s, task %s may run and be "
            "billed; follow it with session.client(%r).resume(task_id, model) (session.orphans lists it)",
            target.name,
            model,
            task_id or "unknown (no answer)",
            target.name,
        )

    def _create_outcome(
        self,
        verdict: Verdict,
        target: Target,
        model: str,
        request: HttpRequest,
        error: ImageGenError,
        task_id: str | None,
    ) -> Exception:
        """The exception a create attempt ends with, from its verdict."""
        if verdict is Verdict.RETRY:
            return Retry(error)
        if verdict is Verdict.UNCERTAIN:
            uncertain = SubmitUncertainError(
                f"create may have reached the provider: {target.mask(describe(error))}",
                provider=target.name,
                model=model,
                task_id=task_id,
                request_body=_without_callback_token(request.json, target.codec.callback_fields),
            )
            uncertain.__cause__ = error  # ours, not aiohttp's: it carries no request headers
            return uncertain
        return error

    async def poll(
        self,
        target: Target,
        task_id: str,
        model: str,
        request: HttpRequest,
        *,
        deadline: float | None = None,
        url: URL | None = None,
        on_retry: Callable[[int, float, ImageGenError], None] | None = None,
        past_deadline: Callable[[ImageGenError], BaseException] | None = None,
    ) -> Snapshot:
        """One status read of ``task_id``; an answer about any other task is refused (and retried).

        ``deadline`` (loop clock) bounds every exchange and every wait. ``url``: the request's
        URL when the caller already built it (a poll loop does, once).
        """
        codec = target.codec

        def reader(body: Any) -> Snapshot:
            snapshot = codec.read_poll(task_id, model, body)
            if snapshot.task_id != task_id:
                raise OtherTaskError(
                    f"{codec.name}: asked for task {task_id!r}, the answer is about {snapshot.task_id!r}",
                    field="task id",
                )
            return snapshot

        return await self.read(
            target,
            request,
            reader,
            deadline=deadline,
            url=url,
            on_retry=on_retry,
            past_deadline=past_deadline,
        )

    async def read(
        self,
        target: Target,
        request: HttpRequest,
        reader: Callable[[Any], T],
        *,
        deadline: float | None = None,
        url: URL | None = None,
        on_retry: Callable[[int, float, ImageGenError], None] | None = None,
        past_deadline: Callable[[ImageGenError], BaseException] | None = None,
        budget: RetryBudget | None = None,
        error_of: Callable[[int, Any], ErrorReport | None] | None = None,
    ) -> T:
        """A GET of the provider's (a status, the credits, the models), read by ``reader``.

        Retried on transient failures within ``budget`` (default: the poll budget) and
        ``deadline``; ``reader`` raises ``ProtocolError`` for a body of the wrong shape.
        """
        transport = self.transport
        loop = asyncio.get_running_loop()

        async def attempt() -> T:
            limit = transport.exchange_limit()
            if deadline is not None:
                limit = min(limit, deadline - loop.time())
            try:
                answer = await transport.send(target, request, body=None, limit=limit, url=url)
            except TransportError as error:
                if classify_poll(http_status=None, failure=transport_failure(error)) is Verdict.RETRY:
                    raise Retry(error) from None
                raise
            value, refusal, verdict = read_reply(target, answer, reader, error_of)
            if verdict is Verdict.ACCEPTED and value is not None:
                return value
            assert refusal is not None
            if verdict is Verdict.RETRY:
                raise Retry(refusal)
            raise refusal

        return await retrying(
            attempt,
            budget or self.poll_budget,
            deadline=deadline,
            on_retry=on_retry,
            past_deadline=past_deadline,
        )


class OtherTaskError(ProtocolError):
    """A status answer about another task than the one asked for."""


def read_create(target: Target, model: str, answer: Answer) -> CreateReading:
    """A create's answer, read and classified (the codec says what a refusal refuses)."""
    codec = target.codec
    body, report, error, failure = read_answer(target, answer)
    snapshot = None
    if error is None:

        def read(body: Any) -> Snapshot:
            if answer.events is not None:  # a stream's first event that names the task
                return codec.read_stream_event(model, body, None)
            return codec.read_submit(model, body)

        snapshot, error, failure = read_body(codec, lambda body: checked_snapshot(codec, read(body)), body)
    task_id = None if body is _NOT_JSON or snapshot is not None else _task_id_of(codec, body)
    verdict = classify_create(
        sent=True,
        http_status=answer.status,
        error_status=report.status if report is not None else None,
        names_task=task_id is not None,
        failure=failure,
    )
    refusal = None
    if verdict is Verdict.REFUSED and report is not None:
        try:
            refusal = codec.refusal_of(report, None if body is _NOT_JSON else body)
        except Exception:
            refusal = Refusal(capacity=False)
    return CreateReading(snapshot, error, verdict, task_id, refusal)


def read_reply(
    target: Target,
    answer: Answer,
    reader: Callable[[Any], T],
    error_of: Callable[[int, Any], ErrorReport | None] | None = None,
) -> tuple[T | None, ImageGenError | None, Verdict]:
    """A read's answer: the value if usable, else the error and the verdict."""
    body, report, error, failure = read_answer(target, answer, error_of)
    value = None
    if error is None:
        value, error, failure = read_body(target.codec, reader, body)
    verdict = classify_poll(
        http_status=answer.status,
        error_status=report.status if report is not None else None,
        failure=failure,
    )
    return value, error, verdict


def read_body(
    codec: Codec, reader: Callable[[Any], T], body: Any
) -> tuple[T | None, ImageGenError | None, Failure | None]:
    """``reader(body)``, or what went wrong: another task's answer, the wrong shape, or a
    value no document foresaw (a codec's own surprise, made a ``ProtocolError``)."""
    try:
        return reader(body), None, None
    except OtherTaskError as other:
        return None, other, Failure.OTHER_TASK
    except ProtocolError as bad_shape:
        return None, bad_shape, Failure.BAD_SHAPE
    except Exception as odd:
        return None, unreadable(codec, odd), Failure.BAD_SHAPE


def is_json_object(data: bytes) -> bool:
    """Whether a stream event is the create's answer: the first that is a JSON object (the
    documented events name no task: the job's first event is its acceptance)."""
    try:
        body = _json.loads(data)
    except ValueError:
        return False  # not JSON: not an answer; the next event may be
    return isinstance(body, Mapping)


def _task_id_of(codec: Codec, body: Any) -> str | None:
    try:
        task_id = codec.task_id_of(body)
    except Exception:
        return None
    return task_id if task_id is not None and usable_task_id(task_id) else None


def usable_task_id(task_id: str) -> bool:
    """A task id we can put in a URL and a journal: non-empty, valid Unicode, not absurdly long."""
    if not task_id or len(task_id) > 1024:
        return False
    try:
        task_id.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def checked_snapshot(codec: Codec, snapshot: Snapshot) -> Snapshot:
    """A create's snapshot whose task id can be followed; else the answer is unreadable."""
    if not usable_task_id(snapshot.task_id):
        # Named in the message all the same (its start): the task may exist, and be paid for.
        raise ProtocolError(
            f"{codec.name}: the answer's task id is not usable text "
            f"({len(snapshot.task_id)} characters, starting {snapshot.task_id[:40]!r})",
            field="task id",
        )
    return snapshot


def unreadable(codec: Codec, odd: Exception) -> ProtocolError:
    """A codec meeting a value no document foresaw (a 400-digit number, a lone surrogate)."""
    return ProtocolError(f"{codec.name}: the answer could not be read ({type(odd).__name__})", field="$")


def _ready(limiter: Limiter) -> Ticket | None:
    """The limiter's ticket without waiting, if it offers one (``ready()`` is optional)."""
    ready = getattr(limiter, "ready", None)
    return ready() if ready is not None else None


def _without_callback_token(body: Any, fields: frozenset[str]) -> Any:
    """The create body for an error report, callback URLs cut before their last segment (the token)."""
    if not isinstance(body, Mapping):
        return body
    return {
        key: value.rsplit("/", 1)[0] + "/***" if key in fields and isinstance(value, str) else value
        for key, value in body.items()
    }


__all__ = ["Created", "Engine", "EngineSettings", "OrphanedTask", "Target", "Unplaced", "encode_body"]
