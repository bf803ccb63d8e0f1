"""One conformance suite for every store: MemoryStore and RedisStore behave the same."""

from __future__ import annotations

from collections.abc import AsyncIterator

import anyio
import pytest

from asgi_armor.ratelimit.bucket import spec
from asgi_armor.stores.base import Store, StoreError, make_key
from asgi_armor.stores.memory import MemoryStore
from asgi_armor.stores.redis import RedisStore
from tests.conftest import FakeClock, RedisServer

pytestmark = pytest.mark.anyio


@pytest.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.asyncio_only)])
async def store(request: pytest.FixtureRequest, anyio_backend: str) -> AsyncIterator[Store]:
    if request.param == "memory":
        yield MemoryStore()
        return
    prefix = request.getfixturevalue("redis_prefix")
    redis_store = RedisStore.from_url(request.getfixturevalue("redis_url"), prefix=prefix)
    yield redis_store
    await redis_store.aclose()


def test_make_key_hashes_long_parts() -> None:
    assert make_key("rl", "ip", "1.2.3.4") == "rl:ip:1.2.3.4"
    long = make_key("rl", "x" * 1000)
    assert len(long) < 64
    assert long != make_key("rl", "x" * 999)


async def test_buckets_exact_limit(store: Store) -> None:
    ten_per_minute = spec(10, 60)
    results = [await store.hit_buckets(["k"], [ten_per_minute], 1) for _ in range(11)]
    assert [allowed for allowed, _, _ in results] == [True] * 10 + [False]
    _allowed, now, tats = results[-1]
    assert tats[0] - now == pytest.approx(60, abs=0.1)


async def test_buckets_all_or_nothing(store: Store) -> None:
    wide, narrow = spec(100, 60), spec(1, 60)
    assert (await store.hit_buckets(["wide", "narrow"], [wide, narrow], 1))[0]
    allowed, _, _ = await store.hit_buckets(["wide", "narrow"], [wide, narrow], 1)
    assert not allowed
    # The denied call consumed nothing from the wide bucket: one token used, 99 left.
    allowed, _now, _tats = await store.hit_buckets(["wide"], [wide], 99)
    assert allowed
    assert not (await store.hit_buckets(["wide"], [wide], 1))[0]


async def test_buckets_concurrent_exact(store: Store) -> None:
    fifty = spec(50, 3600)
    allowed = 0

    async def hit() -> None:
        nonlocal allowed
        if (await store.hit_buckets(["c"], [fifty], 1))[0]:
            allowed += 1

    async with anyio.create_task_group() as tg:
        for _ in range(200):
            tg.start_soon(hit)
    assert allowed == 50


async def test_lease_lifecycle(store: Store) -> None:
    assert await store.lease_acquire("l", b"mine", 30) is None
    assert await store.lease_acquire("l", b"theirs", 30) == b"mine"
    assert not await store.lease_complete("l", b"theirs", b"value", 30)
    assert await store.lease_complete("l", b"mine", b"value", 30)
    assert await store.lease_acquire("l", b"again", 30) == b"value"
    assert not await store.lease_release("l", b"mine")


async def test_lease_release_frees_key(store: Store) -> None:
    assert await store.lease_acquire("r", b"mine", 30) is None
    assert not await store.lease_release("r", b"other")
    assert await store.lease_release("r", b"mine")
    assert await store.lease_acquire("r", b"next", 30) is None


async def test_lease_concurrent_single_owner(store: Store) -> None:
    winners = []

    async def take(i: int) -> None:
        if await store.lease_acquire("race", f"lease-{i}".encode(), 30) is None:
            winners.append(i)

    async with anyio.create_task_group() as tg:
        for i in range(100):
            tg.start_soon(take, i)
    assert len(winners) == 1


async def test_remember(store: Store) -> None:
    assert await store.remember("n", 60)
    assert not await store.remember("n", 60)
    assert await store.remember("other", 60)


async def test_memory_expiry(clock: FakeClock) -> None:
    store = MemoryStore(clock=clock)
    assert await store.remember("n", 10)
    assert await store.lease_acquire("l", b"a", 5) is None
    clock.advance(5)
    assert await store.lease_acquire("l", b"b", 5) is None
    assert not await store.remember("n", 10)
    clock.advance(5)
    assert await store.remember("n", 10)


async def test_memory_refill(clock: FakeClock) -> None:
    store = MemoryStore(clock=clock)
    one_per_second = spec(1, 1)
    assert (await store.hit_buckets(["k"], [one_per_second], 1))[0]
    assert not (await store.hit_buckets(["k"], [one_per_second], 1))[0]
    clock.advance(1)
    assert (await store.hit_buckets(["k"], [one_per_second], 1))[0]


async def test_memory_bounded_under_key_flood(clock: FakeClock) -> None:
    store = MemoryStore(max_keys=1000, max_bytes=10_000, clock=clock)
    hour = spec(10, 3600)
    for i in range(20_000):
        await store.hit_buckets([f"ip:{i}"], [hour], 1)
        await store.remember(f"n:{i}", 3600)
        await store.lease_acquire(f"l:{i}", b"x" * 50, 3600)
    assert len(store._tats) <= 1000
    assert len(store._entries) <= 1000
    assert store._bytes <= 10_000
    assert store.evictions > 0


async def test_memory_sweeps_expired_before_evicting(clock: FakeClock) -> None:
    store = MemoryStore(max_keys=100, clock=clock)
    second = spec(1, 1)
    for i in range(100):
        await store.hit_buckets([f"old:{i}"], [second], 1)
    clock.advance(2)
    before = store.evictions
    for i in range(50):
        await store.hit_buckets([f"new:{i}"], [second], 1)
    assert store.evictions == before


async def test_redis_down_raises_store_error(asyncio_only: None) -> None:
    store = RedisStore.from_url("redis://127.0.0.1:1/0", timeout=0.2)
    try:
        with pytest.raises(StoreError):
            await store.hit_buckets(["k"], [spec(1, 1)], 1)
        with pytest.raises(StoreError):
            await store.remember("k", 1)
    finally:
        await store.aclose()


async def test_redis_single_round_trip(private_redis: RedisServer, asyncio_only: None) -> None:
    """All layers in one EVALSHA, counted with INFO commandstats on a private server."""
    import redis.asyncio as aioredis

    store = RedisStore.from_url(private_redis.url)
    probe = aioredis.Redis.from_url(private_redis.url)
    try:
        specs = [spec(1000, 60), spec(10, 60), spec(5, 3600), spec(20, 3600)]
        keys = ["a", "b", "c", "d"]
        await store.hit_buckets(keys, specs, 1)  # loads the script
        await probe.config_resetstat()
        await store.hit_buckets(keys, specs, 1)
        stats = await probe.info("commandstats")
        calls = {name: value["calls"] for name, value in stats.items()}
        calls.pop("cmdstat_config|resetstat", None)
        calls.pop("cmdstat_info", None)  # the probe's own
        # One client command (EVALSHA); inside it, Redis counts the script's own calls.
        assert calls == {
            "cmdstat_evalsha": 1,
            "cmdstat_time": 1,
            "cmdstat_get": 4,
            "cmdstat_set": 4,
        }
    finally:
        await probe.aclose()
        await store.aclose()


async def test_dead_redis_is_cut_off_by_the_breaker(asyncio_only: None) -> None:
    """After 3 failures the breaker answers at once: no connection attempt per request."""
    store = RedisStore.from_url("redis://127.0.0.1:1/0", timeout=0.2)
    try:
        for _ in range(3):
            with pytest.raises(StoreError):
                await store.remember("k", 1)
        assert store.breaker.state.value == "open"
        for _ in range(100):
            with pytest.raises(StoreError, match="breaker open"):
                await store.remember("k", 1)
        stats = store.breaker.stats
        assert (stats.calls, stats.failures, stats.rejections) == (3, 3, 100)
    finally:
        await store.aclose()


async def test_forget(store: Store) -> None:
    assert await store.remember("f", 60)
    await store.forget("f")
    assert await store.remember("f", 60)
    await store.forget("never-seen")
