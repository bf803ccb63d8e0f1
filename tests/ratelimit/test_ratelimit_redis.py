"""The limiter and the middleware on the real Redis (asyncio only): exactness under
concurrency, all-or-nothing layers, agreement with MemoryStore, and fail-open on a dead Redis."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator

import anyio
import httpx
import pytest

from asgi_armor._asgi import Receive, Scope, Send, get_header
from asgi_armor.errors import ErrorMiddleware
from asgi_armor.ratelimit import Rate, RateLimiter, RateLimitMiddleware, Rule, bucket
from asgi_armor.stores.memory import MemoryStore
from asgi_armor.stores.redis import RedisStore
from tests.conftest import RedisServer

pytestmark = [pytest.mark.anyio, pytest.mark.redis]


@pytest.fixture
def anyio_backend() -> str:
    """redis.asyncio runs on asyncio only."""
    return "asyncio"


async def app(scope: Scope, receive: Receive, send: Send) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"{}"})


def identify(scope: Scope) -> str | None:
    raw = get_header(scope, b"authorization")
    return None if raw is None else raw.decode()


def seed_rules() -> list[Rule]:
    return [
        Rule("* /api/*", "1000/minute", "ip", name="global"),
        Rule("POST /api/expensive-operation", "10/minute", "ip", name="expensive"),
        Rule("POST /api/send-email", "5/hour", "user", name="email"),
        Rule("POST /api/projects/{project_id}/builds", "20/hour", "path:project_id", name="builds"),
    ]


@pytest.fixture
async def redis_store(
    asyncio_only: None, redis_url: str, redis_prefix: str
) -> AsyncIterator[RedisStore]:
    store = RedisStore.from_url(redis_url, prefix=redis_prefix)
    try:
        yield store
    finally:
        await store.aclose()


async def test_exact_limit(redis_store: RedisStore) -> None:
    limiter = RateLimiter(redis_store)
    rate = Rate.parse("10/hour")
    for n in range(10):
        decision = await limiter.hit("k", rate)
        assert (decision.allowed, decision.remaining) == (True, 9 - n)
    denied = await limiter.hit("k", rate)
    assert (denied.allowed, denied.remaining) == (False, 0)
    assert 359 < denied.retry_after <= 360
    assert 3599 < denied.reset_after <= 3600


async def test_concurrency_exact(redis_store: RedisStore) -> None:
    limiter = RateLimiter(redis_store)
    rate = Rate.parse("50/hour")
    allowed = 0

    async def one() -> None:
        nonlocal allowed
        if (await limiter.hit("shared", rate)).allowed:
            allowed += 1

    async with anyio.create_task_group() as tg:
        for _ in range(200):
            tg.start_soon(one)
    assert allowed == 50
    assert limiter.store_errors == 0


async def test_all_or_nothing(redis_store: RedisStore) -> None:
    limiter = RateLimiter(redis_store)
    items = [("ip", "10/hour", "wide"), ("ip", "2/hour", "narrow")]
    for _ in range(2):
        assert all(d.allowed for d in await limiter.hit_many(items))
    for _ in range(3):
        denied = await limiter.hit_many(items)
        assert [d.allowed for d in denied] == [False, False]
        assert [d.remaining for d in denied] == [8, 0]
    assert (await limiter.hit("ip", "10/hour", policy="wide")).remaining == 7


RATES = [Rate.parse("5/hour"), Rate.parse("3/hour burst 6"), Rate.parse("8/day")]


@pytest.mark.parametrize("seed", range(6))
async def test_agrees_with_memory(redis_store: RedisStore, seed: int) -> None:
    # Refill over the few milliseconds the test runs is far below one token at these
    # rates, so a frozen memory clock and Redis's moving clock must decide the same.
    memory = RateLimiter(MemoryStore(clock=lambda: 5000.0))
    redis = RateLimiter(redis_store)
    rng = random.Random(seed)
    for _ in range(40):
        chosen = rng.sample(range(len(RATES)), rng.randint(1, len(RATES)))
        key = rng.choice(["a", "b"])
        items = [(key, RATES[i], f"p{i}") for i in chosen]
        cost = rng.choice([0, 1, 1, 1, 2, 3])
        expected = await memory.hit_many(items, cost)
        got = await redis.hit_many(items, cost)
        assert [(d.allowed, d.remaining, d.limit) for d in got] == [
            (d.allowed, d.remaining, d.limit) for d in expected
        ]
        for g, e in zip(got, expected, strict=True):
            assert g.retry_after == pytest.approx(e.retry_after, abs=1.0)
            assert g.reset_after == pytest.approx(e.reset_after, abs=1.0)


async def test_middleware_on_redis(redis_store: RedisStore) -> None:
    asgi = ErrorMiddleware(
        RateLimitMiddleware(app, rules=seed_rules(), store=redis_store, identify=identify)
    )
    transport = httpx.ASGITransport(app=asgi, client=("1.2.3.4", 123))
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        for n in range(10):
            response = await client.post("/api/expensive-operation")
            assert response.status_code == 200
            assert response.headers["ratelimit"] == f'"expensive";r={9 - n};t={6 * (n + 1)}'
        denied = await client.post("/api/expensive-operation")
        assert denied.status_code == 429
        assert denied.headers["retry-after"] == "6"
        assert denied.json()["request_id"] == denied.headers["x-request-id"]
        other = await client.get("/api/other")
        assert other.headers["x-ratelimit-remaining"] == "989"


async def test_dead_redis_fails_open(asyncio_only: None) -> None:
    # Nothing listens on port 1: a real connection failure, not a simulated one.
    store = RedisStore.from_url("redis://127.0.0.1:1/0", timeout=0.2)
    try:
        limiter = RateLimiter(store)
        assert (await limiter.hit("k", "1/hour")).allowed
        assert (await limiter.hit("k", "1/hour")).allowed
        assert limiter.store_errors == 2
        asgi = ErrorMiddleware(
            RateLimitMiddleware(
                app, rules=[Rule("* *", "1/hour", "ip")], store=store, on_store_error="deny"
            )
        )
        transport = httpx.ASGITransport(app=asgi, client=("1.2.3.4", 123))
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            response = await client.get("/x")
        assert response.status_code == 503
        assert response.json()["error"] == "service_unavailable"
    finally:
        await store.aclose()


async def test_redis_restart_fails_open_then_limits_again(
    asyncio_only: None, private_redis: RedisServer
) -> None:
    store = RedisStore.from_url(private_redis.url, timeout=0.5)
    try:
        limiter = RateLimiter(store)
        assert (await limiter.hit("k", "1/hour")).allowed
        assert not (await limiter.hit("k", "1/hour")).allowed
        private_redis.stop()
        assert (await limiter.hit("k", "1/hour")).allowed  # fail open while it is down
        assert limiter.store_errors == 1
        private_redis.start()  # empty again: a restarted Redis forgot the buckets
        assert (await limiter.hit("k", "1/hour")).allowed
        assert not (await limiter.hit("k", "1/hour")).allowed
        assert limiter.store_errors == 1
    finally:
        await store.aclose()


# -- real elapsed time on Redis's own clock (issue 23) ------------------------------------
# Redis decides on its own clock (TIME), and hit_buckets reports that clock's reading, so
# these tests compare the script with bucket.decide at the very instants Redis used:
# exact, however slowly a loaded machine runs the test.


# Rates whose whole burst is not a multiple of the float grid around Redis's clock reading
# (seconds since 2023, ~1e8): at every magnitude from 2^24 to 2^30 s, some of these round
# up by ~1e-8 when the script computes ``now + cost * interval - now``.
BURST_RATES = [
    "10/second burst 3",
    "7/second burst 2",
    "3/second",
    "7/second",
    "7/minute burst 3",
    "9/second burst 5",
    "11/minute burst 4",
    "13/second burst 6",
    "6/second burst 5",
]


async def test_a_fresh_bucket_gives_its_whole_burst_at_once(redis_store: RedisStore) -> None:
    """A request costing the whole burst fits a full bucket, even where float rounding
    makes ``now + burst - now`` a hair larger than the burst (the script's epsilon)."""
    limiter = RateLimiter(redis_store)
    rounding_cases = 0
    for text in BURST_RATES:
        rate = Rate.parse(text)
        interval, tolerance = rate.spec
        for n in range(3):
            allowed, now, _ = await redis_store.hit_buckets(["rl:clock"], [rate.spec], 0)
            assert allowed
            rounding_cases += (now + rate.capacity * interval) - now > tolerance
            decision = await limiter.hit(f"fresh-{n}", rate, cost=rate.capacity)
            assert (decision.allowed, decision.remaining) == (True, 0), (text, decision)
            assert not (await limiter.hit(f"fresh-{n}", rate)).allowed
    assert rounding_cases > 0, "no rate exercised the rounding slack"


async def test_one_interval_refills_exactly_one_token(redis_store: RedisStore) -> None:
    interval, tolerance = Rate.parse("2/second").spec  # 0.5 s per token, 2 deep
    specs = [(interval, tolerance)]
    allowed, start, (tat,) = await redis_store.hit_buckets(["rl:refill"], specs, 2)
    assert allowed
    assert tat == pytest.approx(start + 2 * interval, abs=1e-6)
    allowed, now, tats = await redis_store.hit_buckets(["rl:refill"], specs, 1)
    assert (allowed, tats) == bucket.decide([tat], now, specs, 1)
    if now - start < interval:  # how it goes unless this process stalled for 0.5 s
        assert not allowed
    await anyio.sleep(interval + 0.05)
    allowed, now, tats = await redis_store.hit_buckets(["rl:refill"], specs, 1)
    assert now - start >= interval
    assert allowed, "one interval later, one token is back"
    assert (allowed, tats) == bucket.decide([tat], now, specs, 1)
    assert tats[0] == tat + interval  # taken from the refilled bucket, not a fresh one
    tat = tats[0]
    allowed, now, tats = await redis_store.hit_buckets(["rl:refill"], specs, 1)
    assert (allowed, tats) == bucket.decide([tat], now, specs, 1)
    if now - start < 2 * interval:
        assert not allowed, "only one token came back"


@pytest.mark.parametrize(("text", "cost"), [("10/hour", 1), ("2/second", 2), ("3/minute", 2)])
async def test_key_ttl_matches_reset_after(redis_store: RedisStore, text: str, cost: int) -> None:
    """The key lives until the bucket is full again: dropped earlier, the next request
    would see a full bucket too soon; kept longer, memory is wasted."""
    limiter = RateLimiter(redis_store)
    rate = Rate.parse(text)
    specs = [rate.spec]
    allowed, now, (tat,) = await redis_store.hit_buckets(["rl:ttl"], specs, cost)
    assert allowed
    reset_ms = bucket.reset_after(tat, now) * 1000
    pttl = await redis_store.client.pttl(redis_store.prefix + "rl:ttl")
    # PTTL is read a moment after the script ran; 250 ms covers a loaded machine.
    assert reset_ms - 250 <= pttl <= reset_ms + 2, (pttl, reset_ms)
    decision = await limiter.hit("ttl", rate, cost=cost)
    assert decision.reset_after == pytest.approx(cost * rate.spec[0], abs=0.25)


def _reads(server: RedisServer) -> int:
    """Reads of client sockets by the private Redis: one per round trip."""
    import redis

    probe = redis.Redis(host="127.0.0.1", port=server.port, socket_timeout=5)
    try:
        return int(probe.info("stats")["total_reads_processed"])
    finally:
        probe.close()


def _evalsha(server: RedisServer) -> int:
    import redis

    probe = redis.Redis(host="127.0.0.1", port=server.port, socket_timeout=5)
    try:
        return int(probe.info("commandstats").get("cmdstat_evalsha", {"calls": 0})["calls"])
    finally:
        probe.close()


async def test_200_concurrent_requests_share_round_trips_and_admit_exactly_10(
    private_redis: RedisServer, asyncio_only: None
) -> None:
    """The middleware on the batching store: 200 concurrent requests against a global
    10/minute rule are decided one script call each, in far fewer round trips, and
    exactly 10 get through (each with its own honest headers)."""
    store = RedisStore.from_url(private_redis.url)
    asgi = ErrorMiddleware(
        RateLimitMiddleware(app, rules=[Rule("GET /burst", "10/minute", "global")], store=store)
    )
    transport = httpx.ASGITransport(app=asgi, client=("1.2.3.4", 123))
    try:
        async with httpx.AsyncClient(
            transport=transport, base_url="http://t", limits=httpx.Limits(max_connections=None)
        ) as client:
            assert (await client.get("/warm")).status_code == 200  # no rule: no store call
            await store.hit_buckets(["warm"], [(1.0, 1.0)], 0)  # connected, script loaded
            reads, calls = _reads(private_redis), _evalsha(private_redis)
            responses = await asyncio.gather(*(client.get("/burst") for _ in range(200)))
            reads = _reads(private_redis) - reads - 1  # the INFO of _reads itself
            calls = _evalsha(private_redis) - calls
    finally:
        await store.aclose()
    statuses = sorted(response.status_code for response in responses)
    assert statuses == [200] * 10 + [429] * 190
    remaining = sorted(int(r.headers["x-ratelimit-remaining"]) for r in responses)
    assert remaining == [0] * 191 + list(range(1, 10))
    assert {r.headers["retry-after"] for r in responses if r.status_code == 429} <= {"6", "5"}
    assert calls == 200
    assert reads <= 20, reads  # 200 requests, a handful of round trips
    assert store.breakers["rate_limit"].stats.failures == 0


async def test_32_concurrent_clients_cost_well_under_a_round_trip_each(
    private_redis: RedisServer, asyncio_only: None
) -> None:
    """32 clients, each sending its requests one after another (a server under a load
    generator of 32 connections): the seed's four rules, one EVALSHA per request, and
    far less than one round trip per request."""
    store = RedisStore.from_url(private_redis.url)
    asgi = ErrorMiddleware(
        RateLimitMiddleware(app, rules=seed_rules(), store=store, identify=identify)
    )
    transport = httpx.ASGITransport(app=asgi, client=("1.2.3.4", 123))
    per_client = 20  # the builds rule allows 20 an hour per project
    try:
        async with httpx.AsyncClient(
            transport=transport, base_url="http://t", limits=httpx.Limits(max_connections=None)
        ) as client:
            assert (await client.get("/api/warm")).status_code == 200
            reads, calls = _reads(private_redis), _evalsha(private_redis)

            async def one_client(index: int) -> list[int]:
                return [
                    (await client.post(f"/api/projects/p{index}/builds")).status_code
                    for _ in range(per_client)
                ]

            statuses = await asyncio.gather(*(one_client(i) for i in range(32)))
            reads = _reads(private_redis) - reads - 1
            calls = _evalsha(private_redis) - calls
    finally:
        await store.aclose()
    requests = 32 * per_client
    assert [s for client_statuses in statuses for s in client_statuses] == [200] * requests
    assert calls == requests
    print(f"\n[32 clients] {reads / requests:.3f} round trips per request")
    assert reads / requests < 0.5
