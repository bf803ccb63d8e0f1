"""``@protect``: protections declared next to the endpoint, found in the framework's routes.

``@protect(rate_limit=[...], idempotency=..., timeout=..., signature=...)`` stores a
``Declaration`` on the endpoint function and changes nothing else. ``armor(app, config)``
calls ``merge_declared``, which walks the framework's own route table (Starlette and
FastAPI ``app.routes`` through ``Mount`` s and included routers, Quart's ``url_map``,
Litestar's ``app.routes``), so each declaration applies to exactly the path template and
methods the framework routes to that endpoint, and turns every declaration into the
config entries a TOML file would hold (``RateLimitEntry``, ``IdempotencyEntry``,
``TimeoutEntry``, ``SignatureEntry``) on the route ``"METHODS /template"``. Everything
downstream is the configured machinery; a mistake is a ``ConfigError`` at ``armor()``
naming the endpoint and its route:
``@protect on create_payment (POST /api/payments): rate_limit[0]: '10/minuet' is not a rate``.

The route table is read once, when ``armor()`` runs: every framework here has it built
once the app object exists. A declared route added after ``armor()`` would go
unprotected: ``RouteTableSnapshot.check`` finds it at lifespan start-up, which ``Armored``
then fails.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, TypeVar

import msgspec

from asgi_armor.config import (
    ArmorConfig,
    IdempotencyEntry,
    RateLimitEntry,
    SignatureEntry,
    TimeoutEntry,
    parse_duration,
)
from asgi_armor.errors import ConfigError

__all__ = [
    "ATTRIBUTE",
    "Declaration",
    "RouteTableSnapshot",
    "declared_routes",
    "merge_declared",
    "protect",
]

F = TypeVar("F")

#: The endpoint attribute holding its ``Declaration``.
ATTRIBUTE = "__asgi_armor_protect__"

RateItem = str | tuple[str, str] | Mapping[str, Any]

_METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "HEAD", "QUERY")
# Starlette/Litestar "{name:int}" and werkzeug "<int:name>" / "<name>" path parameters.
_BRACE = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)(?::([A-Za-z_]+))?\}")
_ANGLE = re.compile(r"<(?:([A-Za-z_]+)(?:\([^)]*\))?:)?([A-Za-z_][A-Za-z0-9_]*)>")
_RULE_LABEL = re.compile(r"^rule '[^']*': ")
_UNWRAP = 16  # layers of ASGI middleware looked through for the framework app


class Declaration:
    """What ``@protect`` recorded on an endpoint, checked only when ``armor()`` reads it."""

    __slots__ = ("idempotency", "rate_limit", "signature", "timeout")

    def __init__(
        self,
        rate_limit: Sequence[RateItem],
        idempotency: bool | Mapping[str, Any] | None,
        timeout: float | str | None,
        signature: Mapping[str, Any] | None,
    ) -> None:
        self.rate_limit = rate_limit
        self.idempotency = idempotency
        self.timeout = timeout
        self.signature = signature

    def __repr__(self) -> str:
        return (
            f"Declaration(rate_limit={self.rate_limit!r}, idempotency={self.idempotency!r}, "
            f"timeout={self.timeout!r}, signature={self.signature!r})"
        )


def protect(
    *,
    rate_limit: Sequence[RateItem] = (),
    idempotency: bool | Mapping[str, Any] | None = None,
    timeout: float | str | None = None,
    signature: Mapping[str, Any] | None = None,
) -> Callable[[F], F]:
    """Declare protections on an endpoint; ``armor(app, config)`` applies them.

    Args:
        rate_limit: rules, each a rate (``"10/minute"``, per client address), a
            ``(rate, key)`` pair (``("5/hour", "user")``) or a mapping with the
            ``[[rate_limit]]`` fields but ``route`` (``rate``, ``key``, ``name``, ``cost``,
            ``count``, ``shadow``).
        idempotency: ``True`` (the defaults) or the ``[[idempotency]]`` fields but
            ``route`` (``{"ttl": "24h", "required": True}``).
        timeout: the time budget, seconds or a duration text (``5``, ``"500ms"``).
        signature: the ``[[signature]]`` fields but ``route``
            (``{"scheme": "hex-hmac", "header": "X-Signature", "secret_env": "SECRET"}``).

    The decorator goes on the function the framework registers, above or below the
    framework's route decorator (on Litestar, a route handler's ``fn`` carries it).
    """
    declaration = Declaration(rate_limit, idempotency, timeout, signature)

    def mark(endpoint: F) -> F:
        # A Litestar route handler object wraps the function; the routes keep its ``fn``.
        target = getattr(endpoint, "fn", endpoint) if _is_litestar_handler(endpoint) else endpoint
        found = getattr(target, ATTRIBUTE, None)
        try:
            merged = declaration if found is None else _stacked(declaration, found, target)
            setattr(target, ATTRIBUTE, merged)
        except (AttributeError, TypeError):
            raise ConfigError(
                f"@protect: cannot mark {endpoint!r} (put it on the endpoint function)"
            ) from None
        return endpoint

    return mark


def _stacked(outer: Declaration, inner: Declaration, endpoint: object) -> Declaration:
    """Two ``@protect`` on one endpoint: their rate limits add up, in the order written
    (``outer`` is the upper decorator); anything else may be declared once.

    Raises:
        ConfigError: both set the same idempotency, timeout or signature.
    """
    for field in ("idempotency", "timeout", "signature"):
        if getattr(outer, field) is not None and getattr(inner, field) is not None:
            name = getattr(endpoint, "__name__", repr(endpoint))
            raise ConfigError(f"@protect on {name}: {field} is declared twice")
    return Declaration(
        [*outer.rate_limit, *inner.rate_limit] if inner.rate_limit or outer.rate_limit else (),
        outer.idempotency if outer.idempotency is not None else inner.idempotency,
        outer.timeout if outer.timeout is not None else inner.timeout,
        outer.signature if outer.signature is not None else inner.signature,
    )


def _is_litestar_handler(obj: object) -> bool:
    return type(obj).__module__.startswith("litestar.") and callable(getattr(obj, "fn", None))


def declaration_of(endpoint: object) -> Declaration | None:
    """The ``Declaration`` on ``endpoint`` (a function, bound method or handler), if any."""
    found = getattr(endpoint, ATTRIBUTE, None)
    if found is None:
        found = getattr(getattr(endpoint, "__func__", None), ATTRIBUTE, None)
    return found if isinstance(found, Declaration) else None


# -- route tables ----------------------------------------------------------------------------


def _template(path: str) -> str:
    """A framework path template in the config's pattern grammar.

    ``{id:int}`` and ``<int:id>`` become ``{id}``; a trailing ``path`` parameter (which
    spans segments) becomes the prefix form ``/*``.
    """
    segments = path.split("/")
    out: list[str] = []
    for position, segment in enumerate(segments):
        found = _BRACE.fullmatch(segment)
        name, kind = (found.group(1), found.group(2)) if found else (None, None)
        if found is None:
            angle = _ANGLE.fullmatch(segment)
            if angle is not None:
                name, kind = angle.group(2), angle.group(1)
        if name is None:
            out.append(segment)
        elif kind == "path":
            if position != len(segments) - 1:
                raise ConfigError(f"path parameter {segment!r} is not the last segment")
            out.append("*")
        else:
            out.append("{" + name + "}")
    template = "/".join(out)
    if len(template) > 1:
        template = template.rstrip("/") or "/"
    return template if template.startswith("/") else "/" + template


def _methods(methods: object) -> list[str]:
    """The methods a route answers, HEAD left out where GET covers it (as in patterns)."""
    names = sorted({str(m).upper() for m in methods or ()})  # type: ignore[attr-defined]
    if "GET" in names and "HEAD" in names:
        names.remove("HEAD")
    return names


def _starlette(routes: Sequence[Any], prefix: str) -> Iterator[tuple[object, list[str], str]]:
    """``(endpoint, methods, path)`` of Starlette/FastAPI routes, Mounts recursed."""
    for route in routes:
        if type(route).__name__ == "_IncludedRouter":
            # FastAPI >= 0.120 keeps an included router whole; its own iter_route_contexts
            # (what its OpenAPI generation walks) gives each route's effective path. Read
            # from sys.modules: the app is FastAPI, so fastapi is loaded, and the core
            # imports no framework.
            walk = getattr(sys.modules.get("fastapi.routing"), "iter_route_contexts", None)
            if walk is not None:
                yield from _starlette(list(walk([route])), prefix)
            continue
        children = getattr(route, "routes", None)
        path: str = getattr(route, "path", "") or ""
        if children is not None and not hasattr(route, "endpoint"):
            # Mount (its path is the prefix) and Host (no path of its own).
            yield from _starlette(children, prefix + path)
            continue
        endpoint = getattr(route, "endpoint", None)
        if endpoint is None:
            continue
        methods = getattr(route, "methods", None)
        if methods is None:
            # A websocket route: its handshake is a GET (RFC 6455 section 4.1).
            methods = {"GET"}
        if isinstance(endpoint, type):
            # A class-based endpoint (HTTPEndpoint): each method handler may be declared.
            for method in _METHODS:
                handler = getattr(endpoint, method.lower(), None)
                if handler is not None and declaration_of(handler) is not None:
                    yield handler, [method], prefix + path
            continue
        yield endpoint, _methods(methods), prefix + path


def _quart(app: Any) -> Iterator[tuple[object, list[str], str]]:
    for rule in app.url_map.iter_rules():
        endpoint = app.view_functions.get(rule.endpoint)
        if endpoint is None:
            continue
        methods = set(rule.methods or ())
        if getattr(rule, "websocket", False):
            methods = {"GET"}
        elif getattr(rule, "provide_automatic_options", False):
            methods.discard("OPTIONS")
        yield endpoint, _methods(methods), rule.rule


def _litestar(app: Any) -> Iterator[tuple[object, list[str], str]]:
    for route in app.routes:
        handlers = getattr(route, "route_handlers", None)
        if handlers is None:
            handler = getattr(route, "route_handler", None)
            handlers = [] if handler is None else [handler]
        for handler in handlers:
            methods = getattr(handler, "http_methods", None) or {"GET"}
            yield getattr(handler, "fn", handler), _methods(methods), route.path


def _has_routes(app: object) -> bool:
    return hasattr(app, "url_map") or isinstance(getattr(app, "routes", None), list | tuple)


def declared_routes(app: object) -> list[tuple[str, str, Declaration]]:
    """``(endpoint name, "METHODS /template", declaration)`` for every declared endpoint.

    Raises:
        ConfigError: a declared route whose template cannot be expressed as a pattern.
    """
    # Through ASGI middleware wrapped around the framework app (CORSMiddleware(app), ...).
    for _ in range(_UNWRAP):
        if _has_routes(app):
            break
        inner = getattr(app, "app", None)
        if inner is None or inner is app:
            return []
        app = inner
    module = type(app).__module__
    if module.startswith("quart") or hasattr(app, "url_map"):
        found = _quart(app)
    elif module.startswith("litestar"):
        found = _litestar(app)
    elif isinstance(getattr(app, "routes", None), list | tuple):
        found = _starlette(app.routes, "")  # type: ignore[attr-defined]
    else:
        return []
    out: list[tuple[str, str, Declaration]] = []
    for endpoint, methods, path in found:
        declaration = declaration_of(endpoint)
        if declaration is None or not methods:
            continue
        name = getattr(endpoint, "__name__", None) or repr(endpoint)
        try:
            template = _template(path)
        except ConfigError as exc:
            raise ConfigError(f"@protect on {name} ({path}): {exc}") from None
        out.append((name, f"{'|'.join(methods)} {template}", declaration))
    return out


# -- declarations to config entries -----------------------------------------------------------


def _convert(kind: type[Any], fields: Mapping[str, Any], route: str, what: str) -> Any:
    """``fields`` plus ``route`` decoded as ``kind``, exactly as a TOML table would be."""
    if not isinstance(fields, Mapping):
        raise ConfigError(f"{what}: expected a mapping of settings, not {fields!r}")
    if "route" in fields:
        raise ConfigError(f"{what}: route comes from the framework; leave it out")
    from asgi_armor.config import _dec_hook

    try:
        return msgspec.convert({**fields, "route": route}, kind, dec_hook=_dec_hook)
    except msgspec.ValidationError as exc:
        message = str(exc)
        field = re.search(r"at `\$\.?([^`]*)`", message)
        text = message.split(" - at ")[0]
        if text.startswith("Object contains unknown field"):
            return _raise(f"{what}.{text.split('`')[1]}: unknown setting")
        return _raise(f"{what}.{field.group(1)}: {text}" if field else f"{what}: {text}")


def _raise(message: str) -> Any:
    raise ConfigError(message)


def _rate_entry(item: object, route: str, what: str) -> RateLimitEntry:
    fields: Mapping[str, Any]
    if isinstance(item, str):
        fields = {"rate": item}
    elif isinstance(item, tuple):
        if len(item) != 2 or not all(isinstance(part, str) for part in item):
            raise ConfigError(f"{what}: {item!r} is not a rate or a (rate, key) pair")
        fields = {"rate": item[0], "key": item[1]}
    elif isinstance(item, Mapping):
        fields = item
    else:
        raise ConfigError(f"{what}: {item!r} is not a rate, a (rate, key) pair or a mapping")
    entry: RateLimitEntry = _convert(RateLimitEntry, fields, route, what)
    from asgi_armor.ratelimit.rules import rule_of

    try:
        rule_of(entry)
    except ConfigError as exc:
        raise ConfigError(f"{what}: {_RULE_LABEL.sub('', str(exc))}") from None
    return entry


def entries_for(
    route: str, declaration: Declaration, *, has_identify: bool
) -> tuple[list[RateLimitEntry], list[IdempotencyEntry], list[TimeoutEntry], list[SignatureEntry]]:
    """The config entries one declaration on ``route`` stands for, each checked.

    Raises:
        ConfigError: naming the declaration's field at fault (``rate_limit[0]``, ...).
    """
    items = declaration.rate_limit
    if isinstance(items, str | Mapping) or (
        isinstance(items, tuple) and items and isinstance(items[0], str)
    ):
        raise ConfigError(f"rate_limit: expected a list of rules, not {items!r}")
    rates = [_rate_entry(item, route, f"rate_limit[{index}]") for index, item in enumerate(items)]
    for index, entry in enumerate(rates):
        if entry.key == "user" and not has_identify:
            raise ConfigError(
                f"rate_limit[{index}].key: 'user' needs an identify hook naming the caller"
            )
    idempotency: list[IdempotencyEntry] = []
    if declaration.idempotency is True:
        idempotency.append(IdempotencyEntry(route=route))
    elif declaration.idempotency not in (None, False):
        idempotency.append(
            _convert(
                IdempotencyEntry,
                declaration.idempotency,  # type: ignore[arg-type]
                route,
                "idempotency",
            )
        )
    timeouts: list[TimeoutEntry] = []
    if declaration.timeout is not None:
        try:
            seconds = parse_duration(declaration.timeout)
        except ValueError as exc:
            raise ConfigError(f"timeout: {exc}") from None
        if not seconds > 0:
            raise ConfigError("timeout: must be more than 0 seconds")
        timeouts.append(TimeoutEntry(route=route, seconds=seconds))
    signatures: list[SignatureEntry] = []
    if declaration.signature is not None:
        entry = _convert(SignatureEntry, declaration.signature, route, "signature")
        from asgi_armor.stack import check_signature

        check_signature(entry, "signature")
        signatures.append(entry)
    return rates, idempotency, timeouts, signatures


def merge_declared(app: object, config: ArmorConfig, *, has_identify: bool = False) -> ArmorConfig:
    """``config`` with the entries of every ``@protect`` on ``app``'s routes appended.

    Config entries come first, so a route's configured rules keep their names and order.

    Raises:
        ConfigError: ``@protect on <endpoint> (<route>): <field>: <what is wrong>``.
    """
    declared = declared_routes(app)
    if not declared:
        return config
    rates = list(config.rate_limit)
    idempotency = list(config.idempotency)
    timeouts = list(config.timeout)
    signatures = list(config.signature)
    for name, route, declaration in declared:
        try:
            found = entries_for(route, declaration, has_identify=has_identify)
        except ConfigError as exc:
            raise ConfigError(f"@protect on {name} ({route}): {exc}") from None
        rates += found[0]
        idempotency += found[1]
        timeouts += found[2]
        signatures += found[3]
    return msgspec.structs.replace(
        config,
        rate_limit=rates,
        idempotency=idempotency,
        timeout=timeouts,
        signature=signatures,
    )


class RouteTableSnapshot:
    """The declarations ``armor()`` applied, to catch routes declared after it.

    ``armor()`` reads the route table once; a declared route added later (an
    ``include_router`` after ``armor()``) would go unprotected. ``check()`` reads the table
    again (``Armored`` calls it at lifespan start-up) and fails on any declaration that was
    not applied.

    Args:
        app: the framework app ``armor()`` wrapped.
    """

    __slots__ = ("_app", "_seen")

    def __init__(self, app: object) -> None:
        self._app = app
        self._seen = {(route, id(declaration)) for _, route, declaration in declared_routes(app)}

    def check(self) -> None:
        """Raise if the route table now holds a declaration ``armor()`` did not apply.

        Raises:
            ConfigError: naming the first such endpoint and route.
        """
        for name, route, declaration in declared_routes(self._app):
            if (route, id(declaration)) not in self._seen:
                raise ConfigError(
                    f"@protect on {name} ({route}): the route was added after armor() read "
                    "the route table; add routes before calling armor()"
                )
