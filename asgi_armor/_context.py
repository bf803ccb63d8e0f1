"""``ArmorContext``: what code inside an armored app needs to decide like the armor does.

``Armored`` puts one context in every request's ``scope["state"]["asgi_armor"]``, so a
dependency in the app (``asgi_armor.contrib.fastapi.rate_limit``) decides in the same
store, counts the same client address and principal, and reports the same headers as
the configured rules, without a second configuration.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from asgi_armor._asgi import Scope
from asgi_armor.clientip import ipv6_group

if TYPE_CHECKING:
    from asgi_armor.identity import Identify
    from asgi_armor.metrics import Metrics
    from asgi_armor.ratelimit.headers import HeaderSet
    from asgi_armor.ratelimit.limiter import RateLimiter

__all__ = ["CONTEXT_KEY", "ArmorContext", "context_of"]

#: The ``scope["state"]`` key of the request's ``ArmorContext``.
CONTEXT_KEY = "asgi_armor"


class ArmorContext:
    """The armor's shared parts, for checks made inside the app.

    Args:
        limiter: a ``RateLimiter`` over the armor's store and rate-limit failure policy.
        client_ip: the armor's ``scope -> address`` (trusted proxies applied).
        ipv6_prefix: IPv6 clients are counted per network of this size.
        identify: the armor's identify hook (None: none configured).
        wall_clock: Unix time, only for ``X-RateLimit-Reset``.
        headers: the rate-limit fields responses carry (``ratelimit.headers.HeaderSet``).
        metrics: the sink the app's decisions are counted in, as the layers' are.
    """

    __slots__ = (
        "_client_ip",
        "headers",
        "identify",
        "ipv6_prefix",
        "limiter",
        "metrics",
        "shadow_refusals",
        "wall_clock",
    )

    def __init__(
        self,
        limiter: RateLimiter,
        client_ip: Callable[[Scope], str],
        *,
        ipv6_prefix: int = 64,
        identify: Identify | None = None,
        wall_clock: Callable[[], float] = time.time,
        headers: HeaderSet = "all",
        metrics: Metrics | None = None,
    ) -> None:
        self.limiter = limiter
        self.metrics = metrics
        self.headers: HeaderSet = headers
        self._client_ip = client_ip
        self.ipv6_prefix = ipv6_prefix
        self.identify = identify
        self.wall_clock = wall_clock
        #: Refusals a shadow limit decided in the app would have sent, per policy name.
        self.shadow_refusals: dict[str, int] = {}

    def address(self, scope: Scope) -> str:
        """The client address as rate limits count it (IPv6 by network)."""
        ip = self._client_ip(scope)
        return ipv6_group(ip, self.ipv6_prefix) if ":" in ip else ip


def context_of(scope: Scope) -> ArmorContext | None:
    """The ``ArmorContext`` of this request, or None when no ``armor()`` is around the app."""
    state = scope.get("state")
    found = None if state is None else state.get(CONTEXT_KEY)
    return found if isinstance(found, ArmorContext) else None
