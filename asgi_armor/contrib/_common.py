"""What every framework adapter shares: finding the ArmorError, logging the unexpected."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from asgi_armor.errors import ArmorError, _armor_error_in, ensure_request_id
from asgi_armor.errors import logger as armor_logger

if TYPE_CHECKING:
    from asgi_armor._asgi import Scope

__all__ = ["armor_error_in", "log_unhandled"]


def armor_error_in(exc: BaseException) -> ArmorError | None:
    """The ``ArmorError`` behind ``exc``, also inside exception groups (anyio task groups)."""
    return _armor_error_in(exc)


def log_unhandled(scope: Scope, exc: BaseException, logger: logging.Logger | None = None) -> None:
    """Log an unexpected exception once, with the request id, as ``ErrorMiddleware`` does.

    Frameworks that turn an exception into a response themselves (Quart with a handler for
    ``Exception``, Litestar always) never let it reach ``ErrorMiddleware``, so the adapter
    logs it here, in the same words, instead.
    """
    (logger or armor_logger).error(
        "unhandled exception in %s %r [request_id=%s]",
        scope.get("method"),
        scope.get("path"),
        ensure_request_id(scope),
        exc_info=exc,
    )
