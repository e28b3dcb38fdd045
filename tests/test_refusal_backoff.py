"""A refusal's ``Retry-After`` of 0 (or less) is no reason to ask again at once.

Each server refuses every create, with the advice to try again now; one submit with a short
deadline may then send a handful of creates (the session's back-off doubling from
``retry_base``), not thousands. Creates are counted where they arrive.
"""

from __future__ import annotations

from typing import Any

import pytest
from aiohttp import web

from image_gen_async import AdmissionTimeoutError, ImageGenError, RateLimitError

from .conftest import KEYS, MODELS, ServerSession

# retry_base 0.05 s: waits of at most 0.05, 0.1, 0.2, 0.4 s fit a 0.5 s deadline, so at most
# five creates; jittered waits may be shorter, so the bound leaves room. (Asked again at once,
# a loopback server sees thousands.)
DEADLINE = 0.5
MOST_CREATES = 12


class Refuser:
    """Refuses every create with ``status`` and ``body``, and ``Retry-After: advice``."""

    def __init__(self, path: str, status: int, body: dict[str, object], advice: str) -> None:
        self.path, self.status, self.body, self.advice = path, status, body, advice
        self.creates = 0

    async def create(self, request: web.Request) -> web.Response:
        self.creates += 1
        await request.read()
        return web.json_response(self.body, status=self.status, headers={"Retry-After": self.advice})

    def routes(self) -> dict[str, Any]:
        return {f"POST {self.path}": self.create}


BUSY = {"error": "Server busy", "type": "server_busy"}
CONCURRENT = {"code": 429, "error": "too many concurrent tasks"}
RATE = {"error": "Rate limit exceeded", "type": "rate_limit"}


@pytest.mark.parametrize(
    ("client", "path", "status", "body", "advice", "raised", "words"),
    [
        # Refused for capacity, nothing of ours running: the gate's own pause doubles.
        ("nananobanana", "/api/v1/generate", 503, BUSY, "0", AdmissionTimeoutError, "refused for capacity"),
        (
            "get3w",
            "/v1/google/nano-banana-pro/text-to-image",
            429,
            CONCURRENT,
            "0",
            AdmissionTimeoutError,
            "refused for capacity",
        ),
        # Refused for the rate: the back-off steps double, whatever the advice says.
        ("nananobanana", "/api/v1/generate", 429, RATE, "0", RateLimitError, ""),
        ("nananobanana", "/api/v1/generate", 429, RATE, "-1", RateLimitError, ""),
    ],
)
async def test_a_refusal_saying_retry_now_is_retried_on_the_back_off(
    server_session: ServerSession,
    client: str,
    path: str,
    status: int,
    body: dict[str, object],
    advice: str,
    raised: type[ImageGenError],
    words: str,
) -> None:
    server = Refuser(path, status, body, advice)
    session = await server_session(server, client=client, retry_base=0.05, retry_cap=1.0)
    with pytest.raises(raised) as caught:
        await session.client(client).submit(MODELS[client], prompt="a red fox", timeout=DEADLINE)
    assert 2 <= server.creates <= MOST_CREATES
    assert words in str(caught.value) and KEYS[client] not in str(caught.value)
