"""One retry budget for creates, polls and downloads: a count of tries and a deadline.

An attempt says "worth another try" by raising ``Retry`` around its failure; anything else
it raises ends the call at once (cancellation included: it is never caught here). Waits
are full-jitter exponential (``backoff``'s generators), or the server's ``Retry-After`` when
it asks for longer (capped): advice of 0, or any shorter than our own step, does not make
the next try sooner. A wait that would end past the deadline is not taken: the failure is
raised now.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterator
from typing import TypeVar

import attrs
import backoff

from .errors import ImageGenError

T = TypeVar("T")


class Retry(Exception):
    """An attempt's failure that asking again may mend; ``error`` is raised once the budget ends.

    The wait honours ``retry_after``, by default the server's ``Retry-After`` the error carries.
    """

    def __init__(self, error: ImageGenError, retry_after: float | None = None) -> None:
        super().__init__(str(error))
        self.error = error
        if retry_after is None:
            advice = getattr(error, "retry_after", None)
            retry_after = advice if isinstance(advice, int | float) else None
        self.retry_after = retry_after


@attrs.frozen
class RetryBudget:
    """``tries`` attempts in all (None: until the deadline), waits from ``base`` doubling to ``cap``."""

    tries: int | None
    base: float
    cap: float


def heeding(own: float, retry_after: float | None, cap: float) -> float:
    """Our own wait, or the server's advice (capped) if it is longer: never shorter. (A server
    answering ``Retry-After: 0`` to every try would otherwise be asked thousands of times a
    second.) The capacity gate's pause follows the same rule, as does its Redis script."""
    return own if retry_after is None else max(own, min(retry_after, cap))


def next_wait(waits: Iterator[float], retry_after: float | None, cap: float) -> float:
    """The wait before the next attempt: the next jittered step, heeding the server's advice
    (the steps still grow while it says 0)."""
    return heeding(backoff.full_jitter(next(waits)), retry_after, cap)


def backoff_steps(base: float, cap: float) -> Iterator[float]:
    """The exponential steps (before jitter) of a backoff: ``base``, doubling, up to ``cap``."""
    waits = backoff.expo(factor=base, max_value=cap)
    next(waits)  # backoff's generators start with a priming 0
    return waits


async def retrying(
    attempt: Callable[[], Awaitable[T]],
    budget: RetryBudget,
    *,
    deadline: float | None = None,
    on_retry: Callable[[int, float, ImageGenError], None] | None = None,
    past_deadline: Callable[[ImageGenError], BaseException] | None = None,
) -> T:
    """Run ``attempt`` until it returns, raises something other than ``Retry``, or the budget ends.

    ``deadline`` is on the event loop's clock; when it is what ends the budget, the error
    raised is ``past_deadline(last failure)`` (default: the failure itself).
    ``on_retry(tries so far, wait, error)`` is called before each wait.
    """
    tries = 0
    waits: Iterator[float] | None = None
    while True:
        tries += 1
        try:
            return await attempt()
        except Retry as retry:
            failure = retry
        if budget.tries is not None and tries >= budget.tries:
            raise failure.error
        if waits is None:
            waits = backoff_steps(budget.base, budget.cap)
        wait = next_wait(waits, failure.retry_after, budget.cap)
        loop = asyncio.get_running_loop()
        if deadline is not None and loop.time() + wait >= deadline:
            raise failure.error if past_deadline is None else past_deadline(failure.error)
        if on_retry is not None:
            on_retry(tries, wait, failure.error)
        await asyncio.sleep(wait)
