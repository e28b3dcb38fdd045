"""The engine: all I/O. Sends, classifies answers, retries, polls, resolves handles.

It never looks inside a provider's JSON: the codecs read it. What it decides is
when to send, what may be retried, and when a create is ambiguous.

Never pay twice: a create is retried only when the provider cannot have made the
task (no connection was ever made, a 429, a 503 without a task id). Anything else
that leaves the outcome unknown raises ``SubmitUncertainError``. Polls are
retried freely, with jittered exponential backoff or the server's ``Retry-After``.
"""

from __future__ import annotations

import asyncio
import email.utils
import functools
import json
import logging
import math
import random
import re
import time
from collections.abc import Awaitable, Callable, Generator, Mapping
from typing import Any, TypeVar

import aiohttp
import attrs
import backoff
from multidict import CIMultiDictProxy
from yarl import URL

from ._handle import TaskHandle
from ._polling import PollPlanner, PollSettings, webhook_wait
from ._ratelimit import Limiter, Ticket
from .errors import (
    APIError,
    ConfigurationError,
    ContentPolicyError,
    ImageGenError,
    InvalidRequestError,
    ProtocolError,
    RateLimitError,
    ServerError,
    SubmitUncertainError,
    TaskFailedError,
    TaskTimeoutError,
    TransportError,
    api_error,
)
from .models import TaskResult, TaskStatus
from .providers import Codec, HttpRequest, Snapshot

log = logging.getLogger("image_gen_async")
T = TypeVar("T")

USER_AGENT = "image-gen-async/0.1"
# A status answer larger than this is not an API answer.
MAX_ANSWER_BYTES = 8 * 1024 * 1024
_NOT_JSON = object()
# Body fields that carry a callback URL (Get3W v3, dh3); the last path segment is the token.
CALLBACK_FIELDS = frozenset({"webhook_url", "callback_url"})
_QUERY = re.compile(r"\?[^\s'\"]*")


class Secret:
    """An API key that never shows itself in a repr, a log line or an exception."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__

    def reveal(self) -> str:
        """The key itself, for the Authorization header only."""
        return self._value


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


@attrs.define(eq=False)
class Target:
    """One configured provider client: its codec, origin, key and create limiter."""

    name: str
    codec: Codec
    origin: URL
    key: Secret | None
    limiter: Limiter

    @property
    def secret(self) -> str | None:
        """The key itself, to mask wherever an answer's text is repeated."""
        return self.key.reveal() if self.key is not None else None

    @functools.cached_property
    def headers(self) -> dict[str, str]:
        """Every request's headers (the key's ``Authorization`` among them)."""
        headers = {"Accept": "application/json", "Content-Type": "application/json"}
        if self.secret is not None:
            headers["Authorization"] = f"Bearer {self.secret}"
        return headers

    def url(self, path: str) -> URL:
        return URL(str(self.origin).rstrip("/") + path, encoded=True)

    def same_origin_path(self, url: str) -> str | None:
        """The path (and query) of ``url`` when it lies on this client's origin, else None.

        A relative URL is read against the origin; a fragment is dropped.
        """
        base = str(self.origin).rstrip("/")
        try:
            resolved = URL(base + "/").join(URL(url)).with_fragment(None)
        except (ValueError, TypeError):
            return None
        candidate = str(resolved)
        if resolved.origin() == self.origin.origin() and candidate.startswith(base + "/"):
            return candidate[len(base) :]
        return None


@attrs.frozen
class Answer:
    """An HTTP answer, body still undecoded."""

    status: int
    headers: CIMultiDictProxy[str]
    raw: bytes


def retry_after_seconds(headers: Mapping[str, str]) -> float | None:
    """``Retry-After`` as seconds: a number or an HTTP date; None if absent or unreadable."""
    value = headers.get("Retry-After")
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        pass
    else:
        return max(0.0, seconds) if math.isfinite(seconds) else None
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def encode_body(request: HttpRequest) -> bytes | None:
    """The request's JSON body; parameters JSON cannot carry are refused before anything is sent."""
    if request.json is None:
        return None
    try:
        return json.dumps(request.json, separators=(",", ":"), allow_nan=False).encode()
    except (TypeError, ValueError) as error:
        raise InvalidRequestError(f"parameters are not JSON: {error}") from None


def decode(codec: Codec, answer: Answer, *, secret: str | None = None) -> Any:
    """The answer's JSON, or the error it carries, raised as the matching ``APIError``.

    ``secret`` is masked in any text taken from the answer, in case a server echoes the key.
    """
    if 300 <= answer.status < 400:
        raise ConfigurationError(
            f"{codec.name}: the server redirects (HTTP {answer.status}) to "
            f"{answer.headers.get('Location', '?')!r}; set base_urls to the origin it means"
        )
    try:
        body: Any = json.loads(answer.raw)
    except (ValueError, UnicodeDecodeError):
        body = _NOT_JSON
    if body is _NOT_JSON:
        if answer.status < 400:
            snippet = _mask(answer.raw[:80].decode("utf-8", "replace"), secret)
            raise ProtocolError(
                f"{codec.name}: answer is not JSON (HTTP {answer.status}): {snippet!r}",
                field="$",
                transient=True,
            )
        report = codec.error_of(answer.status, None)
    else:
        report = codec.error_of(answer.status, body)
    if report is not None:
        raise api_error(
            report.status,
            report.code,
            _mask(report.message, secret),
            provider=codec.name,
            retry_after=retry_after_seconds(answer.headers),
        )
    return body


def _mask(text: str, secret: str | None) -> str:
    return text.replace(secret, "***") if secret and secret in text else text


def retry_waits(base: float, cap: float) -> Generator[float, Any, None]:
    """Backoff waits: the server's ``Retry-After`` when given, else full-jitter exponential."""
    error = yield 0.0
    ceiling = base
    while True:
        hint = getattr(error, "retry_after", None)
        delay = min(hint, cap) if isinstance(hint, int | float) else random.uniform(0, ceiling)
        ceiling = min(cap, ceiling * 2)
        error = yield delay


# Failures worth another try, for creates (when nothing can have been made) and polls alike;
# one marked transient=False (a TLS error, JSON of the wrong shape) is final.
TRANSIENT_FAILURES = (TransportError, ProtocolError, RateLimitError, ServerError)


def is_final(error: BaseException) -> bool:
    """True for a failure that asking again will not mend."""
    return not getattr(error, "transient", True)


def _describe(error: BaseException) -> str:
    """A short account of a failure that never carries request headers (or keys)."""
    if isinstance(error, aiohttp.ClientResponseError):
        return f"{type(error).__name__}: {error.status} {error.message}"
    if isinstance(error, aiohttp.ClientConnectorError):
        return f"{type(error).__name__}: cannot connect to {error.host}:{error.port}"
    text = str(error) if isinstance(error, ImageGenError | OSError) else ""
    # A URL's query can carry a webhook token: keep scheme, host and path only.
    text = _QUERY.sub("", text)
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


class Engine:
    """Owns the one aiohttp session, the poll planner and the running poll loops."""

    def __init__(self, settings: EngineSettings) -> None:
        self.settings = settings
        self.planner = PollPlanner(settings.polling.history)
        self._http: aiohttp.ClientSession | None = None
        self._traced: aiohttp.ClientSession | None = None
        self._pollers: dict[asyncio.Task[None], TaskHandle] = {}
        self.closed = False

    def http(self, *, traced: bool = False) -> aiohttp.ClientSession:
        """The shared aiohttp session, made on first use inside the running loop.

        ``traced`` gives a view of the same connection pool that stamps rate-limit tickets
        as headers are written; only creates need it, so polls skip tracing's cost.
        """
        if self.closed:
            raise ConfigurationError("the session is closed; open a new AsyncSession")
        if self._http is None:
            s = self.settings
            options: dict[str, Any] = {
                # Bound connecting and reading, not the whole call: the wait for a pooled
                # connection must not count as a connect timeout.
                "timeout": aiohttp.ClientTimeout(
                    total=None, connect=None, sock_connect=s.connect_timeout, sock_read=s.read_timeout
                ),
                "headers": {"User-Agent": USER_AGENT},
            }
            connector = aiohttp.TCPConnector(limit=s.pool_size, limit_per_host=0)
            self._http = aiohttp.ClientSession(connector=connector, **options)
            self._traced = aiohttp.ClientSession(
                connector=connector, connector_owner=False, trace_configs=[_stamp_tickets()], **options
            )
        if traced:
            assert self._traced is not None
            return self._traced
        return self._http

    async def close(self) -> None:
        """Stop every poll loop and close the connection pool."""
        self.closed = True
        pollers = dict(self._pollers)
        for task in pollers:
            task.cancel()
        await asyncio.gather(*pollers, return_exceptions=True)
        for handle in pollers.values():
            handle.fail(
                ConfigurationError(
                    f"session closed while waiting for {handle.provider} task {handle.task_id}; "
                    "it may still finish: client.resume() picks it up"
                )
            )
        if self._traced is not None:
            await self._traced.close()
            self._traced = None
        if self._http is not None:
            await self._http.close()
            self._http = None

    async def send(
        self,
        target: Target,
        request: HttpRequest,
        *,
        body: bytes | None = None,
        read_timeout: float | None = None,
        ticket: Ticket | None = None,
    ) -> Answer:
        """One HTTP exchange with the target's origin, credentials attached, body read (capped).

        Transport failures come out as ``TransportError`` with no aiohttp exception attached:
        aiohttp's errors carry the request headers, and with them the key.
        """
        headers = target.headers
        if body is None:
            body = encode_body(request)
        options: dict[str, Any] = {}
        if read_timeout is not None:
            options["timeout"] = aiohttp.ClientTimeout(
                total=None, connect=None, sock_connect=self.settings.connect_timeout, sock_read=read_timeout
            )
        started = time.monotonic()
        failure: TransportError | None = None
        try:
            # No redirects: following one could carry the key to another origin.
            async with self.http(traced=ticket is not None).request(
                request.method,
                target.url(request.path),
                params=dict(request.params) or None,
                data=body,
                headers=headers,
                allow_redirects=False,
                trace_request_ctx=ticket,
                **options,
            ) as response:
                raw = await _read_capped(response, target.name)
        except (aiohttp.ClientError, TimeoutError) as error:
            failure = TransportError(
                f"{target.name} {request.method} {request.path}: {_describe(error)}",
                transient=not isinstance(error, aiohttp.ClientSSLError),
            )
        if failure is not None:
            raise failure  # outside the except block, so nothing of aiohttp's rides along
        log.debug(
            "%s %s %s -> %d in %.1f ms",
            target.name,
            request.method,
            request.path,
            response.status,
            (time.monotonic() - started) * 1000,
        )
        return Answer(response.status, response.headers, raw)

    async def create(
        self,
        target: Target,
        model: str,
        request: HttpRequest,
        *,
        read_timeout: float | None = None,
        before_send: Callable[[], object] | None = None,
    ) -> tuple[Snapshot, int]:
        """Send a create, retrying only what cannot have made a task; the snapshot and retries.

        Whether the request can have reached the provider is known exactly: its limiter
        ticket is stamped when the headers are written. Unsent, it is retried; sent with
        no clear answer, it is ``SubmitUncertainError``. ``before_send()`` runs before
        each attempt goes out, after its rate-limit turn.
        """
        codec = target.codec
        body = encode_body(request)
        secret = target.secret
        retries = 0

        def uncertain(reason: str, error: BaseException, task_id: str | None = None) -> SubmitUncertainError:
            return SubmitUncertainError(
                f"create may have reached the provider: {reason}: {_describe(error)}",
                provider=target.name,
                model=model,
                task_id=task_id,
                request_body=_without_callback_token(request.json),
            )

        async def once() -> Snapshot:
            ticket = await target.limiter.acquire()
            try:
                if before_send is not None:
                    before_send()
                answer = await self.send(target, request, body=body, read_timeout=read_timeout, ticket=ticket)
            except (TransportError, ProtocolError) as error:
                if not ticket.was_sent:
                    raise  # nothing reached the provider: safe to retry
                raise uncertain("no complete answer came back", error) from error
            finally:
                if not ticket.was_sent:
                    ticket.abandon()
            try:
                answer_body = decode(codec, answer, secret=secret)
            except APIError as error:
                task_id = codec.task_id_of(_json_or_none(answer.raw))
                if task_id is not None:
                    # An error that names a task may still have made it: never retried, never final.
                    raise uncertain("the answer names a task but reports an error", error, task_id) from error
                if isinstance(error, RateLimitError):
                    target.limiter.penalize(error.retry_after)
                    raise
                if isinstance(error, ServerError):
                    if error.status == 503:
                        raise  # the provider refused before making a task
                    raise uncertain("the provider answered with a server error", error) from error
                raise
            except ProtocolError as error:
                raise uncertain("the answer could not be read", error) from error
            try:
                snapshot = codec.read_submit(model, answer_body)
            except ProtocolError as error:
                task_id = codec.task_id_of(answer_body)
                raise uncertain("the answer could not be read", error, task_id) from error
            target.limiter.reward()
            return snapshot

        def on_retry(tries: int, wait: float, error: BaseException) -> None:
            nonlocal retries
            retries += 1
            log.warning("%s create retry %d in %.2f s: %s", target.name, tries, wait, _describe(error))

        snapshot = await self.retrying(
            once,
            retryable=TRANSIENT_FAILURES,
            giveup=is_final,
            tries=self.settings.create_retries + 1,
            on_retry=on_retry,
        )
        return snapshot, retries

    async def poll(
        self, target: Target, handle: TaskHandle, request: HttpRequest, *, budget: float | None = None
    ) -> Snapshot:
        """One status read, retried on transient failures for at most ``budget`` seconds."""
        codec = target.codec
        secret = target.secret

        def on_retry(tries: int, wait: float, error: BaseException) -> None:
            handle.retries += 1
            log.warning(
                "%s poll of %s retry %d in %.2f s: %s",
                target.name,
                handle.task_id,
                tries,
                wait,
                _describe(error),
            )

        async def once() -> Snapshot:
            answer = await self.send(target, request)
            return codec.read_poll(handle.task_id, handle.model, decode(codec, answer, secret=secret))

        retries = self.settings.poll_retries
        return await self.retrying(
            once,
            retryable=TRANSIENT_FAILURES,
            giveup=is_final,
            tries=None if retries is None else retries + 1,
            on_retry=on_retry,
            max_time=budget,
        )

    async def retrying(
        self,
        call: Callable[[], Awaitable[T]],
        *,
        retryable: tuple[type[Exception], ...],
        giveup: Callable[[BaseException], bool],
        tries: int | None,
        on_retry: Callable[[int, float, BaseException], None],
        max_time: float | None = None,
    ) -> T:
        """Run ``call`` under ``backoff``: jittered exponential waits, or the server's ``Retry-After``.

        Only ``Exception`` subclasses are ever retried, so cancellation always propagates.
        """
        # Most calls succeed at once: only a failure worth retrying pays for backoff's machinery.
        try:
            return await call()
        except retryable as error:
            if giveup(error) or tries == 1:
                raise
            first_failure: BaseException = error
        outcome: list[T] = []
        failures = iter([first_failure])
        async for attempt in backoff.aretry_context(
            retryable,
            retry_waits,
            max_tries=tries,
            max_time=max_time,
            jitter=None,
            giveup=giveup,
            on_backoff=lambda details: on_retry(details["tries"], details["wait"], details["exception"]),
            logger=None,
            base=self.settings.retry_base,
            cap=self.settings.retry_cap,
        ):
            with attempt:
                failure = next(failures, None)
                if failure is not None:
                    raise failure  # the first attempt's failure: backoff waits and counts it
                outcome.append(await call())
        return outcome[0]

    def start(
        self,
        target: Target,
        handle: TaskHandle,
        snapshot: Snapshot,
        timeout: float | None,
        *,
        webhook: bool = False,
    ) -> None:
        """Follow an accepted task to its end in the background (after a webhook wait, if any)."""
        self.http()  # a closed session starts nothing
        poller = asyncio.get_running_loop().create_task(
            self.follow(target, handle, snapshot, timeout, accepted=time.monotonic(), webhook=webhook),
            name=f"image_gen_async poll {target.name} {handle.task_id}",
        )
        handle._poller = poller
        self._pollers[poller] = handle
        poller.add_done_callback(self._forget)

    @staticmethod
    def late(target: Target, handle: TaskHandle, started: float) -> TaskTimeoutError:
        """The error for a handle whose deadline passed."""
        return TaskTimeoutError(
            f"{target.name} task {handle.task_id} not finished after "
            f"{time.monotonic() - started:.1f} s ({handle.polls} polls); it may still finish",
            task_id=handle.task_id,
            provider=target.name,
        )

    def _forget(self, poller: asyncio.Task[None]) -> None:
        self._pollers.pop(poller, None)

    async def follow(
        self,
        target: Target,
        handle: TaskHandle,
        snapshot: Snapshot,
        timeout: float | None,
        *,
        accepted: float,
        webhook: bool = False,
    ) -> None:
        """The poll loop: sleep until the planned age, poll, until terminal or the deadline.

        Ages count from ``accepted`` (when the create's answer came back). A job waiting on
        a webhook first sleeps until it is clearly late; a callback that comes in the
        meantime cancels this loop, so polling is only the safety net.
        """
        settings = self.settings.polling
        deadline = accepted + (self.settings.task_timeout if timeout is None else timeout)
        key = (target.name, handle.model)
        estimate = handle.estimated_duration
        request = self.poll_request(target, handle, snapshot.poll_url)
        last_poll: float | None = None
        last_running = 0.0
        try:
            if webhook:
                upper = self.planner.upper_bound(key, estimate)
                await asyncio.sleep(min(webhook_wait(upper, settings), max(0.0, deadline - accepted)))
                log.info("%s task %s: no callback yet, polling", target.name, handle.task_id)
            while True:
                # Sleep until the planned age; re-plan on waking, since other jobs may have
                # taught the planner that this one cannot be done yet.
                while True:
                    now = time.monotonic()
                    if now >= deadline:
                        raise self.late(target, handle, accepted)
                    wait = accepted + self.planner.next_poll_age(key, estimate, last_poll, settings) - now
                    if wait <= 0:
                        break
                    await asyncio.sleep(min(wait, deadline - now))
                last_poll = time.monotonic() - accepted
                remaining = deadline - time.monotonic()
                try:
                    if remaining > self.settings.read_timeout + self.settings.retry_cap:
                        # Far from the deadline one poll cannot pass it, and backoff's own
                        # budget ends its retries there: no timer needed.
                        snapshot = await self.poll(target, handle, request, budget=remaining)
                    else:
                        async with asyncio.timeout(max(0.0, remaining)):
                            snapshot = await self.poll(target, handle, request, budget=remaining)
                except TimeoutError:
                    raise self.late(target, handle, accepted) from None
                except ImageGenError:
                    if time.monotonic() >= deadline:
                        raise self.late(target, handle, accepted) from None
                    raise

                handle.polls += 1
                handle.observe(snapshot.status)
                if snapshot.result is not None:
                    self.finish(target, handle, snapshot.result, (last_running, last_poll))
                    return
                last_running = last_poll
                self.planner.running(key, handle, last_poll, estimate)
        except asyncio.CancelledError:
            raise
        except Exception as error:  # every failure ends on the handle, never in a lost task
            handle.fail(error)
        finally:
            self.planner.forget(key, handle)

    def poll_request(self, target: Target, handle: TaskHandle, poll_url: str | None) -> HttpRequest:
        """The codec's status call, or the server's own poll URL when it is on our origin."""
        if poll_url:
            path = target.same_origin_path(poll_url)
            if path is not None:
                return HttpRequest("GET", path)
            log.warning(
                "%s task %s: ignoring poll URL on another origin; polling %s instead",
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
        poller = handle._poller
        if poller is not None:
            poller.cancel()
        took = time.time() - handle.submitted_at
        self.finish(target, handle, snapshot.result, (took, took))
        return True

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
                self.planner.completed(key, handle, took[0], took[1], handle.estimated_duration)
            handle.resolve(result)
        else:
            handle.fail(failure_error(target.codec, result))


def _without_callback_token(body: Any) -> Any:
    """The create body for an error report, callback URLs cut before their last segment (the token)."""
    if not isinstance(body, Mapping):
        return body
    return {
        key: value.rsplit("/", 1)[0] + "/***" if key in CALLBACK_FIELDS and isinstance(value, str) else value
        for key, value in body.items()
    }


def failure_error(codec: Codec, result: TaskResult) -> TaskFailedError:
    """The error for a failed task: ``ContentPolicyError`` when the safety check stopped it."""
    return ContentPolicyError(result) if codec.content_policy(result) else TaskFailedError(result)


def _stamp_tickets() -> aiohttp.TraceConfig:
    """Stamp a create's rate-limit ticket when its headers are written, not when released."""

    async def on_headers_sent(
        session: aiohttp.ClientSession, context: Any, params: aiohttp.TraceRequestHeadersSentParams
    ) -> None:
        ticket = context.trace_request_ctx
        if isinstance(ticket, Ticket):
            ticket.sent()

    trace = aiohttp.TraceConfig()
    trace.on_request_headers_sent.append(on_headers_sent)
    return trace


def _json_or_none(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return None


async def _read_capped(response: aiohttp.ClientResponse, provider: str) -> bytes:
    if response.content_length is not None:
        if response.content_length > MAX_ANSWER_BYTES:
            raise ProtocolError(f"{provider}: answer of {response.content_length} bytes is too large")
        return await response.read()  # the length is known and within the cap
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.content.iter_chunked(65536):
        size += len(chunk)
        if size > MAX_ANSWER_BYTES:
            raise ProtocolError(f"{provider}: answer larger than {MAX_ANSWER_BYTES} bytes")
        chunks.append(chunk)
    return b"".join(chunks)
