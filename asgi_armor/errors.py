"""One JSON error envelope for every failure, with a request id, and nothing leaked.

``ArmorError`` subclasses carry an HTTP status, a stable snake_case ``error`` type, a
human message, field-level details and extra headers. ``ErrorMiddleware`` gives every
request an id, renders any ``ArmorError`` raised below it, and turns anything else into a
logged, opaque ``500 internal_error``.
"""

from __future__ import annotations

import logging
import math
import os
import random
import re
import secrets
from collections.abc import Mapping, Sequence
from contextvars import ContextVar
from http import HTTPStatus
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import msgspec

if TYPE_CHECKING:
    from asgi_armor._types import ASGIApp, Message, Receive, Scope, Send
    from asgi_armor.metrics import Metrics

__all__ = [
    "STATE_ON_RESPONSE",
    "ArmorError",
    "CircuitOpenError",
    "ConfigError",
    "ErrorDetail",
    "ErrorFormat",
    "ErrorMiddleware",
    "ErrorResponse",
    "HTTPError",
    "HeadersTooLarge",
    "IdempotencyKeyInUse",
    "IdempotencyKeyInvalid",
    "IdempotencyKeyMissing",
    "IdempotencyKeyReused",
    "InternalError",
    "InvalidJSON",
    "InvalidSignature",
    "MethodNotAllowed",
    "NotFound",
    "Overloaded",
    "PayloadTooLarge",
    "ProblemDetails",
    "RateLimited",
    "RequestTimeout",
    "ServiceUnavailable",
    "URITooLong",
    "Unauthorized",
    "UnsupportedMediaType",
    "ValidationFailed",
    "armor_error_in",
    "current_request_id",
    "ensure_request_id",
    "log_unhandled",
    "render",
    "render_for",
    "send_error",
]

logger = logging.getLogger("asgi_armor")

ErrorFormat = Literal["json", "problem"]


class ErrorDetail(msgspec.Struct, frozen=True):
    """One precise problem: a machine code, a human message, and the field at fault (or None)."""

    code: str
    message: str
    field: str | None = None


class ErrorResponse(msgspec.Struct, frozen=True):
    """The envelope every error response carries."""

    error: str
    message: str
    details: Sequence[ErrorDetail] = ()
    request_id: str = ""


class ProblemDetails(msgspec.Struct, frozen=True):
    """The same data shaped as RFC 9457 ``application/problem+json``."""

    type: str
    title: str
    status: int
    error: str
    details: Sequence[ErrorDetail] = ()
    request_id: str = ""


class ConfigError(ValueError):
    """A configuration mistake found at start-up; the message names the entry at fault."""


def _retry_after_header(seconds: float) -> dict[str, str]:
    # Rounded up so that a client waiting exactly this long is let through.
    return {"Retry-After": str(max(0, math.ceil(seconds)))}


class ArmorError(Exception):
    """Base of every error asgi_armor renders as the envelope.

    Args:
        message: overrides the class's default human message.
        details: field-level problems, all of them.
        headers: extra response headers (``Retry-After``, rate-limit headers, ...).
    """

    status: ClassVar[int] = 500
    error: ClassVar[str] = "internal_error"
    default_message: ClassVar[str] = "An internal error occurred"
    #: The ``layer`` label this rejection is counted under (docs/observability.md).
    layer: ClassVar[str] = "error"

    def __init__(
        self,
        message: str | None = None,
        *,
        details: Sequence[ErrorDetail] = (),
        headers: Mapping[str, str] | None = None,
    ) -> None:
        self.message = message or self.default_message
        self.details = tuple(details)
        self.headers = dict(headers or {})
        super().__init__(self.message)

    def to_response(self, request_id: str) -> ErrorResponse:
        """The envelope for this error."""
        return ErrorResponse(self.error, self.message, self.details, request_id)


class ValidationFailed(ArmorError):
    """422: the request is well-formed but its fields are not acceptable."""

    status = 422
    error = "validation_error"
    default_message = "Invalid request parameters"
    layer = "input_limits"


class InvalidJSON(ArmorError):
    """400: the body is not parseable JSON."""

    status = 400
    error = "invalid_json"
    default_message = "Request body is not valid JSON"
    layer = "input_limits"


class PayloadTooLarge(ArmorError):
    """413: the body is larger than allowed."""

    status = 413
    error = "payload_too_large"
    default_message = "Request body is too large"
    layer = "input_limits"

    def __init__(self, message: str | None = None, *, max_bytes: int | None = None) -> None:
        if message is None and max_bytes is not None:
            message = f"Request body exceeds {max_bytes} bytes"
        super().__init__(message)


class URITooLong(ArmorError):
    """414: path and query are longer than allowed."""

    status = 414
    error = "uri_too_long"
    default_message = "Request URI is too long"
    layer = "input_limits"


class HeadersTooLarge(ArmorError):
    """431: too many headers, or too many header bytes."""

    status = 431
    error = "headers_too_large"
    default_message = "Request headers are too large"
    layer = "input_limits"


class UnsupportedMediaType(ArmorError):
    """415: the body's content type is not one this route accepts."""

    status = 415
    error = "unsupported_media_type"
    default_message = "Content-Type must be application/json"
    layer = "input_limits"


class RateLimited(ArmorError):
    """429: a rate limit is exhausted; ``retry_after`` seconds until the request would pass."""

    status = 429
    error = "rate_limited"
    default_message = "Rate limit exceeded"
    layer = "rate_limit"

    def __init__(
        self,
        retry_after: float,
        *,
        message: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        self.retry_after = retry_after
        super().__init__(message, headers={**(headers or {}), **_retry_after_header(retry_after)})


class IdempotencyKeyMissing(ArmorError):
    """400: this route requires an ``Idempotency-Key`` header."""

    status = 400
    error = "idempotency_key_missing"
    default_message = "This endpoint requires an Idempotency-Key header"
    layer = "idempotency"


class IdempotencyKeyInvalid(ArmorError):
    """400: the ``Idempotency-Key`` is empty, too long or not printable ASCII."""

    status = 400
    error = "idempotency_key_invalid"
    default_message = "Idempotency-Key must be 1 to 255 printable ASCII characters"
    layer = "idempotency"


class IdempotencyKeyInUse(ArmorError):
    """409: a request with this key is still being processed."""

    status = 409
    error = "idempotency_key_in_use"
    default_message = "A request with this Idempotency-Key is still being processed"
    layer = "idempotency"

    def __init__(self, retry_after: float = 1.0) -> None:
        self.retry_after = retry_after
        super().__init__(headers=_retry_after_header(retry_after))


class IdempotencyKeyReused(ArmorError):
    """422: this key was already used with a different request."""

    status = 422
    error = "idempotency_key_reused"
    default_message = "This Idempotency-Key was already used with a different request"
    layer = "idempotency"


class ServiceUnavailable(ArmorError):
    """503: a dependency is unavailable; retry later."""

    status = 503
    error = "service_unavailable"
    default_message = "Service temporarily unavailable"

    def __init__(self, message: str | None = None, *, retry_after: float | None = None) -> None:
        self.retry_after = retry_after
        headers = None if retry_after is None else _retry_after_header(retry_after)
        super().__init__(message, headers=headers)


class CircuitOpenError(ServiceUnavailable):
    """503: a circuit breaker is open; ``retry_after`` seconds until it admits a trial call."""

    retry_after: float
    layer = "breaker"

    def __init__(self, retry_after: float, *, name: str = "") -> None:
        self.name = name
        super().__init__(retry_after=retry_after)


class Overloaded(ArmorError):
    """503: the server is shedding load."""

    status = 503
    error = "overloaded"
    default_message = "Server is overloaded, retry later"
    layer = "shedding"

    def __init__(self, retry_after: float = 1.0) -> None:
        self.retry_after = retry_after
        super().__init__(headers=_retry_after_header(retry_after))


class RequestTimeout(ArmorError):
    """504: the request did not finish within its time budget."""

    status = 504
    error = "timeout"
    default_message = "Request timed out"
    layer = "timeout"

    def __init__(self, seconds: float | None = None) -> None:
        self.seconds = seconds
        super().__init__(None if seconds is None else f"Request timed out after {seconds:g}s")


class Unauthorized(ArmorError):
    """401: authentication is missing or not valid.

    A 401 must say how to authenticate (RFC 9110 section 15.5.2): ``WWW-Authenticate``
    carries ``challenge``.

    Args:
        message: overrides the default human message.
        challenge: the ``WWW-Authenticate`` value (``'Basic realm="admin"'``, ...).
        details: field-level problems.
        headers: extra response headers.
    """

    status = 401
    error = "unauthorized"
    default_message = "Authentication required"

    def __init__(
        self,
        message: str | None = None,
        *,
        challenge: str = "Bearer",
        details: Sequence[ErrorDetail] = (),
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(
            message, details=details, headers={"WWW-Authenticate": challenge, **(headers or {})}
        )


class InvalidSignature(ArmorError):
    """401: the request signature is missing, malformed, stale, replayed or wrong.

    Its ``WWW-Authenticate`` is ``challenge``; ``SignatureMiddleware`` and ``verify``
    replace the generic default with their scheme's (``Scheme.challenge()``).

    Args:
        code: the detail code (missing_signature, malformed_signature,
            timestamp_out_of_tolerance, replayed, signature_mismatch).
        field: the header at fault.
        challenge: the ``WWW-Authenticate`` value.
    """

    status = 401
    error = "invalid_signature"
    default_message = "Request signature is invalid"
    layer = "signature"

    _messages: ClassVar[dict[str, str]] = {
        "missing_signature": "The signature header is missing",
        "malformed_signature": "The signature header is malformed",
        "timestamp_out_of_tolerance": "The signature timestamp is too old or in the future",
        "replayed": "This message was already received",
        "signature_mismatch": "No signature matches the body",
    }

    def __init__(
        self,
        code: str = "signature_mismatch",
        *,
        field: str | None = None,
        challenge: str = "Signature",
    ) -> None:
        self.code = code
        detail = ErrorDetail(code, self._messages.get(code, self.default_message), field)
        super().__init__(details=(detail,), headers={"WWW-Authenticate": challenge})


class NotFound(ArmorError):
    """404: no such resource."""

    status = 404
    error = "not_found"
    default_message = "Resource not found"


class MethodNotAllowed(ArmorError):
    """405: the route exists but not for this method."""

    status = 405
    error = "method_not_allowed"
    default_message = "Method not allowed"

    def __init__(self, allow: Sequence[str] = ()) -> None:
        super().__init__(headers={"Allow": ", ".join(allow)} if allow else None)


_HTTP_ERROR_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    408: "request_timeout",
    409: "conflict",
    410: "gone",
    413: "payload_too_large",
    414: "uri_too_long",
    415: "unsupported_media_type",
    422: "validation_error",
    429: "rate_limited",
    431: "headers_too_large",
    500: "internal_error",
    501: "not_implemented",
    502: "bad_gateway",
    503: "service_unavailable",
    504: "timeout",
}
_NOT_SNAKE = re.compile(r"[^a-z0-9]+")


class HTTPError(ArmorError):
    """Any other HTTP error a framework raised.

    ``error`` comes from a fixed table that uses this envelope's vocabulary where it has a
    word (429 is ``rate_limited``, 504 ``timeout``), not from ``HTTPStatus`` phrases, which
    change between Python versions.
    """

    def __init__(self, status: int, message: str | None = None) -> None:
        self.status = status  # type: ignore[misc]
        try:
            phrase = HTTPStatus(status).phrase
        except ValueError:
            phrase = "HTTP error"
        fallback = _NOT_SNAKE.sub("_", phrase.lower()).strip("_")
        self.error = _HTTP_ERROR_CODES.get(status, fallback)  # type: ignore[misc]
        super().__init__(message or phrase)


class InternalError(ArmorError):
    """500: something failed inside; details are in the server log under the request id."""


_encoder = msgspec.json.Encoder()
_SAFE_REQUEST_ID = re.compile(rb"[A-Za-z0-9._:\-]{1,128}")
_STATE_FORMAT = "armor_error_format"
#: Where ``ErrorMiddleware(metrics=...)`` puts the sink in scope state (``metrics.STATE_KEY``).
_STATE_METRICS = "asgi_armor.metrics"
# Set by ErrorMiddleware when metrics are on, so that log lines written far from the
# scope (a breaker's transition inside the app) name the request that caused them.
_REQUEST_ID: ContextVar[str | None] = ContextVar("asgi_armor_request_id", default=None)
# Callbacks ``(message) -> None`` a request registered to see its response's start before
# it is sent (asgi_armor.contrib.fastapi.rate_limit: headers, failures-only takes).
STATE_ON_RESPONSE = "asgi_armor.on_response"


def current_request_id() -> str | None:
    """The id of the request this task is serving (set only when metrics are on)."""
    return _REQUEST_ID.get()


async def _run_on_response(state: dict[str, Any], message: Message) -> None:
    """Run the response-start callbacks registered in ``scope["state"]``, if any."""
    hooks = state.get(STATE_ON_RESPONSE)
    if hooks:
        for hook in hooks:
            await hook(message)


def render(
    exc: ArmorError, request_id: str, error_format: ErrorFormat = "json"
) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    """Render ``exc`` as ``(status, raw headers, body)``, headers including ``X-Request-ID``."""
    if error_format == "problem":
        problem = ProblemDetails(
            f"urn:asgi-armor:error:{exc.error}",
            exc.message,
            exc.status,
            exc.error,
            exc.details,
            request_id,
        )
        body = _encoder.encode(problem)
        content_type = b"application/problem+json"
    else:
        body = _encoder.encode(exc.to_response(request_id))
        content_type = b"application/json"
    headers = [
        (b"content-type", content_type),
        (b"content-length", str(len(body)).encode()),
    ]
    headers.extend(
        (k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in exc.headers.items()
    )
    # Last, where every layer that adds the id puts it: a rejection reads the same whichever
    # layer sent it.
    headers.append((b"x-request-id", request_id.encode()))
    return exc.status, headers, body


# Request ids must be unique, not secret (a client may choose its own, see above): a
# generator seeded from the OS saves a system call per request on the hot path.
_ids = random.Random(secrets.token_bytes(32))  # noqa: S311 - uniqueness, not secrecy
# Forked workers (uvicorn --workers, gunicorn) must not repeat each other's ids.
os.register_at_fork(after_in_child=lambda: _ids.seed(secrets.token_bytes(32)))


def _new_request_id() -> str:
    return "req_" + _ids.randbytes(10).hex()


def ensure_request_id(scope: Scope) -> str:
    """Return this request's id, choosing it on first use.

    An incoming ``X-Request-ID`` is kept only when it is 1..128 characters of
    ``[A-Za-z0-9._:-]``: anything else could inject into logs or headers.
    """
    state = scope.get("state")
    if state is None:
        state = scope["state"] = {}
    request_id: str | None = state.get("request_id")
    if request_id is None:
        for key, value in scope.get("headers", ()):
            if key == b"x-request-id":
                if _SAFE_REQUEST_ID.fullmatch(value):
                    request_id = value.decode("ascii")
                break
        if request_id is None:
            request_id = _new_request_id()
        state["request_id"] = request_id
    return request_id


def render_for(scope: Scope, exc: ArmorError) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    """``render`` with this request's id and the format ``ErrorMiddleware`` was given.

    Every envelope goes through here once, so this is where rejections are counted.
    """
    request_id = ensure_request_id(scope)
    state = scope["state"]
    metrics = state.get(_STATE_METRICS)
    if metrics is not None:
        metrics.rejection(exc, request_id, scope)
    return render(exc, request_id, state.get(_STATE_FORMAT, "json"))


#: Close codes for a refused websocket handshake on servers without the denial-response
#: extension (RFC 6455 section 7.4.1): "try again later" for rate limits and overload.
_CLOSE_TRY_AGAIN_LATER = 1013
_CLOSE_POLICY_VIOLATION = 1008


async def send_error(scope: Scope, send: Send, exc: ArmorError) -> None:
    """Answer the request with the envelope for ``exc`` (for rejections before the app runs).

    A websocket handshake is refused with the same envelope as an HTTP response where the
    server offers the ``websocket.http.response`` extension (uvicorn, hypercorn), else by
    closing before accepting, which the server answers with a 403.
    """
    status, headers, body = render_for(scope, exc)
    if scope["type"] == "websocket":
        if "websocket.http.response" in (scope.get("extensions") or {}):
            await send(
                {"type": "websocket.http.response.start", "status": status, "headers": headers}
            )
            await send({"type": "websocket.http.response.body", "body": body, "more_body": False})
        else:
            code = _CLOSE_TRY_AGAIN_LATER if status in (429, 503) else _CLOSE_POLICY_VIOLATION
            await send({"type": "websocket.close", "code": code, "reason": exc.error})
        return
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


def armor_error_in(exc: BaseException) -> ArmorError | None:
    """The ArmorError behind ``exc``, looking inside exception groups (anyio task groups)."""
    if isinstance(exc, ArmorError):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            found = armor_error_in(inner)
            if found is not None:
                return found
    return None


def log_unhandled(scope: Scope, exc: BaseException, log: logging.Logger | None = None) -> None:
    """Log an unexpected exception once, with its traceback and the request id.

    ``ErrorMiddleware`` calls it; so do framework adapters for frameworks that turn an
    exception into a response themselves and never let it reach the middleware.
    """
    (log or logger).error(
        "unhandled exception in %s %r [request_id=%s]",
        scope.get("method"),
        scope.get("path"),
        ensure_request_id(scope),
        exc_info=exc,
    )


def _with_id(
    headers: Sequence[tuple[bytes, bytes]], id_header: tuple[bytes, bytes]
) -> list[tuple[bytes, bytes]]:
    """``headers`` with ``id_header`` as their only ``X-Request-ID``."""
    kept = [h for h in headers if len(h[0]) != 12 or h[0].lower() != b"x-request-id"]
    kept.append(id_header)
    return kept


class ErrorMiddleware:
    """Outermost layer: request ids on every response, the envelope for every error.

    Args:
        app: the ASGI app to wrap.
        error_format: ``"json"`` (the envelope) or ``"problem"`` (RFC 9457).
        logger: where unexpected exceptions are logged with their request id.
        metrics: the sink rejections are counted in (put in scope state for ``render_for``).
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        error_format: ErrorFormat = "json",
        logger: logging.Logger = logger,
        metrics: Metrics | None = None,
    ) -> None:
        if error_format not in ("json", "problem"):
            raise ConfigError(f"error_format: {error_format!r} is not 'json' or 'problem'")
        self.app = app
        self.error_format: ErrorFormat = error_format
        self.logger = logger
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket":
            await self._websocket(scope, receive, send)
            return
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = ensure_request_id(scope)
        scope["state"][_STATE_FORMAT] = self.error_format
        if self.metrics is not None:
            self._with_metrics(scope, request_id)
        id_header = (b"x-request-id", request_id.encode())
        response_started = response_complete = gone = False

        async def send_with_id(message: Message) -> None:
            nonlocal response_started, response_complete
            if message["type"] == "http.response.start":
                response_started = True
                message["headers"] = _with_id(message.get("headers", ()), id_header)
                await _run_on_response(scope["state"], message)
            elif not message.get("more_body", False):
                response_complete = True
            await send(message)

        async def watched_receive() -> Message:
            nonlocal gone
            message = await receive()
            # Once the response is complete, servers report http.disconnect to every
            # receive (uvicorn): only one before that is a client that left.
            if message["type"] == "http.disconnect" and not response_complete:
                gone = True
            return message

        try:
            await self.app(scope, watched_receive, send_with_id)
        except Exception as exc:
            error = self._error_for(scope, exc, gone)
            if response_complete:
                # A framework already answered (Starlette renders its 500 page, then
                # re-raises "so servers can log it"): logged above, nothing left to send.
                return
            if response_started:
                # A second http.response.start is a protocol error; the only honest
                # thing left is to abort the connection, which the server does on raise.
                self.logger.warning(
                    "aborting response already started [request_id=%s]: %s",
                    request_id,
                    error.error,
                )
                raise
            await send_error(scope, send, error)

    def _with_metrics(self, scope: Scope, request_id: str) -> None:
        """The metrics hook: the sink for ``render_for``, the id for log lines."""
        scope["state"][_STATE_METRICS] = self.metrics
        _REQUEST_ID.set(request_id)

    def _error_for(self, scope: Scope, exc: Exception, gone: bool = False) -> ArmorError:
        """The error to answer with: ``exc``'s own, or a logged, opaque internal error.

        ``gone``: the client's connection reported ``http.disconnect`` before ``exc``, and
        before the response was complete.
        """
        error = armor_error_in(exc)
        if error is None:
            if gone:
                # The app failed reading a body the client stopped sending (Starlette's
                # ClientDisconnect): the client's doing, not a server fault to page on.
                self.logger.info(
                    "client disconnected before the response [request_id=%s]: %s",
                    ensure_request_id(scope),
                    type(exc).__name__,
                )
            else:
                log_unhandled(scope, exc, self.logger)
            error = InternalError()
        return error

    async def _websocket(self, scope: Scope, receive: Receive, send: Send) -> None:
        """A handshake gets a request id; an error before ``websocket.accept`` the envelope."""
        request_id = ensure_request_id(scope)
        scope["state"][_STATE_FORMAT] = self.error_format
        if self.metrics is not None:
            self._with_metrics(scope, request_id)
        id_header = (b"x-request-id", request_id.encode())
        answered = False

        async def send_with_id(message: Message) -> None:
            nonlocal answered
            kind = message["type"]
            if kind in ("websocket.accept", "websocket.http.response.start"):
                message["headers"] = _with_id(message.get("headers", ()), id_header)
                await _run_on_response(scope["state"], message)
            if kind in ("websocket.accept", "websocket.close", "websocket.http.response.start"):
                answered = True
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception as exc:
            error = self._error_for(scope, exc)
            if answered:
                # Accepted (or refused) already: the server closes the socket on raise.
                raise
            await send_error(scope, send, error)

    def __repr__(self) -> str:
        return f"ErrorMiddleware(error_format={self.error_format!r})"
