"""When to poll: seeded from the provider's ``estimated_duration``, learned from other jobs.

The aim: see each job done soon after it finishes (within ``growth`` of its duration)
with as few polls as possible. Each poll comes ``growth`` later than the one before,
relative to the job's age; the question is when to start.

- Warm (jobs of this provider+model have completed): start at a low quantile of their
  durations. Each completed job tells us its duration lies between its last poll that
  saw it running and the one that saw it done; jobs done at their first poll tell only
  an upper bound. From these brackets the median and the 97th percentile are read off
  an interpolated distribution, and the 3rd percentile is taken as their mirror image in
  log space (``median**2 / q97``): the lower tail is the part a good schedule never
  observes, because it only polls there when it must. While few jobs are done the
  mirror can land high, so it stays a little under the quickest job seen done; when
  half the jobs are done at their first poll the median is hidden, and the bound backs
  off below the age most were seen done by.
  The first poll comes a little more than one growth step after it (``FIRST_STEP_STRETCH``).
- Cold, with an estimate: from ``0.45 x estimate`` (estimates can be 2x too high).
- Cold, with jobs still running: no job is expected to end before ``SHRINK`` times the
  age of the ``K``-th oldest job still running, so younger jobs wait rather than poll.
  A job re-reads this when it wakes and sleeps on if the bar has moved past its age.
  (Not once warm: with many jobs in flight and a long tail, the oldest running jobs
  are the slow ones, and they would hold every new job back.)
- Nothing known at all: ``first_poll``, then the usual growth.

Durations are learned relative to the estimate when there is one (an estimate that is
2x off is 2x off for every job of that model), in seconds otherwise.
"""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Hashable

import attrs

# Estimates can be this far off either way before anything is learned.
ESTIMATE_LOW_FACTOR = 0.45
ESTIMATE_HIGH_FACTOR = 2.0
# Cold: no job is expected to finish before SHRINK x the age of the K-th oldest still running.
PENDING_RANK = 5
SHRINK = 0.8
FLOOR_REFRESH = 16
# With half the jobs done at their first poll, the median is not seen: start this much earlier.
CENSORED_BACKOFF = 0.85
# Warm, the first poll comes this much more than one growth step after the lower bound: only
# the few jobs below that low quantile can see more lag than one step, and the bound itself
# errs low (the low tail is hidden behind first polls that find jobs already done).
FIRST_STEP_STRETCH = 1.125
# While fewer than FEW_DONE jobs are done, the warm bound stays this factor under the
# quickest seen done (about half a step).
FEW_DONE = 32
QUICKEST_MARGIN = 1.04
# A job waiting on a webhook is polled once it is this much later than the longest expected.
WEBHOOK_LATE_FACTOR = 1.25

Key = tuple[str, str]


@attrs.frozen
class PollSettings:
    """Poll timing knobs; the defaults suit jobs of seconds to minutes."""

    growth: float = 0.08
    first_poll: float = 5.0  # nananobanana's own advice for a job nothing is known about
    min_interval: float = 0.25
    max_interval: float = 30.0
    history: int = 128
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


class _History:
    """One provider+model: brackets of completed jobs and ages of jobs still running."""

    __slots__ = ("brackets", "floor", "lower", "running", "updates")

    def __init__(self, size: int) -> None:
        self.brackets: deque[tuple[float, float]] = deque(maxlen=size)
        self.running: dict[Hashable, float] = {}
        self.lower: float | None = None  # cached warm lower bound, reset on each completion
        # The cold floor from running jobs, refreshed every FLOOR_REFRESH updates (ages only
        # grow, so a slightly stale floor is a slightly low one) and whenever a job leaves.
        self.floor: float | None = None
        self.updates = 0

    def cold_floor(self) -> float | None:
        if self.floor is None or self.updates >= FLOOR_REFRESH:
            self.updates = 0
            if len(self.running) < PENDING_RANK:
                self.floor = None
            else:
                self.floor = heapq.nlargest(PENDING_RANK, self.running.values())[-1] * SHRINK
        return self.floor


class PollPlanner:
    """Learns per provider+model from every job of the session and plans each job's polls."""

    __slots__ = ("_history", "_size")

    def __init__(self, history: int = 128) -> None:
        self._size = history
        self._history: dict[Key, _History] = {}

    def _of(self, key: Key) -> _History:
        history = self._history.get(key)
        if history is None:
            history = self._history[key] = _History(self._size)
        return history

    def running(self, key: Key, job: Hashable, age: float, estimate: float | None) -> None:
        """A poll saw ``job`` still running at ``age`` seconds."""
        history = self._of(key)
        history.running[job] = _relative(age, estimate)
        history.updates += 1
        if len(history.running) > 4 * self._size:
            del history.running[next(iter(history.running))]
            history.floor = None

    def completed(
        self, key: Key, job: Hashable, last_running: float, done: float, estimate: float | None
    ) -> None:
        """``job`` was seen done at age ``done``; ``last_running`` is its last age seen running (0: none)."""
        # A wall clock stepped back can make a webhook's age negative: no job takes less than 0.
        done = max(0.0, done)
        last_running = min(max(0.0, last_running), done)
        history = self._of(key)
        if history.running.pop(job, None) is not None:
            history.floor = None
        history.brackets.append((_relative(last_running, estimate), _relative(done, estimate)))
        history.lower = None

    def forget(self, key: Key, job: Hashable) -> None:
        """``job`` ended some other way (failed, cancelled): it no longer says anything."""
        history = self._history.get(key)
        if history is not None and history.running.pop(job, None) is not None:
            history.floor = None

    def lower_bound(self, key: Key, estimate: float | None) -> float | None:
        """The earliest a job of this kind plausibly finishes, in seconds; None if nothing is known."""
        history = self._history.get(key)
        if history is not None and history.brackets:
            if history.lower is None:
                history.lower = _warm_lower(history.brackets)
            return history.lower * (estimate or 1.0)
        bounds = []
        floor = history.cold_floor() if history is not None else None
        if floor is not None:
            bounds.append(floor)
        if estimate:
            bounds.append(ESTIMATE_LOW_FACTOR)
        return max(bounds) * (estimate or 1.0) if bounds else None

    def warm(self, key: Key) -> bool:
        """True once jobs of this kind have completed, so the bounds are learned."""
        history = self._history.get(key)
        return history is not None and bool(history.brackets)

    def upper_bound(self, key: Key, estimate: float | None) -> float | None:
        """The latest a job of this kind plausibly finishes, in seconds; None if nothing is known."""
        history = self._history.get(key)
        if history is not None and history.brackets:
            return max(done for _, done in history.brackets) * (estimate or 1.0)
        return estimate * ESTIMATE_HIGH_FACTOR if estimate else None

    def next_poll_age(
        self,
        key: Key,
        estimate: float | None,
        last_poll: float | None,
        settings: PollSettings,
    ) -> float:
        """The age at which a job should next be polled (``last_poll``: its last poll's age, if any)."""
        growth = 1 + settings.growth
        lower = self.lower_bound(key, estimate)
        if last_poll is None:
            if lower is None:
                return settings.first_poll
            if self.warm(key):
                return lower * (1 + settings.growth * FIRST_STEP_STRETCH)
            return lower * growth
        target = last_poll * growth
        if lower is not None:
            # New knowledge may move a running job on, never closer than one growth step below it.
            target = max(target, lower)
        return min(last_poll + settings.max_interval, max(last_poll + settings.min_interval, target))


def _relative(age: float, estimate: float | None) -> float:
    return age / estimate if estimate else age


def _warm_lower(brackets: deque[tuple[float, float]]) -> float:
    """The 3rd percentile of the durations the brackets describe (see the module docstring)."""
    censored = [done for running, done in brackets if running <= 0]
    seen = [(running, done) for running, done in brackets if running > 0]
    total = len(brackets)
    if len(censored) >= 0.5 * total or len(seen) < 4:
        # The median is hidden below the first polls: start earlier than most were seen done.
        reference = sorted(censored)[len(censored) // 2] if censored else min(r for r, _ in seen)
        return reference * CENSORED_BACKOFF

    def share_done_by(x: float) -> float:
        # Each bracketed job is spread evenly over its bracket; a censored one sits at its bound.
        count = sum(_share(x, running, done) for running, done in seen)
        return (count + sum(1 for done in censored if done <= x)) / total

    def quantile(p: float) -> float:
        low, high = 0.0, max(done for _, done in brackets)
        for _ in range(40):
            middle = (low + high) / 2
            low, high = (middle, high) if share_done_by(middle) < p else (low, middle)
        return high

    median = quantile(0.5)
    lower = median * median / quantile(0.97)
    if total < FEW_DONE:
        # From a handful of jobs the mirror can land high: keep just under the quickest
        # seen done. (Only then: later, one freak quick answer must not pin the bound.)
        lower = min(lower, min(done for _, done in brackets) / QUICKEST_MARGIN)
    return lower


def _share(x: float, running: float, done: float) -> float:
    """How much of a job known to end in (running, done] has ended by ``x``."""
    if done <= running:
        return 1.0 if x >= done else 0.0
    return min(1.0, max(0.0, (x - running) / (done - running)))


def webhook_wait(upper_bound: float | None, settings: PollSettings) -> float:
    """How long a job waits for its callback before the polling safety net starts."""
    if upper_bound is None:
        return settings.webhook_unknown_wait
    return upper_bound * WEBHOOK_LATE_FACTOR + settings.webhook_grace
