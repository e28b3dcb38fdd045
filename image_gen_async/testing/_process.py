"""`EmulatorProcess`: the emulator in a child process, for load tests and benchmarks.

In-process, the emulator shares the event loop (and the CPU) with the client under
test, so a busy client delays the server's clock and bunches arrivals. A separate
process sees requests as a real provider would.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
from types import TracebackType
from typing import Any

import aiohttp

from ._emulator import Emulator

READY_PREFIX = "image_gen_async emulator serving on "


async def serve_until_stopped(emulator: Emulator, host: str = "127.0.0.1", port: int = 0) -> None:
    """Start ``emulator``, print the ready line ``EmulatorProcess`` waits for, and serve until
    Ctrl-C or SIGTERM; then close it cleanly. (Also for an emulator with routes of its own.)"""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):  # not on Windows
            loop.add_signal_handler(signum, stop.set)
    url = await emulator.start(host, port)
    print(f"{READY_PREFIX}{url} (Ctrl-C to stop)", flush=True)
    try:
        await stop.wait()
    finally:
        await emulator.close()


class EmulatorProcess:
    """``python -m image_gen_async.testing`` on a free loopback port, stopped on exit.

    ``module``: another module to run instead, one that takes ``--port`` and serves with
    ``serve_until_stopped`` (a benchmark's emulator with a route of its own, say).
    """

    def __init__(self, *args: str, module: str = "image_gen_async.testing") -> None:
        self.args = args
        self.module = module
        self.url = ""
        self._process: asyncio.subprocess.Process | None = None

    async def start(self, timeout: float = 30.0) -> str:
        """Start the child and wait for it to say where it listens."""
        self._process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            self.module,
            "--port",
            "0",
            *self.args,
            stdout=asyncio.subprocess.PIPE,
        )
        assert self._process.stdout is not None
        line = await asyncio.wait_for(self._process.stdout.readline(), timeout)
        text = line.decode().strip()
        if not text.startswith(READY_PREFIX):
            await self.close()
            raise RuntimeError(f"emulator did not start: {text!r}")
        self.url = text.removeprefix(READY_PREFIX).split()[0]
        return self.url

    async def stats(self) -> dict[str, Any]:
        """The child's counters (``Stats.as_json``)."""
        async with aiohttp.ClientSession() as http, http.get(f"{self.url}/_emulator/stats") as answer:
            answer.raise_for_status()
            result: dict[str, Any] = await answer.json()
            return result

    async def control(self, **changes: Any) -> dict[str, Any]:
        """Change the child's account limits (`credits=5`, `max_concurrent={"dh3": 2}`, ...,
        as `POST /_emulator/control` takes them); return the limits now in force."""
        async with (
            aiohttp.ClientSession() as http,
            http.post(f"{self.url}/_emulator/control", json=changes) as answer,
        ):
            if answer.status != 200:
                raise ValueError((await answer.json())["error"])
            result: dict[str, Any] = await answer.json()
            return result

    async def close(self) -> None:
        """Stop the child (SIGTERM, then SIGKILL if it lingers)."""
        process, self._process = self._process, None
        if process is None or process.returncode is not None:
            return
        process.terminate()
        try:
            await asyncio.wait_for(process.wait(), 10)
        except TimeoutError:
            process.kill()
            await process.wait()

    async def __aenter__(self) -> EmulatorProcess:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()
