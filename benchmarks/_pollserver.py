"""The polling benchmark's emulator in its own process, noting when each task's latest poll arrived.

``python -m benchmarks._pollserver --port 0 BIAS [--seed N]`` (``none``: no estimate) prints the ready
line ``EmulatorProcess`` waits for. ``GET /_bench/tasks`` answers, per task id, when it ends,
how long it takes and when its latest poll arrived, on the monotonic clock (which every
process on the machine shares, so the client's own readings compare with them).
"""

from __future__ import annotations

import argparse
import asyncio

from aiohttp import web

from image_gen_async.testing import Emulator
from image_gen_async.testing._process import serve_until_stopped

from .polling import emulator_config, watch_polls


async def serve(port: int, bias: float | None, seed: int) -> None:
    emulator = Emulator(emulator_config(bias, seed))
    arrivals = watch_polls(emulator)

    async def tasks(request: web.Request) -> web.Response:
        return web.json_response(
            {
                task_id: [task.finish_at, task.duration, arrivals.get(task_id)]
                for task_id, task in emulator.tasks.items()
            }
        )

    emulator.app.router.add_get("/_bench/tasks", tasks)
    await serve_until_stopped(emulator, port=port)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("bias", help="the estimate's bias, or none")
    parser.add_argument("--seed", type=int, default=0, help="draws the jobs' durations")
    args = parser.parse_args()
    asyncio.run(serve(args.port, None if args.bias == "none" else float(args.bias), args.seed))


if __name__ == "__main__":
    main()
