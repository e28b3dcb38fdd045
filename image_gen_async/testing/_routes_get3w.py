"""Get3W's two APIs: v1 (`/v1/{provider}/{model}/{run_type}`) and v3 (`/api/v3/{model-id}`).

Choices where the documents are silent:
- v1: `prompt` must be a non-empty string and `channel`, when given, one of
  economy|stable|official; other fields are stored as sent. `?sync=true` (or `1`) waits.
  `timings` is null until the job ends, then splits the duration in integer ms.
  The v1 callback is the `GET /v1/requests/{id}` object, unsigned, sent once.
- v3: `prompt` must be a non-empty string. `outputs` is [] and `timings.inference` 0
  until the job ends; `has_nsfw_contents` is [] except [true] on a content-safety
  failure; `input` is the body as sent. The v3 callback is the prediction object,
  signed with `X-Get3W-Signature` when `webhook_secret` is set, sent once.
- 401 texts: v1 as in its error-code list; v3 always "Invalid API key" (its seed).
- Account limits: v1 and v3 are one account per key. `max_concurrent["get3w"]` caps the
  unfinished tasks of both APIs together; over it a create gets the documented 429
  "Rate limit exceeded" in that API's error body (with `Retry-After` only when
  `capacity_retry_after` is set: the docs do not say it exists). `get3w_balance` gives
  a key a number of creates (each accepted v1 or v3 create costs 1 unit, a failed task
  is not refunded, a refused one costs nothing); at 0 a create gets 403 "Insufficient
  balance". Keys without a balance are unlimited. The balance is checked before the cap.
"""

from __future__ import annotations

import hashlib
import hmac
import uuid
from collections.abc import Mapping
from typing import Any, ClassVar

from aiohttp import web

from ._core import (
    JSON_HEADERS,
    AuthFailure,
    Call,
    ProviderAPI,
    json_bytes,
    json_payload,
    json_response,
    same_auth_text,
)
from ._state import EmuTask, State
from ._webhooks import Payload, WebhookPlan

STATUS_WORDS: dict[State, str] = {
    "queued": "created",
    "running": "processing",
    "completed": "completed",
    "failed": "failed",
}
CHANNELS = frozenset({"economy", "stable", "official"})
#: v1 timings split of the whole duration (run_overhead takes the rounding rest).
TIMING_SHARES = (("queue_wait", 0.2), ("celery_init", 0.08), ("api_call", 0.62), ("save", 0.06))
COMMON_TEXTS = {
    400: "Invalid parameters",
    403: "Insufficient balance",
    404: "Not found",
    429: "Rate limit exceeded",
    500: "Server error",
    502: "Bad gateway",
    503: "Service unavailable",
}


def has_prompt(body: Any) -> bool:
    """Whether a Get3W body is a JSON object with a non-empty string prompt."""
    return isinstance(body, dict) and isinstance(body.get("prompt"), str) and bool(body["prompt"])


def valid_channel(channel: Any) -> bool:
    """Whether a v1 `channel` is one of the documented service tiers."""
    return isinstance(channel, str) and channel in CHANNELS


def v1_timings(task: EmuTask) -> dict[str, int]:
    """Plausible v1 timings (ms) that add up to the task's duration."""
    total = task.elapsed_ms()
    timings = {name: int(total * share) for name, share in TIMING_SHARES}
    timings["run_overhead"] = total - sum(timings.values())
    timings["total"] = total
    return timings


class Get3WAccount(ProviderAPI):
    """What both Get3W APIs share: one account per key, its cap and its balance."""

    account = "get3w"

    def require_balance(self, call: Call) -> None:
        """Answer 403 "Insufficient balance" when the key's balance is used up."""
        if self.core.get3w_balance.get(call.key, 1) <= 0:
            raise self.core.refuse_payment(self, 403, "Insufficient balance")

    def charge(self, call: Call) -> None:
        """An accepted create costs the key one unit of its balance, if it has one."""
        balances = self.core.get3w_balance
        if call.key in balances:
            balances[call.key] -= 1


class Get3WV1(Get3WAccount):
    """`POST /v1/{provider_id}/{model_id}/{run_type}` and `GET /v1/requests/{id}`."""

    provider = "get3w"
    texts: ClassVar[Mapping[int, str]] = COMMON_TEXTS
    auth_texts: ClassVar[Mapping[AuthFailure, str]] = {
        "missing": "Missing Authorization header",
        "malformed": "Invalid Authorization format, expected: Bearer <api_key>",
        "invalid": "Invalid or revoked API key",
    }

    def routes(self) -> list[web.RouteDef]:
        """The v1 submit and poll routes."""
        return [
            web.get("/v1/requests/{id}", self.endpoint("poll", self.get)),
            web.post("/v1/{provider_id}/{model_id}/{run_type}", self.endpoint("create", self.create)),
        ]

    def error_body(self, status: int, text: str) -> Any:
        """`{"code": <status>, "error": "<text>"}`."""
        return {"code": status, "error": text}

    async def create(self, request: web.Request, call: Call) -> web.StreamResponse:
        """Accept a job; answer at once, or when it ends under `?sync=true`."""
        body = call.body
        if not has_prompt(body) or not valid_channel(body.get("channel", "stable")):
            raise self.fail(400)
        self.require_balance(call)
        model = "{provider_id}/{model_id}/{run_type}".format_map(request.match_info)
        webhook = request.query.get("webhook") or None
        task = self.core.create_task(
            call,
            str(uuid.uuid4()),
            model,
            body,
            body["prompt"],
            webhook,
            aspect_ratio=body.get("aspect_ratio"),
        )
        if request.query.get("sync", "").lower() in ("true", "1"):
            await self.core.wait_done(task)
            return json_response(self.result(task))
        estimate = self.core.estimated_duration(model)
        return json_response({"id": task.id, "status": "created", "estimated_duration": estimate})

    async def get(self, request: web.Request, call: Call) -> web.StreamResponse:
        """The task's current result object."""
        task = self.core.find(self.provider, request.match_info["id"])
        if task is None:
            raise self.fail(404)
        return json_response(self.result(task))

    def result(self, task: EmuTask) -> dict[str, Any]:
        """The v1 request object as documented (poll, sync answer and callback)."""
        state = task.state()
        done = state in ("completed", "failed")
        return {
            "id": task.id,
            "model": task.model,
            "status": STATUS_WORDS[state],
            "code": 500 if state == "failed" else 0,
            "outputs": task.output_urls() if state == "completed" else [],
            "timings": v1_timings(task) if done else None,
            "error": task.error if state == "failed" else None,
            "created_at": task.iso_created(millis=False),
        }

    def webhook_plan(self, task: EmuTask, url: str) -> WebhookPlan | None:
        """One unsigned POST of the result object."""
        return WebhookPlan(self.provider, url, lambda: json_payload(self.result(task)))


class Get3WV3(Get3WAccount):
    """`POST /api/v3/{model-id}` and `/api/v3/predictions/{id}` (GET, /result, DELETE)."""

    provider = "get3w_v3"
    texts: ClassVar[Mapping[int, str]] = {**COMMON_TEXTS, 403: "Account issue"}
    auth_texts = same_auth_text("Invalid API key")

    def routes(self) -> list[web.RouteDef]:
        """The v3 routes; prediction GETs are registered before the catch-all POST."""
        return [
            web.get("/api/v3/predictions/{id}", self.endpoint("poll", self.get)),
            web.get("/api/v3/predictions/{id}/result", self.endpoint("poll", self.get)),
            web.delete("/api/v3/predictions/{id}", self.endpoint("other", self.delete)),
            web.post("/api/v3/{model:.+}", self.endpoint("create", self.create)),
        ]

    def error_body(self, status: int, text: str) -> Any:
        """`{"code": <status>, "message": "<text>", "data": null}`."""
        return {"code": status, "message": text, "data": None}

    @staticmethod
    def envelope(data: Any) -> web.Response:
        """The success envelope around `data`."""
        return json_response({"code": 200, "message": "success", "data": data})

    async def create(self, request: web.Request, call: Call) -> web.StreamResponse:
        """Accept a prediction and point at its poll URL."""
        body = call.body
        webhook = body.get("webhook_url") if isinstance(body, dict) else None
        if not has_prompt(body) or not isinstance(webhook, str | None):
            raise self.fail(400)
        self.require_balance(call)
        model = request.match_info["model"]
        task_id = f"pred_{uuid.uuid4().hex}"
        task = self.core.create_task(
            call, task_id, model, body, body["prompt"], webhook or None, aspect_ratio=body.get("aspect_ratio")
        )
        return self.envelope(
            {
                "id": task.id,
                "model": task.model,
                "status": "created",
                "urls": {"get": self.poll_url(task)},
                "created_at": task.iso_created(),
            }
        )

    async def get(self, request: web.Request, call: Call) -> web.StreamResponse:
        """The prediction, at either documented path."""
        return self.envelope(self.prediction(self.lookup(request)))

    async def delete(self, request: web.Request, call: Call) -> web.StreamResponse:
        """Remove the prediction; data is null."""
        del self.core.tasks[self.lookup(request).id]
        return self.envelope(None)

    def lookup(self, request: web.Request) -> EmuTask:
        """The prediction named in the path, or a 404 answer."""
        task = self.core.find(self.provider, request.match_info["id"])
        if task is None:
            raise self.fail(404)
        return task

    def poll_url(self, task: EmuTask) -> str:
        """`urls.get`: the emulator's own origin unless `v3_poll_origin` overrides it."""
        return f"{self.core.config.v3_poll_origin or task.origin}/api/v3/predictions/{task.id}"

    def prediction(self, task: EmuTask) -> dict[str, Any]:
        """The prediction object as documented (poll data and callback body)."""
        state = task.state()
        done = state in ("completed", "failed")
        pred: dict[str, Any] = {
            "id": task.id,
            "model": task.model,
            "status": STATUS_WORDS[state],
            "input": task.input,
            "outputs": task.output_urls() if state == "completed" else [],
            "urls": {"get": self.poll_url(task)},
            "timings": {"inference": task.elapsed_ms() if done else 0},
            "has_nsfw_contents": [True] if done and task.outcome == "nsfw" else [],
            "created_at": task.iso_created(),
            "completed_at": task.iso_finished() if done else None,
        }
        if state == "failed":
            pred["error"] = task.error
        return pred

    def webhook_plan(self, task: EmuTask, url: str) -> WebhookPlan | None:
        """One POST of the prediction, HMAC-signed when a secret is configured."""
        return WebhookPlan(self.provider, url, lambda: self.signed(self.prediction(task)))

    def signed(self, obj: Any) -> Payload:
        """Body bytes and headers, with `X-Get3W-Signature` over the raw body."""
        body = json_bytes(obj)
        secret = self.core.config.webhook_secret
        if not secret:
            return body, JSON_HEADERS
        signature = hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
        return body, {**JSON_HEADERS, "X-Get3W-Signature": signature}
