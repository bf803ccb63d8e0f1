"""One conformance suite for every store: MemoryStore, RedisStore, RedisClusterStore and
RedisSentinelStore behave the same."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import statistics
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import anyio
import pytest

from asgi_armor.breaker import CircuitBreaker
from asgi_armor.errors import ConfigError, Overloaded
from asgi_armor.ratelimit.bucket import spec
from asgi_armor.stores.base import Store, StoreError, make_key
from asgi_armor.stores.cluster import RedisClusterStore
from asgi_armor.stores.memory import MemoryStore
from asgi_armor.stores.redis import RedisStore
from asgi_armor.stores.sentinel import RedisSentinelStore
from tests.conftest import FakeClock, RedisServer

pytestmark = pytest.mark.anyio


@pytest.fixture(
    params=[
        "memory",
        pytest.param("redis", marks=pytest.mark.asyncio_only),
        pytest.param("cluster", marks=pytest.mark.asyncio_only),
        pytest.param("sentinel", marks=pytest.mark.asyncio_only),
    ]
)
async def store(request: pytest.FixtureRequest, anyio_backend: str) -> AsyncIterator[Store]:
    if request.param == "memory":
        yield MemoryStore()
        return
    redis_store: RedisStore | RedisClusterStore
    if request.param == "redis":
        prefix = request.getfixturevalue("redis_prefix")
        redis_store = RedisStore.from_url(request.getfixturevalue("redis_url"), prefix=prefix)
    else:
        # Private servers (session-wide): a fresh prefix keeps each test's keys apart.
        prefix = f"armortest:{uuid.uuid4().hex[:12]}:"
        if request.param == "cluster":
            redis_store = RedisClusterStore.from_url(
                request.getfixturevalue("redis_cluster").url, prefix=prefix
            )
        else:
            redis_store = RedisSentinelStore.from_url(
                request.getfixturevalue("redis_sentinel").url, prefix=prefix
            )
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


async def test_a_negative_cost_gives_back_what_a_take_added(store: Store) -> None:
    three = spec(3, 3600)  # a token every 1200 s: nothing refills during the test
    step = three[0]
    taken = [await store.hit_buckets(["g", "h"], [three, three], 1) for _ in range(3)]
    assert [allowed for allowed, _, _ in taken] == [True, True, True]
    assert not (await store.hit_buckets(["g"], [three], 1))[0]
    _, _, last = taken[-1]
    # Give back the last take of both buckets, as a failures-only rule does on a success.
    back = [(step, last[0] - step), (step, last[1] - step)]
    allowed, now, tats = await store.hit_buckets(["g", "h"], back, -1)
    assert allowed
    assert tats[0] == pytest.approx(last[0] - step, abs=0.01)
    assert tats[0] - now == pytest.approx(2 * step, abs=1)
    assert (await store.hit_buckets(["g"], [three], 1))[0]  # the token is back, once
    assert not (await store.hit_buckets(["g"], [three], 1))[0]
    # Never more than the take added: a second give-back of a refilled part is capped.
    _, _, full = await store.hit_buckets(["fresh"], [three], 1)
    await store.hit_buckets(["fresh"], [(step, full[0] - step)], -1)
    allowed, now, tats = await store.hit_buckets(["fresh"], [(step, full[0] - step)], -1)
    assert allowed
    assert tats[0] == pytest.approx(now, abs=0.01)  # full: nothing owed, nothing gained
    assert [
        a for a, _, _ in [await store.hit_buckets(["fresh"], [three], 1) for _ in range(4)]
    ] == [
        True,
        True,
        True,
        False,
    ]


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


async def test_lease_extend_keeps_only_our_lease(store: Store) -> None:
    assert await store.lease_acquire("x", b"mine", 30) is None
    assert not await store.lease_extend("x", b"theirs", 30)
    assert await store.lease_extend("x", b"mine", 30)
    assert await store.lease_acquire("x", b"other", 30) == b"mine"
    # A completed record is nobody's lease: extending never touches it.
    assert await store.lease_complete("x", b"mine", b"value", 30)
    assert not await store.lease_extend("x", b"mine", 30)
    assert await store.lease_acquire("x", b"other", 30) == b"value"


async def test_lease_extend_takes_a_lapsed_lease_again(store: Store) -> None:
    """A lease that expired while the store was out of reach is ours again if still free."""
    assert await store.lease_extend("gone", b"mine", 30)
    assert await store.lease_acquire("gone", b"other", 30) == b"mine"
    assert await store.lease_complete("gone", b"mine", b"value", 30)


async def test_lease_extend_restarts_the_expiry(clock: FakeClock) -> None:
    store = MemoryStore(clock=clock)
    assert await store.lease_acquire("l", b"mine", 5) is None
    clock.advance(4)
    assert await store.lease_extend("l", b"mine", 5)
    clock.advance(4)
    assert await store.lease_acquire("l", b"other", 5) == b"mine"
    clock.advance(1.5)
    assert await store.lease_acquire("l", b"other", 5) is None


async def test_redis_lease_extend_restarts_the_expiry(
    redis_url: str, redis_prefix: str, asyncio_only: None
) -> None:
    import redis.asyncio as aioredis

    store = RedisStore.from_url(redis_url, prefix=redis_prefix)
    probe = aioredis.Redis.from_url(redis_url)
    try:
        assert await store.lease_acquire("l", b"mine", 1) is None
        assert await store.lease_extend("l", b"mine", 60)
        assert 59_000 < await probe.pttl(redis_prefix + "l") <= 60_000
    finally:
        await probe.aclose()
        await store.aclose()


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


async def test_remember_run_twice_with_its_token_is_new_both_times(store: Store) -> None:
    """The repeat of a call whose reply was lost finds its own token: still "new", so a
    genuine delivery is not refused as its own replay; another call's token is a replay."""
    assert await store.remember("tok", 60, token=b"call-1")
    assert await store.remember("tok", 60, token=b"call-1")
    assert not await store.remember("tok", 60, token=b"call-2")
    assert not await store.remember("tok", 60)
    assert await store.remember("untokened", 60)
    assert not await store.remember("untokened", 60)  # no token: every call its own


async def test_lease_operations_run_twice_answer_as_once(store: Store) -> None:
    """Each lease operation repeated with the same arguments (its first reply lost)
    answers as the first run did, and changes nothing more."""
    assert await store.lease_acquire("twice", b"mine", 30) is None
    assert await store.lease_acquire("twice", b"mine", 30) is None  # our own lease: taken
    assert await store.lease_acquire("twice", b"theirs", 30) == b"mine"
    assert await store.lease_extend("twice", b"mine", 30)
    assert await store.lease_extend("twice", b"mine", 30)
    assert await store.lease_complete("twice", b"mine", b"record", 30)
    assert await store.lease_complete("twice", b"mine", b"record", 30)  # our record: done
    assert not await store.lease_complete("twice", b"mine", b"other record", 30)
    assert not await store.lease_complete("twice", b"theirs", b"theirs too", 30)
    assert await store.lease_acquire("twice", b"again", 30) == b"record"
    assert not await store.lease_release("twice", b"mine")  # a record is nobody's lease
    assert await store.lease_acquire("twice", b"again", 30) == b"record"
    assert await store.lease_acquire("free", b"mine", 30) is None
    assert await store.lease_release("free", b"mine")
    assert await store.lease_release("free", b"mine")  # already free: released
    assert await store.lease_acquire("free", b"next", 30) is None
    assert not await store.lease_release("free", b"mine")  # never frees another's lease
    assert await store.lease_acquire("free", b"other", 30) == b"next"


async def test_forget_run_twice(store: Store) -> None:
    assert await store.remember("gone", 60, token=b"t")
    await store.forget("gone")
    await store.forget("gone")
    assert await store.remember("gone", 60, token=b"u")


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
    refused = 0
    for i in range(20_000):
        await store.hit_buckets([f"ip:{i}"], [hour], 1)
        try:
            await store.remember(f"n:{i}", 3600)
            if await store.lease_acquire(f"l:{i}", b"x" * 50, 3600) is None:
                await store.lease_complete(f"l:{i}", b"x" * 50, b"y" * 50, 3600)
        except StoreError:
            refused += 1
    assert len(store._tats) <= 1000
    assert len(store._entries) + len(store._held) <= 1000
    assert store._bytes <= 10_000
    assert store.evictions > 0
    # Nonces are kept for their hour: once they fill the store, new ones are refused.
    assert refused == store.refusals > 0


async def test_memory_full_never_evicts_an_in_flight_lease(clock: FakeClock) -> None:
    store = MemoryStore(max_keys=10, clock=clock)
    for i in range(10):
        assert await store.lease_acquire(f"pay:{i}", f"lease-{i}".encode(), 60) is None
    with pytest.raises(StoreError, match="full"):
        await store.lease_acquire("pay:new", b"lease-new", 60)
    assert (store.evictions, store.refusals) == (0, 1)
    # Every lease is still there: a retry of any of them is "in use", never a second run.
    for i in range(10):
        assert await store.lease_acquire(f"pay:{i}", b"retry", 60) == f"lease-{i}".encode()
    assert await store.lease_complete("pay:0", b"lease-0", b"done", 60)
    # A stored response may go (oldest first) to make room; the leases may not.
    assert await store.lease_acquire("pay:new", b"lease-new", 60) is None
    assert (store.evictions, store.refusals) == (1, 1)
    with pytest.raises(StoreError):
        await store.lease_acquire("pay:newer", b"lease-newer", 60)


async def test_memory_full_never_evicts_an_unexpired_nonce(clock: FakeClock) -> None:
    store = MemoryStore(max_keys=10, clock=clock)
    for i in range(10):
        assert await store.remember(f"nonce:{i}", 600)
    with pytest.raises(StoreError, match="full"):
        await store.remember("nonce:new", 600)
    for i in range(10):
        assert not await store.remember(f"nonce:{i}", 600)  # a replay is still refused
    clock.advance(600)
    # Expired, they make room without counting as evictions.
    assert await store.remember("nonce:new", 600)
    assert (store.evictions, store.refusals) == (0, 1)


async def test_memory_expired_leases_make_room_whatever_their_order(clock: FakeClock) -> None:
    store = MemoryStore(max_keys=3, clock=clock)
    assert await store.lease_acquire("long", b"a", 100) is None
    assert await store.lease_acquire("short", b"b", 1) is None
    assert await store.remember("nonce", 100)
    clock.advance(2)
    # Only the second-written entry has expired: it is found, not the oldest evicted.
    assert await store.lease_acquire("next", b"c", 100) is None
    assert await store.lease_acquire("long", b"x", 100) == b"a"
    assert not await store.remember("nonce", 100)
    assert store.evictions == 0


async def test_memory_stored_responses_are_evicted_oldest_first(clock: FakeClock) -> None:
    store = MemoryStore(max_keys=100, max_bytes=300, clock=clock)
    for name in ("a", "b", "c"):
        assert await store.lease_acquire(name, b"l", 60) is None
        assert await store.lease_complete(name, b"l", name.encode() * 90, 60)
    assert await store.lease_acquire("d", b"l", 60) is None
    assert await store.lease_complete("d", b"l", b"d" * 90, 60)
    assert store.evictions == 1
    assert await store.lease_acquire("a", b"new", 60) is None  # the oldest went
    assert await store.lease_acquire("b", b"new", 60) == b"b" * 90
    assert store._bytes <= 300


async def test_memory_response_that_cannot_fit_keeps_the_lease(clock: FakeClock) -> None:
    store = MemoryStore(max_keys=100, max_bytes=100, clock=clock)
    assert await store.lease_acquire("big", b"lease", 60) is None
    with pytest.raises(StoreError):
        await store.lease_complete("big", b"lease", b"x" * 101, 60)
    # Not stored, and not forgotten either: a retry is "in use" until the lease expires.
    assert await store.lease_acquire("big", b"other", 60) == b"lease"
    assert await store.lease_complete("big", b"lease", b"x" * 50, 60)


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


async def test_memory_take_one_is_hit_buckets_for_one_bucket(clock: FakeClock) -> None:
    one, many = MemoryStore(clock=clock), MemoryStore(clock=clock)
    three_per_second = spec(3, 1)
    for _ in range(12):
        for cost in (0, 1, 2):
            allowed, now, tats = await many.hit_buckets(["k"], [three_per_second], cost)
            assert one.take_one("k", *three_per_second, cost) == (allowed, now, tats[0])
        clock.advance(0.3)
    assert one._tats == many._tats
    with pytest.raises(ValueError, match="cost must be >= 0"):
        one.take_one("k", *three_per_second, -1)


async def test_memory_sweeps_expired_buckets_in_batches(clock: FakeClock) -> None:
    store = MemoryStore(clock=clock)
    second = spec(1, 1)
    for i in range(1000):
        store.take_one(f"old:{i}", *second, 1)
    clock.advance(2)
    for i in range(24):
        store.take_one(f"new:{i}", *second, 1)
    # Expired buckets are kept until 1024 new ones were written since the last sweep ...
    assert len(store._tats) == 1024
    store.take_one("new:24", *second, 1)
    # ... then go together, the live ones kept.
    assert sorted(store._tats) == sorted(f"new:{i}" for i in range(25))
    assert store.evictions == 0


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
        assert store.breakers["replay"].state.value == "open"
        for _ in range(100):
            with pytest.raises(StoreError, match="breaker open"):
                await store.remember("k", 1)
        stats = store.breakers["replay"].stats
        assert (stats.calls, stats.failures, stats.rejections) == (3, 3, 100)
    finally:
        await store.aclose()


async def test_each_concern_has_its_own_breaker(asyncio_only: None) -> None:
    """Replay-cache failures open the replay breaker only: rate limits and leases still try."""
    store = RedisStore.from_url("redis://127.0.0.1:1/0", timeout=0.2)
    try:
        for _ in range(3):
            with pytest.raises(StoreError, match="call failed"):
                await store.remember("k", 1)
        assert store.breakers["replay"].state.value == "open"
        with pytest.raises(StoreError, match="call failed"):
            await store.hit_buckets(["k"], [spec(1, 1)], 1)
        with pytest.raises(StoreError, match="call failed"):
            await store.lease_acquire("k", b"lease", 1)
        assert store.breakers["rate_limit"].stats.failures == 1
        assert store.breakers["idempotency"].stats.failures == 1
        assert store.breakers["rate_limit"].state.value == "closed"
        assert store.breakers["idempotency"].state.value == "closed"
    finally:
        await store.aclose()


async def test_forget(store: Store) -> None:
    assert await store.remember("f", 60)
    await store.forget("f")
    assert await store.remember("f", 60)
    await store.forget("never-seen")


def test_redis_client_that_decodes_responses_is_refused() -> None:
    """Leases and responses come back as bytes; a decoding client would make the first
    replay a 500, so it is refused when the store is made."""
    import redis.asyncio as aioredis

    decoding = aioredis.Redis.from_url("redis://127.0.0.1:6379/15", decode_responses=True)
    with pytest.raises(ConfigError, match=r"^store: .*decode_responses"):
        RedisStore(decoding)
    with pytest.raises(ConfigError, match="decode_responses"):
        RedisStore.from_url("redis://127.0.0.1:6379/15", decode_responses=True)
    with pytest.raises(ConfigError, match="decode_responses"):
        RedisStore.from_url("redis://127.0.0.1:6379/15?decode_responses=true")
    plain = aioredis.Redis.from_url("redis://127.0.0.1:6379/15")
    assert RedisStore(plain).client is plain


@pytest.mark.parametrize("anyio_backend", ["trio"])
async def test_redis_store_on_trio_raises_store_error_logged_once(
    anyio_backend: str, caplog: pytest.LogCaptureFixture
) -> None:
    """redis.asyncio cannot run on trio: a clear StoreError (never RuntimeError), one log."""
    store = RedisStore.from_url("redis://127.0.0.1:6379/15")
    with pytest.raises(ConfigError, match=r"^store: RedisStore runs on asyncio only"):
        store.check_runtime()
    for _ in range(3):
        with pytest.raises(StoreError, match="not running on asyncio"):
            await store.hit_buckets(["k"], [spec(1, 1)], 1)
        with pytest.raises(StoreError, match="not running on asyncio"):
            await store.lease_acquire("k", b"lease", 1)
    logged = [r for r in caplog.records if "runs on asyncio only" in r.getMessage()]
    assert len(logged) == 1


async def test_redis_sends_at_most_max_in_flight_calls(
    private_redis: RedisServer, asyncio_only: None
) -> None:
    """200 concurrent calls go through 4 connections; none waits long enough to be shed."""
    import redis.asyncio as aioredis

    store = RedisStore.from_url(private_redis.url, max_in_flight=4)
    probe = aioredis.Redis.from_url(private_redis.url)
    try:
        fifty = spec(50, 3600)
        results = await asyncio.gather(*(store.hit_buckets(["c"], [fifty], 1) for _ in range(200)))
        assert sum(allowed for allowed, _, _ in results) == 50
        clients = await probe.client_list()
        assert len(clients) - 1 <= 4  # the probe's own connection left out
        assert store.breakers["rate_limit"].stats.failures == 0
    finally:
        await probe.aclose()
        await store.aclose()


async def test_redis_call_waiting_too_long_for_its_turn_is_overloaded(
    private_redis: RedisServer, asyncio_only: None
) -> None:
    """Local overload: new work waiting past queue_timeout raises Overloaded (not a store
    failure, no breaker counts it); work being finished always waits its turn."""
    store = RedisStore.from_url(private_redis.url, max_in_flight=1, queue_timeout=0.1)
    assert await store.remember("warm", 10)  # connected
    process = private_redis.process
    assert process is not None
    process.send_signal(signal.SIGSTOP)
    try:
        held = asyncio.ensure_future(store.hit_buckets(["k"], [spec(1, 1)], 1))
        await asyncio.sleep(0.05)
        for admitting in (
            store.remember("n", 10),
            store.lease_acquire("l", b"lease", 10),
            store.hit_buckets(["k2"], [spec(1, 1)], 1),
        ):
            with pytest.raises(Overloaded):
                await admitting
        finishing = asyncio.ensure_future(store.lease_release("l", b"lease"))
        with pytest.raises(StoreError, match="call failed"):
            await held  # the frozen Redis: a real store failure
        with pytest.raises(StoreError, match="call failed"):
            await finishing  # sent once the slot was free, then timed out itself
    finally:
        process.send_signal(signal.SIGCONT)
        await store.aclose()
    stats = {concern: breaker.stats for concern, breaker in store.breakers.items()}
    assert (stats["rate_limit"].calls, stats["rate_limit"].failures) == (1, 1)
    assert (stats["idempotency"].calls, stats["idempotency"].failures) == (1, 1)
    assert (stats["replay"].calls, stats["replay"].failures) == (1, 0)


def test_redis_store_bounds_are_checked() -> None:
    """More calls in flight than connections would queue inside the store deadline."""
    with pytest.raises(ConfigError, match=r"max_in_flight must be 1\.\.8"):
        RedisStore.from_url("redis://127.0.0.1:6379/15", max_connections=8, max_in_flight=9)
    with pytest.raises(ConfigError, match="max_in_flight"):
        RedisStore.from_url("redis://127.0.0.1:6379/15", max_in_flight=0)
    with pytest.raises(ConfigError, match="queue_timeout"):
        RedisStore.from_url("redis://127.0.0.1:6379/15", queue_timeout=0)
    with pytest.raises(ConfigError, match="unknown breaker"):
        RedisStore.from_url("redis://127.0.0.1:6379/15", breakers={"ratelimit": CircuitBreaker()})
    with pytest.raises(ConfigError, match="max_batch"):
        RedisStore.from_url("redis://127.0.0.1:6379/15", max_batch=0)
    sentinel = "redis+sentinel://127.0.0.1:26379/armor"  # lazy: nothing is asked here
    assert RedisSentinelStore.from_url(sentinel, max_batch=16).max_batch == 16
    with pytest.raises(ConfigError, match="max_batch"):
        RedisSentinelStore.from_url(sentinel, max_batch=0)
    # Four batches in flight by default, never more than the pool's connections.
    assert RedisStore.from_url("redis://127.0.0.1:6379/15").max_in_flight == 4
    assert RedisStore.from_url("redis://127.0.0.1:6379/15", max_connections=2).max_in_flight == 2


def _kill_clients(ports: list[int], name: str) -> int:
    """Close, from the server side, every connection named ``name`` on these servers (as
    a proxy or Redis's idle ``timeout`` does); how many were closed."""
    import redis

    closed = 0
    for port in ports:
        admin = redis.Redis(host="127.0.0.1", port=port, socket_timeout=5)
        try:
            for client in admin.client_list():
                if client["name"] == name:
                    closed += admin.client_kill_filter(_id=int(client["id"]))
        finally:
            admin.close()
    return closed


@pytest.mark.parametrize("kind", ["redis", "cluster", "sentinel"])
async def test_connections_closed_while_idle_cost_no_call(
    kind: str, request: pytest.FixtureRequest, asyncio_only: None
) -> None:
    """Every pooled connection closed by the server while idle: the first batch on each
    is sent once more on a new connection, on a single Redis, each primary of a Cluster
    and a Sentinel's master alike; no call fails, no breaker counts a failure."""
    name = f"armor-idle-{uuid.uuid4().hex[:8]}"
    prefix = f"armortest:{uuid.uuid4().hex[:12]}:"
    store: Any
    if kind == "redis":
        server: RedisServer = request.getfixturevalue("private_redis")
        store = RedisStore.from_url(server.url, prefix=prefix, client_name=name)
        ports = [server.port]
    elif kind == "cluster":
        cluster = request.getfixturevalue("redis_cluster")
        store = RedisClusterStore.from_url(cluster.url, prefix=prefix, client_name=name)
        ports = cluster.live_ports()
    else:
        group = request.getfixturevalue("redis_sentinel")
        store = RedisSentinelStore.from_url(group.url, prefix=prefix, client_name=name)
        ports = list(group.data_ports)
    nodes: list[RedisStore] = []
    try:
        await asyncio.gather(*(store.remember(f"warm:{i}", 60) for i in range(600)))
        nodes = list(store.nodes.values()) if kind == "cluster" else [store]
        assert _kill_clients(ports, name) >= 4
        ten = spec(10, 3600)
        results = await asyncio.gather(
            *(store.hit_buckets([f"rl:ip:{i % 4}"], [ten], 1) for i in range(80)),
            *(store.lease_acquire(f"idem:{i}", b"lease", 60) for i in range(80)),
            *(store.remember(f"nonce:{i}", 60) for i in range(80)),
            return_exceptions=True,
        )
        assert [type(result) for result in results if isinstance(result, Exception)] == []
        assert sum(allowed for allowed, _, _ in results[:80]) == 40  # each ran once
        assert results[80:] == [None] * 80 + [True] * 80
        if kind != "sentinel":
            assert sum(node.stale_connections for node in nodes) >= 1
        # (redis-py's Sentinel connection yields to the event loop while the pool checks
        # it, so the pool reads the close itself and connects anew: nothing is stale.)
        failures = {
            (id(node), concern): breaker.stats.failures
            for node in nodes
            for concern, breaker in node.breakers.items()
        }
        assert set(failures.values()) == {0}
    finally:
        if kind != "redis":
            import redis.asyncio as aioredis

            # Shared servers: this test's keys go with it.
            for node in nodes or ([store] if kind == "sentinel" else []):
                client: aioredis.Redis = node.client
                # The pool's own connections were killed above too (the store's batches
                # run on connections of the store's own): connect anew.
                await client.connection_pool.disconnect()
                async for key in client.scan_iter(match=prefix + "*"):
                    # One by one: a Cluster's keys span slots (a replica's copies are
                    # deleted by their primary: MOVED here).
                    with contextlib.suppress(aioredis.ResponseError):
                        await client.delete(key)
        await store.aclose()


def _reads(info: dict[str, Any]) -> int:
    """Reads of client sockets by Redis: one per round trip (a pipeline is read at once)."""
    return int(info["total_reads_processed"])


async def test_redis_concurrent_calls_share_round_trips(
    private_redis: RedisServer, asyncio_only: None
) -> None:
    """256 concurrent decisions: one EVALSHA each, far fewer round trips, each its own
    answer (exactly the limit allowed)."""
    import redis.asyncio as aioredis

    store = RedisStore.from_url(private_redis.url)
    probe = aioredis.Redis.from_url(private_redis.url)
    fifty = spec(50, 3600)
    try:
        await store.hit_buckets(["warm"], [fifty], 1)
        await probe.config_resetstat()
        before = _reads(await probe.info("stats"))
        results = await asyncio.gather(
            *(store.hit_buckets(["c", f"k{i}"], [fifty, fifty], 1) for i in range(256))
        )
        reads = _reads(await probe.info("stats")) - before
        stats = await probe.info("commandstats")
    finally:
        await probe.aclose()
        await store.aclose()
    assert sum(allowed for allowed, _, _ in results) == 50
    assert stats["cmdstat_evalsha"]["calls"] == 256
    # At most 128 calls a batch and 4 batches in flight: a handful of round trips (and
    # the probe's INFO), not 256.
    assert reads <= 8, reads


async def test_redis_batches_are_bounded(private_redis: RedisServer, asyncio_only: None) -> None:
    """``max_batch`` calls per round trip at most, ``max_in_flight`` connections."""
    import redis.asyncio as aioredis

    store = RedisStore.from_url(private_redis.url, max_batch=10, max_in_flight=2)
    probe = aioredis.Redis.from_url(private_redis.url)
    thirty = spec(30, 3600)
    try:
        await store.hit_buckets(["warm"], [thirty], 1)
        before = _reads(await probe.info("stats"))
        results = await asyncio.gather(*(store.hit_buckets(["b"], [thirty], 1) for _ in range(100)))
        reads = _reads(await probe.info("stats")) - before
        clients = await probe.client_list()
    finally:
        await probe.aclose()
        await store.aclose()
    # Batches on two connections may run in any order; each call exactly once.
    assert sum(allowed for allowed, _, _ in results) == 30
    assert reads >= 10  # 100 calls, at most 10 a batch (plus the probe's INFO)
    assert len(clients) - 1 <= 2


async def test_redis_lone_call_is_not_held_back(
    private_redis: RedisServer, asyncio_only: None
) -> None:
    """A call that finds nothing in flight goes out at once: no window to fill a batch.

    Its latency is compared with a bare redis-py PING on the same server, alternated.
    """
    import redis.asyncio as aioredis

    store = RedisStore.from_url(private_redis.url)
    probe = aioredis.Redis.from_url(private_redis.url)
    one = spec(1_000_000, 60)
    pings: list[float] = []
    calls: list[float] = []
    try:
        await store.hit_buckets(["lone"], [one], 1)
        await probe.ping()
        for _ in range(100):
            start = time.perf_counter()
            await probe.ping()
            pings.append(time.perf_counter() - start)
            start = time.perf_counter()
            await store.hit_buckets(["lone"], [one], 1)
            calls.append(time.perf_counter() - start)
    finally:
        await probe.aclose()
        await store.aclose()
    # A batching window of a millisecond would show in the median; the script's own work
    # and this store's bookkeeping are tens of microseconds.
    assert statistics.median(calls) < 2 * statistics.median(pings) + 0.001


@pytest.mark.parametrize("parser", ["hiredis", "redis-py"])
async def test_both_reply_paths_answer_alike(
    parser: str, private_redis: RedisServer, asyncio_only: None
) -> None:
    """The store's own hiredis reader (the default with the ``redis`` extra) and
    redis-py's reply path (another ``parser_class``) give the same answers: decisions and
    their times, leases, stored bytes, an error reply failing its call alone, and the
    scripts reloaded after ``SCRIPT FLUSH``."""
    import redis.asyncio as aioredis
    from redis._parsers import _AsyncRESP2Parser

    options: dict[str, Any] = {} if parser == "hiredis" else {"parser_class": _AsyncRESP2Parser}
    prefix = f"armortest:{uuid.uuid4().hex[:12]}:"
    store = RedisStore.from_url(private_redis.url, prefix=prefix, **options)
    probe = aioredis.Redis.from_url(private_redis.url)
    assert store._hiredis is (parser == "hiredis")
    try:
        two = spec(2, 3600)
        decisions = [await store.hit_buckets(["k", "j"], [two, two], 1) for _ in range(3)]
        assert [allowed for allowed, _, _ in decisions] == [True, True, False]
        now, tats = decisions[0][1], decisions[0][2]
        assert tats == [now + 1800.0, now + 1800.0]  # every digit of the doubles kept
        assert await store.lease_acquire("pay", b"lease", 60) is None
        record = bytes(range(256)) * 300  # binary, and larger than one read
        assert await store.lease_complete("pay", b"lease", record, 60) is True
        assert await store.lease_acquire("pay", b"other", 60) == record
        await probe.rpush(prefix + "rl:list", b"x")
        results = await asyncio.gather(
            store.hit_buckets(["rl:list"], [two], 1),  # WRONGTYPE: the script fails
            store.remember("nonce", 60),
            return_exceptions=True,
        )
        assert type(results[0]) is StoreError
        assert results[1] is True
        await probe.script_flush()
        assert (await store.hit_buckets(["fresh"], [two], 1))[0] is True
        assert await store.remember("nonce", 60) is False
    finally:
        await probe.aclose()
        await store.aclose()
