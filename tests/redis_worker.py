"""One worker of the scale-out tests: its own process and session, one key shared on Redis.

Prints ``ready`` once its session exists, waits for a line on stdin (so all workers start
together), submits its jobs, waits for them and prints a JSON report.

With ``--hold N`` it only takes N places of a capacity gate on Redis (``--lease`` seconds,
renewed), prints ``held`` and waits to be killed: the crashed holder of the capacity tests.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time

from redis.asyncio import Redis

from image_gen_async import AsyncSession, PollSettings, RedisBackend
from image_gen_async._redis_capacity import RedisGate


async def run(args: argparse.Namespace) -> dict[str, float]:
    client = args.client
    async with AsyncSession(
        api_keys={client: args.key},
        base_urls={client: args.emulator},
        rate_limits={client: args.rate},
        polling=PollSettings(
            first_poll=args.first_poll, min_interval=min(0.02, args.first_poll), max_interval=0.5
        ),
        limiter_backend=RedisBackend(args.redis, namespace=args.namespace),
        max_concurrent={client: args.max_concurrent} if args.max_concurrent else None,
        retry_base=0.05,
        retry_cap=0.5,
    ) as session:
        print("ready", flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
        accepted: list[float] = []

        async def submit(i: int) -> int:
            handle = await session.client(client).submit(args.model, prompt=f"worker {args.name} fox {i}")
            accepted.append(time.time())
            assert (await handle).ok
            return handle.retries

        retries = await asyncio.gather(*(submit(i) for i in range(args.jobs)))
        return {
            "jobs": len(retries),
            "retries": sum(retries),
            "refusals": session.client(client).capacity.refusals,
            "first": min(accepted),
            "last": max(accepted),
        }


async def hold(args: argparse.Namespace) -> None:
    redis = Redis.from_url(args.redis)
    gate = RedisGate(redis, args.gate_key, "holder", args.max_concurrent, lease=args.lease)
    for _ in range(args.hold):
        await gate.admit(None)
    print("held", flush=True)
    await asyncio.Event().wait()  # renewing until killed


def main() -> None:
    parser = argparse.ArgumentParser()
    for option in ("--redis", "--namespace"):
        parser.add_argument(option, required=True)
    for option in ("--emulator", "--key", "--name", "--gate-key"):
        parser.add_argument(option)
    parser.add_argument("--client", default="dh3")
    parser.add_argument("--model", default="nano-banana-pro")
    parser.add_argument("--rate", type=float)
    parser.add_argument("--jobs", type=int, default=0)
    parser.add_argument("--max-concurrent", type=int)
    parser.add_argument("--first-poll", type=float, default=0.1)
    parser.add_argument("--hold", type=int)
    parser.add_argument("--lease", type=float, default=30.0)
    args = parser.parse_args()
    if args.hold:
        asyncio.run(hold(args))
        return
    report = asyncio.run(run(args))
    print(json.dumps(report), flush=True)


if __name__ == "__main__":
    main()
