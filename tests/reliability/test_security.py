"""The threats of ``docs/security.md``, each shown against the demo stack.

Spoofed forwarding headers, key-space exhaustion (long keys), signature timing, webhook
replay, idempotency keys across principals, log injection through request ids, error
leaks and oversized input. (Store outage: ``test_redis_faults.py``; floods and slowloris:
``test_floods.py``; garbage: ``test_garbage.py``.)
"""

from __future__ import annotations

import contextlib
import hmac
import logging
from typing import Any

import anyio
import httpx
import msgspec
import pytest
from reliability_helpers import (
    assert_envelope,
    assert_no_leak,
    call_asgi,
    demo_stack,
)

from asgi_armor import signing
from asgi_armor.errors import InvalidSignature
from asgi_armor.signing import HexHmac, sign

pytestmark = [pytest.mark.anyio]

SECRET = "demo-webhook-secret"
JSON = {"Content-Type": "application/json"}


def _client(app: Any, ip: str = "203.0.113.7") -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=app, client=(ip, 5555))
    return httpx.AsyncClient(transport=transport, base_url="http://t")


def _request(**parts: Any) -> dict[str, Any]:
    request: dict[str, Any] = {
        "method": "GET",
        "path": "/healthz",
        "raw_path": b"/healthz",
        "query_string": b"",
        "headers": [],
        "chunks": [b""],
        "client": ("203.0.113.9", 5555),
    }
    request.update(parts)
    if "raw_path" not in parts:
        request["raw_path"] = request["path"].encode("utf-8", "surrogateescape")
    return request


async def test_spoofed_x_forwarded_for_does_not_change_the_client(anyio_backend: str) -> None:
    stack = demo_stack()  # trusted_proxies = [] (the default)
    async with _client(stack.app) as client:
        statuses = [
            (
                await client.post(
                    "/api/expensive-operation", headers={"X-Forwarded-For": f"198.51.100.{index}"}
                )
            ).status_code
            for index in range(12)
        ]
        forwarded = await client.post(
            "/api/expensive-operation", headers={"Forwarded": "for=192.0.2.99"}
        )
    assert statuses == [200] * 10 + [429] * 2
    assert forwarded.status_code == 429


async def test_forged_hops_left_of_a_trusted_proxy_are_ignored(anyio_backend: str) -> None:
    stack = demo_stack(trusted_proxies=["10.0.0.0/8"])
    async with _client(stack.app, ip="10.0.0.1") as client:
        # The proxy appends the real peer (198.51.100.5); whatever the client wrote before
        # it is attacker text and must not pick the bucket.
        statuses = [
            (
                await client.post(
                    "/api/expensive-operation",
                    headers={"X-Forwarded-For": f"1.2.3.{index}, 198.51.100.5"},
                )
            ).status_code
            for index in range(12)
        ]
        other = await client.post(
            "/api/expensive-operation", headers={"X-Forwarded-For": "198.51.100.6"}
        )
    assert statuses == [200] * 10 + [429] * 2
    assert other.status_code == 200


async def test_long_user_supplied_key_parts_are_hashed(
    private_redis: Any, asyncio_only: None
) -> None:
    import redis

    stack = demo_stack(private_redis.url)
    try:
        async with _client(stack.app) as client:
            long_project = "p" * 4000
            assert (await client.post(f"/api/projects/{long_project}/builds")).status_code == 202
            key = "k" * 255
            response = await client.post(
                "/api/payments",
                json={"amount": 1, "currency": "EUR"},
                headers={"Idempotency-Key": key, "Authorization": "Bearer alice-token"},
            )
            assert response.status_code == 201
            body = b'{"id": "' + b"e" * 3000 + b'"}'
            signed = {**sign(body, SECRET, scheme=HexHmac(header="X-Signature")), **JSON}
            hook = await client.post("/api/webhooks/payment", content=body, headers=signed)
            assert hook.status_code == 200
    finally:
        await stack.app.aclose()
    admin = redis.Redis(host="127.0.0.1", port=private_redis.port)
    try:
        keys = list(admin.scan_iter(count=1000))
    finally:
        admin.close()
    assert len(keys) >= 4  # ip bucket, builds bucket, idempotency record, nonce
    assert all(k.startswith(b"armor:") for k in keys)
    longest = max(len(k) for k in keys)
    print(f"\n[key space] {len(keys)} keys, longest {longest} bytes")
    assert longest <= 256


def test_signature_check_is_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every secret is compared with every signature entry, through ``compare_digest``."""
    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a: Any, b: Any) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    body = b'{"id": "evt_1"}'
    good = sign(body, SECRET, scheme=HexHmac(header="X-Signature"))["X-Signature"]
    secrets_ = ["rotated-old-secret", SECRET]
    cases = {
        "first byte wrong": ("0" if good[0] != "0" else "1") + good[1:],
        "last byte wrong": good[:-1] + ("0" if good[-1] != "0" else "1"),
        "matches second secret": good,
        "garbage": "z" * 64,
    }
    counts = {}
    for name, value in cases.items():
        calls.clear()
        with contextlib.suppress(InvalidSignature):
            signing.verify({"X-Signature": value}, body, secrets_, scheme=HexHmac())
        counts[name] = len(calls)
        assert all(type(a) is bytes for a, _ in calls)
        assert all(type(b) is bytes for _, b in calls)
    # Malformed hex is refused before any comparison; every well-formed value costs the same.
    assert counts["garbage"] in (0, 2)
    assert (
        counts["first byte wrong"] == counts["last byte wrong"] == counts["matches second secret"]
    )
    assert counts["matches second secret"] == len(secrets_)


async def test_webhook_replay_is_refused(anyio_backend: str) -> None:
    stack = demo_stack()
    body = b'{"id": "evt_42", "type": "payment.succeeded"}'
    headers = {**sign(body, SECRET, scheme=HexHmac(header="X-Signature")), **JSON}
    async with _client(stack.app) as client:
        first = await client.post("/api/webhooks/payment", content=body, headers=headers)
        again = await client.post("/api/webhooks/payment", content=body, headers=headers)
        tampered = await client.post(
            "/api/webhooks/payment", content=body.replace(b"42", b"43"), headers=headers
        )
    assert first.status_code == 200
    assert again.status_code == 401
    assert assert_envelope(401, dict(again.headers), again.content)["details"][0]["code"] == (
        "replayed"
    )
    assert tampered.status_code == 401
    assert tampered.json()["details"][0]["code"] == "signature_mismatch"
    assert stack.counter.calls["/api/webhooks/payment"] == 1


async def test_idempotency_keys_do_not_cross_principals(anyio_backend: str) -> None:
    stack = demo_stack()
    pay = {"amount": 500, "currency": "EUR"}
    async with _client(stack.app) as client:

        async def post(path: str, token: str | None, data: Any = pay) -> httpx.Response:
            headers = {"Idempotency-Key": "order-1"}
            if token:
                headers["Authorization"] = f"Bearer {token}"
            return await client.post(path, json=data, headers=headers)

        alice = await post("/api/payments", "alice-token")
        bob = await post("/api/payments", "bob-token")
        anonymous = await post("/api/payments", None)
        refund = await post("/api/refunds", "alice-token", {"payment_id": "pay_1", "amount": 5})
        alice_again = await post("/api/payments", "alice-token")
        bob_guess = await post("/api/payments", "bob-token", {"amount": 999, "currency": "USD"})
    created = [alice, bob, anonymous]
    assert [r.status_code for r in created] == [201, 201, 201]
    assert all("idempotent-replayed" not in r.headers for r in [*created, refund])
    assert len({r.json()["payment_id"] for r in created}) == 3
    assert refund.status_code == 201
    assert alice_again.headers["idempotent-replayed"] == "true"
    assert alice_again.content == alice.content
    # Bob guessing alice's key learns nothing about her payment: his own record answers.
    assert bob_guess.status_code == 422
    assert bob_guess.json()["error"] == "idempotency_key_reused"
    assert alice.json()["payment_id"] not in bob_guess.text
    assert stack.counter.calls["/api/payments"] == 3


@pytest.mark.parametrize(
    "incoming",
    [
        b"abc\r\nX-Injected: 1",
        b"abc\nlevel=CRITICAL msg=forged",
        b"a" * 129,
        b"has space",
        "caf\u00e9".encode(),
        b"\xff\xfe",
        b"",
        b"<script>",
    ],
)
async def test_unsafe_request_ids_are_replaced(
    incoming: bytes, anyio_backend: str, caplog: pytest.LogCaptureFixture
) -> None:
    stack = demo_stack()
    stack.demo.board.faults["db"] = msgspec.convert(
        {"mode": "fail"}, type(stack.demo.board.faults["db"])
    )
    caplog.set_level(logging.ERROR, logger="asgi_armor")
    request = _request(
        path="/api/users/1\r\nforged log line",
        raw_path=b"/api/users/1%0D%0Aforged",
        headers=[(b"x-request-id", incoming)],
    )
    status, headers, body = await call_asgi(stack.app, request)
    assert status == 404  # the newline makes it no user id
    data = assert_envelope(status, headers, body)
    assert data["request_id"].startswith("req_")
    assert data["request_id"] != incoming.decode("latin-1")
    # A 500 (database down) is logged with the safe id, on one line, path escaped.
    status, headers, body = await call_asgi(
        stack.app, _request(path="/api/users/1", headers=[(b"x-request-id", incoming)])
    )
    assert status == 500
    data = assert_envelope(status, headers, body)
    logged = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert logged
    for record in logged:
        message = record.getMessage()
        assert "\n" not in message
        assert "\r" not in message
        assert data["request_id"] in message


async def test_a_safe_request_id_is_kept(anyio_backend: str) -> None:
    stack = demo_stack()
    status, headers, body = await call_asgi(
        stack.app, _request(path="/nope", headers=[(b"x-request-id", b"trace-01.abc:42_x")])
    )
    assert status == 404
    assert assert_envelope(status, headers, body)["request_id"] == "trace-01.abc:42_x"


async def test_dependency_errors_never_leak(
    anyio_backend: str, caplog: pytest.LogCaptureFixture
) -> None:
    stack = demo_stack()
    caplog.set_level(logging.ERROR, logger="asgi_armor")
    async with _client(stack.app) as client:
        await client.put("/demo/faults/db", json={"mode": "fail"})
        responses = [await client.get("/api/users/1") for _ in range(7)]
    assert [r.status_code for r in responses] == [500] * 5 + [503] * 2
    for response in responses:
        data = assert_envelope(response.status_code, dict(response.headers), response.content)
        assert_no_leak(response.content)
        assert data["error"] in ("internal_error", "service_unavailable")
    assert responses[-1].headers["retry-after"]
    # The details are in the server log, under the request id the client was given.
    logged = "\n".join(r.getMessage() + repr(r.exc_info) for r in caplog.records)
    assert "DependencyError" in logged
    assert responses[0].json()["request_id"] in logged


async def test_oversized_input_is_refused_before_the_app(anyio_backend: str) -> None:
    stack = demo_stack()
    ten_mb = b"{" + b" " * (10 * 1024 * 1024) + b"}"
    # (request, status, whether the app may start: a chunked body has no length to check
    # up front, so the app starts and its reads stop at the cap.)
    cases = [
        (
            _request(
                method="POST",
                path="/api/users",
                headers=[(b"content-type", b"application/json"), (b"content-length", b"10485762")],
                chunks=[ten_mb],
            ),
            413,
            False,
        ),
        (
            _request(
                method="POST",
                path="/api/users",
                headers=[
                    (b"content-type", b"application/json"),
                    (b"transfer-encoding", b"chunked"),
                ],
                chunks=[b" " * 16_384] * 8,
            ),
            413,
            True,
        ),
        (_request(path="/api/search", query_string=b"q=" + b"a" * 9000), 414, False),
        (_request(path="/healthz", headers=[(b"x-h%d" % i, b"1") for i in range(101)]), 431, False),
        (_request(path="/healthz", headers=[(b"cookie", b"c" * 17_000)]), 431, False),
        (
            _request(
                method="POST",
                path="/api/users",
                headers=[(b"content-type", b"text/plain"), (b"content-length", b"2")],
                chunks=[b"{}"],
            ),
            415,
            False,
        ),
    ]
    for request, expected, app_may_start in cases:
        stack.counter.calls.clear()
        with anyio.fail_after(5):
            status, headers, body = await call_asgi(stack.app, request)
        assert status == expected, (request["path"], body)
        assert_envelope(status, headers, body)
        assert app_may_start or not stack.counter.calls, request["path"]


def test_every_test_docs_security_md_names_exists() -> None:
    """docs/security.md maps each threat to its tests: a renamed test must not leave a
    threat pointing at nothing."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    text = (root / "docs" / "security.md").read_text(encoding="utf-8")
    named = re.findall(r"`((?:tests/[\w/]+/)?\w+\.py)::(\w+)", text)
    assert len(named) >= 40
    missing = []
    for file, test in named:
        path = root / file if file.startswith("tests/") else root / "tests" / "reliability" / file
        if not path.is_file() or not re.search(rf"^(async )?def {test}\b", path.read_text(), re.M):
            missing.append(f"{file}::{test}")
    assert missing == []
