"""The emulator as the router's tests need it: one model under every provider, refused connections."""

from __future__ import annotations

import aiohttp
import pytest

from image_gen_async import TransportError
from image_gen_async.testing import Emulator, EmulatorConfig

from .router_helpers import DH3, GET3W, NANA, session_on


async def test_the_same_model_is_served_under_each_providers_name() -> None:
    async with Emulator(EmulatorConfig(duration=0.02, dh3_qps=None)) as emu, session_on(emu) as session:
        for target in (GET3W, DH3, NANA):
            result = await session.client(target.provider).generate(target.model, prompt="a red fox")
            assert result.ok and result.model == target.model


async def test_refused_connections_send_nothing_until_accepted_again() -> None:
    async with Emulator(EmulatorConfig(duration=0.02, dh3_qps=None, keep_alive=False)) as emu:
        async with aiohttp.ClientSession() as http, http.get(f"{emu.url}/_emulator/stats") as answer:
            assert answer.headers.get("Connection", "").lower() == "close"  # no pooled connection stays
        await emu.refuse_connections()
        async with session_on(emu, create_retries=1) as session:
            with pytest.raises(TransportError, match="cannot connect"):
                await session.dh3.submit(DH3.model, prompt="refused")
            assert emu.stats.create_requests["dh3"] == 0 and emu.stats.down_drops["dh3"] == 0
            await emu.accept_connections()
            result = await session.dh3.generate(DH3.model, prompt="accepted again")
            assert result.ok and emu.stats.creates["dh3"] == 1


async def test_connections_are_kept_alive_by_default() -> None:
    async with Emulator() as emu:
        async with aiohttp.ClientSession() as http, http.get(f"{emu.url}/_emulator/stats") as answer:
            assert answer.headers.get("Connection", "").lower() != "close"
        with pytest.raises(RuntimeError, match="not started"):
            await Emulator().refuse_connections()
