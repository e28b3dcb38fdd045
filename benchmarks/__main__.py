"""``python -m benchmarks [section ...] [--seed N]``: run, print a table, write benchmarks/RESULTS.md."""

from __future__ import annotations

import argparse
import asyncio
import datetime
import functools
import platform
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

from . import capacity, overhead, polling, ratelimit, routing, scale, syncmode
from ._common import Row, raise_file_limit

SECTIONS: dict[str, Callable[[], Awaitable[list[Row]]]] = {
    "overhead": overhead.run,
    "ratelimit": ratelimit.run,
    "polling": polling.run,
    "scale": scale.run,
    "syncmode": syncmode.run,
    "capacity": capacity.run,
    "routing": routing.run,
}
RESULTS = Path(__file__).with_name("RESULTS.md")


def table(rows: list[Row]) -> str:
    lines = ["| section | measure | ours | baseline (same run) | target | met |", "|---|---|---|---|---|---|"]
    for row in rows:
        met = "" if row.ok is None else ("yes" if row.ok else "**no**")
        lines.append(
            f"| {row.section} | {row.measure} | {row.ours} | {row.baseline} | {row.target} | {met} |"
        )
    return "\n".join(lines)


async def main(names: list[str], seed: int = 0) -> int:
    raise_file_limit()
    sections = SECTIONS | {"polling": functools.partial(polling.run, seed=seed)}
    rows: list[Row] = []
    for name in names:
        print(f"running {name} ...", flush=True)
        section = await sections[name]()
        rows += section
        print(table(section), flush=True)
    report = "\n".join(
        [
            "# Benchmark results",
            "",
            f"One run of `python -m benchmarks` on {datetime.date.today()}, {platform.machine()}, "
            f"Python {platform.python_version()}; every baseline was measured in the same run.",
            "Time is scaled: emulated jobs take ~1 s where real ones take ~27 s.",
            "",
            table(rows),
            "",
        ]
    )
    if set(names) == set(SECTIONS) and seed == 0:
        RESULTS.write_text(report)
        print(f"wrote {RESULTS}")
    return 0 if all(row.ok is not False for row in rows) else 1


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description="Run the benchmarks.")
    parser.add_argument("sections", nargs="*", metavar="section", help=f"any of {', '.join(SECTIONS)}")
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        help="draws the polling section's job durations (other sections ignore it); "
        "RESULTS.md is written only by a full run at seed 0",
    )
    args = parser.parse_args()
    chosen = args.sections or list(SECTIONS)
    unknown = [name for name in chosen if name not in SECTIONS]
    if unknown:
        parser.error(f"unknown section(s): {', '.join(unknown)}; choose from {', '.join(SECTIONS)}")
    sys.exit(asyncio.run(main(chosen, args.seed)))
