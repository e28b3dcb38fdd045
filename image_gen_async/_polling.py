"""When to poll: seeded from the provider's ``estimated_duration``, learned from finished jobs.

Each wait is a fixed share (``growth``) of the time already elapsed, so a job is
seen done at most about that share of its duration after it finished. Polling
starts once the job could plausibly be done: at the lower bound of what this
provider+model took recently, or, before anything is learned, at half the
provider's estimate (estimates are up to 2x off either way). With nothing known
the waits grow faster, and the first finished job teaches the rest.
"""

from __future__ import annotations

from collections import deque

import attrs

# Estimates can be this far off either way before anything is learned.
ESTIMATE_LOW_FACTOR = 0.5
ESTIMATE_HIGH_FACTOR = 2.0
# A job waiting on a webhook is polled once it is this much later than the longest expected.
WEBHOOK_LATE_FACTOR = 1.25


@attrs.frozen
class PollSettings:
    """Poll timing knobs; the defaults suit jobs of seconds to minutes."""

    growth: float = 0.08
    cold_growth: float = 0.3
    first_poll: float = 2.0
    min_interval: float = 0.25
    max_interval: float = 30.0
    history: int = 32
    webhook_grace: float = 5.0
    webhook_unknown_wait: float = 120.0

    def __attrs_post_init__(self) -> None:
        if not (0 < self.min_interval <= self.max_interval and self.growth > 0 and self.first_poll > 0):
            raise ValueError(
                "PollSettings: need 0 < min_interval <= max_interval, growth > 0, first_poll > 0"
            )

    def scaled(self, factor: float) -> PollSettings:
        """The same schedule on a faster (or slower) clock: every duration times ``factor``.

        For emulated jobs that run, say, 30x faster than the real ones.
        """
        return attrs.evolve(
            self,
            first_poll=self.first_poll * factor,
            min_interval=self.min_interval * factor,
            max_interval=self.max_interval * factor,
            webhook_grace=self.webhook_grace * factor,
            webhook_unknown_wait=self.webhook_unknown_wait * factor,
        )


class DurationLearner:
    """Recent durations of completed jobs per provider+model, and how far off estimates were."""

    __slots__ = ("_durations", "_history", "_ratios")

    def __init__(self, history: int = 32) -> None:
        self._history = history
        self._durations: dict[tuple[str, str], deque[float]] = {}
        self._ratios: dict[tuple[str, str], deque[float]] = {}

    def record(self, key: tuple[str, str], duration: float, estimate: float | None) -> None:
        """Learn from one completed job (its duration as seen from the client)."""
        if duration <= 0:
            return
        self._durations.setdefault(key, deque(maxlen=self._history)).append(duration)
        if estimate:
            self._ratios.setdefault(key, deque(maxlen=self._history)).append(duration / estimate)

    def lower_bound(self, key: tuple[str, str], estimate: float | None) -> float | None:
        """The earliest a new job of this kind is plausibly done, or None if nothing is known."""
        ratios = self._ratios.get(key)
        if estimate and ratios:
            return estimate * min(ratios)
        durations = self._durations.get(key)
        if durations:
            return min(durations)
        if estimate:
            return estimate * ESTIMATE_LOW_FACTOR
        return None

    def upper_bound(self, key: tuple[str, str], estimate: float | None) -> float | None:
        """The latest a new job of this kind plausibly finishes, or None if nothing is known."""
        ratios = self._ratios.get(key)
        if estimate and ratios:
            return estimate * max(ratios)
        durations = self._durations.get(key)
        if durations:
            return max(durations)
        if estimate:
            return estimate * ESTIMATE_HIGH_FACTOR
        return None


def webhook_wait(upper_bound: float | None, settings: PollSettings) -> float:
    """How long a job waits for its callback before the polling safety net starts."""
    if upper_bound is None:
        return settings.webhook_unknown_wait
    return upper_bound * WEBHOOK_LATE_FACTOR + settings.webhook_grace


def next_delay(elapsed: float, lower_bound: float | None, settings: PollSettings) -> float:
    """Seconds to wait before the next poll of a job that has run ``elapsed`` seconds."""
    if lower_bound is None:
        target = elapsed * (1 + settings.cold_growth) if elapsed > 0 else settings.first_poll
    else:
        target = max(elapsed, lower_bound) * (1 + settings.growth)
    return min(settings.max_interval, max(settings.min_interval, target - elapsed))
