"""The webhook receiver: callbacks pushed by the providers resolve the waiting handles.

One receiver per session (``session.webhooks``). Every callback URL it hands out is
``{public_url}/{client}/{token}``: dh3 and Get3W v1 do not sign their callbacks, so
an unguessable per-session token in the path is what tells a real callback from a
forged one; Get3W v3's ``X-Get3W-Signature`` (hex HMAC-SHA256 of the raw body) is
checked as well when a webhook secret is configured.

Answers, so providers stop retrying exactly when they should:
200 accepted (also for duplicates and for task ids this session does not know);
400 not JSON or not the documented shape; 401 wrong token or signature;
404 unknown client; 413 body over the cap. Nothing slow happens in the request:
the work is parsing the body and resolving a future.

With a relay (``RedisBackend``), every instance shares one token and a callback for a
task this instance does not hold is passed to the others, where its handle waits
(answered 200 once relayed, 503 when Redis is away so the provider retries).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import secrets
import time
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import attrs
from aiohttp import web

from ._backend import WebhookRelay
from ._follow import Follow
from ._handle import TaskHandle
from ._transport import Target
from .errors import BackendUnavailableError, ConfigurationError, ImageGenError

log = logging.getLogger("image_gen_async")

MAX_BODY_BYTES = 1024 * 1024
# Callbacks that beat their create's answer back (a fast job) wait here for their handle.
EARLY_ARRIVALS = 4096
# ... and for this long (s): a create answer later than that is not coming.
EARLY_TTL = 120.0
# Settled tasks remembered, so a provider's retry or replay is answered as a duplicate.
REMEMBERED = 50_000


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
    relayed: int = 0  # passed to the other instances (relay only)
    relay_errors: int = 0  # could not be passed on: answered 503 for the provider to retry


async def _read_upto(request: web.Request, limit: int) -> bytes:
    """The whole body, however many segments it came in, but never more than ``limit`` bytes."""
    chunks: list[bytes] = []
    size = 0
    while size < limit:
        chunk = await request.content.readany()
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)[:limit]


def _answer(status: int, **fields: Any) -> tuple[int, bytes]:
    return status, json.dumps(fields, separators=(",", ":")).encode()


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
    ) -> None:
        self._engine = engine
        self._targets = targets
        self._secrets = {name: value.encode() for name, value in (secrets_by_client or {}).items()}
        self._max_body = max_body
        self._relay = relay
        # With a relay the token is shared by all instances and read in ready().
        self._token: str | None = None if relay else secrets.token_urlsafe(24)
        self._relaying = False
        self._ready_lock = asyncio.Lock()
        self._waiting: dict[tuple[str, str], TaskHandle] = {}
        # Early callbacks, and whether each was counted as unknown (relayed ones are not).
        self._early: OrderedDict[tuple[str, str], tuple[Any, bool, float]] = OrderedDict()
        self._settled: OrderedDict[tuple[str, str], None] = OrderedDict()
        self._runner: web.AppRunner | None = None
        self.public_url: str | None = None
        self.stats = WebhookStats()

    def __repr__(self) -> str:
        return f"<WebhookReceiver public_url={self.public_url!r} waiting={len(self._waiting)}>"

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
        """The callback URL for one client; needs ``listen()`` or ``public_url`` set first."""
        if self.public_url is None:
            raise ConfigurationError(
                "webhook=True needs a receiver: await session.webhooks.listen(host, port), "
                "or set session.webhooks.public_url to where your app mounts it"
            )
        if self._token is None:
            raise ConfigurationError("the shared webhook token is not loaded: await session.webhooks.ready()")
        return f"{self.public_url.rstrip('/')}/{client}/{self._token}"

    async def listen(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Serve the receiver on its own aiohttp server; sets ``public_url`` if unset."""
        if self._runner is not None:
            raise ConfigurationError("the webhook receiver is already listening")
        await self.ready()
        runner = web.AppRunner(self.app(), access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, host, port)
        await site.start()
        self._runner = runner
        bound_host, bound_port = runner.addresses[0][:2]
        url = f"http://{bound_host}:{bound_port}"
        if self.public_url is None:
            self.public_url = url
        log.info("webhook receiver listening on %s", url)
        return url

    async def close(self) -> None:
        """Stop the server started by ``listen()`` (mounted apps are their owner's)."""
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    # Mounting in an app of the user's own.

    def app(self) -> web.Application:
        """An aiohttp application answering ``POST /{client}/{token}``; mount it with add_subapp."""
        app = web.Application(client_max_size=self._max_body + 1)
        app.router.add_post("/{client}/{token}", self.aiohttp_handler)
        return app

    async def aiohttp_handler(self, request: web.Request) -> web.Response:
        """An aiohttp route handler; the route must capture ``{client}`` and ``{token}``."""
        if request.content_length is not None and request.content_length > self._max_body:
            self.stats.received += 1
            self.stats.too_large += 1
            status, body = _answer(413, error="body too large")
        else:
            raw = await _read_upto(request, self._max_body + 1)
            status, body = await self.handle(
                request.match_info["client"], raw, request.headers, token=request.match_info.get("token")
            )
        return web.Response(status=status, body=body, content_type="application/json")

    async def handle(
        self, client: str, body: bytes, headers: Mapping[str, str], *, token: str | None = None
    ) -> tuple[int, bytes]:
        """Framework-neutral: take one callback, return ``(status, json body)`` to answer with."""
        self.stats.received += 1
        target = self._targets.get(client)
        if target is None or not target.codec.has_webhooks:
            self.stats.rejected += 1
            return _answer(404, error="unknown client")
        try:
            await self.ready()
        except BackendUnavailableError as error:
            self.stats.relay_errors += 1
            log.warning("%s callback refused for now: %s", client, error)
            return _answer(503, error="shared backend unavailable")
        if not hmac.compare_digest((token or "").encode(), (self._token or "").encode()):
            self.stats.rejected += 1
            log.warning("%s callback with a wrong token refused", client)
            return _answer(401, error="unknown token")
        if len(body) > self._max_body:
            self.stats.too_large += 1
            return _answer(413, error="body too large")
        if not self._signature_ok(target, body, headers):
            self.stats.rejected += 1
            log.warning("%s callback with a bad signature refused", client)
            return _answer(401, error="bad signature")
        try:
            payload = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            self.stats.malformed += 1
            return _answer(400, error="body is not JSON")
        task_id = target.codec.task_id_of(payload)
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
            return await self._pass_on(self._relay, client, task_id, payload)
        return self._unknown(client, task_id, payload)

    def _signature_ok(self, target: Target, body: bytes, headers: Mapping[str, str]) -> bool:
        secret = self._secrets.get(target.name)
        header = target.codec.signature_header
        if secret is None or header is None:
            return True
        given = (headers.get(header) or "").strip().lower().removeprefix("sha256=")
        expected = hmac.new(secret, body, hashlib.sha256).hexdigest()
        return hmac.compare_digest(given.encode(), expected.encode())

    def _unknown(self, client: str, task_id: str, payload: Any) -> tuple[int, bytes]:
        """Keep it briefly: its handle may not exist yet because the create's answer is still on its way."""
        self.stats.unknown += 1
        self._keep_early((client, task_id), payload, counted=True)
        return _answer(200, ok=True, known=False)

    def _keep_early(self, key: tuple[str, str], payload: Any, *, counted: bool) -> None:
        """Keep a callback for a handle that may appear soon: at most EARLY_ARRIVALS, for EARLY_TTL s."""
        now = time.monotonic()
        self._early.pop(key, None)
        self._early[key] = (payload, counted, now)
        while self._early:
            oldest_key, (_, _, kept_at) = next(iter(self._early.items()))
            if len(self._early) <= EARLY_ARRIVALS and kept_at > now - EARLY_TTL:
                break
            del self._early[oldest_key]

    async def _pass_on(
        self, relay: WebhookRelay, client: str, task_id: str, payload: Any
    ) -> tuple[int, bytes]:
        """Not ours: a duplicate if some instance finished it, else publish it to the others.

        Kept here too, before any await, in case this instance's own create answer is late.
        """
        key = (client, task_id)
        self._keep_early(key, payload, counted=False)
        try:
            if await relay.settled(client, task_id):
                self._early.pop(key, None)
                self.stats.duplicates += 1
                return _answer(200, ok=True, duplicate=True)
            await relay.publish(client, task_id, payload)
        except BackendUnavailableError as error:
            self.stats.relay_errors += 1
            log.warning("%s callback for %s not relayed: %s", client, task_id, error)
            return _answer(503, error="shared backend unavailable")
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
            self._keep_early(key, payload, counted=False)

    def _apply(self, target: Target, handle: TaskHandle, payload: Any) -> tuple[int, bytes]:
        if handle.done():
            self.stats.duplicates += 1
            return _answer(200, ok=True, duplicate=True)
        try:
            snapshot = target.codec.read_callback(handle.task_id, handle.model, payload)
        except ImageGenError as error:
            self.stats.malformed += 1
            log.warning("%s callback for %s unreadable: %s", target.name, handle.task_id, error)
            return _answer(400, error="unreadable callback")
        if self._engine.settle_from_callback(target, handle, snapshot):
            self.stats.resolved += 1
        else:
            self.stats.progress += 1
        return _answer(200, ok=True)

    # Engine side.

    def expect(self, target: Target, handle: TaskHandle) -> None:
        """Route this task's callbacks to ``handle``; apply one that already came."""
        key = (target.name, handle.task_id)
        self._waiting[key] = handle
        handle.add_done_callback(lambda done: self._forget(key, done))
        early = self._early.pop(key, None)
        if early is not None:
            payload, counted, _ = early
            if counted:
                self.stats.unknown -= 1
            self._apply(target, handle, payload)

    def _forget(self, key: tuple[str, str], handle: TaskHandle) -> None:
        """The handle is done (by callback, poll, cancel or deadline): later callbacks are duplicates."""
        if self._waiting.get(key) is handle:
            del self._waiting[key]
        self._settled[key] = None
        while len(self._settled) > REMEMBERED:
            self._settled.popitem(last=False)
        if self._relay is not None:
            self._relay.mark_settled(*key)
