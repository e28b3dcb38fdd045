"""When to poll: seeded from the provider's ``estimated_duration``, learned from other jobs.

The aim: see each job done soon after it finishes (within ``growth`` of its duration)
with as few polls as possible. Each poll comes ``growth`` later than the one before,
relative to the job's age; the question is when to start, and which jobs need to look.

Units. Every completed job teaches its duration in seconds; a job whose estimate was
usable also teaches the ratio duration/estimate (an estimate that is 2x off is 2x off for
every job of that model). A job with an estimate plans from the ratios once any are known,
else from the seconds (``generate()`` answers carry no estimate, and the seconds they teach
are the model's true durations, whatever a later estimate says); a job without one plans
from the seconds only. The two are never mixed.

Bad estimates. An estimate that is not a finite positive number is no estimate. One outside
``[2 x min_interval, 720 x max_interval]`` (0.5 s to 6 h at the defaults) is clamped into
it for that job's plan and teaches no ratio; nor does one whose job took more than
``RATIO_SPAN`` times more or less than it said. The first poll never comes later than
``max(first_poll, 10 x max_interval)`` (5 min at the defaults) unless jobs of the model have
been seen taking longer. One job's estimate is that job's: it cannot move the others' plans.

- Warm (jobs of this provider+model have completed): start at a low quantile of their
  durations (the last ``history`` accepted of those whose peers are all done, or the last
  ``history`` done: see ``_Durations``). Each completed job tells us its duration lies
  between its last poll that saw it running and the one that saw it done; a job done at
  its first poll was not polled earlier because the bound said it would not be done, so it
  is placed a little below that bound (``CENSORED_REACH``). A bracket of many steps (a job
  that slept on the others' polls until it was woken) is spread the way the narrow ones
  are over its span, not evenly: a burst's sleepers would otherwise drag the bound down
  for the bursts after it. From these brackets the median and the 97th percentile are read
  off an interpolated distribution, and the 3rd percentile is taken as their mirror image
  in log space (``median**2 / q97``): the lower tail is the part a good schedule never
  observes. While few jobs are done the mirror can land high, so it stays a little under
  the quickest job seen done. The first poll comes a little more than one growth step
  after it (``FIRST_STEP_STRETCH``).
- Cold, with jobs in flight: the jobs of a model share their polls. No job is expected to
  end before one growth step past the ``COHORT``-th oldest age another job of its kind was
  seen running at (or is being polled at right now): until something completes, a few
  jobs look for all of them, and the others sleep on. A burst of 50 jobs gathered at once
  then costs ``COHORT`` polls a step, not 50. (Not once warm: then the oldest jobs still
  running are the slow ones, and they would hold every new job back.) The first completion
  wakes the sleepers (the follower plans them again): they may be done too.
- Cold, with an estimate: from ``0.45 x estimate`` (estimates can be 2x too high).
- Nothing known at all: ``first_poll``, then the usual growth.
"""

from __future__ import annotations

import bisect
import math
import time
from collections import deque
from collections.abc import Callable, Hashable, Sequence

import attrs

# Bisection steps for a quantile: 2**-24 of the longest duration is far below any poll step.
QUANTILE_STEPS = 24
# Estimates can be this far off either way before anything is learned.
ESTIMATE_LOW_FACTOR = 0.45
ESTIMATE_HIGH_FACTOR = 2.0
# A usable estimate lies in [ESTIMATE_MIN_INTERVALS x min_interval, ESTIMATE_MAX_INTERVALS x max_interval].
ESTIMATE_MIN_INTERVALS = 2.0
ESTIMATE_MAX_INTERVALS = 720.0
# A job that took more than this many times more (or less) than its estimate teaches no ratio.
RATIO_SPAN = 8.0
# The first poll comes no later than this many max_intervals (or first_poll, or the longest seen).
FIRST_POLL_CAP_INTERVALS = 10.0
# Cold: this many jobs look for all the others of their kind at each growth step.
COHORT = 5
# Running jobs remembered per provider+model, as a multiple of the history size.
RUNNING_FACTOR = 4
# A job done at its first poll is taken to have ended somewhere in the CENSORED_REACH growth
# steps below the bound that planned that poll, up to the poll: the low tail stays in view
# (placed at 0 it would drag the median down; at the bound, it could never move below it).
CENSORED_REACH = 2
# With half the jobs done at their first poll, the median is not seen: start this much earlier.
CENSORED_BACKOFF = 0.85
# Warm, the first poll comes this much more than one growth step after the lower bound: only
# the few jobs below that low quantile can see more lag than one step, and the bound itself
# errs low (the low tail is hidden behind first polls that find jobs already done). Each
# tenth of a step here trades about 0.05 polls a job for about 0.6 points of p95 lag; 1.4
# keeps it under 10 % for jobs submitted at a steady rate (see benchmarks/).
FIRST_STEP_STRETCH = 1.4
# While fewer than FEW_DONE jobs are done, the warm bound stays this factor under the
# quickest seen done (about half a step).
FEW_DONE = 32
QUICKEST_MARGIN = 1.04
# Completed jobs kept by when they were accepted, as a multiple of the history size; the warm
# bound reads the settled ones once there are this share of the history size (see _Durations).
SETTLED_FACTOR = 4
SETTLED_SHARE = 0.5
# Past FEW_DONE, the warm bound is worked out again every LOWER_REFRESH completions.
LOWER_REFRESH = 8
# A job waiting on a webhook is polled once it is this much later than the longest expected.
WEBHOOK_LATE_FACTOR = 1.25
# A timer may fire this much before its time; the follower polls then (as it does).
SLACK = 0.001
# A job due within this share of a growth step counts as polled now (see next_poll_age).
IN_FLIGHT_TOLERANCE = 0.5
# A bracket of more than WIDE_STEPS growth steps is wide; wide ones take the shape of the
# narrow ones, once there are WIDE_NEEDS_NARROW of those, and at least WIDE_SHAPE_JOBS of
# them fall within the wide one's span. A first poll's bracket, from CENSORED_REACH steps
# below its bound to the stretched step above it (3.4 steps), is just under it; one whose
# bound has moved on since its poll was planned may be over it, and is shaped too. (Kept
# out of the shaping altogether, they drag the bound down; all shaped, up: both measured.)
WIDE_STEPS = 3.5
WIDE_NEEDS_NARROW = 8
WIDE_SHAPE_JOBS = 0.5

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


def estimate_range(settings: PollSettings) -> tuple[float, float]:
    """The estimates taken at their word: from two shortest intervals to 720 longest ones."""
    return ESTIMATE_MIN_INTERVALS * settings.min_interval, ESTIMATE_MAX_INTERVALS * settings.max_interval


def clean_estimate(estimate: object, settings: PollSettings) -> tuple[float | None, bool]:
    """The estimate a plan may use (None: none), and whether it was usable as given."""
    if isinstance(estimate, bool) or not isinstance(estimate, int | float):
        return None, False
    value = float(estimate)
    if not (math.isfinite(value) and value > 0):
        return None, False
    low, high = estimate_range(settings)
    clamped = min(high, max(low, value))
    return clamped, clamped == value


def first_poll_cap(settings: PollSettings, longest_seen: float | None) -> float:
    """The latest a job's first poll may come: bad estimates must not leave a job unpolled."""
    return max(settings.first_poll, FIRST_POLL_CAP_INTERVALS * settings.max_interval, longest_seen or 0.0)


class _Durations:
    """Completed jobs of one provider+model in one unit (seconds, or multiples of the estimate).

    Kept two ways. ``brackets``, the last ``size`` done, is a fair sample while jobs come at
    a steady rate: the slow jobs left of the oldest accepted (their quick peers have gone)
    stand for the slow ones of the newest, still running. After a burst nothing is running
    to balance them, and the bound would creep up burst after burst. So the jobs are also
    kept by when they were accepted (up to SETTLED_FACTOR x ``size``; when the oldest leaves,
    so do its peers done later). Those accepted before the oldest job still running are
    settled, none of their peers missing either way: the bound reads the ``size`` latest of
    them when there are enough, else the last done (see ``sample``).
    """

    __slots__ = (
        "_accepted",
        "_by_accepted",
        "_left",
        "_size",
        "_upper",
        "added",
        "brackets",
        "cached",
        "stale",
    )

    def __init__(self, size: int) -> None:
        self._size = size
        self.brackets: deque[tuple[float, float]] = deque(maxlen=size)
        self._by_accepted: list[tuple[float, float]] = []
        self._accepted: list[float] = []  # when each of _by_accepted was accepted, in order
        self._left = -math.inf  # jobs accepted by then have left _by_accepted
        self.cached: float | None = None  # the warm lower bound last worked out
        self.stale = False
        self.added = 0  # completions since it was worked out
        self._upper: float | None = None  # the longest seen done, worked out when asked

    def add(self, low: float, high: float, accepted: float) -> None:
        bracket = (low, high)
        self.brackets.append(bracket)
        if accepted > self._left:
            at = bisect.bisect_right(self._accepted, accepted)
            self._accepted.insert(at, accepted)
            self._by_accepted.insert(at, bracket)
            if len(self._accepted) > SETTLED_FACTOR * self._size:
                # The oldest leave with every job accepted at the same time (a coarse clock):
                # what stays of a group is never its slow part.
                self._left = self._accepted[0]
                gone = bisect.bisect_right(self._accepted, self._left)
                del self._accepted[:gone], self._by_accepted[:gone]
        self.added += 1
        self._upper = None
        # Working it out reads every bracket: with many, one more moves it little.
        if len(self.brackets) < FEW_DONE or self.added >= LOWER_REFRESH:
            self.stale = True

    def lower(self, growth: float, running_since: Callable[[], float]) -> float:
        """The warm lower bound, worked out again (lazily: when a plan needs it) if stale.

        ``running_since``: when the oldest job still running was accepted (inf: none, -inf:
        not known; see ``_History.running_since``).
        """
        if self.cached is None or self.stale:
            self.cached, self.added, self.stale = _warm_lower(self.sample(running_since()), growth), 0, False
        return self.cached

    def sample(self, running_since: float) -> Sequence[tuple[float, float]]:
        """The ``size`` latest settled jobs (accepted before ``running_since``) if there are
        SETTLED_SHARE x ``size`` of them, else the last ``size`` done: with many jobs in
        flight, their oldest is older than every job kept by acceptance; and once ``size``
        jobs accepted after it are done (a job stuck for an hour), the settled ones are stale."""
        accepted = self._accepted
        settled = bisect.bisect_left(accepted, running_since)
        if settled < SETTLED_SHARE * self._size or len(accepted) - settled > self._size:
            return self.brackets
        # A group accepted at the same time is read whole, never its later-done part alone.
        first = bisect.bisect_left(accepted, accepted[max(0, settled - self._size)])
        return self._by_accepted[first:settled]

    def planned_with(self) -> float | None:
        """The bound the latest plans used (None: none yet), without working it out again."""
        return self.cached

    def upper(self) -> float:
        if self._upper is None:
            self._upper = max(done for _, done in self.brackets)
        return self._upper


@attrs.define(slots=True)
class _Running:
    """A job of the model still running: the latest age it was seen (or is being polled) at."""

    seen: float  # seconds; raised while a poll is on the wire
    poll: float  # the age its last answered poll was sent at, as the follower reports it
    estimate: float | None
    accepted: float  # on the planner's clock (see _age_now)
    planned: float = 0.0  # the age last planned for its next poll: asked again, it is that old


class _Top:
    """The few highest evidence values among running jobs, kept as they change (cold plans read it)."""

    __slots__ = ("dirty", "entries")

    def __init__(self) -> None:
        self.entries: dict[Hashable, float] = {}
        self.dirty = False

    def offer(self, job: Hashable, value: float) -> None:
        entries = self.entries
        old = entries.get(job)
        if old is not None:
            entries[job] = value
            self.dirty = self.dirty or value < old  # a lower value may no longer be among the top
        elif len(entries) <= COHORT:
            entries[job] = value
        else:
            lowest = min(entries, key=entries.__getitem__)
            if value > entries[lowest]:
                del entries[lowest]
                entries[job] = value

    def drop(self, job: Hashable) -> None:
        if self.entries.pop(job, None) is not None:
            self.dirty = True

    def floor(self, exclude: Hashable | None) -> float | None:
        """The COHORT-th highest value among jobs other than ``exclude``."""
        values = sorted((v for job, v in self.entries.items() if job != exclude), reverse=True)
        return values[COHORT - 1] if len(values) >= COHORT else None


class _History:
    """One provider+model: completed jobs in both units, and the jobs still running."""

    __slots__ = ("by_poll", "done", "exact_at", "ratios", "running", "seconds", "size", "tops")

    def __init__(self, size: int) -> None:
        self.size = size
        self.done = 0  # completions seen
        self.exact_at = -size  # the latest done by callback or sync answer, counted in completions
        self.seconds = _Durations(size)
        self.ratios = _Durations(size)
        self.running: dict[Hashable, _Running] = {}
        # The follower reports a job's last poll age to running() and then plans with it:
        # that age finds the job again (a plan carries no job otherwise).
        self.by_poll: dict[float, Hashable] = {}
        self.tops = [_Top(), _Top()]  # evidence in seconds, and in multiples of the estimate

    def find(self, job: Hashable | None, last_poll: float) -> Hashable | None:
        if job is not None:
            return job if job in self.running else None
        return self.by_poll.get(last_poll)

    def see(self, job: Hashable, entry: _Running, age: float) -> None:
        """``job`` is running at ``age`` (seen, or polled now): evidence for the cold plans."""
        entry.seen = age
        seconds, ratios = self.tops
        seconds.offer(job, age)
        if entry.estimate is not None:
            ratios.offer(job, age / entry.estimate)

    def drop(self, job: Hashable) -> _Running | None:
        entry = self.running.pop(job, None)
        if entry is not None:
            if self.by_poll.get(entry.poll) == job:
                del self.by_poll[entry.poll]
            for top in self.tops:
                top.drop(job)
        return entry

    def running_since(self) -> float:
        """When the oldest job still running was accepted; inf if none, -inf if not known.

        Known from the jobs seen running (polled), unless there are so many that some were
        let go (RUNNING_FACTOR), or jobs that are never polled (callbacks, sync answers) are
        among the last ``size`` done: jobs of theirs may be running unseen.
        """
        if len(self.running) >= RUNNING_FACTOR * self.size or self.done - self.exact_at < self.size:
            return -math.inf
        return min((entry.accepted for entry in self.running.values()), default=math.inf)

    def cold_floor(self, ratio: bool, exclude: Hashable | None) -> float | None:
        """One growth step is added by the caller; this is the COHORT-th oldest evidence."""
        top = self.tops[ratio]
        if top.dirty:
            self._rebuild(ratio)
        return top.floor(exclude)

    def _rebuild(self, ratio: bool) -> None:
        top = self.tops[ratio] = _Top()
        for job, entry in self.running.items():
            if not ratio:
                top.offer(job, entry.seen)
            elif entry.estimate is not None:
                top.offer(job, entry.seen / entry.estimate)


class PollPlanner:
    """Learns per provider+model from every job of the session and plans each job's polls.

    The estimates of ``running``/``completed``/``upper_bound`` are judged against
    ``settings`` (the session's), or those last given to ``next_poll_age``. ``clock`` is
    any monotonic clock: only differences of its readings are used.
    """

    __slots__ = ("_clock", "_growth", "_history", "_settings", "_size")

    def __init__(
        self,
        history: int = 128,
        clock: Callable[[], float] = time.monotonic,
        settings: PollSettings | None = None,
    ) -> None:
        self._size = history
        self._history: dict[Key, _History] = {}
        self._settings = settings or PollSettings()
        # The session's growth, for the brackets' widths: plans may come with another (the
        # keen settings while creates wait for capacity), but the history is the same.
        self._growth = self._settings.growth
        self._clock = clock

    def _of(self, key: Key) -> _History:
        history = self._history.get(key)
        if history is None:
            history = self._history[key] = _History(self._size)
        return history

    def running(self, key: Key, job: Hashable, age: float, estimate: float | None) -> None:
        """A poll sent at ``age`` seconds saw ``job`` still running."""
        history = self._of(key)
        entry = history.running.pop(job, None)
        if entry is None:
            usable, _ = clean_estimate(estimate, self._settings)
            entry = _Running(age, age, usable, self._clock() - _age_now(job, age))
        else:
            # Each answer bounds the accepted time from above (the poll was sent at ``age``):
            # the earliest is the closest.
            entry.accepted = min(entry.accepted, self._clock() - age)
            if history.by_poll.get(entry.poll) == job:
                del history.by_poll[entry.poll]
        entry.poll, entry.planned = age, 0.0
        history.running[job] = entry  # (re)inserted last: the least recently seen leave first
        history.by_poll[age] = job
        history.see(job, entry, age)
        if len(history.running) > RUNNING_FACTOR * self._size:
            history.drop(next(iter(history.running)))

    def completed(
        self, key: Key, job: Hashable, last_running: float, done: float, estimate: float | None
    ) -> None:
        """``job`` was seen done at age ``done``; ``last_running`` is its last age seen running (0: none)."""
        # A wall clock stepped back can make a webhook's age negative: no job takes less than 0.
        done = max(0.0, done)
        last_running = min(max(0.0, last_running), done)
        history = self._of(key)
        entry = history.drop(job)
        history.done += 1
        if 0 < last_running == done:
            history.exact_at = history.done
        # When it was accepted: from its running entry, else from its age now (see _age_now).
        accepted = entry.accepted if entry is not None else self._clock() - _age_now(job, done)
        usable, as_given = clean_estimate(estimate, self._settings)
        if last_running <= 0:
            # Done at its first poll, which the warm bound planned: see CENSORED_REACH.
            bound = _planned_lower(history, usable)
            if bound is not None:
                last_running = min(done, bound / (1 + self._settings.growth) ** CENSORED_REACH)
        if usable is not None and as_given and 1 / RATIO_SPAN <= done / usable <= RATIO_SPAN:
            history.ratios.add(last_running / usable, done / usable, accepted)
        history.seconds.add(last_running, done, accepted)

    def forget(self, key: Key, job: Hashable) -> None:
        """``job`` ended some other way (failed, cancelled): it no longer says anything."""
        history = self._history.get(key)
        if history is not None:
            history.drop(job)

    def warm(self, key: Key) -> bool:
        """True once jobs of this kind have completed, so the bounds are learned."""
        history = self._history.get(key)
        return history is not None and bool(history.seconds.brackets)

    def lower_bound(self, key: Key, estimate: float | None) -> float | None:
        """The earliest a job of this kind plausibly finishes, in seconds; None if nothing is known."""
        history = self._history.get(key)
        usable, _ = clean_estimate(estimate, self._settings)
        warm = self._warm_lower(history, usable) if history is not None else None
        return warm if warm is not None else self._cold_lower(history, usable, None, self._settings)

    def upper_bound(self, key: Key, estimate: float | None) -> float | None:
        """The latest a job of this kind plausibly finishes, in seconds; None if nothing is known."""
        history = self._history.get(key)
        usable, _ = clean_estimate(estimate, self._settings)
        if history is not None:
            if usable is not None and history.ratios.brackets:
                return history.ratios.upper() * usable
            if history.seconds.brackets:
                return history.seconds.upper()
        return usable * ESTIMATE_HIGH_FACTOR if usable is not None else None

    def next_poll_age(
        self,
        key: Key,
        estimate: float | None,
        last_poll: float | None,
        settings: PollSettings,
        job: Hashable | None = None,
    ) -> float:
        """The age at which a job should next be polled (``last_poll``: its last poll's age, if any).

        ``job`` (optional) names the job; without it, a job that was polled is found by its
        ``last_poll`` as reported to ``running()``.
        """
        self._settings = settings
        usable, _ = clean_estimate(estimate, settings)
        history = self._history.get(key)
        growth = 1 + settings.growth
        warm = self._warm_lower(history, usable) if history is not None else None
        if last_poll is None:
            if warm is not None:
                age = warm * (1 + settings.growth * FIRST_STEP_STRETCH)
            else:
                cold = self._cold_lower(history, usable, None, settings)
                age = settings.first_poll if cold is None else cold
            longest = history.seconds.upper() if history is not None and history.seconds.brackets else None
            return min(age, first_poll_cap(settings, longest))
        found = history.find(job, last_poll) if history is not None else None
        lower = warm if warm is not None else self._cold_lower(history, usable, found, settings)
        target = last_poll * growth
        if lower is not None:
            # New knowledge may move a running job on, never closer than one growth step below it.
            target = max(target, lower)
        age = min(last_poll + settings.max_interval, max(last_poll + settings.min_interval, target))
        if warm is None and found is not None and history is not None:
            entry = history.running[found]
            # Asked again with the same last poll, the job's timer has fired at the age planned
            # (or later: a busy loop runs timers late). Moved on by less than a fraction of a
            # step, it polls now rather than sleep so briefly that it may be past it already.
            if entry.planned < age < entry.planned * (1 + settings.growth * IN_FLIGHT_TOLERANCE):
                age = entry.planned
            now = max(self._clock() - entry.accepted, entry.planned)
            entry.planned = age
            # The planner's clock may run a round trip behind the follower's: a job due within
            # a fraction of a step is taken as polled now (at worst it is, that much later).
            if age <= now + max(SLACK, age * settings.growth * IN_FLIGHT_TOLERANCE):
                history.see(found, entry, age)  # polled now: the others need not look this step
        return age

    def _warm_lower(self, history: _History | None, usable: float | None) -> float | None:
        """The learned lower bound in seconds, in the unit this job's estimate allows; None: cold."""
        if history is None:
            return None
        if usable is not None and history.ratios.brackets:
            return history.ratios.lower(self._growth, history.running_since) * usable
        if history.seconds.brackets:
            return history.seconds.lower(self._growth, history.running_since)
        return None

    def _cold_lower(
        self, history: _History | None, usable: float | None, job: Hashable | None, settings: PollSettings
    ) -> float | None:
        """Before anything completed: after the cohort's evidence, and from an estimate."""
        bounds = []
        if usable is not None:
            bounds.append(ESTIMATE_LOW_FACTOR * usable * (1 + settings.growth))
        if history is not None:
            floor = history.cold_floor(usable is not None, job)
            if floor is not None:
                bounds.append(floor * (usable or 1.0) * (1 + settings.growth))
        return max(bounds) if bounds else None


def _age_now(job: Hashable, sent: float) -> float:
    """A running job's age now: from its wall-clock ``submitted_at`` if it has one (a TaskHandle
    does; the poll's answer may have taken a while in a burst), else the age its poll was sent at."""
    submitted = getattr(job, "submitted_at", None)
    if isinstance(submitted, float):
        return max(sent, time.time() - submitted)
    return sent


def _planned_lower(history: _History, usable: float | None) -> float | None:
    """The warm lower bound (seconds) the job's own first poll was most likely planned with."""
    ratio = history.ratios.planned_with() if usable is not None else None
    if ratio is not None and usable is not None:
        return ratio * usable
    return history.seconds.planned_with()


def _warm_lower(brackets: Sequence[tuple[float, float]], growth: float) -> float:
    """The 3rd percentile of the durations the brackets describe (see the module docstring)."""
    censored = [done for running, done in brackets if running <= 0]
    seen = [(running, done) for running, done in brackets if running > 0]
    total = len(brackets)
    if len(censored) >= 0.5 * total or len(seen) < 4:
        # The median is hidden below the first polls: start earlier than most were seen done.
        reference = sorted(censored)[len(censored) // 2] if censored else min(r for r, _ in seen)
        return reference * CENSORED_BACKOFF

    censored.sort()
    highest = max(done for _, done in brackets)
    # A bracket of many steps (a job that slept on the others' polls until one was seen
    # done) says little of where in it the job ended: it is spread the way the narrow
    # brackets are over its span, evenly only where too few of them fall in it.
    span = (1 + growth) ** WIDE_STEPS
    narrow = [(running, done) for running, done in seen if done <= running * span]
    wide = [(running, done) for running, done in seen if done > running * span]
    if len(narrow) < WIDE_NEEDS_NARROW:
        narrow, wide = seen, []

    def narrow_done_by(x: float) -> float:
        # Each narrow job is spread evenly over its bracket. (The loop is the planner's hot
        # spot: plain arithmetic, no call per bracket.)
        count = 0.0
        for running, done in narrow:
            if x >= done:
                count += 1.0
            elif x > running:
                count += (x - running) / (done - running)
        return count

    wide_ends = [(narrow_done_by(running), narrow_done_by(done)) for running, done in wide]

    def share_done_by(x: float) -> float:
        # A censored job sits at its bound.
        count = shaped = narrow_done_by(x)
        for (running, done), (before, by_done) in zip(wide, wide_ends, strict=True):
            if x >= done:
                count += 1.0
            elif x > running:
                if by_done - before >= WIDE_SHAPE_JOBS:
                    count += min(1.0, max(0.0, (shaped - before) / (by_done - before)))
                else:
                    count += (x - running) / (done - running)
        return (count + bisect.bisect_right(censored, x)) / total

    def quantile(p: float) -> float:
        low, high = 0.0, highest
        for _ in range(QUANTILE_STEPS):
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


def webhook_wait(upper_bound: float | None, settings: PollSettings) -> float:
    """How long a job waits for its callback before the polling safety net starts."""
    if upper_bound is None:
        return settings.webhook_unknown_wait
    return upper_bound * WEBHOOK_LATE_FACTOR + settings.webhook_grace
