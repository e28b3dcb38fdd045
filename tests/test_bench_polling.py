"""The polling benchmark's learning baseline reads what it is told the way it says it does."""

from __future__ import annotations

import random
import statistics
from pathlib import Path

import pytest

CHECKOUT = str(Path(__file__).resolve().parents[1])  # where ``benchmarks`` lives


def test_learned_exactly_starts_at_the_fifth_percentile_of_the_latest_history(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.syspath_prepend(CHECKOUT)
    from benchmarks.polling import KNOWN_LAG, LearnedExactly, known_spread

    learner = LearnedExactly()
    assert learner(0, 0.0) == known_spread()(0, 0.0)  # nothing told yet: the spread's schedule
    rng = random.Random(1)
    # 300 jobs started one a second: the latest 128 take about 1 s, the others 100 s or more
    # (so most of the last to finish started early).
    report = {}
    for i in range(300):
        duration = rng.uniform(100.0, 200.0) if i < 300 - LearnedExactly.HISTORY else rng.uniform(0.9, 1.1)
        report[f"task{i}"] = (i + duration, duration, None)
    shuffled = dict(rng.sample(sorted(report.items()), len(report)))  # the report's order says nothing
    learner.learn(shuffled)
    latest = [duration for _, duration, _ in list(report.values())[-LearnedExactly.HISTORY :]]
    fifth = statistics.quantiles(latest, n=20, method="inclusive")[0]
    first = fifth * (1 + KNOWN_LAG)
    assert learner(0, 0.0) == pytest.approx(first)
    assert learner(0, first) == 0.0  # due now
    assert learner(1, first) == pytest.approx(first * 0.08)  # then the library's growth step
