"""One armor.toml, five frameworks, real uvicorn: the same protections and the same error bytes.

The same API (``frameworks_apps``) is written for Starlette, FastAPI, Quart, Litestar and
as a bare ASGI callable; each is wrapped by ``armor(app, config)`` with ONE config loaded
from an ``armor.toml``, served by a real uvicorn and called over HTTP. Every scenario is
checked on every framework, then the error bodies are compared across frameworks: once the
request id is normalised they must be the same bytes (only the apps' own payloads differ).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import msgspec
import pytest

from asgi_armor import ArmorConfig, HexHmac, armor, sign
from tests.integration.conftest import serve
from tests.integration.frameworks_apps import BOOM_TEXT, BUILDERS, Service

FRAMEWORKS = list(BUILDERS)
SECRET_ENV = "ARMOR_FRAMEWORKS_WEBHOOK_SECRET"
SECRET = "frameworks-test-secret"
TOTAL_BUDGET = 60.0

ARMOR_TOML = f"""
store = "memory"

[limits]
max_body_bytes = 65_536
json_routes = ["POST /api/users", "POST /api/payments"]

[[rate_limit]]
name = "items"
route = "GET /api/items"
rate = "3/minute"
key = "ip"

[[idempotency]]
route = "POST /api/payments"
ttl = "1h"

[[timeout]]
route = "GET /api/slow"
seconds = 0.5

[[signature]]
route = "POST /api/webhook"
scheme = "hex-hmac"
header = "X-Signature"
secret_env = "{SECRET_ENV}"
"""

#: scenario -> (status, error type) for every error response.
ERRORS: dict[str, tuple[int, str]] = {
    "items_limited": (429, "rate_limited"),
    "items_wrong_method": (405, "method_not_allowed"),
    "users_invalid": (422, "validation_error"),
    "users_bad_json": (400, "invalid_json"),
    "payments_missing_key": (400, "idempotency_key_missing"),
    "payments_reused_key": (422, "idempotency_key_reused"),
    "db": (503, "service_unavailable"),
    "slow": (504, "timeout"),
    "webhook_bad_signature": (401, "invalid_signature"),
    "not_found": (404, "not_found"),
    "not_found_outside_api": (404, "not_found"),
    "boom": (500, "internal_error"),
}

TRACE_ID = "trace-42.abc:def"


class Capture(logging.Handler):
    """Collects every record of WARNING or above, from any thread."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []
        self.lock_ = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        with self.lock_:
            self.records.append(record)

    def snapshot(self) -> list[logging.LogRecord]:
        with self.lock_:
            return list(self.records)


@dataclass
class Run:
    """What one framework answered, what its service did, and what the server logged."""

    framework: str
    service: Service
    responses: dict[str, httpx.Response] = field(default_factory=dict)
    items: list[httpx.Response] = field(default_factory=list)
    lifespan_while_serving: list[str] = field(default_factory=list)
    slow_outcomes_at_504: list[str] = field(default_factory=list)
    boom_logs: list[logging.LogRecord] = field(default_factory=list)
    all_logs: list[logging.LogRecord] = field(default_factory=list)


def envelope(response: httpx.Response) -> dict[str, object]:
    data = msgspec.json.decode(response.content)
    assert isinstance(data, dict)
    return data


def normalised(response: httpx.Response) -> bytes:
    request_id = response.headers["x-request-id"]
    return response.content.replace(request_id.encode(), b"<request-id>")


def wait_for(predicate: object, timeout: float = 2.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate() and time.monotonic() < deadline:  # type: ignore[operator]
        time.sleep(0.01)


def exercise(url: str, run: Run, capture: Capture) -> None:
    """Every scenario, in order, against one served app."""
    r = run.responses
    with httpx.Client(base_url=url, timeout=10.0) as client:
        run.items = [client.get("/api/items") for _ in range(3)]
        r["items_limited"] = client.get("/api/items")
        r["items_wrong_method"] = client.delete("/api/items")

        r["users_ok"] = client.post(
            "/api/users", json={"email": "  Ada@Example.COM ", "name": "Ada  Lovelace", "age": 36}
        )
        r["users_invalid"] = client.post("/api/users", json={"email": "nope", "age": 200})
        r["users_bad_json"] = client.post(
            "/api/users", content=b'{"email": ', headers={"content-type": "application/json"}
        )

        r["payments_missing_key"] = client.post("/api/payments", json={"amount": 100})
        key = {"Idempotency-Key": "order-1"}
        r["payments_first"] = client.post("/api/payments", json={"amount": 100}, headers=key)
        r["payments_replay"] = client.post("/api/payments", json={"amount": 100}, headers=key)
        r["payments_reused_key"] = client.post("/api/payments", json={"amount": 999}, headers=key)

        r["db"] = client.get("/api/db")
        r["db_traced"] = client.get("/api/db", headers={"X-Request-ID": TRACE_ID})
        r["slow"] = client.get("/api/slow")
        run.slow_outcomes_at_504 = list(run.service.slow_outcomes)

        body = b'{"event": "payment.succeeded", "id": "evt_1"}'
        r["webhook_bad_signature"] = client.post(
            "/api/webhook", content=body, headers={"X-Signature": "ab" * 32}
        )
        signed = sign(body, SECRET, scheme=HexHmac(header="X-Signature"))
        r["webhook_ok"] = client.post("/api/webhook", content=body, headers=signed)

        r["not_found"] = client.get("/api/nope")
        r["not_found_outside_api"] = client.get("/nope/deeper")

        before = len(capture.snapshot())
        r["boom"] = client.get("/api/boom")
        # Some frameworks log after the response is sent: wait for the record, then make
        # one more round trip so that a second record, if any, would be there too.
        wait_for(lambda: len(capture.snapshot()) > before)
        client.get("/api/nope")
        run.boom_logs = capture.snapshot()[before:]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Run]:
    """All five apps, wrapped by one config, served and exercised in turn."""
    started = time.monotonic()
    path: Path = tmp_path_factory.mktemp("frameworks") / "armor.toml"
    path.write_text(ARMOR_TOML, encoding="utf-8")
    capture = Capture()
    # uvicorn's loggers do not propagate to the root logger: listen on both.
    watched = [logging.getLogger(), logging.getLogger("uvicorn")]
    for logger in watched:
        logger.addHandler(capture)
    results: dict[str, Run] = {}
    try:
        with pytest.MonkeyPatch.context() as monkeypatch:
            monkeypatch.setenv(SECRET_ENV, SECRET)
            config = ArmorConfig.from_toml(path)
            for framework, build in BUILDERS.items():
                service = Service()
                run = Run(framework, service)
                first = len(capture.snapshot())
                # lifespan "on": armor must pass the lifespan scope through to the app.
                with serve(armor(build(service), config), lifespan="on") as url:
                    run.lifespan_while_serving = list(service.lifespan)
                    exercise(url, run, capture)
                run.all_logs = capture.snapshot()[first:]
                results[framework] = run
    finally:
        for logger in watched:
            logger.removeHandler(capture)
    elapsed = time.monotonic() - started
    assert elapsed < TOTAL_BUDGET, f"five frameworks took {elapsed:.1f}s"
    return results


@pytest.mark.parametrize("framework", FRAMEWORKS)
@pytest.mark.parametrize("scenario", list(ERRORS))
def test_error_envelope(runs: dict[str, Run], framework: str, scenario: str) -> None:
    response = runs[framework].responses[scenario]
    status, error = ERRORS[scenario]
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    data = envelope(response)
    assert data["error"] == error
    assert isinstance(data["message"], str)
    assert data["message"]
    assert isinstance(data["details"], list)
    for detail in data["details"]:
        assert set(detail) == {"code", "message", "field"}
    assert response.headers["x-request-id"] == data["request_id"]
    assert str(data["request_id"]).startswith("req_")
    assert int(response.headers["content-length"]) == len(response.content)


@pytest.mark.parametrize("scenario", list(ERRORS))
def test_error_bodies_are_the_same_bytes_on_every_framework(
    runs: dict[str, Run], scenario: str
) -> None:
    bodies = {name: normalised(run.responses[scenario]) for name, run in runs.items()}
    reference = bodies["bare"]
    assert all(body == reference for body in bodies.values()), bodies
    headers = {
        name: (
            run.responses[scenario].headers["content-type"],
            run.responses[scenario].headers["content-length"],
        )
        for name, run in runs.items()
    }
    assert len(set(headers.values())) == 1, headers


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_rate_limit(runs: dict[str, Run], framework: str) -> None:
    run = runs[framework]
    assert [r.status_code for r in run.items] == [200, 200, 200]
    assert [r.headers["x-ratelimit-remaining"] for r in run.items] == ["2", "1", "0"]
    for response in run.items:
        assert response.headers["x-ratelimit-limit"] == "3"
        assert int(response.headers["x-ratelimit-reset"]) > time.time() - 5
        assert response.headers["ratelimit-policy"] == '"items";q=3;w=60'
        assert response.headers["ratelimit"].startswith('"items";r=')
        assert response.headers["x-request-id"]
    limited = run.responses["items_limited"]
    assert limited.headers["x-ratelimit-limit"] == "3"
    assert limited.headers["x-ratelimit-remaining"] == "0"
    assert 1 <= int(limited.headers["retry-after"]) <= 20
    assert limited.headers["ratelimit"].startswith('"items";r=0;t=')


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_validation_errors_raised_in_the_route(runs: dict[str, Run], framework: str) -> None:
    responses = runs[framework].responses
    ok = responses["users_ok"]
    assert ok.status_code == 201
    assert ok.json() == {"id": 1, "email": "ada@example.com", "name": "Ada Lovelace", "age": 36}
    assert envelope(responses["users_invalid"])["details"] == [
        {"code": "invalid_email", "message": "Email format is invalid", "field": "email"},
        {"code": "required", "message": "This field is required", "field": "name"},
        {"code": "out_of_range", "message": "Must be >= 0 and <= 150", "field": "age"},
    ]
    assert envelope(responses["users_bad_json"])["message"] == "Request body is not valid JSON"


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_idempotency(runs: dict[str, Run], framework: str) -> None:
    run = runs[framework]
    first, replay = run.responses["payments_first"], run.responses["payments_replay"]
    assert first.status_code == 201
    assert first.json() == {"payment_id": "pay_1", "amount": 100}
    assert "idempotent-replayed" not in first.headers
    assert replay.status_code == 201
    assert replay.headers["idempotent-replayed"] == "true"
    assert replay.content == first.content
    assert replay.headers["x-request-id"] != first.headers["x-request-id"]
    assert run.service.payments == 1


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_breaker_open_in_the_route(runs: dict[str, Run], framework: str) -> None:
    responses = runs[framework].responses
    assert responses["db"].headers["retry-after"] == "30"
    assert envelope(responses["db"])["message"] == "Service temporarily unavailable"
    traced = responses["db_traced"]
    assert traced.status_code == 503
    # The id the framework rendered is the one ErrorMiddleware chose: same scope state.
    assert traced.headers["x-request-id"] == TRACE_ID
    assert envelope(traced)["request_id"] == TRACE_ID


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_timeout_cancels_the_route(runs: dict[str, Run], framework: str) -> None:
    run = runs[framework]
    assert envelope(run.responses["slow"])["message"] == "Request timed out after 0.5s"
    assert run.responses["slow"].elapsed.total_seconds() < 3
    # Cancelled, not abandoned, and before the 504 went out: Quart needs its adapter for
    # this (its route task would otherwise run on and later try to send a second response).
    assert run.slow_outcomes_at_504 == ["cancelled"]
    assert run.service.slow_outcomes == ["cancelled"]


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_webhook_signature(runs: dict[str, Run], framework: str) -> None:
    run = runs[framework]
    bad = envelope(run.responses["webhook_bad_signature"])
    assert bad["details"] == [
        {
            "code": "signature_mismatch",
            "message": "No signature matches the body",
            "field": "X-Signature",
        }
    ]
    ok = run.responses["webhook_ok"]
    assert ok.status_code == 200
    assert ok.json() == {"received": True}
    assert run.service.webhooks == 1


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_unexpected_exception_is_logged_once_and_never_leaks(
    runs: dict[str, Run], framework: str
) -> None:
    run = runs[framework]
    response = run.responses["boom"]
    assert BOOM_TEXT not in response.text
    assert "RuntimeError" not in response.text
    assert envelope(response)["message"] == "An internal error occurred"
    request_id = response.headers["x-request-id"]
    errors = [record for record in run.boom_logs if record.levelno >= logging.ERROR]
    assert len(errors) == 1, [record.getMessage() for record in errors]
    (record,) = errors
    assert request_id in record.getMessage()
    assert record.exc_info is not None
    assert str(record.exc_info[1]) == BOOM_TEXT


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_nothing_else_was_logged(runs: dict[str, Run], framework: str) -> None:
    messages = [
        record.getMessage()
        for record in runs[framework].all_logs
        if record.levelno >= logging.ERROR
    ]
    assert len(messages) == 1, messages
    assert messages[0].startswith("unhandled exception in GET '/api/boom'")


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_lifespan_passes_through_armor(runs: dict[str, Run], framework: str) -> None:
    run = runs[framework]
    assert run.lifespan_while_serving == ["startup"]
    assert run.service.lifespan == ["startup", "shutdown"]
