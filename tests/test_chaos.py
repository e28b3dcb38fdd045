"""Chaos soak: 400 jobs on all four APIs through every fault at once; nothing lost, nothing paid twice."""

from __future__ import annotations

import asyncio
from collections import Counter

from image_gen_async import ImageGenError, PollSettings, TaskFailedError, TaskHandle
from image_gen_async.testing import Emulator, EmulatorConfig, Faults

from .conftest import CLIENTS, KEYS, MODELS, SessionFactory

JOBS = 400  # 100 per API: every fault many times over
CHAOS = Faults(
    poll_5xx=0.20,
    poll_drop=0.05,
    poll_non_json=0.05,
    create_429=0.05,
    create_503=0.05,
    retry_after=0.01,
)


async def test_chaos_soak(make_session: SessionFactory) -> None:
    config = EmulatorConfig(
        duration=0.05,
        duration_spread=0.5,
        failure_rate=0.05,
        dh3_qps=None,
        faults=CHAOS,
        api_keys=dict(KEYS),
        record_requests=False,
        seed=7,
    )
    async with Emulator(config) as emulator:
        session = make_session(
            base_urls=dict.fromkeys(CLIENTS, emulator.url),
            polling=PollSettings(first_poll=0.02, min_interval=0.01, max_interval=0.1),
            create_retries=12,
            poll_retries=12,
            pool_size=200,
        )
        names = [CLIENTS[i % len(CLIENTS)] for i in range(JOBS)]
        handles: list[TaskHandle] = await asyncio.gather(
            *(session.client(name).submit(MODELS[name], prompt=f"soak {i}") for i, name in enumerate(names))
        )
        outcomes = await asyncio.gather(*handles, return_exceptions=True)
        stats = emulator.stats

    # Every job ended, as a result or a typed error; none was created twice.
    assert all(not isinstance(o, BaseException) or isinstance(o, ImageGenError) for o in outcomes)
    assert sum(stats.creates.values()) == JOBS
    assert Counter(names) == Counter(h.provider for h in handles)
    assert all(stats.creates[name] == JOBS // len(CLIENTS) for name in CLIENTS)
    # The failed jobs are exactly the ones the emulator failed; every other one completed.
    failed = {h.task_id for h, o in zip(handles, outcomes, strict=True) if isinstance(o, TaskFailedError)}
    assert failed == stats.failed_tasks
    errors = [o for o in outcomes if isinstance(o, BaseException) and not isinstance(o, TaskFailedError)]
    assert errors == []
    # The faults really happened, and the client retried through them.
    assert sum(stats.rate_limited.values()) > 0
    assert sum(h.retries for h in handles) > JOBS * 0.2
