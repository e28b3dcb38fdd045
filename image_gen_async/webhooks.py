"""The webhook receiver: callbacks pushed by the providers resolve the waiting handles.

One receiver per session (``session.webhooks``). Every callback URL it hands out is
``{public_url}/{client}/{token}``: dh3 and Get3W v1 do not sign their callbacks, so
an unguessable per-session token in the path is what tells a real callback from a
forged one; Get3W v3's ``X-Get3W-Signature`` (hex HMAC-SHA256 of the raw body) is
checked as well when a webhook secret is configured. The token is a secret: it is
shown as ``.../***`` wherever this module formats a URL.

Answers, so providers stop retrying exactly when they should:
200 accepted (also for duplicates and for task ids this session does not know);
400 not JSON or not the documented shape; 401 wrong token or signature;
404 unknown client; 408 body not received within ``read_timeout``; 413 body over the
cap (decoded bytes); 415 a ``Content-Encoding`` other than gzip/deflate. Client and
token are checked from the path before any of the body is read. Nothing slow happens
in the request: the work is parsing the body and resolving a future.

Bounded under a hostile sender: ``listen()``'s server drops a connection whose headers
or body take longer than ``read_timeout``, holds at most ``max_connections`` at once,
and inflates a compressed body only up to the cap; callbacks kept for a handle that has
not appeared yet are bounded by count, age and total bytes.

With a relay (``RedisBackend``), every instance shares one token and a callback for a
task this instance does not hold is passed to the others, where its handle waits
(answered 200 once relayed, 503 when Redis is away so the provider retries).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import math
import secrets
import time
import zlib
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any

import attrs
from aiohttp import StreamReader, web

from . import _json
from ._backend import WebhookRelay
from ._follow import Follow
from ._handle import TaskHandle
from ._transport import Target
from .errors import BackendUnavailableError, ConfigurationError, ImageGenError
from .providers import Snapshot

log = logging.getLogger("image_gen_async")

# The largest callback body, counted after any Content-Encoding is undone.
MAX_BODY_BYTES = 1024 * 1024
# Seconds a sender has for its request headers (from connecting) and then for its body.
READ_TIMEOUT = 10.0
# Connections listen()'s server holds at once; each costs a file descriptor of the process.
MAX_CONNECTIONS = 256
# Callbacks that beat their create's answer back (a fast job) wait here for their handle ...
EARLY_ARRIVALS = 4096
# ... holding at most this many bytes in all (raw bodies are kept, not parsed ones) ...
EARLY_BYTES = 16 * 1024 * 1024
# ... and for this long (s): a create answer later than that is not coming.
EARLY_TTL = 120.0
# Settled tasks remembered, so a provider's retry or replay is answered as a duplicate.
REMEMBERED = 50_000
# Decoded bytes made per inflating step of a compressed body.
_STEP = 64 * 1024
# Content-Encoding -> zlib wbits (32 + 15: a gzip or zlib header, detected).
_DECODERS = {"gzip": 31, "x-gzip": 31, "deflate": 47}
MASK = "***"


@attrs.define
class WebhookStats:
    """What the receiver has seen, for dashboards and tests."""

    received: int = 0
    resolved: int = 0
    duplicates: int = 0
    progress: int = 0
    unknown: int = 0
    rejected: int = 0
    malformed: int = 0
    too_large: int = 0
    timed_out: int = 0  # body not received within read_timeout: answered 408, connection closed
    refused_connections: int = 0  # closed at once by listen()'s server: max_connections were open
    relayed: int = 0  # passed to the other instances (relay only)
    relay_errors: int = 0  # could not be passed on: answered 503 for the provider to retry


@attrs.frozen
class _Kept:
    """A callback waiting for its handle: the raw body (its size is what it costs)."""

    raw: bytes
    counted: bool  # counted in stats.unknown (relayed ones are not)
    kept_at: float

    @property
    def cost(self) -> int:
        return len(self.raw)


class _TooLarge(Exception):
    """The body, decoded, is over the cap."""


class _Undecodable(Exception):
    """The body's Content-Encoding is unknown (``unsupported``) or its bytes do not inflate."""

    def __init__(self, unsupported: bool) -> None:
        super().__init__("unsupported encoding" if unsupported else "body does not decode")
        self.unsupported = unsupported


def mask_token(text: str, token: str | None) -> str:
    """``text`` with the webhook token replaced by ``***`` (for messages and logs)."""
    return text.replace(token, MASK) if token else text


def masked_url(url: str) -> str:
    """A callback URL as it may be shown: its last path segment (the token) as ``***``."""
    head, _, _ = url.rstrip("/").rpartition("/")
    return f"{head}/{MASK}" if head else MASK


def must_evict(count: int, size: int, oldest_kept_at: float, now: float, limits: tuple[int, int]) -> bool:
    """Whether the oldest kept callback goes: over the count or byte limit, or older than EARLY_TTL."""
    max_count, max_bytes = limits
    return count > max_count or size > max_bytes or oldest_kept_at <= now - EARLY_TTL


def _answer(status: int, **fields: Any) -> tuple[int, bytes]:
    return status, _json.dumps(fields)


def _decoder(encoding: str, first: bytes) -> zlib._Decompress | None:
    """The zlib decoder for a Content-Encoding (None for identity); raw deflate is accepted too."""
    name = encoding.strip().lower()
    if name in ("", "identity"):
        return None
    wbits = _DECODERS.get(name)
    if wbits is None:
        raise _Undecodable(unsupported=True)
    if name == "deflate" and first and first[0] & 0x0F != 8:
        wbits = -15  # deflate sent without its zlib header, as some servers do
    return zlib.decompressobj(wbits=wbits)


async def _read_body(content: StreamReader, limit: int, encoding: str = "") -> bytes:
    """The body from an aiohttp stream, decoded, never holding more than ``limit`` bytes of it.

    ``encoding`` is the request's Content-Encoding when the server left it undone; the
    inflating is bounded step by step, so a small bomb never expands past ``limit``.
    """
    chunks: list[bytes] = []
    size = 0
    decoder: zlib._Decompress | None = None
    started = False
    while True:
        raw = await content.readany()
        if not raw:
            break
        if not started:
            decoder, started = _decoder(encoding, raw), True
        pieces = [raw] if decoder is None else _inflate(decoder, raw, limit - size)
        for piece in pieces:
            size += len(piece)
            if size > limit:
                raise _TooLarge
            chunks.append(piece)
    if decoder is not None and not decoder.eof:
        raise _Undecodable(unsupported=False)
    return b"".join(chunks)


def _inflate(decoder: zlib._Decompress, data: bytes, room: int) -> list[bytes]:
    """Inflate ``data`` in steps; stop (with one byte over ``room``) as soon as the output would not fit."""
    pieces: list[bytes] = []
    try:
        while data:
            piece = decoder.decompress(data, min(_STEP, room + 1))
            pieces.append(piece)
            room -= len(piece)
            if room < 0:
                break
            data = decoder.unconsumed_tail
    except zlib.error:
        raise _Undecodable(unsupported=False) from None
    return pieces


class _Gate(asyncio.Protocol):
    """A connection's first protocol: hands it to aiohttp's handler, or closes it when too many are open."""

    def __init__(self, server: web.Server, limit: int, refused: Callable[[], None]) -> None:
        self._server = server
        self._limit = limit
        self._refused = refused

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # connection_made runs one at a time, so this count is exact (unlike one taken at accept).
        if len(self._server.connections) >= self._limit:
            self._refused()
            transport.close()
            return
        handler = self._server()
        transport.set_protocol(handler)
        handler.connection_made(transport)


class _CappedSite(web.BaseSite):
    """A TCP site whose server holds at most ``limit`` connections; the others are closed at once."""

    __slots__ = ("_host", "_limit", "_port", "_refused")

    def __init__(
        self, runner: web.AppRunner, host: str, port: int, limit: int, refused: Callable[[], None]
    ) -> None:
        super().__init__(runner)
        self._host, self._port, self._limit, self._refused = host, port, limit, refused

    @property
    def name(self) -> str:
        return f"http://{self._host}:{self._port}"

    async def start(self) -> None:
        await super().start()
        server = self._runner.server
        assert server is not None  # set up by runner.setup()
        self._server = await asyncio.get_running_loop().create_server(
            lambda: _Gate(server, self._limit, self._refused), self._host, self._port, backlog=self._backlog
        )


class WebhookReceiver:
    """Maps provider callbacks onto this session's waiting handles, each resolved once."""

    def __init__(
        self,
        engine: Follow,
        targets: Mapping[str, Target],
        *,
        secrets_by_client: Mapping[str, str] | None = None,
        max_body: int = MAX_BODY_BYTES,
        relay: WebhookRelay | None = None,
        read_timeout: float = READ_TIMEOUT,
        early_bytes: int = EARLY_BYTES,
    ) -> None:
        self._engine = engine
        self._targets = targets
        self._secrets = {name: value.encode() for name, value in (secrets_by_client or {}).items()}
        self._max_body = max_body
        self._relay = relay
        # Seconds for a callback's headers and then its body (checked where it is used, as it may be set).
        self.read_timeout = read_timeout
        # With a relay the token is shared by all instances and read in ready().
        self._token: str | None = None if relay else secrets.token_urlsafe(24)
        self._relaying = False
        self._ready_lock = asyncio.Lock()
        self._waiting: dict[tuple[str, str], TaskHandle] = {}
        # Early callbacks, oldest first, and the bytes they hold.
        self._early: OrderedDict[tuple[str, str], _Kept] = OrderedDict()
        # Bytes the early callbacks may hold in all (settable, like read_timeout).
        self.max_early_bytes = early_bytes
        self._early_bytes = 0
        self._settled: OrderedDict[tuple[str, str], None] = OrderedDict()
        self._runner: web.AppRunner | None = None
        self.public_url: str | None = None
        self.stats = WebhookStats()

    def __repr__(self) -> str:
        return f"<WebhookReceiver public_url={self.public_url!r} waiting={len(self._waiting)}>"

    @property
    def early_bytes(self) -> int:
        """Bytes held by callbacks kept for handles that have not appeared yet."""
        return self._early_bytes

    def mask(self, text: str) -> str:
        """``text`` with this receiver's token shown as ``***``: for messages that may echo a callback URL."""
        return mask_token(text, self._token)

    # Where providers are told to call.

    async def ready(self) -> None:
        """With a relay: load the shared token and start hearing the other instances (once).

        ``submit(webhook=True)``, ``listen()`` and ``handle()`` call it; raises
        ``BackendUnavailableError`` when Redis does not answer.
        """
        if self._relay is None or self._relaying:
            return
        async with self._ready_lock:
            if not self._relaying:
                self._token = await self._relay.token()
                await self._relay.subscribe(self._relayed)
                self._relaying = True

    def url_for(self, client: str) -> str:
        """The callback URL for one client; needs ``listen()`` or ``public_url`` set first.

        The URL carries the token: show it with ``masked_url()``.
        """
        if self.public_url is None:
            raise ConfigurationError(
                "webhook=True needs a receiver: await session.webhooks.listen(host, port), "
                "or set session.webhooks.public_url to where your app mounts it"
            )
        if self._token is None:
            raise ConfigurationError("the shared webhook token is not loaded: await session.webhooks.ready()")
        return f"{self.public_url.rstrip('/')}/{client}/{self._token}"

    async def listen(
        self, host: str = "127.0.0.1", port: int = 0, *, max_connections: int = MAX_CONNECTIONS
    ) -> str:
        """Serve the receiver on its own aiohttp server; sets ``public_url`` if unset.

        The server drops a connection whose headers or body take over ``read_timeout``,
        holds at most ``max_connections`` at once, and inflates compressed bodies itself
        (bounded by the cap). ``ConfigurationError`` when the address cannot be bound.
        """
        if self._runner is not None:
            raise ConfigurationError("the webhook receiver is already listening")
        timeout = _positive("read_timeout", self.read_timeout)
        if isinstance(max_connections, bool) or not isinstance(max_connections, int) or max_connections < 1:
            raise ConfigurationError(f"max_connections must be a positive int, not {max_connections!r}")
        await self.ready()
        runner = web.AppRunner(
            self._app(decode=True),
            access_log=None,  # an access log line would carry the token
            keepalive_timeout=timeout,  # also bounds the wait for a request's headers
            lingering_time=0,  # an unread body (a refusal) closes the connection at once
            auto_decompress=False,  # read_body() inflates, bounded
        )
        await runner.setup()
        try:
            await _CappedSite(runner, host, port, max_connections, self._count_refused).start()
        except OSError as error:
            await runner.cleanup()
            reason = error.strerror or type(error).__name__
            raise ConfigurationError(f"webhook receiver cannot listen on {host}:{port}: {reason}") from None
        self._runner = runner
        bound_host, bound_port = runner.addresses[0][:2]
        url = f"http://{bound_host}:{bound_port}"
        if self.public_url is None:
            self.public_url = url
        log.info("webhook receiver listening on %s", url)
        return url

    def _count_refused(self) -> None:
        self.stats.refused_connections += 1

    async def close(self) -> None:
        """Stop the server started by ``listen()`` (mounted apps are their owner's)."""
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    # Mounting in an app of the user's own.

    def app(self) -> web.Application:
        """An aiohttp application answering ``POST /{client}/{token}``; mount it with add_subapp."""
        return self._app(decode=False)

    def _app(self, *, decode: bool) -> web.Application:
        async def route(request: web.Request) -> web.Response:
            return await self._serve(request, decode=decode)

        app = web.Application(client_max_size=self._max_body + 1)
        app.router.add_post("/{client}/{token}", route)
        return app

    async def aiohttp_handler(self, request: web.Request) -> web.Response:
        """An aiohttp route handler; the route must capture ``{client}`` and ``{token}``.

        The app's server undoes any Content-Encoding (aiohttp does by default); the cap
        applies to the bytes it hands over. Its access log, if on, shows the token.
        """
        return await self._serve(request, decode=False)

    async def _serve(self, request: web.Request, *, decode: bool) -> web.Response:
        """Check client and token from the path, then read the body within read_timeout and the cap."""
        self.stats.received += 1
        client = request.match_info["client"]
        admitted = await self._admit(client, request.match_info.get("token"))
        if not isinstance(admitted, Target):
            return await _refuse(request, admitted)
        if request.content_length is not None and request.content_length > self._max_body:
            self.stats.too_large += 1
            return await _refuse(request, _answer(413, error="body too large"))
        encoding = request.headers.get("Content-Encoding", "") if decode else ""
        try:
            async with asyncio.timeout(_positive("read_timeout", self.read_timeout)):
                raw = await _read_body(request.content, self._max_body, encoding)
        except TimeoutError:
            self.stats.timed_out += 1
            return await _refuse(request, _answer(408, error="body not received in time"))
        except _TooLarge:
            self.stats.too_large += 1
            return await _refuse(request, _answer(413, error="body too large"))
        except _Undecodable as error:
            self.stats.malformed += 1
            return await _refuse(request, _answer(415 if error.unsupported else 400, error=str(error)))
        except (ConnectionError, web.RequestPayloadError):
            # The sender went away or sent a broken body: nobody reads this answer.
            return await _refuse(request, _answer(400, error="body not received"))
        return _response(await self._take(client, admitted, raw, request.headers))

    async def handle(
        self, client: str, body: bytes, headers: Mapping[str, str], *, token: str | None = None
    ) -> tuple[int, bytes]:
        """Framework-neutral: take one callback, return ``(status, json body)`` to answer with.

        ``body`` is the decoded body: no Content-Encoding is undone here.
        """
        self.stats.received += 1
        admitted = await self._admit(client, token)
        if not isinstance(admitted, Target):
            return admitted
        if len(body) > self._max_body:
            self.stats.too_large += 1
            return _answer(413, error="body too large")
        return await self._take(client, admitted, body, headers)

    async def _admit(self, client: str, token: str | None) -> Target | tuple[int, bytes]:
        """The client's target when client and token are right, else the refusal to answer."""
        target = self._targets.get(client)
        if target is None or not target.codec.has_webhooks:
            self.stats.rejected += 1
            return _answer(404, error="unknown client")
        try:
            await self.ready()
        except BackendUnavailableError as error:
            self.stats.relay_errors += 1
            log.warning("%s callback refused for now: %s", client, self.mask(str(error)))
            return _answer(503, error="shared backend unavailable")
        if not hmac.compare_digest((token or "").encode(), (self._token or "").encode()):
            self.stats.rejected += 1
            log.warning("%s callback with a wrong token refused", client)
            return _answer(401, error="unknown token")
        return target

    async def _take(
        self, client: str, target: Target, body: bytes, headers: Mapping[str, str]
    ) -> tuple[int, bytes]:
        """An admitted callback: verify its signature, parse it and route it to its handle."""
        if not self._signature_ok(target, body, headers):
            self.stats.rejected += 1
            log.warning("%s callback with a bad signature refused", client)
            return _answer(401, error="bad signature")
        try:
            payload = _json.loads(body)  # deep nesting and bad UTF-8 included: a ValueError
        except ValueError:
            self.stats.malformed += 1
            return _answer(400, error="body is not JSON")
        task_id = _task_id(target, payload)
        if task_id is None:
            self.stats.malformed += 1
            return _answer(400, error="no task id")
        handle = self._waiting.get((client, task_id))
        if handle is not None:
            return self._apply(target, handle, payload)
        if (client, task_id) in self._settled:
            self.stats.duplicates += 1
            return _answer(200, ok=True, duplicate=True)
        if self._relay is not None:
            return await self._pass_on(self._relay, client, task_id, payload, body)
        return self._unknown(client, task_id, body)

    def _signature_ok(self, target: Target, body: bytes, headers: Mapping[str, str]) -> bool:
        secret = self._secrets.get(target.name)
        header = target.codec.signature_header
        if secret is None or header is None:
            return True
        given = (headers.get(header) or "").strip().lower().removeprefix("sha256=")
        expected = hmac.new(secret, body, hashlib.sha256).hexdigest()
        return hmac.compare_digest(given.encode(), expected.encode())

    def _unknown(self, client: str, task_id: str, raw: bytes) -> tuple[int, bytes]:
        """Keep it briefly: its handle may not exist yet because the create's answer is still on its way."""
        self.stats.unknown += 1
        self._keep_early((client, task_id), raw, counted=True)
        return _answer(200, ok=True, known=False)

    def _keep_early(self, key: tuple[str, str], raw: bytes, *, counted: bool) -> None:
        """Keep a callback's raw body for a handle that may appear soon, within count, bytes and age."""
        now = time.monotonic()
        self._drop_early(key)
        kept = _Kept(raw, counted, now)
        self._early[key] = kept
        self._early_bytes += kept.cost
        while self._early:
            oldest_key, oldest = next(iter(self._early.items()))
            limits = (EARLY_ARRIVALS, self.max_early_bytes)
            if not must_evict(len(self._early), self._early_bytes, oldest.kept_at, now, limits):
                break
            self._drop_early(oldest_key)

    def _drop_early(self, key: tuple[str, str]) -> _Kept | None:
        kept = self._early.pop(key, None)
        if kept is not None:
            self._early_bytes -= kept.cost
        return kept

    async def _pass_on(
        self, relay: WebhookRelay, client: str, task_id: str, payload: Any, raw: bytes
    ) -> tuple[int, bytes]:
        """Not ours: a duplicate if some instance finished it, else publish it to the others.

        Kept here too, before any await, in case this instance's own create answer is late.
        """
        key = (client, task_id)
        self._keep_early(key, raw, counted=False)
        try:
            if await relay.settled(client, task_id):
                self._drop_early(key)
                self.stats.duplicates += 1
                return _answer(200, ok=True, duplicate=True)
            await relay.publish(client, task_id, payload)
        except BackendUnavailableError as error:
            self.stats.relay_errors += 1
            log.warning("%s callback for %s not relayed: %s", client, task_id, self.mask(str(error)))
            return _answer(503, error="shared backend unavailable")
        except ValueError:  # parsed, but too deep to encode again for the relay
            self._drop_early(key)
            self.stats.malformed += 1
            return _answer(400, error="body is not JSON")
        self.stats.relayed += 1
        return _answer(200, ok=True, relayed=True)

    def _relayed(self, client: str, task_id: str, payload: Any) -> None:
        """A callback another instance took: apply it if the handle is here, else keep it early."""
        target = self._targets.get(client)
        if target is None:
            return
        key = (client, task_id)
        handle = self._waiting.get(key)
        if handle is not None:
            self._apply(target, handle, payload)
        elif key in self._settled:
            self.stats.duplicates += 1
        else:
            try:
                raw = _json.dumps(payload)
            except ValueError:
                return  # it came through JSON once; nothing sensible to keep if it does not go back
            self._keep_early(key, raw, counted=False)

    def _apply(self, target: Target, handle: TaskHandle, payload: Any) -> tuple[int, bytes]:
        if handle.done():
            self.stats.duplicates += 1
            return _answer(200, ok=True, duplicate=True)
        try:
            snapshot = target.codec.read_callback(handle.task_id, handle.model, payload)
        except Exception as error:  # a hostile shape must be a 400, never a 500
            self.stats.malformed += 1
            reason = self.mask(str(error)) if isinstance(error, ImageGenError) else type(error).__name__
            log.warning("%s callback for %s unreadable: %s", target.name, handle.task_id, reason)
            return _answer(400, error="unreadable callback")
        if self._engine.settle_from_callback(target, handle, self._masked(snapshot)):
            self.stats.resolved += 1
        else:
            self.stats.progress += 1
        return _answer(200, ok=True)

    def _masked(self, snapshot: Snapshot) -> Snapshot:
        """The snapshot with the token masked in its failure text, which becomes an exception message."""
        result = snapshot.result
        if result is None or not result.error or not self._token or self._token not in result.error:
            return snapshot
        return attrs.evolve(snapshot, result=attrs.evolve(result, error=self.mask(result.error)))

    # Engine side.

    def expect(self, target: Target, handle: TaskHandle) -> None:
        """Route this task's callbacks to ``handle``; apply one that already came."""
        key = (target.name, handle.task_id)
        self._waiting[key] = handle
        handle.add_done_callback(lambda done: self._forget(key, done))
        early = self._drop_early(key)
        if early is not None:
            if early.counted:
                self.stats.unknown -= 1
            self._apply(target, handle, _json.loads(early.raw))  # parsed once already: it parses

    def _forget(self, key: tuple[str, str], handle: TaskHandle) -> None:
        """The handle is done (by callback, poll, cancel or deadline): later callbacks are duplicates."""
        if self._waiting.get(key) is handle:
            del self._waiting[key]
        self._settled[key] = None
        while len(self._settled) > REMEMBERED:
            self._settled.popitem(last=False)
        if self._relay is not None:
            self._relay.mark_settled(*key)


def _task_id(target: Target, payload: Any) -> str | None:
    """The callback's task id, or None when its shape (however hostile) has none."""
    try:
        return target.codec.task_id_of(payload)
    except Exception:  # e.g. RecursionError on "data" nested a thousand deep
        return None


def _positive(name: str, value: float) -> float:
    number = isinstance(value, int | float) and not isinstance(value, bool)
    if not number or not math.isfinite(value) or value <= 0:
        raise ConfigurationError(f"{name} must be a positive number of seconds, not {value!r}")
    return float(value)


def _response(answer: tuple[int, bytes]) -> web.Response:
    status, body = answer
    return web.Response(status=status, body=body, content_type="application/json")


async def _refuse(request: web.Request, answer: tuple[int, bytes]) -> web.Response:
    """Answer, then close the connection: what is left of the body is never read.

    Returned unsent, aiohttp would linger reading (and inflating) the rest for up to
    its ``lingering_time``; a mounted app's server has it at 10 s.
    """
    response = _response(answer)
    response.force_close()
    try:
        await response.prepare(request)
        await response.write_eof()
    except ConnectionError:
        pass  # the sender is gone already
    request.protocol.force_close()
    return response
