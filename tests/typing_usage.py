"""Typed usage of the public API: checked by ``mypy --strict`` (``make typecheck``), not run.

If a signature changes in a way that breaks users' type-checking, this file stops
type-checking.
"""

from __future__ import annotations

import msgspec

from asgi_armor import (
    ArmorConfig,
    Armored,
    BreakerState,
    CircuitBreaker,
    Decision,
    Email,
    HexHmac,
    MemoryStore,
    Name,
    Partial,
    Rate,
    RateLimitEntry,
    RateLimiter,
    RedisClusterStore,
    RedisSentinelStore,
    armor,
    decode,
    gather_partial,
    sign,
    verify,
    with_timeout,
)
from asgi_armor._asgi import Receive, Scope, Send
from asgi_armor.stores.base import Store


class Signup(msgspec.Struct):
    email: Email
    name: Name


async def app(scope: Scope, receive: Receive, send: Send) -> None:
    pass


def build() -> Armored:
    config = ArmorConfig(rate_limit=[RateLimitEntry(route="* /api/*", rate="10/minute")])
    return armor(app, config)


def build_for_frameworks() -> list[Armored]:
    from litestar import Litestar
    from quart import Quart
    from starlette.applications import Starlette

    return [armor(Starlette()), armor(Quart(__name__)), armor(Litestar())]


def validate(body: bytes) -> str:
    signup: Signup = decode(body, Signup)
    return signup.email


breaker = CircuitBreaker(fail_max=5, reset_timeout=30.0)


@breaker
async def fetch(user_id: int) -> dict[str, int]:
    return {"id": user_id}


async def use() -> None:
    limiter = RateLimiter(MemoryStore())
    decision: Decision = await limiter.hit("user:1", Rate.parse("10/minute"))
    allowed: bool = decision.allowed
    user: dict[str, int] = await fetch(1)
    same: dict[str, int] = await breaker.call(fetch, 2)
    state: BreakerState = breaker.state
    value: int = await with_timeout(fetch_value(), 1.0)
    partial: Partial = await gather_partial({"user": (lambda: fetch(3), None)}, timeout=1.0)
    headers: dict[str, str] = sign(b"{}", "secret", scheme=HexHmac())
    verify(headers, b"{}", "secret", scheme=HexHmac())
    del allowed, user, same, state, value, partial


async def fetch_value() -> int:
    return 1


async def use_client() -> None:
    import httpx

    from asgi_armor.client import ArmorTransport, CircuitOpenError, SyncArmorTransport

    transport = ArmorTransport(
        httpx.AsyncHTTPTransport(), idempotency_keys=True, sign=(HexHmac(), "secret")
    )
    async with httpx.AsyncClient(transport=transport) as client:
        try:
            response: httpx.Response = await client.post("http://api.test/", json={})
        except CircuitOpenError as exc:
            wait: float = exc.retry_after
            del wait
        else:
            del response
    breaker: CircuitBreaker | None = transport.breaker("http://api.test/")
    with httpx.Client(transport=SyncArmorTransport(retries=2, budget=None)) as sync_client:
        del sync_client
    del breaker


async def beyond_one_redis() -> None:
    stores: list[Store] = [
        RedisClusterStore.from_url("redis+cluster://10.0.0.1:6379,10.0.0.2:6379", timeout=0.2),
        RedisSentinelStore.from_url(
            "redis+sentinel://10.0.0.5:26379/armor/0", max_in_flight=8, max_batch=64
        ),
    ]
    limiter = RateLimiter(stores[0], on_store_error="deny")
    decision: Decision = await limiter.hit("u:alice", "10/minute")
    assert decision.limit == 10
    for store in stores:
        await store.aclose()
