"""The only aiohttp client code: one pool, one exchange at a time, bounded in bytes and time.

Every exchange has an overall time limit (``sock_read`` bounds only the gap between reads:
a server trickling a byte a second never trips it) and every answer is capped in *decoded*
bytes (a 1 MiB gzip body can inflate to 1 GiB; aiohttp inflates in bounded steps as it is
read, so counting what the stream yields is counting what lands in memory).

Failures come out as ``TransportError`` with nothing of aiohttp's attached: its errors
carry the request headers, and with them the key.
"""

from __future__ import annotations

import asyncio
import contextvars
import email.utils
import functools
import logging
import math
import re
import time
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from typing import Any, NamedTuple

import aiohttp
import attrs
from multidict import CIMultiDictProxy
from yarl import URL

from ._capacity import Account
from ._events import EventStream
from ._ratelimit import Limiter, Ticket
from .errors import AdmissionTimeoutError, ImageGenError, SessionClosedError, TransportError
from .providers import Codec, HttpRequest

log = logging.getLogger("image_gen_async")

USER_AGENT = "image-gen-async/0.1"
# A status answer larger than this (decoded) is not an API answer. (JSON parses to many
# times its bytes in objects: 1 MiB of "{}," is some 25 MB of dicts.)
MAX_ANSWER_BYTES = 1024 * 1024
CHUNK = 64 * 1024
# Only encodings aiohttp inflates in bounded steps are asked for.
ACCEPT_ENCODING = "gzip, deflate"
_QUERY = re.compile(r"\?[^\s'\"]*")
# The rate-limit ticket of the create this task is sending, for the connector to stamp.
_SENDING: contextvars.ContextVar[Ticket | None] = contextvars.ContextVar(
    "image_gen_async_ticket", default=None
)
# What to do once that request has its connection (a create's wait for one ends at its deadline).
_CONNECTED: contextvars.ContextVar[Callable[[], None] | None] = contextvars.ContextVar(
    "image_gen_async_connected", default=None
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


@attrs.define(eq=False)
class Target:
    """One configured provider client: its codec, origin, key and create limiter."""

    name: str
    codec: Codec
    origin: URL
    key: Secret | None
    limiter: Limiter
    account: Account
    # Masks other secrets an answer may echo (the session's webhook token), after the key.
    also_mask: Callable[[str], str] | None = None

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

    def mask(self, text: str) -> str:
        """``text`` with the key (and the webhook token) cut out, for any text an answer may echo."""
        text = mask(text, self.secret)
        return self.also_mask(text) if self.also_mask is not None else text

    def same_origin_path(self, url: str) -> str | None:
        """The path (and query) of ``url`` when it lies on this client's origin, else None.

        A relative URL is read against the origin; a fragment is dropped; anything that is
        not an http(s) URL on this origin (``javascript:``, ``data:``, another host) is None.
        """
        base = str(self.origin).rstrip("/")
        try:
            resolved = URL(base + "/").join(URL(url)).with_fragment(None)
            if resolved.scheme not in ("http", "https") or not resolved.host:
                return None
            same = resolved.origin() == self.origin.origin()
        except (ValueError, TypeError):
            return None
        candidate = str(resolved)
        if same and candidate.startswith(base + "/"):
            return candidate[len(base) :]
        return None


class Answer(NamedTuple):
    """An HTTP answer, body read and decoded (a tuple: one is made per request).

    For an event stream asked for (``send(until=...)``), ``raw`` is the first event that
    ``until`` accepted and ``events`` the open stream of the rest, the caller's to close.
    """

    status: int
    headers: CIMultiDictProxy[str]
    raw: bytes
    events: EventStream | None = None


def mask(text: str, secret: str | None) -> str:
    """``text`` with ``secret`` replaced by ``***``."""
    return text.replace(secret, "***") if secret and secret in text else text


def without_query(text: str) -> str:
    """``text`` with every URL query cut: a query can carry a token or a presigned signature."""
    return _QUERY.sub("", text)


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
    except (TypeError, ValueError, IndexError):
        return None
    return max(0.0, when.timestamp() - time.time())


def describe(error: BaseException) -> str:
    """A short account of a failure that never carries request headers, keys or URL queries."""
    if isinstance(error, aiohttp.ClientResponseError):
        return f"{type(error).__name__}: {error.status} {without_query(error.message)}"
    if isinstance(error, aiohttp.ClientConnectorError):
        return f"{type(error).__name__}: cannot connect to {error.host}:{error.port}"
    text = str(error) if isinstance(error, ImageGenError | OSError) else ""
    text = without_query(text)
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


class AnswerTooLarge(TransportError):
    """An answer over its decoded-size cap: nothing more of it is read (asking again will not mend it)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, transient=False)


async def read_capped(response: aiohttp.ClientResponse, limit: int, where: str) -> AsyncIterator[bytes]:
    """The decoded body in chunks, never more than ``limit`` bytes in all."""
    length = response.content_length
    if length is not None and length > limit and not _encoded(response):
        raise AnswerTooLarge(f"{where}: answer of {length} bytes is over the {limit}-byte cap")
    size = 0
    async for chunk in response.content.iter_chunked(CHUNK):
        size += len(chunk)
        if size > limit:
            raise AnswerTooLarge(f"{where}: answer over the {limit}-byte cap (decoded)")
        yield chunk


async def _read_body(response: aiohttp.ClientResponse, where: str) -> bytes:
    """The whole answer, within the answer cap."""
    length = response.content_length
    if length is not None and length <= MAX_ANSWER_BYTES and not _encoded(response):
        return await response.read()  # the usual answer: its length known and small
    return b"".join([chunk async for chunk in read_capped(response, MAX_ANSWER_BYTES, where)])


async def _first_event(events: EventStream, until: Callable[[bytes], bool], where: str) -> bytes:
    """The stream's first event ``until`` accepts; a stream that ends first gave no answer."""
    while True:
        data = await events.next()
        if data is None:
            raise TransportError(f"{where}: the event stream ended before naming its task")
        if data and until(data):  # empty: a heartbeat
            return data


def _is_event_stream(response: aiohttp.ClientResponse) -> bool:
    return response.content_type == "text/event-stream"


def _encoded(response: aiohttp.ClientResponse) -> bool:
    """A compressed body: its Content-Length counts what is on the wire, not what it inflates to."""
    encoding = response.headers.get("Content-Encoding") or ""
    return encoding.strip().lower() not in ("", "identity")


class Transport:
    """The one aiohttp session of an ``AsyncSession``: made on first use, closed once."""

    def __init__(self, *, pool_size: int, connect_timeout: float, read_timeout: float) -> None:
        self._pool_size = pool_size
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self._http: aiohttp.ClientSession | None = None
        # Downloads have a pool of their own: slow storage hosts must not starve the API.
        self._files: aiohttp.ClientSession | None = None
        # So do event streams: each holds its connection for the whole job, and pool_size of
        # them must not leave the polls and creates of every other job without one.
        self._streams: aiohttp.ClientSession | None = None
        # The open event streams, each woken and closed when the session closes.
        self._open: set[EventStream] = set()
        self.closed = False

    def http(self) -> aiohttp.ClientSession:
        """The shared aiohttp session, made on first use inside the running loop."""
        if self.closed:
            raise SessionClosedError("the session is closed; open a new AsyncSession")
        if self._http is None:
            self._http = self._pool(_StampingConnector(limit=self._pool_size, limit_per_host=0))
        return self._http

    def files(self) -> aiohttp.ClientSession:
        """The session downloads use: same timeouts, a separate pool, no API headers."""
        self.http()  # SessionClosedError once closed
        if self._files is None:
            self._files = self._pool(aiohttp.TCPConnector(limit=self._pool_size, limit_per_host=0))
        return self._files

    def streams(self) -> aiohttp.ClientSession:
        """The session stream creates use: the API's stamping, a pool of their own."""
        self.http()  # SessionClosedError once closed
        if self._streams is None:
            self._streams = self._pool(_StampingConnector(limit=self._pool_size, limit_per_host=0))
        return self._streams

    def _pool(self, connector: aiohttp.BaseConnector) -> aiohttp.ClientSession:
        """An aiohttp session on ``connector``, bounding connecting and each read, not the whole
        call: the wait for a pooled connection must not count as a connect timeout, and each
        exchange's total is bounded by its own limit."""
        return aiohttp.ClientSession(
            connector=connector,
            timeout=self._timeout(self.read_timeout),
            headers={"User-Agent": USER_AGENT, "Accept-Encoding": ACCEPT_ENCODING},
        )

    def _timeout(self, read_timeout: float) -> aiohttp.ClientTimeout:
        """Connecting and each gap between reads (``read_timeout``) bounded, never the whole call."""
        return aiohttp.ClientTimeout(
            total=None, connect=None, sock_connect=self.connect_timeout, sock_read=read_timeout
        )

    async def close(self) -> None:
        self.closed = True
        for stream in list(self._open):
            stream.abort("the session closed")
        for http in (self._http, self._files, self._streams):
            if http is not None:
                await http.close()
        self._http = self._files = self._streams = None

    def exchange_limit(self, read_timeout: float | None = None) -> float:
        """The default total time of one exchange: connecting, then reading the answer."""
        return self.connect_timeout + (self.read_timeout if read_timeout is None else read_timeout)

    async def send(
        self,
        target: Target,
        request: HttpRequest,
        *,
        body: bytes | None,
        limit: float,
        read_timeout: float | None = None,
        ticket: Ticket | None = None,
        url: URL | None = None,
        until: Callable[[bytes], bool] | None = None,
        connect_by: float | None = None,
    ) -> Answer:
        """One exchange with the target's origin, key attached, answer read: at most ``limit`` s.

        ``ticket`` (a create's rate-limit turn) is stamped once the request has a connection:
        from then on it may reach the provider. With ``until`` (a stream create, sent from the
        streams' own pool), an event-stream answer is read up to the first event ``until``
        accepts (within ``limit``) and handed back open. ``connect_by`` (loop clock, a create's
        deadline): a request with no connection by then is given up, nothing sent
        (``AdmissionTimeoutError``); once it has one, the exchange runs to ``limit``.
        """
        options: dict[str, Any] = {}
        if read_timeout is not None:
            options["timeout"] = self._timeout(read_timeout)
        headers = target.headers
        if request.accept is not None:
            headers = {**headers, "Accept": request.accept}
        started = time.monotonic()
        where = f"{target.name} {request.method} {request.path}"
        failure: TransportError | None = None
        events: EventStream | None = None
        sending = _SENDING.set(ticket) if ticket is not None else None
        loop = asyncio.get_running_loop()
        ends = loop.time() + max(0.0, limit)
        connecting = None
        try:
            async with asyncio.timeout_at(ends) as scope:
                if connect_by is not None and ticket is not None and connect_by < ends:
                    scope.reschedule(connect_by)
                    connecting = _CONNECTED.set(lambda: scope.reschedule(ends))
                # No redirects: following one could carry the key to another origin.
                http = self.http() if until is None else self.streams()
                response = await http.request(
                    request.method,
                    url or target.url(request.path),
                    params=request.params or None,
                    data=body,
                    headers=headers,
                    allow_redirects=False,
                    **options,
                )
                try:
                    if until is not None and response.status == 200 and _is_event_stream(response):
                        idle = read_timeout or self.read_timeout
                        events = EventStream(response, where, idle, forget=self._open.discard)
                        self._open.add(events)
                        if self.closed:  # closed while its headers came: close() could not see it
                            events.abort("the session closed")
                        raw = await _first_event(events, until, where)
                    else:
                        raw = await _read_body(response, where)
                        response.release()
                except BaseException:
                    if events is not None:
                        events.close()
                    response.close()
                    raise
        # aiohttp's own clocks raise TimeoutErrors too: say which one ran out, not the exchange's.
        except aiohttp.ConnectionTimeoutError:
            failure = TransportError(f"{where}: no connection within {self.connect_timeout:.1f} s")
        except aiohttp.ServerTimeoutError:
            quiet = self.read_timeout if read_timeout is None else read_timeout
            failure = TransportError(f"{where}: no data for {quiet:.1f} s")
        except TimeoutError:
            if connecting is not None and ticket is not None and not ticket.was_sent:
                raise AdmissionTimeoutError(
                    f"{where}: no free connection within the job's deadline; nothing was sent"
                ) from None
            failure = TransportError(f"{where}: no complete answer within {limit:.1f} s")
        except aiohttp.ClientError as error:
            failure = TransportError(
                f"{where}: {describe(error)}", transient=not isinstance(error, aiohttp.ClientSSLError)
            )
        finally:
            if sending is not None:
                _SENDING.reset(sending)
            if connecting is not None:
                _CONNECTED.reset(connecting)
        if failure is not None:
            raise failure  # outside the except block, so nothing of aiohttp's rides along
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "%s -> %d in %.1f ms", where, response.status, (time.monotonic() - started) * 1000
            )
        return Answer(response.status, response.headers, raw, events)

    @asynccontextmanager
    async def get(self, url: str, *, limit: float, accept: str) -> AsyncIterator[aiohttp.ClientResponse]:
        """A bare GET (no key: output files live on storage hosts), bounded to ``limit`` s in all.

        The caller reads the body inside the block (``read_capped``).
        """
        async with asyncio.timeout(max(0.0, limit)):
            async with self.files().get(url, headers={"Accept": accept}) as response:
                yield response


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
            connected = _CONNECTED.get()
            if connected is not None:
                connected()
        return connection
