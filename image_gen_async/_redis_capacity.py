"""RedisGate: one key's capacity window and slots shared by every process on one Redis.

A counted semaphore held by Lua on Redis' own clock (``TIME``, so the hosts' clock skew
does not matter). Under ``{namespace}:capacity:{account}:{fingerprint}``:

- the key itself, a hash: the shared window and how it is learned (the ``LocalGate``
  rules: ``INITIAL_WINDOW``, one more per ``SLOW_START`` accepted creates until the first refusal, a
  refusal shrinks it to what is in flight in every process, or ``activeTasks``; then one
  more per ``GROWTH_PER_WINDOW`` windows of accepted creates), the idle pause (``pause``
  doubling up to ``max_pause``; a longer ``Retry-After`` is followed, up to ``max_pause``) and a
  count of refusals;
- ``:leases``, a sorted set: one member per slot, scored by its lease's expiry. Each
  process renews the leases it holds every ``lease / 3`` in one script call; a crashed
  process's slots expire after ``lease``, so its places come back by themselves;
- ``:waiting``, a sorted set: the processes that wait for a place (see fairness below);
- ``:released``, a pub/sub channel: a message per batch of released places.

Acquire is one script: drop expired leases, take places while fewer than the window are
held, else answer "full". Release is ``ZREM`` (batched with accepted creates, refusals
and renewals into one script call, always before this process asks for places again, so
a refusal's shrink is in Redis before its next try).

Waiting: FIFO within the process (a local queue served by one task, which asks for as
many places as it has waiters in one call). Across processes a waiting process does not
poll: it waits for a message on ``:released`` (sent when places are freed or the window
grows), or for a short backoff (``FIRST_BACKOFF`` doubling to ``MAX_BACKOFF``), which
covers what sends no message: an expired lease, a message lost while reconnecting, the
end of an idle pause. Fairness across processes, best effort: a process that waits is
listed in ``:waiting`` (refreshed with each try; taken off once it waits no more, or after
``WAITER_TTL`` if it died); while others
wait, a process takes no more than its share (``ceil(window / waiting processes)``),
so a process that came late is not starved by one that holds every place and keeps
releasing and retaking them. Shares cover the window (``ceil``), so a free place is
always someone's to take.

Redis unreachable: ``BackendUnavailableError`` and nothing is sent; or, with a
``fallback_share``, a ``LocalGate`` of ``limit * share`` places (the last seen shared
window when the limit is learned; at least 1) with a warning once per outage, trying
Redis again every ``RETRY_REDIS_AFTER`` seconds. Slots taken from the local gate are
given back to it (they are not counted in Redis after it answers again). Leases held when
Redis went away are renewed (re-added) once it answers, so tasks that kept running (even
through a restart that lost the data) are counted again. ``close()`` leaves the leases a
process still holds to expire: their tasks may still run at the provider.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import secrets
from collections import deque
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.client import PubSub

from . import _redis_limit
from ._capacity import (
    GROWTH_PER_WINDOW,
    IDLE_PAUSE,
    INITIAL_WINDOW,
    MAX_IDLE_PAUSE,
    SLOW_START,
    LocalGate,
    RefusalRun,
    Slot,
    fail_all,
)
from ._redis_limit import REDIS_ERRORS, unavailable
from .errors import AdmissionTimeoutError, ImageGenError, SessionClosedError

log = logging.getLogger("image_gen_async")

# A slot's lease (seconds): renewed every third of it; a crashed process's slots come back after it.
LEASE = 30.0
# The shared state outlives its last lease by this long (ms), then Redis forgets it.
IDLE_TTL_MS = 60_000
# A process counts as waiting this long (seconds) after its last try.
WAITER_TTL = 3.0
# Between tries while the window is full and no release message came (seconds).
FIRST_BACKOFF = 0.05
MAX_BACKOFF = 1.0
# At most this many places asked for in one script call.
MAX_BATCH = 100
# Between attempts to subscribe again to the release channel (seconds).
RECONNECT_PAUSE = 1.0

# Common to both scripts. KEYS: state hash, leases, waiting, release channel.
# ARGV[1] lease ms, [2] configured limit (0: learned), [3] INITIAL_WINDOW, [4] idle TTL ms,
# [5] this process's token, [6] waiter TTL ms, [7] GROWTH_PER_WINDOW, [8] first idle pause ms,
# [9] longest idle pause ms, [10] SLOW_START. Times are whole milliseconds on Redis' clock.
PRELUDE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local lease_ms, limit, idle_ms = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[4])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now)
local s = redis.call('HMGET', KEYS[1], 'window', 'learning', 'grown', 'paused', 'pause')
local window, learning, grown = tonumber(s[1]), tonumber(s[2]), tonumber(s[3])
local paused, pause = tonumber(s[4]), tonumber(s[5])
if not window then
  if limit > 0 then window, learning = limit, 0 else window, learning = tonumber(ARGV[3]), 1 end
  grown, paused, pause = 0, 0, tonumber(ARGV[8])
end
if limit > 0 and window > limit then window = limit end
local function keep()
  redis.call('HSET', KEYS[1], 'window', window, 'learning', learning, 'grown', grown,
    'paused', paused, 'pause', pause)
  for i = 1, 3 do redis.call('PEXPIRE', KEYS[i], lease_ms + idle_ms) end
end
"""

# ARGV[11] places this process holds, ARGV[12..] lease ids wanted.
# Returns {places taken, window, leases held in all, ms until an idle pause ends}.
ACQUIRE = (
    PRELUDE
    + """
local held, want = tonumber(ARGV[11]), #ARGV - 11
local count = redis.call('ZCARD', KEYS[2])
local take, wait = 0, 0
if now < paused then
  wait = paused - now
else
  take = math.max(0, math.min(want, window - count))
  local others = redis.call('ZCARD', KEYS[3])
  if redis.call('ZSCORE', KEYS[3], ARGV[5]) then others = others - 1 end
  if others > 0 then
    take = math.max(0, math.min(take, math.ceil(window / (others + 1)) - held))
  end
end
for i = 1, take do redis.call('ZADD', KEYS[2], now + lease_ms, ARGV[11 + i]) end
if take < want then
  redis.call('ZADD', KEYS[3], now + tonumber(ARGV[6]), ARGV[5])
else
  redis.call('ZREM', KEYS[3], ARGV[5])
end
keep()
return {take, window, count + take, wait}
"""
)

# ARGV[11] accepted creates, [12] leases to hold (renewed or occupied), [13] leases released,
# [14] refusals, then the ids to hold, the ids released, and per refusal (id, activeTasks or
# -1, Retry-After ms or -1). Returns {window, leases held in all}.
SETTLE = (
    PRELUDE
    + """
local accepts, n_hold = tonumber(ARGV[11]), tonumber(ARGV[12])
local n_release, n_refused = tonumber(ARGV[13]), tonumber(ARGV[14])
local growth, max_pause, slow_start = tonumber(ARGV[7]), tonumber(ARGV[9]), tonumber(ARGV[10])
local i, grew, freed = 15, false, 0
if accepts > 0 then pause = tonumber(ARGV[8]) end
for _ = 1, accepts do
  if limit > 0 and window >= limit then break end
  grown = grown + 1
  local step = growth * window
  if learning == 1 then step = slow_start end
  if grown >= step then grown, window, grew = 0, window + 1, true end
end
for _ = 1, n_hold do redis.call('ZADD', KEYS[2], now + lease_ms, ARGV[i]); i = i + 1 end
for _ = 1, n_release do freed = freed + redis.call('ZREM', KEYS[2], ARGV[i]); i = i + 1 end
for _ = 1, n_refused do
  redis.call('ZREM', KEYS[2], ARGV[i])
  local active, retry_after = tonumber(ARGV[i + 1]), tonumber(ARGV[i + 2])
  i = i + 3
  learning, grown = 0, 0
  local ours = redis.call('ZCARD', KEYS[2])
  local w = ours
  if active >= 0 then w = math.min(ours, active) end
  if ours <= 0 or w <= 0 then
    -- Nothing of ours (any process's) holds the key's capacity: others do. Wait, then try one.
    local p = pause
    if retry_after >= 0 then p = math.max(pause, math.min(retry_after, max_pause)) end
    pause = math.min(max_pause, pause * 2)
    paused = math.max(paused, now + p)
    w = 1
  end
  window = math.max(1, w)
  redis.call('HINCRBY', KEYS[1], 'refusals', 1)
end
keep()
if freed > 0 or grew then redis.call('PUBLISH', KEYS[4], freed) end
return {window, redis.call('ZCARD', KEYS[2])}
"""
)


def fallback_places(limit: int | None, window: int, share: float) -> int:
    """Places of the local gate while Redis is away: this process's share of the cap (at least 1)."""
    return max(1, math.floor((limit if limit is not None else window) * share))


@dataclass
class Outbox:
    """What this process has to tell Redis: sent in one script call, before its next acquire."""

    accepts: int = 0
    hold: list[str] = field(default_factory=list)
    release: list[str] = field(default_factory=list)
    refused: list[tuple[str, int, int]] = field(default_factory=list)  # (lease, active, retry-after ms)

    def __bool__(self) -> bool:
        return bool(self.accepts or self.hold or self.release or self.refused)

    def args(self, renew: list[str]) -> list[str | int]:
        """The SETTLE arguments after the common ones; ``renew``: leases to extend as well."""
        hold = [*self.hold, *renew]
        flat = [value for refusal in self.refused for value in refusal]
        return [self.accepts, len(hold), len(self.release), len(self.refused), *hold, *self.release, *flat]

    def merge(self, other: Outbox) -> None:
        """Put back what could not be sent (Redis did not answer), ahead of what came since."""
        self.accepts += other.accepts
        self.hold[:0] = other.hold
        self.release[:0] = other.release
        self.refused[:0] = other.refused


class RedisSlot(Slot):
    """A slot that is a lease in Redis; released with ``ZREM`` (in the background)."""

    __slots__ = ("_owner", "lease")

    def __init__(self, owner: RedisGate, lease: str) -> None:
        super().__init__(None)
        self._owner = owner
        self.lease = lease

    def release(self) -> None:
        """The task finished: its lease goes back, and waiters in every process hear of it."""
        if not self.released:
            self.released = True
            self._owner._release(self)


class RedisGate:
    """The ``CapacityGate`` whose window and slots live in Redis under ``key``, shared by every process."""

    def __init__(
        self,
        redis: Redis,
        key: str,
        name: str,
        limit: int | None,
        *,
        fallback_share: float | None = None,
        lease: float = LEASE,
        renew_every: float | None = None,
        pause: float = IDLE_PAUSE,
        max_pause: float = MAX_IDLE_PAUSE,
    ) -> None:
        self.name = name
        self.limit = limit
        self.key = key
        self.refusals = 0  # creates of this process refused for capacity
        # As in LocalGate: a lone refusal below what was just accepted is a passing fault.
        self._run = RefusalRun()
        self.shared_in_flight = 0  # leases held by every process, as last seen
        self._window = limit if limit is not None else INITIAL_WINDOW  # as last seen in Redis
        self._keys = [key, f"{key}:leases", f"{key}:waiting", f"{key}:released"]
        self._redis = redis
        self._acquire = redis.register_script(ACQUIRE)
        self._settle = redis.register_script(SETTLE)
        self._token = secrets.token_hex(8)
        self._serial = itertools.count()
        self._lease_ms = max(1, round(lease * 1000))
        self._renew_every = renew_every if renew_every is not None else lease / 3
        self._share = fallback_share
        self._pause, self._max_pause = pause, max_pause
        self._fallback: LocalGate | None = None
        self._degraded = False
        self._retry_redis_at = 0.0
        self._lost = False  # a call failed: renew every lease held with the next one that reaches Redis
        self._listed = False  # listed among the processes waiting (until a try takes all it wants)
        self._held: set[str] = set()
        self._waiters: deque[asyncio.Future[Slot | None]] = deque()
        self._outbox = Outbox()
        self._io = asyncio.Lock()  # one script call at a time: Redis sees this process's calls in order
        self._wake = asyncio.Event()
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._pubsub: PubSub | None = None
        # Set by close(): the background loops end even where redis-py turned a cancellation
        # into one of its timeouts (which they catch and carry on after).
        self._closed = False

    def __repr__(self) -> str:
        return f"<RedisGate {self.name} {self.in_flight}/{self.window} shared={self.shared_in_flight}>"

    @property
    def window(self) -> int:
        """The shared window as last seen in Redis (the local gate's while Redis is away)."""
        if self._degraded and self._fallback is not None:
            return self._fallback.window
        return self._window

    @property
    def waiting(self) -> bool:
        """True while creates of this process wait for a place."""
        local = self._fallback is not None and self._fallback.waiting
        return local or any(not waiter.done() for waiter in self._waiters)

    @property
    def in_flight(self) -> int:
        """Slots this process holds (Redis leases and, after an outage, local ones)."""
        return len(self._held) + (self._fallback.in_flight if self._fallback is not None else 0)

    # The CapacityGate protocol.

    async def admit(self, deadline: float | None, *, first: bool = False) -> Slot:
        loop = asyncio.get_running_loop()
        if self._degraded and loop.time() < self._retry_redis_at:
            return await self._local().admit(deadline, first=first)
        waiter: asyncio.Future[Slot | None] = loop.create_future()
        if first:  # a create refused for capacity: the oldest waiter of this process
            self._waiters.appendleft(waiter)
        else:
            self._waiters.append(waiter)
        self._start("pump", self._pump)
        try:
            if deadline is None:
                slot = await waiter
            else:
                async with asyncio.timeout_at(deadline):
                    slot = await waiter
        except BaseException as error:
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                given = waiter.result()  # woken with a place, then cancelled or out of time: hand it on
                if given is not None:
                    given.release()
            else:
                self._forget(waiter)
            if isinstance(error, TimeoutError):
                raise AdmissionTimeoutError(
                    f"{self.name}: no capacity within the job's deadline ({self.shared_in_flight} of "
                    f"{self.window} in flight in all processes); nothing was sent"
                ) from None
            raise
        if slot is None:  # Redis went away while this waited: the local share
            return await self._local().admit(deadline, first=first)
        return slot

    def occupy(self) -> Slot:
        if self._degraded:
            return self._local().occupy()
        lease = self._new_lease()
        self._held.add(lease)
        self._outbox.hold.append(lease)
        self._kick()
        self._start("renew", self._renew)
        return RedisSlot(self, lease)

    def accepted(self, slot: Slot) -> None:
        self._run.accept(slot, self.shared_in_flight)
        if self._degraded:
            self._local().accepted(slot)
        else:
            self._outbox.accepts += 1
            self._kick()

    def refused(self, slot: Slot, active: int | None, retry_after: float | None) -> None:
        if not isinstance(slot, RedisSlot):
            self._local().refused(slot, active, retry_after)
            return
        self.refusals += 1
        if self._run.is_passing(slot, self.shared_in_flight - 1):
            slot.release()  # no cap: the window stays
            return
        if not slot.released:
            slot.released = True
            self._held.discard(slot.lease)
            pause = -1 if retry_after is None or not math.isfinite(retry_after) else round(retry_after * 1000)
            self._outbox.refused.append((slot.lease, -1 if active is None else active, max(-1, pause)))
            self._kick()

    def fail_waiters(self, error: ImageGenError) -> None:
        fail_all(self._waiters, error)
        if self._fallback is not None:
            self._fallback.fail_waiters(error)

    async def close(self) -> None:
        """Stop the background tasks and tell Redis what is left to tell (leases still held expire)."""
        self._closed = True
        self.fail_waiters(SessionClosedError(f"{self.name}: the session was closed while this create waited"))
        tasks, self._tasks = list(self._tasks.values()), {}
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._outbox:
            with contextlib.suppress(*REDIS_ERRORS):
                async with self._io:
                    await self._send_outbox()
        pubsub, self._pubsub = self._pubsub, None
        if pubsub is not None:
            with contextlib.suppress(*REDIS_ERRORS):
                await pubsub.aclose()  # type: ignore[no-untyped-call]  # unannotated in redis-py

    # Waiting in this process: one task serves the queue in order.

    async def _pump(self) -> None:
        backoff = FIRST_BACKOFF
        while not self._closed:
            want = min(MAX_BATCH, sum(1 for waiter in self._waiters if not waiter.done()))
            if not want:
                if not self._listed:
                    return
                await self._unlist()  # then look again: a waiter may have come meanwhile
                continue
            self._wake.clear()  # a release heard during the call below wakes the wait after it
            try:
                leases, wait = await self._take(want)
            except REDIS_ERRORS as error:
                self._redis_away(error)
                return
            except Exception as error:  # a bug must not leave waiters hanging
                log.exception("%s: capacity gate failed", self.name)
                self.fail_waiters(unavailable(f"{self.name} create limit (tasks at once)", error))
                return
            self._hand_out(leases)
            if len(leases) == want:
                backoff = FIRST_BACKOFF
                continue
            self._start("listen", self._listen)
            timeout = wait if wait > 0 else backoff
            backoff = min(MAX_BACKOFF, backoff * 2)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._wake.wait()

    async def _take(self, want: int) -> tuple[list[str], float]:
        """Ask Redis for up to ``want`` places (after telling it what this process owes)."""
        ids = [self._new_lease() for _ in range(want)]
        async with self._io:
            if self._outbox or self._lost:
                await self._send_outbox()
            try:
                taken, window, count, wait_ms = await self._acquire(
                    keys=self._keys[:3], args=[*self._common(), len(self._held), *ids]
                )
            except BaseException:
                self._lost = True
                raise
        self._window, self.shared_in_flight = int(window), int(count)
        self._listed = int(taken) < want
        self._back_on_redis()
        leases = ids[: int(taken)]
        self._held.update(leases)
        if leases:
            self._start("renew", self._renew)
        return leases, int(wait_ms) / 1000

    async def _unlist(self) -> None:
        """No more waiters here: stop counting as a waiting process, so the others' share is whole."""
        self._listed = False
        with contextlib.suppress(*REDIS_ERRORS):
            async with self._io:
                await self._redis.zrem(self._keys[2], self._token)

    def _hand_out(self, leases: list[str]) -> None:
        """Places to the waiters, first come first served; one nobody waits for any more goes back."""
        for lease in leases:
            slot = RedisSlot(self, lease)
            while self._waiters and self._waiters[0].done():
                self._waiters.popleft()
            if self._waiters:
                self._waiters.popleft().set_result(slot)
            else:
                slot.release()

    def _forget(self, waiter: asyncio.Future[Slot | None]) -> None:
        with contextlib.suppress(ValueError):
            self._waiters.remove(waiter)
        if not waiter.done():
            waiter.cancel()

    # Telling Redis: releases, accepted creates, refusals and renewals, batched.

    def _release(self, slot: RedisSlot) -> None:
        self._held.discard(slot.lease)
        self._outbox.release.append(slot.lease)
        self._kick()

    def _kick(self) -> None:
        self._start("flush", self._flush)

    async def _flush(self) -> None:
        while self._outbox and not self._closed:
            try:
                async with self._io:
                    await self._send_outbox()
            except REDIS_ERRORS as error:
                # Kept for the next call that reaches Redis; leases expire by themselves meanwhile.
                log.debug("%s: capacity news not sent yet: %s", self.name, error)
                return
            self._wake.set()  # places freed here: this process's waiters may try at once

    async def _renew(self) -> None:
        while not self._closed:
            await asyncio.sleep(self._renew_every)
            if not self._held and not self._outbox and not self._lost:
                continue
            try:
                async with self._io:
                    await self._send_outbox(renew_all=True)
            except REDIS_ERRORS as error:
                log.debug("%s: leases not renewed: %s", self.name, error)

    async def _send_outbox(self, *, renew_all: bool = False) -> None:
        """One SETTLE call (the caller holds ``_io``); what was not sent is kept.

        After a failed call every lease held is renewed (re-added): Redis may have let them
        expire, or lost them, while the tasks kept running.
        """
        box, self._outbox = self._outbox, Outbox()
        renew = sorted(self._held) if renew_all or self._lost else []
        try:
            window, count = await self._settle(keys=self._keys, args=[*self._common(), *box.args(renew)])
        except BaseException:
            box.merge(self._outbox)
            self._outbox = box
            self._lost = True
            raise
        self._lost = False
        self._window, self.shared_in_flight = int(window), int(count)

    # Pub/sub: a release in any process wakes this one's waiters.

    async def _listen(self) -> None:
        channel = self._keys[3]
        while not self._closed:
            try:
                if self._pubsub is None:
                    self._pubsub = self._redis.pubsub()
                    await self._pubsub.subscribe(channel)
                message = await self._pubsub.get_message(ignore_subscribe_messages=True, timeout=None)
            except REDIS_ERRORS as error:
                if self._closed:
                    return
                log.debug("%s: release channel lost (%s); the backoff covers it", self.name, error)
                await asyncio.sleep(RECONNECT_PAUSE)
                continue
            if message is not None and message.get("type") == "message":
                self._wake.set()

    # Redis away.

    def _redis_away(self, error: BaseException) -> None:
        """Every waiter fails loudly, or goes to the local share (a warning once per outage)."""
        if self._share is None:
            self.fail_waiters(unavailable(f"{self.name} create limit (tasks at once)", error))
            return
        if not self._degraded:
            log.warning(
                "%s: Redis did not answer (%s); at most %d tasks at once in this process until it does",
                self.name,
                error,
                self._local().limit,
            )
        self._degraded = True
        self._retry_redis_at = asyncio.get_running_loop().time() + _redis_limit.RETRY_REDIS_AFTER
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)

    def _back_on_redis(self) -> None:
        if self._degraded:
            self._degraded = False
            log.warning("%s: Redis answers again; back on the shared capacity", self.name)

    def _local(self) -> LocalGate:
        if self._fallback is None:
            assert self._share is not None  # only a fallback share ever skips Redis
            places = fallback_places(self.limit, self._window, self._share)
            self._fallback = LocalGate(self.name, places, pause=self._pause, max_pause=self._max_pause)
        return self._fallback

    # Small helpers.

    def _common(self) -> list[str | int]:
        return [
            self._lease_ms,
            self.limit or 0,
            INITIAL_WINDOW,
            IDLE_TTL_MS,
            self._token,
            round(WAITER_TTL * 1000),
            GROWTH_PER_WINDOW,
            round(self._pause * 1000),
            round(self._max_pause * 1000),
            SLOW_START,
        ]

    def _new_lease(self) -> str:
        return f"{self._token}:{next(self._serial)}"

    def _start(self, name: str, work: Callable[[], Coroutine[Any, Any, None]]) -> None:
        """Run ``work`` in the background unless it already runs."""
        task = self._tasks.get(name)
        if (task is None or task.done()) and not self._closed:
            self._tasks[name] = asyncio.get_running_loop().create_task(
                work(), name=f"image_gen_async capacity {name} {self.name}"
            )
