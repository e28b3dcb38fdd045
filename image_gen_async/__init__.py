"""image_gen_async: an asyncio-native client for hosted image-generation APIs.

Get3W (v1 and v3), dh3 and nananobanana behind one ``AsyncSession``: shared
connection pool, create-rate limits per provider and key, retries that never pay
twice, and polling seeded from the provider's estimate and learned from finished jobs.
"""

from ._engine import EngineSettings
from ._handle import TaskHandle
from ._polling import PollSettings
from ._ratelimit import RateLimiter
from ._session import AsyncSession, ProviderClient
from .errors import (
    APIError,
    AuthenticationError,
    BadRequestError,
    ConfigurationError,
    ContentPolicyError,
    DownloadError,
    ImageGenError,
    InvalidRequestError,
    NotFoundError,
    PaymentRequiredError,
    PermissionDeniedError,
    ProtocolError,
    RateLimitError,
    ServerError,
    SubmitUncertainError,
    TaskFailedError,
    TaskTimeoutError,
    TransportError,
)
from .models import Output, TaskResult, TaskStatus

__version__ = "0.1.0"

__all__ = [
    "APIError",
    "AsyncSession",
    "AuthenticationError",
    "BadRequestError",
    "ConfigurationError",
    "ContentPolicyError",
    "DownloadError",
    "EngineSettings",
    "ImageGenError",
    "InvalidRequestError",
    "NotFoundError",
    "Output",
    "PaymentRequiredError",
    "PermissionDeniedError",
    "PollSettings",
    "ProtocolError",
    "ProviderClient",
    "RateLimitError",
    "RateLimiter",
    "ServerError",
    "SubmitUncertainError",
    "TaskFailedError",
    "TaskHandle",
    "TaskResult",
    "TaskStatus",
    "TaskTimeoutError",
    "TransportError",
    "__version__",
]
