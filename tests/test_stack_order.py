"""armor(): the order of the composed layers, proven by what a client and the store see.

The module docstring of asgi_armor/stack.py gives the order: cheap rejections first
(input limits, rate limits), then signatures, then idempotency, then the timeout, so
nothing unauthenticated reaches the idempotency store and a forged delivery can neither
poison nor read an idempotency record.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import anyio
import httpx
import pytest

from asgi_armor import ArmorConfig, armor
from asgi_armor._asgi import Receive, Scope, Send
from asgi_armor.signing import HexHmac, sign
from asgi_armor.stores.base import BucketSpec
from asgi_armor.stores.memory import MemoryStore
from tests.envelope import assert_envelope

pytestmark = pytest.mark.anyio

SECRET_ENV = "ARMOR_TEST_STACK_SECRET"
BODY = b'{"event": "payment.succeeded"}'


class RecordingStore(MemoryStore):
    """A MemoryStore that logs which operations each request made."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    async def hit_buckets(
        self, keys: Sequence[str], specs: Sequence[BucketSpec], cost: int
    ) -> tuple[bool, float, list[float]]:
        self.calls.append("hit_buckets")
        return await super().hit_buckets(keys, specs, cost)

    async def lease_acquire(self, key: str, lease: bytes, ttl: float) -> bytes | None:
        self.calls.append("lease_acquire")
        return await super().lease_acquire(key, lease, ttl)

    async def lease_complete(self, key: str, lease: bytes, value: bytes, ttl: float) -> bool:
        self.calls.append("lease_complete")
        return await super().lease_complete(key, lease, value, ttl)

    async def lease_release(self, key: str, lease: bytes) -> bool:
        self.calls.append("lease_release")
        return await super().lease_release(key, lease)

    async def remember(self, key: str, ttl: float) -> bool:
        self.calls.append("remember")
        return await super().remember(key, ttl)

    async def forget(self, key: str) -> None:
        self.calls.append("forget")
        await super().forget(key)


class Handler:
    """Counts its runs; answers 201 with the run number."""

    def __init__(self) -> None:
        self.runs = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.runs += 1
        body = b'{"run": %d}' % self.runs
        await send(
            {
                "type": "http.response.start",
                "status": 201,
                "headers": [(b"content-type", b"application/json")],
            }
        )
        await send({"type": "http.response.body", "body": body})


def signed_webhook_stack(
    monkeypatch: pytest.MonkeyPatch, **extra: Any
) -> tuple[Any, Handler, RecordingStore]:
    monkeypatch.setenv(SECRET_ENV, "hook-secret")
    config = ArmorConfig.from_dict(
        {
            "signature": [{"route": "POST /hook", "secret_env": SECRET_ENV}],
            "idempotency": [{"route": "POST /hook"}],
            **extra,
        }
    )
    handler, store = Handler(), RecordingStore()
    return armor(handler, config, store=store), handler, store


def client_for(app: Any) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=app, client=("10.1.2.3", 4000))
    return httpx.AsyncClient(transport=transport, base_url="http://t")


def genuine(key: str, body: bytes = BODY) -> dict[str, str]:
    return {**sign(body, "hook-secret", scheme=HexHmac()), "Idempotency-Key": key}


FORGED = {"X-Signature": "0" * 64}


async def test_a_forged_delivery_leaves_no_idempotency_trace(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Forged first, genuine second, with the same key: the genuine one runs the handler.

    Were idempotency outside the signature check, the forged delivery's 401 would be
    stored under the key and replayed to the genuine sender: the handler would never run.
    """
    app, _, store = signed_webhook_stack(monkeypatch)
    async with client_for(app) as client:
        forged = await client.post(
            "/hook", content=BODY, headers={**FORGED, "Idempotency-Key": "k"}
        )
        assert_envelope(forged, 401, "invalid_signature")
        assert store.calls == [], "an unauthenticated request reached the store"
        assert len(store) == 0

        real = await client.post("/hook", content=BODY, headers=genuine("k"))
        assert real.status_code == 201
        assert real.json() == {"run": 1}
        assert "idempotent-replayed" not in real.headers
        assert store.calls == ["remember", "lease_acquire", "lease_complete"]


async def test_a_forged_delivery_cannot_read_a_stored_response(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    app, handler, store = signed_webhook_stack(monkeypatch)
    async with client_for(app) as client:
        assert (await client.post("/hook", content=BODY, headers=genuine("k"))).status_code == 201
        store.calls.clear()
        for headers in ({**FORGED, "Idempotency-Key": "k"}, FORGED, {"Idempotency-Key": "k"}):
            response = await client.post("/hook", content=BODY, headers=headers)
            # Not the stored 201, and not idempotency's 400 for a missing key either: the
            # signature is checked first.
            assert_envelope(response, 401, "invalid_signature")
    assert store.calls == []
    assert handler.runs == 1


async def test_a_genuine_retry_is_answered_by_the_signature_replay_cache_first(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The exact same signed delivery again is a replay (401) before idempotency sees it;
    a new delivery (new body, same key) is a different request under that key (422)."""
    app, handler, _ = signed_webhook_stack(monkeypatch)
    async with client_for(app) as client:
        assert (await client.post("/hook", content=BODY, headers=genuine("k"))).status_code == 201
        again = await client.post("/hook", content=BODY, headers=genuine("k"))
        assert assert_envelope(again, 401, "invalid_signature")["details"][0]["code"] == "replayed"
        other = b'{"event": "payment.refunded"}'
        reused = await client.post("/hook", content=other, headers=genuine("k", other))
        assert_envelope(reused, 422, "idempotency_key_reused")
    assert handler.runs == 1


async def test_forged_floods_are_rate_limited_before_any_hmac_work(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    app, handler, store = signed_webhook_stack(
        monkeypatch, rate_limit=[{"route": "POST /hook", "rate": "2/minute"}]
    )
    async with client_for(app) as client:
        statuses = []
        for _ in range(4):
            response = await client.post("/hook", content=BODY, headers=FORGED)
            statuses.append(response.status_code)
        assert_envelope(response, 429, "rate_limited")
    assert statuses == [401, 401, 429, 429]
    assert store.calls == ["hit_buckets"] * 4
    assert handler.runs == 0


async def test_the_timeouts_504_releases_the_idempotency_key(anyio_backend: str) -> None:
    """Timeout inside idempotency: the 504 is an ordinary 5xx to the idempotency layer,
    so the key is released and the client's retry runs the handler again."""
    runs = 0

    async def slow_first(scope: Scope, receive: Receive, send: Send) -> None:
        nonlocal runs
        runs += 1
        if runs == 1:
            await anyio.sleep_forever()
        await send({"type": "http.response.start", "status": 201, "headers": []})
        await send({"type": "http.response.body", "body": b"paid"})

    config = ArmorConfig.from_dict(
        {
            "idempotency": [{"route": "POST /pay"}],
            "timeout": [{"route": "POST /pay", "seconds": 0.05}],
        }
    )
    async with client_for(armor(slow_first, config)) as client:
        first = await client.post("/pay", headers={"Idempotency-Key": "k"})
        assert_envelope(first, 504, "timeout")
        retry = await client.post("/pay", headers={"Idempotency-Key": "k"})
    assert (retry.status_code, retry.content, runs) == (201, b"paid", 2)


def test_the_layers_are_in_the_documented_order(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(SECRET_ENV, "hook-secret")
    config = ArmorConfig.from_dict(
        {
            "limits": {},
            "shedding": {"max_concurrent": 4},
            "rate_limit": [{"route": "* /*", "rate": "10/second"}],
            "signature": [{"route": "POST /hook", "secret_env": SECRET_ENV}],
            "idempotency": [{"route": "POST /pay"}],
            "timeout": [{"route": "* /*", "seconds": 5}],
        }
    )
    armored = armor(Handler(), config)
    assert repr(armored) == (
        "ErrorMiddleware -> InputLimits -> ConcurrencyLimit -> RateLimitMiddleware -> "
        "SignatureMiddleware -> IdempotencyMiddleware -> TimeoutMiddleware -> app"
    )
