"""The batch journal: one SQLite row per job, written around every provider call.

States: ``pending`` → ``creating`` (committed before the create is sent) →
``submitted`` (task id and estimate, committed as soon as the create answered) →
``downloading`` → ``done`` | ``failed`` | ``uncertain``. A rerun reads it to poll
instead of resubmitting, and to tell a create that may have gone out (``creating``)
from one that never did (``pending``). A batch through a router also records each job's
``route`` (the target and key its task went to), so a rerun polls the right provider.

Durability: WAL with ``synchronous=NORMAL``, so a commit is a write into the WAL
(about 10 µs here) that survives the process being killed at any moment; only an OS
crash or power loss can lose the last few commits. The one commit whose loss could
make a rerun pay twice, ``creating``, is followed by ``durable()``, an fsync of the WAL
(what ``synchronous=FULL`` would do, and it makes every earlier commit durable too),
before the create is sent. The fsync may take milliseconds on a real disk, so the batch
runs it in a worker thread; every write to the database stays on the event-loop thread.

Opening checks the file (``PRAGMA quick_check``, about 0.3 s for a million jobs), so a
damaged journal is refused at the start, not halfway through a run; the batch refuses a
journal that is missing, empty or holds no batch while its directory holds results.
Task ids are indexed: a create answered with an id another job already has is found.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from pathlib import Path
from types import TracebackType
from typing import Literal

import attrs

from .errors import ConfigurationError

State = Literal["pending", "creating", "submitted", "downloading", "done", "failed", "uncertain"]
#: States that are final for a run: the job has its line in results.jsonl.
FINAL_STATES: frozenset[str] = frozenset({"done", "failed", "uncertain"})

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS jobs (
    line INTEGER PRIMARY KEY,
    spec_hash TEXT NOT NULL,
    state TEXT NOT NULL,
    task_id TEXT,
    estimated_duration REAL,
    files TEXT,
    error TEXT,
    updated REAL NOT NULL,
    route TEXT
);
CREATE INDEX IF NOT EXISTS jobs_by_task ON jobs (task_id);
"""
# What a commit that cannot be made raises: SQLite's own errors, the OS's (a full disk, a lost
# file), and text SQLite cannot store (a lone surrogate in a task id from a hostile server).
JOURNAL_FAILURES: tuple[type[Exception], ...] = (sqlite3.Error, OSError, UnicodeError)


@attrs.frozen
class JobRow:
    """What the journal knows about one job."""

    line: int
    spec_hash: str
    state: State
    task_id: str | None
    estimated_duration: float | None
    files: tuple[str, ...]
    error: str | None
    route: str | None = None  # where its task went, in a batch through a router


class Journal:
    """The SQLite journal of one batch: ``(provider, model)`` fixed, one row per job line."""

    def __init__(self, path: Path, provider: str, model: str, *, refuse_new: str | None = None) -> None:
        """Open (or start) the journal at ``path``.

        ``refuse_new``: when the file holds no batch yet, raise ``ConfigurationError`` with this
        message instead of starting one, before anything is written to it (the caller knows
        the directory holds outputs of an earlier run, so an empty journal means a lost one).
        """
        self.path = path
        self._wal: int | None = None  # a descriptor of the WAL file, for durable()
        self._db = sqlite3.connect(path, isolation_level=None)  # autocommit: each write commits
        try:
            mode = self._db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            # Where WAL is not possible (some network filesystems), every commit is fsynced
            # as it is made instead, and durable() has nothing left to do.
            self._wal_mode = str(mode).lower() == "wal"
            self._db.execute("PRAGMA synchronous=NORMAL" if self._wal_mode else "PRAGMA synchronous=FULL")
            self._check_intact()
            if refuse_new is not None and not self._holds_batch():
                raise ConfigurationError(refuse_new)
            self._db.executescript(_SCHEMA)
            self._add_route_column()
            self._check_meta(provider, model)
        except BaseException:
            self._db.close()
            raise

    def _check_intact(self) -> None:
        """A damaged file (cut short, overwritten) fails here, at open, not halfway through a run."""
        problems = [row[0] for row in self._db.execute("PRAGMA quick_check")]
        if problems != ["ok"]:
            raise sqlite3.DatabaseError(f"database disk image is malformed: {problems[0]}")

    def _holds_batch(self) -> bool:
        """True when an earlier run bound this file to a batch (its meta table names a provider)."""
        tables = {row[0] for row in self._db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if "meta" not in tables:
            return False
        return self._db.execute("SELECT 1 FROM meta WHERE key = 'provider'").fetchone() is not None

    def _add_route_column(self) -> None:
        """Journals written before routers have no ``route``: added (empty), nothing else changes."""
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(jobs)")}
        if "route" not in columns:
            self._db.execute("ALTER TABLE jobs ADD COLUMN route TEXT")

    def _check_meta(self, provider: str, model: str) -> None:
        """Bind the journal to one provider and model; a rerun with others is refused."""
        wanted = {"provider": provider, "model": model}
        found = dict(self._db.execute("SELECT key, value FROM meta WHERE key IN ('provider', 'model')"))
        if not found:
            self._db.executemany("INSERT INTO meta VALUES (?, ?)", wanted.items())
            return
        if found != wanted:
            raise ConfigurationError(
                f"{self.path} belongs to a batch on {found.get('provider')} {found.get('model')}, "
                f"not {provider} {model}: use another output directory"
            )

    def close(self) -> None:
        """Close the database (every write is already committed)."""
        self._db.close()
        # Only after SQLite is done with the file: closing a descriptor drops the process's
        # POSIX locks on that file.
        if self._wal is not None:
            os.close(self._wal)
            self._wal = None

    def __enter__(self) -> Journal:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # --- reading --------------------------------------------------------------------

    def get(self, line: int) -> JobRow | None:
        """The row of job ``line``, or None if it was never started."""
        row = self._db.execute(
            "SELECT line, spec_hash, state, task_id, estimated_duration, files, error, route "
            "FROM jobs WHERE line = ?",
            (line,),
        ).fetchone()
        if row is None:
            return None
        line_, spec_hash, state, task_id, estimate, files, error, route = row
        files_ = tuple(json.loads(files or "[]"))
        return JobRow(line_, spec_hash, state, task_id, estimate, files_, error, route)

    def line_with_task(self, task_id: str, other_than: int, route: str | None = None) -> int | None:
        """The job (not ``other_than``) that already holds ``task_id`` on ``route``, if any.

        (Two providers may each name a task ``1``; one provider naming two creates so may not.)
        """
        row = self._db.execute(
            "SELECT line FROM jobs WHERE task_id = ? AND line != ? AND COALESCE(route, '') = ? LIMIT 1",
            (task_id, other_than, route or ""),
        ).fetchone()
        return None if row is None else int(row[0])

    def counts(self) -> dict[str, int]:
        """Jobs per state."""
        return dict(self._db.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state"))

    @property
    def results_size(self) -> int:
        """Bytes of results.jsonl that match the journal (lines past it were never committed)."""
        row = self._db.execute("SELECT value FROM meta WHERE key = 'results_size'").fetchone()
        return int(row[0]) if row else 0

    # --- writing: each call is one small transaction ----------------------------------

    def pending(self, line: int, spec_hash: str) -> None:
        """Job ``line`` is about to start (again): nothing sent for it yet."""
        self._db.execute(
            "INSERT INTO jobs (line, spec_hash, state, updated) VALUES (?, ?, 'pending', ?) "
            "ON CONFLICT (line) DO UPDATE SET state = 'pending', task_id = NULL, "
            "estimated_duration = NULL, files = NULL, error = NULL, route = NULL, updated = excluded.updated",
            (line, spec_hash, time.time()),
        )

    def creating(self, line: int, route: str | None = None) -> None:
        """The create of job ``line`` goes out next (on ``route``, a router's lane); call
        ``durable()`` before sending it."""
        self._db.execute(
            "UPDATE jobs SET state = 'creating', route = COALESCE(?, route), updated = ? WHERE line = ?",
            (route, time.time(), line),
        )
        if self._wal is None and self._wal_mode:
            # Opened here, on the writing thread, once: the WAL exists after a commit. SQLite
            # puts it next to the real file, wherever a symlinked path points.
            wal = f"{os.path.realpath(self.path)}-wal"
            # Windows flushes only a descriptor open for writing; nothing is written through it.
            access = os.O_RDWR if os.name == "nt" else os.O_RDONLY
            self._wal = os.open(wal, access | getattr(os, "O_CLOEXEC", 0))

    def not_sent(self, line: int) -> None:
        """Job ``line``'s create was recorded but never sent (it could not be made durable):
        pending again, on no route."""
        self._db.execute(
            "UPDATE jobs SET state = 'pending', route = NULL, updated = ? WHERE line = ?", (time.time(), line)
        )

    def durable(self) -> None:
        """Make every commit so far survive an OS crash or power loss: an fsync of the WAL.

        Blocking, and safe to call from a worker thread while the loop thread writes on.
        """
        if self._wal is not None:
            os.fsync(self._wal)

    def submitted(
        self, line: int, task_id: str, estimated_duration: float | None, route: str | None = None
    ) -> None:
        """The provider accepted job ``line`` as ``task_id`` (on ``route``): from now on it is
        polled, never resent."""
        self._db.execute(
            "UPDATE jobs SET state = 'submitted', task_id = ?, estimated_duration = ?, error = NULL, "
            "route = COALESCE(?, route), updated = ? WHERE line = ?",
            (task_id, estimated_duration, route, time.time(), line),
        )

    def downloading(self, line: int) -> None:
        """Job ``line`` finished at the provider; its files are being saved."""
        self._set(line, "downloading")

    def finish(
        self,
        line: int,
        state: Literal["done", "failed", "uncertain"],
        *,
        spec_hash: str,
        task_id: str | None,
        files: list[str],
        error: str | None,
        results_size: int,
    ) -> None:
        """Job ``line`` ended, and its results line is written up to ``results_size`` bytes.

        One transaction, so the journal and results.jsonl agree after any crash.
        """
        db = self._db
        db.execute("BEGIN")
        try:
            db.execute(
                "INSERT INTO jobs (line, spec_hash, state, task_id, files, error, updated) "
                "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (line) DO UPDATE SET state = excluded.state, "
                "task_id = COALESCE(excluded.task_id, task_id), files = excluded.files, "
                "error = excluded.error, updated = excluded.updated",
                (line, spec_hash, state, task_id, json.dumps(files), storable(error), time.time()),
            )
            db.execute(
                "INSERT INTO meta VALUES ('results_size', ?) ON CONFLICT (key) DO UPDATE SET value = ?",
                (str(results_size), str(results_size)),
            )
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    def _set(self, line: int, state: State) -> None:
        """One row's state, committed."""
        self._db.execute("UPDATE jobs SET state = ?, updated = ? WHERE line = ?", (state, time.time(), line))


def storable(text: str | None) -> str | None:
    """``text`` as SQLite can store it: a lone surrogate (from a hostile answer) becomes ``\\udXXX``."""
    if text is None:
        return None
    return text.encode("utf-8", "backslashreplace").decode("utf-8")
