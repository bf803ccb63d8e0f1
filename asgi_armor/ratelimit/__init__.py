"""Layered rate limiting: token buckets (GCRA) in a store, all layers decided at once."""

from __future__ import annotations

from asgi_armor.ratelimit.limiter import Decision, RateLimiter
from asgi_armor.ratelimit.middleware import RateLimitMiddleware
from asgi_armor.ratelimit.rate import Rate
from asgi_armor.ratelimit.rules import KeyFunc, Rule

__all__ = ["Decision", "KeyFunc", "Rate", "RateLimitMiddleware", "RateLimiter", "Rule"]
