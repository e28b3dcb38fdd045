"""RedisBackend: one key's limit and webhook callbacks shared by many processes and hosts.

Optional (``pip install "image-gen-async[redis]"``): redis-py is imported only when a
``RedisBackend`` is made, so ``import image_gen_async`` works without it.

Keys in Redis, all under ``namespace``: ``{namespace}:limit:{client}:{sha256(key)[:16]}``
per schedule (never the API key itself; gone a minute after its last slot),
``{namespace}:capacity:{account}:{sha256(key)[:16]}`` (and its ``:leases``, ``:waiting``,
``:released``) per capacity gate (see ``_redis_capacity``; gone a minute after its last lease),
``{namespace}:webhooks`` (the callback channel), ``{namespace}:webhook-token`` and
``{namespace}:settled:{client}:{task id}`` (see ``_redis_relay``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ._backend import LocalBackend
from ._capacity import CapacityGate
from ._ratelimit import Limiter
from .errors import ConfigurationError

if TYPE_CHECKING:
    from redis.asyncio import Redis

    from ._redis_capacity import RedisGate
    from ._redis_limit import RedisLimiter
    from ._redis_relay import RedisRelay

# Fail fast when Redis is away (redis-py would wait 5 s per connect and retry 10 times).
CONNECT_TIMEOUT = 2.0
COMMAND_TIMEOUT = 5.0
RETRIES = 2


# The least jitter budget of a limit shared by several processes (see RedisBackend.limiter).
SHARED_MARGIN = 0.04


class RedisBackend:
    """Pass as ``AsyncSession(limiter_backend=RedisBackend(url))`` in every process sharing the keys.

    ``fallback_share``: when Redis does not answer, pace this process at ``rate * share``
    (e.g. ``1/N`` for N processes) and let it run ``max_concurrent * share`` tasks at once
    (at least 1) instead of failing with ``BackendUnavailableError``.
    ``webhook_token``: the callback-URL token all instances share (default: generated once
    and kept in Redis). ``redis_options`` go to ``redis.asyncio.Redis.from_url``.
    Each session needs its own backend; the session closes it.
    """

    def __init__(
        self,
        url: str = "redis://127.0.0.1:6379/0",
        *,
        namespace: str = "image_gen_async",
        fallback_share: float | None = None,
        webhook_token: str | None = None,
        **redis_options: Any,
    ) -> None:
        try:
            from redis.asyncio import Redis
            from redis.asyncio.retry import Retry
            from redis.backoff import ExponentialBackoff
        except ImportError as error:
            raise ConfigurationError(
                'RedisBackend needs redis-py: pip install "image-gen-async[redis]"'
            ) from error
        from ._redis_relay import RedisRelay

        if fallback_share is not None and not 0 < fallback_share <= 1:
            raise ConfigurationError("fallback_share must be in (0, 1], e.g. 1/N for N processes")
        if not namespace:
            raise ConfigurationError("namespace must not be empty")
        options: dict[str, Any] = {
            "socket_connect_timeout": CONNECT_TIMEOUT,
            "socket_timeout": COMMAND_TIMEOUT,
            "retry": Retry(ExponentialBackoff(cap=0.2, base=0.02), RETRIES),
        } | redis_options
        self.namespace = namespace
        self.fallback_share = fallback_share
        self._redis: Redis = Redis.from_url(url, **options)
        self._relay: RedisRelay = RedisRelay(self._redis, namespace, webhook_token)
        self._limiters: list[RedisLimiter] = []
        self._gates: list[RedisGate] = []
        self._local = LocalBackend()

    def __repr__(self) -> str:
        # Not the URL: it may carry a password.
        return f"<RedisBackend namespace={self.namespace!r}>"

    @property
    def redis(self) -> Redis:
        """The redis-py client this backend uses."""
        return self._redis

    def limiter(
        self, client: str, key_fingerprint: str, rate: float | None, margin: float, max_pause: float
    ) -> Limiter:
        """A shared ``RedisLimiter``; unpaced clients and clients without a key stay local."""
        if rate is None or not key_fingerprint:
            return self._local.limiter(client, key_fingerprint, rate, margin, max_pause)
        from ._redis_limit import RedisLimiter

        limiter = RedisLimiter(
            self._redis,
            f"{self.namespace}:limit:{client}:{key_fingerprint}",
            rate,
            # Many event loops and a Redis round trip add jitter one process does not have:
            # keep a wider budget (about 4 % of the rate) than the in-process default.
            margin=max(margin, SHARED_MARGIN),
            max_pause=max_pause,
            name=client,
            fallback_share=self.fallback_share,
        )
        self._limiters.append(limiter)
        return limiter

    def gate(
        self, account: str, key_fingerprint: str, limit: int | None, *, pause: float, max_pause: float
    ) -> CapacityGate:
        """A ``RedisGate`` shared by every process using the key; a client without a key stays local."""
        if not key_fingerprint:
            return self._local.gate(account, key_fingerprint, limit, pause=pause, max_pause=max_pause)
        from ._redis_capacity import RedisGate

        gate = RedisGate(
            self._redis,
            f"{self.namespace}:capacity:{account}:{key_fingerprint}",
            account,
            limit,
            fallback_share=self.fallback_share,
            pause=pause,
            max_pause=max_pause,
        )
        self._gates.append(gate)
        return gate

    def webhook_relay(self) -> RedisRelay:
        """The pub/sub relay that lets any instance take any callback."""
        return self._relay

    async def close(self) -> None:
        """Stop the relay and the gates, flush penalties, releases and markers, close the connections."""
        await self._relay.close()
        for gate in self._gates:
            await gate.close()
        for limiter in self._limiters:
            await limiter.close()
        await self._redis.aclose()
