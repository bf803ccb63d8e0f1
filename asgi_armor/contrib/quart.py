"""Quart adapter.

Quart turns every exception raised in a route into its own HTML page (404, 405, 500)
before an outer ASGI middleware sees it, and logs unexpected ones with its own logger,
without the request id. ``install(app)`` registers one error handler for ``Exception``
so that:

- an ``ArmorError`` raised in a route (a breaker's ``CircuitOpenError``, ``RateLimited``
  from a direct limiter call, ``ValidationFailed`` from ``decode``) renders the envelope
  with this request's id and its headers (``Retry-After``, rate-limit headers, ...);
- Quart's own HTTP errors (404 for an unknown route, 405, ``abort(403)``) render as the
  envelope: ``not_found``, ``method_not_allowed`` (with ``Allow``), or the status phrase;
- anything else renders the opaque ``500 internal_error`` envelope and is logged once, on
  the ``asgi_armor`` logger, with the request id (a handled exception never reaches the
  outer ``ErrorMiddleware``, so the adapter logs it in its place).

Quart hands the very scope dict it receives to ``request.scope``, so the request id that
``ErrorMiddleware`` put in ``scope["state"]`` is the one rendered here. Redirects Quart
raises for routing (a missing trailing slash) are left alone; a websocket route that fails
before accepting gets the envelope as its HTTP answer, as Quart would send its own page.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, cast

import anyio
from quart import (
    Quart,
    Response,
    current_app,
    got_request_exception,
    got_websocket_exception,
    has_request_context,
    has_websocket_context,
    request,
    websocket,
)
from quart.asgi import ASGIHTTPConnection
from werkzeug.datastructures import Headers
from werkzeug.exceptions import HTTPException
from werkzeug.exceptions import MethodNotAllowed as WerkzeugMethodNotAllowed

from asgi_armor.errors import (
    ArmorError,
    HTTPError,
    InternalError,
    MethodNotAllowed,
    NotFound,
    armor_error_in,
    log_unhandled,
    render_for,
)

if TYPE_CHECKING:
    from asgi_armor._asgi import Scope

__all__ = [
    "CancellableHTTPConnection",
    "armor_error_handler",
    "as_armor_error",
    "handle_armor_error",
    "install",
]

ErrorHandler = Callable[[Exception], Awaitable[Response]]


def as_armor_error(exc: BaseException) -> ArmorError:
    """The ``ArmorError`` to render for an exception a Quart app raised.

    Args:
        exc: what the route (or Quart's routing) raised.
    """
    found = armor_error_in(exc)
    if found is not None:
        return found
    if isinstance(exc, HTTPException) and exc.code is not None:
        if exc.code == 404:
            return NotFound()
        if exc.code == 405:
            allow = exc.valid_methods if isinstance(exc, WerkzeugMethodNotAllowed) else None
            return MethodNotAllowed(list(allow or ()))
        if exc.code >= 500:
            return InternalError() if exc.code == 500 else HTTPError(exc.code)
        # Werkzeug's stock descriptions are long HTML-page sentences; only a description
        # the app chose itself (``abort(403, description=...)``) is worth passing on.
        custom = exc.description if exc.description != type(exc).description else None
        error = HTTPError(exc.code, custom)
        # Werkzeug keeps WWW-Authenticate (a 401's challenge) and Retry-After here.
        for name, value in exc.get_headers():
            if name.lower() != "content-type":
                known = error.headers.get(name)
                error.headers[name] = value if known is None else f"{known}, {value}"
        return error
    return InternalError()


def _is_unexpected(exc: BaseException) -> bool:
    return armor_error_in(exc) is None and not isinstance(exc, HTTPException)


def _current_scope() -> Scope | None:
    """The scope of the request (or websocket) being handled, if any."""
    if has_request_context():
        return cast("Scope", request.scope)
    if has_websocket_context():
        return cast("Scope", websocket.scope)
    return None


async def _render(exc: Exception, logger: logging.Logger | None) -> Response:
    scope = _current_scope()
    if scope is None:  # not from a request: nothing to answer, let Quart decide
        raise exc
    if _is_unexpected(exc):
        # A handler for Exception keeps Quart from sending this signal itself; error
        # reporters (Sentry's Quart integration, ...) listen to it.
        app = cast(Any, current_app)._get_current_object()
        signal = got_request_exception if scope["type"] == "http" else got_websocket_exception
        await signal.send_async(app, _sync_wrapper=app.ensure_async, exception=exc)
        log_unhandled(scope, exc, logger)
    status, raw_headers, body = render_for(scope, as_armor_error(exc))
    # Quart computes Content-Length from the body itself.
    headers = Headers(
        [
            (name.decode("latin-1"), value.decode("latin-1"))
            for name, value in raw_headers
            if name != b"content-length"
        ]
    )
    return Response(body, status=status, headers=headers)


async def handle_armor_error(exc: Exception) -> Response:
    """Render ``exc`` as the envelope with this request's id (a Quart error handler).

    Args:
        exc: the exception Quart caught; unexpected ones are logged on ``asgi_armor``.
    """
    return await _render(exc, None)


def armor_error_handler(logger: logging.Logger | None = None) -> ErrorHandler:
    """An error handler for ``app.register_error_handler(Exception, ...)``.

    Args:
        logger: where unexpected exceptions are logged (default: the ``asgi_armor`` logger,
            the one ``ErrorMiddleware`` uses).
    """
    if logger is None:
        return handle_armor_error

    async def handle(exc: Exception) -> Response:
        return await _render(exc, logger)

    return handle


class CancellableHTTPConnection(ASGIHTTPConnection):
    """Quart's HTTP connection, made to cancel the route when the request is cancelled.

    Quart runs each route in a task of its own and waits with ``asyncio.wait``, which does
    not cancel that task when the wait itself is cancelled (by ``TimeoutMiddleware``, a
    client disconnect, server shutdown). The route then ran on after the 504 and tried to
    send a second response ("Task exception was never retrieved"). Here its tasks are
    cancelled, and waited for, so the route's ``finally`` blocks run before the 504 goes out.
    """

    _armor_tasks: set[asyncio.Task[Any]]

    async def __call__(self, receive: Any, send: Any) -> None:
        self._armor_tasks = set()
        try:
            await super().__call__(receive, send)
        except asyncio.CancelledError:
            pending = {task for task in self._armor_tasks if not task.done()}
            for task in pending:
                task.cancel()
            if pending:
                # Shielded: the enclosing cancel scope would cancel this wait, too.
                with anyio.CancelScope(shield=True):
                    await asyncio.gather(*pending, return_exceptions=True)
            raise

    async def handle_messages(self, request: Any, receive: Any) -> None:
        self._track()
        await super().handle_messages(request, receive)

    async def handle_request(self, request: Any, send: Any) -> None:
        self._track()
        await super().handle_request(request, send)

    def _track(self) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._armor_tasks.add(task)


def _log_with_request_id(app: Quart, logger: logging.Logger | None) -> None:
    """Make Quart's own exception log (for failures outside the route, e.g. in an
    ``after_request`` function or a bad return value) the armor log line, with the id."""
    quart_log_exception = app.log_exception

    def log_exception(exc_info: Any) -> None:
        exc = exc_info[1] if exc_info else None
        scope = _current_scope()
        if exc is not None and scope is not None:
            log_unhandled(scope, exc, logger)
        else:
            quart_log_exception(exc_info)

    app.log_exception = log_exception  # type: ignore[method-assign,assignment]


def install(app: Quart, *, logger: logging.Logger | None = None) -> None:
    """Register the envelope error handler on a Quart app, and make routes cancellable.

    Also routes Quart's own exception log through the ``asgi_armor`` logger with the
    request id, and swaps in ``CancellableHTTPConnection`` (mixed into a custom
    ``asgi_http_class`` if the app has one).

    Args:
        app: the Quart app.
        logger: where unexpected exceptions are logged (default: the ``asgi_armor`` logger).
    """
    app.register_error_handler(Exception, armor_error_handler(logger))
    _log_with_request_id(app, logger)
    connection_class = app.asgi_http_class
    if issubclass(connection_class, ASGIHTTPConnection) and not issubclass(
        connection_class, CancellableHTTPConnection
    ):
        # Keep a custom connection class the app chose: mix the cancellation in.
        app.asgi_http_class = (
            CancellableHTTPConnection
            if connection_class is ASGIHTTPConnection
            else type(
                f"Cancellable{connection_class.__name__}",
                (CancellableHTTPConnection, connection_class),
                {},
            )
        )
