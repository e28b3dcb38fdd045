"""The demo: runs jobs on all four APIs against the built-in emulator, no keys needed.

``python -m image_gen_async.demo [--jobs N]`` starts the emulator on loopback, submits
N jobs per API at once under a scaled dh3 limit, shows progress, and prints what the
client did next to what the emulator counted.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import time
from collections import Counter

from . import AsyncSession, ImageGenError, PollSettings, TaskHandle
from .testing import Emulator, EmulatorConfig

MODELS = {
    "get3w": "google/nano-banana-pro/text-to-image",
    "get3w_v3": "get3w/flux-dev",
    "dh3": "nano-banana-pro",
    "nananobanana": "nano-banana",
}
DH3_RATE = 40.0  # the real dh3 limit is 3/s; time in the demo runs ~13x faster


async def run(jobs: int, duration: float) -> int:
    """Run the demo; the exit status is 0 when every job ended as the emulator decided."""
    config = EmulatorConfig(duration=duration, duration_spread=0.1, dh3_qps=DH3_RATE, failure_rate=0.02)
    async with Emulator(config) as emulator:
        print(f"emulator on {emulator.url}; {jobs} jobs on each of {', '.join(MODELS)}")
        polling = PollSettings(first_poll=duration / 2, min_interval=0.01, max_interval=1.0)
        async with AsyncSession(
            api_keys=dict.fromkeys(MODELS, "demo-key"),
            base_urls=dict.fromkeys(MODELS, emulator.url),
            rate_limits={"dh3": DH3_RATE},
            polling=polling,
        ) as session:
            started = time.monotonic()
            handles = await asyncio.gather(
                *(
                    session.client(name).submit(model, prompt=f"demo image {i} in {name}")
                    for name, model in MODELS.items()
                    for i in range(jobs)
                )
            )
            outcome = await _collect(handles)
            elapsed = time.monotonic() - started
        _report(handles, outcome, emulator, elapsed)
        wrong = {h.task_id for h, failed in outcome.items() if failed} ^ emulator.stats.failed_tasks
        return 0 if not wrong else 1


async def _collect(handles: list[TaskHandle]) -> dict[TaskHandle, bool]:
    """Await every handle, printing progress; True marks a failed job."""
    outcome: dict[TaskHandle, bool] = {}
    for done, future in enumerate(asyncio.as_completed(handles), 1):
        with contextlib.suppress(ImageGenError):  # failures are counted from the handles below
            await future
        if done % max(1, len(handles) // 10) == 0 or done == len(handles):
            print(f"  {done}/{len(handles)} done", flush=True)
    for handle in handles:
        outcome[handle] = handle.exception() is not None
    return outcome


def _report(
    handles: list[TaskHandle], outcome: dict[TaskHandle, bool], emulator: Emulator, elapsed: float
) -> None:
    polls: Counter[str] = Counter()
    jobs: Counter[str] = Counter()
    failed: Counter[str] = Counter()
    for handle in handles:
        jobs[handle.provider] += 1
        polls[handle.provider] += handle.polls
        failed[handle.provider] += outcome[handle]
    stats = emulator.stats
    print(f"\n{'client':<14}{'jobs':>6}{'failed':>8}{'polls/job':>11}{'creates':>9}{'max/1s':>8}{'429s':>6}")
    for name in MODELS:
        print(
            f"{name:<14}{jobs[name]:>6}{failed[name]:>8}{polls[name] / max(1, jobs[name]):>11.2f}"
            f"{stats.creates[name]:>9}{stats.max_creates_in_1s[name]:>8}{stats.rate_limited[name]:>6}"
        )
    paid_once = all(stats.creates[name] == jobs[name] for name in MODELS)
    verdict = "every job created exactly once" if paid_once else "CREATES DO NOT MATCH JOBS"
    print(f"\n{len(handles)} jobs in {elapsed:.1f} s; dh3 limit {DH3_RATE:g}/s; {verdict}.")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m image_gen_async.demo", description=__doc__)
    parser.add_argument("--jobs", type=int, default=100, help="jobs per API (default 100)")
    parser.add_argument("--duration", type=float, default=1.0, help="seconds a job takes (default 1)")
    args = parser.parse_args(argv)
    if args.jobs < 1 or args.duration <= 0:
        parser.error("--jobs must be at least 1 and --duration positive")
    return asyncio.run(run(args.jobs, args.duration))


if __name__ == "__main__":
    sys.exit(main())
