"""The emulator's shared machinery: request gate (down, record, auth, QPS, faults), tasks, files.

Every provider API is a `ProviderAPI` subclass that only knows its paths, field names,
status words and error bodies; everything else happens here once for all of them,
including the per-key caps on unfinished tasks (checked and taken in one step, with no
await in between, so concurrent creates can never overshoot a cap).
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections import deque
from collections.abc import Awaitable, Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from aiohttp import web
from aiohttp.typedefs import Handler as WebHandler

from ._limits import config_problem
from ._png import make_png
from ._state import (
    FAIL_MARKER,
    NSFW_MARKER,
    PROVIDERS,
    SLOW_FACTOR,
    SLOW_MARKER,
    ArrivalWindow,
    EmulatorConfig,
    EmuTask,
    Kind,
    Outcome,
    RecordedRequest,
    RunningTasks,
    Stats,
    sized_for,
)
from ._webhooks import WebhookPlan, WebhookSender

AuthFailure = Literal["missing", "malformed", "invalid"]
FAULTS = frozenset({"500", "502", "503", "429", "drop_before", "drop_after", "non_json", "slow"})
FAULT_ALIASES = {"drop": "drop_before"}
NON_JSON_BODY = "<html>upstream error</html>"


class Reply(Exception):
    """Raised anywhere in a handler to answer with `response` at once."""

    def __init__(self, response: web.StreamResponse) -> None:
        super().__init__(response.status)
        self.response = response


class Drop(Exception):
    """Raised anywhere in a handler to close the connection without an answer."""


JSON_HEADERS = {"Content-Type": "application/json"}


def json_bytes(obj: Any) -> bytes:
    """Compact JSON encoding used for every body the emulator sends."""
    return json.dumps(obj, separators=(",", ":")).encode()


def json_payload(obj: Any) -> tuple[bytes, dict[str, str]]:
    """A webhook payload: JSON body bytes and their Content-Type header."""
    return json_bytes(obj), JSON_HEADERS


def json_response(obj: Any, status: int = 200, headers: Mapping[str, str] | None = None) -> web.Response:
    """A compact JSON response (cheaper than aiohttp's json_response helper)."""
    return web.Response(
        body=json_bytes(obj),
        status=status,
        content_type="application/json",
        headers=headers,
    )


def same_auth_text(text: str) -> Mapping[AuthFailure, str]:
    """One 401 text for every kind of bad Authorization header."""
    return {"missing": text, "malformed": text, "invalid": text}


def bearer_token(header: str | None) -> str:
    """The key of a `Bearer <key>` Authorization header, "" when there is none."""
    scheme, _, token = (header or "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


def bearer_problem(
    header: str | None, expected: str | None, revoked: Collection[str] = ()
) -> AuthFailure | None:
    """Check an Authorization header; None when it carries an accepted Bearer key."""
    if not header:
        return "missing"
    token = bearer_token(header)
    if not token:
        return "malformed"
    if (expected is not None and token != expected) or token in revoked:
        return "invalid"
    return None


@dataclass(slots=True)
class Call:
    """What the gate learned about one request, handed to the provider handler."""

    api: ProviderAPI
    kind: Kind
    body: Any
    origin: str
    key: str = ""  # the Bearer key ("" when none): caps and balances are per key
    drop_after: bool = False


Handler = Callable[[web.Request, Call], Awaitable[web.StreamResponse]]


class ProviderAPI:
    """Base of one provider's routes: its error body, texts and webhook plan."""

    provider: ClassVar[str] = ""
    account: ClassVar[str] = ""  # whose caps and balance apply; Get3W v1 and v3 share one
    texts: ClassVar[Mapping[int, str]] = {}
    auth_texts: ClassVar[Mapping[AuthFailure, str]] = {}

    def __init__(self, core: Core) -> None:
        self.core = core

    def routes(self) -> list[web.RouteDef]:
        """The aiohttp routes of this API."""
        raise NotImplementedError

    def error_body(self, status: int, text: str) -> Any:
        """The provider's JSON error body for `status`."""
        raise NotImplementedError

    def http_status(self, status: int) -> int:
        """HTTP status used to send an error whose own code is `status`."""
        return status

    def error(
        self, status: int, text: str | None = None, headers: Mapping[str, str] | None = None
    ) -> web.Response:
        """The provider's error response, with its documented text unless given."""
        body = self.error_body(status, text or self.texts[status])
        return json_response(body, status=self.http_status(status), headers=headers)

    def fail(self, status: int, text: str | None = None) -> Reply:
        """An exception that answers with the provider's error response."""
        return Reply(self.error(status, text))

    def fault_response(self, status: int, kind: Kind) -> web.Response:
        """Answer for an injected HTTP error; 429 and 503 carry Retry-After."""
        return self.error(status, headers=self.core.retry_after_header(status))

    def capacity_refusal(self, active: int) -> web.Response:
        """Answer to a create over the key's cap of tasks at once: 429 in the provider's words."""
        return self.error(429, headers=self.core.capacity_headers())

    def charge(self, call: Call) -> None:
        """Take what an accepted create costs beyond nananobanana credits (default: nothing)."""

    def qps_limit(self) -> float | None:
        """Create requests allowed per sliding second, None for no limit."""
        return None

    def busy_allowed(self, body: Any) -> bool:
        """Whether a random 503 may be injected on this create request."""
        return True

    def webhook_plan(self, task: EmuTask, url: str) -> WebhookPlan | None:
        """How a finished task's callback is delivered; None when it has none."""
        return None

    def endpoint(self, kind: Kind, handler: Handler, auth: bool = True) -> WebHandler:
        """Wrap a handler in the shared gate of this provider."""
        return self.core.endpoint(self, kind, handler, auth)


class Core:
    """Shared state of one emulator: config, counters, tasks, scripted faults."""

    def __init__(self, config: EmulatorConfig) -> None:
        problem = config_problem(config)
        if problem is not None:
            raise ValueError(problem)
        self.config = config
        self.stats = Stats()
        self.requests: list[RecordedRequest] = []
        self.tasks: dict[str, EmuTask] = {}
        self.credits = config.credits
        self.get3w_balance = dict(config.get3w_balance)
        self._running: dict[tuple[str, str], RunningTasks] = {}
        self._scripts: dict[tuple[str, str], deque[str]] = {}
        self._fault_rng = random.Random(f"{config.seed}:faults")
        self._task_rng = random.Random(f"{config.seed}:tasks")
        self._windows = {name: ArrivalWindow() for name in PROVIDERS}
        self.webhooks = WebhookSender(
            lambda: self.config, lambda: self.stats, random.Random(f"{config.seed}:webhooks")
        )

    # --- the gate -------------------------------------------------------------------

    def endpoint(self, api: ProviderAPI, kind: Kind, handler: Handler, auth: bool) -> WebHandler:
        """An aiohttp handler: gate the request, run `handler`, turn Reply/Drop into answers."""

        async def handle(request: web.Request) -> web.StreamResponse:
            if api.provider in self.config.down:
                # Like a refused connection: no answer, nothing recorded or counted but this.
                self.stats.down_drops[api.provider] += 1
                return drop_connection(request)
            try:
                call = await self._admit(request, api, kind, auth)
                return await handler(request, call)
            except Reply as reply:
                return reply.response
            except Drop:
                return drop_connection(request)

        return handle

    async def _admit(self, request: web.Request, api: ProviderAPI, kind: Kind, auth: bool) -> Call:
        """Record and count the request, then apply auth, the QPS limit and faults."""
        now = time.monotonic()
        arrivals = self._count(api.provider, kind, now)  # before any await: arrivals stay ordered
        body = await read_json(request) if request.method == "POST" else None
        self.record(request, api.provider, kind, body, now)
        if auth:
            self._check_auth(request, api)
        if kind == "create":
            self._check_qps(api, arrivals)
        key = bearer_token(request.headers.get("Authorization"))
        call = Call(api, kind, body, str(request.url.origin()), key)
        if kind in ("create", "poll"):
            await self._apply_fault(call)
        return call

    def record(self, request: web.Request, provider: str, kind: Kind, body: Any, now: float) -> None:
        """Append the request to `requests` unless recording is switched off."""
        if self.config.record_requests:
            self.requests.append(
                RecordedRequest(
                    provider,
                    kind,
                    request.method,
                    request.path,
                    dict(request.query),
                    dict(request.headers),
                    body,
                    now,
                )
            )

    def _count(self, provider: str, kind: Kind, now: float) -> int:
        """Bump the per-kind counters; return creates arrived in the last second."""
        if kind == "poll":
            self.stats.polls[provider] += 1
        if kind != "create":
            return 0
        self.stats.create_requests[provider] += 1
        self.stats.first_create_at.setdefault(provider, now)
        self.stats.last_create_at[provider] = now
        arrivals = self._windows[provider].arrive(now)
        if arrivals > self.stats.max_creates_in_1s[provider]:
            self.stats.max_creates_in_1s[provider] = arrivals
        return arrivals

    def _check_auth(self, request: web.Request, api: ProviderAPI) -> None:
        """Answer 401 in the provider's words unless the Bearer key is accepted."""
        problem = bearer_problem(
            request.headers.get("Authorization"), self.expected_key(api.provider), self.config.revoked_keys
        )
        if problem is not None:
            raise api.fail(401, api.auth_texts[problem])

    def expected_key(self, provider: str) -> str | None:
        """The one accepted key of `provider` (get3w_v3 falls back to get3w), None = any."""
        keys = self.config.api_keys
        if keys is None:
            return None
        if provider in keys:
            return keys[provider]
        return keys.get("get3w") if provider == "get3w_v3" else None

    def _check_qps(self, api: ProviderAPI, arrivals: int) -> None:
        """Answer 429 when more creates than the limit arrived in the last second."""
        limit = api.qps_limit()
        if limit is not None and arrivals > limit:
            self.stats.rate_limited[api.provider] += 1
            raise Reply(api.error(429, headers=self.retry_after_header(429)))

    async def _apply_fault(self, call: Call) -> None:
        """Inject the next scripted fault, else random ones drawn from the config."""
        queue = self._scripts.get((call.api.provider, call.kind))
        if queue:
            fault: str | None = queue.popleft()
        else:
            if self._chance(self.config.faults.slow):
                await self._inject(call, "slow")
            fault = self._random_fault(call)
        if fault is not None:
            await self._inject(call, fault)

    def _random_fault(self, call: Call) -> str | None:
        """Draw this request's random fault (other than slow), or None."""
        faults = self.config.faults
        table: tuple[tuple[str, float], ...]
        if call.kind == "create":
            busy = faults.create_503 if call.api.busy_allowed(call.body) else 0.0
            table = (
                ("drop_before", faults.create_drop_before),
                ("429", faults.create_429),
                ("503", busy),
                ("drop_after", faults.create_drop_after),
            )
        else:
            table = (
                ("drop_before", faults.poll_drop),
                ("5xx", faults.poll_5xx),
                ("non_json", faults.poll_non_json),
            )
        for name, rate in table:
            if self._chance(rate):
                return self._fault_rng.choice(("500", "502", "503")) if name == "5xx" else name
        return None

    async def _inject(self, call: Call, fault: str) -> None:
        """Carry out one fault: sleep, mark drop-after, or raise Drop/Reply."""
        self.stats.faults_injected[(call.api.provider, call.kind, fault)] += 1
        if fault == "slow":
            await asyncio.sleep(self.config.faults.slow_seconds)
        elif fault == "drop_after":
            if call.kind != "create":
                raise Drop
            call.drop_after = True
        elif fault == "drop_before":
            raise Drop
        elif fault == "non_json":
            raise Reply(web.Response(text=NON_JSON_BODY, content_type="text/html"))
        else:
            status = int(fault)
            if status == 429:
                self.stats.rate_limited[call.api.provider] += 1
            raise Reply(call.api.fault_response(status, call.kind))

    def capacity_headers(self) -> dict[str, str] | None:
        """The Retry-After header of a capacity refusal, when `capacity_retry_after` is set."""
        value = self.config.capacity_retry_after
        return None if value is None else {"Retry-After": f"{value:g}"}

    def refuse_payment(self, api: ProviderAPI, status: int, text: str | None = None) -> Reply:
        """Count a create refused for money and make its answer (402 credits, 403 balance)."""
        self.stats.payment_refusals[api.provider] += 1
        return api.fail(status, text)

    def retry_after_header(self, status: int) -> dict[str, str] | None:
        """The Retry-After header for a 429/503 answer, if configured."""
        value = self.config.faults.retry_after
        if status not in (429, 503) or value is None:
            return None
        return {"Retry-After": f"{value:g}"}

    def _chance(self, probability: float) -> bool:
        """Seeded coin flip for faults; draws nothing when the probability is 0."""
        return probability > 0 and self._fault_rng.random() < probability

    def script(self, provider: str, kind: str, fault: str, times: int = 1) -> None:
        """Queue `fault` for the next `times` requests of this provider and kind."""
        fault = FAULT_ALIASES.get(fault, fault)
        if provider not in PROVIDERS:
            raise ValueError(f"unknown provider {provider!r}; expected one of {PROVIDERS}")
        if kind not in ("create", "poll"):
            raise ValueError(f"unknown kind {kind!r}; expected 'create' or 'poll'")
        if fault not in FAULTS:
            raise ValueError(f"unknown fault {fault!r}; expected one of {sorted(FAULTS)}")
        self._scripts.setdefault((provider, kind), deque()).extend([fault] * times)

    # --- tasks ----------------------------------------------------------------------

    def create_task(
        self,
        call: Call,
        task_id: str,
        model: str,
        input: dict[str, Any],
        prompt: str,
        webhook: str | None = None,
        credits_used: int = 0,
        aspect_ratio: object = None,
    ) -> EmuTask:
        """Take a slot of the key's cap, charge, then make, store and count a task;
        schedule its webhook; honour a drop-after fault.

        Over the cap nothing is made or charged: the provider's capacity refusal is raised.
        Its PNG has the requested `aspect_ratio`, the longer side of `config.image_size`.
        """
        running = self._check_capacity(call)
        self.credits -= credits_used
        call.api.charge(call)
        task = EmuTask(
            provider=call.api.provider,
            model=model,
            input=input,
            created_at=time.monotonic(),
            duration=self._duration(model, prompt),
            outcome=self._outcome(prompt),
            webhook=webhook,
            id=task_id,
            origin=call.origin,
            image_size=sized_for(self.config.image_size, aspect_ratio),
            credits_used=credits_used,
            remaining_credits=self.credits,
        )
        self.tasks[task_id] = task
        self._occupy(call, running, task)
        self.stats.creates[task.provider] += 1
        if task.outcome != "completed":
            self.stats.failed_tasks.add(task_id)
        plan = call.api.webhook_plan(task, webhook) if webhook else None
        if plan is not None:
            self.webhooks.schedule(task, plan)
        if call.drop_after:
            raise Drop
        return task

    def _check_capacity(self, call: Call) -> RunningTasks:
        """The key's running tasks; raise the capacity refusal when they fill its cap."""
        account = call.api.account
        running = self._running.setdefault((account, call.key), RunningTasks())
        cap = self.config.max_concurrent.get(account)
        active = running.count(time.monotonic())
        if cap is not None and active >= cap:
            self.stats.capacity_refusals[call.api.provider] += 1
            raise Reply(call.api.capacity_refusal(active))
        return running

    def _occupy(self, call: Call, running: RunningTasks, task: EmuTask) -> None:
        """Count `task` against its key until it finishes, and keep the key's peak."""
        running.add(task.finish_at)
        peaks = self.stats.peak_running[call.api.account]
        peaks[call.key] = max(peaks[call.key], running.count(task.created_at))

    def running(self, account: str, key: str) -> int:
        """Unfinished tasks of `key` on `account` right now."""
        tasks = self._running.get((account, key))
        return 0 if tasks is None else tasks.count(time.monotonic())

    def running_now(self) -> dict[str, dict[str, int]]:
        """Unfinished tasks right now, account -> key -> count (keys with none left out)."""
        now = time.monotonic()
        result: dict[str, dict[str, int]] = {}
        for (account, key), tasks in self._running.items():
            if count := tasks.count(now):
                result.setdefault(account, {})[key] = count
        return result

    def _duration(self, model: str, prompt: str) -> float:
        """A job's duration: model mean, spread uniformly, x10 for the slow marker."""
        config = self.config
        mean = config.mean_duration(model) * (SLOW_FACTOR if SLOW_MARKER in prompt else 1.0)
        spread = config.duration_spread
        return mean * self._task_rng.uniform(1 - spread, 1 + spread) if spread else mean

    def _outcome(self, prompt: str) -> Outcome:
        """How a job ends: prompt markers first, then the seeded failure rate."""
        if NSFW_MARKER in prompt:
            return "nsfw"
        if FAIL_MARKER in prompt:
            return "failed"
        rate = self.config.failure_rate
        return "failed" if rate > 0 and self._task_rng.random() < rate else "completed"

    def estimated_duration(self, model: str) -> float:
        """The estimate reported at submit: the model's mean duration times the bias."""
        return round(self.config.mean_duration(model) * self.config.estimate_bias, 3)

    def find(self, provider: str, task_id: str) -> EmuTask | None:
        """The task of `provider` with this id, or None."""
        task = self.tasks.get(task_id)
        return task if task is not None and task.provider == provider else None

    @staticmethod
    async def wait_done(task: EmuTask) -> None:
        """Sleep until `task` has finished (sync modes)."""
        await asyncio.sleep(max(0.0, task.finish_at - time.monotonic()))

    # --- output files and shutdown ----------------------------------------------------

    async def serve_file(self, request: web.Request) -> web.StreamResponse:
        """GET /files/{task_id}/{index}.png: the PNG of a completed task."""
        self.stats.downloads += 1
        task = self.tasks.get(request.match_info["task_id"])
        self.record(request, task.provider if task else "", "file", None, time.monotonic())
        if task is None or task.state() != "completed" or request.match_info["index"] != "0":
            raise web.HTTPNotFound()
        return web.Response(body=make_png(*task.image_size), content_type="image/png")

    async def shutdown(self) -> None:
        """Stop webhook deliveries and release their HTTP session."""
        await self.webhooks.shutdown()


async def read_json(request: web.Request) -> Any:
    """The request body parsed as JSON, or None when it is empty or not JSON."""
    raw = await request.read()
    if not raw:
        return None
    try:
        return json.loads(raw)
    except ValueError:
        return None


def drop_connection(request: web.Request) -> web.StreamResponse:
    """Close the socket without answering; aiohttp then skips writing the dummy reply."""
    transport = request.transport
    if transport is not None:
        transport.close()
    return web.Response(status=499)
