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
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Awaitable, Callable, Mapping
from typing import Final

from asgi_armor._asgi import Scope
from asgi_armor.errors import ConfigError
from asgi_armor.ratelimit.limiter import check_cost
from asgi_armor.ratelimit.rate import Rate
from asgi_armor.routes import Route

__all__ = [
    "KEY_CALLABLE",
    "KEY_GLOBAL",
    "KEY_HEADER",
    "KEY_IP",
    "KEY_PATH",
    "KEY_USER",
    "KeyFunc",
    "Rule",
]

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


class Rule:
    """A rate applied to the requests that match ``route``, one bucket per key value.

    Args:
        route: ``"METHOD /path/{param}"`` (see ``asgi_armor.routes``).
        rate: a ``Rate`` or its text (``"10/minute"``).
        key: ``"ip"``, ``"user"``, ``"path:<param>"``, ``"header:<name>"``, ``"global"``, or
            a callable ``(scope, params) -> str | None`` (sync or async).
        name: the bucket namespace and the policy name in the headers; by default a stable
            name derived from route, key and rate, so two rules never share buckets.
        cost: tokens each matching request takes.

    Raises:
        ConfigError: bad route, rate, key, name or cost; the message names the rule.
    """

    __slots__ = ("cost", "header", "key", "key_fn", "key_kind", "name", "param", "rate", "route")

    def __init__(
        self,
        route: str | Route,
        rate: str | Rate,
        key: str | KeyFunc = "ip",
        *,
        name: str | None = None,
        cost: int = 1,
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
            key_id = f"{getattr(key, '__module__', '')}.{getattr(key, '__qualname__', repr(key))}"
            slug = getattr(key, "__name__", "custom")
        elif isinstance(key, str):
            key_id = key
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
        if name is None:
            digest = hashlib.sha256(
                f"{self.route.pattern}\n{key_id}\n{self.rate}".encode()
            ).hexdigest()[:8]
            name = f"{_SLUG.sub('_', slug)[:40]}-{digest}"
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

    def __repr__(self) -> str:
        return (
            f"Rule({self.route.pattern!r}, {str(self.rate)!r}, "
            f"key={self.key!r}, name={self.name!r}, cost={self.cost})"
        )
