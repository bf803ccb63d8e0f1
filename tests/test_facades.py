"""``armor()`` and the same protections composed by hand from the public middleware classes
answer the demo's requests alike: statuses, headers (in order) and bodies, request ids and
the wall-clock ``X-RateLimit-Reset`` aside. Whatever ``armor()`` compiles the config into,
the classes are façades over the same checks (docs/architecture.md, "Layers")."""

from __future__ import annotations

import hashlib
import hmac
import json
import re
from typing import Any

import httpx
import pytest

from asgi_armor import (
    ArmorConfig,
    ConcurrencyLimit,
    ErrorMiddleware,
    HexHmac,
    IdempotencyMiddleware,
    IdempotencyOptions,
    InputLimits,
    MemoryStore,
    RateLimitMiddleware,
    Rule,
    SignatureMiddleware,
    SignedRoute,
    TimeoutMiddleware,
    armor,
)
from asgi_armor.clientip import ClientIP
from asgi_armor.demo.app import BUNDLED_CONFIG, DEFAULT_WEBHOOK_SECRET, Demo, demo_identify

pytestmark = pytest.mark.anyio

SECRET = DEFAULT_WEBHOOK_SECRET


def frozen_store() -> MemoryStore:
    """A store whose clock stands still: no bucket refills between the two runs, however
    long either takes (1000/minute refills a token every 60 ms of wall time)."""
    return MemoryStore(clock=lambda: 1_000.0)


def by_hand() -> Any:
    """The bundled armor.toml, written out with the public classes in the canonical order."""
    store = frozen_store()
    client_ip = ClientIP([])
    app: Any = Demo().app()
    app = TimeoutMiddleware(app, routes=[("GET /api/search", 5.0)])
    app = IdempotencyMiddleware(
        app,
        routes=[
            ("POST /api/payments", IdempotencyOptions(ttl=86400.0)),
            ("POST /api/refunds", IdempotencyOptions(ttl=86400.0)),
        ],
        store=store,
        identify=demo_identify,
        client_ip=client_ip,
        max_body_bytes=65_536,
    )
    app = SignatureMiddleware(
        app,
        routes=[
            (
                "POST /api/webhooks/payment",
                SignedRoute(HexHmac(header="X-Signature"), SECRET, 300.0, True),
            )
        ],
        store=store,
        max_body_bytes=65_536,
    )
    app = RateLimitMiddleware(
        app,
        rules=[
            Rule("* /api/*", "1000/minute", "ip", name="ip"),
            Rule("POST /api/expensive-operation", "10/minute", "ip", name="expensive"),
            Rule("POST /api/send-email", "5/hour", "user", name="email"),
            Rule(
                "POST /api/projects/{project_id}/builds",
                "20/hour",
                "path:project_id",
                name="builds",
            ),
        ],
        store=store,
        identify=demo_identify,
        client_ip=client_ip,
        exempt=["GET /healthz"],
    )
    app = ConcurrencyLimit(
        app, max_concurrent=64, max_queue=256, queue_timeout=2.0, exempt=["GET /healthz"]
    )
    app = InputLimits(
        app, max_body_bytes=65_536, json_routes=["POST /api/*", "PUT /demo/*"], body_timeout=10.0
    )
    return ErrorMiddleware(app)


def _signed(body: bytes) -> dict[str, str]:
    signature = hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
    return {"content-type": "application/json", "x-signature": signature}


JSON = {"content-type": "application/json"}
ALICE = {**JSON, "authorization": "Bearer alice-token"}
WEBHOOK = b'{"id": "evt_1", "amount": 1000}'

# (method, path, headers, body, times): the demo's contract, rejections included.
REQUESTS: list[tuple[str, str, dict[str, str], bytes, int]] = [
    ("GET", "/healthz", {}, b"", 1),
    ("GET", "/nope", {}, b"", 1),
    ("DELETE", "/api/users", {}, b"", 1),
    ("POST", "/api/users", JSON, b'{"email": " Ann@Example.COM ", "name": "Ann  Lee"}', 1),
    ("POST", "/api/users", JSON, b'{"email": "nope", "age": -1, "extra": 1}', 1),
    ("POST", "/api/users", JSON, b'{"email": ', 1),
    ("POST", "/api/users", {"content-type": "text/plain"}, b"hi", 1),
    ("POST", "/api/users", {**JSON, "content-length": "+5"}, b"{}", 1),
    ("POST", "/api/users", JSON, b"[" + b" " * 70_000 + b"]", 1),
    ("GET", "/api/" + "x" * 9000, {}, b"", 1),
    ("POST", "/api/expensive-operation", JSON, b"{}", 11),
    ("POST", "/api/send-email", ALICE, b"{}", 6),
    ("POST", "/api/projects/p1/builds", JSON, b"{}", 2),
    ("POST", "/api/payments", JSON, b'{"amount": 5, "currency": "eur"}', 1),
    (
        "POST",
        "/api/payments",
        {**JSON, "idempotency-key": "order-17"},
        b'{"amount": 1000, "currency": "eur"}',
        2,
    ),
    (
        "POST",
        "/api/payments",
        {**JSON, "idempotency-key": "order-17"},
        b'{"amount": 9, "currency": "eur"}',
        1,
    ),
    ("POST", "/api/webhooks/payment", _signed(WEBHOOK), WEBHOOK, 2),
    ("POST", "/api/webhooks/payment", {**JSON, "x-signature": "0" * 64}, WEBHOOK, 1),
    ("GET", "/api/search?q=armor", {}, b"", 1),
    ("GET", "/api/users/1", {}, b"", 1),
]

_VOLATILE = {b"x-request-id", b"x-ratelimit-reset"}


def _normal(response: httpx.Response) -> tuple[int, list[tuple[bytes, bytes]], Any]:
    # Volatile values masked in place: the order of the fields is compared too.
    headers = [
        (k.lower(), b"<volatile>" if k.lower() in _VOLATILE else v) for k, v in response.headers.raw
    ]
    body: Any = response.content
    if response.headers.get("content-type", "").startswith("application/json"):
        body = json.loads(body)
        if isinstance(body, dict):
            body.pop("request_id", None)
    return response.status_code, headers, _mask(body)


_RANDOM_ID = re.compile(r"[a-z]+_[0-9a-f]{8,}")


def _mask(value: Any) -> Any:
    """The demo's random ids (``bld_...``, ``pay_...``) masked; its counters are kept."""
    if isinstance(value, dict):
        return {key: _mask(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_mask(item) for item in value]
    if isinstance(value, str) and _RANDOM_ID.fullmatch(value):
        return "<id>"
    return value


async def test_armor_and_the_hand_composed_classes_answer_alike(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("ARMOR_DEMO_WEBHOOK_SECRET", SECRET)
    armored = armor(Demo().app(), ArmorConfig.from_toml(BUNDLED_CONFIG), store=frozen_store())
    composed = by_hand()
    answers: list[list[tuple[int, list[tuple[bytes, bytes]], Any]]] = [[], []]
    for index, app in enumerate((armored, composed)):
        transport = httpx.ASGITransport(app=app, client=("198.51.100.10", 50000))
        async with httpx.AsyncClient(transport=transport, base_url="http://demo") as client:
            for method, path, headers, body, times in REQUESTS:
                for _ in range(times):
                    response = await client.request(method, path, headers=headers, content=body)
                    answers[index].append(_normal(response))
    statuses = [status for status, _, _ in answers[0]]
    # The requests reach every kind of answer: the comparison is not of 200s alone.
    assert {200, 201, 400, 401, 404, 405, 413, 414, 415, 422, 429} <= set(statuses)
    for request, (ours, theirs) in enumerate(zip(*answers, strict=True)):
        assert ours == theirs, request
