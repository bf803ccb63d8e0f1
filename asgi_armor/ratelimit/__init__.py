"""Layered rate limiting: token buckets (GCRA) in a store, all layers decided at once.

The names below are loaded on first use (PEP 562), so importing the GCRA core
(``asgi_armor.ratelimit.bucket``), as the stores do, loads neither the limiter nor the
middleware.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from asgi_armor.ratelimit.limiter import Decision, RateLimiter
    from asgi_armor.ratelimit.middleware import RateLimitMiddleware
    from asgi_armor.ratelimit.rate import Rate
    from asgi_armor.ratelimit.rules import KeyFunc, Rule

__all__ = ["Decision", "KeyFunc", "Rate", "RateLimitMiddleware", "RateLimiter", "Rule"]

_WHERE = {
    "Decision": "limiter",
    "KeyFunc": "rules",
    "Rate": "rate",
    "RateLimitMiddleware": "middleware",
    "RateLimiter": "limiter",
    "Rule": "rules",
}


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
