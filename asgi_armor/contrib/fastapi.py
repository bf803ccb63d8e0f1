"""FastAPI: ``rate_limit(...)``, a rate limit as a dependency.

``Depends(rate_limit("10/minute"))``, ``dependencies=[Depends(rate_limit(...))]`` on a
route or an ``APIRouter``, or ``Annotated[None, Depends(rate_limit(...))]``: the
dependency decides in the armor's own store, with the armor's client address and
identify hook, and answers exactly like a configured rule: the same rate-limit headers,
the same ``429 rate_limited`` envelope with ``Retry-After``. The rate and the key may
themselves be FastAPI dependencies, so a limit can follow the caller's plan or
authenticated user::

    async def plan_rate(user: User = Depends(current_user)) -> str:
        return "5/minute" if user.plan == "pro" else "2/minute"

    @app.get("/api/reports", dependencies=[Depends(rate_limit(plan_rate, key=user_id))])
    async def reports() -> dict: ...

It needs ``armor(app, config)`` around the app (it reads the armor's context from
``scope["state"]``) and the Starlette adapter's handlers
(``asgi_armor.contrib.starlette.install``) so its ``RateLimited`` renders the envelope.
Without the armor it fails the request (500, the cause logged), never letting it
through unlimited. In a websocket route it limits the connection: a refusal is the 429
envelope as the handshake's answer.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable
from typing import Annotated, Any

from fastapi import Depends
from starlette.requests import HTTPConnection

from asgi_armor._context import ArmorContext, context_of
from asgi_armor._types import Message, Scope
from asgi_armor.errors import (
    STATE_ON_RESPONSE,
    ConfigError,
    Overloaded,
    RateLimited,
    ServiceUnavailable,
)
from asgi_armor.identity import principal
from asgi_armor.ratelimit import _outcome, bucket
from asgi_armor.ratelimit import headers as h
from asgi_armor.ratelimit.limiter import check_cost
from asgi_armor.ratelimit.rate import Rate
from asgi_armor.ratelimit.rules import _NAME, Count
from asgi_armor.stores.base import make_key

__all__ = ["rate_limit"]

RateSource = str | Rate | Callable[..., Any]
KeySource = str | Callable[..., Any]

# A value this short is at most 64 UTF-8 bytes, so make_key would keep it (as the middleware).
_SHORT = 16
# Distinct rates a rate dependency may return, parsed once each; beyond, parsed per call.
_RATE_CACHE = 64
_KEYS = ("ip", "user", "global")


class _Limit:
    """One ``rate_limit(...)``: its fixed parts worked out once, at definition."""

    __slots__ = ("cost", "count", "key", "name", "names", "rates", "shadow")

    def __init__(
        self, key: KeySource, name: str | None, cost: int, count: Count, shadow: bool
    ) -> None:
        self.key = key
        self.name = name
        self.cost = cost
        self.count = count
        self.shadow = shadow
        self.names: dict[object, str] = {}
        self.rates: dict[str | Rate, Rate] = {}

    def rate_of(self, value: object) -> Rate:
        """The ``Rate`` a rate text (or ``Rate``) stands for, parsed once per value."""
        if not isinstance(value, str | Rate):
            raise ConfigError(f"rate_limit: the rate dependency returned {value!r}, not a rate")
        found = self.rates.get(value)
        if found is None:
            found = Rate.parse(value)
            try:
                check_cost(self.cost, found)
            except ValueError as exc:
                raise ConfigError(f"rate_limit: {exc}") from None
            if len(self.rates) < _RATE_CACHE:
                self.rates[value] = found
        return found

    def name_for(self, scope: Scope) -> str:
        """The policy name: given, or the key and the endpoint (``user-send-email``)."""
        if self.name is not None:
            return self.name
        endpoint = scope.get("endpoint")
        found = self.names.get(endpoint)
        if found is None:
            key = self.key if isinstance(self.key, str) else getattr(self.key, "__name__", "key")
            label = getattr(endpoint, "__name__", "") or "route"
            found = f"{key.replace(':', '.')}-{label.replace('_', '-')}"[:64]
            self.names[endpoint] = found
        return found

    async def key_value(self, scope: Scope, context: ArmorContext, custom: object) -> str:
        """The bucket's key value, tagged as the middleware tags it (``u:``, ``k:``, ``ip:``)."""
        key = self.key
        if key == "ip":
            return context.address(scope)
        if key == "global":
            return "*"
        if key == "user":
            if context.identify is None:
                # Counting everyone by address instead would be a silent change of limit.
                raise ConfigError(
                    "rate_limit: key 'user' needs an identify hook on the armor "
                    '(armor(app, config, identify=...) or identify = "module:function")'
                )
            who = await principal(scope, context.identify)
            return "ip:" + context.address(scope) if who is None else "u:" + who
        # A key dependency's answer: its user id, tenant, ... (None: fall back to the address).
        if custom is None or custom == "":
            return "ip:" + context.address(scope)
        return "k:" + str(custom)


def rate_limit(
    rate: RateSource,
    *,
    key: KeySource = "ip",
    name: str | None = None,
    cost: int = 1,
    count: Count = "requests",
    shadow: bool = False,
) -> Callable[..., Awaitable[None]]:
    """A FastAPI dependency limiting the requests (or websocket connections) it guards.

    Args:
        rate: a rate text (``"10/minute"``) or a ``Rate``, or a callable that FastAPI
            resolves as a dependency and that returns one (a rate per plan).
        key: ``"ip"`` (the client address, as the armor counts it), ``"user"`` (the
            armor's identify hook; anonymous callers by address), ``"global"``, or a
            callable resolved as a dependency returning the key (an authenticated user
            id; None falls back to the address).
        name: the policy name in the headers and the buckets' namespace; by default the
            key and the endpoint's name (``user-send-email`` for ``send_email``).
        cost: tokens a request takes.
        count: ``"requests"`` or ``"failures"`` (only answers >= 400 take a token).
        shadow: decide, count and send the headers, never refuse.

    Raises:
        ConfigError: a bad rate, key, cost or count (when the dependency is defined).
    """
    if not (callable(key) or key in _KEYS):
        raise ConfigError(f"rate_limit: key {key!r} is not 'ip', 'user', 'global' or a callable")
    if name is not None and not _NAME.fullmatch(name):
        raise ConfigError(
            f"rate_limit: name {name!r} must be 1 to 64 printable ASCII characters "
            "without ':', '\"' or '\\'"
        )
    if count not in ("requests", "failures"):
        raise ConfigError(f"rate_limit: count {count!r} is not 'requests' or 'failures'")
    if not isinstance(shadow, bool):
        raise ConfigError(f"rate_limit: shadow must be True or False, not {shadow!r}")
    limit = _Limit(key, name, cost, count, shadow)
    fixed = None if callable(rate) and not isinstance(rate, Rate) else limit.rate_of(rate)

    async def dependency(connection: HTTPConnection, **resolved: Any) -> None:
        scope: Scope = connection.scope
        context = context_of(scope)
        if context is None:
            # Fail the request rather than serve it unlimited.
            raise ConfigError(
                "asgi_armor.contrib.fastapi.rate_limit needs armor(app, config) around the app"
            )
        parsed = fixed if fixed is not None else limit.rate_of(resolved["armor_rate"])
        await _decide(limit, parsed, scope, context, resolved.get("armor_key"))

    parameters = [
        inspect.Parameter(
            "connection", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=HTTPConnection
        )
    ]
    if fixed is None and callable(rate):
        parameters.append(
            inspect.Parameter(
                "armor_rate",
                inspect.Parameter.KEYWORD_ONLY,
                annotation=Annotated[Any, Depends(rate)],
            )
        )
    if callable(key):
        parameters.append(
            inspect.Parameter(
                "armor_key",
                inspect.Parameter.KEYWORD_ONLY,
                annotation=Annotated[Any, Depends(key)],
            )
        )
    # FastAPI reads a dependency's parameters from its signature: the rate and key
    # dependencies become sub-dependencies it resolves (and caches) per request.
    dependency.__signature__ = inspect.Signature(parameters)  # type: ignore[attr-defined]
    dependency.__name__ = f"rate_limit_{name or 'dependency'}"
    return dependency


async def _decide(
    limit: _Limit, rate: Rate, scope: Scope, context: ArmorContext, custom: object
) -> None:
    """Decide one request: refuse (``RateLimited``) or register the response's headers."""
    name = limit.name_for(scope)
    value = await limit.key_value(scope, context, custom)
    store_key = make_key("rl", name) + ":" + (value if len(value) <= _SHORT else make_key(value))
    interval, tolerance = rate.spec
    spec = (interval * limit.cost, tolerance)
    failures = limit.count == "failures"
    # Taken before the endpoint runs, also for count="failures" (given back on a success):
    # concurrent attempts can never outnumber the tokens.
    metrics = context.metrics
    result = await context.limiter.take([store_key], [spec], 1)
    if result is None:
        if metrics is not None:
            metrics.rate_limit(name, "store_error")
        return  # the store failed and the policy lets requests through, without headers
    allowed, now, tats = result
    policy = h.policy_item(name, rate).encode()
    sf_name = h.sf_string(name).encode()
    limit_bytes = str(rate.capacity).encode()

    def fields(now: float, tat: float) -> list[tuple[bytes, bytes]]:
        left = bucket.remaining(tat, now, interval, tolerance)
        return h.fields(
            limit_bytes,
            left,
            bucket.reset_after(tat, now),
            context.wall_clock(),
            policy,
            sf_name,
            context.headers,
        )

    tat = tats[0]
    if not allowed and not limit.shadow:
        if metrics is not None:
            metrics.rate_limit(name, "limited")
        wait = bucket.retry_after(tat, now, *spec)
        raise RateLimited(h.whole_seconds(wait), headers=h.named(fields(now, tat)))
    if metrics is not None:
        metrics.rate_limit(name, "allowed" if allowed else "shadow_limited")
    if not allowed:
        counts = context.shadow_refusals
        counts[name] = counts.get(name, 0) + 1
    added = fields(now, tat)
    # A shadow refusal took nothing: nothing to give back.
    refund = failures and allowed

    async def on_response(message: Message) -> None:
        headers = added
        # An accepted websocket (no status) is a success.
        if refund and _outcome.refunded(message.get("status", 101)):
            try:
                given = await context.limiter.take(
                    [store_key], _outcome.give_back_specs([spec[0]], [tat]), -1
                )
            except (ServiceUnavailable, Overloaded):
                # The policy was applied before the endpoint ran; this answer is its own.
                given = None
            if given is not None:
                headers = fields(given[1], given[2][0])
        message["headers"] = [*message.get("headers", ()), *headers]

    state = scope["state"]
    hooks = state.get(STATE_ON_RESPONSE)
    if hooks is None:
        state[STATE_ON_RESPONSE] = [on_response]
    else:
        hooks.append(on_response)
