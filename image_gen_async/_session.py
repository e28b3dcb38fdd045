"""AsyncSession and ProviderClient: configuration, and the calls users make."""

from __future__ import annotations

import asyncio
import hashlib
import os
import weakref
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

from yarl import URL

from . import _config
from ._backend import LimiterBackend, LocalBackend
from ._capacity import Account, CapacityGate, LocalGate, Slot
from ._engine import Created, Engine, EngineSettings, OrphanedTask, usable_task_id
from ._events import EventStream
from ._follow import Follow
from ._handle import TaskHandle, result_of
from ._polling import PollSettings
from ._ratelimit import Limiter
from ._transport import Secret, Target
from .download import DEFAULT_MAX_BYTES, download_result
from .errors import APIError, ConfigurationError, InvalidRequestError, NotSupportedError
from .models import ModelInfo, TaskResult, TaskStatus
from .providers import CODECS, FALLBACK_CLIENT, HttpRequest, Snapshot
from .router import Router, make_router
from .router import Target as RouterTarget
from .webhooks import WebhookReceiver

if TYPE_CHECKING:
    from .otel import Telemetry

# Get3W's webhook signing secret (v3 signs with X-Get3W-Signature).
WEBHOOK_SECRET_ENV = "GET3W_WEBHOOK_SECRET"


class ProviderClient:
    """One provider API within a session: ``submit``, ``generate`` and ``resume``."""

    def __init__(self, session: AsyncSession, target: Target) -> None:
        self._session = session
        self._target = target

    @property
    def name(self) -> str:
        """The client name (``get3w``, ``get3w_v3``, ``dh3``, ``nananobanana``)."""
        return self._target.name

    @property
    def base_url(self) -> str:
        """The origin every request of this client goes to."""
        return str(self._target.origin)

    @property
    def limiter(self) -> Limiter:
        """The create limiter this client shares with every client using the same key."""
        return self._target.limiter

    def __repr__(self) -> str:
        return f"<ProviderClient {self.name} {self.base_url}>"

    @property
    def blocked(self) -> APIError | None:
        """The answer that stopped this key (401 bad key, 402 no credits, 403 no balance/access), or None.

        While set, every create of this client (and of any client on the same account and
        key) fails at once with it, and nothing is sent; ``unblock()`` after fixing the cause.
        """
        return self._target.account.blocked

    def unblock(self) -> None:
        """Send again after the cause of ``blocked`` was fixed (a top-up, a new key)."""
        self._target.account.unblock()

    @property
    def capacity(self) -> CapacityGate:
        """The capacity gate of this client's account and key (``window``, ``in_flight``, ``refusals``)."""
        return self._target.account.gate

    @property
    def remaining_credits(self) -> float | None:
        """The account's credits as the provider last reported them (nananobanana), or None."""
        return self._target.account.remaining_credits

    async def credits(self) -> float:
        """The account's balance (nananobanana ``GET /api/v1/credits``); ``NotSupportedError`` elsewhere."""
        target = self._ready_target()
        request = self._supported(target.codec.credits_request(), "credits")
        engine = self._session._engine
        # A one-off read: a create's count of tries, not the poll budget's "until the deadline".
        credits = await engine.read(target, request, target.codec.read_credits, budget=engine.create_budget)
        target.account.remaining_credits = credits
        return credits

    async def models(self) -> tuple[ModelInfo, ...]:
        """The provider's models (nananobanana ``GET /api/v1/models``); ``NotSupportedError`` elsewhere."""
        target = self._ready_target()
        request = self._supported(target.codec.models_request(), "models")
        engine = self._session._engine
        return await engine.read(target, request, target.codec.read_models, budget=engine.create_budget)

    async def _cancel(self, request: HttpRequest) -> None:
        """Send a task's cancel (a DELETE: safe to repeat), within a create's count of tries."""
        target = self._ready_target()
        engine = self._session._engine
        await engine.read(
            target,
            request,
            lambda body: True,
            budget=engine.create_budget,
            error_of=target.codec.cancel_error_of,
        )

    def _supported(self, request: HttpRequest | None, call: str) -> HttpRequest:
        if request is None:
            raise NotSupportedError(f"{self.name} has no {call} call in its API")
        return request

    def check_ready(self) -> None:
        """Raise ``ConfigurationError`` now if this client has no key or the session is closed.

        Lets a pipeline fail on a missing key before it records or sends anything.
        """
        self._ready_target()

    def _ready_model(self, model: object) -> Target:
        """The target, once the model is a name (a create for no model must never be paid)."""
        if not isinstance(model, str) or not model.strip():
            shown = _config.shown(model)
            raise InvalidRequestError(f"{self.name}: model must be a non-empty str, got {shown}")
        return self._ready_target()

    def _ready_target(self) -> Target:
        self._session._engine.check_open()  # SessionClosedError once the session is closed
        if self._target.key is None:
            raise ConfigurationError(
                f"no API key for {self.name}: pass api_keys={{'{self.name}': ...}} "
                f"or set {self._target.codec.env_var}"
            )
        return self._target

    async def submit(
        self,
        model: str,
        *,
        prompt: str,
        webhook: bool = False,
        webhook_url: str | None = None,
        timeout: float | None = None,
        before_create: Callable[[], object] | None = None,
        stream: bool = False,
        on_progress: Callable[[float, str | None], object] | None = None,
        **params: Any,
    ) -> TaskHandle:
        """Create a task and return its handle once the provider has accepted it.

        ``params`` are the provider's documented parameters (``aspect_ratio``,
        ``resolution``, ``output_format``, ``image_urls``, ``seed``, ...); documented
        limits are checked before anything is sent. ``timeout`` is the handle's deadline
        in seconds (default: the session's ``task_timeout``).

        ``webhook=True`` has the provider push the result to ``session.webhooks``; the
        handle polls only if no callback comes well after the job should have ended.
        ``webhook_url`` passes a URL of your own instead (the handle then polls as usual).
        ``before_create()`` is called right before each create attempt is sent, after its
        rate-limit turn (if it returns an awaitable, that is awaited before sending): a
        journal records there, durably, that the job may exist from now on.

        ``stream=True`` (nananobanana): the create's answer streams the job's events, which
        report its status and progress (``on_progress(progress, message)``, ``handle.progress``);
        if the stream drops, the handle polls. ``NotSupportedError`` for a provider without it.
        """
        # Checked before the create is sent: a deadline that cannot work must not cost a task.
        timeout = _config.call_timeout(timeout)
        target = self._ready_model(model)
        if stream:
            request = self._stream_request(target, model, prompt, params, webhook or webhook_url is not None)
        else:
            webhook_url = await self._callback_url(webhook, webhook_url)
            request = target.codec.submit_request(model, prompt, params, webhook_url=webhook_url, sync=False)
        created, traced = await self._create(
            target, model, request, timeout, before_send=before_create, stream=stream
        )
        handle = self._follow(
            created.snapshot,
            model,
            created.retries,
            timeout,
            webhook=webhook,
            slot=created.slot,
            events=created.events,
            on_progress=on_progress,
        )
        self._trace(traced, handle, created)
        return handle

    def _stream_request(
        self, target: Target, model: str, prompt: str, params: Mapping[str, Any], webhook: bool
    ) -> HttpRequest:
        """The stream create, for a provider that has one (nothing is sent otherwise)."""
        if webhook:
            raise InvalidRequestError("stream=True reports on the create's own answer: pass no webhook")
        request = target.codec.stream_request(model, prompt, params)
        if request is None:
            raise NotSupportedError(
                f"{self.name} has no stream mode (nananobanana has); watch handle.updates() instead"
            )
        return request

    async def _create(
        self, target: Target, model: str, request: HttpRequest, timeout: float | None, **options: Any
    ) -> tuple[Created, Any]:
        """The engine's create, bounded by the job's deadline; an uncertain one holds its slot a
        while. With telemetry, the job's span starts here (the second value, else None)."""
        telemetry = self._session._telemetry
        traced = telemetry.job_started(self.name, model) if telemetry is not None else None
        try:
            created = await self._session._engine.create(
                target,
                model,
                request,
                deadline=self._session._engine.deadline(timeout),
                hold_uncertain=lambda: self._hold_uncertain(model),
                **options,
            )
        except BaseException as error:
            if telemetry is not None:
                telemetry.create_failed(traced, self.name, error)
            raise
        return created, traced

    def _trace(self, traced: Any, handle: TaskHandle, created: Created) -> None:
        telemetry = self._session._telemetry
        if telemetry is not None:
            telemetry.created(traced, handle, created.retries, created.refusals)

    def _hold_uncertain(self, model: str) -> float | None:
        """How long an uncertain create keeps its capacity slot: as long as its task may run,
        when jobs of this model have shown it (else it is given back at once)."""
        longest = self._session._follow.planner.upper_bound((self.name, model), None)
        return None if longest is None else longest * 1.25

    async def _callback_url(self, webhook: bool, webhook_url: str | None) -> str | None:
        if not webhook:
            return _config.callback_url(webhook_url)
        if webhook_url is not None:
            raise InvalidRequestError("pass webhook=True or webhook_url, not both")
        if not self._target.codec.has_webhooks:
            raise InvalidRequestError(f"{self.name} has no webhook mode; poll instead")
        # With a relay, hear the other instances before the provider can call any of them.
        await self._session.webhooks.ready()
        return self._session.webhooks.url_for(self.name)

    async def generate(
        self,
        model: str,
        *,
        prompt: str,
        webhook: bool = False,
        webhook_url: str | None = None,
        timeout: float | None = None,
        stream: bool = False,
        on_progress: Callable[[float, str | None], object] | None = None,
        **params: Any,
    ) -> TaskResult:
        """Submit and wait for the result, using the provider's sync mode where it has one.

        ``stream=True`` (nananobanana) uses its stream mode instead, reporting progress to
        ``on_progress(progress, message)`` and polling if the stream drops.
        Raises ``TaskFailedError`` (or ``ContentPolicyError``) when the task fails.
        """
        if stream:
            handle = await self.submit(
                model,
                prompt=prompt,
                webhook=webhook,
                webhook_url=webhook_url,
                timeout=timeout,
                stream=True,
                on_progress=on_progress,
                **params,
            )
            return await result_of(handle)
        # Checked before the create is sent: a deadline that cannot work must not cost a task.
        timeout = _config.call_timeout(timeout)
        target = self._ready_model(model)
        engine = self._session._engine
        webhook_url = await self._callback_url(webhook, webhook_url)
        sync = target.codec.has_sync_mode and webhook_url is None
        request = target.codec.submit_request(model, prompt, params, webhook_url=webhook_url, sync=sync)
        read_timeout = None
        if sync:
            read_timeout = (
                engine.settings.sync_timeout
                if timeout is None
                else min(timeout, engine.settings.sync_timeout)
            )
        created, traced = await self._create(
            target,
            model,
            request,
            timeout,
            read_timeout=read_timeout,
            # Sync mode: the exchange is the job, so the job's timeout bounds it whole.
            exchange_limit=None if read_timeout is None or timeout is None else timeout,
            eager=sync,
        )
        # Timed from when the request went out (pool and limiter waits are not job time):
        # exact when sync mode answered with the result.
        took = asyncio.get_running_loop().time() - created.sent_at
        handle = self._follow(
            created.snapshot,
            model,
            created.retries,
            timeout,
            webhook=webhook,
            took=(took, took),
            slot=created.slot,
            on_progress=on_progress,
        )
        self._trace(traced, handle, created)
        return await result_of(handle)

    def resume(
        self,
        task_id: str,
        model: str,
        *,
        estimated_duration: float | None = None,
        timeout: float | None = None,
    ) -> TaskHandle:
        """A handle for a task created earlier (e.g. by a process that died): polls, never creates."""
        if not isinstance(task_id, str) or not task_id.strip() or not usable_task_id(task_id):
            raise InvalidRequestError(
                f"task_id must be a non-empty str of valid text, got {_config.shown(task_id)}"
            )
        timeout = _config.call_timeout(timeout)
        estimated_duration = _config.optional_positive_number(
            "estimated_duration", estimated_duration, error=InvalidRequestError
        )
        target = self._ready_model(model)
        snapshot = Snapshot(task_id, TaskStatus.QUEUED, estimated_duration=estimated_duration)
        # The task runs at the provider: it holds a place in the key's window, even over it.
        slot = target.account.gate.occupy()
        return self._follow(snapshot, model, 0, timeout, learn=False, slot=slot)

    def _follow(
        self,
        snapshot: Snapshot,
        model: str,
        retries: int,
        timeout: float | None,
        *,
        webhook: bool = False,
        took: tuple[float, float] | None = None,
        learn: bool = True,
        slot: Slot | None = None,
        events: EventStream | None = None,
        on_progress: Callable[[float, str | None], object] | None = None,
    ) -> TaskHandle:
        target = self._target
        follow = self._session._follow
        handle = TaskHandle(
            task_id=snapshot.task_id,
            provider=target.name,
            model=model,
            status=snapshot.status,
            estimated_duration=snapshot.estimated_duration,
            retries=retries,
        )
        handle._slot = slot  # given back when the handle is done
        handle.credits_used = snapshot.credits_used
        if on_progress is not None:
            handle.on_progress(on_progress)
        handle.report_progress(snapshot.progress, snapshot.message)
        cancel = target.codec.cancel_request(handle.task_id)
        if cancel is not None:
            handle._cancel_remote = lambda: self._cancel(cancel)
        if snapshot.result is not None:
            if events is not None:
                events.close()
            follow.finish(target, handle, snapshot.result, took)
        else:
            follow.start(target, handle, snapshot, timeout, webhook=webhook, learn=learn, events=events)
            if webhook:
                self._session.webhooks.expect(target, handle)
        return handle


def _gate(
    backend: LimiterBackend, account: str, fingerprint: str, limit: int | None, pause: float, max_pause: float
) -> CapacityGate:
    """The backend's capacity gate; an in-process one for a backend that makes none."""
    make = getattr(backend, "gate", None)
    if make is None:
        return LocalGate(account, limit, pause=pause, max_pause=max_pause)
    gate: CapacityGate = make(account, fingerprint, limit, pause=pause, max_pause=max_pause)
    return gate


def _key_fingerprint(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def _origin(label: str, value: object) -> URL:
    """The origin (a path prefix allowed) of a client; never echoes credentials or a query."""
    return _config.origin(label, value)


class AsyncSession:
    """The entry point: one connection pool, one limiter per provider+key, every client.

    Use as ``async with AsyncSession(...) as session`` (or call ``await session.close()``).
    Keys come from ``api_keys`` or the environment (``GET3W_API_KEY``, ``DH3_API_KEY``,
    ``NANANOBANANA_API_KEY``); ``get3w_v3`` borrows ``get3w``'s key and origin. A client's
    value may be a list of keys (``{"dh3": ["k1", "k2"]}``): each key has its own limiter,
    capacity gate and circuit; the client uses the first, ``session.router()`` all of them.
    ``limiter_backend=RedisBackend(url)`` shares each key's limit and the webhook
    callbacks with every process on that Redis (default: this process only).
    """

    def __init__(
        self,
        *,
        api_keys: Mapping[str, str | Sequence[str]] | None = None,
        base_urls: Mapping[str, str] | None = None,
        rate_limits: Mapping[str, float | None] | None = None,
        pool_size: int = 100,
        connect_timeout: float = 10.0,
        read_timeout: float = 60.0,
        sync_timeout: float = 300.0,
        task_timeout: float = 3600.0,
        create_retries: int = 4,
        poll_retries: int | None = None,
        retry_base: float = 0.5,
        retry_cap: float = 20.0,
        polling: PollSettings | None = None,
        rate_limit_margin: float = 0.025,
        webhook_secrets: Mapping[str, str] | None = None,
        limiter_backend: LimiterBackend | None = None,
        env: Mapping[str, str] | None = None,
        max_concurrent: Mapping[str, int | None] | None = None,
        download_timeout: float = 600.0,
        telemetry: Telemetry | None = None,
    ) -> None:
        # Every value is checked here, before a limiter or connection exists: a bad one is a
        # ConfigurationError naming it, never a paid create that fails afterwards.
        given_keys = _config.mapping("api_keys", api_keys)
        given_urls = _config.mapping("base_urls", base_urls)
        given_rates = _config.mapping("rate_limits", rate_limits)
        given_secrets = _config.mapping("webhook_secrets", webhook_secrets)
        given_caps = _config.mapping("max_concurrent", max_concurrent)
        for label, given in (
            ("max_concurrent", given_caps),
            ("api_keys", given_keys),
            ("base_urls", given_urls),
            ("rate_limits", given_rates),
            ("webhook_secrets", given_secrets),
        ):
            unknown = sorted(set(given) - set(CODECS), key=str)
            if unknown:
                raise ConfigurationError(
                    f"{label}: unknown client {unknown[0]!r}; known: {', '.join(CODECS)}"
                )
        # A client's value is one key or a list of them (each its own limiter, gate and circuit).
        keys = {name: _config.api_keys(f"api_keys[{name!r}]", value) for name, value in given_keys.items()}
        origins = {name: _origin(f"base_urls[{name!r}]", value) for name, value in given_urls.items()}
        rates = {
            name: _config.optional_positive_number(f"rate_limits[{name!r}]", value)
            for name, value in given_rates.items()
        }
        secrets = {
            name: _config.secret_text(f"webhook_secrets[{name!r}]", value)
            for name, value in given_secrets.items()
        }
        caps = {
            name: _config.optional_whole_number(f"max_concurrent[{name!r}]", value, 1)
            for name, value in given_caps.items()
        }
        retry_base, retry_cap = _config.retry_bounds(retry_base, retry_cap)
        rate_limit_margin = _config.number_in("rate_limit_margin", rate_limit_margin, 0.0, 1.0)
        self._engine = Engine(
            EngineSettings(
                pool_size=_config.whole_number("pool_size", pool_size, 1),
                connect_timeout=_config.positive_number("connect_timeout", connect_timeout),
                read_timeout=_config.positive_number("read_timeout", read_timeout),
                sync_timeout=_config.positive_number("sync_timeout", sync_timeout),
                task_timeout=_config.positive_number("task_timeout", task_timeout),
                create_retries=_config.whole_number("create_retries", create_retries, 0),
                poll_retries=_config.optional_whole_number("poll_retries", poll_retries, 0),
                retry_base=retry_base,
                retry_cap=retry_cap,
                polling=_config.poll_settings(polling),
                download_timeout=_config.positive_number("download_timeout", download_timeout),
            )
        )
        self._follow = Follow(self._engine)
        # OpenTelemetry, opt-in (image_gen_async.otel.Telemetry): None costs nothing.
        self._telemetry = telemetry
        self._follow.telemetry = telemetry
        environ = os.environ if env is None else env
        self._backend = limiter_backend or LocalBackend()
        limiters: dict[tuple[str, str], Limiter] = {}
        accounts: dict[tuple[str, str], Account] = {}
        self._clients: dict[str, ProviderClient] = {}
        self._extra_clients: dict[int, ProviderClient] = {}  # the router's, for keys after the first
        self._routers: weakref.WeakSet[Router] = weakref.WeakSet()  # their waiting jobs end at close()
        # Every key of every client, first key first; the client itself uses the first (or none).
        self._targets: dict[str, tuple[Target, ...]] = {}
        for name, codec in CODECS.items():
            fallback = FALLBACK_CLIENT.get(name)
            url = origins.get(name) or (fallback and origins.get(fallback)) or URL(codec.default_base_url)
            rate = rates.get(name, codec.default_rate_limit)
            limit = caps.get(fallback or name) if (fallback or name) in caps else caps.get(name)
            made = []
            for key in _config.resolve_keys(name, fallback, keys, codec.env_var, environ) or (None,):
                # One limiter per client and key: every create this session makes with a key shares it.
                limiter_key = (name, _key_fingerprint(key) if key else "")
                if limiter_key not in limiters:
                    limiters[limiter_key] = self._backend.limiter(
                        *limiter_key, rate, rate_limit_margin, max_pause=retry_cap
                    )
                # One account per provider and key (Get3W's two APIs are one): one cap, one circuit.
                account_key = (fallback or name, limiter_key[1])
                if account_key not in accounts:
                    gate = _gate(self._backend, *account_key, limit, retry_base, retry_cap)
                    accounts[account_key] = Account(account_key[0], gate)
                secret = Secret(key) if key else None
                made.append(Target(name, codec, url, secret, limiters[limiter_key], accounts[account_key]))
            self._targets[name] = tuple(made)
            self._clients[name] = ProviderClient(self, made[0])
        if "get3w_v3" not in secrets and environ.get(WEBHOOK_SECRET_ENV, "").strip():
            secrets["get3w_v3"] = _config.secret_text(WEBHOOK_SECRET_ENV, environ[WEBHOOK_SECRET_ENV])
        self.webhooks = WebhookReceiver(
            self._follow,
            {name: client._target for name, client in self._clients.items()},
            secrets_by_client=secrets,
            relay=self._backend.webhook_relay(),
        )
        for targets in self._targets.values():
            for target in targets:
                target.also_mask = self.webhooks.mask

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open"
        return f"<AsyncSession {state} clients={sorted(self._clients)}>"

    async def __aenter__(self) -> AsyncSession:
        self._engine.check_open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    @property
    def closed(self) -> bool:
        """True after ``close()``: no client can be used any more."""
        return self._engine.closed

    async def close(self) -> None:
        """Stop waiting on every handle and close the connection pool.

        Handles still running end with ``ConfigurationError``; their tasks may still
        finish at the provider and can be picked up with ``client.resume()``.
        """
        for router in list(self._routers):
            router._close()
        await self.webhooks.close()
        await self._follow.close()
        await self._engine.close()
        await self._backend.close()

    async def download(
        self,
        result: TaskResult,
        directory: str | os.PathLike[str],
        *,
        max_bytes: int = DEFAULT_MAX_BYTES,
    ) -> list[Path]:
        """Save ``result``'s outputs in ``directory`` as ``{task id}_{index}{ext}``; their paths.

        Streams each file to a ``*.part`` and renames it into place; only http(s) URLs,
        at most ``max_bytes`` each, no credentials sent, files already there kept.
        Raises ``DownloadError`` (or ``TransportError`` after the retries).
        """
        max_bytes = _config.whole_number("max_bytes", max_bytes, 1, error=InvalidRequestError)
        return await download_result(self._engine, result, Path(directory), max_bytes=max_bytes)

    @property
    def orphans(self) -> tuple[OrphanedTask, ...]:
        """Creates that went out while their ``submit()`` was cancelled (the last 1000), oldest first.

        The provider may run and bill each one; ``session.client(o.provider).resume(o.task_id,
        o.model)`` follows it. A WARNING naming it is logged as its answer comes back.
        """
        return tuple(self._engine.orphans)

    @property
    def orphaned(self) -> int:
        """How many creates went out while their ``submit()`` was cancelled, in this session."""
        return self._engine.orphaned

    def router(self, targets: Sequence[RouterTarget], *, rerun_failed: bool = False) -> Router:
        """A router over ``targets`` (``image_gen_async.Target``), one lane per target and key.

        Each job goes to the lane that can start it soonest; a create refused with certainty
        moves to another lane; ``rerun_failed=True`` runs a task that failed again on another
        lane (it is paid again). ``ConfigurationError`` for a target whose provider has no key.
        """
        self._engine.check_open()
        router = make_router(self, targets, self._targets, rerun_failed)
        self._routers.add(router)
        return router

    def _client_for(self, target: Target) -> ProviderClient:
        """The client that uses ``target``'s key: the session's own for a first key, else one made once."""
        client = self._clients[target.name]
        if client._target is target:
            return client
        extra = self._extra_clients.get(id(target))
        if extra is None:
            extra = self._extra_clients[id(target)] = ProviderClient(self, target)
        return extra

    def client(self, name: str) -> ProviderClient:
        """The client called ``name``; ``ConfigurationError`` for an unknown name."""
        try:
            return self._clients[name]
        except KeyError:
            raise ConfigurationError(f"unknown client {name!r}; known: {', '.join(self._clients)}") from None

    @property
    def get3w(self) -> ProviderClient:
        """Get3W's v1 API."""
        return self._clients["get3w"]

    @property
    def get3w_v3(self) -> ProviderClient:
        """Get3W's ``/api/v3`` API."""
        return self._clients["get3w_v3"]

    @property
    def dh3(self) -> ProviderClient:
        """dh3's task API."""
        return self._clients["dh3"]

    @property
    def nananobanana(self) -> ProviderClient:
        """nananobanana's generate API."""
        return self._clients["nananobanana"]
