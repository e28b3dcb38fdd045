"""The polling benchmark's learning baseline reads what it is told the way it says it does."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

CHECKOUT = str(Path(__file__).resolve().parents[1])  # where ``benchmarks`` lives


def test_learned_exactly_starts_at_the_fifth_percentile_of_the_latest_history(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.syspath_prepend(CHECKOUT)
    from benchmarks._common import SCALED_POLLING
    from benchmarks.polling import KNOWN_LAG, LearnedExactly, known_spread

    learner = LearnedExactly()
    assert learner(0, 0.0) == known_spread()(0, 0.0)  # nothing told yet: the spread's schedule
    rng = random.Random(1)
    history = LearnedExactly.HISTORY
    # 300 jobs started one a second: the latest 128 take 0.9 s to 1.1 s in even steps (in a
    # shuffled order), the others 100 s or more (so most of the last to finish started early).
    latest = [0.9 + 0.2 * k / (history - 1) for k in range(history)]
    rng.shuffle(latest)
    durations = [rng.uniform(100.0, 200.0) for _ in range(300 - history)] + latest
    report = {f"task{i}": (i + duration, duration, None) for i, duration in enumerate(durations)}
    learner.learn(dict(rng.sample(sorted(report.items()), len(report))))  # the order says nothing
    # The sample's 5th percentile, read at rank (n + 1) x 0.05 = 6.45 of the sorted 128: between
    # the 6th (0.9 + 0.2 x 5/127) and the 7th, 0.45 of the way. (The inclusive reading, at rank
    # 1 + (n - 1) x 0.05 = 7.35, would be 0.9 + 0.2 x 6.35/127: later.)
    fifth = 0.9 + 0.2 * 5.45 / (history - 1)
    first = fifth * (1 + KNOWN_LAG)
    assert learner(0, 0.0) == pytest.approx(first)
    assert learner(0, first) == 0.0  # due now
    assert learner(1, first) == pytest.approx(first * SCALED_POLLING.growth)  # then one growth step
