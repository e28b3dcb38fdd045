"""What every provider codec is: pure translation between calls and HTTP, no I/O.

A codec builds ``HttpRequest`` values and reads decoded JSON back into
``Snapshot`` values. The engine does the sending, the waiting and the retrying.
"""

from __future__ import annotations

import abc
import math
import re
from collections.abc import Mapping
from typing import Any, ClassVar

import attrs

from ..errors import InvalidRequestError
from ..models import ModelInfo, Output, TaskResult, TaskStatus


@attrs.frozen
class HttpRequest:
    """One HTTP call to the provider's configured origin; ``path`` starts with ``/``."""

    method: str
    path: str
    # Out of the repr: a query or body can carry a callback URL, and with it the webhook token.
    params: Mapping[str, str] = attrs.field(factory=dict, repr=False)
    json: Any = attrs.field(default=None, repr=False)
    # The Accept header, where not JSON (a stream create asks for text/event-stream).
    accept: str | None = None


@attrs.frozen
class Snapshot:
    """What one answer says about a task; ``result`` is set once it is terminal."""

    task_id: str
    status: TaskStatus
    result: TaskResult | None = None
    estimated_duration: float | None = None
    poll_url: str | None = None
    # A status word no table knows, taken as still running (the follower warns once per job).
    unknown_status: str | None = None
    # The account's balance after this create, and what it cost, where the provider says.
    remaining_credits: float | None = None
    credits_used: float | None = None
    # How far along the job is (0-100) and what it is doing, where the provider says (a stream).
    progress: float | None = None
    message: str | None = None
    # The task id is ours, not the provider's: a stream that has not named its task yet.
    # Such a task cannot be polled; a later event that names it gives the real id.
    provisional: bool = False


@attrs.frozen
class Refusal:
    """A 429/503 that names no task: nothing was made. ``capacity``: too many tasks at once
    (else too many requests); ``active``: the key's running tasks, when the server says."""

    capacity: bool
    active: int | None = None


@attrs.frozen
class ErrorReport:
    """An answer that is an error: the HTTP-like status to classify by, the code and text."""

    status: int
    code: Any
    message: str


# Words seen across providers and their look-alike deployments; each codec adds its own
# documented words on top, so an independent server's reasonable synonym still parses.
COMMON_STATUS_WORDS: Mapping[str, TaskStatus] = {
    **dict.fromkeys(
        ("created", "queued", "queuing", "queueing", "pending", "waiting", "starting", "submitted"),
        TaskStatus.QUEUED,
    ),
    **dict.fromkeys(("processing", "running", "in_progress", "generating"), TaskStatus.PROCESSING),
    **dict.fromkeys(
        ("completed", "complete", "succeeded", "success", "done", "finished"), TaskStatus.COMPLETED
    ),
    **dict.fromkeys(
        ("failed", "fail", "failure", "error", "canceled", "cancelled", "timeout"),
        TaskStatus.FAILED,
    ),
}

_ACCOUNT_WORDS = re.compile(
    r"balance|credit|fund|access|enabled|activat|suspend|disabled|blocked|quota|payment|billing|"
    r"account|api.?key|revoked|top.?up",
    re.IGNORECASE,
)
_CAPACITY_WORDS = re.compile(r"concurren|busy|active tasks|too many tasks|parallel", re.IGNORECASE)
_RATE_LIMIT_WORDS = re.compile(r"rate.?limit|\bqps\b|too many requests|too frequent|throttl", re.IGNORECASE)
_CONTENT_POLICY_WORDS = re.compile(
    r"safety|nsfw|content.?(polic|filter)|moderation|inappropriate|sensitive|blocked", re.IGNORECASE
)


def looks_like_content_policy(message: str | None) -> bool:
    """True when a failure message says the content-safety check stopped the task."""
    return bool(message) and bool(_CONTENT_POLICY_WORDS.search(message or ""))


def error_report(http_status: int, code: Any, message: Any) -> ErrorReport:
    """Choose the status an error is classified by: an HTTP-like ``code`` wins over HTTP 200.

    Servers that put errors in the body under HTTP 200 (dh3) get the code's class; a
    rate-limit message with an odd code still counts as 429, so it is retried.
    """
    text = message if isinstance(message, str) else ("" if message is None else str(message)[:500])
    numeric = code_number(code)
    if numeric is not None and 400 <= numeric <= 599:
        status = numeric
    elif http_status >= 400:
        status = http_status
    else:
        status = 400
    # Wording decides only between client errors: a 5xx stays a 5xx (it may have made a task).
    if 400 <= status < 500 and _RATE_LIMIT_WORDS.search(text):
        status = 429
    return ErrorReport(status, code, text)


_CODE_DIGITS = re.compile(r"-?[0-9]{1,9}")


def code_number(code: Any) -> int | None:
    """A JSON ``code`` as a whole number: an int, or its ASCII digits (``"500"``); else None."""
    if isinstance(code, bool):
        return None
    if isinstance(code, int):
        return code
    if isinstance(code, str) and _CODE_DIGITS.fullmatch(code.strip()):
        return int(code.strip())
    return None


def success_code(code: Any) -> bool | None:
    """Whether a JSON ``code`` says success: 0 or any 2xx, as a number or its digits; None if absent."""
    if code is None:
        return None
    numeric = code_number(code)
    return numeric is not None and (numeric == 0 or 200 <= numeric < 300)


def number(value: Any) -> float | None:
    """A number from an informational field (a number or its digits); anything else is None.

    Such fields (timings, sizes, estimates) are read best-effort: an odd value there must
    not fail a task that finished.
    """
    if isinstance(value, bool):
        return None
    try:
        if isinstance(value, int | float):
            parsed = float(value)  # an int of 400 digits overflows a float
        elif isinstance(value, str) and len(value) <= 64:
            parsed = float(value)
        else:
            return None
    except (ValueError, OverflowError):
        return None
    return parsed if math.isfinite(parsed) else None


def whole_number(value: Any) -> int | None:
    """A whole number from an informational field, else None (``"2456789"`` -> 2456789)."""
    parsed = number(value)
    return int(parsed) if parsed is not None and parsed.is_integer() and parsed >= 0 else None


def timings(value: Any) -> dict[str, float | None] | None:
    """A provider's timings object, keeping whatever is numeric."""
    if not isinstance(value, Mapping):
        return None
    return {str(key): number(item) for key, item in value.items()}


class Codec(abc.ABC):
    """One provider API: URLs, field names, status words and error bodies."""

    name: ClassVar[str]
    default_base_url: ClassVar[str]
    env_var: ClassVar[str]
    # A model id this API documents, for examples, the demo and tests.
    example_model: ClassVar[str]
    default_rate_limit: ClassVar[float | None] = None
    has_sync_mode: ClassVar[bool] = False
    # A create whose answer is a stream of events until the job ends (``stream_request``).
    has_stream_mode: ClassVar[bool] = False
    has_webhooks: ClassVar[bool] = True
    # The header carrying a hex HMAC-SHA256 of the raw callback body, where the provider signs.
    signature_header: ClassVar[str | None] = None
    status_words: ClassVar[Mapping[str, TaskStatus]] = {}
    # Create-body fields that carry a callback URL, whose last segment (the token) is redacted
    # wherever the body is reported.
    callback_fields: ClassVar[frozenset[str]] = frozenset()

    @abc.abstractmethod
    def submit_request(
        self,
        model: str,
        prompt: str,
        params: Mapping[str, Any],
        *,
        webhook_url: str | None,
        sync: bool,
    ) -> HttpRequest:
        """The create call; raises ``InvalidRequestError`` for a documented limit broken."""

    @abc.abstractmethod
    def read_submit(self, model: str, body: Any) -> Snapshot:
        """Read a successful create answer (async: accepted; sync: usually finished)."""

    @abc.abstractmethod
    def poll_request(self, task_id: str, model: str) -> HttpRequest:
        """The status call for a task."""

    @abc.abstractmethod
    def read_poll(self, task_id: str, model: str, body: Any) -> Snapshot:
        """Read a successful status answer."""

    @abc.abstractmethod
    def error_of(self, http_status: int, body: Any) -> ErrorReport | None:
        """The error an answer carries, or None; JSON-level failures count under HTTP 200."""

    def refusal_of(self, report: ErrorReport, body: Any) -> Refusal:
        """What a 429/503 naming no task refuses: capacity when its words say tasks at once.

        A bare 503 (a proxy's page, a passing outage) is waited out like a rate: it says
        nothing about the account's cap, so it must not shrink the window.
        """
        return Refusal(bool(_CAPACITY_WORDS.search(report.message)))

    def stops_account(self, report: ErrorReport) -> bool:
        """Whether an error says the account cannot work now (every job would get it).

        401 (the key) and 402 (credits) always; a 403 when its words are about the account
        (balance, credits, access, activation), or say nothing: a 403 about one model or
        plan ("requires a Pro plan") is that job's.
        """
        if report.status in (401, 402):
            return True
        if report.status != 403:
            return False
        return not report.message.strip() or bool(_ACCOUNT_WORDS.search(report.message))

    def task_id_of(self, body: Any, depth: int = 3) -> str | None:
        """Best-effort task id in an answer or callback: top level, ``data`` or a ``*_output``.

        Looks ``depth`` levels down at most: a hostile answer can nest ``data`` a thousand deep.
        A number is taken as its digits: the documents say text, but a server that answers
        ``12345`` has still named the task, and a paid task must not go unnamed.
        """
        if isinstance(body, Mapping) and depth > 0:
            for key in ("id", "task_id", "generationId"):
                value = body.get(key)
                if isinstance(value, str) and value:
                    return value
                if isinstance(value, int) and not isinstance(value, bool):
                    return str(value)
            for key, value in body.items():
                if (key == "data" or str(key).endswith("_output")) and isinstance(value, Mapping):
                    found = self.task_id_of(value, depth - 1)
                    if found:
                        return found
        return None

    def stream_request(self, model: str, prompt: str, params: Mapping[str, Any]) -> HttpRequest | None:
        """The create whose answer streams the job's events; None where the API has none."""
        return None

    def read_stream_event(self, model: str, body: Any, task_id: str | None) -> Snapshot:
        """Read one stream event; an event naming no task is about ``task_id`` (the stream's),
        or, when that is None (the first event), about a provisional id of our own."""
        raise NotImplementedError

    def cancel_request(self, task_id: str) -> HttpRequest | None:
        """The call that cancels a task at the provider; None where the API has none."""
        return None

    def cancel_error_of(self, http_status: int, body: Any) -> ErrorReport | None:
        """The error a cancel's answer carries, or None (by default, read as any answer)."""
        return self.error_of(http_status, body)

    def credits_request(self) -> HttpRequest | None:
        """The call that reads the account's balance; None where the API has none."""
        return None

    def read_credits(self, body: Any) -> float:
        """The balance from the answer to ``credits_request()``."""
        raise NotImplementedError

    def models_request(self) -> HttpRequest | None:
        """The call that lists the models; None where the API has none."""
        return None

    def read_models(self, body: Any) -> tuple[ModelInfo, ...]:
        """The models from the answer to ``models_request()``."""
        raise NotImplementedError

    def read_callback(self, task_id: str, model: str, body: Any) -> Snapshot:
        """Read a webhook body; by default it has the shape of a status answer."""
        return self.read_poll(task_id, model, body)

    def content_policy(self, result: TaskResult) -> bool:
        """True when a failed task was stopped by the content-safety check."""
        return looks_like_content_policy(result.error)

    # Shared helpers for the concrete codecs.

    def status_of(self, word: str) -> TaskStatus | None:
        """A provider status word's ``TaskStatus``; None for a word no table knows."""
        key = word.strip().lower()
        return self.status_words.get(key) or COMMON_STATUS_WORDS.get(key)

    def snapshot(
        self,
        *,
        task_id: str,
        model: str,
        status: TaskStatus | str,
        raw: Any,
        outputs: tuple[Output, ...] = (),
        error: str | None = None,
        timings: Mapping[str, float | None] | None = None,
        estimated_duration: float | None = None,
        poll_url: str | None = None,
        credits_used: float | None = None,
        remaining_credits: float | None = None,
    ) -> Snapshot:
        """A snapshot, with its ``TaskResult`` filled in once the status is terminal.

        ``status`` may be the provider's word: an unknown one (a new stage such as
        "uploading") is taken as still running, since failing a paid task over a word would be
        worse than one more poll, and is kept in ``unknown_status`` for a warning.
        """
        unknown = None
        if isinstance(status, str):
            mapped = self.status_of(status)
            if mapped is None:
                unknown, mapped = status, TaskStatus.PROCESSING
            status = mapped
        result = None
        if status.terminal:
            if status is TaskStatus.FAILED and not error:
                error = "task failed (the provider gave no reason)"
            result = TaskResult(
                task_id=task_id,
                provider=self.name,
                model=model,
                status=status,
                outputs=outputs if status is TaskStatus.COMPLETED else (),
                error=error if status is TaskStatus.FAILED else None,
                timings=timings,
                raw=raw,
                credits_used=credits_used,
            )
        return Snapshot(
            task_id, status, result, estimated_duration, poll_url, unknown, remaining_credits, credits_used
        )


def require_prompt(provider: str, prompt: object) -> str:
    """The prompt must be a non-blank string for every provider."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise InvalidRequestError(f"{provider}: prompt must be a non-empty string")
    return prompt


def merge_params(provider: str, params: Mapping[str, Any], aliases: Mapping[str, str]) -> dict[str, Any]:
    """Rename the library's common parameter names to the provider's own wire names.

    Passing both spellings of one parameter is refused rather than guessed.
    """
    merged: dict[str, Any] = {}
    for key, value in params.items():
        if value is None:
            continue
        wire = aliases.get(key, key)
        if wire in merged:
            raise InvalidRequestError(f"{provider}: parameter {wire!r} given twice (as {key!r})")
        merged[wire] = value
    return merged


def urls_as_outputs(urls: list[str] | None) -> tuple[Output, ...]:
    """Outputs known only by URL."""
    return tuple(Output(url=url) for url in urls or ())
