"""Webhook delivery: POST a finished task's result from a background task."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable
from dataclasses import dataclass

import aiohttp

from ._state import EmulatorConfig, EmuTask, Stats

Payload = tuple[bytes, dict[str, str]]


@dataclass(frozen=True, slots=True)
class WebhookPlan:
    """How one provider delivers: payload builder, extra attempts, what counts as received."""

    provider: str
    url: str
    build: Callable[[], Payload]
    retries: int = 0
    only_200: bool = False

    def accepted(self, status: int) -> bool:
        """Whether the receiver's status ends the delivery (dh3 wants exactly 200)."""
        return status == 200 if self.only_200 else 200 <= status < 300


class WebhookSender:
    """Runs deliveries in background tasks and cancels them cleanly on shutdown."""

    def __init__(
        self,
        config: Callable[[], EmulatorConfig],
        stats: Callable[[], Stats],
        rng: random.Random,
    ) -> None:
        self._config = config
        self._stats = stats
        self._rng = rng
        self._tasks: set[asyncio.Task[None]] = set()
        self._session: aiohttp.ClientSession | None = None

    def schedule(self, task: EmuTask, plan: WebhookPlan) -> None:
        """Deliver `plan` once `task` has finished (plus the configured delay)."""
        job = asyncio.get_running_loop().create_task(self._run(task, plan))
        self._tasks.add(job)
        job.add_done_callback(self._tasks.discard)

    async def drain(self) -> None:
        """Wait until every delivery scheduled so far has finished (or given up)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def shutdown(self) -> None:
        """Cancel pending deliveries, wait for them, and close the HTTP session."""
        tasks = list(self._tasks)
        for job in tasks:
            job.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _run(self, task: EmuTask, plan: WebhookPlan) -> None:
        """Wait for the task's end, then deliver zero, one or two copies."""
        config = self._config()
        await asyncio.sleep(max(0.0, task.finish_at - time.monotonic()) + config.webhook_delay)
        if self._chance(config.webhook_drop):
            return
        copies = 2 if self._chance(config.webhook_duplicate) else 1
        body, headers = plan.build()
        for _ in range(copies):
            await self._deliver(plan, body, headers)

    async def _deliver(self, plan: WebhookPlan, body: bytes, headers: dict[str, str]) -> None:
        """POST the body, retrying as the plan says; count attempts and outcomes."""
        stats = self._stats()
        for attempt in range(1 + plan.retries):
            if attempt:
                await asyncio.sleep(self._config().dh3_callback_retry_delay)
            stats.webhook_attempts[plan.provider] += 1
            if await self._post(plan, body, headers):
                stats.webhooks_sent[plan.provider] += 1
                return
        stats.webhooks_failed[plan.provider] += 1

    async def _post(self, plan: WebhookPlan, body: bytes, headers: dict[str, str]) -> bool:
        """One attempt; True when the receiver acknowledged it."""
        timeout = aiohttp.ClientTimeout(total=self._config().webhook_timeout)
        try:
            async with self._client().post(plan.url, data=body, headers=headers, timeout=timeout) as resp:
                await resp.read()
                return plan.accepted(resp.status)
        except (aiohttp.ClientError, TimeoutError, ValueError):
            return False

    def _client(self) -> aiohttp.ClientSession:
        """The shared delivery session, created on first use inside the loop."""
        if self._session is None:
            self._session = aiohttp.ClientSession()
        return self._session

    def _chance(self, probability: float) -> bool:
        """Seeded coin flip; draws nothing when the probability is 0."""
        return probability > 0 and self._rng.random() < probability
