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
import contextvars
import email.utils
import functools
import inspect
import logging
import math
import random
import re
import time
from collections.abc import Awaitable, Callable, Generator, Mapping
from typing import Any, NamedTuple, TypeVar

import aiohttp
import attrs
import backoff
from multidict import CIMultiDictProxy
from yarl import URL

from . import _json
from ._follower import Follower
from ._handle import TaskHandle
from ._polling import PollPlanner, PollSettings
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
    SessionClosedError,
    SubmitUncertainError,
    TaskFailedError,
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
# The rate-limit ticket of the create this task is sending, for the connector to stamp.
_SENDING: contextvars.ContextVar[Ticket | None] = contextvars.ContextVar(
    "image_gen_async_ticket", default=None
)


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


class Answer(NamedTuple):
    """An HTTP answer, body still undecoded (a tuple: one is made per request)."""

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
        return _json.dumps(request.json)
    except ValueError as error:
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
        body: Any = _json.loads(answer.raw)
    except ValueError:
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
    """Owns the one aiohttp session, the poll planner and the jobs being followed."""

    def __init__(self, settings: EngineSettings) -> None:
        self.settings = settings
        self.planner = PollPlanner(settings.polling.history)
        self._http: aiohttp.ClientSession | None = None
        self.followers: set[Follower] = set()
        self.closed = False

    def http(self) -> aiohttp.ClientSession:
        """The shared aiohttp session, made on first use inside the running loop."""
        if self.closed:
            raise SessionClosedError("the session is closed; open a new AsyncSession")
        if self._http is None:
            s = self.settings
            self._http = aiohttp.ClientSession(
                connector=_StampingConnector(limit=s.pool_size, limit_per_host=0),
                # Bound connecting and reading, not the whole call: the wait for a pooled
                # connection must not count as a connect timeout.
                timeout=aiohttp.ClientTimeout(
                    total=None, connect=None, sock_connect=s.connect_timeout, sock_read=s.read_timeout
                ),
                headers={"User-Agent": USER_AGENT},
            )
        return self._http

    async def close(self) -> None:
        """Stop every poll loop and close the connection pool."""
        self.closed = True
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
        url: URL | None = None,
    ) -> Answer:
        """One HTTP exchange with the target's origin, credentials attached, body read (capped).

        Transport failures come out as ``TransportError`` with no aiohttp exception attached:
        aiohttp's errors carry the request headers, and with them the key.
        """
        if body is None:
            body = encode_body(request)
        options: dict[str, Any] = {}
        if read_timeout is not None:
            options["timeout"] = aiohttp.ClientTimeout(
                total=None, connect=None, sock_connect=self.settings.connect_timeout, sock_read=read_timeout
            )
        started = time.monotonic()
        failure: TransportError | None = None
        sending = _SENDING.set(ticket) if ticket is not None else None
        try:
            # No redirects: following one could carry the key to another origin.
            async with self.http().request(
                request.method,
                url or target.url(request.path),
                params=request.params or None,
                data=body,
                headers=target.headers,
                allow_redirects=False,
                **options,
            ) as response:
                raw = await _read_capped(response, target.name)
        except (aiohttp.ClientError, TimeoutError) as error:
            failure = TransportError(
                f"{target.name} {request.method} {request.path}: {_describe(error)}",
                transient=not isinstance(error, aiohttp.ClientSSLError),
            )
        finally:
            if sending is not None:
                _SENDING.reset(sending)
        if failure is not None:
            raise failure  # outside the except block, so nothing of aiohttp's rides along
        if log.isEnabledFor(logging.DEBUG):
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

        Whether the request can have reached the provider is known: its limiter ticket is
        stamped once it has a connection (before, nothing can have left). Unsent, it is
        retried; sent with no clear answer, it is ``SubmitUncertainError``. ``before_send()``
        runs before each attempt goes out, after its rate-limit turn (awaited if it returns
        an awaitable).
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
            ticket = _ready(target.limiter) or await target.limiter.acquire()
            try:
                if before_send is not None:
                    pending = before_send()
                    if inspect.isawaitable(pending):
                        await pending
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

        snapshot = await self.retrying(once, tries=self.settings.create_retries + 1, on_retry=on_retry)
        return snapshot, retries

    async def poll(
        self,
        target: Target,
        handle: TaskHandle,
        request: HttpRequest,
        *,
        budget: float | None = None,
        url: URL | None = None,
    ) -> Snapshot:
        """One status read, retried on transient failures for at most ``budget`` seconds.

        ``url``: the request's URL when the caller already built it (a poll loop does, once).
        """
        codec = target.codec
        secret = target.secret

        async def once() -> Snapshot:
            answer = await self.send(target, request, url=url)
            return codec.read_poll(handle.task_id, handle.model, decode(codec, answer, secret=secret))

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

        retries = self.settings.poll_retries
        return await self.retrying(
            once, tries=None if retries is None else retries + 1, on_retry=on_retry, max_time=budget
        )

    async def retrying(
        self,
        call: Callable[[], Awaitable[T]],
        *,
        tries: int | None,
        on_retry: Callable[[int, float, BaseException], None],
        max_time: float | None = None,
        retryable: tuple[type[Exception], ...] = TRANSIENT_FAILURES,
        giveup: Callable[[BaseException], bool] = is_final,
    ) -> T:
        """Run ``call``, and retry it under ``backoff`` while its failures are worth retrying.

        Waits are jittered exponential, or the server's ``Retry-After``. Only ``retryable``
        failures are retried (``Exception`` subclasses, so cancellation always propagates),
        never one ``giveup`` calls final; ``tries`` counts the first attempt.
        """
        # Most calls succeed at once: only a failure pays for backoff's machinery.
        try:
            return await call()
        except retryable as error:
            failure = error
        if giveup(failure) or tries == 1:
            raise failure
        outcome: list[T] = []
        failures = iter([failure])
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
                first = next(failures, None)
                if first is not None:
                    raise first  # the first attempt's failure: backoff waits and counts it
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
        learn: bool = True,
    ) -> None:
        """Follow an accepted task to its end in the background (after a webhook wait, if any).

        ``learn=False`` (a resumed task, whose ages do not count from its start) keeps its
        polls out of the planner's history.

        Never raises: the task exists, so whatever goes wrong ends on its handle, which
        carries the task id for ``client.resume()``.
        """
        if self.closed:
            handle.fail(
                SessionClosedError(
                    f"the session closed as {target.name} accepted task {handle.task_id}; "
                    "it may still finish: client.resume() picks it up"
                )
            )
            return
        try:
            follower = Follower(self, target, handle, snapshot, timeout, learn=learn)
            handle._poller = follower
            self.followers.add(follower)
            follower.begin(webhook=webhook)
        except Exception as error:
            handle.fail(error)

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


def _ready(limiter: Limiter) -> Ticket | None:
    """The limiter's ticket without waiting, if it offers one (``ready()`` is optional)."""
    ready = getattr(limiter, "ready", None)
    return ready() if ready is not None else None


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


class _StampingConnector(aiohttp.TCPConnector):
    """The pool; stamps a create's rate-limit ticket as its request gets a connection.

    From then on the request may reach the provider, so a failure is no longer safe to
    retry; and the stamp is the send time the limiter's window counts. (Tracing could
    stamp a moment later, when the headers are written, at several times the cost.)
    """

    async def connect(
        self, req: aiohttp.ClientRequest, traces: list[aiohttp.tracing.Trace], timeout: aiohttp.ClientTimeout
    ) -> aiohttp.connector.Connection:
        connection = await super().connect(req, traces, timeout)
        ticket = _SENDING.get()
        if ticket is not None:
            ticket.sent()
        return connection


def _json_or_none(raw: bytes) -> Any:
    try:
        return _json.loads(raw)
    except ValueError:
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
