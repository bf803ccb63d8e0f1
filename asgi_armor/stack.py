"""``armor(app, config)``: every configured protection, composed in the canonical order.

Outermost first::

    ErrorMiddleware -> InputLimits -> ConcurrencyLimit -> RateLimitMiddleware
      -> SignatureMiddleware -> IdempotencyMiddleware -> TimeoutMiddleware -> app

Cheap rejections come first; nothing unauthenticated reaches the idempotency store; the
idempotency layer sees the timeout's 504 as a 5xx and releases its key. Only configured
layers are present, and one store object serves all of them.
"""

from __future__ import annotations

import importlib
import logging
import os
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar, cast

from asgi_armor._asgi import ASGIApp, Receive, Scope, Send, scope_state
from asgi_armor._context import CONTEXT_KEY, ArmorContext
from asgi_armor._pipeline import Pipeline
from asgi_armor.clientip import ClientIP, check_ipv6_prefix
from asgi_armor.config import ArmorConfig, RateLimitEntry, SignatureEntry
from asgi_armor.errors import ConfigError, ErrorMiddleware
from asgi_armor.idempotency import IdempotencyMiddleware, IdempotencyOptions
from asgi_armor.identity import Identify
from asgi_armor.metrics import Metrics, RequestMetrics, RouteLabels, build_metrics
from asgi_armor.protect import RouteTableSnapshot, merge_declared
from asgi_armor.ratelimit import RateLimiter, RateLimitMiddleware, Rule
from asgi_armor.ratelimit.rules import KEY_USER, rule_of, unique_names
from asgi_armor.routes import Route
from asgi_armor.shedding import ConcurrencyLimit
from asgi_armor.signing import SCHEMES, Scheme, SignatureMiddleware, SignedRoute, StandardWebhooks
from asgi_armor.stores.base import Store
from asgi_armor.stores.memory import MemoryStore
from asgi_armor.timeout import TimeoutMiddleware
from asgi_armor.validation import InputLimits

__all__ = [
    "Armored",
    "armor",
    "build_store",
    "check_signature",
    "context_for",
    "describe",
    "import_callable",
]

logger = logging.getLogger("asgi_armor")

_Layer = TypeVar("_Layer")


# The store URL forms (docs/config.md): one Redis (or Valkey), a Cluster, a Sentinel group.
_REDIS_SCHEMES = (
    "redis://",
    "rediss://",
    "unix://",
    "valkey://",
    "valkeys://",
    "redis+cluster://",
    "rediss+cluster://",
    "valkey+cluster://",
    "valkeys+cluster://",
    "redis+sentinel://",
    "rediss+sentinel://",
    "valkey+sentinel://",
    "valkeys+sentinel://",
)


@contextmanager
def _entry(path: str) -> Iterator[None]:
    """Prefix a ConfigError raised while building ``path`` with that path."""
    try:
        yield
    except ConfigError as exc:
        message = str(exc)
        raise ConfigError(message if message.startswith(path) else f"{path}: {message}") from None
    except ValueError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def _check_store(config: ArmorConfig) -> None:
    """Check ``config.store`` and its settings without connecting.

    Raises:
        ConfigError: naming ``store`` (or ``store_timeout`` / ``store_prefix``).
    """
    if config.store == "memory":
        return
    if not config.store.startswith(_REDIS_SCHEMES):
        from asgi_armor.stores.redis import redacted

        raise ConfigError(
            f"store: {redacted(config.store)!r} is not 'memory' or a redis:// URL "
            "(or redis+cluster://, redis+sentinel://)"
        )
    if not config.store_timeout > 0:
        raise ConfigError("store_timeout: must be more than 0 seconds")
    if not config.store_prefix:
        raise ConfigError("store_prefix: must not be empty (keys would mix with other data)")
    try:
        from asgi_armor.stores.redis import check_url

        check_url(config.store)
    except ImportError:
        raise ConfigError("store: a Redis store needs: pip install 'asgi-armor[redis]'") from None


def build_store(config: ArmorConfig) -> Store:
    """The store ``config.store`` names: ``"memory"``, a ``redis://`` URL, a Redis Cluster
    (``redis+cluster://``) or a Sentinel service (``redis+sentinel://``).

    The URL is checked here (scheme, port, database number), before any connection.

    Raises:
        ConfigError: naming ``store``: an unknown store, a malformed URL, or the ``redis``
            extra is missing.
    """
    _check_store(config)
    if config.store == "memory":
        return MemoryStore()
    kind = config.store.partition("://")[0].partition("+")[2]
    if kind == "cluster":
        from asgi_armor.stores.cluster import RedisClusterStore

        return RedisClusterStore.from_url(
            config.store, prefix=config.store_prefix, timeout=config.store_timeout
        )
    if kind == "sentinel":
        from asgi_armor.stores.sentinel import RedisSentinelStore

        return RedisSentinelStore.from_url(
            config.store, prefix=config.store_prefix, timeout=config.store_timeout
        )
    from asgi_armor.stores.redis import RedisStore

    return RedisStore.from_url(
        config.store, prefix=config.store_prefix, timeout=config.store_timeout
    )


def _secrets(entry: SignatureEntry, path: str) -> list[str]:
    names = ([entry.secret_env] if entry.secret_env else []) + list(entry.secrets_env)
    if not names:
        raise ConfigError(f"{path}: set secret_env (the environment variable holding the secret)")
    values = []
    for name in names:
        value = os.environ.get(name, "")
        if not value:
            # Fail closed: a signature route without a secret would verify nothing.
            raise ConfigError(f"{path}: environment variable {name!r} is not set or empty")
        values.append(value)
    return values


def _scheme(entry: SignatureEntry) -> Scheme:
    scheme_class = SCHEMES[entry.scheme]
    if entry.header is None:
        return scheme_class()
    if scheme_class is StandardWebhooks:
        raise ConfigError("header: Standard Webhooks uses fixed webhook-* headers")
    scheme: Scheme = scheme_class(header=entry.header)  # type: ignore[call-arg]
    return scheme


def check_signature(entry: SignatureEntry, path: str) -> None:
    """Check a signature entry's scheme, header and secrets as ``armor()`` would build it.

    Raises:
        ConfigError: naming ``path``.
    """
    with _entry(path):
        _scheme(entry)
        _secrets(entry, path)


def import_callable(spec: str, entry: str) -> Any:
    """The callable named ``"module:attribute"`` (dotted attributes allowed).

    Raises:
        ConfigError: naming ``entry``, when the spec is malformed, cannot be imported, or
            is not callable.
    """
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise ConfigError(f"{entry}: {spec!r} is not 'module:attribute'")
    try:
        target: Any = importlib.import_module(module_name)
        for name in attribute.split("."):
            target = getattr(target, name)
    except (ImportError, AttributeError, ValueError) as exc:
        raise ConfigError(f"{entry}: cannot import {spec!r} ({exc})") from None
    if not callable(target):
        raise ConfigError(f"{entry}: {spec!r} is not callable")
    return target


class Armored(Pipeline):
    """The armored app: one compiled pipeline that also exposes its layers, config and store.

    HTTP requests go through the pipeline; websocket handshakes through the same layers
    composed as middleware. At ASGI lifespan start-up it fails the start-up
    (``lifespan.startup.failed``) when the store cannot run on the server's event loop (a
    ``RedisStore`` on trio, naming ``store``) or when a ``@protect`` route was added to the
    app after ``armor()`` read its route table (naming the endpoint); otherwise lifespan
    goes to the wrapped app.

    Args:
        app: the wrapped app.
        config: what it was built from.
        store: the shared store (``await armored.aclose()`` releases it).
        layers: the layer objects, outermost first (``RequestMetrics`` with metrics on,
            then ``ErrorMiddleware``).
        metrics: the sink every layer reports to, or None.
    """

    def __init__(
        self,
        app: ASGIApp,
        config: ArmorConfig,
        store: Store,
        layers: list[object],
        metrics: Metrics | None = None,
        context: ArmorContext | None = None,
        routes: RouteTableSnapshot | None = None,
    ) -> None:
        def layer(kind: type[_Layer]) -> _Layer | None:
            return next((each for each in layers if isinstance(each, kind)), None)

        errors = layer(ErrorMiddleware)
        assert errors is not None
        super().__init__(
            app,
            chain=cast("ASGIApp", layers[0]),
            errors=errors,
            measure=layer(RequestMetrics),
            limits=layer(InputLimits),
            shedding=layer(ConcurrencyLimit),
            rate_limit=layer(RateLimitMiddleware),
            signature=layer(SignatureMiddleware),
            idempotency=layer(IdempotencyMiddleware),
            timeout=layer(TimeoutMiddleware),
            context=context,
        )
        self.config = config
        self.store = store
        self.layers = layers

        self.metrics = metrics
        self.context = context
        self._routes = routes

    async def other(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(scope, receive, send)
            return
        if self.context is not None:
            # For checks made inside the app (contrib.fastapi.rate_limit), as over HTTP.
            scope_state(scope)[CONTEXT_KEY] = self.context
        await self.app(scope, receive, send)

    async def _lifespan(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Fail the server's start-up when the store cannot run here (a Redis store on trio)
        or a declared route would go unprotected."""
        check = getattr(self.store, "check_runtime", None)
        try:
            if check is not None:
                check()
            if self._routes is not None:
                self._routes.check()  # a @protect route added after armor(): unprotected
        except ConfigError as exc:
            await receive()  # lifespan.startup: the protocol's first message
            logger.error("start-up failed: %s", exc)
            await send({"type": "lifespan.startup.failed", "message": str(exc)})
            return
        await self.app(scope, receive, send)

    async def aclose(self) -> None:
        """Release the store's connections."""
        await self.store.aclose()

    def __repr__(self) -> str:
        return " -> ".join(type(layer).__name__ for layer in self.layers) + " -> app"


def armor(
    app: Callable[[Any, Any, Any], Awaitable[None]],
    config: ArmorConfig | None = None,
    *,
    identify: Identify | None = None,
    store: Store | None = None,
    metrics: Metrics | None = None,
) -> Armored:
    """Wrap ``app`` in every protection ``config`` describes.

    Args:
        app: any ASGI app (Starlette, FastAPI, Quart, Litestar, a bare callable).
        config: the protections; ``ArmorConfig()`` (errors and input limits only) by default.
        identify: ``(scope) -> principal | None`` (sync or async) for per-user rate limits
            and idempotency scoping; overrides ``config.identify``.
        store: a store object to use instead of building one from ``config.store``.
        metrics: a sink (``PrometheusMetrics()``, ``OtelMetrics()``, ...) instead of the one
            ``config.metrics`` builds; every layer reports to it.

    Raises:
        ConfigError: a mistake in the config, naming the entry at fault.
    """
    config = config or ArmorConfig()
    if identify is None and config.identify:
        identify = import_callable(config.identify, "identify")
    # @protect declarations on the framework's routes become entries like the config's.
    config = merge_declared(app, config, has_identify=identify is not None)
    route_table = RouteTableSnapshot(app)
    client_ip = ClientIP(config.trusted_proxies, header=config.forwarded_header)
    check_ipv6_prefix(config.ipv6_prefix)
    # "is None", not "or": an empty MemoryStore is falsy (it has a length).
    store = build_store(config) if store is None else store
    wrapped = app
    if metrics is None:
        with _entry("metrics"):
            metrics = build_metrics(config.metrics)
    layers: list[object] = []

    def add(layer: Callable[..., ASGIApp], **options: Any) -> None:
        nonlocal app
        app = layer(app, **options)
        layers.append(app)

    if config.timeout or config.default_timeout is not None:
        routes = []
        for index, budget in enumerate(config.timeout):
            with _entry(f"timeout[{index}].route"):
                Route(budget.route)
            routes.append((budget.route, float(budget.seconds)))
        with _entry("timeout"):
            default = None if config.default_timeout is None else float(config.default_timeout)
            add(TimeoutMiddleware, routes=routes, default=default)

    if config.idempotency:
        idem_routes: list[tuple[str | Route, IdempotencyOptions | dict[str, Any]]] = []
        for index, idem in enumerate(config.idempotency):
            with _entry(f"idempotency[{index}].route"):
                route = Route(idem.route)
            options = IdempotencyOptions(
                ttl=idem.ttl,
                required=idem.required,
                lock_ttl=idem.lock_ttl,
                max_body_bytes=idem.max_body_bytes,
                max_response_bytes=idem.max_response_bytes,
            )
            idem_routes.append((route, options))
        with _entry("idempotency"):
            add(
                IdempotencyMiddleware,
                routes=idem_routes,
                store=store,
                identify=identify,
                client_ip=client_ip,
                # InputLimits refuses bigger bodies before this layer; a smaller default
                # here would refuse bodies the [limits] allow.
                max_body_bytes=config.limits.max_body_bytes if config.limits else 1_048_576,
                on_store_error=config.idempotency_on_store_error,
                max_pending=config.idempotency_max_pending,
                max_pending_bytes=config.idempotency_max_pending_bytes,
                metrics=metrics,
            )

    if config.signature:
        signed: list[tuple[str, SignedRoute]] = []
        for index, sig in enumerate(config.signature):
            path = f"signature[{index}]"
            with _entry(f"{path}.route"):
                Route(sig.route)
            with _entry(path):
                spec = SignedRoute(
                    _scheme(sig), _secrets(sig, path), float(sig.tolerance), sig.replay_protection
                )
                signed.append((sig.route, spec))
        with _entry("signature"):
            add(
                SignatureMiddleware,
                routes=signed,
                store=store,
                max_body_bytes=config.limits.max_body_bytes if config.limits else 1_048_576,
                on_store_error=config.signature_on_store_error,
                metrics=metrics,
            )

    if config.rate_limit:
        rules: list[Rule] = []
        for index, entry in enumerate(config.rate_limit):
            with _entry(f"rate_limit[{index}]"):
                rule = rule_of(entry)
            # Checked here too, not only by the middleware, so the message names the entry.
            if rule.key_kind == KEY_USER and identify is None:
                raise ConfigError(
                    f"rate_limit[{index}].key: 'user' needs an identify hook naming the caller "
                    '(identify = "module:function")'
                )
            if not rule.derived_name and any(
                rule.name == other.name for other in rules if not other.derived_name
            ):
                raise ConfigError(
                    f"rate_limit[{index}].name: {rule.name!r} is already the name of another "
                    "rule; they would share buckets"
                )
            rules.append(rule)
        unique_names(rules)
        with _entry("rate_limit"):
            add(
                RateLimitMiddleware,
                rules=rules,
                store=store,
                identify=identify,
                client_ip=client_ip,
                ipv6_prefix=config.ipv6_prefix,
                exempt=config.rate_limit_exempt,
                on_store_error=config.rate_limit_on_store_error,
                headers=config.rate_limit_headers,
                metrics=metrics,
            )

    if config.shedding is not None:
        shed = config.shedding
        with _entry("shedding"):
            add(
                ConcurrencyLimit,
                max_concurrent=shed.max_concurrent,
                max_queue=shed.max_queue,
                queue_timeout=float(shed.queue_timeout),
                retry_after=float(shed.retry_after),
                exempt=shed.exempt,
                metrics=metrics,
            )

    if config.limits is not None:
        limits = config.limits
        with _entry("limits"):
            add(
                InputLimits,
                max_body_bytes=limits.max_body_bytes,
                max_url_bytes=limits.max_url_bytes,
                max_headers=limits.max_headers,
                max_header_bytes=limits.max_header_bytes,
                json_routes=limits.json_routes,
                body_timeout=None if limits.body_timeout is None else float(limits.body_timeout),
            )

    add(ErrorMiddleware, error_format=config.error_format, metrics=metrics)
    if metrics is not None:
        with _entry("metrics.routes"):
            labels = RouteLabels(_label_routes(config))
        with _entry("metrics"):
            scrape_path = config.metrics.path if config.metrics else None
            add(RequestMetrics, metrics=metrics, routes=labels, path=scrape_path)
    layers.reverse()
    context = context_for(config, store, client_ip, identify, metrics)
    return Armored(wrapped, config, store, layers, metrics, context, route_table)


def _label_routes(config: ArmorConfig) -> list[str]:
    """The route patterns requests are labelled with: every pattern the config names."""
    patterns = list(config.metrics.routes if config.metrics else ())
    patterns += [e.route for e in config.rate_limit] + config.rate_limit_exempt
    patterns += [e.route for e in config.idempotency] + [e.route for e in config.signature]
    patterns += [e.route for e in config.timeout]
    if config.limits is not None:
        patterns += config.limits.json_routes
    if config.shedding is not None:
        patterns += config.shedding.exempt
    return patterns


def context_for(
    config: ArmorConfig,
    store: Store,
    client_ip: ClientIP,
    identify: Identify | None,
    metrics: Metrics | None = None,
) -> ArmorContext:
    """The ``ArmorContext`` published to the app: this armor's store, address, principal
    and metrics sink."""
    limiter = RateLimiter(store, on_store_error=config.rate_limit_on_store_error)
    limiter.policy.metrics = metrics
    return ArmorContext(
        limiter,
        client_ip,
        ipv6_prefix=config.ipv6_prefix,
        identify=identify,
        headers=config.rate_limit_headers,
        metrics=metrics,
    )


def _rate_setting(entry: RateLimitEntry) -> str:
    """``5/15minutes per ip, failures only, shadow``: a rate-limit entry for ``describe``."""
    options = (["failures only"] if entry.count == "failures" else []) + (
        ["shadow"] if entry.shadow else []
    )
    return ", ".join([f"{entry.rate} per {entry.key}", *options])


def describe(config: ArmorConfig) -> str:
    """A human summary of the stack ``config`` builds (``asgi-armor check``).

    Raises:
        ConfigError: the config is invalid.
    """

    async def never_called(scope: Scope, receive: Receive, send: Send) -> None:
        """The stack is built only to validate the config."""

    _check_store(config)
    armored = armor(never_called, config, store=MemoryStore())
    lines = [f"store: {config.store}", "", "layers (outermost first):"]
    lines += [f"  {type(layer).__name__}" for layer in armored.layers]
    if config.limits:
        limits = config.limits
        lines += [
            "",
            f"input limits: body {limits.max_body_bytes} B, url {limits.max_url_bytes} B, "
            f"{limits.max_headers} headers / {limits.max_header_bytes} B",
        ]
    if config.shedding:
        shed = config.shedding
        lines.append(
            f"load shedding: {shed.max_concurrent} concurrent, queue {shed.max_queue} "
            f"for {shed.queue_timeout:g}s, exempt {', '.join(shed.exempt) or '-'}"
        )
    table = [(e.route, "rate limit", _rate_setting(e)) for e in config.rate_limit]
    table += [
        (e.route, "idempotency", f"key {'required' if e.required else 'optional'}, kept {e.ttl:g}s")
        for e in config.idempotency
    ]
    table += [
        (e.route, "signature", f"{e.scheme}, tolerance {e.tolerance:g}s") for e in config.signature
    ]
    table += [(e.route, "timeout", f"{e.seconds:g}s") for e in config.timeout]
    if config.default_timeout is not None:
        table.append(("*", "timeout", f"{config.default_timeout:g}s (default)"))
    if table:
        width = max(len(route) for route, _, _ in table)
        lines += ["", f"{'route'.ljust(width)}  {'protection'.ljust(11)}  setting"]
        lines += [f"{route.ljust(width)}  {kind.ljust(11)}  {what}" for route, kind, what in table]
    return "\n".join(lines)
