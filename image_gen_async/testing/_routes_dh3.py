"""dh3: `POST /api/v1/task/create` and `GET /api/v1/task/get?task_id=`.

Choices where the document is silent:
- Any model name is accepted; its input and output keys are the name with "-" turned
  into "_" plus "_input" / "_output" (nano-banana-pro → nano_banana_pro_input).
- Errors are `{"code": <status>, "message": "<text>"}` sent with HTTP status = code, or
  HTTP 200 when `dh3_errors_under_http_200` is set. Texts: 401 "invalid api key",
  400 "invalid parameter: ...", 404 "task not found", 429 "rate limit exceeded".
- The QPS limit counts every create request that arrived in the last second (rejected
  ones too), across all keys of the emulator.
- Tasks at once (`max_concurrent["dh3"]`, per key; no cap by default): over it a create
  is refused with code 429 "too many concurrent tasks" (as every dh3 error: HTTP 429, or
  HTTP 200 under `dh3_errors_under_http_200`), and no task is made.
- Output files are always PNG (`output_format: jpg` is accepted but not honoured).
- Callbacks: exactly HTTP 200 ends delivery; otherwise 3 retries spaced by
  `dh3_callback_retry_delay`; no signature.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from typing import Any, ClassVar

from aiohttp import web

from ._core import Call, ProviderAPI, json_payload, json_response, same_auth_text
from ._png import make_png
from ._state import EmuTask, State
from ._webhooks import WebhookPlan

STATUS_WORDS: dict[State, str] = {
    "queued": "queuing",
    "running": "processing",
    "completed": "success",
    "failed": "fail",
}
ASPECT_RATIOS = frozenset({"1:1", "2:3", "3:2", "3:4", "4:3", "4:5", "5:4", "9:16", "16:9", "21:9", "auto"})
RESOLUTIONS = frozenset({"1K", "2K", "4K"})
OUTPUT_FORMATS = frozenset({"png", "jpg"})
MAX_IMAGE_URLS = 8
PROMPT_LENGTH = (3, 20000)


def model_key(model: str, suffix: str) -> str:
    """The body key of a model's input or output: nano-banana-pro → nano_banana_pro_input."""
    return f"{model.replace('-', '_')}_{suffix}"


def one_of(value: Any, allowed: frozenset[str]) -> bool:
    """Whether an optional field is absent or one of the allowed strings."""
    return value is None or (isinstance(value, str) and value in allowed)


def input_problem(inp: dict[str, Any]) -> str | None:
    """What is wrong with a model input, per the documented limits; None when valid."""
    prompt = inp.get("prompt")
    low, high = PROMPT_LENGTH
    if not isinstance(prompt, str) or not low <= len(prompt) <= high:
        return f"prompt must be a string of {low}-{high} characters"
    urls = inp.get("image_urls", [])
    if not isinstance(urls, list) or not all(isinstance(u, str) for u in urls):
        return "image_urls must be a list of strings"
    if len(urls) > MAX_IMAGE_URLS:
        return f"image_urls allows at most {MAX_IMAGE_URLS} images"
    if not one_of(inp.get("aspect_ratio"), ASPECT_RATIOS):
        return "aspect_ratio must be one of " + "|".join(sorted(ASPECT_RATIOS))
    if not one_of(inp.get("resolution"), RESOLUTIONS):
        return "resolution must be one of 1K|2K|4K"
    if not one_of(inp.get("output_format"), OUTPUT_FORMATS):
        return "output_format must be one of png|jpg"
    return None


class Dh3(ProviderAPI):
    """The dh3 task API with its QPS limit and retried callbacks."""

    provider = "dh3"
    account = "dh3"
    texts: ClassVar[Mapping[int, str]] = {
        400: "invalid parameter",
        403: "forbidden",
        404: "task not found",
        429: "rate limit exceeded",
        500: "internal server error",
        502: "bad gateway",
        503: "service unavailable",
    }
    auth_texts = same_auth_text("invalid api key")

    def routes(self) -> list[web.RouteDef]:
        """The create and get routes."""
        return [
            web.post("/api/v1/task/create", self.endpoint("create", self.create)),
            web.get("/api/v1/task/get", self.endpoint("poll", self.get)),
        ]

    def error_body(self, status: int, text: str) -> Any:
        """`{"code": <status>, "message": "<text>"}`."""
        return {"code": status, "message": text}

    def http_status(self, status: int) -> int:
        """The code itself, or 200 when errors travel under HTTP 200."""
        return 200 if self.core.config.dh3_errors_under_http_200 else status

    def capacity_refusal(self, active: int) -> web.Response:
        """`{"code": 429, "message": "too many concurrent tasks"}`, sent as dh3 sends errors."""
        return self.error(429, "too many concurrent tasks", self.core.capacity_headers())

    def qps_limit(self) -> float | None:
        """`dh3_qps` creates per sliding second."""
        return self.core.config.dh3_qps

    async def create(self, request: web.Request, call: Call) -> web.StreamResponse:
        """Validate and accept a task."""
        body = call.body
        model = body.get("model") if isinstance(body, dict) else None
        if not isinstance(model, str) or not model:
            raise self.fail(400, "invalid parameter: model is required")
        key = model_key(model, "input")
        inp = body.get(key)
        if not isinstance(inp, dict):
            raise self.fail(400, f"invalid parameter: {key} is required")
        problem = input_problem(inp)
        callback = body.get("callback_url")
        if problem is None and not isinstance(callback, str | None):
            problem = "callback_url must be a string"
        if problem is not None:
            raise self.fail(400, f"invalid parameter: {problem}")
        task_id = uuid.uuid4().hex
        self.core.create_task(
            call, task_id, model, body, inp["prompt"], callback or None, aspect_ratio=inp.get("aspect_ratio")
        )
        return json_response({"code": 200, "message": "ok", "task_id": task_id})

    async def get(self, request: web.Request, call: Call) -> web.StreamResponse:
        """The task's state and, when done, its images or error."""
        task_id = request.query.get("task_id")
        if not task_id:
            raise self.fail(400, "invalid parameter: task_id is required")
        task = self.core.find(self.provider, task_id)
        if task is None:
            raise self.fail(404)
        return json_response(self.result(task))

    def result(self, task: EmuTask) -> dict[str, Any]:
        """`{"code": 200, "message": "Ok", "<model>_output": {...}}` (poll and callback)."""
        state = task.state()
        output: dict[str, Any] = {"task_id": task.id, "status": STATUS_WORDS[state]}
        if state == "completed":
            output["images"] = [self.image_file(task, url) for url in task.output_urls()]
        elif state == "failed":
            output["err_msg"] = task.error
        return {"code": 200, "message": "Ok", model_key(task.model, "output"): output}

    @staticmethod
    def image_file(task: EmuTask, url: str) -> dict[str, str]:
        """An ImageFile describing the PNG served at `url` (all fields strings)."""
        width, height = task.image_size
        return {
            "url": url,
            "content_type": "image/png",
            "file_name": url.rsplit("/", 1)[-1],
            "file_size": str(len(make_png(width, height))),
            "width": str(width),
            "height": str(height),
        }

    def webhook_plan(self, task: EmuTask, url: str) -> WebhookPlan | None:
        """The result POSTed, retried 3 times unless answered with exactly 200."""
        return WebhookPlan(
            self.provider,
            url,
            lambda: json_payload(self.result(task)),
            retries=3,
            only_200=True,
        )
