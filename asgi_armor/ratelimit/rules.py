"""``Rule``: which requests a rate applies to, and what each bucket is keyed on.

Key specs:

* ``"ip"``: the client address (``ClientIP``: forwarding headers only from trusted proxies);
* ``"user"``: the principal from the ``identify`` hook; anonymous callers fall back to their
  address, so leaving out credentials is no way around the limit;
* ``"path:<param>"``: a route parameter (``"path:project_id"``);
* ``"header:<name>"``: a request header (an API key id, ...); a missing header falls back to
  the address;
* ``"global"``: one bucket shared by every caller;
* a callable ``(scope, params) -> str | None``, sync or async; None falls back to the address.

Values are tagged by their source (``u:``, ``h:``, ``k:``, ``ip:``) where a fallback exists,
so a user cannot be named like somebody's address and share their bucket.

Options: ``count="failures"`` takes a token only for answers >= 400 (login brute force),
``shadow=True`` decides and reports a rule but never refuses (rolling out a limit).
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Final, Literal

from asgi_armor._asgi import Scope
from asgi_armor.errors import ConfigError
from asgi_armor.ratelimit.limiter import check_cost
from asgi_armor.ratelimit.rate import Rate
from asgi_armor.routes import Route

if TYPE_CHECKING:
    from asgi_armor.config import RateLimitEntry

__all__ = [
    "KEY_CALLABLE",
    "KEY_GLOBAL",
    "KEY_HEADER",
    "KEY_IP",
    "KEY_PATH",
    "KEY_USER",
    "Count",
    "KeyFunc",
    "Rule",
    "derived_name",
    "rule_of",
    "unique_names",
]

#: What takes a token: every matching request, or only answers with a status >= 400.
Count = Literal["requests", "failures"]

#: A custom key function: ``(scope, route params) -> key`` (None: fall back to the address).
KeyFunc = Callable[[Scope, Mapping[str, str]], str | Awaitable[str | None] | None]

KEY_IP: Final = 0
KEY_GLOBAL: Final = 1
KEY_PATH: Final = 2
KEY_HEADER: Final = 3
KEY_USER: Final = 4
KEY_CALLABLE: Final = 5

_SIMPLE = {"ip": KEY_IP, "global": KEY_GLOBAL, "user": KEY_USER}
_HEADER_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_NAME = re.compile(r"[!#-9;-\[\]-~ ]{1,64}")  # printable ASCII except ':', '"' and '\'
_SLUG = re.compile(r"[^A-Za-z0-9_.\-]+")
_COUNTS = ("requests", "failures")


class Rule:
    """A rate applied to the requests that match ``route``, one bucket per key value.

    Args:
        route: ``"METHOD /path/{param}"`` (see ``asgi_armor.routes``).
        rate: a ``Rate`` or its text (``"10/minute"``).
        key: ``"ip"``, ``"user"``, ``"path:<param>"``, ``"header:<name>"``, ``"global"``, or
            a callable ``(scope, params) -> str | None`` (sync or async).
        name: the bucket namespace and the policy name in the headers; by default a
            readable, stable name derived from key and route (``ip`` for a prefix route,
            ``user-send-email`` for ``POST /api/send-email``), made unique among the rules
            of one middleware by ``unique_names``.
        cost: tokens each matching request takes.
        count: ``"requests"`` (every matching request takes ``cost`` tokens) or
            ``"failures"`` (only answers >= 400 do; an empty bucket still refuses).
        shadow: decide, count and send the headers, but never refuse (a would-be refusal
            is counted in ``RateLimitMiddleware.shadow_refusals``).

    Raises:
        ConfigError: bad route, rate, key, name or cost; the message names the rule.
    """

    __slots__ = (
        "cost",
        "count",
        "derived_name",
        "header",
        "key",
        "key_fn",
        "key_kind",
        "name",
        "param",
        "rate",
        "route",
        "shadow",
    )

    def __init__(
        self,
        route: str | Route,
        rate: str | Rate,
        key: str | KeyFunc = "ip",
        *,
        name: str | None = None,
        cost: int = 1,
        count: Count = "requests",
        shadow: bool = False,
    ) -> None:
        self.route = route if isinstance(route, Route) else Route(route)
        label = f"rule {name!r}" if name is not None else f"rule {self.route.pattern!r}"
        try:
            self.rate = Rate.parse(rate)
        except ConfigError as exc:
            raise ConfigError(f"{label}: {exc}") from None
        self.key = key
        self.param = ""
        self.header = b""
        self.key_fn: KeyFunc | None = None
        if callable(key):
            self.key_kind = KEY_CALLABLE
            self.key_fn = key
            slug = getattr(key, "__name__", "custom")
        elif isinstance(key, str):
            slug = key.replace(":", ".")
            kind, _, arg = key.partition(":")
            if key in _SIMPLE:
                self.key_kind = _SIMPLE[key]
            elif kind == "path" and arg:
                if arg not in self.route.params:
                    raise ConfigError(
                        f"{label}: key {key!r} names no parameter of route "
                        f"{self.route.pattern!r} (it has {list(self.route.params)})"
                    )
                self.key_kind = KEY_PATH
                self.param = arg
            elif kind == "header" and arg:
                if not _HEADER_NAME.fullmatch(arg):
                    raise ConfigError(f"{label}: key {key!r}: {arg!r} is not a header name")
                self.key_kind = KEY_HEADER
                self.header = arg.lower().encode("ascii")
            else:
                raise ConfigError(
                    f"{label}: unknown key {key!r} (use 'ip', 'user', 'global', "
                    "'path:<param>', 'header:<name>' or a callable)"
                )
        else:
            raise ConfigError(f"{label}: key must be a string or a callable, not {key!r}")
        self.derived_name = name is None
        if name is None:
            name = derived_name(slug, self.route)
        elif not _NAME.fullmatch(name):
            raise ConfigError(
                f"{label}: the name must be 1 to 64 printable ASCII characters "
                "without ':', '\"' or '\\'"
            )
        self.name = name
        try:
            check_cost(cost, self.rate)
        except ValueError as exc:
            raise ConfigError(f"{label}: {exc}") from None
        self.cost = cost
        if count not in _COUNTS:
            raise ConfigError(f"{label}: count {count!r} is not 'requests' or 'failures'")
        self.count: Count = count
        if not isinstance(shadow, bool):
            raise ConfigError(f"{label}: shadow must be true or false, not {shadow!r}")
        self.shadow = shadow

    def __repr__(self) -> str:
        return (
            f"Rule({self.route.pattern!r}, {str(self.rate)!r}, "
            f"key={self.key!r}, name={self.name!r}, cost={self.cost}"
            + (f", count={self.count!r}" if self.count != "requests" else "")
            + (", shadow=True" if self.shadow else "")
            + ")"
        )


def derived_name(key_slug: str, route: Route) -> str:
    """The default policy name: the key, then the route's last literal segment.

    A prefix or catch-all route (``* /api/*``) is named by its key alone (``ip``); an exact
    one adds its resource (``POST /api/send-email`` -> ``user-send-email``). Names must not
    depend on anything but the rule itself, so they stay the same across processes and
    restarts (they name the buckets in a shared store).
    """
    base = _SLUG.sub("_", key_slug)[:40] or "rule"
    _, _, path = route.pattern.strip().rpartition(" ")
    if path == "*" or path.endswith("/*"):
        return base
    literals = [s for s in path.split("/") if s and not s.startswith("{")]
    if not literals:
        return base
    tail = _SLUG.sub("_", literals[-1]).strip("_")[:23]
    return f"{base}-{tail}" if tail else base


def unique_names(rules: Iterable[Rule]) -> None:
    """Make derived names unique among ``rules``, in order: the first keeps its name.

    A later rule with a taken derived name gets the first free ``-2``, ``-3``, ...
    Explicit names are never changed (two equal ones are the caller's error to report).
    """
    taken: set[str] = set()
    listed = list(rules)
    for rule in listed:
        if not rule.derived_name:
            taken.add(rule.name)
    for rule in listed:
        if not rule.derived_name:
            continue
        name = rule.name
        if name in taken:
            number = 2
            while f"{rule.name}-{number}" in taken:
                number += 1
            name = rule.name = f"{rule.name}-{number}"
        taken.add(name)


def rule_of(entry: RateLimitEntry) -> Rule:
    """The ``Rule`` a ``[[rate_limit]]`` entry (or a ``@protect`` rate) describes.

    Raises:
        ConfigError: a bad route, rate, key, name, cost or count.
    """
    return Rule(
        entry.route,
        entry.rate,
        entry.key,
        name=entry.name,
        cost=entry.cost,
        count=entry.count,
        shadow=entry.shadow,
    )
