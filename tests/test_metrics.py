"""The metrics sinks (docs/observability.md): names, labels, one count per rejection, no
series per client, the exporters' lazy imports and the located config errors."""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from asgi_armor import (
    ArmorConfig,
    CircuitBreaker,
    CircuitOpenError,
    ConfigError,
    ErrorMiddleware,
    Metrics,
    OtelMetrics,
    PrometheusMetrics,
    RateLimitEntry,
    armor,
)
from asgi_armor import errors as errors_module
from asgi_armor._store_policy import StorePolicy
from asgi_armor.config import MetricsEntry, SheddingConfig
from asgi_armor.metrics import LAYERS, OTHER_ROUTE, RequestMetrics, RouteLabels, build_metrics
from asgi_armor.stores.base import StoreError
from asgi_armor.stores.memory import MemoryStore
from tests.conftest import FakeClock
from tests.metrics_helpers import by_label, otel_points, otel_sum_by, scrape, series, value

pytestmark = pytest.mark.anyio


async def ok_app(scope: Any, receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


async def failing_app(scope: Any, receive: Any, send: Any) -> None:
    raise RuntimeError("boom")


def client(app: Any, ip: str = "198.51.100.7") -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=app, client=(ip, 40000))
    return httpx.AsyncClient(transport=transport, base_url="http://t")


def test_every_error_names_its_layer() -> None:
    layers = {
        cls.__name__: cls.layer
        for cls in vars(errors_module).values()
        if isinstance(cls, type) and issubclass(cls, errors_module.ArmorError)
    }
    assert layers == {
        "ArmorError": "error",
        "ValidationFailed": "input_limits",
        "InvalidJSON": "input_limits",
        "PayloadTooLarge": "input_limits",
        "URITooLong": "input_limits",
        "HeadersTooLarge": "input_limits",
        "UnsupportedMediaType": "input_limits",
        "RateLimited": "rate_limit",
        "IdempotencyKeyMissing": "idempotency",
        "IdempotencyKeyInvalid": "idempotency",
        "IdempotencyKeyInUse": "idempotency",
        "IdempotencyKeyReused": "idempotency",
        "ServiceUnavailable": "error",
        "CircuitOpenError": "breaker",
        "Overloaded": "shedding",
        "RequestTimeout": "timeout",
        "Unauthorized": "error",
        "InvalidSignature": "signature",
        "NotFound": "error",
        "MethodNotAllowed": "error",
        "HTTPError": "error",
        "InternalError": "error",
    }
    assert set(layers.values()) == set(LAYERS)


def test_the_base_sink_does_nothing() -> None:
    sink = Metrics()
    sink.decision("rate_limit", "rate_limited")
    sink.request("GET", "other", 200, 0.1)
    sink.shedding(1, 2)
    sink.rejection(CircuitOpenError(1.0), "req_1", {"type": "http"})
    sink.refresh()


def test_without_metrics_no_layer_is_added_and_nothing_is_imported() -> None:
    armored = armor(ok_app, ArmorConfig())
    assert armored.metrics is None
    assert [type(layer).__name__ for layer in armored.layers] == ["ErrorMiddleware", "InputLimits"]
    code = (
        "import sys, asgi_armor\n"
        "from asgi_armor import armor, ArmorConfig\n"
        "async def app(s, r, w): pass\n"
        "armor(app, ArmorConfig())\n"
        "print('prometheus_client' in sys.modules)"
    )
    # (opentelemetry is not checked: redis-py imports it for its own instrumentation.)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_config_builds_the_named_exporter_outermost() -> None:
    config = ArmorConfig.from_dict({"metrics": {"exporter": "prometheus"}})
    armored = armor(ok_app, config)
    assert isinstance(armored.metrics, PrometheusMetrics)
    assert [type(layer).__name__ for layer in armored.layers][:2] == [
        "RequestMetrics",
        "ErrorMiddleware",
    ]
    assert build_metrics(None) is None
    assert isinstance(build_metrics(MetricsEntry(exporter="otel")), OtelMetrics)


def test_config_mistakes_name_the_entry(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(
        ConfigError, match=r"^armor.toml: metrics.exporter: Invalid enum value 'statsd'$"
    ):
        ArmorConfig.from_dict({"metrics": {"exporter": "statsd"}}, source="armor.toml")
    with pytest.raises(ConfigError, match=r"^config: metrics.rutes: unknown setting$"):
        ArmorConfig.from_dict({"metrics": {"exporter": "otel", "rutes": []}})
    bad_route = ArmorConfig.from_dict({"metrics": {"exporter": "otel", "routes": ["GET nope"]}})
    with pytest.raises(ConfigError, match=r"^metrics.routes: route 'GET nope': the path must"):
        armor(ok_app, bad_route)
    # A missing extra is a ConfigError naming the entry and the pip command.
    monkeypatch.setitem(sys.modules, "prometheus_client", None)
    monkeypatch.setitem(sys.modules, "opentelemetry", None)
    config = ArmorConfig.from_dict({"metrics": {"exporter": "prometheus"}})
    with pytest.raises(
        ConfigError,
        match=r"^metrics.exporter: 'prometheus' needs prometheus_client: "
        r"pip install 'asgi-armor\[prometheus\]'$",
    ):
        armor(ok_app, config)
    with pytest.raises(ConfigError, match=r"pip install 'asgi-armor\[otel\]'$"):
        OtelMetrics()


def test_route_labels_prefer_the_most_specific_pattern() -> None:
    labels = RouteLabels(
        ["* /api/*", "GET /api/users/{user_id}", "GET /api/users/me", "POST /api/*", "*"]
    )
    assert labels.label("GET", "/api/users/me") == "GET /api/users/me"
    assert labels.label("GET", "/api/users/42") == "GET /api/users/{user_id}"
    assert labels.label("POST", "/api/users/42") == "POST /api/*"
    assert labels.label("DELETE", "/api/x") == "* /api/*"
    assert labels.label("GET", "/elsewhere") == "*"
    assert RouteLabels(["GET /a"]).label("GET", "/b") == OTHER_ROUTE
    with pytest.raises(ConfigError, match="route 'GET x'"):
        RouteLabels(["GET x"])


async def test_ten_thousand_clients_add_no_series() -> None:
    sink = PrometheusMetrics()
    config = ArmorConfig(
        rate_limit=[RateLimitEntry(route="* /api/*", rate="100000/minute", name="ip")]
    )
    app = armor(ok_app, config, metrics=sink)

    async def hit(ip: str, path: str, method: str = "GET") -> None:
        async with client(app, ip) as c:
            assert (await c.request(method, path)).status_code == 200

    await hit("10.0.0.1", "/api/items/0")
    before = scrape(sink.exposition().decode())
    transport_app: Any = app
    for i in range(10_000):
        # Distinct addresses and raw paths, straight through the ASGI app (httpx per
        # request would dominate the run time).
        scope = {
            "type": "http",
            "method": "GET",
            "path": f"/api/items/{i}",
            "raw_path": f"/api/items/{i}".encode(),
            "query_string": b"",
            "headers": [],
            "client": (f"10.{i // 65536}.{i // 256 % 256}.{i % 256}", 1234),
        }
        sent: list[Any] = []

        async def receive() -> Any:
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message: Any, sent: list[Any] = sent) -> None:
            sent.append(message)

        await transport_app(scope, receive, send)
        assert sent[0]["status"] == 200
    # A method outside the known set is "_OTHER", not a new series per spelling.
    await hit("10.9.9.9", "/api/items/x", "FOO1")
    await hit("10.9.9.8", "/api/items/y", "FOO2")
    after = scrape(sink.exposition().decode())
    names = {name for name, _ in after}
    grown = {key for key in after if key not in before}
    assert {dict(labels).get("http_request_method") for _, labels in grown} == {"_OTHER"}
    assert series(after) - series(before) == len(grown)
    assert len(grown) == series(after, "http_server_request_duration_seconds") - series(
        before, "http_server_request_duration_seconds"
    )
    assert value(after, "armor_rate_limit_requests_total", policy="ip", result="allowed") == 10_003
    assert all(":" not in name for name in names)
    labels = {v for _, ls in after for k, v in ls if k != "le"}
    assert not any(
        re.fullmatch(r"\d+\.\d+\.\d+\.\d+", v) or v.startswith("/api/items/") for v in labels
    )


async def test_rejections_are_counted_once_where_the_envelope_is_sent() -> None:
    sink = PrometheusMetrics()
    app = ErrorMiddleware(failing_app, metrics=sink)
    async with client(app) as c:
        response = await c.get("/x")
    assert response.status_code == 500
    samples = scrape(sink.exposition().decode())
    assert by_label(samples, "armor_decisions_total", "layer") == {"error": 1.0}
    assert value(samples, "armor_decisions_total", layer="error", result="internal_error") == 1


async def test_request_duration_uses_the_route_pattern(clock: FakeClock) -> None:
    sink = PrometheusMetrics()
    ticks = iter([10.0, 10.25])
    app = RequestMetrics(
        ErrorMiddleware(ok_app, metrics=sink),
        metrics=sink,
        routes=["GET /api/users/{user_id}"],
        clock=lambda: next(ticks),
    )
    async with client(app) as c:
        await c.get("/api/users/42")
    samples = scrape(sink.exposition().decode())
    labels = {
        "http_request_method": "GET",
        "http_route": "GET /api/users/{user_id}",
        "http_response_status_code": "200",
    }
    assert value(samples, "http_server_request_duration_seconds_count", **labels) == 1
    assert value(samples, "http_server_request_duration_seconds_sum", **labels) == 0.25
    assert value(samples, "http_server_request_duration_seconds_bucket", le="0.25", **labels) == 1
    assert value(samples, "http_server_request_duration_seconds_bucket", le="0.1", **labels) == 0


def test_breaker_gauge_and_calls(clock: FakeClock, caplog: pytest.LogCaptureFixture) -> None:
    sink = PrometheusMetrics()
    breaker = CircuitBreaker(fail_max=2, reset_timeout=30.0, name="db", clock=clock, metrics=sink)

    def states() -> dict[str, float]:
        samples = scrape(sink.exposition().decode())
        return {
            dict(labels)["state"]: v
            for (name, labels), v in samples.items()
            if name == "armor_circuit_breaker_state"
        }

    assert states() == {"closed": 1, "open": 0, "half_open": 0}
    with breaker:
        pass
    for _ in range(2):
        with pytest.raises(ValueError, match="db down"), breaker:
            raise ValueError("db down")
    token = errors_module._REQUEST_ID.set("req_abc")
    caplog.set_level(logging.INFO, "asgi_armor")
    try:
        with pytest.raises(CircuitOpenError), breaker:
            pass
        clock.advance(30.0)
        # Collecting applies the due open -> half_open, without any request.
        assert states() == {"closed": 0, "open": 0, "half_open": 1}
    finally:
        errors_module._REQUEST_ID.reset(token)
    with breaker:
        pass
    assert states() == {"closed": 1, "open": 0, "half_open": 0}
    samples = scrape(sink.exposition().decode())
    assert by_label(samples, "armor_circuit_breaker_calls_total", "result") == {
        "success": 2,
        "failure": 2,
        "rejected": 1,
    }
    assert any(
        "circuit breaker 'db' is half_open [request_id=req_abc]" in r.getMessage()
        for r in caplog.records
    )


def test_store_errors_are_counted_and_the_503_names_its_layer() -> None:
    sink = PrometheusMetrics()
    policy = StorePolicy(
        "deny",
        what="x store",
        allowing="a",
        denying="d",
        logger=logging.getLogger("test"),
        concern="idempotency",
        metrics=sink,
    )
    with pytest.raises(errors_module.ServiceUnavailable) as raised:
        policy.failed(StoreError("down"))
    assert raised.value.layer == "idempotency"
    assert errors_module.ServiceUnavailable().layer == "error"
    samples = scrape(sink.exposition().decode())
    assert value(samples, "armor_store_errors_total", concern="idempotency") == 1


async def test_shedding_gauges_are_read_when_collected() -> None:
    sink = PrometheusMetrics()
    config = ArmorConfig(shedding=SheddingConfig(max_concurrent=2))
    armored = armor(ok_app, config, metrics=sink)
    limit = armored.layers[3]
    limit.limiter._in_flight = 2  # type: ignore[attr-defined]
    samples = scrape(sink.exposition().decode())
    assert value(samples, "armor_shedding_in_flight") == 2
    assert value(samples, "armor_shedding_queued") == 0
    limit.limiter._in_flight = 0  # type: ignore[attr-defined]


async def test_otel_exporter_uses_dotted_names_and_http_attributes(clock: FakeClock) -> None:
    reader = InMemoryMetricReader()
    sink = OtelMetrics(meter_provider=MeterProvider(metric_readers=[reader]))
    breaker = CircuitBreaker(fail_max=1, name="db", clock=clock, metrics=sink)
    app = RequestMetrics(
        ErrorMiddleware(failing_app, metrics=sink), metrics=sink, routes=["GET /x"]
    )
    async with client(app) as c:
        await c.get("/x")
    with pytest.raises(ValueError, match="db down"), breaker:
        raise ValueError("db down")
    points = otel_points(reader)
    assert otel_sum_by(points, "armor.decisions", "layer") == {"error": 1}
    assert otel_sum_by(points, "armor.circuit_breaker.calls", "result") == {"failure": 1}
    states = {a["state"]: p.value for a, p in points["armor.circuit_breaker.state"]}
    assert states == {"closed": 0, "open": 1, "half_open": 0}
    [(attributes, point)] = points["http.server.request.duration"]
    assert dict(attributes) == {
        "http.request.method": "GET",
        "http.route": "GET /x",
        "http.response.status_code": "500",
    }
    assert point.count == 1


DOCS = Path(__file__).resolve().parents[1] / "docs"


def _exported_names() -> set[str]:
    text = PrometheusMetrics().exposition().decode()
    names = set(re.findall(r"^# TYPE (\S+) (?:counter|gauge|histogram)$", text, re.MULTILINE))
    # Counters are exposed as NAME_total, histograms as NAME_bucket/_count/_sum.
    return {n for n in names if not n.endswith("_created")}


def test_the_docs_and_the_grafana_dashboard_name_only_real_metrics() -> None:
    names = _exported_names()
    assert names == {
        "armor_decisions_total",
        "armor_rate_limit_requests_total",
        "armor_circuit_breaker_calls_total",
        "armor_idempotency_requests_total",
        "armor_signature_verifications_total",
        "armor_store_errors_total",
        "http_server_request_duration_seconds",
        "armor_circuit_breaker_state",
        "armor_shedding_in_flight",
        "armor_shedding_queued",
    }
    page = (DOCS / "observability.md").read_text()
    assert [n for n in sorted(names) if f"`{n}`" not in page] == []
    dashboard = json.loads((DOCS / "grafana-dashboard.json").read_text())
    used = {
        name
        for panel in dashboard["panels"]
        for target in panel["targets"]
        for name in re.findall(r"\b(?:armor|http_server)_[a-z_]+", target["expr"])
    }
    histogram = "http_server_request_duration_seconds"
    known = names | {f"{histogram}_bucket", f"{histogram}_count", f"{histogram}_sum"}
    assert used - known == set()
    # Every family is on the dashboard.
    assert {n for n in names if not any(u.startswith(n) for u in used)} == set()


async def test_the_scrape_path_is_served_before_every_protection() -> None:
    config = ArmorConfig.from_dict(
        {
            "metrics": {"exporter": "prometheus", "path": "/metrics"},
            "rate_limit": [{"route": "* /*", "rate": "1/minute", "name": "all"}],
            "shedding": {"max_concurrent": 1},
        }
    )
    app = armor(ok_app, config)
    async with client(app) as c:
        assert (await c.get("/anything")).status_code == 200
        assert (await c.get("/anything")).status_code == 429
        scrapes = [await c.get("/metrics") for _ in range(3)]
        refused = await c.post("/metrics")
        head = await c.head("/metrics")
    assert [r.status_code for r in scrapes] == [200, 200, 200]
    assert "ratelimit" not in {k.lower() for k in scrapes[0].headers}
    assert scrapes[0].headers["content-type"] == PrometheusMetrics.CONTENT_TYPE
    samples = scrape(scrapes[-1].text)
    assert value(samples, "armor_decisions_total", layer="rate_limit", result="rate_limited") == 1
    assert refused.status_code == 405
    assert refused.json()["error"] == "method_not_allowed"
    assert refused.headers["allow"] == "GET, HEAD"
    assert head.status_code == 200
    assert head.content == b""
    with pytest.raises(ConfigError, match=r"^metrics.path: only the prometheus exporter"):
        armor(ok_app, ArmorConfig.from_dict({"metrics": {"exporter": "otel", "path": "/m"}}))
    with pytest.raises(ConfigError, match=r"^metrics.path: 'metrics' must start with '/'$"):
        armor(
            ok_app,
            ArmorConfig.from_dict({"metrics": {"exporter": "prometheus", "path": "metrics"}}),
        )


class DownStore(MemoryStore):
    """A rate-limit store that cannot answer."""

    async def hit_buckets(self, *args: Any, **kwargs: Any) -> Any:
        raise StoreError("connection refused")


@pytest.mark.parametrize("policy", ["allow", "deny"])
async def test_a_failing_rate_limit_store_is_counted_logged_and_labelled(
    policy: str, caplog: pytest.LogCaptureFixture
) -> None:
    sink = PrometheusMetrics()
    config = ArmorConfig.from_dict(
        {
            "rate_limit": [
                {"route": "* /api/*", "rate": "10/minute", "name": "ip"},
                {"route": "GET /api/x", "rate": "10/minute", "name": "x"},
            ],
            "rate_limit_on_store_error": policy,
        }
    )
    app = armor(ok_app, config, metrics=sink, store=DownStore())
    with caplog.at_level(logging.WARNING, "asgi_armor"):
        async with client(app) as c:
            response = await c.get("/api/x")
    samples = scrape(sink.exposition().decode())
    assert value(samples, "armor_rate_limit_requests_total", policy="ip", result="store_error") == 1
    assert value(samples, "armor_rate_limit_requests_total", policy="x", result="store_error") == 1
    assert value(samples, "armor_store_errors_total", concern="rate_limit") == 1
    request_id = response.headers["x-request-id"]
    [line] = [r.getMessage() for r in caplog.records if "rate-limit store" in r.getMessage()]
    assert f"[request_id={request_id}]" in line
    decisions = by_label(samples, "armor_decisions_total", "layer")
    if policy == "allow":
        assert response.status_code == 200
        assert decisions == {}
    else:
        assert response.status_code == 503
        assert decisions == {"rate_limit": 1}


async def test_idempotency_outcomes_include_the_key_in_use() -> None:
    sink = PrometheusMetrics()
    entered, release = anyio.Event(), anyio.Event()

    async def slow_app(scope: Any, receive: Any, send: Any) -> None:
        entered.set()
        await release.wait()
        await ok_app(scope, receive, send)

    config = ArmorConfig.from_dict({"idempotency": [{"route": "POST /pay"}]})
    app = armor(slow_app, config, metrics=sink)
    headers = {"Idempotency-Key": "k1", "content-type": "application/json"}
    statuses: list[int] = []
    async with client(app) as c:

        async def first() -> None:
            statuses.append((await c.post("/pay", content=b"{}", headers=headers)).status_code)

        async with anyio.create_task_group() as tg:
            tg.start_soon(first)
            await entered.wait()
            second = await c.post("/pay", content=b"{}", headers=headers)
            release.set()
        replay = await c.post("/pay", content=b"{}", headers=headers)
        invalid = await c.post("/pay", content=b"{}", headers={"Idempotency-Key": ""})
    assert second.status_code == 409
    assert statuses == [200]
    assert replay.status_code == 200
    assert invalid.status_code == 400
    samples = scrape(sink.exposition().decode())
    assert by_label(samples, "armor_idempotency_requests_total", "result") == {
        "executed": 1,
        "in_use": 1,
        "replayed": 1,
        "invalid": 1,
    }
    assert by_label(samples, "armor_decisions_total", "result") == {
        "idempotency_key_in_use": 1,
        "idempotency_key_invalid": 1,
    }


def test_breakers_registered_again_or_dropped_leave_no_refresher() -> None:
    import gc

    from asgi_armor import CircuitBreaker

    sink = Metrics()
    breaker = CircuitBreaker(name="db")
    for _ in range(100):
        breaker.metrics = sink
    assert len(sink._refreshers) == 1
    for index in range(100):
        CircuitBreaker(name=f"per-request-{index}", metrics=sink)
    gc.collect()
    assert len(sink._refreshers) == 1
    sink.refresh()  # the one left still reports
