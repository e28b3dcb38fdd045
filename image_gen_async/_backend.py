"""Where a session's limiters live and how callbacks reach other processes: the backend protocol.

A backend makes the create limiter for each (client, key fingerprint) and, when it
spans processes, relays webhook callbacks between them. ``LocalBackend`` (the
default) keeps everything in this process; ``RedisBackend`` shares both through Redis.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from ._capacity import CapacityGate, LocalGate
from ._ratelimit import Limiter, RateLimiter

# (client, task id, callback JSON): a callback another instance received and verified.
Deliver = Callable[[str, str, Any], None]


class WebhookRelay(Protocol):
    """Carries callbacks between the instances that share one callback token."""

    async def token(self) -> str:
        """The callback-URL token every instance uses (so any of them can take any callback)."""

    async def subscribe(self, deliver: Deliver) -> None:
        """Hand callbacks published by other instances to ``deliver``; returns once listening."""

    async def publish(self, client: str, task_id: str, payload: Any) -> None:
        """Pass a verified callback for a task this instance does not hold to the others."""

    async def settled(self, client: str, task_id: str) -> bool:
        """True when some instance already finished this task's handle (a later copy is a duplicate)."""

    def mark_settled(self, client: str, task_id: str) -> None:
        """Record, in the background, that this instance finished the task's handle."""


class LimiterBackend(Protocol):
    """Makes limiters and, when it spans processes, the webhook relay; the session closes it."""

    def limiter(
        self, client: str, key_fingerprint: str, rate: float | None, margin: float, max_pause: float
    ) -> Limiter:
        """The create limiter for one client and API key (``key_fingerprint``: a hash, never the key).

        ``max_pause`` caps how long one ``Retry-After`` may hold the schedule.
        """

    def gate(
        self, account: str, key_fingerprint: str, limit: int | None, *, pause: float, max_pause: float
    ) -> CapacityGate:
        """The capacity gate for one provider account and API key (``limit``: configured, or None).

        ``pause`` (doubling up to ``max_pause``) is the wait after a refusal while nothing of
        ours is in flight: others hold the key's capacity.
        """

    def webhook_relay(self) -> WebhookRelay | None:
        """The relay between instances, or None when callbacks stay in this process."""

    async def close(self) -> None:
        """Release connections and stop background tasks."""


class LocalBackend:
    """Limits and callbacks within this process only: the default."""

    def limiter(
        self, client: str, key_fingerprint: str, rate: float | None, margin: float, max_pause: float
    ) -> Limiter:
        """An in-process ``RateLimiter``."""
        return RateLimiter(rate, margin=margin, max_pause=max_pause)

    def gate(
        self, account: str, key_fingerprint: str, limit: int | None, *, pause: float, max_pause: float
    ) -> CapacityGate:
        """An in-process ``LocalGate``."""
        return LocalGate(account, limit, pause=pause, max_pause=max_pause)

    def webhook_relay(self) -> WebhookRelay | None:
        """No relay: a callback must reach the session that submitted the job."""
        return None

    async def close(self) -> None:
        """Nothing to release."""
