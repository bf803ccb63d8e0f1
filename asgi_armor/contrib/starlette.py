"""Starlette (and FastAPI) adapter.

Starlette turns exceptions raised in a route into its own responses before an outer ASGI
middleware sees them. ``install(app)`` registers handlers so that an ``ArmorError``
raised in a route (a breaker's ``CircuitOpenError``, ``RateLimited`` from a direct limiter
call, ``ValidationFailed`` from ``decode``) renders the envelope with the request id;
Starlette's own ``HTTPException`` (404 for an unknown route, 405, ...) renders as the
envelope too; any other exception renders the opaque ``500 internal_error`` envelope
(``ErrorMiddleware`` outside still logs it, once, with the request id).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from starlette.responses import Response

from asgi_armor.errors import (
    ArmorError,
    HTTPError,
    InternalError,
    MethodNotAllowed,
    NotFound,
    armor_error_in,
    render_for,
)

if TYPE_CHECKING:
    from starlette.applications import Starlette
    from starlette.requests import Request

__all__ = [
    "armor_exception_handlers",
    "as_armor_error",
    "handle_armor_error",
    "handle_client_disconnect",
    "install",
]


def as_armor_error(exc: Exception) -> ArmorError:
    """The ``ArmorError`` to render for an exception a Starlette app raised."""
    found = armor_error_in(exc)  # also inside exception groups, as ErrorMiddleware looks
    if found is not None:
        return found
    if isinstance(exc, HTTPException):
        if exc.status_code == 404:
            return NotFound()
        if exc.status_code == 405:
            allow = (exc.headers or {}).get("Allow", "")
            return MethodNotAllowed([m.strip() for m in allow.split(",") if m.strip()])
        if exc.status_code == 500:
            return InternalError()
        detail: object = exc.detail  # typed str, but apps pass dicts too
        error = HTTPError(exc.status_code, detail if isinstance(detail, str) else None)
        error.headers.update(exc.headers or {})  # WWW-Authenticate, Allow, ...
        return error
    return InternalError()


async def handle_armor_error(request: Request, exc: Exception) -> Response:
    """Render ``exc`` as the envelope, with this request's id."""
    status, headers, body = render_for(request.scope, as_armor_error(exc))
    response = Response(body, status_code=status)
    response.raw_headers = headers
    return response


async def handle_client_disconnect(request: Request, exc: Exception) -> Response:
    """The client left while the route read its body: nobody to answer, nothing to log.

    Without this, ``ClientDisconnect`` would reach Starlette's catch-all, which re-raises
    it, and every client that hangs up mid-upload would be logged as a server error.
    """
    return Response(status_code=400)


def armor_exception_handlers() -> dict[Any, Any]:
    """Handlers for ``Starlette(exception_handlers=...)`` / ``FastAPI(exception_handlers=...)``."""
    return {
        ArmorError: handle_armor_error,
        HTTPException: handle_armor_error,
        ClientDisconnect: handle_client_disconnect,
        Exception: handle_armor_error,
    }


def install(app: Starlette) -> None:
    """Register the handlers on an existing Starlette or FastAPI app."""
    for exc_class, handler in armor_exception_handlers().items():
        app.add_exception_handler(exc_class, handler)
