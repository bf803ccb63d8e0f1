"""Route patterns: ``"POST /api/projects/{project_id}/builds"``, compiled once at start-up.

Grammar: ``METHOD PATH``. ``METHOD`` is ``*`` (any), one method, or several joined by
``|`` (``GET|POST``); it may be left out, meaning ``*``. A ``GET`` route also matches
``HEAD``. ``PATH`` starts with ``/``; a segment ``{name}`` captures one path segment; a
trailing ``/*`` matches the prefix and everything below it; ``*`` alone matches every
path. A trailing slash on the request path is ignored, so ``/api/users/`` cannot slip
past a rule written for ``/api/users``.

Patterns are matched against ``target(scope)``: the path the wrapped app routes on, not
the bytes on the wire. Frameworks differ in what they accept (Quart and Litestar route
``//api//x`` and a lower-case ``post`` to ``POST /api/x``), so every layer matches the
one canonical form: ``root_path`` removed when it prefixes the path (ASGI spec; set by
``uvicorn --root-path`` and Starlette's ``Mount``), runs of ``/`` collapsed, a trailing
``/`` dropped, the method upper-cased. A websocket handshake is a ``GET`` (RFC 6455 section 4.1).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Generic, TypeVar
from urllib.parse import urlsplit

from asgi_armor._asgi import ASGIApp, Receive, Scope, Send
from asgi_armor.errors import ConfigError

__all__ = ["Route", "RouteBound", "RouteMap", "target"]

T = TypeVar("T")

_METHOD = re.compile(r"[A-Z]+")
_PARAM = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
_NO_PARAMS: Mapping[str, str] = {}
_SLASHES = re.compile(r"//+")


def target(scope: Scope) -> tuple[str, str]:
    """The ``(METHOD, path)`` a route pattern is matched against, for an http or websocket scope.

    The path is the one the wrapped app routes on: ``root_path`` removed when it is a
    prefix of ``path`` (a ``root_path`` that is not a prefix is left alone, as Starlette
    does), repeated slashes collapsed, a trailing slash dropped; an absolute-form target
    (``http://host/x``) is its path. The method is upper-cased.
    """
    path: str = scope["path"]
    if path[:1] != "/":
        # An absolute-form target (RFC 9112 section 3.2.2) that uvicorn's h11 leaves whole;
        # Quart routes it by its URL's path, so the patterns must see that path too.
        path = urlsplit(path).path or "/"
    root: str = scope.get("root_path", "")
    if root:
        root = root.rstrip("/")
        if path.startswith(root) and (len(path) == len(root) or path[len(root)] == "/"):
            path = path[len(root) :] or "/"
    if "//" in path:
        path = _SLASHES.sub("/", path)
    if path[-1:] == "/" and len(path) > 1:
        # Patterns ignore a trailing slash; the fingerprint and keys must too.
        path = path[:-1]
    method: str = scope.get("method", "GET")
    if not method.isupper():
        method = method.upper()
    return method, path


class Route:
    """One compiled route pattern.

    Args:
        pattern: ``"METHOD /path/{param}"``.

    Raises:
        ConfigError: the pattern cannot be parsed or could never match.
    """

    __slots__ = ("_literal", "_regex", "methods", "params", "pattern")

    def __init__(self, pattern: str) -> None:
        self.pattern = pattern
        method, _, path = pattern.strip().rpartition(" ")
        method = method.strip() or "*"
        if method == "*":
            self.methods: frozenset[str] | None = None
        else:
            names = method.split("|")
            for name in names:
                if not _METHOD.fullmatch(name):
                    raise ConfigError(f"route {pattern!r}: {name!r} is not an HTTP method")
            if "GET" in names:
                names.append("HEAD")
            self.methods = frozenset(names)
        self._literal: str | None = None
        self._regex: re.Pattern[str] | None = None
        self.params: tuple[str, ...] = ()
        if path == "*":
            return
        if not path.startswith("/"):
            raise ConfigError(f"route {pattern!r}: the path must start with '/' or be '*'")
        prefix = path.endswith("/*")
        if prefix:
            path = path[:-2]
        if "*" in path:
            raise ConfigError(f"route {pattern!r}: '*' is allowed only as the last segment")
        path = path.rstrip("/")
        parts: list[str] = []
        params: list[str] = []
        for segment in path.split("/")[1:]:
            found = _PARAM.fullmatch(segment)
            if found:
                name = found.group(1)
                if name in params:
                    raise ConfigError(f"route {pattern!r}: parameter {name!r} appears twice")
                params.append(name)
                parts.append(f"(?P<{name}>[^/]+)")
            elif "{" in segment or "}" in segment or not segment:
                raise ConfigError(f"route {pattern!r}: bad segment {segment!r}")
            else:
                parts.append(re.escape(segment))
        self.params = tuple(params)
        if not params and not prefix:
            self._literal = path
            return
        body = "".join("/" + part for part in parts)
        tail = "(?:/.*)?" if prefix else "/?"
        self._regex = re.compile(body + tail, re.DOTALL)

    def match(self, method: str, path: str) -> Mapping[str, str] | None:
        """Path parameters if ``method`` and ``path`` match, else None."""
        if self.methods is not None and method not in self.methods:
            return None
        literal = self._literal
        if literal is not None:
            if path == literal or (path[-1:] == "/" and path[:-1] == literal):
                return _NO_PARAMS
            return None
        if self._regex is None:
            return _NO_PARAMS
        found = self._regex.fullmatch(path)
        if found is None:
            return None
        return found.groupdict() if self.params else _NO_PARAMS

    def __repr__(self) -> str:
        return f"Route({self.pattern!r})"


class RouteMap(Generic[T]):
    """An ordered list of ``(route, value)`` pairs.

    Args:
        entries: ``(pattern or Route, value)`` pairs; earlier entries win in ``first``.
    """

    __slots__ = ("entries",)

    def __init__(self, entries: Iterable[tuple[str | Route, T]] = ()) -> None:
        self.entries: tuple[tuple[Route, T], ...] = tuple(
            (route if isinstance(route, Route) else Route(route), value) for route, value in entries
        )

    def first(self, method: str, path: str) -> tuple[T, Mapping[str, str]] | None:
        """The value of the first matching route and its path parameters."""
        for route, value in self.entries:
            params = route.match(method, path)
            if params is not None:
                return value, params
        return None

    def all(self, method: str, path: str) -> list[tuple[T, Mapping[str, str]]]:
        """Every matching route's value with its path parameters, in order."""
        matches = []
        for route, value in self.entries:
            params = route.match(method, path)
            if params is not None:
                matches.append((value, params))
        return matches

    def __bool__(self) -> bool:
        return bool(self.entries)

    def __len__(self) -> int:
        return len(self.entries)


class RouteBound(Generic[T]):
    """Middleware whose routes each carry one spec (a signed route, an idempotent route).

    Used by hand, it matches the canonical target and runs :meth:`run` around
    ``self.app``; ``armor()``'s pipeline calls :meth:`match` once per plan and :meth:`run`
    itself (docs/architecture.md, "Request flow"). Subclasses set ``app`` and ``routes``.
    """

    app: ASGIApp
    routes: RouteMap[T]

    def match(self, method: str, path: str) -> T | None:
        """The spec of the first route ``(method, path)`` falls under, or None."""
        found = self.routes.first(method, path)
        return None if found is None else found[0]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        spec = self.match(*target(scope)) if scope["type"] == "http" else None
        if spec is None:
            await self.app(scope, receive, send)
        else:
            await self.run(scope, receive, send, self.app, spec)

    async def run(self, scope: Scope, receive: Receive, send: Send, app: ASGIApp, spec: T) -> None:
        """Apply the protection ``spec`` describes around ``app``."""
        raise NotImplementedError
