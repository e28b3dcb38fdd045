"""A create's wait for a pooled connection ends at the job's deadline, nothing sent."""

from __future__ import annotations

import asyncio

import pytest

from image_gen_async import AdmissionTimeoutError
from image_gen_async.testing import Emulator

from .batch_helpers import wait_for
from .conftest import MODELS, SessionFactory


async def test_a_create_with_no_free_connection_by_its_deadline_is_never_sent(
    make_session: SessionFactory, emulator: Emulator
) -> None:
    emulator.config.duration = 5.0
    session = make_session(pool_size=1)
    # A sync generate holds the pool's only connection for the whole job.
    holding = asyncio.create_task(session.nananobanana.generate(MODELS["nananobanana"], prompt="a slow fox"))
    await wait_for(lambda: emulator.stats.create_requests.get("nananobanana", 0) == 1)
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(AdmissionTimeoutError, match="no free connection"):
        await session.dh3.submit(MODELS["dh3"], prompt="a quick hen", timeout=0.3)
    assert loop.time() - started < 2.0  # at its deadline, not the exchange's limit
    assert emulator.stats.create_requests.get("dh3", 0) == 0
    holding.cancel()
    await asyncio.gather(holding, return_exceptions=True)
