"""``InputLimits``: size, header and media-type limits before the app runs, and the body
counted as it streams; public through ``asgi_armor.validation``."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import TYPE_CHECKING, NoReturn

import anyio

from asgi_armor import _checks
from asgi_armor._asgi import INVALID_LENGTH, content_length
from asgi_armor.errors import (
    ArmorError,
    ConfigError,
    HeadersTooLarge,
    PayloadTooLarge,
    RequestTimeout,
    UnsupportedMediaType,
    URITooLong,
    ensure_request_id,
    send_error,
)
from asgi_armor.routes import Route, RouteMap, target

if TYPE_CHECKING:
    from asgi_armor._asgi import ASGIApp, Message, Receive, Scope, Send


__all__ = ["InputLimits"]

logger = logging.getLogger("asgi_armor")

# The HTTP versions whose framing bounds the body by its Content-Length (RFC 9112).
_FRAMED_VERSIONS = frozenset({"1.0", "1.1"})

# --------------------------------------------------------------------------------------
# InputLimits
# --------------------------------------------------------------------------------------


def _is_json_media_type(content_type: bytes | None) -> bool:
    """``application/json`` or ``application/<anything>+json``, parameters allowed (RFC 6839)."""
    if content_type is None:
        return False
    media = content_type.split(b";", 1)[0].strip().lower()
    return media == b"application/json" or (
        media.startswith(b"application/") and media.endswith(b"+json") and len(media) > 17
    )


class InputLimits:
    """Refuse oversized, overlong or mistyped requests before the app runs.

    Checks, in order: path and query over ``max_url_bytes`` (414 uri_too_long); more than
    ``max_headers`` headers or more than ``max_header_bytes`` of names and values (431
    headers_too_large); a ``Content-Length`` over ``max_body_bytes``, or one that is not
    a plain non-negative decimal (413 payload_too_large, without reading a byte); a body
    whose content type is not JSON on a ``json_routes`` route (415
    unsupported_media_type). Then the body is counted as it streams: the chunk that would
    pass ``max_body_bytes`` is never handed to the app, the client gets 413 if the
    response has not started (the connection is aborted if it has), and the app's
    ``receive`` raises ``PayloadTooLarge``. Nothing is buffered. With ``body_timeout``, a
    body still incomplete that many seconds after it is first read is cut off the same way
    (504 timeout): a slowloris upload is bounded whichever layer reads it, including the
    signature and idempotency layers, which read the body before ``TimeoutMiddleware`` runs.

    Args:
        app: the ASGI app to wrap.
        max_body_bytes: largest request body.
        max_url_bytes: longest path plus ``?`` plus query string, in bytes.
        max_headers: most request headers.
        max_header_bytes: most bytes of header names and values together.
        json_routes: route patterns (``"POST /api/*"``) whose bodies must be JSON.
        body_timeout: seconds the whole body may take to arrive, from the first read;
            None (the default) means no limit.

    Raises:
        ConfigError: a limit is not a positive integer, a route pattern is invalid, or
            ``body_timeout`` is not a positive number of seconds.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        max_body_bytes: int = 1_048_576,
        max_url_bytes: int = 8192,
        max_headers: int = 100,
        max_header_bytes: int = 16384,
        json_routes: Iterable[str | Route] = (),
        body_timeout: float | None = None,
    ) -> None:
        self.app = app
        self.max_body_bytes = _checks.count(max_body_bytes, "InputLimits: max_body_bytes")
        self.max_url_bytes = _checks.count(max_url_bytes, "InputLimits: max_url_bytes")
        self.max_headers = _checks.count(max_headers, "InputLimits: max_headers")
        self.max_header_bytes = _checks.count(max_header_bytes, "InputLimits: max_header_bytes")
        if isinstance(json_routes, str | bytes):
            raise ConfigError(
                "InputLimits: json_routes must be a list of route patterns, not one string"
            )
        self.json_routes: RouteMap[bool] = RouteMap((route, True) for route in json_routes)
        self.body_timeout = (
            None if body_timeout is None else _checks.seconds(body_timeout, "body_timeout")
        )

    def _check(self, scope: Scope) -> tuple[ArmorError | None, int | None, bool, bytes | None]:
        """Return (rejection, content length, has transfer-encoding, content-type)."""
        raw_path = scope.get("raw_path")
        if raw_path is None:
            raw_path = scope["path"].encode("utf-8", "surrogatepass")
        query = scope.get("query_string", b"")
        url_bytes = len(raw_path) + (len(query) + 1 if query else 0)
        if url_bytes > self.max_url_bytes:
            return URITooLong(f"Request URI exceeds {self.max_url_bytes} bytes"), None, False, None
        headers = scope["headers"]
        if len(headers) > self.max_headers:
            return (
                HeadersTooLarge(f"More than {self.max_headers} request headers"),
                None,
                False,
                None,
            )
        total = 0
        lengths: list[bytes] = []
        chunked = False
        content_type = None
        for name, value in headers:
            total += len(name) + len(value)
            if name == b"content-length":
                lengths.append(value)
            elif name == b"transfer-encoding":
                chunked = True
            elif name == b"content-type":
                # Two Content-Types are ambiguous (which one does the app read?): an empty
                # media type is what a JSON route then refuses with 415.
                content_type = value if content_type is None else b""
        if total > self.max_header_bytes:
            return (
                HeadersTooLarge(f"Request headers exceed {self.max_header_bytes} bytes"),
                None,
                False,
                None,
            )
        length: int | None = None
        if lengths:
            length = content_length(lengths)
            if length == INVALID_LENGTH:
                # RFC 9110 8.6 wants 400 here, but the envelope's vocabulary has no generic
                # bad_request: a length we cannot read cannot be shown to be within the cap.
                return (
                    PayloadTooLarge("Content-Length header is not a valid length"),
                    None,
                    False,
                    None,
                )
            if length > self.max_body_bytes:
                return PayloadTooLarge(max_bytes=self.max_body_bytes), None, False, None
        return None, length, chunked, content_type

    def admit(self, scope: Scope, json_only: bool) -> bool | None:
        """Check what the headers tell; raise the rejection, else say how to read the body.

        Args:
            scope: an http scope.
            json_only: the request's route is one of ``json_routes``.

        Returns:
            None when the body needs no counting (HTTP/1 framing bounds it: a
            ``Content-Length`` within the cap, or no body at all) and there is no
            ``body_timeout``; else whether the body's content type is acceptable, for
            :meth:`guard`.

        Raises:
            ArmorError: 414, 431, 413 or 415.
        """
        error, length, chunked, content_type = self._check(scope)
        if error is not None:
            raise error
        json_ok = _is_json_media_type(content_type) if json_only else True
        if not json_ok and ((length is not None and length > 0) or chunked):
            raise UnsupportedMediaType()
        if (
            chunked
            or self.body_timeout is not None
            or scope.get("http_version", "1.1") not in _FRAMED_VERSIONS
        ):
            return json_ok
        # HTTP/1 servers deliver exactly Content-Length bytes, none without it (RFC 9112
        # section 6.3): there is nothing left to count. This trusts the server's framing
        # (docs/architecture.md, "Request flow").
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        json_only = bool(self.json_routes) and (self.json_routes.first(*target(scope)) is not None)
        try:
            json_ok = self.admit(scope, json_only)
        except ArmorError as exc:
            await send_error(scope, send, exc)
            return
        if json_ok is None:
            await self.app(scope, receive, send)
        else:
            await self.guard(scope, receive, send, self.app, json_ok)

    async def guard(
        self, scope: Scope, receive: Receive, send: Send, app: ASGIApp, json_ok: bool
    ) -> None:
        """Run ``app`` with its body counted as it streams (after :meth:`admit`)."""
        max_body = self.max_body_bytes
        received = 0
        response_started = False
        answered = False  # we sent the response ourselves; the app's sends are dropped
        rejection: ArmorError | None = None

        async def reject(exc: ArmorError) -> NoReturn:
            nonlocal response_started, answered, rejection
            rejection = exc
            if not response_started:
                response_started = answered = True
                await send_error(scope, send, exc)
            raise exc

        body_seconds = self.body_timeout or 0.0
        body_deadline: float | None = None
        body_done = self.body_timeout is None

        async def limited_receive() -> Message:
            nonlocal received, body_deadline, body_done
            if rejection is not None:
                return {"type": "http.disconnect"}
            if body_done:
                message = await receive()
            else:
                # Timed from the first read, so time spent queued (ConcurrencyLimit) is not
                # charged to the client.
                if body_deadline is None:
                    body_deadline = anyio.current_time() + body_seconds
                with anyio.CancelScope(deadline=body_deadline) as waiting:
                    message = await receive()
                if waiting.cancelled_caught:
                    await reject(RequestTimeout(body_seconds))
                if message["type"] != "http.request" or not message.get("more_body", False):
                    body_done = True
            if message["type"] == "http.request":
                chunk = message.get("body", b"")
                if chunk:
                    received += len(chunk)
                    if received > max_body:
                        await reject(PayloadTooLarge(max_bytes=max_body))
                    if not json_ok:
                        # No length and no chunked framing (HTTP/2) hid the body until now.
                        await reject(UnsupportedMediaType())
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal response_started
            if answered:
                return
            if message["type"] == "http.response.start":
                response_started = True
            await send(message)

        try:
            await app(scope, limited_receive, guarded_send)
        except Exception as exc:
            if not answered:
                raise
            # The client already has our 413/415; what the app did next is noise, unless
            # it is something other than the rejection working its way out.
            if not _caused_by(exc, rejection):
                logger.warning(
                    "exception after InputLimits answered [request_id=%s]",
                    ensure_request_id(scope),
                    exc_info=exc,
                )

    def __repr__(self) -> str:
        return (
            f"InputLimits(max_body_bytes={self.max_body_bytes}, "
            f"max_url_bytes={self.max_url_bytes}, max_headers={self.max_headers}, "
            f"max_header_bytes={self.max_header_bytes}, "
            f"json_routes={[route.pattern for route, _ in self.json_routes.entries]!r}, "
            f"body_timeout={self.body_timeout!r})"
        )


def _caused_by(exc: BaseException, target: BaseException | None) -> bool:
    """Whether ``target`` is ``exc``, inside its exception group, or in its cause chain."""
    seen: set[int] = set()
    stack: list[BaseException] = [exc]
    while stack:
        current = stack.pop()
        if current is target:
            return True
        if id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, BaseExceptionGroup):
            stack.extend(current.exceptions)
        stack.extend(e for e in (current.__cause__, current.__context__) if e is not None)
    return False
