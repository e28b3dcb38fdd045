"""nananobanana (seed 004, PROVIDERS.md).

- ``POST /api/v1/generate`` ``{prompt, selectedModel, referenceImageUrls, aspectRatio, mode}``.
  ``submit`` uses ``mode: "async"`` (answer ``{success, async, generationId, ...}``) and
  polls ``GET /api/v1/generate?id=<generationId>`` (``{data: {processingStatus,
  outputImageUrls, errorMessage}}``); ``generate`` uses ``mode: "sync"``.
- status words ``processing | completed | failed``.
- the content-safety warning (``success: false, warning: true`` under HTTP 200) is a
  failed task raised as ``ContentPolicyError``; a sync ``success: false`` with an id is
  a failed task; one without an id is an error.
- errors carry ``error`` (a string): 400, 401, 402 credits, 403 access, 500, and 503
  ``server_busy`` (async only, credits refunded: the engine retries it).
- The library's common names ``image_urls`` and ``aspect_ratio`` are sent as
  ``referenceImageUrls`` and ``aspectRatio``. No webhook mode exists.

Assumption: a poll answer without the ``data`` wrapper is read from the top level.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping
from typing import Any, ClassVar

import attrs

from ..errors import InvalidRequestError, ProtocolError
from ..models import ModelInfo, TaskResult, TaskStatus, structure
from ._base import (
    Codec,
    ErrorReport,
    HttpRequest,
    Refusal,
    Snapshot,
    error_report,
    merge_params,
    number,
    require_prompt,
    urls_as_outputs,
    whole_number,
)

PARAM_ALIASES = {"image_urls": "referenceImageUrls", "aspect_ratio": "aspectRatio"}
# Body fields the call itself sets, never a parameter: the handle names the call's model, and
# its prompt is the one checked.
CHOSEN_BY_THE_CALL = {
    "mode": "is chosen by submit() and generate()",
    "selectedModel": "is the call's model argument",
    "prompt": "is the call's prompt argument",
}


@attrs.frozen
class Generated:
    """A create answer: async acceptance, sync success, or the safety warning."""

    generationId: str  # the wire names
    success: bool | None = None
    imageUrls: list[str] | None = None
    message: str | None = None
    error: str | None = None
    warning: bool | None = None


@attrs.frozen
class Generation:
    """The polled record."""

    id: str
    processingStatus: str
    outputImageUrls: list[str] | None = None
    errorMessage: str | None = None
    modelUsed: str | None = None


@attrs.frozen
class PollAnswer:
    data: Generation


class NananobananaCodec(Codec):
    """nananobanana's generate API."""

    name = "nananobanana"
    example_model = "nano-banana"
    default_base_url = "https://www.nananobanana.com"
    env_var = "NANANOBANANA_API_KEY"
    has_sync_mode = True
    has_stream_mode = True
    has_webhooks = False
    status_words: ClassVar[Mapping[str, TaskStatus]] = {
        "processing": TaskStatus.PROCESSING,
        "completed": TaskStatus.COMPLETED,
        "failed": TaskStatus.FAILED,
    }

    def submit_request(
        self,
        model: str,
        prompt: str,
        params: Mapping[str, Any],
        *,
        webhook_url: str | None,
        sync: bool,
    ) -> HttpRequest:
        if webhook_url:
            raise InvalidRequestError("nananobanana has no webhook mode; poll instead")
        return self._create(model, prompt, params, "sync" if sync else "async")

    def stream_request(self, model: str, prompt: str, params: Mapping[str, Any]) -> HttpRequest:
        return self._create(model, prompt, params, "stream", accept="text/event-stream")

    def _create(
        self, model: str, prompt: str, params: Mapping[str, Any], mode: str, accept: str | None = None
    ) -> HttpRequest:
        fields = merge_params(self.name, params, PARAM_ALIASES)
        for field, chosen in CHOSEN_BY_THE_CALL.items():
            if field in fields:
                raise InvalidRequestError(f"nananobanana: {field} {chosen}")
        body = {"prompt": require_prompt(self.name, prompt), "selectedModel": model}
        return HttpRequest("POST", "/api/v1/generate", {}, body | fields | {"mode": mode}, accept=accept)

    def read_stream_event(self, model: str, body: Any, task_id: str | None) -> Snapshot:
        """A status event is progress; ``complete`` has the URLs (or ``success: false``); ``error`` fails."""
        if not isinstance(body, Mapping):
            raise ProtocolError(f"{self.name}: a stream event is not an object", field="$")
        named = self.task_id_of(body) or task_id
        data = _stream_data(body)
        message = _text(body.get("message"))
        urls = _stream_urls(data)
        progress = _percent(body.get("progress"))
        status = _stream_status(body.get("type"), data, urls, progress)
        error = _text(body.get("error")) or message or _text(data.get("error"))
        # The documented events carry no id: until one does, the task goes by one of ours
        # (it cannot be polled, but its events and its images still come on the stream).
        provisional = named is None
        if named is None:
            named = "stream-" + secrets.token_hex(8)
        snapshot = self.snapshot(
            task_id=named,
            model=model,
            status=status,
            raw=body,
            outputs=urls_as_outputs(urls),
            error=error,
            credits_used=number(data.get("creditsUsed")),
            remaining_credits=number(data.get("remainingCredits")),
        )
        return attrs.evolve(snapshot, progress=progress, message=message, provisional=provisional)

    def read_submit(self, model: str, body: Any) -> Snapshot:
        answer = structure(body, Generated, provider=self.name)
        accepted_async = isinstance(body, Mapping) and body.get("async") is True
        if answer.success and answer.imageUrls and not accepted_async:
            status = TaskStatus.COMPLETED
        elif answer.success is False:
            status = TaskStatus.FAILED
        else:
            status = TaskStatus.QUEUED
        return self.snapshot(
            task_id=answer.generationId,
            model=model,
            status=status,
            raw=body,
            outputs=urls_as_outputs(answer.imageUrls),
            error=answer.error or answer.message,
            credits_used=number(body.get("creditsUsed")),
            remaining_credits=number(body.get("remainingCredits")),
        )

    def poll_request(self, task_id: str, model: str) -> HttpRequest:
        return HttpRequest("GET", "/api/v1/generate", {"id": task_id})

    def read_poll(self, task_id: str, model: str, body: Any) -> Snapshot:
        if isinstance(body, Mapping) and "data" not in body and "processingStatus" in body:
            body = {"data": body}
        record = structure(body, PollAnswer, provider=self.name).data
        return self.snapshot(
            task_id=record.id,
            model=record.modelUsed or model,
            status=record.processingStatus,
            raw=body,
            outputs=urls_as_outputs(record.outputImageUrls),
            error=record.errorMessage,
            credits_used=number(body["data"].get("creditsUsed")),
        )

    def credits_request(self) -> HttpRequest:
        return HttpRequest("GET", "/api/v1/credits")

    def read_credits(self, body: Any) -> float:
        """``{"data": {"credits": N}}``; the bare ``{"credits": N}`` is read too."""
        data = body.get("data", body) if isinstance(body, Mapping) else None
        credits: float | None = number(data.get("credits")) if isinstance(data, Mapping) else None
        if credits is None:
            field = "$.data.credits"
            raise ProtocolError(f"{self.name}: required field missing @ {field}", field=field)
        return credits

    def models_request(self) -> HttpRequest:
        return HttpRequest("GET", "/api/v1/models")

    def read_models(self, body: Any) -> tuple[ModelInfo, ...]:
        """``{"data": [{name, displayName, creditsCost, ...}]}``; entries without a name are skipped."""
        data = body.get("data") if isinstance(body, Mapping) else None
        if not isinstance(data, list):
            raise ProtocolError(f"{self.name}: required field missing @ $.data", field="$.data")
        return tuple(
            ModelInfo(
                name=item["name"],
                display_name=_text(item.get("displayName")),
                credits_cost=number(item.get("creditsCost")),
                supports_image_input=_flag(item.get("supportsImageInput")),
                supports_aspect_ratio=_flag(item.get("supportsAspectRatio")),
                requires_pro=_flag(item.get("requiresPro")),
                raw=item,
            )
            for item in data
            if isinstance(item, Mapping) and isinstance(item.get("name"), str) and item["name"]
        )

    def content_policy(self, result: TaskResult) -> bool:
        """The documented warning flag, or a failure message about safety."""
        raw = result.raw if isinstance(result.raw, Mapping) else {}
        return raw.get("warning") is True or super().content_policy(result)

    def refusal_of(self, report: ErrorReport, body: Any) -> Refusal:
        """503 ``server_busy`` is the documented cap, with the key's ``activeTasks``; a 429 is a rate."""
        fields = body if isinstance(body, Mapping) else {}
        if report.status == 503 or fields.get("type") == "server_busy":
            return Refusal(capacity=True, active=whole_number(fields.get("activeTasks")))
        return super().refusal_of(report, body)

    def error_of(self, http_status: int, body: Any) -> ErrorReport | None:
        fields = body if isinstance(body, Mapping) else {}
        # success:false with a generation id is a finished (failed) task, not an API error.
        failed_without_task = fields.get("success") is False and not fields.get("generationId")
        if http_status < 400 and not failed_without_task:
            return None
        code = fields.get("type") or fields.get("code")
        return error_report(http_status, code, fields.get("error") or fields.get("message"))


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _flag(value: Any) -> bool | None:
    return value if isinstance(value, bool) else None


def _stream_data(body: Mapping[str, Any]) -> Mapping[str, Any]:
    inner = body.get("data")
    return inner if isinstance(inner, Mapping) else {}


def _stream_urls(data: Mapping[str, Any]) -> list[str]:
    urls = data.get("imageUrls")
    return [url for url in urls if isinstance(url, str)] if isinstance(urls, list) else []


def _stream_status(
    kind: Any, data: Mapping[str, Any], urls: list[str], progress: float | None
) -> TaskStatus:
    """What a stream event (its ``type``, ``data``, URLs and progress) says of its job. ``error``
    or ``success: false`` fails it; ``complete`` with URLs completes it. A ``complete`` without
    usable URLs ends nothing: the job is paid for and the poll, once the stream ends, has its
    URLs (failing it would lose them)."""
    if kind == "error" or (kind == "complete" and data.get("success") is False):
        return TaskStatus.FAILED
    if kind == "complete" and urls:
        return TaskStatus.COMPLETED
    # "Generation started" at 0: nothing done yet, as a queued job; any progress: running.
    return TaskStatus.QUEUED if progress == 0 else TaskStatus.PROCESSING


def _percent(value: Any) -> float | None:
    """Progress as a number from 0 to 100 (a value outside is held at the nearer end); else None."""
    parsed = number(value)
    return None if parsed is None else min(100.0, max(0.0, parsed))
