"""One worker of the scale-out tests: its own process and session, one key shared on Redis.

Prints ``ready`` once its session exists, waits for a line on stdin or its end (so all
workers start together), submits its jobs, waits for them and prints a JSON report.

With ``--workers N`` it forks N such workers once the imports are done (a fresh interpreter
per worker would spend most of a test's time importing), each its own process with its own
session; they share stdout (a line each, written whole) and start when stdin is closed.

With ``--hold N`` it only takes N places of a capacity gate on Redis (``--lease`` seconds,
renewed), prints ``held`` and waits to be killed: the crashed holder of the capacity tests.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
import traceback

from redis.asyncio import Redis

from image_gen_async import AsyncSession, PollSettings, RedisBackend
from image_gen_async._redis_capacity import RedisGate


def say(line: str) -> None:
    """One line to stdout in one write: forked workers share the pipe, and lines stay whole."""
    os.write(sys.stdout.fileno(), f"{line}\n".encode())


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
        say("ready")
        # "go" or the end of stdin: a raw read, as forked workers share the one pipe.
        await asyncio.get_running_loop().run_in_executor(None, os.read, sys.stdin.fileno(), 3)
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
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--lease", type=float, default=30.0)
    args = parser.parse_args()
    if args.hold:
        asyncio.run(hold(args))
        return
    if args.workers > 1:
        sys.exit(fork_workers(args))
    report = asyncio.run(run(args))
    print(json.dumps(report), flush=True)


def fork_workers(args: argparse.Namespace) -> int:
    """Fork ``args.workers`` workers named 0, 1, ...; 0 when every one of them exited 0."""
    sys.stdout.flush()
    children = []
    for n in range(args.workers):
        pid = os.fork()
        if pid == 0:  # the worker: its own event loop, session and connections
            code = 1
            try:
                args.name = str(n)
                say(json.dumps(asyncio.run(run(args))))
                code = 0
            except BaseException:
                traceback.print_exc()
            finally:
                os._exit(code)
        children.append(pid)
    statuses = [os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for pid in children]
    return 0 if all(status == 0 for status in statuses) else 1


if __name__ == "__main__":
    main()
