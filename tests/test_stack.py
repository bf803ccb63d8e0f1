"""``armor()``: every route-bound layer matches the request the wrapped app routes, and
the store is the one it is given, checked at start-up.

Frameworks route more spellings of a path than its pattern (Quart and Litestar route
``//api//x/`` and a lower-case ``post`` to ``POST /api/x``), and servers and mounts put a
``root_path`` in front of it. Each layer must see the one canonical target
(docs/architecture.md, "Request flow"), or a variant walks past it.

``armor(app, config, store=...)`` uses the store given (even an empty, falsy MemoryStore);
a malformed store URL is a ``ConfigError`` naming ``store``; a Redis store where
redis.asyncio cannot run (trio) fails the lifespan start-up, and without lifespan each
concern's store-failure policy answers, never a 500 (docs/stores.md).
"""

from __future__ import annotations

import logging
from typing import Any

import anyio
import httpx
import pytest

from asgi_armor import ArmorConfig, ConfigError, armor
from asgi_armor._asgi import Message, Receive, Scope, Send
from asgi_armor.config import (
    IdempotencyEntry,
    LimitsConfig,
    RateLimitEntry,
    SignatureEntry,
    TimeoutEntry,
)
from asgi_armor.ratelimit import RateLimitMiddleware
from asgi_armor.stack import build_store
from asgi_armor.stores.memory import MemoryStore
from asgi_armor.stores.redis import RedisStore
from tests.reliability.reliability_helpers import call_asgi

pytestmark = pytest.mark.anyio

SECRET_ENV = "ARMOR_TEST_STACK_SECRET"


class Recorder:
    """A bare ASGI app answering 200 and recording which paths it ran for."""

    def __init__(self) -> None:
        self.ran: list[str] = []

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        self.ran.append(scope["path"])
        if "slow" in scope["path"]:
            await anyio.sleep_forever()
        while (await receive()).get("more_body", False):
            pass
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})


@pytest.fixture
def armored(monkeypatch: pytest.MonkeyPatch) -> tuple[Any, Recorder]:
    monkeypatch.setenv(SECRET_ENV, "s3cret")
    config = ArmorConfig(
        limits=LimitsConfig(json_routes=["POST /api/json"]),
        rate_limit=[RateLimitEntry(route="POST /api/limited", rate="1/minute", key="ip")],
        signature=[SignatureEntry(route="POST /api/webhook", secret_env=SECRET_ENV)],
        idempotency=[IdempotencyEntry(route="POST /api/pay")],
        timeout=[TimeoutEntry(route="POST /api/slow", seconds=0.05)],
    )
    app = Recorder()
    return armor(app, config), app


def spellings(route: str) -> list[tuple[str, str, str]]:
    """(method, path, root_path) spellings a framework may route to ``POST <route>``."""
    inner = route.replace("/api/", "/api//")
    return [
        ("POST", route, ""),
        ("post", route, ""),
        ("Post", "/" + route, ""),
        ("POST", inner, ""),
        ("POST", route + "//", ""),
        ("POST", "/svc" + route, "/svc"),
        ("post", "/svc/" + inner, "/svc"),
    ]


def request(method: str, path: str, root_path: str, **extra: Any) -> dict[str, Any]:
    return {
        "method": method,
        "path": path,
        "raw_path": path.encode(),
        "root_path": root_path,
        "query_string": b"",
        "headers": [
            (b"content-length", b"2"),
            *extra.get("headers", [(b"content-type", b"application/json")]),
        ],
        "client": ("192.0.2.7", 4711),
        "chunks": [b"{}"],
    }


@pytest.mark.parametrize(("method", "path", "root_path"), spellings("/api/webhook"))
async def test_signature_holds_for_every_spelling(
    armored: tuple[Any, Recorder], method: str, path: str, root_path: str
) -> None:
    app, recorder = armored
    status, _, body = await call_asgi(app, request(method, path, root_path))
    assert (status, recorder.ran) == (401, [])
    assert b'"invalid_signature"' in body


@pytest.mark.parametrize(("method", "path", "root_path"), spellings("/api/pay"))
async def test_idempotency_holds_for_every_spelling(
    armored: tuple[Any, Recorder], method: str, path: str, root_path: str
) -> None:
    app, recorder = armored
    status, _, body = await call_asgi(app, request(method, path, root_path))
    assert (status, recorder.ran) == (400, [])
    assert b'"idempotency_key_missing"' in body


@pytest.mark.parametrize(("method", "path", "root_path"), spellings("/api/pay"))
async def test_a_spelling_is_a_retry_of_the_canonical_request(
    armored: tuple[Any, Recorder], method: str, path: str, root_path: str
) -> None:
    app, recorder = armored
    headers = [(b"content-type", b"application/json"), (b"idempotency-key", b"k-1")]
    first = await call_asgi(app, request("POST", "/api/pay", "", headers=headers))
    again = await call_asgi(app, request(method, path, root_path, headers=headers))
    assert first[0] == again[0] == 200
    assert again[1]["idempotent-replayed"] == "true"
    assert len(recorder.ran) == 1


async def test_every_spelling_shares_the_routes_bucket(armored: tuple[Any, Recorder]) -> None:
    app, recorder = armored
    statuses = [
        (await call_asgi(app, request(method, path, root)))[0]
        for method, path, root in spellings("/api/limited")
    ]
    assert statuses == [200] + [429] * (len(statuses) - 1)
    assert len(recorder.ran) == 1


@pytest.mark.parametrize(("method", "path", "root_path"), spellings("/api/slow"))
async def test_timeout_holds_for_every_spelling(
    armored: tuple[Any, Recorder], method: str, path: str, root_path: str
) -> None:
    app, _ = armored
    status, _, body = await call_asgi(app, request(method, path, root_path))
    assert status == 504
    assert b'"timeout"' in body


@pytest.mark.parametrize(("method", "path", "root_path"), spellings("/api/json"))
async def test_json_only_routes_hold_for_every_spelling(
    armored: tuple[Any, Recorder], method: str, path: str, root_path: str
) -> None:
    app, recorder = armored
    plain = request(method, path, root_path, headers=[(b"content-type", b"text/plain")])
    status, _, body = await call_asgi(app, plain)
    assert (status, recorder.ran) == (415, [])
    assert b'"unsupported_media_type"' in body


async def test_a_root_path_that_is_not_a_prefix_is_not_removed(
    armored: tuple[Any, Recorder],
) -> None:
    app, recorder = armored
    # "/svcx/api/webhook" under root_path "/svc" is not the app's /api/webhook.
    status, _, _ = await call_asgi(app, request("POST", "/svcx/api/webhook", "/svc"))
    assert (status, recorder.ran) == (200, ["/svcx/api/webhook"])


# -- the store -------------------------------------------------------------------------------

REDIS = "redis://127.0.0.1:6379/15"
LIMITED = ArmorConfig(rate_limit=[RateLimitEntry(route="GET /limited", rate="2/minute")])


async def ok(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] == "lifespan":
        message = await receive()
        assert message["type"] == "lifespan.startup"
        await send({"type": "lifespan.startup.complete"})
        return
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


@pytest.mark.parametrize("configured", ["memory", REDIS])
def test_armor_uses_the_store_it_is_given(configured: str) -> None:
    given = MemoryStore()
    assert len(given) == 0  # empty, so falsy: the store must still be the one used
    armored = armor(ok, LIMITED.with_store(configured), store=given)
    assert armored.store is given
    limiter = next(layer for layer in armored.layers if isinstance(layer, RateLimitMiddleware))
    assert limiter.store is given


async def test_requests_go_to_the_given_store(anyio_backend: str) -> None:
    given = MemoryStore()
    armored = armor(ok, LIMITED.with_store(REDIS), store=given)
    transport = httpx.ASGITransport(app=armored, client=("10.3.0.1", 1))
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        statuses = [(await client.get("/limited")).status_code for _ in range(3)]
    assert statuses == [200, 200, 429]
    assert len(given) == 1


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("redis://127.0.0.1:notaport/14", "Port could not be cast"),
        ("redis://127.0.0.1:99999/0", "out of range"),
        ("redis://127.0.0.1:0/0", "1..65535, not 0"),
        ("redis://localhost/notadb", "database number, not 'notadb'"),
        ("redis://localhost/1/2", "database number"),
        ("redis://localhost:6379/0?socket_timeout=soon", "socket_timeout"),
        ("redis://localhost:6379/0?decode_responses=true", "decode_responses"),
        ("unix://", "socket's path"),
        ("mongodb://localhost/0", "is not 'memory' or a redis:// URL"),
        ("valkey://localhost/notadb", "database number, not 'notadb'"),
    ],
)
def test_malformed_store_urls_fail_at_start_up(url: str, why: str) -> None:
    with pytest.raises(ConfigError, match=r"^store: ") as caught:
        build_store(ArmorConfig(store=url))
    assert why in str(caught.value)
    with pytest.raises(ConfigError, match=r"^store: "):
        armor(ok, ArmorConfig(store=url))


def test_a_store_url_error_never_shows_the_password() -> None:
    for url in ("redis://:hunter2@127.0.0.1:notaport/0", "redis://ada:hunter2@h/x"):
        with pytest.raises(ConfigError) as caught:
            build_store(ArmorConfig(store=url))
        assert "hunter2" not in str(caught.value)
        assert "***" in str(caught.value)


@pytest.mark.parametrize(
    "url",
    [
        "redis://127.0.0.1:6379/15",
        "redis://127.0.0.1",
        "redis://:pw@127.0.0.1:6379/0/",
        "rediss://cache.internal:6380/2",
        "redis://localhost:6379?db=3",
        "unix:///var/run/redis.sock?db=1",
        "valkey://127.0.0.1:6379/15",
        "valkeys://cache.internal:6380/2",
    ],
)
def test_well_formed_store_urls_are_accepted(url: str) -> None:
    store = build_store(ArmorConfig(store=url))
    assert isinstance(store, RedisStore)


# -- a Redis store where redis.asyncio cannot run (trio) ------------------------------------


async def _lifespan(app: Any) -> list[Message]:
    """Drive the ASGI lifespan start-up; the messages the app sent back."""
    sent: list[Message] = []
    pending = [{"type": "lifespan.startup"}]

    async def receive() -> Message:
        return pending.pop()

    async def send(message: Message) -> None:
        sent.append(message)

    await app({"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}, receive, send)
    return sent


@pytest.mark.parametrize("anyio_backend", ["trio"])
async def test_redis_store_on_trio_fails_lifespan_start_up(anyio_backend: str) -> None:
    armored = armor(ok, LIMITED.with_store(REDIS))
    sent = await _lifespan(armored)
    assert [message["type"] for message in sent] == ["lifespan.startup.failed"]
    assert sent[0]["message"].startswith("store: RedisStore runs on asyncio only")


async def test_lifespan_reaches_the_app_where_the_store_can_run(anyio_backend: str) -> None:
    store = MemoryStore() if anyio_backend == "trio" else RedisStore.from_url(REDIS)
    armored = armor(ok, LIMITED, store=store)
    assert await _lifespan(armored) == [{"type": "lifespan.startup.complete"}]
    await armored.aclose()


@pytest.mark.parametrize("anyio_backend", ["trio"])
async def test_redis_store_on_trio_applies_each_policy_never_a_500(
    anyio_backend: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Without lifespan, each store call fails as a store error: rate limits fail open,
    idempotency fails closed, and the reason is logged once."""
    config = LIMITED.with_store(REDIS)
    config = ArmorConfig(
        store=REDIS,
        rate_limit=config.rate_limit,
        idempotency=[IdempotencyEntry(route="POST /pay")],
    )
    armored = armor(ok, config)
    transport = httpx.ASGITransport(app=armored, client=("10.3.0.2", 1))
    caplog.set_level(logging.WARNING)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        limited = [(await client.get("/limited")).status_code for _ in range(3)]
        paid = await client.post("/pay", content=b"{}", headers={"Idempotency-Key": "k"})
        again = await client.post("/pay", content=b"{}", headers={"Idempotency-Key": "k2"})
    assert limited == [200, 200, 200]
    for response in (paid, again):
        assert response.status_code == 503
        assert response.json()["error"] == "service_unavailable"
    reasons = [r for r in caplog.records if "runs on asyncio only" in r.getMessage()]
    assert len(reasons) == 1
    assert reasons[0].levelno == logging.ERROR
