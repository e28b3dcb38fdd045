"""RedisLimiter: one create schedule for a provider+key, shared by every process on one Redis.

Reservation-style GCRA in one Lua script, on Redis' own clock (``TIME``) so the hosts'
clock skew does not matter: each call atomically takes the next slot,
``slot = max(tat, now)``, moves ``tat`` one interval on (``(1 + margin) / rate``, the
in-process limiter's pacing, divided by the shared pace ``factor``) and answers how long
to sleep until ``slot``. The caller sleeps exactly that long: Redis is never polled. A
local FIFO lock keeps one reservation per process outstanding, so this process sends in
arrival order and each process gets the next free slot in turn: no process starves.
A waiter cancelled while it sleeps leaves its slot unused: never a create too many.
Only the schedule is shared, not the moments requests actually left: a send that a busy
event loop delays eats into ``margin``, the jitter budget, as it does in one process.

What a 429 means across processes: the provider saw more from this key than it allows,
whoever sent it (another tool on the same key, or jitter that bunched arrivals on the
wire). So every process holds back: the shared schedule is pushed past ``Retry-After``
and the shared ``factor`` halves (down to ``FLOOR``), creeping back by ``RECOVERY`` per
create that went through in any process; each process reports its successes with its
next reservation, so this costs no extra round trip. 429s within ``PENALTY_DEBOUNCE`` of
the last penalty are the same overload seen by several processes: they push the
schedule back but halve the pace only once. Slots already reserved stand.

Redis unreachable: ``BackendUnavailableError`` and nothing is sent; or, with a
``fallback_share``, a local ``RateLimiter`` at ``rate * share`` (a warning once per
outage), trying Redis again every ``RETRY_REDIS_AFTER`` seconds. Never unlimited.
"""

from __future__ import annotations

import asyncio
import logging
import math

from redis.asyncio import Redis
from redis.exceptions import RedisError

from ._ratelimit import FLOOR, RECOVERY, SLOWDOWN, RateLimiter, Ticket, slot_interval
from .errors import BackendUnavailableError

log = logging.getLogger("image_gen_async")

# Errors that mean "Redis did not answer": the fallback (or BackendUnavailableError) applies.
REDIS_ERRORS = (RedisError, OSError)
# An idle schedule is forgotten this long after its last reserved slot.
IDLE_TTL_MS = 60_000
# 429s closer together than this (seconds) are one overload: the pace is halved once.
PENALTY_DEBOUNCE = 1.0
# While falling back, how often (seconds) to try Redis again.
RETRY_REDIS_AFTER = 5.0

# KEYS[1] the schedule; ARGV interval at full pace, successes to credit, RECOVERY, idle TTL ms.
# Floats are written with %.6f: Redis would otherwise round them to 14 digits.
RESERVE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local state = redis.call('HMGET', KEYS[1], 'tat', 'factor')
local tat = tonumber(state[1]) or now
local factor = math.min(1, (tonumber(state[2]) or 1) * math.pow(tonumber(ARGV[3]), tonumber(ARGV[2])))
local slot = math.max(tat, now)
tat = slot + tonumber(ARGV[1]) / factor
redis.call('HSET', KEYS[1], 'tat', string.format('%.6f', tat), 'factor', string.format('%.6f', factor))
redis.call('PEXPIRE', KEYS[1], math.ceil((tat - now) * 1000) + tonumber(ARGV[4]))
return {string.format('%.6f', slot - now), string.format('%.6f', factor)}
"""

# KEYS[1] the schedule; ARGV retry-after s, SLOWDOWN, FLOOR, PENALTY_DEBOUNCE, idle TTL ms.
PENALIZE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local state = redis.call('HMGET', KEYS[1], 'tat', 'factor', 'penalized')
local tat = math.max(tonumber(state[1]) or now, now + tonumber(ARGV[1]))
local factor = tonumber(state[2]) or 1
local penalized = tonumber(state[3]) or 0
if now - penalized >= tonumber(ARGV[4]) then
  factor = math.max(tonumber(ARGV[3]), factor * tonumber(ARGV[2]))
  penalized = now
end
redis.call('HSET', KEYS[1], 'tat', string.format('%.6f', tat), 'factor', string.format('%.6f', factor),
  'penalized', string.format('%.6f', penalized))
redis.call('PEXPIRE', KEYS[1], math.ceil((tat - now) * 1000) + tonumber(ARGV[5]))
return string.format('%.6f', factor)
"""


def unavailable(what: str, error: BaseException) -> BackendUnavailableError:
    """The loud failure: Redis did not answer, so nothing is sent."""
    return BackendUnavailableError(f"{what}: Redis did not answer ({error}); nothing was sent")


class RedisLimiter:
    """The ``Limiter`` whose schedule lives in Redis under ``key``, shared by every process."""

    def __init__(
        self,
        redis: Redis,
        key: str,
        rate: float,
        *,
        margin: float,
        max_pause: float = 60.0,
        name: str,
        fallback_share: float | None = None,
    ) -> None:
        self.rate = rate
        self.key = key
        self._name = name
        self._interval = slot_interval(rate, margin)
        self._max_pause = max_pause
        self._reserve = redis.register_script(RESERVE)
        self._penalize = redis.register_script(PENALIZE)
        self._fallback = (
            None
            if fallback_share is None
            else RateLimiter(rate * fallback_share, margin=margin, max_pause=max_pause)
        )
        self._degraded = False
        self._retry_redis_at = 0.0
        self._factor = 1.0
        self._successes = 0
        self._lock = asyncio.Lock()
        self._penalties: set[asyncio.Task[None]] = set()

    def __repr__(self) -> str:
        return f"<RedisLimiter {self._name} rate={self.rate} current={self.current_rate}>"

    @property
    def current_rate(self) -> float | None:
        """The shared rate as last seen in Redis (the local share while Redis is away)."""
        if self._degraded and self._fallback is not None:
            return self._fallback.current_rate
        return self.rate * self._factor

    async def acquire(self) -> Ticket:
        """Reserve the next shared slot and sleep until it comes."""
        loop = asyncio.get_running_loop()
        async with self._lock:
            if self._penalties:  # a 429 this process saw is in Redis before it reserves again
                await asyncio.gather(*self._penalties)
            if self._degraded and loop.time() < self._retry_redis_at:
                return await self._without_redis(None)
            try:
                delay = await self._take_slot()
            except REDIS_ERRORS as error:
                return await self._without_redis(error)
            if self._degraded and self._fallback is not None:
                # Back on the shared schedule: this process's last local slot still counts.
                self._degraded = False
                delay = max(delay, self._fallback.wait_time())
                log.warning("%s: Redis answers again; back on the shared limit", self._name)
            await asyncio.sleep(delay)
            # A slot taken but never used (no connection) is simply lost: never a create too many.
            return Ticket(None)

    async def _take_slot(self) -> float:
        successes, self._successes = self._successes, 0
        try:
            delay, factor = await self._reserve(
                keys=[self.key], args=[self._interval, successes, RECOVERY, IDLE_TTL_MS]
            )
        except BaseException:
            self._successes += successes
            raise
        self._factor = float(factor)
        return float(delay)

    async def _without_redis(self, error: BaseException | None) -> Ticket:
        if self._fallback is None:
            assert error is not None  # only a fallback ever skips Redis
            raise unavailable(f"{self._name} create limit", error) from error
        if error is not None:
            if not self._degraded:
                log.warning(
                    "%s: Redis did not answer (%s); pacing this process at %.3g/s until it does",
                    self._name,
                    error,
                    self._fallback.rate,
                )
            self._degraded = True
            self._retry_redis_at = asyncio.get_running_loop().time() + RETRY_REDIS_AFTER
        return await self._fallback.acquire()

    def penalize(self, retry_after: float | None) -> None:
        """A 429: push the shared schedule past ``retry_after`` and slow everybody down."""
        if self._degraded and self._fallback is not None:
            self._fallback.penalize(retry_after)
            return
        # A server's advice is followed, but no single answer may stall every process for long.
        pause = min(retry_after, self._max_pause) if retry_after and math.isfinite(retry_after) else 0.0
        task = asyncio.get_running_loop().create_task(self._push_back(pause))
        self._penalties.add(task)
        task.add_done_callback(self._penalties.discard)

    async def _push_back(self, retry_after: float) -> None:
        try:
            factor = await self._penalize(
                keys=[self.key], args=[retry_after, SLOWDOWN, FLOOR, PENALTY_DEBOUNCE, IDLE_TTL_MS]
            )
        except REDIS_ERRORS as error:
            log.warning("%s: could not share a 429 through Redis: %s", self._name, error)
            return
        self._factor = float(factor)

    def reward(self) -> None:
        """A create went through: credited to the shared pace with the next reservation."""
        self._successes += 1
        if self._fallback is not None:
            self._fallback.reward()

    async def close(self) -> None:
        """Let penalties on their way reach Redis."""
        await asyncio.gather(*self._penalties, return_exceptions=True)
