"""``ArmorConfig``: the whole protection of an app, in Python or in an ``armor.toml``.

Every entry is a ``msgspec.Struct``, so a TOML file is decoded and type-checked in one
step, and a mistake is reported with the path of the entry at fault
(``rate_limit[2].rate: '10/minuet' is not a rate``). Durations are seconds, or text such
as ``"500ms"``, ``"30s"``, ``"5m"``, ``"24h"``, ``"7d"``. Secrets never live in the file:
signature entries name the environment variables that hold them.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any, Literal

import msgspec

from asgi_armor.errors import ConfigError

__all__ = [
    "ArmorConfig",
    "Duration",
    "IdempotencyEntry",
    "LimitsConfig",
    "MetricsEntry",
    "RateLimitEntry",
    "SheddingConfig",
    "SignatureEntry",
    "TimeoutEntry",
    "parse_duration",
]


class Duration(float):
    """Seconds; in TOML also ``"500ms"``, ``"30s"``, ``"5m"``, ``"24h"``, ``"7d"``."""


_DURATION = re.compile(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}


def parse_duration(value: str | float) -> Duration:
    """Seconds from a number or a text like ``"24h"``.

    Raises:
        ValueError: not a non-negative duration.
    """
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a duration")
    if isinstance(value, int | float):
        seconds = float(value)
    else:
        found = _DURATION.fullmatch(value)
        if found is None:
            raise ValueError(
                f"{value!r} is not a duration (use e.g. 30, '500ms', '30s', '5m', '24h')"
            )
        seconds = float(found.group(1)) * _UNITS[found.group(2)]
    if not 0 <= seconds < float("inf"):
        raise ValueError(f"{value!r} is not a non-negative duration")
    return Duration(seconds)


def _dec_hook(kind: type, value: Any) -> Any:
    if kind is Duration:
        return parse_duration(value)
    raise NotImplementedError


class _Entry(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    pass


class LimitsConfig(_Entry):
    """``[limits]``: sizes checked before the app runs (``InputLimits``)."""

    max_body_bytes: int = 1_048_576
    max_url_bytes: int = 8192
    max_headers: int = 100
    max_header_bytes: int = 16384
    json_routes: list[str] = msgspec.field(default_factory=list)
    body_timeout: Duration | None = None


class SheddingConfig(_Entry):
    """``[shedding]``: at most ``max_concurrent`` requests run (``ConcurrencyLimit``)."""

    max_concurrent: int
    max_queue: int = 0
    queue_timeout: Duration = Duration(1.0)
    retry_after: Duration = Duration(1.0)
    exempt: list[str] = msgspec.field(default_factory=lambda: ["GET /healthz"])


class RateLimitEntry(_Entry):
    """``[[rate_limit]]``: one layer: ``rate`` per ``key`` on ``route``.

    ``count = "failures"`` takes a token only for answers >= 400 (an empty bucket still
    refuses); ``shadow = true`` decides and sends the headers but never refuses.
    """

    route: str
    rate: str
    key: str = "ip"
    name: str | None = None
    cost: int = 1
    count: Literal["requests", "failures"] = "requests"
    shadow: bool = False


class IdempotencyEntry(_Entry):
    """``[[idempotency]]``: a route where ``Idempotency-Key`` makes retries safe.

    ``max_body_bytes`` defaults to ``[limits] max_body_bytes``; ``max_response_bytes`` (the
    largest response stored for replay) to 1 MiB.
    """

    route: str
    ttl: Duration = Duration(86400.0)
    required: bool = True
    lock_ttl: Duration = Duration(60.0)
    max_body_bytes: int | None = None
    max_response_bytes: int | None = None


class TimeoutEntry(_Entry):
    """``[[timeout]]``: the time budget of a route."""

    route: str
    seconds: Duration


class SignatureEntry(_Entry):
    """``[[signature]]``: a route whose requests must be signed.

    ``secret_env`` (and ``secrets_env``, for rotation) name environment variables; a
    missing or empty one fails start-up rather than verifying nothing.
    """

    route: str
    scheme: Literal["hex-hmac", "standard-webhooks", "stripe", "github"] = "hex-hmac"
    secret_env: str | None = None
    secrets_env: list[str] = msgspec.field(default_factory=list)
    header: str | None = None
    tolerance: Duration = Duration(300.0)
    replay_protection: bool = True


class MetricsEntry(_Entry):
    """``[metrics]``: count every decision (docs/observability.md).

    ``exporter`` is ``"prometheus"`` (extra ``prometheus``) or ``"otel"`` (extra
    ``otel``). ``routes`` are extra route patterns for the ``http_route`` label, besides
    those the other entries name; a request matching none is labelled ``"other"``.
    ``path`` (Prometheus only, e.g. ``"/metrics"``) serves the scrape endpoint from the
    armored app itself, before every protection (``asgi-armor run`` has no other way).
    """

    exporter: Literal["prometheus", "otel"]
    routes: list[str] = msgspec.field(default_factory=list)
    path: str | None = None


class ArmorConfig(_Entry):
    """Everything ``armor(app, config)`` builds; every part is optional.

    Build it in Python (``ArmorConfig(rate_limit=[RateLimitEntry(route=..., rate=...)])``)
    or load it with ``ArmorConfig.from_toml("armor.toml")``. ``identify`` is the import
    path (``"myapp.auth:identify"``) of the hook naming the caller, for per-user limits.
    ``ipv6_prefix`` is the network size (1..128) rate limits count an IPv6 client by.
    ``rate_limit_headers`` chooses the rate-limit fields responses carry: ``"all"``,
    ``"ietf"`` (``RateLimit``, ``RateLimit-Policy``), ``"legacy"`` (``X-RateLimit-*``) or
    ``"none"`` (``Retry-After`` on a 429 alone).
    """

    store: str = "memory"
    store_prefix: str = "armor:"
    store_timeout: Duration = Duration(0.5)
    trusted_proxies: list[str] = msgspec.field(default_factory=list)
    forwarded_header: Literal["x-forwarded-for", "forwarded"] = "x-forwarded-for"
    ipv6_prefix: int = 64
    identify: str | None = None
    error_format: Literal["json", "problem"] = "json"
    limits: LimitsConfig | None = msgspec.field(default_factory=LimitsConfig)
    shedding: SheddingConfig | None = None
    rate_limit: list[RateLimitEntry] = msgspec.field(default_factory=list)
    rate_limit_exempt: list[str] = msgspec.field(default_factory=list)
    rate_limit_on_store_error: Literal["allow", "deny"] = "allow"
    rate_limit_headers: Literal["all", "ietf", "legacy", "none"] = "all"
    idempotency: list[IdempotencyEntry] = msgspec.field(default_factory=list)
    idempotency_on_store_error: Literal["allow", "deny"] = "deny"
    idempotency_max_pending: int = 10_000
    idempotency_max_pending_bytes: int = 64 * 1_048_576
    timeout: list[TimeoutEntry] = msgspec.field(default_factory=list)
    default_timeout: Duration | None = None
    signature: list[SignatureEntry] = msgspec.field(default_factory=list)
    signature_on_store_error: Literal["allow", "deny"] = "deny"
    metrics: MetricsEntry | None = None

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str = "config") -> ArmorConfig:
        """Decode and type-check a mapping (as read from TOML).

        Raises:
            ConfigError: naming the entry at fault.
        """
        try:
            return msgspec.convert(data, cls, dec_hook=_dec_hook)
        except msgspec.ValidationError as exc:
            raise ConfigError(_located(str(exc), source)) from None

    @classmethod
    def from_toml(cls, path: str | Path) -> ArmorConfig:
        """Load an ``armor.toml``.

        Raises:
            ConfigError: unreadable file, bad TOML, or an entry at fault (named).
        """
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read ({exc.strerror})") from None
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: not valid TOML: {exc}") from None
        return cls.from_dict(data, source=str(path))

    def with_store(self, store: str) -> ArmorConfig:
        """A copy using another store (``"memory"`` or a Redis URL)."""
        return msgspec.structs.replace(self, store=store)


_AT = re.compile(r"^(?P<message>.*?)(?: - at `\$(?P<path>[^`]*)`)?$", re.DOTALL)


def _located(message: str, source: str) -> str:
    """``"Expected int - at `$.limits.max_headers`"`` -> ``"limits.max_headers: Expected int"``."""
    found = _AT.match(message)
    if found is None:
        return f"{source}: {message}"
    path = (found.group("path") or "").lstrip(".")
    if message.startswith("Object contains unknown field"):
        field = message.split("`")[1]
        path = f"{path}.{field}" if path else field
        return f"{source}: {path}: unknown setting"
    return (
        f"{source}: {path}: {found.group('message')}"
        if path
        else f"{source}: {found.group('message')}"
    )
