"""Batches against account limits: a capped account, credits that run out, a credit budget."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from image_gen_async import ConfigurationError, InvalidRequestError, PollSettings
from image_gen_async.batch import CreditBudget, JobSpec, run_batch
from image_gen_async.testing import Emulator

from .batch_helpers import results, state_counts
from .conftest import KEYS, SessionFactory
from .test_cli import cli, write_jobs

NANO = "nano-banana"
QUICK = PollSettings(first_poll=0.005, min_interval=0.002, max_interval=0.05)


def prompts(count: int) -> Iterator[JobSpec]:
    return ({"prompt": f"a fox, take {i}"} for i in range(count))


@pytest.mark.parametrize(
    ("limit", "cost", "spent", "reserved", "fits"),
    [
        (10, 1, 0, 0, True),
        (10, 1, 9, 0, True),
        (10, 1, 9, 1, False),  # a running job may still cost its price
        (10, 2, 9, 0, False),
        (0, 1, 0, 0, False),
        (5, 0, 5, 0, True),  # a free model always fits
    ],
)
def test_a_job_starts_only_when_it_fits_the_budget(
    limit: float, cost: float, spent: float, reserved: float, fits: bool
) -> None:
    budget = CreditBudget(limit, cost, spent, reserved)
    assert budget.reserve() is fits
    assert budget.reserved == reserved + (cost if fits else 0)


def test_a_settled_job_counts_what_it_cost() -> None:
    budget = CreditBudget(10, 2)
    assert budget.reserve()
    budget.settle(1.0)
    assert (budget.spent, budget.reserved) == (1.0, 0.0)
    assert budget.reserve()
    budget.release()
    assert (budget.spent, budget.reserved) == (1.0, 0.0)


@pytest.mark.alone
async def test_200_jobs_on_a_capped_account_all_finish(
    make_session: SessionFactory, emulator: Emulator, tmp_path: Path
) -> None:
    emulator.config.duration = 0.05
    emulator.config.max_concurrent = {"nananobanana": 10}
    stats = await run_batch(
        make_session(polling=QUICK), "nananobanana", NANO, prompts(200), out_dir=tmp_path, download=False
    )
    assert stats.done == 200 and stats.failed == 0 and stats.ok
    assert emulator.stats.creates["nananobanana"] == 200
    # The creates on the wire when the first refusal comes back (about the cap itself, more on a
    # loaded machine), then the slow probes for a raised cap: never a refusal per job.
    assert emulator.stats.capacity_refusals["nananobanana"] <= 20


async def test_credits_running_out_stop_the_batch_and_a_top_up_finishes_it(
    make_session: SessionFactory, emulator: Emulator, tmp_path: Path
) -> None:
    emulator.credits = 5
    stats = await run_batch(
        make_session(polling=QUICK), "nananobanana", NANO, prompts(40), out_dir=tmp_path, download=False
    )
    assert stats.done == 5 and stats.failed == 0 and stats.account_stopped
    assert stats.stopped is not None and "402" in stats.stopped
    assert state_counts(tmp_path) == {"done": 5, "pending": 35}
    assert stats.credits_used == 5
    emulator.credits = 100
    again = await run_batch(
        make_session(polling=QUICK), "nananobanana", NANO, prompts(40), out_dir=tmp_path, download=False
    )
    assert again.ok and again.done == 40 and again.created == 35
    assert emulator.stats.creates["nananobanana"] == 40  # every line created exactly once
    assert len(results(tmp_path)) == 40


async def test_the_cli_stops_on_no_credits_with_exit_1_and_a_rerun_finishes(
    emulator: Emulator, tmp_path: Path
) -> None:
    emulator.credits = 3
    source = write_jobs(tmp_path / "jobs.jsonl", [f"a fox, take {i}" for i in range(8)])
    out = tmp_path / "out"
    args = ("batch", str(source), "--provider", "nananobanana", "--model", NANO, "-o", str(out))
    args += ("--base-url", emulator.url, "--no-download")
    args += ("--first-poll", "0.01", "--min-poll-interval", "0.005")
    keys = {"NANANOBANANA_API_KEY": KEYS["nananobanana"]}
    code, stdout, stderr = await cli(*args, keys=keys)
    assert code == 1, stdout + stderr
    assert "PaymentRequiredError" in stderr and "not sent" in stderr
    assert state_counts(out) == {"done": 3, "pending": 5}
    emulator.credits = 100
    code, stdout, stderr = await cli(*args, keys=keys)
    assert code == 0, stdout + stderr
    assert emulator.stats.creates["nananobanana"] == 8


async def test_max_credits_never_starts_a_job_past_the_budget(
    make_session: SessionFactory, emulator: Emulator, tmp_path: Path
) -> None:
    emulator.credits = 100
    stats = await run_batch(
        make_session(polling=QUICK),
        "nananobanana",
        "nano-banana-pro",  # 2 credits a job in the emulator's models list
        prompts(20),
        out_dir=tmp_path,
        download=False,
        max_credits=9,
    )
    assert stats.done == 4 and stats.credits_used == 8 and stats.account_stopped
    assert stats.stopped is not None and "credit budget" in stats.stopped
    assert emulator.stats.creates["nananobanana"] == 4 and emulator.credits == 92
    assert stats.pending == 16 and state_counts(tmp_path)["done"] == 4  # the rest never sent


async def test_max_credits_needs_a_provider_that_lists_prices(
    make_session: SessionFactory, emulator: Emulator, tmp_path: Path
) -> None:
    with pytest.raises(ConfigurationError, match="no prices"):
        await run_batch(make_session(), "dh3", "nano-banana-pro", prompts(3), out_dir=tmp_path, max_credits=5)
    assert emulator.stats.creates["dh3"] == 0


@pytest.mark.parametrize(
    ("option", "value", "error"),
    [
        ("concurrency", 0, ConfigurationError),
        ("concurrency", 1.5, ConfigurationError),
        ("concurrency", True, ConfigurationError),
        ("max_bytes", 0, InvalidRequestError),
        ("max_bytes", "10", InvalidRequestError),
        ("max_credits", -1, ConfigurationError),
    ],
)
async def test_bad_batch_options_are_refused_before_anything_is_sent(
    make_session: SessionFactory, emulator: Emulator, tmp_path: Path, option: str, value: object, error: type
) -> None:
    with pytest.raises(error, match=option):
        await run_batch(make_session(), "nananobanana", NANO, prompts(3), out_dir=tmp_path, **{option: value})
    assert sum(emulator.stats.create_requests.values()) == 0
