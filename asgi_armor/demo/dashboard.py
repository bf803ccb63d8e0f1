"""The demo's live view: ``GET /metrics``, ``GET /demo/state`` and the ``GET /`` dashboard.

``DemoMetrics`` is a tee in front of the Prometheus exporter: it forwards every event and
keeps what the dashboard shows (rejections by layer, breaker states, the shedding gauges,
the last rejections with their request ids). The ring of rejections lives here, in the
demo, not in the core exporters: a production sink keeps no per-request records.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from importlib import resources
from typing import TYPE_CHECKING, Any

import msgspec
from starlette.responses import Response
from starlette.routing import Route

from asgi_armor.metrics import LAYERS, Metrics, PrometheusMetrics, RouteLabels
from asgi_armor.routes import target

if TYPE_CHECKING:
    from starlette.requests import Request

    from asgi_armor._types import Scope
    from asgi_armor.demo.services import FaultBoard
    from asgi_armor.errors import ArmorError

__all__ = ["LAST_REJECTIONS", "DemoMetrics", "Rejection", "dashboard_routes", "route_patterns"]

#: How many rejections ``/demo/state`` lists, newest first.
LAST_REJECTIONS = 20

_json = msgspec.json.Encoder()


class Rejection(msgspec.Struct, frozen=True):
    """One refused request, as the dashboard lists it."""

    time: float
    request_id: str
    status: int
    error: str
    layer: str
    route: str


class DemoMetrics(Metrics):
    """Forward every event to ``inner`` and keep the dashboard's view of them.

    Args:
        inner: the exporter ``GET /metrics`` renders.
        routes: the app's route patterns, to name a rejection's route.
        wall_clock: Unix time, for the rejection list's time column only.
    """

    def __init__(
        self,
        inner: PrometheusMetrics,
        *,
        routes: Iterable[str] = (),
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        super().__init__()
        self.inner = inner
        self.labels = RouteLabels(routes)
        self.wall_clock = wall_clock
        self.by_layer: dict[str, int] = dict.fromkeys(LAYERS, 0)
        self.rate_limits: dict[str, dict[str, int]] = {}
        self.breakers: dict[str, str] = {}
        self.in_flight = 0
        self.queued = 0
        self.last: deque[Rejection] = deque(maxlen=LAST_REJECTIONS)

    def rejection(self, error: ArmorError, request_id: str, scope: Scope) -> None:
        route = self.labels.label(*target(scope))
        self.last.appendleft(
            Rejection(self.wall_clock(), request_id, error.status, error.error, error.layer, route)
        )
        self.decision(error.layer, error.error)

    def decision(self, layer: str, result: str) -> None:
        self.by_layer[layer] = self.by_layer.get(layer, 0) + 1
        self.inner.decision(layer, result)

    def rate_limit(self, policy: str, result: str) -> None:
        counts = self.rate_limits.setdefault(policy, {})
        counts[result] = counts.get(result, 0) + 1
        self.inner.rate_limit(policy, result)

    def breaker_state(self, breaker: str, state: str) -> None:
        self.breakers[breaker] = state
        self.inner.breaker_state(breaker, state)

    def breaker_call(self, breaker: str, result: str) -> None:
        self.inner.breaker_call(breaker, result)

    def idempotency(self, result: str) -> None:
        self.inner.idempotency(result)

    def signature(self, scheme: str, result: str) -> None:
        self.inner.signature(scheme, result)

    def shedding(self, in_flight: int, queued: int) -> None:
        self.in_flight, self.queued = in_flight, queued
        self.inner.shedding(in_flight, queued)

    def store_error(self, concern: str) -> None:
        self.inner.store_error(concern)

    def request(self, method: str, route: str, status: int, seconds: float) -> None:
        self.inner.request(method, route, status, seconds)

    def watch(self, owner: Any, refresher: Callable[[Any], object]) -> None:
        # The refresher reports through this tee, which forwards: register it on both, so
        # a scrape of the inner registry sees current values too.
        super().watch(owner, refresher)
        self.inner.watch(owner, refresher)

    def state(self, faults: Mapping[str, str]) -> dict[str, Any]:
        """What ``GET /demo/state`` answers."""
        self.refresh()
        return {
            "breakers": dict(self.breakers),
            "decisions": dict(self.by_layer),
            "rate_limits": {name: dict(counts) for name, counts in self.rate_limits.items()},
            "shedding": {"in_flight": self.in_flight, "queued": self.queued},
            "rejections": [msgspec.to_builtins(r) for r in self.last],
            "faults": dict(faults),
        }


def route_patterns(routes: Iterable[object]) -> list[str]:
    """``"GET /api/users/{user_id}"`` patterns of Starlette routes (HEAD left implicit)."""
    patterns = []
    for route in routes:
        if not isinstance(route, Route):
            continue  # mounts and websocket routes: labelled "other"
        methods = sorted((route.methods or {"GET"}) - {"HEAD"}) or ["GET"]
        patterns.append(f"{'|'.join(methods)} {route.path}")
    return patterns


_PAGE = resources.files("asgi_armor.demo").joinpath("dashboard.html").read_bytes()


def dashboard_routes(metrics: DemoMetrics, board: FaultBoard) -> list[Route]:
    """``GET /`` (the page), ``GET /metrics`` (Prometheus text), ``GET /demo/state`` (JSON)."""

    async def page(request: Request) -> Response:
        return Response(_PAGE, media_type="text/html; charset=utf-8")

    async def scrape(request: Request) -> Response:
        return Response(
            metrics.inner.exposition(),
            headers={"Content-Type": PrometheusMetrics.CONTENT_TYPE},
        )

    async def state(request: Request) -> Response:
        faults = {name: fault.mode for name, fault in board.faults.items()}
        return Response(_json.encode(metrics.state(faults)), media_type="application/json")

    return [
        Route("/", page, methods=["GET"]),
        Route("/metrics", scrape, methods=["GET"]),
        Route("/demo/state", state, methods=["GET"]),
    ]
