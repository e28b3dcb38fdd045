"""One worker of the scale-out test: its own process and session, one dh3 key shared on Redis.

Prints ``ready`` once its session exists, waits for a line on stdin (so all workers start
together), submits its jobs, waits for them and prints a JSON report.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time

from image_gen_async import AsyncSession, PollSettings, RedisBackend


async def run(args: argparse.Namespace) -> dict[str, float]:
    async with AsyncSession(
        api_keys={"dh3": args.key},
        base_urls={"dh3": args.emulator},
        rate_limits={"dh3": args.rate},
        polling=PollSettings(first_poll=0.1, min_interval=0.02, max_interval=0.5),
        limiter_backend=RedisBackend(args.redis, namespace=args.namespace),
    ) as session:
        print("ready", flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
        accepted: list[float] = []

        async def submit(i: int) -> int:
            handle = await session.dh3.submit("nano-banana-pro", prompt=f"worker {args.name} fox {i}")
            accepted.append(time.time())
            assert (await handle).ok
            return handle.retries

        retries = await asyncio.gather(*(submit(i) for i in range(args.jobs)))
        return {"jobs": len(retries), "retries": sum(retries), "first": min(accepted), "last": max(accepted)}


def main() -> None:
    parser = argparse.ArgumentParser()
    for option in ("--redis", "--namespace", "--emulator", "--key", "--name"):
        parser.add_argument(option, required=True)
    parser.add_argument("--rate", type=float, required=True)
    parser.add_argument("--jobs", type=int, required=True)
    report = asyncio.run(run(parser.parse_args()))
    print(json.dumps(report), flush=True)


if __name__ == "__main__":
    main()
