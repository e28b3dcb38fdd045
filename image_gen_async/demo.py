"""The demo: a batch on each of the four APIs, and one routed over three providers, against
the built-in emulator, no keys needed.

``image-gen-async demo`` (``python -m image_gen_async.demo`` is an alias) starts the
emulator on loopback, runs ``--jobs`` jobs per API through ``run_batch`` at once, under
a scaled dh3 limit, with a live progress bar; it writes real PNGs and prints what the
client did next to what the emulator counted. Beside them, ``--jobs`` jobs of one model
(Nano Banana) go through a router over dh3, Get3W and nananobanana on a second emulator
whose accounts each run only a few tasks at once, so the batch fills all three.
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
from collections.abc import Awaitable, Iterator
from pathlib import Path
from typing import Any

from rich.console import Console

from . import AsyncSession, ConfigurationError, PollSettings, Target
from ._progress import LANE_COLUMNS, BatchDisplay, lane_row, print_table
from .batch import JOURNAL_NAME, BatchStats, JobSpec, read_results, run_batch
from .providers import EXAMPLE_MODELS
from .testing import EmulatorProcess

MODELS = EXAMPLE_MODELS
DH3_RATE = 40.0  # the real dh3 limit is 3/s; time in the demo runs ~13x faster
ASPECT_RATIOS = ("1:1", "16:9", "3:4")  # the emulator shapes each PNG to the one asked for
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# One model under three providers' names, and what each account runs at once in the demo.
ROUTED = (
    Target("dh3", "nano-banana-pro"),
    Target("get3w", "google/nano-banana-pro/text-to-image"),
    Target("nananobanana", "nano-banana"),
)
ROUTED_CAPS = {"dh3": 6, "get3w": 8, "nananobanana": 4}
ROUTER = "router"


def demo_jobs(name: str, count: int) -> Iterator[JobSpec]:
    """The demo's job specs for one API."""
    for i in range(count):
        yield {"prompt": f"demo image {i} on {name}", "aspect_ratio": ASPECT_RATIOS[i % len(ASPECT_RATIOS)]}


def _out_dir(chosen: Path | None) -> Path:
    if chosen is None:
        return Path(tempfile.mkdtemp(prefix="image-gen-async-demo-"))
    # A fresh emulator knows none of an earlier run's tasks, so resuming one cannot work.
    if any((chosen / name / JOURNAL_NAME).exists() for name in (*MODELS, ROUTER)):
        raise ConfigurationError(f"{chosen} holds an earlier demo: give a new directory")
    return chosen


async def run_demo(jobs: int, duration: float, out_dir: Path | None, console: Console) -> int:
    """Run the demo; 0 when every job ended as the emulator decided and each was created once."""
    directory = _out_dir(out_dir)
    common = ("--duration", str(duration), "--duration-spread", "0.1", "--failure-rate", "0.02")
    caps = [arg for account, cap in ROUTED_CAPS.items() for arg in ("--max-concurrent", f"{account}={cap}")]
    # In their own processes, as providers would be: in this one, the batches' own work would
    # delay the servers' clocks and bunch creates that were sent evenly.
    async with (
        EmulatorProcess(*common, "--dh3-qps", str(DH3_RATE), "--no-record") as emulator,
        EmulatorProcess(*common, "--dh3-qps", str(DH3_RATE), "--no-record", *caps) as routed,
    ):
        console.print(
            f"emulator on {emulator.url}; {jobs} jobs on each of {', '.join(MODELS)}; "
            f"{jobs} more routed over {', '.join(target.provider for target in ROUTED)} on {routed.url} "
            f"(at most {', '.join(f'{n} {a}' for a, n in ROUTED_CAPS.items())} tasks at once)",
            highlight=False,
        )
        async with _session(emulator.url, duration) as session, _session(routed.url, duration) as on_routed:
            router = on_routed.router(list(ROUTED))
            with BatchDisplay(console) as display:

                def batch(name: str, on: AsyncSession, model: str | None = None) -> Awaitable[BatchStats]:
                    """The demo's batch ``name``: on that client and model, or through the router."""
                    specs, out = demo_jobs(name, jobs), directory / name
                    options: dict[str, Any] = {"total": jobs, "on_progress": display.track(name, jobs)}
                    if model is None:
                        return run_batch(on, router, specs, out_dir=out, **options)
                    return run_batch(on, name, model, specs, out_dir=out, **options)

                batches = [batch(name, session, model) for name, model in MODELS.items()]
                batches.append(batch(ROUTER, on_routed))
                results = await asyncio.gather(*batches)
            lanes = list(router.stats.values())
        counted = await emulator.stats()
        counted_routed = await routed.stats()
    stats = dict(zip((*MODELS, ROUTER), results, strict=True))
    print_table(console, "router targets", LANE_COLUMNS, [lane_row(lane) for lane in lanes])
    return _report(stats, counted, counted_routed, directory, console)


def _session(url: str, duration: float) -> AsyncSession:
    """A session with every client on the emulator at ``url``."""
    return AsyncSession(
        api_keys=dict.fromkeys(MODELS, "demo-key"),
        base_urls=dict.fromkeys(MODELS, url),
        rate_limits={"dh3": DH3_RATE},
        # The emulator shares this machine's cores with the demo, which keeps them busy:
        # when its process is scheduled late it counts several arrivals at once. A wider
        # jitter budget than the default 25 ms keeps its count honest on a small machine.
        rate_limit_margin=0.06,
        polling=PollSettings(first_poll=duration / 2, min_interval=0.01, max_interval=1.0),
    )


def _report(
    stats: dict[str, BatchStats],
    counted: dict[str, Any],
    counted_routed: dict[str, Any],
    directory: Path,
    console: Console,
) -> int:
    """The summary table, and whether the client's view matches the emulators' counters."""
    columns = ("api", "jobs", "done", "failed", "PNGs", "creates", "max/1s", "429s", "polls/job", "seconds")
    rows: list[list[object]] = []
    failed_here: dict[str, set[str]] = {"": set(), ROUTER: set()}
    consistent = True
    for name, batch in stats.items():
        failed = {r["task_id"] for r in read_results(directory / name) if r["status"] == "failed"}
        failed_here["" if name != ROUTER else ROUTER] |= failed
        pngs = sum(1 for path in (directory / name).glob("*.png") if path.read_bytes()[:8] == PNG_SIGNATURE)
        jobs = batch.total or 0
        # The routed batch is the only user of its emulator: every provider's count is its own.
        creates, most, limited, polls = _counts(counted_routed) if name == ROUTER else _counts(counted, name)
        consistent &= batch.done + batch.failed == jobs and creates == jobs and pngs == batch.done
        per_job = polls / max(1, jobs)
        rows.append([name, jobs, batch.done, batch.failed, pngs, creates, most, limited, per_job])
        rows[-1].append(batch.elapsed)
    # The jobs that failed are exactly those the emulators decided to fail.
    consistent &= failed_here[""] == set(counted["failed_tasks"])
    consistent &= failed_here[ROUTER] == set(counted_routed["failed_tasks"])
    print_table(console, "demo summary", columns, rows)
    verdict = (
        "every job created exactly once and ended as the emulator decided"
        if consistent
        else "CLIENT AND EMULATOR DISAGREE"
    )
    console.print(
        f"dh3 limit {DH3_RATE:g}/s; {verdict}.\nimages and results.jsonl per API in {directory}",
        highlight=False,
        soft_wrap=True,
    )
    return 0 if consistent else 1


def _counts(counted: dict[str, Any], name: str | None = None) -> tuple[int, int, int, int]:
    """Creates, most creates in one second, 429s and polls: of ``name``, or of every API summed."""
    names = [name] if name is not None else list(counted["creates"])

    def total(figure: str) -> int:
        return sum(counted[figure].get(each, 0) for each in names)

    most = max((counted["max_creates_in_1s"].get(each, 0) for each in names), default=0)
    return total("creates"), most, total("rate_limited"), total("polls")


def main(argv: list[str] | None = None) -> int:
    """``python -m image_gen_async.demo``: the same as ``image-gen-async demo``."""
    from .cli import main as cli_main

    return cli_main(["demo", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
