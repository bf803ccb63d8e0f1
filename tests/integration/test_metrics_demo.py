"""The demo's metrics end to end (docs/observability.md): every kind of rejection driven
through the demo is counted once under its layer, read back with Prometheus's own text
parser from ``GET /metrics`` and, for the same scenario, from the OpenTelemetry SDK's
in-memory reader; the db breaker's gauge follows closed -> open -> half_open -> closed on
an injected clock."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from asgi_armor import ArmorConfig, ConcurrencyLimit, OtelMetrics, armor
from asgi_armor.demo import create_demo
from asgi_armor.demo.app import BUNDLED_CONFIG, Demo
from asgi_armor.stack import Armored
from tests.conftest import FakeClock
from tests.envelope import assert_envelope
from tests.metrics_helpers import by_label, otel_points, otel_sum_by, scrape

pytestmark = pytest.mark.anyio

#: One of each rejection the scenario drives, by layer.
EXPECTED_DECISIONS = {
    "input_limits": 2,  # 422 validation_error, 413 payload_too_large
    "rate_limit": 1,  # 429
    "signature": 2,  # 401 signature_mismatch, 401 replayed
    "idempotency": 2,  # 400 idempotency_key_missing, 422 idempotency_key_reused
    "error": 5,  # the five 500s of the failing database that open the breaker
    "breaker": 1,  # 503 from the open breaker
    "timeout": 1,  # 504
    "shedding": 1,  # 503 overloaded
}
EXPECTED_STATES = ["closed", "open", "half_open", "closed"]

EXPECTED_IDEMPOTENCY = {
    "missing": 1,
    "executed": 1,
    "reused": 1,
}
EXPECTED_SIGNATURES = {
    "valid": 1,
    "replayed": 1,
    "invalid": 1,
}
EXPECTED_CALLS = {
    "failure": 5,
    "rejected": 1,
    "success": 1,
}


def demo_config(tmp_path: Path) -> Path:
    """The bundled config with a short search budget and one request in flight at most."""
    text = BUNDLED_CONFIG.read_text()
    text = text.replace("seconds = 5", "seconds = 0.2")
    text = text.replace("max_concurrent = 64\nmax_queue = 256", "max_concurrent = 1\nmax_queue = 0")
    assert "max_queue = 0" in text
    assert "seconds = 0.2" in text
    path = tmp_path / "armor.toml"
    path.write_text(text)
    return path


def client_for(app: Any) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=app, client=("198.51.100.20", 50000))
    return httpx.AsyncClient(transport=transport, base_url="http://demo")


async def drive(
    client: httpx.AsyncClient,
    armored: Armored,
    clock: FakeClock,
    breaker_state: Callable[[], Awaitable[str]],
) -> list[str]:
    """Every rejection once (plus the 500s that open the breaker); the breaker's states."""
    assert_envelope(
        await client.post("/api/users", json={"email": "nope", "name": "Ada"}),
        422,
        "validation_error",
    )
    assert_envelope(
        await client.post(
            "/api/users", content=b"x" * 70_000, headers={"content-type": "application/json"}
        ),
        413,
        "payload_too_large",
    )
    for _ in range(10):
        assert (await client.post("/api/expensive-operation")).status_code == 200
    assert_envelope(await client.post("/api/expensive-operation"), 429, "rate_limited")

    body = b'{"id": "evt_1"}'
    signed = {
        "content-type": "application/json",
        "X-Signature": hmac.new(b"demo-webhook-secret", body, hashlib.sha256).hexdigest(),
    }
    assert (await client.post("/api/webhooks/payment", content=body, headers=signed)).status_code
    assert_envelope(
        await client.post("/api/webhooks/payment", content=body, headers=signed),
        401,
        "invalid_signature",
    )
    assert_envelope(
        await client.post(
            "/api/webhooks/payment",
            content=body,
            headers={**signed, "X-Signature": "0" * 64},
        ),
        401,
        "invalid_signature",
    )

    payment = {"amount": 1000, "currency": "eur"}
    keyed = {"Idempotency-Key": "order-1"}
    assert_envelope(
        await client.post("/api/payments", json=payment), 400, "idempotency_key_missing"
    )
    assert (await client.post("/api/payments", json=payment, headers=keyed)).status_code == 201
    assert_envelope(
        await client.post("/api/payments", json={**payment, "amount": 5}, headers=keyed),
        422,
        "idempotency_key_reused",
    )

    states = [await breaker_state()]
    await client.put("/demo/faults/db", json={"mode": "fail"})
    for _ in range(5):
        assert_envelope(await client.get("/api/users/1"), 500, "internal_error")
    assert_envelope(await client.get("/api/users/1"), 503, "service_unavailable")
    states.append(await breaker_state())
    clock.advance(30.0)
    states.append(await breaker_state())  # collected: half_open without a request
    await client.put("/demo/faults/db", json={"mode": "ok"})
    assert (await client.get("/api/users/1")).status_code == 200
    states.append(await breaker_state())

    # One slow search holds the only slot until its 0.2 s budget runs out (504); a request
    # arriving meanwhile is shed (503).
    await client.put("/demo/faults/search", json={"mode": "slow", "delay": 5})
    limit = next(layer for layer in armored.layers if isinstance(layer, ConcurrencyLimit))
    responses: dict[str, httpx.Response] = {}

    async def slow_search() -> None:
        responses["search"] = await client.get("/api/search", params={"q": "a"})

    async with anyio.create_task_group() as tg:
        tg.start_soon(slow_search)
        # Every other task is blocked: the search is asleep in the app, holding the slot.
        await anyio.wait_all_tasks_blocked()
        assert limit.in_flight == 1
        # The dashboard's routes are exempt from shedding: served while the API sheds.
        for path in ("/metrics", "/demo/state", "/"):
            assert (await client.get(path)).status_code == 200
        responses["shed"] = await client.get("/api/users/2")
    assert_envelope(responses["search"], 504, "timeout")
    assert_envelope(responses["shed"], 503, "overloaded")
    return states


async def test_prometheus_counts_every_rejection_once(tmp_path: Path) -> None:
    clock = FakeClock()
    app, _ = create_demo(config_path=demo_config(tmp_path), clock=clock)
    assert isinstance(app, Armored)
    async with client_for(app) as client:

        async def breaker_state() -> str:
            samples = scrape((await client.get("/metrics")).text)
            [state] = [
                dict(labels)["state"]
                for (name, labels), v in samples.items()
                if name == "armor_circuit_breaker_state" and v == 1
            ]
            return state

        states = await drive(client, app, clock, breaker_state)
        scraped = await client.get("/metrics")
        state = (await client.get("/demo/state")).json()
    assert scraped.headers["content-type"].startswith("text/plain; version=0.0.4")
    samples = scrape(scraped.text)
    assert states == EXPECTED_STATES
    assert by_label(samples, "armor_decisions_total", "layer") == EXPECTED_DECISIONS
    assert by_label(samples, "armor_idempotency_requests_total", "result") == EXPECTED_IDEMPOTENCY
    assert by_label(samples, "armor_signature_verifications_total", "result") == EXPECTED_SIGNATURES
    assert by_label(samples, "armor_circuit_breaker_calls_total", "result") == EXPECTED_CALLS
    rate = {
        (dict(labels)["policy"], dict(labels)["result"]): v
        for (name, labels), v in samples.items()
        if name == "armor_rate_limit_requests_total"
    }
    assert rate[("expensive", "allowed")] == 10
    assert rate[("expensive", "limited")] == 1
    # The dashboard's JSON agrees with the scrape, and lists the last rejections.
    assert state["decisions"] == EXPECTED_DECISIONS
    assert state["breakers"] == {"db": "closed"}
    assert state["shedding"] == {"in_flight": 0, "queued": 0}
    newest = state["rejections"][0]
    assert newest["status"] in (503, 504)
    assert [r["error"] for r in state["rejections"]].count("rate_limited") == 1
    assert {r["route"] for r in state["rejections"]} >= {
        "POST /api/expensive-operation",
        "GET /api/users/{user_id}",
        "GET /api/search",
    }
    assert all(r["request_id"].startswith("req_") for r in state["rejections"])


async def test_otel_reader_gets_the_same_counts(tmp_path: Path) -> None:
    clock = FakeClock()
    reader = InMemoryMetricReader()
    sink = OtelMetrics(meter_provider=MeterProvider(metric_readers=[reader]))
    demo = Demo(clock=clock)
    demo.db_breaker.metrics = sink
    app = armor(demo.app(), ArmorConfig.from_toml(demo_config(tmp_path)), metrics=sink)
    async with client_for(app) as client:

        async def breaker_state() -> str:
            points = otel_points(reader)
            [state] = [a["state"] for a, p in points["armor.circuit_breaker.state"] if p.value]
            return str(state)

        states = await drive(client, app, clock, breaker_state)
    points = otel_points(reader)
    assert states == EXPECTED_STATES
    assert otel_sum_by(points, "armor.decisions", "layer") == EXPECTED_DECISIONS
    assert otel_sum_by(points, "armor.idempotency.requests", "result") == EXPECTED_IDEMPOTENCY
    assert otel_sum_by(points, "armor.signature.verifications", "result") == EXPECTED_SIGNATURES
    assert otel_sum_by(points, "armor.circuit_breaker.calls", "result") == EXPECTED_CALLS
    routes = {a["http.route"] for a, _ in points["http.server.request.duration"]}
    assert "GET /api/users/{user_id}" in routes
    assert not any(route.startswith("/") for route in routes)
