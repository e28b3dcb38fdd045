"""Create-rate limiting: one limiter per provider client and API key, shared by the session.

Why not a plain token bucket: a provider that counts creates per sliding second (dh3:
QPS 3) answers any burst above the limit with 429, and arrival jitter bunches
requests that were sent evenly. So two rules hold together, for one waiter at a time
in arrival order (an ``asyncio.Lock`` is first come, first served):

- pacing: one create every ``(1 + margin) / rate`` seconds on a fixed schedule, so a
  steady stream runs just under the limit;
- a sliding window on the moments creates actually went out: never more than ``rate``
  of them within ``1 + margin`` seconds. Each release hands out a ``Ticket``; the engine
  stamps it when the request has its connection and starts out, so time spent waiting for
  a pooled connection or a busy event loop after release counts as it would at the server. The
  window keeps any catch-up within the limit and leaves ``margin`` seconds for jitter
  on the wire.

``Limiter`` is what the engine needs from any limiter; ``RateLimiter`` is the
in-process one, ``_redis_limit.RedisLimiter`` shares one schedule among processes.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import math
from collections import deque
from typing import Protocol

# How far a 429 cuts the pace, the floor it never goes below, and how fast it recovers.
SLOWDOWN = 0.5
FLOOR = 0.1
RECOVERY = 1.05


class Ticket:
    """One release. Until the request has a connection it is unsent and blocks the window."""

    __slots__ = ("_limiter", "at")

    def __init__(self, limiter: RateLimiter | None) -> None:
        self._limiter = limiter
        self.at: float | None = None

    @property
    def was_sent(self) -> bool:
        """True once the request's headers went out: the provider may have seen it."""
        return self.at is not None

    def sent(self) -> None:
        """The request is going out now: it has its connection."""
        if self.at is None:
            self.at = asyncio.get_running_loop().time()
            if self._limiter is not None:
                self._limiter._changed.set()

    def abandon(self) -> None:
        """The request never went out (no connection): give its place in the window back."""
        if self.at is None and self._limiter is not None:
            self._limiter._forget(self)


def slot_interval(rate: float, margin: float) -> float:
    """Seconds between two releases at ``rate``: a ``margin`` under the limit, for jitter."""
    return (1.0 + margin) / rate


class Limiter(Protocol):
    """What the engine asks of a create limiter, wherever its schedule lives.

    A limiter may also offer ``ready() -> Ticket | None``: a ticket at once when nobody
    need wait, which spares the engine a coroutine per create; without it, ``acquire``.
    """

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

    __slots__ = ("_changed", "_factor", "_lock", "_margin", "_max_pause", "_next_slot", "_released", "rate")

    def __init__(self, rate: float | None, *, margin: float = 0.025, max_pause: float = 60.0) -> None:
        if rate is not None and rate <= 0:
            raise ValueError("rate must be positive (or None for no limit)")
        self.rate = rate
        self._margin = margin
        self._max_pause = max_pause
        self._changed = asyncio.Event()
        self._factor = 1.0
        self._next_slot = 0.0
        self._released: deque[Ticket] = deque()
        self._lock = asyncio.Lock()

    @property
    def current_rate(self) -> float | None:
        """The rate in force now: lower than ``rate`` for a while after a 429."""
        return None if self.rate is None else self.rate * self._factor

    def ready(self) -> Ticket | None:
        """A ticket at once when unpaced and not paused by a 429: there is no queue to keep."""
        if (
            self.rate is None
            and not self._lock.locked()
            and self._next_slot <= asyncio.get_running_loop().time()
        ):
            return Ticket(None)
        return None

    async def acquire(self) -> Ticket:
        """Wait for this caller's turn; stamp the ticket ``sent()`` as the request goes out."""
        ticket = self.ready()
        if ticket is not None:
            return ticket
        loop = asyncio.get_running_loop()
        async with self._lock:
            while True:
                wait = self._wait_at(loop.time())
                if wait <= 0:
                    break
                # Wake when the wait is over, or earlier when an unsent ticket goes out or is dropped.
                self._changed.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._changed.wait(), None if math.isinf(wait) else wait)
            return self._release(loop.time())

    def _wait_at(self, now: float) -> float:
        """Seconds until pacing and the window both allow a release (inf: until a ticket is sent)."""
        wait = self._next_slot - now
        rate = self.current_rate
        if rate is not None:
            window = 1.0 + self._margin
            allowed = max(1, math.floor(rate))
            released = self._released
            while released and released[0].at is not None and released[0].at <= now - window:
                released.popleft()
            if len(released) >= allowed:
                # An unsent ticket counts as sent in the future: it holds its place until it goes out.
                times = (math.inf if t.at is None else t.at for t in released)
                freeing = heapq.nsmallest(len(released) - allowed + 1, times)[-1]
                wait = max(wait, freeing + window - now)
        return wait

    def _release(self, now: float) -> Ticket:
        rate = self.current_rate
        if rate is None:
            return Ticket(None)
        ticket = Ticket(self)
        # The schedule advances from the slot, not from now, so a slightly late wake-up
        # does not lower the long-run rate; the window above bounds any catch-up.
        self._next_slot = max(self._next_slot, now - self._margin) + slot_interval(rate, self._margin)
        self._released.append(ticket)
        return ticket

    def _forget(self, ticket: Ticket) -> None:
        with contextlib.suppress(ValueError):
            self._released.remove(ticket)
        self._changed.set()

    def wait_time(self) -> float:
        """Seconds until the next caller could be released (0 when one could go now)."""
        return max(0.0, self._wait_at(asyncio.get_running_loop().time()))

    def penalize(self, retry_after: float | None) -> None:
        """A 429 came back: slow down, and let nothing through before ``retry_after`` passed."""
        self._factor = max(FLOOR, self._factor * SLOWDOWN)
        if retry_after and math.isfinite(retry_after):
            # A server's advice is followed, but no single answer may stall the session for long.
            now = asyncio.get_running_loop().time()
            self._next_slot = max(self._next_slot, now + min(retry_after, self._max_pause))

    def reward(self) -> None:
        """A create went through: creep back towards the configured rate."""
        self._factor = min(1.0, self._factor * RECOVERY)
