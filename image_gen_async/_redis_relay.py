"""RedisRelay: webhook fan-in, so a callback that reaches any worker resolves the handle on its owner.

Every instance uses one callback token (``webhook_token=``, or one generated once and
kept in Redis with ``SET NX``), so the provider may call any of them. A worker that
takes a verified callback for a task it does not hold publishes it on one pub/sub
channel; every worker listens (one subscriber per session, started before its first
webhook create, so nothing it is owed can pass unheard) and the one holding the handle
applies it; the others keep it briefly in case their own create's answer is still on its
way. Exactly once: a handle resolves once (a local guarantee), and the worker that
finishes it sets a marker per (client, task) with ``SET NX`` and a TTL, so any worker
answers later copies as duplicates instead of passing them on.

Pub/sub is not durable: a message sent while a subscriber is reconnecting is lost, and
the handle's polling safety net finds the result. Anyone who can write to this Redis can
publish callbacks: it is trusted like the token it stores.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.client import PubSub

from . import _json
from ._backend import Deliver
from ._redis_limit import REDIS_ERRORS, unavailable

log = logging.getLogger("image_gen_async")

# How long a finished task's marker stays (seconds): longer than any provider's retries.
SETTLED_TTL = 6 * 3600
# Seconds to wait for the subscription to be confirmed, and between reconnect attempts.
SUBSCRIBE_TIMEOUT = 5.0
RECONNECT_PAUSE = 1.0


class RedisRelay:
    """The ``WebhookRelay`` on Redis pub/sub, with settled markers and the shared token."""

    def __init__(self, redis: Redis, namespace: str, token: str | None = None) -> None:
        self._redis = redis
        self._channel = f"{namespace}:webhooks"
        self._token_key = f"{namespace}:webhook-token"
        self._settled_prefix = f"{namespace}:settled"
        self._token = token
        # Who published a message, so an instance skips its own.
        self._origin = secrets.token_hex(8)
        self._pubsub: PubSub | None = None
        self._listener: asyncio.Task[None] | None = None
        self._marks: set[asyncio.Task[None]] = set()

    async def token(self) -> str:
        """The configured token, else the one stored in Redis (the first instance generates it)."""
        if self._token is None:
            try:
                await self._redis.set(self._token_key, secrets.token_urlsafe(24), nx=True)
                stored = await self._redis.get(self._token_key)
            except REDIS_ERRORS as error:
                raise unavailable("webhook token", error) from error
            if stored is None:
                raise unavailable("webhook token", LookupError(f"{self._token_key} vanished"))
            self._token = stored.decode() if isinstance(stored, bytes) else str(stored)
        return self._token

    async def subscribe(self, deliver: Deliver) -> None:
        """Start the one listener of this instance; returns once Redis confirmed the subscription."""
        if self._listener is not None:
            return
        pubsub = self._redis.pubsub()
        try:
            await pubsub.subscribe(self._channel)
            # Wait for the confirmation: from then on no publish can pass unheard.
            async with asyncio.timeout(SUBSCRIBE_TIMEOUT):
                while await pubsub.get_message(timeout=SUBSCRIBE_TIMEOUT) is None:
                    pass
        except (*REDIS_ERRORS, TimeoutError) as error:
            await pubsub.aclose()  # type: ignore[no-untyped-call]  # unannotated in redis-py
            raise unavailable("webhook relay", error) from error
        self._pubsub = pubsub
        self._listener = asyncio.get_running_loop().create_task(
            self._listen(pubsub, deliver), name="image_gen_async webhook relay"
        )

    async def _listen(self, pubsub: PubSub, deliver: Deliver) -> None:
        lost = False  # warn once per outage; redis-py reconnects and subscribes again
        while True:
            try:
                message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=None)
            except REDIS_ERRORS as error:
                if not lost:
                    log.warning("webhook relay: Redis connection lost (%s); reconnecting", error)
                lost = True
                await asyncio.sleep(RECONNECT_PAUSE)
                continue
            if lost:
                log.warning("webhook relay: listening again")
                lost = False
            if message is not None and message.get("type") == "message":
                try:
                    self._receive(message["data"], deliver)
                except Exception:  # one bad message must not end the relay for this instance
                    log.exception("webhook relay: a relayed callback could not be applied")

    def _receive(self, data: Any, deliver: Deliver) -> None:
        try:
            fields = _json.loads(data)  # deep nesting included: a ValueError
            origin, client, task_id, payload = fields["o"], fields["c"], fields["t"], fields["p"]
        except (ValueError, TypeError, KeyError) as error:
            log.warning("webhook relay: unreadable message ignored: %s", error)
            return
        if origin != self._origin:
            deliver(str(client), str(task_id), payload)

    async def publish(self, client: str, task_id: str, payload: Any) -> None:
        """Pass a verified callback to every other instance; ``ValueError`` if it cannot be encoded."""
        message = _json.dumps({"o": self._origin, "c": client, "t": task_id, "p": payload})
        try:
            await self._redis.publish(self._channel, message)
        except REDIS_ERRORS as error:
            raise unavailable("webhook relay", error) from error

    async def settled(self, client: str, task_id: str) -> bool:
        """True when an instance already finished this task's handle."""
        try:
            return bool(await self._redis.exists(self._settled_key(client, task_id)))
        except REDIS_ERRORS as error:
            raise unavailable("webhook relay", error) from error

    def mark_settled(self, client: str, task_id: str) -> None:
        """Set the task's marker in the background (``SET NX``: the first finish is the one kept)."""
        task = asyncio.get_running_loop().create_task(self._mark(self._settled_key(client, task_id)))
        self._marks.add(task)
        task.add_done_callback(self._marks.discard)

    async def _mark(self, key: str) -> None:
        try:
            await self._redis.set(key, "1", nx=True, ex=SETTLED_TTL)
        except REDIS_ERRORS as error:
            log.warning("webhook relay: could not mark a task settled: %s", error)

    def _settled_key(self, client: str, task_id: str) -> str:
        return f"{self._settled_prefix}:{client}:{task_id}"

    async def close(self) -> None:
        """Stop listening and let markers on their way reach Redis."""
        listener, self._listener = self._listener, None
        if listener is not None:
            listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await listener
        pubsub, self._pubsub = self._pubsub, None
        if pubsub is not None:
            with contextlib.suppress(*REDIS_ERRORS):
                await pubsub.aclose()  # type: ignore[no-untyped-call]  # unannotated in redis-py
        await asyncio.gather(*self._marks, return_exceptions=True)
