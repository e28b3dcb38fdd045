"""Showing batches as they run: a live rich bar on a terminal, plain lines elsewhere.

Rate and ETA are computed from the jobs finished in this run only: jobs skipped as
finished by an earlier run would otherwise make a resumed batch look instantly fast.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from types import TracebackType

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn
from rich.table import Table

from .batch import BatchStats
from .router import LaneStats

# Seconds between two plain progress lines when there is no terminal.
PLAIN_INTERVAL = 1.0
PLAIN_WIDTH = 120


def make_console() -> Console:
    """The stdout console; a pipe or CI log gets 120 columns, not rich's 80, unless COLUMNS says."""
    console = Console()
    if not console.is_terminal and "COLUMNS" not in os.environ:
        console.width = PLAIN_WIDTH
    return console


def rate_and_eta(stats: BatchStats) -> tuple[float, float | None]:
    """Jobs per second finished in this run, and the seconds left (None when unknown)."""
    elapsed = stats.elapsed
    this_run = stats.finished - stats.skipped
    rate = this_run / elapsed if elapsed > 0 else 0.0
    if stats.total is None or rate <= 0:
        return rate, None
    return rate, max(0, stats.total - stats.finished - stats.unfinished - stats.pending) / rate


def describe(stats: BatchStats) -> str:
    """One line: finished of total, done/failed/in flight, rate and ETA."""
    rate, eta = rate_and_eta(stats)
    total = "?" if stats.total is None else str(stats.total)
    text = (
        f"{stats.finished}/{total} finished: {stats.done} done, {stats.failed} failed, "
        f"{stats.uncertain} uncertain, {stats.in_flight} in flight, {rate:.1f} jobs/s"
    )
    if stats.stopped is not None:
        return f"{text}, stopped: {stats.stopped}"
    if stats.pending:
        text = f"{text}, {stats.pending} not sent"
    return text if eta is None else f"{text}, ETA {eta:.0f} s"


class BatchDisplay:
    """Progress of one or more batches; ``track(label, total)`` gives each its callback."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.live = console.is_terminal
        self._progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn(
                "[green]{task.fields[done]} done[/] [red]{task.fields[failed]} failed[/] "
                "[cyan]{task.fields[in_flight]} in flight[/] {task.fields[rate]:.1f}/s "
                "ETA {task.fields[eta]}"
            ),
            console=console,
            disable=not self.live,
        )
        self._last_line: dict[str, float] = {}
        self._complete: set[str] = set()

    def __enter__(self) -> BatchDisplay:
        self._progress.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._progress.stop()

    def track(self, label: str, total: int | None) -> Callable[[BatchStats], None]:
        """The ``on_progress`` callback for the batch called ``label``."""
        task = self._progress.add_task(label, total=total, done=0, failed=0, in_flight=0, rate=0.0, eta="-")
        if self.live:
            return lambda stats: self._update(task, stats)
        return lambda stats: self._print(label, stats)

    def _update(self, task: TaskID, stats: BatchStats) -> None:
        rate, eta = rate_and_eta(stats)
        self._progress.update(
            task,
            completed=stats.finished,
            done=stats.done,
            failed=stats.failed + stats.uncertain,
            in_flight=stats.in_flight,
            rate=rate,
            eta="-" if eta is None else f"{eta:.0f}s",
        )

    def _print(self, label: str, stats: BatchStats) -> None:
        """A plain line at most every ``PLAIN_INTERVAL`` seconds, and one when all are finished."""
        if label in self._complete:
            return
        now = time.monotonic()
        if stats.total is not None and stats.finished >= stats.total and not stats.in_flight:
            self._complete.add(label)
        elif now - self._last_line.get(label, -PLAIN_INTERVAL) < PLAIN_INTERVAL:
            return
        self._last_line[label] = now
        self.console.print(f"{label}: {describe(stats)}", highlight=False, soft_wrap=True)


def print_table(
    console: Console, title: str, columns: Sequence[str], rows: Sequence[Sequence[object]]
) -> None:
    """Print a summary table, numbers right-aligned."""
    result = Table(title=title)
    for index, name in enumerate(columns):
        result.add_column(name, justify="left" if index == 0 else "right")
    for row in rows:
        result.add_row(*(f"{cell:.1f}" if isinstance(cell, float) else str(cell) for cell in row))
    console.print(result)


SUMMARY_COLUMNS = (
    "batch",
    "jobs",
    "done",
    "failed",
    "uncertain",
    "unfinished",
    "not sent",
    "created",
    "resumed",
    "skipped",
    "credits",
    "seconds",
)


LANE_COLUMNS = ("target", "created", "refused", "failed over", "failed", "in flight", "credits", "health")


def lane_row(lane: LaneStats) -> list[object]:
    """One router lane's figures, in ``LANE_COLUMNS`` order."""
    return [
        lane.label,
        lane.created,
        lane.refused,
        lane.failed_over,
        lane.failed,
        lane.in_flight,
        lane.credits,
        lane.health,
    ]


def summary_row(label: str, stats: BatchStats) -> list[object]:
    """The summary figures of one batch, in ``SUMMARY_COLUMNS`` order."""
    jobs = stats.total if stats.total is not None else stats.finished + stats.unfinished + stats.pending
    return [
        label,
        jobs,
        stats.done,
        stats.failed,
        stats.uncertain,
        stats.unfinished,
        stats.pending,
        stats.created,
        stats.resumed,
        stats.skipped,
        f"{stats.credits_used:g}",
        stats.elapsed,
    ]
