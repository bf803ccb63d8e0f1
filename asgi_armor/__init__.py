"""asgi_armor: make any ASGI API survive contact with the real world.

Every protection is a plain ASGI middleware and a primitive usable without ASGI;
``armor(app, config)`` composes them in the canonical order.
"""

from __future__ import annotations

from asgi_armor.breaker import BreakerState, BreakerStats, CircuitBreaker
from asgi_armor.clientip import ClientIP
from asgi_armor.config import (
    ArmorConfig,
    IdempotencyEntry,
    LimitsConfig,
    MetricsEntry,
    RateLimitEntry,
    SheddingConfig,
    SignatureEntry,
    TimeoutEntry,
)
from asgi_armor.degrade import ComponentError, Partial, gather_partial
from asgi_armor.errors import (
    ArmorError,
    CircuitOpenError,
    ConfigError,
    ErrorDetail,
    ErrorMiddleware,
    ErrorResponse,
    HeadersTooLarge,
    HTTPError,
    IdempotencyKeyInUse,
    IdempotencyKeyInvalid,
    IdempotencyKeyMissing,
    IdempotencyKeyReused,
    InternalError,
    InvalidJSON,
    InvalidSignature,
    MethodNotAllowed,
    NotFound,
    Overloaded,
    PayloadTooLarge,
    RateLimited,
    RequestTimeout,
    ServiceUnavailable,
    Unauthorized,
    UnsupportedMediaType,
    URITooLong,
    ValidationFailed,
)
from asgi_armor.idempotency import IdempotencyMiddleware, IdempotencyOptions
from asgi_armor.metrics import Metrics, OtelMetrics, PrometheusMetrics
from asgi_armor.protect import protect
from asgi_armor.ratelimit import Decision, Rate, RateLimiter, RateLimitMiddleware, Rule
from asgi_armor.routes import Route, RouteMap
from asgi_armor.shedding import ConcurrencyLimit, ConcurrencyLimiter
from asgi_armor.signing import (
    GitHub,
    HexHmac,
    SignatureMiddleware,
    SignedRoute,
    StandardWebhooks,
    Stripe,
    VerifiedMessage,
    sign,
    verify,
)
from asgi_armor.stack import Armored, armor
from asgi_armor.stores.base import StoreError
from asgi_armor.stores.cluster import RedisClusterStore
from asgi_armor.stores.memory import MemoryStore
from asgi_armor.stores.redis import RedisStore
from asgi_armor.stores.sentinel import RedisSentinelStore
from asgi_armor.timeout import TimeoutMiddleware, remaining, with_timeout
from asgi_armor.validation import (
    Email,
    Float,
    InputLimits,
    Int,
    Name,
    Normalize,
    Text,
    decode,
    decode_query,
)

__version__ = "0.1.0"

__all__ = [
    "ArmorConfig",
    "ArmorError",
    "Armored",
    "BreakerState",
    "BreakerStats",
    "CircuitBreaker",
    "CircuitOpenError",
    "ClientIP",
    "ComponentError",
    "ConcurrencyLimit",
    "ConcurrencyLimiter",
    "ConfigError",
    "Decision",
    "Email",
    "ErrorDetail",
    "ErrorMiddleware",
    "ErrorResponse",
    "Float",
    "GitHub",
    "HTTPError",
    "HeadersTooLarge",
    "HexHmac",
    "IdempotencyEntry",
    "IdempotencyKeyInUse",
    "IdempotencyKeyInvalid",
    "IdempotencyKeyMissing",
    "IdempotencyKeyReused",
    "IdempotencyMiddleware",
    "IdempotencyOptions",
    "InputLimits",
    "Int",
    "InternalError",
    "InvalidJSON",
    "InvalidSignature",
    "LimitsConfig",
    "MemoryStore",
    "MethodNotAllowed",
    "Metrics",
    "MetricsEntry",
    "Name",
    "Normalize",
    "NotFound",
    "OtelMetrics",
    "Overloaded",
    "Partial",
    "PayloadTooLarge",
    "PrometheusMetrics",
    "Rate",
    "RateLimitEntry",
    "RateLimitMiddleware",
    "RateLimited",
    "RateLimiter",
    "RedisClusterStore",
    "RedisSentinelStore",
    "RedisStore",
    "RequestTimeout",
    "Route",
    "RouteMap",
    "Rule",
    "ServiceUnavailable",
    "SheddingConfig",
    "SignatureEntry",
    "SignatureMiddleware",
    "SignedRoute",
    "StandardWebhooks",
    "StoreError",
    "Stripe",
    "Text",
    "TimeoutEntry",
    "TimeoutMiddleware",
    "URITooLong",
    "Unauthorized",
    "UnsupportedMediaType",
    "ValidationFailed",
    "VerifiedMessage",
    "__version__",
    "armor",
    "decode",
    "decode_query",
    "gather_partial",
    "protect",
    "remaining",
    "sign",
    "verify",
    "with_timeout",
]
