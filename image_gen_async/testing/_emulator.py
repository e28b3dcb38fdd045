"""`Emulator`: one aiohttp server speaking Get3W v1, Get3W v3, dh3 and nananobanana.

Written from the providers' documents only (it imports nothing else of
image_gen_async), so the client can be tested against an independent reading.

Job outcomes are deterministic by prompt markers:
- ``[fail]``: the job ends failed with "Upstream model error".
- ``[nsfw]``: the job ends as a content-safety failure, "Content safety check failed"
  (nananobanana sync: the documented warning body; elsewhere a failed task).
- ``[slow]``: the job takes 10x its duration.
Otherwise a job fails with "Upstream model error" at `failure_rate` (seeded).

A job is queued for the first 20% of its duration, then running, then finished;
state is computed from the clock on every request (no timers), and every output URL
is `GET /files/{task_id}/0.png` on the emulator, a real PNG of `image_size` (64x64 by
default) reshaped to the requested aspect ratio, its longer side kept (16:9 → 64x36).

Faults: `emu.script(provider, kind, fault, times)` queues deterministic faults that
take precedence over the random rates of `config.faults`. Random 5xx on polls picks
500, 502 or 503. Errors use each provider's documented error body.

Account limits (none by default; all changeable while serving):
- `config.max_concurrent`: account ("get3w" for v1 and v3 together, "dh3",
  "nananobanana") -> most unfinished tasks per Bearer key. A task counts from its
  accepted create until its end (completed or failed); a create over the cap makes no
  task and costs nothing (nananobanana 503 `server_busy` with `activeTasks`, Get3W 429,
  dh3 code 429); counted in `stats.capacity_refusals`, peaks in `stats.peak_running`.
- Money: `emu.credits` (nananobanana, 402 when short) and `emu.get3w_balance` (key ->
  creates left, 403 at 0); refusals in `stats.payment_refusals`. Assign to top up.
- `config.down`: providers (API names; get3w and get3w_v3 go down separately) whose
  every request is met by a closed connection and no answer, counted only in
  `stats.down_drops`; output files stay served.
- `config.api_keys` / `config.revoked_keys`: 401 from the next request on.
- `await emu.refuse_connections()` stops listening (connections are refused: nothing is
  sent, unlike `down`, whose requests go out and get no answer) until
  `await emu.accept_connections()`; with `config.keep_alive = False` no pooled connection
  outlives its answer, so every next request is refused. Serve one provider from an
  emulator of its own to take that provider away alone.
- A child process (`EmulatorProcess`) takes the same changes at `POST /_emulator/control`
  (see `_limits.apply_control`); `GET` there shows them and what each key is running.
"""

from __future__ import annotations

from types import TracebackType

from aiohttp import web
from aiohttp.typedefs import Handler as WebHandler

from ._core import Core, json_response, read_json
from ._limits import apply_control, control_problem, control_state
from ._routes_dh3 import Dh3
from ._routes_get3w import Get3WV1, Get3WV3
from ._routes_nananobanana import NanaNanoBanana
from ._state import ACCOUNTS, EmulatorConfig, EmuTask, RecordedRequest, Stats

#: Seconds `close()` lets in-flight requests (e.g. sync waits) finish before cancelling.
SHUTDOWN_TIMEOUT = 0.5


class Emulator:
    """The emulator server; start it, point clients at `url`, assert on `stats`."""

    def __init__(self, config: EmulatorConfig | None = None) -> None:
        self._core = Core(config if config is not None else EmulatorConfig())
        self.app = self._build_app()
        self._url: str | None = None
        self._runner: web.AppRunner | None = None
        self._bound: tuple[str, int] | None = None

    def _build_app(self) -> web.Application:
        """All four APIs and the output files on one application."""
        app = web.Application()
        for api_class in (Get3WV1, Get3WV3, Dh3, NanaNanoBanana):
            app.router.add_routes(api_class(self._core).routes())
        app.router.add_get(r"/files/{task_id}/{index:\d+}.png", self._core.serve_file)
        app.router.add_get("/_emulator/stats", self._serve_stats)
        app.router.add_get("/_emulator/control", self._serve_control)
        app.router.add_post("/_emulator/control", self._control)
        app.on_cleanup.append(self._on_cleanup)
        app.middlewares.append(self._keep_alive)
        return app

    @web.middleware
    async def _keep_alive(self, request: web.Request, handler: WebHandler) -> web.StreamResponse:
        """Close each connection after its answer when `config.keep_alive` is off."""
        response = await handler(request)
        if not self._core.config.keep_alive:
            response.force_close()
        return response

    async def _serve_stats(self, request: web.Request) -> web.Response:
        """The counters, for tests and benchmarks that run the emulator in another process."""
        return web.json_response(self.stats.as_json())

    async def _serve_control(self, request: web.Request) -> web.Response:
        """The account limits in force and each key's running tasks."""
        return json_response(control_state(self._core))

    async def _control(self, request: web.Request) -> web.Response:
        """Change account limits at runtime; 400 (nothing applied) on a bad body."""
        body = await read_json(request)
        problem = control_problem(body)
        if problem is not None:
            return json_response({"error": problem}, status=400)
        apply_control(self._core, body)
        return json_response(control_state(self._core))

    async def _on_cleanup(self, app: web.Application) -> None:
        """Stop webhook deliveries when the application is torn down anywhere."""
        await self._core.shutdown()

    @property
    def url(self) -> str:
        """Origin the emulator serves on, e.g. ``http://127.0.0.1:43123`` (after `start`)."""
        if self._url is None:
            raise RuntimeError("Emulator not started: await emu.start() first")
        return self._url

    @property
    def config(self) -> EmulatorConfig:
        """The live configuration (changes take effect on the next request)."""
        return self._core.config

    @config.setter
    def config(self, value: EmulatorConfig) -> None:
        self._core.config = value

    @property
    def stats(self) -> Stats:
        """Counters of what was received and done since the last `reset_stats()`."""
        return self._core.stats

    @property
    def requests(self) -> list[RecordedRequest]:
        """Every request received (when `config.record_requests` is on)."""
        return self._core.requests

    @property
    def tasks(self) -> dict[str, EmuTask]:
        """Every task created, by id."""
        return self._core.tasks

    @property
    def credits(self) -> int:
        """nananobanana's remaining account credits."""
        return self._core.credits

    @credits.setter
    def credits(self, value: int) -> None:
        self._core.credits = value

    @property
    def get3w_balance(self) -> dict[str, int]:
        """Get3W creates left per key (live: set an entry to top up; absent = unlimited)."""
        return self._core.get3w_balance

    @get3w_balance.setter
    def get3w_balance(self, value: dict[str, int]) -> None:
        self._core.get3w_balance = value

    def running(self, provider: str, key: str) -> int:
        """Unfinished tasks of `key` now on `provider`'s account (get3w_v3 counts as get3w)."""
        return self._core.running(ACCOUNTS[provider], key)

    def script(self, provider: str, kind: str, fault: str, times: int = 1) -> None:
        """Queue `fault` ("500", "502", "503", "429", "drop_before", "drop_after",
        "non_json", "slow"; "drop" = "drop_before") for the next `times` requests."""
        self._core.script(provider, kind, fault, times)

    async def wait_webhooks(self) -> None:
        """Wait until all webhook deliveries scheduled so far are done (sent or given up)."""
        await self._core.webhooks.drain()

    def reset_stats(self) -> None:
        """Zero the counters and forget recorded requests.

        Tasks, credits, balances, the tasks each key is running and the dh3 QPS window
        (the server's view of the last second) are kept."""
        self._core.stats = Stats()
        self._core.requests.clear()

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Serve on host:port (0 = any free port); return and set `url`."""
        if self._runner is not None:
            raise RuntimeError("Emulator already started")
        runner = web.AppRunner(
            self.app, handle_signals=False, access_log=None, shutdown_timeout=SHUTDOWN_TIMEOUT
        )
        await runner.setup()
        await web.TCPSite(runner, host, port).start()
        self._runner = runner
        bound_host, bound_port = runner.addresses[0][:2]
        self._bound = (bound_host, bound_port)
        shown = f"[{bound_host}]" if ":" in bound_host else bound_host
        self._url = f"http://{shown}:{bound_port}"
        return self._url

    async def refuse_connections(self) -> None:
        """Stop listening: new connections are refused (answers under way still finish)."""
        if self._runner is None:
            raise RuntimeError("Emulator not started: await emu.start() first")
        for site in list(self._runner.sites):
            await site.stop()

    async def accept_connections(self) -> None:
        """Listen again on the same address, after `refuse_connections()`."""
        if self._runner is None or self._bound is None:
            raise RuntimeError("Emulator not started: await emu.start() first")
        if not self._runner.sites:
            await web.TCPSite(self._runner, *self._bound).start()

    async def close(self) -> None:
        """Stop serving, release the port, cancel pending webhook deliveries."""
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()
        await self._core.shutdown()

    async def __aenter__(self) -> Emulator:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()
