"""What the batch and command-line tests read back: results.jsonl and the journal, from outside."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from image_gen_async.batch import JOURNAL_NAME, read_results
from image_gen_async.testing import Emulator


def results(directory: Path) -> list[dict[str, Any]]:
    """The lines of a batch's results.jsonl."""
    return list(read_results(directory))


def journal_rows(directory: Path, query: str) -> list[tuple[Any, ...]]:
    """Rows of ``query`` on the journal, opened read-only as another process would ([] before it exists)."""
    path = directory / JOURNAL_NAME
    if not path.exists():
        return []
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
        try:
            return db.execute(query).fetchall()
        except sqlite3.OperationalError:  # the file is there, its tables not yet
            return []


def states(directory: Path) -> dict[int, str]:
    """Job line -> state."""
    return dict(journal_rows(directory, "SELECT line, state FROM jobs"))


def state_counts(directory: Path) -> dict[str, int]:
    """Jobs per state."""
    return dict(journal_rows(directory, "SELECT state, COUNT(*) FROM jobs GROUP BY state"))


async def wait_for(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    """Wait until ``condition()`` holds, looking every few milliseconds; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.005)


def names(directory: Path, pattern: str = "*.png") -> list[str]:
    """Sorted names of the files matching ``pattern`` anywhere below ``directory``."""
    return sorted(path.name for path in directory.rglob(pattern) if path.is_file())


def append(path: Path, text: str) -> None:
    """Append ``text`` to a file."""
    with open(path, "a", encoding="utf-8") as file:
        file.write(text)


def closed_port() -> int:
    """A loopback port that was just bound and closed: connecting to it is refused."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


def write_lines(path: Path, lines: list[str]) -> Path:
    """A JSONL file of ``lines`` as given (already JSON text, or deliberately not)."""
    path.write_text("".join(f"{line}\n" for line in lines), encoding="utf-8")
    return path


def end_running_tasks(emulator: Emulator) -> None:
    """The emulator's unfinished tasks end now, so a rerun resumes them without waiting them out."""
    now = time.monotonic()
    for task in emulator.tasks.values():
        task.duration = min(task.duration, now - task.created_at)
