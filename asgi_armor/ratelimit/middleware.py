"""``RateLimitMiddleware``: every matching rule decided together, in one store call."""

from __future__ import annotations

import contextlib
import inspect
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Final, cast

from asgi_armor._asgi import ASGIApp, Message, Receive, Scope, Send, get_header
from asgi_armor.clientip import ClientIP, check_ipv6_prefix, ipv6_group
from asgi_armor.errors import (
    ArmorError,
    ConfigError,
    Overloaded,
    RateLimited,
    ServiceUnavailable,
    ensure_request_id,
    send_error,
)
from asgi_armor.identity import Identify, principal
from asgi_armor.ratelimit import _outcome, bucket
from asgi_armor.ratelimit import headers as h
from asgi_armor.ratelimit.headers import HeaderSet
from asgi_armor.ratelimit.limiter import RateLimiter
from asgi_armor.ratelimit.rules import (
    KEY_GLOBAL,
    KEY_HEADER,
    KEY_IP,
    KEY_PATH,
    KEY_USER,
    KeyFunc,
    Rule,
    unique_names,
)
from asgi_armor.routes import Route, RouteMap, target
from asgi_armor.stores.base import (
    BucketSpec,
    OnStoreError,
    RateLimitStore,
    StoreError,
    make_key,
)
from asgi_armor.stores.memory import MemoryStore

if TYPE_CHECKING:
    from asgi_armor.metrics import Metrics

__all__ = ["RateLimitMiddleware"]

# A value this short is at most 64 UTF-8 bytes, so make_key would keep it as it is.
_SHORT = 16
# Route matching results kept per (method, path): at most this many, of short paths only,
# so the cache stays small whatever paths clients invent.
_MATCH_CACHE = 1024
_MATCH_CACHE_PATH = 256
# Bucket keys remembered per (plan, address, principal): at most this many in all.
_KEY_CACHE = 4096
# The messages that carry response headers: an HTTP response, an accepted websocket.
_HEADED = frozenset({"http.response.start", "websocket.accept"})


class _Compiled:
    """A rule with everything a request needs precomputed."""

    __slots__ = (
        "capacity",
        "failures",
        "fn",
        "header",
        "interval",
        "kind",
        "limit_bytes",
        "param",
        "policy_item",
        "prefix",
        "rule",
        "sf_name",
        "shadow",
        "store_spec",
        "tolerance",
    )

    def __init__(self, rule: Rule) -> None:
        self.rule = rule
        self.kind = rule.key_kind
        self.param = rule.param
        self.header = rule.header
        self.fn = rule.key_fn
        self.prefix = make_key("rl", rule.name) + ":"
        self.interval, self.tolerance = rule.rate.spec
        # A cost of c tokens is the same GCRA step as one token of c intervals, so rules
        # with different costs still share one hit_buckets call (which takes one cost).
        self.failures = rule.count == "failures"
        self.shadow = rule.shadow
        self.store_spec = (self.interval * rule.cost, self.tolerance)
        self.capacity = rule.rate.capacity
        self.limit_bytes = str(self.capacity).encode()
        self.policy_item = h.policy_item(rule.name, rule.rate).encode()
        self.sf_name = h.sf_string(rule.name).encode()


class _Plan:
    """What the requests of one (method, path) need: the rules that match, worked out once.

    Keys that the path alone decides (``path:<param>`` and ``global`` rules) are built here;
    the others (address, user, header, custom) are filled in per request.
    """

    __slots__ = (
        "after",
        "by_caller",
        "dynamic",
        "keys",
        "needs_user",
        "policy",
        "rates",
        "rules",
        "shadow",
        "specs",
    )

    def __init__(self, matches: list[tuple[_Compiled, Mapping[str, str]]]) -> None:
        self.rules = tuple(rule for rule, _ in matches)
        self.specs = tuple(rule.store_spec for rule in self.rules)
        self.rates = tuple((rule.interval, rule.tolerance) for rule in self.rules)
        keys: list[str] = []
        dynamic: list[tuple[int, _Compiled, Mapping[str, str]]] = []
        for index, (rule, params) in enumerate(matches):
            if rule.kind == KEY_PATH:
                value = params[rule.param]
            elif rule.kind == KEY_GLOBAL:
                value = "*"
            else:
                # Filled in per request; the rule's own namespace meanwhile, so the keys
                # name the plan's rules (the per-caller cache is keyed by them).
                keys.append(rule.prefix)
                dynamic.append((index, rule, params))
                continue
            keys.append(rule.prefix + (value if len(value) <= _SHORT else make_key(value)))
        self.keys = tuple(keys)
        self.dynamic = tuple(dynamic)
        kinds = {rule.kind for _, rule, _ in dynamic}
        # Keys made of the address and the principal alone are remembered per caller.
        self.by_caller = bool(dynamic) and kinds <= {KEY_IP, KEY_USER}
        self.needs_user = KEY_USER in kinds
        # The count="failures" rules, given back after a success; the shadow flags, or None.
        self.after = tuple(i for i, rule in enumerate(self.rules) if rule.failures)
        flags = tuple(rule.shadow for rule in self.rules)
        self.shadow = flags if any(flags) else None
        self.policy = (
            self.rules[0].policy_item
            if len(self.rules) == 1
            else b", ".join([rule.policy_item for rule in self.rules])
        )


#: A decision: the headers to send, the keys and tats decided, the shadow rules untaken.
_Decided = tuple[list[tuple[bytes, bytes]], Sequence[str], list[float], list[int]]

_MISS: Final = _Plan([])  # the cache's "not looked up yet" marker


class RateLimitMiddleware:
    """Layered rate limiting: all rules matching a request pass together or none consumes.

    Args:
        app: the ASGI app to wrap.
        rules: the ``Rule`` s; every rule whose route matches applies.
        store: where buckets live (default: a new ``MemoryStore()``).
        identify: the hook giving the principal for ``"user"`` keys.
        trusted_proxies: proxies whose forwarding headers give the client address.
        client_ip: a ready ``ClientIP`` (or any ``scope -> str``), instead of
            ``trusted_proxies``.
        ipv6_prefix: IPv6 clients are counted per network of this prefix length (a host
            usually holds a whole /64); 128 counts each address. IPv4-mapped addresses
            count as IPv4.
        exempt: route patterns never limited (``"GET /healthz"``).
        on_store_error: ``"allow"`` (fail open, logged and counted) or ``"deny"`` (503).
        headers: the rate-limit fields responses carry: ``"all"`` (True), ``"ietf"``
            (``RateLimit``, ``RateLimit-Policy``), ``"legacy"`` (``X-RateLimit-*``) or
            ``"none"`` (False); ``Retry-After`` is always sent on 429.
        wall_clock: Unix time, used only to express ``X-RateLimit-Reset``.
        metrics: where each matching rule's decision and store failures are counted.

    Raises:
        ConfigError: a bad rule, two rules with one name, a ``"user"`` rule without
            ``identify``, a bad exempt route or proxy, a bad ``ipv6_prefix`` or
            ``on_store_error``.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        rules: Iterable[Rule],
        store: RateLimitStore | None = None,
        identify: Identify | None = None,
        trusted_proxies: Iterable[str] = (),
        client_ip: Callable[[Scope], str] | None = None,
        ipv6_prefix: int = 64,
        exempt: Iterable[str | Route] = (),
        on_store_error: OnStoreError = "allow",
        headers: bool | HeaderSet = True,
        wall_clock: Callable[[], float] = time.time,
        metrics: Metrics | None = None,
    ) -> None:
        self.app = app
        compiled: list[tuple[Route, _Compiled]] = []
        names: set[str] = set()
        rules = list(rules)
        for index, rule in enumerate(rules):
            if not isinstance(rule, Rule):
                raise ConfigError(f"rules[{index}]: {rule!r} is not a Rule")
        unique_names(rules)
        for rule in rules:
            if rule.name in names:
                raise ConfigError(
                    f"rule {rule.name!r}: two rules have this name and would share buckets; "
                    "give each rule its own name"
                )
            names.add(rule.name)
            if rule.key_kind == KEY_USER and identify is None:
                raise ConfigError(
                    f"rule {rule.name!r}: key 'user' needs an identify hook "
                    "naming the caller (identify=...)"
                )
            compiled.append((rule.route, _Compiled(rule)))
        self.rules = tuple(c.rule for _, c in compiled)
        self._routes: RouteMap[_Compiled] = RouteMap(compiled)
        self._matches: dict[tuple[str, str], _Plan | None] = {}
        # Keyed by the plan's static keys, which name its rules (their prefixes) and the
        # path's values: plans rebuilt for the same route share their callers' keys.
        self._keys: OrderedDict[tuple[tuple[str, ...], str, str | None], list[str]] = OrderedDict()
        self._exempt: RouteMap[None] | None = RouteMap((e, None) for e in exempt) or None
        self.limiter = RateLimiter(
            MemoryStore() if store is None else store, on_store_error=on_store_error
        )
        self.store = self.limiter.store
        self._hit_buckets = self.store.hit_buckets
        # A MemoryStore decides in this process: called directly, no coroutine to await.
        self._take_sync = self.store.take if type(self.store) is MemoryStore else None
        self._client_ip = client_ip if client_ip is not None else ClientIP(trusted_proxies)
        self.ipv6_prefix = check_ipv6_prefix(ipv6_prefix)
        self._identify = identify
        which = "all" if headers is True else "none" if headers is False else headers
        if which not in h.HEADER_SETS:
            raise ConfigError(
                f"headers: {headers!r} is not one of {', '.join(map(repr, h.HEADER_SETS))}"
            )
        self._which: HeaderSet = which
        #: Whether responses carry any rate-limit field.
        self.headers = which != "none"
        self._wall_clock = wall_clock
        self._metrics = metrics
        self.limiter.policy.metrics = metrics
        #: Refusals a shadow rule would have sent, per rule name (metrics).
        self.shadow_refusals: dict[str, int] = {}

    def _address(self, scope: Scope) -> str:
        """The client address as rate limits count it: IPv6 by network."""
        ip = self._client_ip(scope)
        # Only IPv6 (and IPv4-mapped) text has a colon: IPv4 costs this test alone.
        return ipv6_group(ip, self.ipv6_prefix) if ":" in ip else ip

    def match(self, method: str, path: str) -> _Plan | None:
        """The plan for ``(method, path)``: None when no rule applies (or it is exempt)."""
        if self._exempt is not None and self._exempt.first(method, path) is not None:
            return None
        matches = self._routes.all(method, path)
        return _Plan(matches) if matches else None

    def _plan(self, method: str, path: str) -> _Plan | None:
        """:meth:`match`, remembered for short paths."""
        plan = self.match(method, path)
        if len(path) <= _MATCH_CACHE_PATH:
            cache = self._matches
            if len(cache) >= _MATCH_CACHE:
                # Paths with parameters are unbounded: start over rather than grow.
                cache.clear()
            cache[method, path] = plan
        return plan

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind != "http" and kind != "websocket":
            await self.app(scope, receive, send)
            return
        # A websocket handshake is a GET of its path: a matching rule limits connections.
        method, path = target(scope)
        found = self._matches.get((method, path), _MISS)
        plan = self._plan(method, path) if found is _MISS else found
        if plan is None:
            await self.app(scope, receive, send)
        else:
            await self.run(scope, receive, send, self.app, plan)

    async def run(
        self, scope: Scope, receive: Receive, send: Send, app: ASGIApp, plan: _Plan
    ) -> None:
        """Decide ``plan`` for this request; refuse it, or run ``app`` adding the headers
        (and giving the ``count="failures"`` tokens back when it succeeds)."""
        try:
            decided = await self.decide(scope, plan)
        except ArmorError as exc:
            await send_error(scope, send, exc)
            return
        if decided is None:
            await app(scope, receive, send)
            return
        added, keys, tats, untaken = decided
        if plan.after:
            await app(scope, receive, self._refunding(plan, keys, tats, untaken, added, send))
            return
        if not self.headers:
            await app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] in _HEADED:
                message["headers"] = [*message.get("headers", ()), *added]
            await send(message)

        await app(scope, receive, send_with_headers)

    async def decide(self, scope: Scope, plan: _Plan) -> _Decided | None:
        """Take a token from every bucket of ``plan`` at once, or none.

        Returns:
            ``(headers, keys, tats, untaken)``: the rate-limit headers for the response
            (empty when headers are off), the keys and bucket states decided, and the
            shadow rules that refused (nothing taken from them); or None when the store
            failed and the policy lets the request through.

        Raises:
            RateLimited: a bucket is empty (``Retry-After`` and the headers included).
            ServiceUnavailable: the store failed and the policy is ``"deny"``.
            Overloaded: this process was too busy to ask the store in time.
        """
        keys: Sequence[str] = plan.keys
        if plan.by_caller:
            ip = self._address(scope)
            who = await principal(scope, self._identify) if plan.needs_user else None
            cache = self._keys
            found = cache.get((plan.keys, ip, who))
            if found is None:
                found = await self._fill(scope, plan, ip)
                if len(cache) >= _KEY_CACHE:
                    # The oldest entry goes (first in, first out): bounded whatever a flood
                    # of new addresses, without emptying the cache at once.
                    cache.popitem(last=False)
                cache[plan.keys, ip, who] = found
            keys = found
        elif plan.dynamic:
            keys = await self._fill(scope, plan, None)
        rules = plan.rules
        specs = plan.specs

        try:
            # _take inlined: the hot path saves a coroutine on a MemoryStore.
            take = self._take_sync
            if take is not None:
                allowed, now, tats = take(keys, specs, 1)
            else:
                allowed, now, tats = await self._hit_buckets(keys, specs, 1)
            untaken: list[int] = []
            if not allowed and plan.shadow is not None:
                allowed, now, tats, untaken = await self._without_shadow(plan, keys, now, tats)
        except StoreError as exc:
            if self._metrics is not None:
                _count_rules(self._metrics, rules, "store_error")
            # Raises ServiceUnavailable when the policy is to refuse; else the request
            # goes through while the store is failing. Overloaded (this process too busy
            # to ask the store in time) passes through: shed, never the failure policy.
            self.limiter.store_failed(exc, ensure_request_id(scope))
            return None

        if allowed:
            if self._metrics is not None:
                counted = (
                    rules if not untaken else [r for i, r in enumerate(rules) if i not in untaken]
                )
                _count_rules(self._metrics, counted, "allowed")
            added = self._fields(plan, now, tats) if self.headers else []
            return added, keys, tats, untaken
        # The layer to report, by the one rule (ratelimit.bucket.most_restrictive).
        waits = [
            bucket.retry_after(tat, now, interval, tolerance)
            for tat, (interval, tolerance) in zip(tats, specs, strict=True)
        ]
        if plan.shadow is not None:
            waits = _outcome.enforced_waits(waits, plan.shadow)
        index = bucket.most_restrictive(False, (), (), waits)
        best = rules[index]
        extra: dict[str, str] = {}
        if self.headers:
            left = bucket.remaining(tats[index], now, best.interval, best.tolerance)
            extra = h.named(
                h.fields(
                    best.limit_bytes,
                    left,
                    bucket.reset_after(tats[index], now),
                    self._wall_clock(),
                    plan.policy,
                    best.sf_name,
                    self._which,
                )
            )
        if self._metrics is not None:
            self._metrics.rate_limit(best.rule.name, "limited")
        raise RateLimited(h.whole_seconds(waits[index]), headers=extra)

    def _fields(self, plan: _Plan, now: float, tats: list[float]) -> list[tuple[bytes, bytes]]:
        """The headers of an allowed request: the most restrictive layer's state."""
        index, left, reset_after = bucket.report(tats, now, plan.rates)
        best = plan.rules[index]
        return h.fields(
            best.limit_bytes,
            left,
            reset_after,
            self._wall_clock(),
            plan.policy,
            best.sf_name,
            self._which,
        )

    async def _fill(self, scope: Scope, plan: _Plan, ip: str | None) -> list[str]:
        """``plan``'s keys with the per-request values filled in (``ip``: the address, if
        already known)."""
        keys = list(plan.keys)
        for index, rule, params in plan.dynamic:
            kind = rule.kind
            if kind == KEY_IP:
                if ip is None:
                    ip = self._address(scope)
                value = ip
            else:
                found_key: str | None
                if kind == KEY_HEADER:
                    raw = get_header(scope, rule.header)
                    found_key = None if raw is None else "h:" + raw.decode("latin-1")
                elif kind == KEY_USER:
                    who = await principal(scope, self._identify)
                    found_key = None if who is None else "u:" + who
                else:
                    # Only KEY_CALLABLE is left, and such a rule always has its function.
                    custom = cast("KeyFunc", rule.fn)(scope, params)
                    if inspect.isawaitable(custom):
                        custom = await custom
                    found_key = None if custom is None else "k:" + custom
                if found_key is None:
                    if ip is None:
                        ip = self._address(scope)
                    found_key = "ip:" + ip
                value = found_key
            keys[index] = rule.prefix + (value if len(value) <= _SHORT else make_key(value))
        return keys

    async def _take(
        self,
        keys: list[str] | tuple[str, ...],
        specs: tuple[BucketSpec, ...] | list[BucketSpec],
        cost: int = 1,
    ) -> tuple[bool, float, list[float]]:
        take = self._take_sync
        if take is not None:
            return take(keys, specs, cost)
        return await self._hit_buckets(keys, specs, cost)

    async def _without_shadow(
        self, plan: _Plan, keys: Sequence[str], now: float, tats: list[float]
    ) -> tuple[bool, float, list[float], list[int]]:
        """A refused decision decided again without the shadow rules that refused it.

        All-or-none means a shadow rule lacking tokens held back every other rule's take:
        when only shadow rules refused, the others are taken in a second call (only on
        that path, so a shadow rule costs no round trip while it would allow). The shadow
        rules that refused keep their state for the headers and are counted in
        ``shadow_refusals``; their indices come back last (nothing was taken from them).
        """
        shadow = cast("tuple[bool, ...]", plan.shadow)
        refused = _outcome.lacking(now, tats, plan.specs)
        if not _outcome.shadow_only(refused, shadow):
            return False, now, tats, refused
        self._count_shadow(plan, refused)
        rest = [i for i in range(len(tats)) if i not in refused]
        if not rest:
            return True, now, tats, refused
        specs = [plan.specs[i] for i in rest]
        allowed, now, taken = await self._take([keys[i] for i in rest], specs)
        merged = list(tats)
        for position, index in enumerate(rest):
            merged[index] = taken[position]
        if allowed:
            return True, now, merged, refused
        again = [rest[i] for i in _outcome.lacking(now, taken, specs)]
        if _outcome.shadow_only(again, shadow):
            # Raced by another request: still only shadow rules refuse, let it through
            # (nothing of this second call was taken).
            self._count_shadow(plan, again)
            return True, now, merged, list(range(len(tats)))
        return False, now, merged, refused

    def _count_shadow(self, plan: _Plan, indices: list[int]) -> None:
        counts = self.shadow_refusals
        for index in indices:
            name = plan.rules[index].rule.name
            counts[name] = counts.get(name, 0) + 1
            if self._metrics is not None:
                self._metrics.rate_limit(name, "shadow_limited")

    def _refunding(
        self,
        plan: _Plan,
        keys: Sequence[str],
        tats: list[float],
        untaken: Sequence[int],
        added: list[tuple[bytes, bytes]],
        send: Send,
    ) -> Send:
        """``send`` that gives the ``count="failures"`` tokens back on a success (< 400).

        Given back on the response's start, before it is forwarded, so the headers of a
        success already report the token returned. An accepted websocket is a success.
        """
        after = [i for i in plan.after if i not in untaken] if untaken else plan.after

        async def send_refunding(message: Message) -> None:
            kind = message["type"]
            headed = kind in _HEADED
            if headed or kind in _outcome.STATUS_MESSAGES:
                fields = added
                if after and _outcome.refunded(message.get("status", 101)):
                    fields = await self._give_back(plan, keys, tats, after) or added
                if headed and self.headers:
                    message["headers"] = [*message.get("headers", ()), *fields]
            await send(message)

        return send_refunding

    async def _give_back(
        self,
        plan: _Plan,
        keys: Sequence[str],
        tats: list[float],
        after: Sequence[int],
    ) -> list[tuple[bytes, bytes]] | None:
        """Give the failures-only tokens back; the headers after it (None: store failed)."""
        steps = [plan.specs[i][0] for i in after]
        back = _outcome.give_back_specs(steps, [tats[i] for i in after])
        try:
            _, now, given = await self._take([keys[i] for i in after], back, -1)
        except StoreError as exc:
            # The policy was applied before the app ran; this answer is the app's own.
            with contextlib.suppress(ServiceUnavailable):
                self.limiter.store_failed(exc)
            return None
        except Overloaded:
            return None
        merged = list(tats)
        for position, index in enumerate(after):
            merged[index] = given[position]
        return self._fields(plan, now, merged) if self.headers else []

    def __repr__(self) -> str:
        return f"RateLimitMiddleware(rules={list(self.rules)!r}, store={self.store!r})"


def _count_rules(metrics: Metrics, rules: Iterable[_Compiled], result: str) -> None:
    """Count ``result`` once for each rule of a request (allowed, store_error, ...)."""
    for rule in rules:
        metrics.rate_limit(rule.rule.name, result)
