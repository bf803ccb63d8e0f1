"""Metrics for every decision: a no-op sink and two exporters (Prometheus, OpenTelemetry).

Every layer that decides takes ``metrics: Metrics | None``; ``None`` (the default) means
no call at all on the hot path, so an app without metrics pays nothing. ``armor()`` builds
one sink from ``[metrics] exporter`` (or takes ``armor(..., metrics=...)``) and hands it
to every layer. Rejections are counted once, where the envelope is rendered
(``errors.render_for``), under the error's ``layer`` (docs/observability.md).

Labels are bounded by construction: layers, error codes, rule names, breaker names,
scheme names and configured route patterns. Client keys and raw paths never become labels.
The exporter libraries are imported only when that exporter is built.
"""

from __future__ import annotations

import bisect
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any, Final, cast

from asgi_armor.errors import _STATE_METRICS, ConfigError, MethodNotAllowed, send_error
from asgi_armor.routes import Route, target

if TYPE_CHECKING:
    from asgi_armor._types import ASGIApp, Message, Receive, Scope, Send
    from asgi_armor.config import MetricsEntry
    from asgi_armor.errors import ArmorError

__all__ = [
    "BREAKER_STATES",
    "DURATION_BUCKETS",
    "LAYERS",
    "OTHER_ROUTE",
    "STATE_KEY",
    "Metrics",
    "OtelMetrics",
    "PrometheusMetrics",
    "RequestMetrics",
    "RouteLabels",
    "build_metrics",
    "metrics_of",
]

#: Where ``ErrorMiddleware`` puts the sink in ``scope["state"]`` for ``render_for``.
STATE_KEY: Final = _STATE_METRICS
#: The ``layer`` label values of ``armor_decisions_total``, in stack order.
LAYERS: Final = (
    "input_limits",
    "shedding",
    "rate_limit",
    "signature",
    "idempotency",
    "timeout",
    "breaker",
    "error",
)
BREAKER_STATES: Final = ("closed", "open", "half_open")
#: The ``http_route`` of a request no configured pattern matches (never the raw path).
OTHER_ROUTE: Final = "other"
#: OpenTelemetry's recommended buckets for ``http.server.request.duration`` (seconds).
DURATION_BUCKETS: Final = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
)
# The OpenTelemetry HTTP conventions' known methods; any other is "_OTHER", so a client
# sending "FOO1", "FOO2", ... adds no series.
_METHODS: Final = frozenset(
    ("CONNECT", "DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT", "TRACE", "QUERY")
)
_STATUS_TEXT: Final = {code: str(code) for code in range(100, 600)}


def metrics_of(scope: Scope) -> Metrics | None:
    """The sink ``ErrorMiddleware`` put in this request's state, if any."""
    state = scope.get("state")
    return None if state is None else state.get(STATE_KEY)


class Metrics:
    """The sink every layer reports to; this base is a no-op (exporters override it).

    Components whose value is read rather than pushed (a breaker's state, the shedding
    gauges) register a refresher with ``watch``; exporters call ``refresh()`` when they
    are collected, so a breaker whose ``reset_timeout`` has passed reads half_open
    without waiting for a request.
    """

    def __init__(self) -> None:
        # Held weakly by their owner: a breaker or limiter that goes away leaves nothing,
        # and registering an owner again replaces its refresher.
        self._refreshers: weakref.WeakKeyDictionary[Any, Callable[[Any], object]] = (
            weakref.WeakKeyDictionary()
        )

    def rejection(self, error: ArmorError, request_id: str, scope: Scope) -> None:
        """An envelope is being sent for ``error``: ``decision(error.layer, error.error)``."""
        self.decision(error.layer, error.error)

    def decision(self, layer: str, result: str) -> None:
        """A layer decided: ``result`` is the error code of a rejection."""

    def rate_limit(self, policy: str, result: str) -> None:
        """A rate-limit rule ``policy`` decided: allowed, limited, shadow_limited, store_error."""

    def breaker_state(self, breaker: str, state: str) -> None:
        """Breaker ``breaker`` is now in ``state`` (closed, open, half_open)."""

    def breaker_call(self, breaker: str, result: str) -> None:
        """A call through ``breaker``: success, failure or rejected."""

    def idempotency(self, result: str) -> None:
        """An idempotent request: executed, replayed, in_use, reused, missing, invalid."""

    def signature(self, scheme: str, result: str) -> None:
        """A signature check under ``scheme``: valid, invalid, replayed."""

    def shedding(self, in_flight: int, queued: int) -> None:
        """The load shedder's gauges now."""

    def store_error(self, concern: str) -> None:
        """The store failed for ``concern`` (rate_limit, idempotency, signature)."""

    def request(self, method: str, route: str, status: int, seconds: float) -> None:
        """A request finished: ``route`` is a configured pattern or ``OTHER_ROUTE``."""

    def watch(self, owner: Any, refresher: Callable[[Any], object]) -> None:
        """Call ``refresher(owner)`` whenever this sink is collected (it reports through the
        sink), for as long as ``owner`` lives; ``refresher`` must not hold ``owner``."""
        self._refreshers[owner] = refresher

    def refresh(self) -> None:
        """Run every refresher: pull-style values report their current state."""
        for owner, refresher in list(self._refreshers.items()):
            refresher(owner)


# The counters both exporters keep: Prometheus name, OpenTelemetry name, help, labels.
_COUNTERS: Final = (
    ("armor_decisions", "armor.decisions", "Rejections by layer and error code",
     ("layer", "result")),
    ("armor_rate_limit_requests", "armor.rate_limit.requests", "Rate-limit decisions by rule",
     ("policy", "result")),
    ("armor_circuit_breaker_calls", "armor.circuit_breaker.calls",
     "Calls through circuit breakers", ("breaker", "result")),
    ("armor_idempotency_requests", "armor.idempotency.requests", "Idempotency outcomes",
     ("result",)),
    ("armor_signature_verifications", "armor.signature.verifications", "Signature checks",
     ("scheme", "result")),
    ("armor_store_errors", "armor.store.errors", "Store failures by concern", ("concern",)),
)  # fmt: skip
_DURATION_LABELS: Final = ("http_request_method", "http_route", "http_response_status_code")
_HTTP_ATTRIBUTES: Final = ("http.request.method", "http.route", "http.response.status_code")
_BUCKET_TEXT: Final = tuple(repr(bound) for bound in DURATION_BUCKETS)


class _Local(Metrics):
    """What both exporters keep in the process and hand over when collected.

    Counters are plain numbers behind one lock: an exporter library's own counter costs
    several times more per call (prometheus_client takes a lock per labelled value; the
    OpenTelemetry SDK hashes the attributes of every ``add``, about 5 us). Breaker states
    and the shedding gauges are read (``refresh()``) at collection.
    """

    def __init__(self) -> None:
        super().__init__()
        self.breaker_states: dict[str, str] = {}
        self.in_flight = 0
        self.queued = 0
        # Threads may share the sink (a breaker used from worker threads): one lock,
        # held for an increment only, never across an await.
        self._lock = threading.Lock()
        # counter name -> label values -> [count]; made at first use of each label set.
        self._counts: dict[str, dict[tuple[str, ...], list[int]]] = {
            name: {} for name, _, _, _ in _COUNTERS
        }
        self._rate_cells: dict[str, dict[str, list[int]]] = {}

    def breaker_state(self, breaker: str, state: str) -> None:
        self.breaker_states[breaker] = state

    def shedding(self, in_flight: int, queued: int) -> None:
        self.in_flight = in_flight
        self.queued = queued

    def _inc(self, name: str, key: tuple[str, ...]) -> None:
        cells = self._counts[name]
        cell = cells.get(key)
        if cell is None:
            cell = cells.setdefault(key, [0])
        with self._lock:
            cell[0] += 1

    def decision(self, layer: str, result: str) -> None:
        self._inc("armor_decisions", (layer, result))

    def rate_limit(self, policy: str, result: str) -> None:
        # Inlined two-level lookup: called once per matching rule of every request.
        by_result = self._rate_cells.get(policy)
        if by_result is None:
            by_result = self._rate_cells.setdefault(policy, {})
        cell = by_result.get(result)
        if cell is None:
            cells = self._counts["armor_rate_limit_requests"]
            cell = by_result.setdefault(result, cells.setdefault((policy, result), [0]))
        with self._lock:
            cell[0] += 1

    def breaker_call(self, breaker: str, result: str) -> None:
        self._inc("armor_circuit_breaker_calls", (breaker, result))

    def idempotency(self, result: str) -> None:
        self._inc("armor_idempotency_requests", (result,))

    def signature(self, scheme: str, result: str) -> None:
        self._inc("armor_signature_verifications", (scheme, result))

    def store_error(self, concern: str) -> None:
        self._inc("armor_store_errors", (concern,))

    def _counter_values(self) -> dict[str, list[tuple[tuple[str, ...], int]]]:
        with self._lock:
            return {
                name: [(key, cell[0]) for key, cell in cells.items()]
                for name, cells in self._counts.items()
            }

    def _breaker_samples(self) -> Iterator[tuple[str, str, int]]:
        self.refresh()
        for name, current in tuple(self.breaker_states.items()):
            for state in BREAKER_STATES:
                yield name, state, int(state == current)


def _missing(extra: str, module: str) -> ConfigError:
    return ConfigError(
        f"metrics.exporter: {extra!r} needs {module}: pip install 'asgi-armor[{extra}]'"
    )


class PrometheusMetrics(_Local):
    """Prometheus exporter (``prometheus_client``), in its own registry unless given one.

    The values live in the sink and are rendered by a collector when the registry is
    collected (a scrape, ``exposition()``).

    Args:
        registry: a ``prometheus_client.CollectorRegistry``; None makes a new one, so two
            armored apps in one process never collide.

    Raises:
        ConfigError: naming ``metrics.exporter`` when prometheus_client is not installed.
    """

    #: The ``Content-Type`` of ``exposition()``.
    CONTENT_TYPE: Final = "text/plain; version=0.0.4; charset=utf-8"

    def __init__(self, registry: Any = None) -> None:
        super().__init__()
        try:
            import prometheus_client as prom
            from prometheus_client.core import (
                CounterMetricFamily,
                GaugeMetricFamily,
                HistogramMetricFamily,
            )
        except ImportError:
            raise _missing("prometheus", "prometheus_client") from None
        self.registry = prom.CollectorRegistry() if registry is None else registry
        self._prom = prom
        # (method, route, status) -> [sum, count per bucket..., count above the last]
        self._durations: dict[tuple[str, str, int], list[float]] = {}
        sink = self

        class _Collector:
            """Everything the sink holds, rendered when the registry is collected."""

            def collect(self) -> Iterator[Any]:
                counts = sink._counter_values()
                with sink._lock:
                    durations = [(key, list(cell)) for key, cell in sink._durations.items()]
                for name, _, documentation, labels in _COUNTERS:
                    family = CounterMetricFamily(name, documentation, labels=labels)
                    for key, count in counts[name]:
                        family.add_metric(key, count)
                    yield family
                state = GaugeMetricFamily(
                    "armor_circuit_breaker_state",
                    "1 for the breaker's current state, 0 for the others",
                    labels=("breaker", "state"),
                )
                for name, label, value in sink._breaker_samples():
                    state.add_metric((name, label), value)
                yield state
                yield GaugeMetricFamily(
                    "armor_shedding_in_flight", "Requests in the app", value=sink.in_flight
                )
                yield GaugeMetricFamily(
                    "armor_shedding_queued", "Requests waiting for a slot", value=sink.queued
                )
                histogram = HistogramMetricFamily(
                    "http_server_request_duration_seconds",
                    "Duration of HTTP server requests",
                    labels=_DURATION_LABELS,
                )
                for (method, route, status), cell in durations:
                    running = 0.0
                    buckets: list[tuple[str, float]] = []
                    for text, hits in zip((*_BUCKET_TEXT, "+Inf"), cell[1:], strict=True):
                        running += hits
                        buckets.append((text, running))
                    values = (method, route, _STATUS_TEXT.get(status, "0"))
                    histogram.add_metric(values, buckets, sum_value=cell[0])
                yield histogram

            def describe(self) -> list[Any]:
                return []

        self.registry.register(_Collector())

    def request(self, method: str, route: str, status: int, seconds: float) -> None:
        if method not in _METHODS:
            method = "_OTHER"  # any other spelling is one series, and one key here
        key = (method, route, status)
        cell = self._durations.get(key)
        if cell is None:
            cell = self._durations.setdefault(key, [0.0] * (len(DURATION_BUCKETS) + 2))
        # The bucket's index, plus one: cell[0] is the sum.
        index = bisect.bisect_left(DURATION_BUCKETS, seconds) + 1
        with self._lock:
            cell[0] += seconds
            cell[index] += 1

    def exposition(self) -> bytes:
        """The registry in the Prometheus text format (what ``GET /metrics`` answers)."""
        data: bytes = self._prom.generate_latest(self.registry)
        return data


class OtelMetrics(_Local):
    """OpenTelemetry exporter: instruments on an ``opentelemetry-api`` meter.

    Any SDK, reader and exporter the application installs receives them; without an SDK
    the API's no-op meter makes every call free. The counters are observable counters
    (the sink counts, the SDK reads the totals when it collects); the request duration
    is a histogram, recorded per request.

    Args:
        meter: the meter to use; else one from ``meter_provider`` (else the global one).
        meter_provider: where to get the ``asgi_armor`` meter.

    Raises:
        ConfigError: naming ``metrics.exporter`` when opentelemetry-api is not installed.
    """

    def __init__(self, meter: Any = None, meter_provider: Any = None) -> None:
        super().__init__()
        try:
            from opentelemetry import metrics as otel
        except ImportError:
            raise _missing("otel", "opentelemetry-api") from None
        if meter is None:
            provider = otel.get_meter_provider() if meter_provider is None else meter_provider
            meter = provider.get_meter("asgi_armor")
        self.meter = meter
        observation = otel.Observation
        # Attribute dicts by label values, made once: the SDK keys its series on them.
        attributes: dict[tuple[str, ...], dict[str, str]] = {}

        def attrs(names: tuple[str, ...], values: tuple[str, ...]) -> dict[str, str]:
            key = (*names, *values)
            found = attributes.get(key)
            if found is None:
                found = attributes[key] = dict(zip(names, values, strict=True))
            return found

        def counter(name: str, labels: tuple[str, ...]) -> Callable[[Any], Iterable[Any]]:
            def observe(options: Any) -> Iterable[Any]:
                values = self._counter_values()[name]
                return [observation(count, attrs(labels, key)) for key, count in values]

            return observe

        for name, otel_name, documentation, labels in _COUNTERS:
            meter.create_observable_counter(otel_name, [counter(name, labels)], "1", documentation)

        def breaker_states(options: Any) -> Iterable[Any]:
            return [
                observation(value, attrs(("breaker", "state"), (name, state)))
                for name, state, value in self._breaker_samples()
            ]

        def in_flight(options: Any) -> Iterable[Any]:
            self.refresh()
            return [observation(self.in_flight)]

        def queued(options: Any) -> Iterable[Any]:
            return [observation(self.queued)]

        meter.create_observable_gauge("armor.circuit_breaker.state", [breaker_states], "1")
        meter.create_observable_gauge("armor.shedding.in_flight", [in_flight], "1")
        meter.create_observable_gauge("armor.shedding.queued", [queued], "1")
        self._duration = meter.create_histogram(
            "http.server.request.duration",
            "s",
            "Duration of HTTP server requests",
            explicit_bucket_boundaries_advisory=list(DURATION_BUCKETS),
        )
        self._http_attributes: dict[tuple[str, str, int], dict[str, str]] = {}

    def request(self, method: str, route: str, status: int, seconds: float) -> None:
        if method not in _METHODS:
            method = "_OTHER"
        key = (method, route, status)
        found = self._http_attributes.get(key)
        if found is None:
            values = (method, route, _STATUS_TEXT.get(status, "0"))
            found = self._http_attributes[key] = dict(zip(_HTTP_ATTRIBUTES, values, strict=True))
        self._duration.record(seconds, found)


def build_metrics(entry: MetricsEntry | None) -> Metrics | None:
    """The sink ``[metrics] exporter`` names, or None when there is no ``[metrics]``.

    Raises:
        ConfigError: naming ``metrics.exporter``: unknown, or its extra is not installed.
    """
    if entry is None:
        return None
    if entry.exporter == "prometheus":
        return PrometheusMetrics()
    if entry.exporter == "otel":
        return OtelMetrics()
    raise ConfigError(f"metrics.exporter: {entry.exporter!r} is not 'prometheus' or 'otel'")


_LABEL_CACHE: Final = 4096
_LABEL_CACHE_PATH: Final = 256


class RouteLabels:
    """The ``http_route`` label of a request: the best configured pattern, or ``OTHER_ROUTE``.

    The most specific pattern wins: literal paths, then patterns with parameters, then
    prefixes (longer first), then ``*``; a request none matches is ``OTHER_ROUTE``.

    Args:
        patterns: route patterns (``"GET /api/users/{user_id}"``); duplicates are ignored.

    Raises:
        ConfigError: a pattern is invalid.
    """

    __slots__ = ("_cache", "_routes")

    def __init__(self, patterns: Iterable[str]) -> None:
        routes = [Route(p) for p in dict.fromkeys(patterns)]

        def specificity(route: Route) -> tuple[int, int, int]:
            path = route.pattern.strip().rpartition(" ")[2]
            kind = 3 if path == "*" else 2 if path.endswith("/*") else 1 if route.params else 0
            return kind, -len(path), route.methods is None

        self._routes = tuple(sorted(routes, key=specificity))
        self._cache: dict[tuple[str, str], str] = {}

    def label(self, method: str, path: str) -> str:
        """The label for ``(method, path)`` (the canonical target)."""
        key = (method, path)
        found = self._cache.get(key)
        if found is not None:
            return found
        found = OTHER_ROUTE
        for route in self._routes:
            if route.match(method, path) is not None:
                found = route.pattern
                break
        if len(path) <= _LABEL_CACHE_PATH:
            if len(self._cache) >= _LABEL_CACHE:
                # Paths with parameters are unbounded: start over rather than grow.
                self._cache.clear()
            self._cache[key] = found
        return found


class RequestMetrics:
    """Outermost layer (only with metrics): ``http.server.request.duration`` per request.

    Args:
        app: the ASGI app to wrap (``ErrorMiddleware`` and the rest).
        metrics: the sink.
        routes: the route patterns requests are labelled with.
        path: serve ``GET path`` as the Prometheus text, before every protection (the
            sink must be a ``PrometheusMetrics``).
        clock: monotonic seconds.

    Raises:
        ConfigError: ``path`` is not a path, or the sink cannot render the text format.
    """

    __slots__ = ("_clock", "_labels", "_path", "app", "metrics")

    def __init__(
        self,
        app: ASGIApp,
        *,
        metrics: Metrics,
        routes: Iterable[str] | RouteLabels = (),
        path: str | None = None,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        if path is not None:
            if not path.startswith("/"):
                raise ConfigError(f"metrics.path: {path!r} must start with '/'")
            if not isinstance(metrics, PrometheusMetrics):
                raise ConfigError(
                    "metrics.path: only the prometheus exporter serves a scrape endpoint "
                    "(OpenTelemetry exports through the SDK's reader)"
                )
        self.app = app
        self.metrics = metrics
        self._labels = routes if isinstance(routes, RouteLabels) else RouteLabels(routes)
        self._path = path
        self._clock = clock

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self.serves(scope):
            await self.scrape(scope, send)
            return
        start = self._clock()
        status = 500

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            self.observe(scope, status, start)

    def serves(self, scope: Scope) -> bool:
        """Whether ``scope`` asks for the scrape endpoint."""
        return self._path is not None and scope["path"] == self._path

    def start(self) -> float:
        """The clock reading a request's duration starts from."""
        return self._clock()

    def observe(self, scope: Scope, status: int, start: float) -> None:
        """Count one finished request (``status``: what it answered, 500 if nothing)."""
        method, path = target(scope)
        self.metrics.request(
            method, self._labels.label(method, path), status, self._clock() - start
        )

    async def scrape(self, scope: Scope, send: Send) -> None:
        """The Prometheus text for ``GET``; 405 (the envelope) for another method."""
        if scope["method"] not in ("GET", "HEAD"):
            await send_error(scope, send, MethodNotAllowed(["GET", "HEAD"]))
            return
        body = cast("PrometheusMetrics", self.metrics).exposition()
        headers = [
            (b"content-type", PrometheusMetrics.CONTENT_TYPE.encode()),
            (b"content-length", str(len(body)).encode()),
        ]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        if scope["method"] == "HEAD":
            body = b""
        await send({"type": "http.response.body", "body": body})

    def __repr__(self) -> str:
        return f"RequestMetrics(metrics={type(self.metrics).__name__})"
