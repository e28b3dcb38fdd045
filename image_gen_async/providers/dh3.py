"""dh3 (seed 003, PROVIDERS.md).

- create ``POST /api/v1/task/create`` ``{model, <model>_input: {...}, callback_url}``, where
  ``<model>`` is the model name with ``-`` turned into ``_``; answer ``{code, message, task_id}``.
- poll ``GET /api/v1/task/get?task_id=...`` (a query parameter, as the seed's playground
  does); answer ``{code, message, <model>_output: {task_id, status, images, err_msg}}``.
- status words ``queuing | processing | success | fail``; ImageFile numbers are strings.
- JSON ``code`` other than 200 is an error even under HTTP 200.
- Limits checked before sending: prompt 3-20000 characters, at most 8 ``image_urls``,
  the aspect-ratio list, ``resolution`` 1K|2K|4K (case-insensitive, sent upper-case),
  ``output_format`` png|jpg. Create QPS defaults to 3.

Assumptions where the seed is silent: the QPS-limit answer is HTTP 429 or a JSON
``code`` 429 (a rate-limit message under any code counts too); an answer whose output
key is not exactly ``<model>_output`` is read from the one ``*_output`` object it has.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import attrs

from ..errors import InvalidRequestError, ProtocolError
from ..models import Output, TaskStatus, structure
from ._base import (
    Codec,
    ErrorReport,
    HttpRequest,
    Snapshot,
    error_report,
    require_prompt,
    success_code,
    whole_number,
)

ASPECT_RATIOS = ("1:1", "2:3", "3:2", "3:4", "4:3", "4:5", "5:4", "9:16", "16:9", "21:9", "auto")
RESOLUTIONS = ("1K", "2K", "4K")
OUTPUT_FORMATS = ("png", "jpg")
PROMPT_LENGTH = (3, 20000)
MAX_IMAGE_URLS = 8


@attrs.frozen
class ImageFile:
    """An output file; its numbers are strings in the seed and read best-effort."""

    url: str
    content_type: Any = None
    file_name: Any = None
    file_size: Any = None
    width: Any = None
    height: Any = None


@attrs.frozen
class Dh3Output:
    task_id: str
    status: str
    images: list[ImageFile] | None = None
    err_msg: Any = None


@attrs.frozen
class Dh3Created:
    task_id: str


def model_key(model: str, suffix: str) -> str:
    """``nano-banana-pro`` + ``input`` -> ``nano_banana_pro_input``."""
    return f"{model.replace('-', '_')}_{suffix}"


class Dh3Codec(Codec):
    """dh3's task API."""

    name = "dh3"
    callback_fields = frozenset({"callback_url"})
    example_model = "nano-banana-pro"
    default_base_url = "https://api.dh3.app"
    env_var = "DH3_API_KEY"
    default_rate_limit = 3.0
    status_words: ClassVar[Mapping[str, TaskStatus]] = {
        "queuing": TaskStatus.QUEUED,
        "processing": TaskStatus.PROCESSING,
        "success": TaskStatus.COMPLETED,
        "fail": TaskStatus.FAILED,
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
        if not isinstance(model, str) or not model.strip():
            raise InvalidRequestError("dh3: model must be a non-empty string")
        body: dict[str, Any] = {"model": model, model_key(model, "input"): self._input(prompt, params)}
        if webhook_url:
            body["callback_url"] = webhook_url
        return HttpRequest("POST", "/api/v1/task/create", {}, body)

    def _input(self, prompt: str, params: Mapping[str, Any]) -> dict[str, Any]:
        """The ``<model>_input`` object, every documented limit checked."""
        text = require_prompt(self.name, prompt)
        low, high = PROMPT_LENGTH
        if not low <= len(text) <= high:
            raise InvalidRequestError(f"dh3: prompt must be {low}-{high} characters, got {len(text)}")
        fields: dict[str, Any] = {"prompt": text}
        for key, value in params.items():
            if value is not None:
                fields[key] = value
        urls = fields.get("image_urls")
        if urls is not None:
            if not isinstance(urls, list | tuple) or not all(isinstance(url, str) for url in urls):
                raise InvalidRequestError("dh3: image_urls must be a list of URL strings")
            if len(urls) > MAX_IMAGE_URLS:
                raise InvalidRequestError(f"dh3: at most {MAX_IMAGE_URLS} image_urls, got {len(urls)}")
            fields["image_urls"] = list(urls)
        self._check_choice(fields, "aspect_ratio", ASPECT_RATIOS)
        if isinstance(fields.get("resolution"), str):
            fields["resolution"] = fields["resolution"].upper()
        self._check_choice(fields, "resolution", RESOLUTIONS)
        self._check_choice(fields, "output_format", OUTPUT_FORMATS)
        return fields

    @staticmethod
    def _check_choice(fields: Mapping[str, Any], key: str, allowed: tuple[str, ...]) -> None:
        if key in fields and fields[key] not in allowed:
            raise InvalidRequestError(f"dh3: {key} must be one of {', '.join(allowed)}; got {fields[key]!r}")

    def read_submit(self, model: str, body: Any) -> Snapshot:
        created = structure(body, Dh3Created, provider=self.name)
        return Snapshot(created.task_id, TaskStatus.QUEUED)

    def poll_request(self, task_id: str, model: str) -> HttpRequest:
        return HttpRequest("GET", "/api/v1/task/get", {"task_id": task_id})

    def read_poll(self, task_id: str, model: str, body: Any) -> Snapshot:
        key = self._output_key(model, body)
        output = structure(body.get(key), Dh3Output, provider=self.name, path=f"$.{key}")
        images = tuple(
            Output(
                url=image.url,
                content_type=_text(image.content_type),
                width=whole_number(image.width),
                height=whole_number(image.height),
                file_name=_text(image.file_name),
                file_size=whole_number(image.file_size),
            )
            for image in output.images or ()
        )
        return self.snapshot(
            task_id=output.task_id or task_id,
            model=model,
            status=output.status,
            raw=body,
            outputs=images,
            error=_text(output.err_msg),
        )

    def _output_key(self, model: str, body: Any) -> str:
        """The documented ``<model>_output`` key, or the only ``*_output`` object present."""
        expected = model_key(model, "output")
        if isinstance(body, Mapping):
            if isinstance(body.get(expected), Mapping):
                return expected
            found = [str(k) for k, v in body.items() if str(k).endswith("_output") and isinstance(v, Mapping)]
            if len(found) == 1:
                return found[0]
        raise ProtocolError(f"dh3: required field missing @ $.{expected}", field=f"$.{expected}")

    def error_of(self, http_status: int, body: Any) -> ErrorReport | None:
        fields = body if isinstance(body, Mapping) else {}
        code = fields.get("code")
        # No code at all is a shape problem, reported as such by the reader.
        if http_status < 400 and success_code(code) is not False:
            return None
        return error_report(
            http_status, code, fields.get("message") or fields.get("msg") or fields.get("error")
        )


def _text(value: Any) -> str | None:
    """An informational string field; anything else (or empty) is None."""
    return value if isinstance(value, str) and value else None
