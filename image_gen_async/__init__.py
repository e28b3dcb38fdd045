"""image_gen_async: an asyncio-native client for hosted image-generation APIs.

Get3W (v1 and v3), dh3 and nananobanana behind one ``AsyncSession``: shared
connection pool, create-rate limits per provider and key, retries that never pay
twice, and polling seeded from the provider's estimate and learned from finished jobs.
"""

from ._backend import LimiterBackend, LocalBackend, WebhookRelay
from ._engine import EngineSettings
from ._handle import TaskHandle
from ._polling import PollSettings
from ._ratelimit import Limiter, RateLimiter
from ._redis import RedisBackend
from ._session import AsyncSession, ProviderClient
from .errors import (
    AdmissionTimeoutError,
    APIError,
    AuthenticationError,
    BackendUnavailableError,
    BadRequestError,
    ConfigurationError,
    ContentPolicyError,
    DownloadError,
    ImageGenError,
    InvalidRequestError,
    NotFoundError,
    NotSupportedError,
    PaymentRequiredError,
    PermissionDeniedError,
    ProtocolError,
    RateLimitError,
    ServerError,
    SessionClosedError,
    SubmitUncertainError,
    TaskFailedError,
    TaskTimeoutError,
    TransportError,
)
from .models import ModelInfo, Output, TaskResult, TaskStatus
from .router import LaneStats, Router, Target

__version__ = "0.1.0"

__all__ = [
    "APIError",
    "AdmissionTimeoutError",
    "AsyncSession",
    "AuthenticationError",
    "BackendUnavailableError",
    "BadRequestError",
    "ConfigurationError",
    "ContentPolicyError",
    "DownloadError",
    "EngineSettings",
    "ImageGenError",
    "InvalidRequestError",
    "LaneStats",
    "Limiter",
    "LimiterBackend",
    "LocalBackend",
    "ModelInfo",
    "NotFoundError",
    "NotSupportedError",
    "Output",
    "PaymentRequiredError",
    "PermissionDeniedError",
    "PollSettings",
    "ProtocolError",
    "ProviderClient",
    "RateLimitError",
    "RateLimiter",
    "RedisBackend",
    "Router",
    "ServerError",
    "SessionClosedError",
    "SubmitUncertainError",
    "Target",
    "TaskFailedError",
    "TaskHandle",
    "TaskResult",
    "TaskStatus",
    "TaskTimeoutError",
    "TransportError",
    "WebhookRelay",
    "__version__",
]
