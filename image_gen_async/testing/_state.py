"""Configuration, counters and task records of the emulator (plain data, no I/O)."""

from __future__ import annotations

import heapq
import time
from collections import Counter, defaultdict, deque
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

Provider = Literal["get3w", "get3w_v3", "dh3", "nananobanana"]
PROVIDERS: tuple[str, ...] = ("get3w", "get3w_v3", "dh3", "nananobanana")
#: The account each API bills and caps: Get3W's v1 and v3 are one account per key.
ACCOUNTS: dict[str, str] = {
    "get3w": "get3w",
    "get3w_v3": "get3w",
    "dh3": "dh3",
    "nananobanana": "nananobanana",
}
ACCOUNT_NAMES: tuple[str, ...] = ("get3w", "dh3", "nananobanana")
Kind = Literal["create", "poll", "file", "other"]
Outcome = Literal["completed", "failed", "nsfw"]
State = Literal["queued", "running", "completed", "failed"]

#: Share of a job's duration spent queued before it reports "processing".
QUEUED_SHARE = 0.2
FAIL_MARKER = "[fail]"
NSFW_MARKER = "[nsfw]"
SLOW_MARKER = "[slow]"
SLOW_FACTOR = 10.0
UPSTREAM_ERROR = "Upstream model error"
SAFETY_ERROR = "Content safety check failed"


@dataclass
class Faults:
    """Random fault rates, each a probability applied independently per request."""

    poll_5xx: float = 0.0
    poll_drop: float = 0.0
    poll_non_json: float = 0.0
    create_429: float = 0.0
    create_503: float = 0.0
    create_drop_before: float = 0.0
    create_drop_after: float = 0.0
    retry_after: float | None = 1.0
    slow: float = 0.0
    slow_seconds: float = 0.5


@dataclass
class EmulatorConfig:
    """Everything that shapes the emulator's behaviour; mutable while it runs."""

    duration: float = 0.2  # mean seconds a job takes
    duration_spread: float = 0.0  # each job's duration is uniform in mean*(1±spread)
    durations: dict[str, float] = field(default_factory=dict)  # model id as reported -> mean
    estimate_bias: float = 1.0  # Get3W v1 estimated_duration = model mean * bias
    failure_rate: float = 0.0  # share of accepted jobs that end failed (seeded)
    dh3_qps: float | None = 3.0  # dh3 creates per sliding second; None = no limit
    api_keys: dict[str, str] | None = None  # provider -> its one key; None = any Bearer token
    dh3_errors_under_http_200: bool = False  # dh3 errors as HTTP 200 with code != 200
    v3_poll_origin: str | None = None  # origin put in Get3W v3 urls.get instead of our own
    faults: Faults = field(default_factory=Faults)
    seed: int = 0  # seeds the fault, job and webhook RNGs (read once, at Emulator())
    image_size: tuple[int, int] = (64, 64)  # PNG served at output URLs (reshaped to aspect_ratio)
    credits: int = 1_000_000  # nananobanana starting credits (read once, at Emulator())
    webhook_secret: str | None = "whsec_test"  # HMAC key of X-Get3W-Signature (v3); None = unsigned
    webhook_drop: float = 0.0  # probability a finished job's callback is never sent
    webhook_duplicate: float = 0.0  # probability it is delivered twice
    webhook_delay: float = 0.0  # seconds between a job's end and its callback
    webhook_timeout: float = 5.0  # seconds the receiver has to answer one attempt
    dh3_callback_retry_delay: float = 0.05  # spacing of dh3's 3 callback retries
    record_requests: bool = True  # keep `Emulator.requests` (switch off for benchmarks)
    # Account limits (see `_emulator`); the defaults impose none.
    max_concurrent: dict[str, int] = field(default_factory=dict)  # account -> unfinished tasks per key
    capacity_retry_after: float | None = None  # Retry-After on capacity refusals; None = no header
    get3w_balance: dict[str, int] = field(default_factory=dict)  # Get3W key -> creates left (read once)
    down: set[str] = field(default_factory=set)  # providers whose every request loses its connection
    revoked_keys: set[str] = field(default_factory=set)  # Bearer keys refused with 401 by every provider
    # False: every answer closes its connection, so `refuse_connections()` refuses every next request.
    keep_alive: bool = True

    def mean_duration(self, model: str) -> float:
        """Mean job duration of `model`, from `durations` or the default."""
        return self.durations.get(model, self.duration)


def _counter() -> Counter[str]:
    """A per-provider counter field (missing keys read 0)."""
    return Counter()


def _per_key() -> defaultdict[str, Counter[str]]:
    """An account -> key -> count field (missing accounts and keys read 0)."""
    return defaultdict(Counter)


@dataclass
class Stats:
    """What the emulator received and did, so tests can assert on it.

    Per-provider Counters read 0 for missing keys. `webhooks_sent` counts deliveries the
    receiver acknowledged (2xx; dh3: exactly 200), `webhooks_failed` those given up,
    `webhook_attempts` every POST tried; `faults_injected` is keyed (provider, kind, fault).
    `first_create_at` / `last_create_at` are the emulator's monotonic clock at the first
    and last create request, so a test can compute the rate the server saw.
    `capacity_refusals` counts creates refused for a per-key cap (not in `rate_limited`),
    `payment_refusals` those refused for money (402 credits, Get3W 403 balance),
    `down_drops` requests dropped while their provider was down (not counted elsewhere);
    `peak_running[account][key]` is the most unfinished tasks that key ever had at once.
    """

    creates: Counter[str] = field(default_factory=_counter)
    create_requests: Counter[str] = field(default_factory=_counter)
    polls: Counter[str] = field(default_factory=_counter)
    rate_limited: Counter[str] = field(default_factory=_counter)
    max_creates_in_1s: Counter[str] = field(default_factory=_counter)
    first_create_at: dict[str, float] = field(default_factory=dict)
    last_create_at: dict[str, float] = field(default_factory=dict)
    webhooks_sent: Counter[str] = field(default_factory=_counter)
    webhook_attempts: Counter[str] = field(default_factory=_counter)
    webhooks_failed: Counter[str] = field(default_factory=_counter)
    faults_injected: Counter[tuple[str, str, str]] = field(default_factory=Counter)
    failed_tasks: set[str] = field(default_factory=set)
    downloads: int = 0
    capacity_refusals: Counter[str] = field(default_factory=_counter)
    payment_refusals: Counter[str] = field(default_factory=_counter)
    down_drops: Counter[str] = field(default_factory=_counter)
    peak_running: defaultdict[str, Counter[str]] = field(default_factory=_per_key)

    def as_json(self) -> dict[str, Any]:
        """The counters as plain JSON, for an emulator running in another process."""
        return {
            "creates": dict(self.creates),
            "create_requests": dict(self.create_requests),
            "polls": dict(self.polls),
            "rate_limited": dict(self.rate_limited),
            "max_creates_in_1s": dict(self.max_creates_in_1s),
            "first_create_at": dict(self.first_create_at),
            "last_create_at": dict(self.last_create_at),
            "webhooks_sent": dict(self.webhooks_sent),
            "webhook_attempts": dict(self.webhook_attempts),
            "webhooks_failed": dict(self.webhooks_failed),
            "failed_tasks": sorted(self.failed_tasks),
            "downloads": self.downloads,
            "capacity_refusals": dict(self.capacity_refusals),
            "payment_refusals": dict(self.payment_refusals),
            "down_drops": dict(self.down_drops),
            "peak_running": {account: dict(peaks) for account, peaks in self.peak_running.items()},
        }


@dataclass(slots=True)
class RecordedRequest:
    """One request as the emulator received it."""

    provider: str
    kind: Kind
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    json: Any
    at: float


@dataclass(slots=True)
class EmuTask:
    """One job the emulator accepted; its state is derived from the clock."""

    provider: str
    model: str
    input: dict[str, Any]
    created_at: float
    duration: float
    outcome: Outcome
    webhook: str | None
    id: str = ""
    created_wall: float = field(default_factory=time.time)
    origin: str = ""
    image_size: tuple[int, int] = (64, 64)
    credits_used: int = 0
    remaining_credits: int = 0

    @property
    def finish_at(self) -> float:
        """Monotonic time at which the job ends."""
        return self.created_at + self.duration

    @property
    def error(self) -> str | None:
        """The error text a failed job reports, None for a successful one."""
        return {"completed": None, "failed": UPSTREAM_ERROR, "nsfw": SAFETY_ERROR}[self.outcome]

    def state(self, now: float | None = None) -> State:
        """Where the job is at `now` (monotonic): queued, running or finished."""
        elapsed = (time.monotonic() if now is None else now) - self.created_at
        if elapsed >= self.duration:
            return "completed" if self.outcome == "completed" else "failed"
        return "queued" if elapsed < self.duration * QUEUED_SHARE else "running"

    def output_urls(self) -> list[str]:
        """URLs of the job's files (one image), served by the emulator itself."""
        return [f"{self.origin}/files/{self.id}/0.png"]

    def elapsed_ms(self) -> int:
        """The job's whole duration in integer milliseconds."""
        return round(self.duration * 1000)

    def iso_created(self, millis: bool = True) -> str:
        """Creation time in UTC, with milliseconds and Z, or to the second without Z."""
        return iso_time(self.created_wall, millis)

    def iso_finished(self) -> str:
        """Completion time in UTC with milliseconds and Z."""
        return iso_time(self.created_wall + self.duration, True)


def sized_for(base: tuple[int, int], aspect_ratio: object) -> tuple[int, int]:
    """The PNG size for a requested aspect ratio ("16:9"): the longer side of `base` kept.

    Anything that is not "W:H" with positive numbers ("auto", "default", None) gives `base`.
    """
    if not isinstance(aspect_ratio, str):
        return base
    width_text, sep, height_text = aspect_ratio.partition(":")
    try:
        ratio = float(width_text) / float(height_text) if sep else 0.0
    except (ValueError, ZeroDivisionError):
        return base
    if ratio <= 0:
        return base
    side = max(base)
    if ratio >= 1:
        return side, max(1, round(side / ratio))
    return max(1, round(side * ratio)), side


def iso_time(wall: float, millis: bool) -> str:
    """Format a wall-clock time as `YYYY-MM-DDTHH:MM:SS.mmmZ` or `YYYY-MM-DDTHH:MM:SS`."""
    moment = datetime.fromtimestamp(wall, UTC)
    if millis:
        return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")
    return moment.strftime("%Y-%m-%dT%H:%M:%S")


class ArrivalWindow:
    """Create arrivals of one provider in the last second, for QPS limits and stats."""

    __slots__ = ("_times",)

    def __init__(self) -> None:
        self._times: deque[float] = deque()

    def arrive(self, now: float) -> int:
        """Record an arrival at `now` and return how many fell in (now-1s, now]."""
        times = self._times
        times.append(now)
        while times[0] <= now - 1.0:
            times.popleft()
        return len(times)


class RunningTasks:
    """Finish times of one key's unfinished tasks, to count how many run at an instant.

    A task counts from its accepted create until its finish time (completed or failed);
    a deleted prediction keeps counting: its work was started and is not given back.
    """

    __slots__ = ("_ends",)

    def __init__(self) -> None:
        self._ends: list[float] = []

    def count(self, now: float) -> int:
        """How many tasks are unfinished at `now` (monotonic); forgets the finished ones."""
        ends = self._ends
        while ends and ends[0] <= now:
            heapq.heappop(ends)
        return len(ends)

    def add(self, finish_at: float) -> None:
        """A task accepted now that ends at `finish_at`."""
        heapq.heappush(self._ends, finish_at)
