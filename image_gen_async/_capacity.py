"""Admission: at most as many tasks of one provider key in flight as its account runs at once.

Providers cap the tasks an account runs at once (nananobanana 503 ``server_busy`` with
``activeTasks``; Get3W 429 "too many concurrent tasks"). Sending past the cap only buys
refusals, so every create first takes a slot here, and a task holds it from its create
until its handle is done (a sync ``generate()`` holds it while its request runs).

The window is the configured ``max_concurrent``, or learned: it starts small and doubles
per round of accepted creates until the first refusal; a refusal
shrinks it to what is in flight (or to ``activeTasks`` when the server says fewer), so new
creates wait until a task of that key finishes; after that it grows by one per
``GROWTH_PER_WINDOW`` windows of accepted creates, a slow probe for a raised cap. Waiters
are served first come, first served; a waiter can be cancelled or run out of deadline.

``CapacityGate`` is what the engine needs of any gate; ``LocalGate`` is the in-process one
(``_redis_capacity`` shares one among processes).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections import deque
from typing import Any, Protocol

from ._retry import heeding
from .errors import AdmissionTimeoutError, APIError, ImageGenError

log = logging.getLogger("image_gen_async")

# A learned window starts here and doubles per round of accepted creates until a refusal (one
# more per SLOW_START accepted creates): an account without a cap is soon unbounded, and the
# creates on the wire when the first refusal comes back overshoot a cap by at most itself.
INITIAL_WINDOW = 8
SLOW_START = 1
# Once a refusal has shown the cap, the window grows by one per this many windows of creates.
GROWTH_PER_WINDOW = 16
# A refusal while nothing of ours is in flight (others use the key): wait this long, doubling.
IDLE_PAUSE = 0.5
MAX_IDLE_PAUSE = 30.0


# Slots are numbered as they are handed out: an accept of a create admitted before a refused
# one was already on the wire at the refusal, so it is no evidence against a cap.
_SERIALS = itertools.count()


class Slot:
    """One task's place in its key's window, from admission until ``release()``."""

    __slots__ = ("_gate", "released", "serial")

    def __init__(self, gate: LocalGate | None) -> None:
        self._gate = gate
        self.released = False
        self.serial = next(_SERIALS)

    def release(self) -> None:
        """The task finished (or its create was refused or failed): its place goes to the next waiter."""
        if not self.released:
            self.released = True
            if self._gate is not None:
                self._gate._release()


class CapacityGate(Protocol):
    """What the engine needs from a capacity gate."""

    async def admit(self, deadline: float | None, *, first: bool = False) -> Slot:
        """Wait (FIFO) for a place; ``AdmissionTimeoutError`` once the loop clock passes ``deadline``.

        ``first``: a create refused for capacity asks again at the head of the queue (it is
        the oldest waiter).
        """
        ...

    @property
    def waiting(self) -> bool:
        """True while creates wait for a place at a known cap (their jobs' polls then come closer)."""
        ...

    def accepted(self, slot: Slot) -> None:
        """The create holding ``slot`` was accepted: the window may grow."""
        ...

    def occupy(self) -> Slot:
        """A place for a task already running (a resumed one), taken at once, even over the window."""
        ...

    def refused(self, slot: Slot, active: int | None, retry_after: float | None) -> None:
        """A create was refused for capacity: give the slot back and shrink the window."""
        ...

    def fail_waiters(self, error: ImageGenError) -> None:
        """The account cannot work now: every waiter ends with (a copy of) ``error``."""
        ...


def is_passing_fault(ours: int, accepted_at: int, in_a_row: int) -> bool:
    """Whether a capacity refusal contradicts what was just accepted: one refusal with ``ours``
    in flight, when a create went through with more in flight since the window last shrank, is
    a passing fault, not a cap (a cap refuses whenever it is reached, so it refuses again)."""
    return ours > 0 and in_a_row < 2 and accepted_at > ours


class RefusalRun:
    """Capacity refusals in a row and the most in flight at an accept since the window shrank:
    what ``is_passing_fault`` judges. Only an accept of a create admitted after the latest
    refusal breaks a run; the creates already on the wire then were sent at the cap too, and
    counting their accepts let a real cap pass for a fault, again and again, in slow start."""

    __slots__ = ("accepted_at", "in_a_row", "refused_serial")

    def __init__(self) -> None:
        self.accepted_at = 0
        self.in_a_row = 0
        self.refused_serial = -1

    def accept(self, slot: Slot, in_flight: int) -> None:
        if slot.serial > self.refused_serial:
            self.in_a_row = 0
            self.accepted_at = max(self.accepted_at, in_flight)

    def is_passing(self, slot: Slot, ours: int) -> bool:
        """Count the refusal of ``slot``'s create; True if it is a passing fault, not a cap."""
        self.in_a_row += 1
        self.refused_serial = max(self.refused_serial, slot.serial)
        if is_passing_fault(ours, self.accepted_at, self.in_a_row):
            return True
        self.accepted_at = 0
        return False


class LocalGate:
    """The capacity gate of one provider key in this process."""

    def __init__(
        self, name: str, limit: int | None, *, pause: float = IDLE_PAUSE, max_pause: float = MAX_IDLE_PAUSE
    ) -> None:
        self.name = name
        self._pause_base, self._max_pause = pause, max_pause
        self.limit = limit  # configured cap, or None (learned)
        self.window: int = limit if limit is not None else INITIAL_WINDOW
        self.in_flight = 0
        self.refusals = 0
        self._learning = limit is None  # doubling until the first refusal
        self._grown = 0  # accepted creates since the window last changed
        # A lone refusal below what was just accepted is no cap (a passing fault).
        self._run = RefusalRun()
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._paused_until = 0.0
        self._pause = pause
        self._wake: asyncio.TimerHandle | None = None

    def __repr__(self) -> str:
        return f"<LocalGate {self.name} {self.in_flight}/{self.window}>"

    @property
    def paused_until(self) -> float:
        """Loop time until which no create is let through (a refusal with nothing of ours in flight)."""
        return self._paused_until

    def _has_room(self) -> bool:
        return self.in_flight < self.window and asyncio.get_running_loop().time() >= self._paused_until

    async def admit(self, deadline: float | None, *, first: bool = False) -> Slot:
        if (first or not self._waiters) and self._has_room():
            self.in_flight += 1
            return Slot(self)
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[None] = loop.create_future()
        if first:
            self._waiters.appendleft(waiter)
        else:
            self._waiters.append(waiter)
        try:
            if deadline is None:
                await waiter
            else:
                async with asyncio.timeout_at(deadline):
                    await waiter
        except BaseException as error:
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                self.in_flight -= 1  # woken with a place, then cancelled or out of time: hand it on
                self._serve()
            elif not waiter.done() or waiter.cancelled():
                self._forget(waiter)
            if isinstance(error, TimeoutError):
                raise AdmissionTimeoutError(
                    f"{self.name}: no capacity within the job's deadline ({self.in_flight} of "
                    f"{self.window} in flight); nothing was sent"
                ) from None
            raise
        return Slot(self)

    @property
    def waiting(self) -> bool:
        # Not while the window is still growing fast: those waits last a round trip.
        return bool(self._waiters) and not self._learning

    @property
    def learning(self) -> bool:
        """True while no refusal has shown a cap (and none is configured)."""
        return self._learning

    def occupy(self) -> Slot:
        self.in_flight += 1
        return Slot(self)

    def accepted(self, slot: Slot) -> None:
        self._pause = self._pause_base
        self._run.accept(slot, self.in_flight)
        if self.limit is not None and self.window >= self.limit:
            return
        self._grown += 1
        if self._grown >= (SLOW_START if self._learning else GROWTH_PER_WINDOW * self.window):
            self._grown = 0
            self.window += 1
            self._serve()

    def refused(self, slot: Slot, active: int | None, retry_after: float | None) -> None:
        self.refusals += 1
        ours = self.in_flight - 1  # the refused create's own place goes back below
        if self._run.is_passing(slot, ours):
            slot.release()
            return
        self._learning = False
        self._grown = 0
        window = ours if active is None else min(ours, active)
        if ours <= 0 or window <= 0:
            # Nothing of ours holds the key's capacity: others do. Wait, then try one again.
            loop = asyncio.get_running_loop()
            pause = heeding(self._pause, retry_after, self._max_pause)
            self._pause = min(self._max_pause, self._pause * 2)
            self._paused_until = max(self._paused_until, loop.time() + pause)
            self._arm_wake()
            window = 1
        previous, self.window = self.window, max(1, window)
        if self.window < previous:
            log.info("%s: refused for capacity; at most %d tasks at once now", self.name, self.window)
        slot.release()

    def fail_waiters(self, error: ImageGenError) -> None:
        fail_all(self._waiters, error)

    def _forget(self, waiter: asyncio.Future[None]) -> None:
        with contextlib.suppress(ValueError):
            self._waiters.remove(waiter)
        if not waiter.done():
            waiter.cancel()

    def _arm_wake(self) -> None:
        """One timer, at the end of the latest pause."""
        if self._wake is not None and self._wake.when() >= self._paused_until:
            return
        if self._wake is not None:
            self._wake.cancel()
        self._wake = asyncio.get_running_loop().call_at(self._paused_until, self._resume)

    def _resume(self) -> None:
        self._wake = None
        if asyncio.get_running_loop().time() < self._paused_until:
            self._arm_wake()  # woken early (clock resolution): wait out the rest
            return
        self._serve()

    def _release(self) -> None:
        self.in_flight -= 1
        self._serve()

    def _serve(self) -> None:
        """Hand free places to the waiters, first come first served."""
        while self._waiters and self._has_room():
            waiter = self._waiters.popleft()
            if not waiter.done():
                self.in_flight += 1
                waiter.set_result(None)


def fail_all(waiters: deque[asyncio.Future[Any]], error: ImageGenError) -> None:
    """End every waiter with its own copy of ``error``, first come first."""
    while waiters:
        waiter = waiters.popleft()
        if not waiter.done():
            waiter.set_exception(_copy(error))


def _copy(error: ImageGenError) -> ImageGenError:
    """A fresh copy of ``error`` for each waiter (one exception raised in many tasks tangles tracebacks)."""
    try:
        fresh = type(error).__new__(type(error))
        fresh.__dict__.update(error.__dict__)
        fresh.args = error.args
        return fresh
    except (TypeError, AttributeError):
        return error


class Account:
    """What one provider account and key share across its clients: the capacity gate, the circuit.

    (Get3W's v1 and v3 APIs are one account: one cap, one balance.)
    """

    def __init__(self, name: str, gate: CapacityGate) -> None:
        self.name = name
        self.gate = gate
        self.blocked: APIError | None = None
        self.remaining_credits: float | None = None

    def check(self, client: str) -> None:
        """Raise the answer that stopped this account (anew, for ``client``), if one did."""
        stop = self.blocked
        if stop is not None:
            raise type(stop)(
                stop.status, stop.code, stop.message, provider=client, retry_after=stop.retry_after
            )

    def block(self, error: APIError) -> None:
        """Open the circuit: nothing more is sent for this key, and every waiting create fails now."""
        if self.blocked is None:
            log.error("%s; nothing more is sent with this key until unblock()", error)
        self.blocked = error
        self.gate.fail_waiters(error)

    def unblock(self) -> None:
        """Close the circuit (the key was fixed, credits were topped up)."""
        self.blocked = None
