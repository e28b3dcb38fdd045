"""What the benchmarks share: scaled time, a result row, resource helpers."""

from __future__ import annotations

import resource
import statistics
from collections.abc import Sequence

import attrs

from image_gen_async import AsyncSession, PollSettings
from image_gen_async.providers import EXAMPLE_MODELS

# Emulated jobs run this much faster than real ones (a 27 s job takes 1 s).
TIME_SCALE = 1 / 27
SCALED_POLLING = PollSettings().scaled(TIME_SCALE)
CLIENTS = ("get3w", "get3w_v3", "dh3", "nananobanana")
MODELS = EXAMPLE_MODELS


@attrs.frozen
class Row:
    """One figure next to its baseline and target."""

    section: str
    measure: str
    ours: str
    baseline: str
    target: str
    ok: bool | None


def session_for(url: str, **options: object) -> AsyncSession:
    """A session on the emulator at ``url`` for every client, with scaled-down polling."""
    defaults: dict[str, object] = {
        "api_keys": dict.fromkeys(CLIENTS, "bench-key"),
        "base_urls": dict.fromkeys(CLIENTS, url),
        "rate_limits": {"dh3": None},
        "polling": SCALED_POLLING,
    }
    return AsyncSession(**(defaults | options))  # type: ignore[arg-type]


def raise_file_limit() -> None:
    """Thousands of sockets at once need more descriptors than the usual soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def rss_bytes() -> int:
    """This process's resident set size now."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def p95(values: Sequence[float]) -> float:
    """The 95th percentile."""
    return statistics.quantiles(values, n=20, method="inclusive")[18] if len(values) > 1 else values[0]
