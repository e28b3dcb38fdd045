"""The README's FastAPI route, run for real under uvicorn.

No ``from __future__ import annotations`` here: FastAPI reads the route's annotations
at run time to know that ``request`` is the Request.
"""

import asyncio
import socket

import pytest

from image_gen_async import PollSettings

from .conftest import MODELS, SessionFactory

fastapi = pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")
Request = fastapi.Request
Response = fastapi.Response

PATIENT = PollSettings(first_poll=0.02, min_interval=0.005, max_interval=0.1, webhook_unknown_wait=30.0)


async def test_fastapi_route(make_session: SessionFactory) -> None:
    session = make_session(polling=PATIENT, webhook_secrets={"get3w_v3": "whsec_test"})
    app = fastapi.FastAPI()

    @app.post("/hooks/{client}/{token}")
    async def hook(client: str, token: str, request: Request) -> Response:
        status, body = await session.webhooks.handle(
            client, await request.body(), request.headers, token=token
        )
        return Response(body, status_code=status, media_type="application/json")

    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
        serving = asyncio.ensure_future(server.serve(sockets=[listener]))
        try:
            # The socket already listens: callbacks wait in its backlog until uvicorn is up.
            session.webhooks.public_url = f"http://127.0.0.1:{port}/hooks"
            handles = await asyncio.gather(
                *(
                    session.client(name).submit(MODELS[name], prompt="a fox", webhook=True)
                    for name in ("get3w", "get3w_v3", "dh3")
                )
            )
            results = await asyncio.gather(*handles)
            assert all(r.ok for r in results) and sum(h.polls for h in handles) == 0
            assert session.webhooks.stats.resolved == 3
        finally:
            server.should_exit = True
            await serving
