"""The error tree: everything the library raises is an ``ImageGenError``.

Messages never carry an API key: they are built from status codes, provider
messages and task ids only.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .models import TaskResult


class ImageGenError(Exception):
    """Base class of every error raised by image_gen_async."""


class ConfigurationError(ImageGenError):
    """The session or a client is set up wrongly (missing key, unknown client, closed session)."""


class SessionClosedError(ConfigurationError):
    """The session was closed: nothing more is sent. A task already accepted may still finish
    at the provider (``client.resume()`` picks it up); a create not yet sent was not made."""


class NotSupportedError(ImageGenError):
    """The provider's API has no such call (e.g. ``credits()`` on dh3): nothing was sent."""


class BackendUnavailableError(ImageGenError):
    """The shared backend (Redis) could not be reached, so nothing was sent: never unlimited."""


class InvalidRequestError(ImageGenError, ValueError):
    """A request breaks a documented limit; raised before anything is sent."""


class ProtocolError(ImageGenError):
    """A response did not have the documented shape; ``field`` names where it broke."""

    def __init__(self, message: str, *, field: str | None = None, transient: bool = False) -> None:
        super().__init__(message)
        self.field = field
        # A body that was not JSON at all (a proxy's HTML page) is worth retrying on a poll;
        # JSON of the wrong shape is not.
        self.transient = transient


class TransportError(ImageGenError):
    """No usable answer came back (connection refused or dropped, timeout) after the retries."""

    def __init__(self, message: str, *, transient: bool = True) -> None:
        super().__init__(message)
        # A refused or dropped connection may work next time; a TLS certificate problem will not.
        self.transient = transient


class APIError(ImageGenError):
    """The provider answered with an error: HTTP status, the provider's code and message."""

    def __init__(
        self,
        status: int,
        code: Any = None,
        message: str = "",
        *,
        provider: str = "",
        retry_after: float | None = None,
    ) -> None:
        self.status = status
        self.code = code
        self.message = message
        self.provider = provider
        # The server's Retry-After in seconds, where it gave one (429s and 5xx mostly).
        self.retry_after = retry_after
        where = f"{provider}: " if provider else ""
        super().__init__(f"{where}HTTP {status} (code {code!r}): {message}")


class BadRequestError(APIError):
    """400: the provider rejected the parameters."""


class AuthenticationError(APIError):
    """401: missing, malformed or revoked API key."""


class PaymentRequiredError(APIError):
    """402: not enough credits (nananobanana)."""


class PermissionDeniedError(APIError):
    """403: account issue (insufficient balance, API access not enabled)."""


class NotFoundError(APIError):
    """404: unknown task or route."""


class RateLimitError(APIError):
    """429: over the provider's limit; ``retry_after`` is the server's advice in seconds."""


class ServerError(APIError):
    """5xx: the provider failed; ``retry_after`` is set when the server gave one."""


class SubmitUncertainError(ImageGenError):
    """The create request may have reached the provider but no clear answer came back.

    Never retried on its own: retrying could pay twice. ``task_id`` is set when the
    answer carried one; ``request_body`` is what was sent (without credentials).
    """

    def __init__(
        self,
        message: str,
        *,
        provider: str,
        model: str,
        task_id: str | None = None,
        request_body: Any = None,
    ) -> None:
        super().__init__(f"{provider}: {message}")
        self.provider = provider
        self.model = model
        self.task_id = task_id
        self.request_body = request_body


class TaskFailedError(ImageGenError):
    """The provider ran the task and it failed; ``result`` holds everything it said."""

    def __init__(self, result: TaskResult) -> None:
        self.result = result
        super().__init__(f"{result.provider} task {result.task_id} failed: {result.error}")


class ContentPolicyError(TaskFailedError):
    """The task was stopped by the provider's content-safety check."""


class DownloadError(ImageGenError):
    """An output file could not be saved: a refused URL (not http(s)), an error status,
    or a body over the size cap. Nothing is left on disk when it is raised."""


class AdmissionTimeoutError(ImageGenError, TimeoutError):
    """No capacity for this provider key came free within the job's deadline: nothing was sent."""


class TaskTimeoutError(ImageGenError, TimeoutError):
    """The handle's deadline passed before the task finished; polling has stopped."""

    def __init__(self, message: str, *, task_id: str, provider: str) -> None:
        super().__init__(message)
        self.task_id = task_id
        self.provider = provider


_BY_STATUS: dict[int, type[APIError]] = {
    400: BadRequestError,
    401: AuthenticationError,
    402: PaymentRequiredError,
    403: PermissionDeniedError,
    404: NotFoundError,
    422: BadRequestError,
}


def api_error(
    status: int,
    code: Any = None,
    message: str = "",
    *,
    provider: str = "",
    retry_after: float | None = None,
) -> APIError:
    """Build the right ``APIError`` subclass for an HTTP (or HTTP-like) status."""
    kind = (
        RateLimitError
        if status == 429
        else ServerError
        if status >= 500
        else _BY_STATUS.get(status, APIError)
    )
    return kind(status, code, message, provider=provider, retry_after=retry_after)
