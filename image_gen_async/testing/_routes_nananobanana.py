"""nananobanana: `POST /api/v1/generate` (sync|async|stream), `GET /api/v1/generate?id=`.

Choices where the documents are silent:
- Any `selectedModel` is accepted; the models list offers nano-banana (1 credit) and
  nano-banana-pro (2 credits, requiresPro); unknown models cost 1 credit.
- `aspectRatio` is stored as sent; `referenceImageUrls` must be a list of strings.
- A failed sync job (not a safety failure) answers 200 `{"success": false,
  "generationId", "error", "creditsUsed", "remainingCredits"}`; credits stay spent.
- Injected 429: `{"error": "Too many requests"}`. Random 503s hit async creates only
  (the documented case); a scripted 503 hits any create. A 503 on a poll is
  `{"error": "Service unavailable"}`. A 401 is always `{"error": "Invalid API key"}`.
- Tasks at once (`max_concurrent["nananobanana"]`, per key): a create over the cap gets the
  documented 503 `server_busy` body with `activeTasks` = the key's unfinished tasks, and
  no task and no charge (the doc's "credits refunded"). The doc names async mode only;
  sync and stream creates run the same kind of task, so they get the same 503 (a
  provider that queued or failed them silently would be a worse stand-in to test against).
- Money: credits are checked before the cap (402 first), so an account out of credits
  answers 402 even when it is also full; `credits` is one balance for every key.
- Stream events carry `generationId` at top level (so a dropped stream can be polled);
  events: status (progress 0), status (progress 30, when running), then complete or
  error; a `: heartbeat` comment every 15 s while waiting.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Mapping
from typing import Any, ClassVar

from aiohttp import web

from ._core import Call, ProviderAPI, json_bytes, json_response, same_auth_text
from ._state import QUEUED_SHARE, EmuTask, Kind, State

STATUS_WORDS: dict[State, str] = {
    "queued": "processing",
    "running": "processing",
    "completed": "completed",
    "failed": "failed",
}
MODES = ("sync", "async", "stream")
DEFAULT_MODEL = "nano-banana"
MODELS: list[dict[str, Any]] = [
    {
        "name": "nano-banana",
        "displayName": "Nano Banana",
        "creditsCost": 1,
        "supportsImageInput": True,
        "supportsAspectRatio": True,
        "requiresPro": False,
    },
    {
        "name": "nano-banana-pro",
        "displayName": "Nano Banana Pro",
        "creditsCost": 2,
        "supportsImageInput": True,
        "supportsAspectRatio": True,
        "requiresPro": True,
    },
]
COSTS = {model["name"]: int(model["creditsCost"]) for model in MODELS}
BUSY_BODY = {
    "error": "Server is busy, too many concurrent tasks. Please retry later.",
    "type": "server_busy",
    "activeTasks": 10,
}
HEARTBEAT_SECONDS = 15.0


def request_problem(body: Any) -> str | None:
    """What makes a generate body invalid (400), or None."""
    if not isinstance(body, dict) or not isinstance(body.get("prompt"), str) or not body["prompt"]:
        return "Prompt is required"
    if body.get("mode", "sync") not in MODES:
        return "Invalid mode. Must be one of: sync, async, stream"
    if not isinstance(body.get("selectedModel", DEFAULT_MODEL), str):
        return "selectedModel must be a string"
    urls = body.get("referenceImageUrls", [])
    if not isinstance(urls, list) or not all(isinstance(u, str) for u in urls):
        return "referenceImageUrls must be an array of strings"
    return None


def credits_fields(task: EmuTask) -> dict[str, int]:
    """`creditsUsed` and `remainingCredits` as charged at submit."""
    return {"creditsUsed": task.credits_used, "remainingCredits": task.remaining_credits}


class NanaNanoBanana(ProviderAPI):
    """The nananobanana generate API, its models list and credits."""

    provider = "nananobanana"
    account = "nananobanana"
    texts: ClassVar[Mapping[int, str]] = {
        400: "Invalid request",
        402: "Insufficient credits",
        403: "API access not enabled",
        404: "Generation not found",
        429: "Too many requests",
        500: "Internal server error",
        502: "Bad gateway",
        503: "Service unavailable",
    }
    auth_texts = same_auth_text("Invalid API key")

    def routes(self) -> list[web.RouteDef]:
        """Generate (POST and poll GET), models (no auth) and credits."""
        return [
            web.post("/api/v1/generate", self.endpoint("create", self.create)),
            web.get("/api/v1/generate", self.endpoint("poll", self.get)),
            web.get("/api/v1/models", self.endpoint("other", self.models, auth=False)),
            web.get("/api/v1/credits", self.endpoint("other", self.credits)),
        ]

    def error_body(self, status: int, text: str) -> Any:
        """`{"error": "<text>"}`."""
        return {"error": text}

    def fault_response(self, status: int, kind: Kind) -> web.Response:
        """A create 503 is the documented server-busy body."""
        if status == 503 and kind == "create":
            return json_response(BUSY_BODY, 503, self.core.retry_after_header(503))
        return super().fault_response(status, kind)

    def capacity_refusal(self, active: int) -> web.Response:
        """The documented server-busy 503, naming how many tasks the key has running."""
        return json_response({**BUSY_BODY, "activeTasks": active}, 503, self.core.capacity_headers())

    def busy_allowed(self, body: Any) -> bool:
        """Random 503s only in async mode, as documented."""
        return isinstance(body, dict) and body.get("mode") == "async"

    async def create(self, request: web.Request, call: Call) -> web.StreamResponse:
        """Charge credits, start the job, answer in the requested mode."""
        body = call.body
        problem = request_problem(body)
        if problem is not None:
            raise self.fail(400, problem)
        model = body.get("selectedModel", DEFAULT_MODEL)
        cost = COSTS.get(model, 1)
        if self.core.credits < cost:
            raise self.core.refuse_payment(self, 402)
        task_id = f"cl{secrets.token_hex(12)}"
        task = self.core.create_task(
            call,
            task_id,
            model,
            body,
            body["prompt"],
            credits_used=cost,
            aspect_ratio=body.get("aspectRatio"),
        )
        mode = body.get("mode", "sync")
        if mode == "async":
            return json_response(
                {
                    "success": True,
                    "async": True,
                    "generationId": task.id,
                    "message": "Generation started",
                    **credits_fields(task),
                }
            )
        if mode == "stream":
            return await self.stream(request, task)
        await self.core.wait_done(task)
        return json_response(self.sync_result(task))

    def sync_result(self, task: EmuTask) -> dict[str, Any]:
        """The sync answer: success, the safety warning, or a failure."""
        head: dict[str, Any] = {"success": task.outcome == "completed", "generationId": task.id}
        if task.outcome == "completed":
            head["imageUrls"] = task.output_urls()
        elif task.outcome == "nsfw":
            head.update(warning=True, message=task.error)
        else:
            head["error"] = task.error
        return {**head, **credits_fields(task)}

    async def get(self, request: web.Request, call: Call) -> web.StreamResponse:
        """`{"data": {...}}` for the generation named by `?id=`."""
        task_id = request.query.get("id")
        if not task_id:
            raise self.fail(400, "Missing id parameter")
        task = self.core.find(self.provider, task_id)
        if task is None:
            raise self.fail(404)
        return json_response({"data": self.generation(task)})

    def generation(self, task: EmuTask) -> dict[str, Any]:
        """The generation record as the async poll documents it."""
        state = task.state()
        data: dict[str, Any] = {
            "id": task.id,
            "prompt": task.input["prompt"],
            "outputImageUrls": task.output_urls() if state == "completed" else None,
            "modelUsed": task.model,
            "processingStatus": STATUS_WORDS[state],
            "creditsUsed": task.credits_used,
            "createdAt": task.iso_created(),
        }
        if state == "failed":
            data["errorMessage"] = task.error
        return data

    async def models(self, request: web.Request, call: Call) -> web.StreamResponse:
        """The public models list."""
        return json_response({"data": MODELS})

    async def credits(self, request: web.Request, call: Call) -> web.StreamResponse:
        """The account's remaining credits."""
        return json_response({"data": {"credits": self.core.credits}})

    async def stream(self, request: web.Request, task: EmuTask) -> web.StreamResponse:
        """Server-sent events until the job ends; a client hang-up leaves it running."""
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)
        try:
            await self.event(resp, task, type="status", message="Generation started", progress=0)
            await self.sleep_until(resp, task.created_at + task.duration * QUEUED_SHARE)
            await self.event(resp, task, type="status", message="Generating image", progress=30)
            await self.sleep_until(resp, task.finish_at)
            await self.event(resp, task, **self.final_event(task))
            await resp.write_eof()
        except ConnectionError:
            pass
        return resp

    @staticmethod
    def final_event(task: EmuTask) -> dict[str, Any]:
        """The closing event: complete with the URLs, or error with the reason."""
        if task.outcome == "completed":
            data = {"success": True, "imageUrls": task.output_urls(), **credits_fields(task)}
            return {"type": "complete", "message": "Generation completed", "progress": 100, "data": data}
        return {"type": "error", "message": task.error, "data": {"success": False}}

    @staticmethod
    async def event(resp: web.StreamResponse, task: EmuTask, **fields: Any) -> None:
        """Write one `data: {...}` event."""
        await resp.write(b"data: " + json_bytes({**fields, "generationId": task.id}) + b"\n\n")

    @staticmethod
    async def sleep_until(resp: web.StreamResponse, deadline: float) -> None:
        """Wait for `deadline` (monotonic), sending a heartbeat comment every 15 s."""
        while (remaining := deadline - time.monotonic()) > 0:
            await asyncio.sleep(min(remaining, HEARTBEAT_SECONDS))
            if remaining > HEARTBEAT_SECONDS:
                await resp.write(b": heartbeat\n\n")
