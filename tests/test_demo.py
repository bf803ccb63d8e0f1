"""The demo API end to end, in-process: the HTTP contract of docs/demo.md."""

from __future__ import annotations

import hashlib
import hmac
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from asgi_armor.demo import create_demo
from asgi_armor.demo.app import BUNDLED_CONFIG
from tests.envelope import assert_envelope

pytestmark = pytest.mark.anyio


def make_client(app: object, ip: str = "198.51.100.10") -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=app, client=(ip, 50000))  # type: ignore[arg-type]
    return httpx.AsyncClient(transport=transport, base_url="http://demo")


@pytest.fixture
async def demo(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[httpx.AsyncClient]:
    monkeypatch.delenv("ARMOR_DEMO_WEBHOOK_SECRET", raising=False)
    app, _ = create_demo()
    async with make_client(app) as client:
        yield client


async def test_healthz(demo: httpx.AsyncClient) -> None:
    response = await demo.get("/healthz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}
    assert response.headers["x-request-id"].startswith("req_")
    assert "x-ratelimit-limit" not in response.headers


async def test_unknown_route_and_method(demo: httpx.AsyncClient) -> None:
    assert_envelope(await demo.get("/nowhere"), 404, "not_found")
    assert_envelope(await demo.delete("/healthz"), 405, "method_not_allowed")


async def test_create_user_normalises(demo: httpx.AsyncClient) -> None:
    response = await demo.post(
        "/api/users",
        json={"email": "  Ada@Example.COM ", "name": " Ada\x00 \u0085 Lovelace\t", "age": 36},
    )
    assert response.status_code == 201
    body = response.json()
    assert body["email"] == "ada@example.com"
    assert body["name"] == "Ada Lovelace"
    assert body["age"] == 36
    assert isinstance(body["id"], int)


async def test_create_user_reports_every_field(demo: httpx.AsyncClient) -> None:
    response = await demo.post(
        "/api/users", json={"email": "not-an-email", "age": 200, "admin": True}
    )
    body = assert_envelope(response, 422, "validation_error")
    codes = {(d["field"], d["code"]) for d in body["details"]}  # type: ignore[index, union-attr]
    assert codes == {
        ("email", "invalid_email"),
        ("name", "required"),
        ("age", "out_of_range"),
        ("admin", "unknown_field"),
    }


async def test_bad_json_and_media_type(demo: httpx.AsyncClient) -> None:
    bad = await demo.post(
        "/api/users", content=b'{"email": ', headers={"content-type": "application/json"}
    )
    assert_envelope(bad, 400, "invalid_json")
    form = await demo.post("/api/users", content=b"email=a", headers={"content-type": "text/plain"})
    assert_envelope(form, 415, "unsupported_media_type")
    huge = await demo.post(
        "/api/users", content=b"x" * 70_000, headers={"content-type": "application/json"}
    )
    assert_envelope(huge, 413, "payload_too_large")


async def test_expensive_operation_limit(demo: httpx.AsyncClient) -> None:
    statuses = [(await demo.post("/api/expensive-operation")).status_code for _ in range(10)]
    assert statuses == [200] * 10
    limited = await demo.post("/api/expensive-operation")
    assert_envelope(limited, 429, "rate_limited")
    assert 1 <= int(limited.headers["retry-after"]) <= 6
    assert limited.headers["x-ratelimit-limit"] == "10"
    assert limited.headers["x-ratelimit-remaining"] == "0"
    assert '"expensive";q=10;w=60' in limited.headers["ratelimit-policy"]
    assert limited.headers["ratelimit"].startswith('"expensive";r=0;t=')
    # Another client is not affected.
    async with make_client(demo._transport.app, ip="198.51.100.99") as other:  # type: ignore[attr-defined]
        assert (await other.post("/api/expensive-operation")).status_code == 200


async def test_send_email_per_user(demo: httpx.AsyncClient) -> None:
    assert_envelope(await demo.post("/api/send-email"), 401, "unauthorized")
    alice = {"Authorization": "Bearer alice-token"}
    bob = {"Authorization": "Bearer bob-token"}
    assert [(await demo.post("/api/send-email", headers=alice)).status_code for _ in range(5)] == [
        202
    ] * 5
    assert_envelope(await demo.post("/api/send-email", headers=alice), 429, "rate_limited")
    ok = await demo.post("/api/send-email", headers=bob)
    assert ok.status_code == 202
    assert ok.json() == {"queued": True}


async def test_builds_per_project(demo: httpx.AsyncClient) -> None:
    for _ in range(20):
        response = await demo.post("/api/projects/p1/builds")
        assert response.status_code == 202
    assert response.json()["project_id"] == "p1"
    assert_envelope(await demo.post("/api/projects/p1/builds"), 429, "rate_limited")
    assert (await demo.post("/api/projects/p2/builds")).status_code == 202


async def test_payments_are_idempotent(demo: httpx.AsyncClient) -> None:
    assert_envelope(
        await demo.post("/api/payments", json={"amount": 5, "currency": "eur"}),
        400,
        "idempotency_key_missing",
    )
    headers = {"Idempotency-Key": "order-17"}
    first = await demo.post(
        "/api/payments", json={"amount": 1000, "currency": "eur"}, headers=headers
    )
    assert first.status_code == 201
    assert first.json()["currency"] == "EUR"
    again = await demo.post(
        "/api/payments", json={"amount": 1000, "currency": "eur"}, headers=headers
    )
    assert again.status_code == 201
    assert again.content == first.content
    assert again.headers["idempotent-replayed"] == "true"
    assert again.headers["x-request-id"] != first.headers["x-request-id"]
    reused = await demo.post(
        "/api/payments", json={"amount": 999, "currency": "eur"}, headers=headers
    )
    assert_envelope(reused, 422, "idempotency_key_reused")
    # The same key on another endpoint is another record.
    refund = await demo.post(
        "/api/refunds",
        json={"payment_id": first.json()["payment_id"], "amount": 10},
        headers=headers,
    )
    assert refund.status_code == 201
    assert refund.json()["refund_id"].startswith("re_")
    invalid = await demo.post(
        "/api/payments", json={"amount": 0, "currency": "euro"}, headers={"Idempotency-Key": "x"}
    )
    body = assert_envelope(invalid, 422, "validation_error")
    assert {d["field"] for d in body["details"]} == {"amount", "currency"}  # type: ignore[index, union-attr]


async def test_user_lookup_behind_breaker(
    demo: httpx.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    assert (await demo.get("/api/users/1")).json()["name"] == "Ada Lovelace"
    assert_envelope(await demo.get("/api/users/9"), 404, "not_found")
    assert_envelope(await demo.get("/api/users/abc"), 404, "not_found")
    # str.isdigit() holds for superscripts, which int() refuses (a 500 before), and for
    # other scripts' digits, which int() reads ("\u0663" was looked up as user 3): ASCII only.
    for digits in ("\u00b2", "\u0663", "1\uff11"):
        assert_envelope(await demo.get("/api/users/" + digits), 404, "not_found")
    assert (await demo.put("/demo/faults/db", json={"mode": "fail"})).status_code == 200
    with caplog.at_level(logging.ERROR, logger="asgi_armor"):
        for _ in range(5):
            failed = await demo.get("/api/users/1")
            assert_envelope(failed, 500, "internal_error")
            assert "10.0.0.12" not in failed.text
            assert "DependencyError" not in failed.text
    assert len([r for r in caplog.records if "unhandled exception" in r.getMessage()]) == 5
    opened = await demo.get("/api/users/1")
    assert_envelope(opened, 503, "service_unavailable")
    assert 29 <= int(opened.headers["retry-after"]) <= 30
    # 404s were not failures: the breaker opened after exactly five database errors.


async def test_search(demo: httpx.AsyncClient) -> None:
    found = await demo.get("/api/search", params={"q": "break"})
    assert found.json() == {"results": ["breaker"]}
    body = assert_envelope(await demo.get("/api/search"), 422, "validation_error")
    assert body["details"] == [
        {"code": "required", "message": "This field is required", "field": "q"}
    ]
    assert_envelope(await demo.get("/api/search", params={"q": "x" * 201}), 422, "validation_error")


async def test_search_timeout(tmp_path: Path) -> None:
    config = BUNDLED_CONFIG.read_text().replace("seconds = 5", "seconds = 0.2")
    (tmp_path / "armor.toml").write_text(config)
    app, _ = create_demo(config_path=tmp_path / "armor.toml")
    async with make_client(app) as client:
        await client.put("/demo/faults/search", json={"mode": "slow", "delay": 5})
        response = await client.get("/api/search", params={"q": "a"})
    body = assert_envelope(response, 504, "timeout")
    assert body["message"] == "Request timed out after 0.2s"


async def test_dashboard_degrades(demo: httpx.AsyncClient) -> None:
    whole = (await demo.get("/api/dashboard")).json()
    assert whole["partial"] is False
    assert whole["errors"] == []
    await demo.put("/demo/faults/notifications", json={"mode": "fail"})
    partial = (await demo.get("/api/dashboard")).json()
    assert partial == {
        "data": {"user": {"id": 1, "name": "Ada Lovelace"}, "notifications": []},
        "partial": True,
        "errors": [{"component": "notifications", "error": "unavailable"}],
    }


async def test_faults_validation(demo: httpx.AsyncClient) -> None:
    assert_envelope(await demo.put("/demo/faults/cache", json={"mode": "fail"}), 404, "not_found")
    assert_envelope(
        await demo.put("/demo/faults/db", json={"mode": "explode"}), 422, "validation_error"
    )


async def test_webhook_signature(demo: httpx.AsyncClient) -> None:
    body = b'{"id": "evt_1", "amount": 1000}'
    signature = hmac.new(b"demo-webhook-secret", body, hashlib.sha256).hexdigest()
    headers = {"content-type": "application/json"}
    ok = await demo.post(
        "/api/webhooks/payment", content=body, headers={**headers, "X-Signature": signature}
    )
    assert ok.status_code == 200
    assert ok.json() == {"received": True}
    wrong = "0" * 64
    bad = await demo.post(
        "/api/webhooks/payment", content=body, headers={**headers, "X-Signature": wrong}
    )
    detail = assert_envelope(bad, 401, "invalid_signature")["details"]
    assert detail == [
        {
            "code": "signature_mismatch",
            "message": "No signature matches the body",
            "field": "X-Signature",
        }
    ]
    missing = await demo.post("/api/webhooks/payment", content=body, headers=headers)
    assert (
        assert_envelope(missing, 401, "invalid_signature")["details"][0]["code"]
        == "missing_signature"
    )  # type: ignore[index]


async def test_global_limit_per_ip(tmp_path: Path) -> None:
    config = BUNDLED_CONFIG.read_text().replace('rate = "1000/minute"', 'rate = "3/minute"')
    (tmp_path / "armor.toml").write_text(config)
    app, _ = create_demo(config_path=tmp_path / "armor.toml")
    async with make_client(app) as client:
        statuses = [(await client.get("/api/users/1")).status_code for _ in range(4)]
        assert statuses == [200, 200, 200, 429]
        assert (await client.get("/healthz")).status_code == 200  # exempt
        spoofed = await client.get("/api/users/1", headers={"X-Forwarded-For": "203.0.113.1"})
        assert spoofed.status_code == 429  # forwarding headers from an untrusted peer are ignored


async def test_401s_say_how_to_authenticate(demo: httpx.AsyncClient) -> None:
    # RFC 9110 section 15.5.2; an API fuzzer flagged both 401s without it.
    bearer = await demo.post("/api/send-email")
    assert_envelope(bearer, 401, "unauthorized")
    assert bearer.headers.get_list("www-authenticate") == ["Bearer"]
    unsigned = await demo.post(
        "/api/webhooks/payment", content=b"{}", headers={"content-type": "application/json"}
    )
    assert_envelope(unsigned, 401, "invalid_signature")
    assert unsigned.headers.get_list("www-authenticate") == [
        'Signature scheme="hex-hmac", header="X-Signature"'
    ]


async def test_fault_mode_is_required(demo: httpx.AsyncClient) -> None:
    for body in ({}, {"delay": 1}):
        response = await demo.put("/demo/faults/db", json=body)
        details = assert_envelope(response, 422, "validation_error")["details"]
        assert details == [
            {"code": "required", "message": "This field is required", "field": "mode"}
        ]
    # Nothing was changed by the refused bodies.
    assert (await demo.get("/api/users/1")).status_code == 200


async def test_login_locks_after_five_failures_and_successes_are_free(
    demo: httpx.AsyncClient,
) -> None:
    async def login(password: str) -> httpx.Response:
        return await demo.post("/api/login", json={"username": "alice", "password": password})

    for _ in range(3):
        ok = await login("wonderland")
        assert ok.status_code == 200
        assert ok.json() == {"token": "alice-token"}
    assert ok.headers["ratelimit"] == '"login";r=5;t=0'
    for left in (4, 3, 2, 1, 0):
        wrong = await login("guess")
        assert_envelope(wrong, 401, "unauthorized")
        assert wrong.headers["x-ratelimit-remaining"] == str(left)
    locked = await login("wonderland")  # the right password, but locked
    assert_envelope(locked, 429, "rate_limited")
    assert locked.headers["retry-after"] == "180"
    assert locked.headers["ratelimit-policy"] == '"ip";q=1000;w=60, "login";q=5;w=900'


async def test_the_login_limit_is_per_address() -> None:
    app, config = create_demo()
    assert config.rate_limit[-1].route == "POST /api/login"  # from the demo's @protect
    bob = {"username": "bob", "password": "builder"}
    async with make_client(app) as first, make_client(app, ip="198.51.100.11") as second:
        for _ in range(5):
            await first.post("/api/login", json={"username": "bob", "password": "x"})
        assert (await first.post("/api/login", json=bob)).status_code == 429
        answer = await second.post("/api/login", json=bob)
    assert answer.json() == {"token": "bob-token"}
