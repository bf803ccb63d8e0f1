"""Litestar adapter.

Litestar's exception middleware turns every exception into its own JSON
(``{"status_code": 404, "detail": "Not Found"}``) before an outer ASGI middleware sees it,
and by default does not log unexpected exceptions at all. The handlers here make:

- an ``ArmorError`` raised in a route (a breaker's ``CircuitOpenError``, ``RateLimited``
  from a direct limiter call, ``ValidationFailed`` from ``decode``) render the envelope
  with this request's id and its headers (``Retry-After``, rate-limit headers, ...);
- Litestar's HTTP errors (404 for an unknown route, 405 with ``Allow``, and any
  ``HTTPException`` a route raises) render as the envelope; the validation errors Litestar
  finds in parameters and bodies it decodes itself stay Litestar's to decide, but are
  rendered as the envelope too (its ``extra`` items become ``details``);
- anything else render the opaque ``500 internal_error`` envelope and be logged once, on
  the ``asgi_armor`` logger, with the request id (the exception never reaches the outer
  ``ErrorMiddleware``, so the adapter logs it in its place).

Use ``Litestar(..., plugins=[ArmorPlugin()])``, or
``Litestar(..., exception_handlers=armor_exception_handlers())``. Litestar keeps the
scope's ``state`` dict (``scope.setdefault("state", {})``), so the request id that
``ErrorMiddleware`` chose is the one rendered here.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

from litestar import Response
from litestar.exceptions import HTTPException, ValidationException
from litestar.plugins import InitPlugin

from asgi_armor.errors import (
    ArmorError,
    ErrorDetail,
    HTTPError,
    InternalError,
    MethodNotAllowed,
    NotFound,
    armor_error_in,
    log_unhandled,
    render_for,
)

if TYPE_CHECKING:
    from litestar import Request
    from litestar.config.app import AppConfig
    from litestar.types import ExceptionHandlersMap

    from asgi_armor._asgi import Scope

__all__ = [
    "ArmorPlugin",
    "armor_error_handler",
    "armor_exception_handlers",
    "as_armor_error",
    "handle_armor_error",
]

ExceptionHandler = Callable[["Request[Any, Any, Any]", Exception], "Response[bytes]"]


def _validation_details(extra: object) -> list[ErrorDetail]:
    # Litestar lists one {"message", "key", "source"} mapping per invalid parameter or field.
    if not isinstance(extra, list):
        return []
    details = []
    for item in extra:
        if isinstance(item, dict) and isinstance(item.get("message"), str):
            key = item.get("key")
            details.append(ErrorDetail("invalid", item["message"], key if key else None))
    return details


def as_armor_error(exc: BaseException) -> ArmorError:
    """The ``ArmorError`` to render for an exception a Litestar app raised.

    Args:
        exc: what the route (or Litestar's router) raised.
    """
    found = armor_error_in(exc)
    if found is not None:
        return found
    if isinstance(exc, HTTPException):
        status = exc.status_code
        if status == 404:
            return NotFound()
        if status == 405:
            # Litestar's router names the header "allow", its route handlers "Allow".
            allow = next((v for k, v in (exc.headers or {}).items() if k.lower() == "allow"), "")
            return MethodNotAllowed([m.strip() for m in allow.split(",") if m.strip()])
        if status >= 500:
            return InternalError() if status == 500 else HTTPError(status)
        error = HTTPError(status, exc.detail)
        if isinstance(exc, ValidationException):
            error.details = tuple(_validation_details(exc.extra))
        error.headers.update(exc.headers or {})
        return error
    return InternalError()


def _is_unexpected(exc: BaseException) -> bool:
    return armor_error_in(exc) is None and not isinstance(exc, HTTPException)


def _render(
    request: Request[Any, Any, Any], exc: Exception, logger: logging.Logger | None
) -> Response[bytes]:
    scope = cast("Scope", request.scope)
    if _is_unexpected(exc):
        log_unhandled(scope, exc, logger)
    status, raw_headers, body = render_for(scope, as_armor_error(exc))
    media_type = "application/json"
    headers: dict[str, str] = {}
    for raw_name, raw_value in raw_headers:
        name, value = raw_name.decode("latin-1"), raw_value.decode("latin-1")
        if name == "content-type":
            media_type = value
        elif name != "content-length":  # Litestar computes it from the body
            headers[name] = value
    return Response(body, status_code=status, headers=headers, media_type=media_type)


def handle_armor_error(request: Request[Any, Any, Any], exc: Exception) -> Response[bytes]:
    """Render ``exc`` as the envelope with this request's id (a Litestar exception handler).

    Args:
        request: the request Litestar was handling.
        exc: the exception it caught; unexpected ones are logged on ``asgi_armor``.
    """
    return _render(request, exc, None)


def armor_error_handler(logger: logging.Logger | None = None) -> ExceptionHandler:
    """An exception handler (Litestar calls it synchronously) rendering the envelope.

    Args:
        logger: where unexpected exceptions are logged (default: the ``asgi_armor`` logger,
            the one ``ErrorMiddleware`` uses).
    """
    if logger is None:
        return handle_armor_error

    def handle(request: Request[Any, Any, Any], exc: Exception) -> Response[bytes]:
        return _render(request, exc, logger)

    return handle


def armor_exception_handlers(*, logger: logging.Logger | None = None) -> ExceptionHandlersMap:
    """Handlers for ``Litestar(exception_handlers=...)``.

    Args:
        logger: where unexpected exceptions are logged (default: the ``asgi_armor`` logger).
    """
    handler = armor_error_handler(logger)
    return {ArmorError: handler, HTTPException: handler, Exception: handler}


class ArmorPlugin(InitPlugin):
    """Registers the envelope handlers: ``Litestar(..., plugins=[ArmorPlugin()])``.

    Handlers the app registers itself for the same exception classes win.

    Args:
        logger: where unexpected exceptions are logged (default: the ``asgi_armor`` logger).
    """

    __slots__ = ("logger",)

    def __init__(self, *, logger: logging.Logger | None = None) -> None:
        self.logger = logger

    def on_app_init(self, app_config: AppConfig) -> AppConfig:
        """Add the handlers to the app's configuration."""
        app_config.exception_handlers = {
            **armor_exception_handlers(logger=self.logger),
            **app_config.exception_handlers,
        }
        return app_config
