"""Hostile review of admission: the capacity gate and the account circuit.

Reproductions on loopback of what is still wrong on main, each ``xfail(strict=True)``.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from aiohttp import web

from image_gen_async import AuthenticationError, ImageGenError
from image_gen_async.testing import Emulator, EmulatorConfig

from .conftest import CLIENTS, KEYS, MODELS, SessionFactory

NB_MODEL = "nano-banana"
V1_MODEL = "google/nano-banana-pro/text-to-image"
V1_CREATE = "POST /v1/google/nano-banana-pro/text-to-image"


class Nananobanana:
    """A nananobanana stand-in: scripted create answers, then accepted; every poll says completed."""

    def __init__(self, *scripted: tuple[int, dict[str, Any]], hold: int = 0) -> None:
        self.scripted = list(scripted)
        self.creates: list[str] = []  # prompts, in arrival order
        self.accepted: list[str] = []
        self._hold = hold  # the first `hold` creates are answered together, once all have arrived
        self._arrived = asyncio.Event()

    async def create(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.creates.append(body["prompt"])
        index = len(self.creates)
        if index <= self._hold:
            if index == self._hold:
                self._arrived.set()
            await self._arrived.wait()
        if index <= len(self.scripted):
            status, answer = self.scripted[index - 1]
            return web.json_response(answer, status=status)
        self.accepted.append(body["prompt"])
        return web.json_response({"success": True, "async": True, "generationId": f"g{index}"})

    async def poll(self, request: web.Request) -> web.Response:
        task_id = request.query["id"]
        done = {"id": task_id, "processingStatus": "completed", "outputImageUrls": ["https://x.test/a.png"]}
        return web.json_response({"data": done})

    def routes(self) -> dict[str, Any]:
        return {"POST /api/v1/generate": self.create, "GET /api/v1/generate": self.poll}


def busy(active: int) -> tuple[int, dict[str, Any]]:
    return 503, {
        "error": "Server is busy, too many concurrent tasks.",
        "type": "server_busy",
        "activeTasks": active,
    }


async def test_review_two_busy_refusals_with_nothing_of_ours_running_hang_every_waiter(
    make_session: SessionFactory, odd_server: Any
) -> None:
    # Two creates in flight at once are both refused busy with activeTasks 0 (the server is busy
    # for everyone). The first pause arms a wake timer; the second lengthens the pause but keeps
    # the old timer, which fires inside the pause and serves nobody. Nothing of ours is running,
    # so no release ever comes: both jobs wait out their whole deadline.
    server = Nananobanana(busy(0), busy(0), hold=2)
    url = await odd_server(server.routes())
    session = make_session(base_urls={"nananobanana": url}, retry_base=0.1, retry_cap=1.0, task_timeout=5.0)
    client = session.nananobanana
    jobs = [client.submit(NB_MODEL, prompt=f"job {i}") for i in range(2)]
    handles = await asyncio.wait_for(asyncio.gather(*jobs), 2.0)  # pauses of 0.1 s and 0.2 s
    assert len(server.creates) == 4 and sorted(server.accepted) == ["job 0", "job 1"]
    assert all([(await handle).ok for handle in handles])


async def test_review_a_refused_create_loses_its_place_in_the_queue(
    make_session: SessionFactory, odd_server: Any
) -> None:
    # Window 1. The first job is refused (another process holds the key's one task): it is the
    # oldest, yet every job that queued behind it while it was on the wire now goes first; under
    # steady contention the oldest jobs are the ones that run out of deadline.
    server = Nananobanana(busy(1))
    url = await odd_server(server.routes())
    session = make_session(
        base_urls={"nananobanana": url}, max_concurrent={"nananobanana": 1}, retry_base=0.05, retry_cap=0.1
    )
    client = session.nananobanana
    handles = await asyncio.gather(*(client.submit(NB_MODEL, prompt=f"job {i}") for i in range(4)))
    assert all([(await handle).ok for handle in handles])
    assert server.creates[0] == "job 0"
    assert server.accepted == ["job 0", "job 1", "job 2", "job 3"], server.accepted


async def test_review_a_revoked_key_seen_by_a_poll_does_not_stop_new_creates(
    make_session: SessionFactory, odd_server: Any
) -> None:
    revoked = {"code": 401, "error": "Invalid or revoked API key"}
    creates = 0

    async def create(request: web.Request) -> web.Response:
        nonlocal creates
        creates += 1
        await request.read()
        return web.json_response({"id": f"t{creates}", "status": "created"})

    async def poll(request: web.Request) -> web.Response:
        return web.json_response(revoked, status=401)

    url = await odd_server({V1_CREATE: create, "GET /v1/requests/{id}": poll})
    session = make_session(base_urls={"get3w": url})
    handle = await session.get3w.submit(V1_MODEL, prompt="one")
    with pytest.raises(AuthenticationError):
        await handle
    # The key is revoked: every further create is refused the same way and should not be sent.
    with pytest.raises(AuthenticationError):
        await session.get3w.submit(V1_MODEL, prompt="two")
    assert creates == 1
    assert session.get3w.blocked is not None


async def test_review_a_403_about_one_model_stops_every_model_of_the_key(
    make_session: SessionFactory, odd_server: Any
) -> None:
    # nananobanana lists models with requiresPro; a non-Pro account asking for one is refused for
    # that model, not for the account. The circuit then refuses the models it may use.
    sent: list[str] = []

    async def create(request: web.Request) -> web.Response:
        body = await request.json()
        sent.append(body["selectedModel"])
        if body["selectedModel"] == "nano-banana-pro":
            return web.json_response({"error": "nano-banana-pro requires a Pro plan"}, status=403)
        return web.json_response({"success": True, "async": True, "generationId": f"g{len(sent)}"})

    async def poll(request: web.Request) -> web.Response:
        done = {
            "id": request.query["id"],
            "processingStatus": "completed",
            "outputImageUrls": ["https://x.test/a"],
        }
        return web.json_response({"data": done})

    url = await odd_server({"POST /api/v1/generate": create, "GET /api/v1/generate": poll})
    session = make_session(base_urls={"nananobanana": url})
    with pytest.raises(ImageGenError):
        await session.nananobanana.submit("nano-banana-pro", prompt="pro")
    handle = await session.nananobanana.submit(NB_MODEL, prompt="plain")  # today: PermissionDeniedError
    assert (await handle).ok
    assert sent == ["nano-banana-pro", NB_MODEL]


@pytest.mark.alone
async def test_review_one_transient_503_caps_an_uncapped_provider_for_the_session(
    make_session: SessionFactory,
) -> None:
    # dh3 documents no cap on tasks at once. One proxy 503 on the very first create shrinks the
    # window to the few creates then on the wire; it then grows by one per four windows of
    # accepted creates, so 300 jobs of 0.1 s run ~8 at a time (~4 s) instead of all at once.
    # (test_chaos_soak's AdmissionTimeoutError under load is this: 5% random 503s.)
    config = EmulatorConfig(duration=0.1, dh3_qps=None, api_keys=dict(KEYS))
    async with Emulator(config) as emulator:
        emulator.script("dh3", "create", "503", 1)
        session = make_session(base_urls=dict.fromkeys(CLIENTS, emulator.url))
        client = session.dh3

        async def job(i: int) -> bool:
            return (await (await client.submit(MODELS["dh3"], prompt=f"job {i}"))).ok

        done = await asyncio.wait_for(asyncio.gather(*(job(i) for i in range(300))), 1.5)
        assert all(done)
        # Not capped by the one 503: the window grew on past the 300 jobs' needs.
        assert client.capacity.window >= 100 and client.capacity.refusals == 0, client.capacity


async def test_review_an_uncertain_create_frees_a_place_its_task_still_holds(
    make_session: SessionFactory,
) -> None:
    # The cap is configured right (1). The first create is made at the provider and its answer
    # is lost (SubmitUncertainError): the task runs, yet its place is handed on at once, so the
    # next create goes out over the cap and is refused (and the window is cut below the cap).
    config = EmulatorConfig(
        duration=0.15, dh3_qps=None, api_keys=dict(KEYS), max_concurrent={"nananobanana": 1}
    )
    async with Emulator(config) as emulator:
        session = make_session(
            base_urls=dict.fromkeys(CLIENTS, emulator.url), max_concurrent={"nananobanana": 1}
        )
        client = session.nananobanana
        # Once a job of the model has shown how long it runs, an uncertain create's task is
        # taken to hold its place that long (cold, nothing is known: the place is given back).
        assert (await (await client.submit(MODELS["nananobanana"], prompt="first"))).ok
        emulator.script("nananobanana", "create", "drop_after", 1)
        with pytest.raises(ImageGenError):
            await client.submit(MODELS["nananobanana"], prompt="lost answer")
        assert (await (await client.submit(MODELS["nananobanana"], prompt="next"))).ok
        assert emulator.stats.creates["nananobanana"] == 3
        assert emulator.stats.capacity_refusals["nananobanana"] == 0
