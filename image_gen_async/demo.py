"""The demo: a batch on each of the four APIs against the built-in emulator, no keys needed.

``image-gen-async demo`` (``python -m image_gen_async.demo`` is an alias) starts the
emulator on loopback, runs ``--jobs`` jobs per API through ``run_batch`` at once, under
a scaled dh3 limit, with a live progress bar; it writes real PNGs and prints what the
client did next to what the emulator counted.
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from rich.console import Console

from . import AsyncSession, ConfigurationError, PollSettings
from ._progress import BatchDisplay, print_table
from .batch import JOURNAL_NAME, BatchStats, JobSpec, read_results, run_batch
from .providers import EXAMPLE_MODELS
from .testing import EmulatorProcess

MODELS = EXAMPLE_MODELS
DH3_RATE = 40.0  # the real dh3 limit is 3/s; time in the demo runs ~13x faster
ASPECT_RATIOS = ("1:1", "16:9", "3:4")  # the emulator shapes each PNG to the one asked for
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def demo_jobs(name: str, count: int) -> Iterator[JobSpec]:
    """The demo's job specs for one API."""
    for i in range(count):
        yield {"prompt": f"demo image {i} on {name}", "aspect_ratio": ASPECT_RATIOS[i % len(ASPECT_RATIOS)]}


def _out_dir(chosen: Path | None) -> Path:
    if chosen is None:
        return Path(tempfile.mkdtemp(prefix="image-gen-async-demo-"))
    # A fresh emulator knows none of an earlier run's tasks, so resuming one cannot work.
    if any((chosen / name / JOURNAL_NAME).exists() for name in MODELS):
        raise ConfigurationError(f"{chosen} holds an earlier demo: give a new directory")
    return chosen


async def run_demo(jobs: int, duration: float, out_dir: Path | None, console: Console) -> int:
    """Run the demo; 0 when every job ended as the emulator decided and each was created once."""
    directory = _out_dir(out_dir)
    # In its own process, as a provider would be: in this one, the batches' own work would
    # delay the server's clock and bunch creates that were sent evenly.
    async with EmulatorProcess(
        *("--duration", str(duration), "--duration-spread", "0.1", "--failure-rate", "0.02"),
        *("--dh3-qps", str(DH3_RATE), "--no-record"),
    ) as emulator:
        console.print(
            f"emulator on {emulator.url}; {jobs} jobs on each of {', '.join(MODELS)}", highlight=False
        )
        polling = PollSettings(first_poll=duration / 2, min_interval=0.01, max_interval=1.0)
        async with AsyncSession(
            api_keys=dict.fromkeys(MODELS, "demo-key"),
            base_urls=dict.fromkeys(MODELS, emulator.url),
            rate_limits={"dh3": DH3_RATE},
            # The emulator shares this machine's cores with the demo, which keeps them busy:
            # when its process is scheduled late it counts several arrivals at once. A wider
            # jitter budget than the default 25 ms keeps its count honest on a small machine.
            rate_limit_margin=0.06,
            polling=polling,
        ) as session:
            with BatchDisplay(console) as display:
                results = await asyncio.gather(
                    *(
                        run_batch(
                            session,
                            name,
                            model,
                            demo_jobs(name, jobs),
                            out_dir=directory / name,
                            total=jobs,
                            on_progress=display.track(name, jobs),
                        )
                        for name, model in MODELS.items()
                    )
                )
        counted = await emulator.stats()
    return _report(dict(zip(MODELS, results, strict=True)), counted, directory, console)


def _report(stats: dict[str, BatchStats], counted: dict[str, Any], directory: Path, console: Console) -> int:
    """The summary table, and whether the client's view matches the emulator's counters."""
    columns = ("api", "jobs", "done", "failed", "PNGs", "creates", "max/1s", "429s", "polls/job", "seconds")
    rows: list[list[object]] = []
    failed_here: set[str] = set()
    consistent = True
    for name, batch in stats.items():
        failed_here |= {r["task_id"] for r in read_results(directory / name) if r["status"] == "failed"}
        pngs = sum(1 for path in (directory / name).glob("*.png") if path.read_bytes()[:8] == PNG_SIGNATURE)
        jobs = batch.total or 0
        creates = counted["creates"].get(name, 0)
        consistent &= batch.done + batch.failed == jobs and creates == jobs and pngs == batch.done
        rows.append(
            [
                name,
                jobs,
                batch.done,
                batch.failed,
                pngs,
                creates,
                counted["max_creates_in_1s"].get(name, 0),
                counted["rate_limited"].get(name, 0),
                counted["polls"].get(name, 0) / max(1, jobs),
                batch.elapsed,
            ]
        )
    # The jobs that failed are exactly those the emulator decided to fail.
    consistent &= failed_here == set(counted["failed_tasks"])
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


def main(argv: list[str] | None = None) -> int:
    """``python -m image_gen_async.demo``: the same as ``image-gen-async demo``."""
    from .cli import main as cli_main

    return cli_main(["demo", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
