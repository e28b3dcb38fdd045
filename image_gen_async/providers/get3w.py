"""Get3W: the v1 API (``/v1/...``) and the v3 API (``/api/v3/...``).

v1 (seeds 000 and 002, PROVIDERS.md):
- create ``POST /v1/{provider}/{model}/{run_type}``; ``?sync=true`` for ``generate``,
  ``?webhook=<url>`` for a callback; async answer ``{id, status: "created", estimated_duration}``.
- poll ``GET /v1/requests/{id}``: ``{id, model, status, code, outputs: [url], timings, error}``.
- status words ``created | processing | completed | failed``; a failed task carries
  ``code`` and ``error`` under HTTP 200 (a task failure, not an API error).
- error answers ``{"code": <http status>, "error": "<text>"}``. Assumption: a body with
  an int ``code`` >= 400 and no ``id`` is an error even under HTTP 200.

v3 (seed 001, PROVIDERS.md):
- every answer is an envelope ``{code, message, data}``; ``code`` other than 200 is an
  error even under HTTP 200 (errors have ``data: null``).
- create ``POST /api/v3/{model-id}`` with ``webhook_url`` in the body; the answer's
  ``data.urls.get`` is followed by the engine only on the configured origin.
- poll ``GET /api/v3/predictions/{id}``; ``error`` may be absent, ``null`` or ``""`` and
  ``has_nsfw_contents`` ``[]`` or ``null``: all accepted.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import quote

import attrs

from ..errors import InvalidRequestError
from ..models import TaskResult, TaskStatus, structure
from ._base import (
    Codec,
    ErrorReport,
    HttpRequest,
    Refusal,
    Snapshot,
    error_report,
    number,
    require_prompt,
    success_code,
    timings,
    urls_as_outputs,
)

GET3W_ORIGIN = "https://api.get3w.com"
CHANNELS = ("economy", "stable", "official")
_MODEL_SEGMENT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")

GET3W_STATUS_WORDS: Mapping[str, TaskStatus] = {
    "created": TaskStatus.QUEUED,
    "processing": TaskStatus.PROCESSING,
    "completed": TaskStatus.COMPLETED,
    "failed": TaskStatus.FAILED,
}


@attrs.frozen
class Get3WTask:
    """The task object both APIs share (v1 top level, v3 ``data``).

    Only what decides the outcome is typed strictly; informational fields are read
    best-effort from ``raw`` so an odd value there cannot fail a finished task.
    """

    id: str
    status: str
    model: str | None = None
    outputs: list[str] | None = None
    error: Any = None


@attrs.frozen
class V3Urls:
    get: str | None = None


@attrs.frozen
class V3Prediction(Get3WTask):
    """A v3 prediction: the shared task plus its poll URL."""

    urls: V3Urls | None = None


@attrs.frozen
class V3Envelope:
    data: V3Prediction


def error_text(value: Any) -> str | None:
    """A failure's text from ``error``: a string, or an object's ``message``; empty is none."""
    if isinstance(value, Mapping):
        value = value.get("message") or value.get("error") or json.dumps(value)
    if value is None or value == "":
        return None
    return value if isinstance(value, str) else str(value)


def _model_path(provider: str, model: str, segments: int | None) -> str:
    """The model id as URL path segments, each checked so nothing escapes the route."""
    parts = model.split("/") if isinstance(model, str) else []
    if not parts or not all(_MODEL_SEGMENT.match(part) for part in parts):
        raise InvalidRequestError(f"{provider}: invalid model id {model!r}")
    if segments is not None and len(parts) != segments:
        raise InvalidRequestError(
            f"{provider}: model must be 'provider/model/run_type' "
            f"(e.g. google/nano-banana-pro/text-to-image), got {model!r}"
        )
    return "/".join(quote(part, safe="") for part in parts)


class _Get3WCodec(Codec):
    """What v1 and v3 share: status words, the task object and its failure rules."""

    default_base_url = GET3W_ORIGIN
    env_var = "GET3W_API_KEY"
    status_words = GET3W_STATUS_WORDS

    def task_snapshot(self, task: Get3WTask, model: str, raw: Any, fields: Mapping[str, Any]) -> Snapshot:
        """``fields`` is the task object as sent, for the best-effort informational fields."""
        return self.snapshot(
            task_id=task.id,
            model=task.model or model,
            status=task.status,
            raw=raw,
            outputs=urls_as_outputs(task.outputs),
            error=error_text(task.error),
            timings=timings(fields.get("timings")),
            estimated_duration=number(fields.get("estimated_duration")),
            poll_url=task.urls.get if isinstance(task, V3Prediction) and task.urls else None,
        )

    def refusal_of(self, report: ErrorReport, body: Any) -> Refusal:
        """Get3W documents its 429 as "too many concurrent tasks for the account tier"."""
        return Refusal(capacity=True)

    def content_policy(self, result: TaskResult) -> bool:
        """Get3W marks safety failures in words, and v3 also in ``has_nsfw_contents``."""
        data = result.raw.get("data", result.raw) if isinstance(result.raw, Mapping) else None
        flags = data.get("has_nsfw_contents") if isinstance(data, Mapping) else None
        flagged = isinstance(flags, list) and any(flag is True for flag in flags)
        return flagged or super().content_policy(result)

    def body(self, prompt: str, params: Mapping[str, Any]) -> dict[str, Any]:
        channel = params.get("channel")
        if channel is not None and channel not in CHANNELS:
            raise InvalidRequestError(f"{self.name}: channel must be one of {CHANNELS}, got {channel!r}")
        return {"prompt": require_prompt(self.name, prompt)} | {
            key: value for key, value in params.items() if value is not None
        }


class Get3WV1Codec(_Get3WCodec):
    """Get3W's ``/v1`` API."""

    name = "get3w"
    example_model = "google/nano-banana-pro/text-to-image"
    has_sync_mode = True

    def submit_request(
        self,
        model: str,
        prompt: str,
        params: Mapping[str, Any],
        *,
        webhook_url: str | None,
        sync: bool,
    ) -> HttpRequest:
        query = {"sync": "true"} if sync else {}
        if webhook_url:
            query["webhook"] = webhook_url
        return HttpRequest(
            "POST", f"/v1/{_model_path(self.name, model, 3)}", query, self.body(prompt, params)
        )

    def read_submit(self, model: str, body: Any) -> Snapshot:
        return self.task_snapshot(structure(body, Get3WTask, provider=self.name), model, body, body)

    def poll_request(self, task_id: str, model: str) -> HttpRequest:
        return HttpRequest("GET", f"/v1/requests/{quote(task_id, safe='')}")

    def read_poll(self, task_id: str, model: str, body: Any) -> Snapshot:
        return self.read_submit(model, body)

    def error_of(self, http_status: int, body: Any) -> ErrorReport | None:
        fields = body if isinstance(body, Mapping) else {}
        code = fields.get("code")
        # A task object carries code 0 or its failure's code; an error body has a code and no id.
        failed_in_body = success_code(code) is False and "id" not in fields
        if http_status < 400 and not failed_in_body:
            return None
        return error_report(http_status, code, fields.get("error") or fields.get("message"))


class Get3WV3Codec(_Get3WCodec):
    """Get3W's ``/api/v3`` API."""

    name = "get3w_v3"
    example_model = "get3w/flux-dev"
    callback_fields = frozenset({"webhook_url"})
    signature_header = "X-Get3W-Signature"

    def submit_request(
        self,
        model: str,
        prompt: str,
        params: Mapping[str, Any],
        *,
        webhook_url: str | None,
        sync: bool,
    ) -> HttpRequest:
        body = self.body(prompt, params)
        if webhook_url:
            body["webhook_url"] = webhook_url
        return HttpRequest("POST", f"/api/v3/{_model_path(self.name, model, None)}", {}, body)

    def read_submit(self, model: str, body: Any) -> Snapshot:
        envelope = structure(body, V3Envelope, provider=self.name)
        return self.task_snapshot(envelope.data, model, body, body["data"])

    def poll_request(self, task_id: str, model: str) -> HttpRequest:
        return HttpRequest("GET", f"/api/v3/predictions/{quote(task_id, safe='')}")

    def read_poll(self, task_id: str, model: str, body: Any) -> Snapshot:
        return self.read_submit(model, body)

    def cancel_request(self, task_id: str) -> HttpRequest:
        """``DELETE /api/v3/predictions/{id}``: the documented way to delete a task."""
        return HttpRequest("DELETE", f"/api/v3/predictions/{quote(task_id, safe='')}")

    def cancel_error_of(self, http_status: int, body: Any) -> ErrorReport | None:
        """A delete's envelope may carry ``data: null``: only its ``code`` says failure."""
        fields = body if isinstance(body, Mapping) else {}
        if http_status < 400 and success_code(fields.get("code")) is not False:
            return None
        return error_report(http_status, fields.get("code"), fields.get("message") or fields.get("error"))

    def read_callback(self, task_id: str, model: str, body: Any) -> Snapshot:
        """v3 posts the bare prediction; an enveloped one is accepted too."""
        if isinstance(body, Mapping) and "data" not in body:
            body = {"code": 200, "message": "success", "data": body}
        return self.read_poll(task_id, model, body)

    def error_of(self, http_status: int, body: Any) -> ErrorReport | None:
        fields = body if isinstance(body, Mapping) else {}
        code = fields.get("code")
        ok = success_code(code) is not False
        if http_status < 400 and ok and fields.get("data") is not None:
            return None
        if http_status < 400 and ok:
            return ErrorReport(502, code, "answer has no data")
        return error_report(http_status, code, fields.get("message") or fields.get("error"))
