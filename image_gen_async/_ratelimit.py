"""Create-rate limiting: one limiter per provider client and API key, shared by the session.

Why not a plain token bucket: a provider that counts creates per sliding second (dh3:
QPS 3) answers any burst above the limit with 429, and arrival jitter bunches
requests that were sent evenly. So two rules hold together, for one waiter at a time
in arrival order (an ``asyncio.Lock`` is first come, first served):

- pacing: one create every ``(1 + margin) / rate`` seconds on a fixed schedule, so a
  steady stream runs just under the limit;
- a sliding window on the moments creates actually went out: never more than ``rate``
  of them within ``1 + margin`` seconds. Each release hands out a ``Ticket``; the engine
  stamps it when the request's headers are written, so time spent waiting for a pooled
  connection or a busy event loop after release counts as it would at the server. The
  window keeps any catch-up within the limit and leaves ``margin`` seconds for jitter
  on the wire.

``Limiter`` is what the engine needs from any limiter; ``RateLimiter`` is the
in-process one, ``_redis_limit.RedisLimiter`` shares one schedule among processes.
"""

from __future__ import annotations

import asyncio
import heapq
import math
from collections import deque
from typing import Protocol

# How far a 429 cuts the pace, the floor it never goes below, and how fast it recovers.
SLOWDOWN = 0.5
FLOOR = 0.1
RECOVERY = 1.05


class Ticket:
    """One release: when the create went out (the release time until it is stamped ``sent``)."""

    __slots__ = ("at",)

    def __init__(self, at: float) -> None:
        self.at = at

    def sent(self) -> None:
        """The request's headers are being written now."""
        self.at = max(self.at, asyncio.get_running_loop().time())


def slot_interval(rate: float, margin: float) -> float:
    """Seconds between two releases at ``rate``: a ``margin`` under the limit, for jitter."""
    return (1.0 + margin) / rate


class Limiter(Protocol):
    """What the engine asks of a create limiter, wherever its schedule lives."""

    @property
    def rate(self) -> float | None:
        """The configured creates per second (``None``: unpaced)."""

    @property
    def current_rate(self) -> float | None:
        """The rate in force now: lower than ``rate`` for a while after a 429."""

    async def acquire(self) -> Ticket:
        """Wait for this caller's turn; the ticket is stamped ``sent()`` as the request goes out."""

    def penalize(self, retry_after: float | None) -> None:
        """A 429 came back: slow down, and hold every create until ``retry_after`` passed."""

    def reward(self) -> None:
        """A create went through: creep back towards ``rate``."""


class RateLimiter:
    """Lets callers through at most ``rate`` per second (``None``: unpaced, but 429s pause it)."""

    __slots__ = ("_factor", "_lock", "_margin", "_next_slot", "_released", "rate")

    def __init__(self, rate: float | None, *, margin: float = 0.025) -> None:
        if rate is not None and rate <= 0:
            raise ValueError("rate must be positive (or None for no limit)")
        self.rate = rate
        self._margin = margin
        self._factor = 1.0
        self._next_slot = 0.0
        self._released: deque[Ticket] = deque()
        self._lock = asyncio.Lock()

    @property
    def current_rate(self) -> float | None:
        """The rate in force now: lower than ``rate`` for a while after a 429."""
        return None if self.rate is None else self.rate * self._factor

    async def acquire(self) -> Ticket:
        """Wait for this caller's turn; stamp the ticket ``sent()`` as the request goes out."""
        loop = asyncio.get_running_loop()
        async with self._lock:
            while True:
                now = loop.time()
                wait = self._wait_at(now)
                if wait <= 0:
                    break
                await asyncio.sleep(wait)
            return self._release(now)

    def _wait_at(self, now: float) -> float:
        """Seconds until the next release is allowed by both pacing and the window."""
        wait = self._next_slot - now
        rate = self.current_rate
        if rate is not None:
            window = 1.0 + self._margin
            allowed = max(1, math.floor(rate))
            released = self._released
            while released and released[0].at <= now - window:
                released.popleft()
            if len(released) >= allowed:
                # Stamps arrive slightly out of order: find the one whose expiry frees a place.
                freeing = heapq.nsmallest(len(released) - allowed + 1, (t.at for t in released))[-1]
                wait = max(wait, freeing + window - now)
        return wait

    def _release(self, now: float) -> Ticket:
        ticket = Ticket(now)
        rate = self.current_rate
        if rate is not None:
            # The schedule advances from the slot, not from now, so a slightly late wake-up
            # does not lower the long-run rate; the window above bounds any catch-up.
            self._next_slot = max(self._next_slot, now - self._margin) + slot_interval(rate, self._margin)
            self._released.append(ticket)
        return ticket

    def wait_time(self) -> float:
        """Seconds until the next caller could be released (0 when one could go now)."""
        return max(0.0, self._wait_at(asyncio.get_running_loop().time()))

    def penalize(self, retry_after: float | None) -> None:
        """A 429 came back: slow down, and let nothing through before ``retry_after`` passed."""
        self._factor = max(FLOOR, self._factor * SLOWDOWN)
        if retry_after:
            now = asyncio.get_running_loop().time()
            self._next_slot = max(self._next_slot, now + retry_after)

    def reward(self) -> None:
        """A create went through: creep back towards the configured rate."""
        self._factor = min(1.0, self._factor * RECOVERY)
