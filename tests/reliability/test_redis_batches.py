"""Concurrent store calls share round trips (docs/stores.md, "Batches"), on a private
redis-server, under the faults a batch must survive:

- ``SCRIPT FLUSH`` while a batch of mixed script calls is sent: the scripts are loaded
  and only the calls that got ``NOSCRIPT`` are resent, once (none runs twice);
- a command Redis refuses by closing the connection (a stored response over
  ``proto-max-bulk-len``): the calls of other requests sent at the same time answer;
- a frozen Redis: the batch fails as a whole, each call counted by its own concern's
  breaker, and a concern with no call in it counts nothing;
- a caller that goes away while its batch is in flight: the others get their answers;
  one that goes away before its call is sent: the call is dropped, nothing consumed;
- a big record write waiting for a batch of its own is never shed;
- a restart of Redis under a warm pool: each stale connection's batch is sent once more
  on a new connection, so no call fails and no breaker counts anything; a give-back is
  never sent twice, and a Redis that is really gone fails each call once.

Round trips are counted with ``INFO stats`` (``total_reads_processed``: each read of a
client's socket by Redis) and commands with ``INFO commandstats``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from reliability_helpers import pause, redis_clients, restart, resume

from asgi_armor.errors import Overloaded
from asgi_armor.ratelimit.bucket import spec
from asgi_armor.stores.base import StoreError
from asgi_armor.stores.redis import CONCERNS, RedisStore

pytestmark = [pytest.mark.anyio]


@pytest.fixture
def admin(private_redis: Any) -> Iterator[redis.Redis]:
    client = redis.Redis(host="127.0.0.1", port=private_redis.port, socket_timeout=5)
    try:
        yield client
    finally:
        client.close()


def _calls(admin: redis.Redis) -> dict[str, int]:
    stats = admin.info("commandstats")
    return {name.removeprefix("cmdstat_"): int(value["calls"]) for name, value in stats.items()}


def _reads(admin: redis.Redis) -> int:
    return int(admin.info("stats")["total_reads_processed"])


def _failures(store: RedisStore) -> dict[str, int]:
    return {concern: store.breakers[concern].stats.failures for concern in CONCERNS}


async def test_script_flush_inside_a_batch_loads_and_resends_once(
    private_redis: Any, admin: redis.Redis, asyncio_only: None
) -> None:
    store = RedisStore.from_url(private_redis.url)
    ten = spec(10, 60)
    try:
        assert await store.lease_acquire("warm", b"w", 60) is None  # scripts loaded
        assert (await store.hit_buckets(["warm"], [ten], 1))[0]
        admin.script_flush()
        admin.config_resetstat()
        reads = _reads(admin)
        hits = [store.hit_buckets(["flushed"], [ten], 1) for _ in range(20)]
        leases = [store.lease_acquire(f"pay:{i}", b"lease-%d" % i, 60) for i in range(5)]
        nonces = [store.remember(f"evt:{i}", 60) for i in range(5)]
        results = await asyncio.gather(*hits, *leases, *nonces)
        reads = _reads(admin) - reads
        calls = _calls(admin)
    finally:
        await store.aclose()
    # Each call ran exactly once: 10 of 20 hits allowed, every lease taken, every nonce new.
    assert [allowed for allowed, _, _ in results[:20]] == [True] * 10 + [False] * 10
    assert results[20:25] == [None] * 5
    assert results[25:] == [True] * 5
    # One batch: 30 EVALSHA answered NOSCRIPT, the three scripts loaded once each, the 30
    # resent (a NOSCRIPT reply means the script did not run: each call ran once).
    assert calls["script|load"] == 3
    assert calls["evalsha"] == 60
    assert calls["set"] == 5 + 10 + 5  # the nonces, the allowed hits, the leases
    assert reads <= 4  # two round trips (and the INFO of this test)
    assert _failures(store) == dict.fromkeys(CONCERNS, 0)


async def test_a_command_redis_refuses_fails_alone(
    private_redis: Any, admin: redis.Redis, asyncio_only: None
) -> None:
    """A stored response over ``proto-max-bulk-len``: Redis answers a protocol error and
    closes the connection, dropping every command after it. Sent in a batch of its own,
    it fails its own call only; rate limits and nonces of the same moment answer."""
    admin.config_set("proto-max-bulk-len", 1024 * 1024)
    store = RedisStore.from_url(private_redis.url)
    big = b"x" * (2 * 1024 * 1024)
    hundred = spec(100, 60)
    try:
        assert await store.lease_acquire("pay", b"lease", 60) is None
        assert (await store.hit_buckets(["warm"], [hundred], 1))[0]
        admin.config_resetstat()

        async def complete() -> BaseException | None:
            try:
                await store.lease_complete("pay", b"lease", big, 60)
            except StoreError as exc:
                return exc
            return None

        results = await asyncio.gather(
            *(store.hit_buckets([f"k{i % 5}"], [hundred], 1) for i in range(25)),
            complete(),
            *(store.hit_buckets([f"k{i % 5}"], [hundred], 1) for i in range(25)),
            *(store.remember(f"evt:{i}", 60) for i in range(10)),
        )
        after = await store.hit_buckets(["k0"], [hundred], 1)
    finally:
        await store.aclose()
    assert isinstance(results[25], StoreError)
    hits = results[:25] + results[26:51]
    assert all(allowed for allowed, _, _ in hits)
    assert results[51:] == [True] * 10
    # Every hit ran once: 10 per key before this one.
    assert after[0]
    assert after[2][0] - after[1] == pytest.approx(11 * 0.6, abs=0.05)
    assert _failures(store) == {"rate_limit": 0, "idempotency": 1, "replay": 0}


async def test_a_frozen_batch_counts_against_the_concerns_it_carried(
    private_redis: Any, asyncio_only: None
) -> None:
    """Redis answers nothing: the batch times out as a whole. Each call is a failure of
    its own concern (the store failed it, as it would have failed it alone); idempotency,
    which had no call in the batch, counts nothing."""
    store = RedisStore.from_url(private_redis.url, timeout=0.3)
    one = spec(1, 1)
    try:
        assert await store.remember("warm", 10)
        pause(private_redis)
        try:
            start = time.perf_counter()
            results = await asyncio.gather(
                store.hit_buckets(["a"], [one], 1),
                store.hit_buckets(["b"], [one], 1),
                store.remember("n", 10),
                return_exceptions=True,
            )
            elapsed = time.perf_counter() - start
        finally:
            resume(private_redis)
        assert all(isinstance(result, StoreError) for result in results), results
        assert elapsed < 0.3 + 0.4
        stats = {concern: store.breakers[concern].stats for concern in CONCERNS}
        assert (stats["rate_limit"].calls, stats["rate_limit"].failures) == (2, 2)
        assert (stats["replay"].calls, stats["replay"].failures) == (2, 1)
        assert (stats["idempotency"].calls, stats["idempotency"].failures) == (0, 0)
        # Back: each concern is served again.
        assert await store.lease_acquire("l", b"lease", 10) is None
        assert (await store.hit_buckets(["c"], [one], 1))[0]
    finally:
        await store.aclose()


async def test_a_caller_that_goes_away_does_not_cut_its_batch(
    private_redis: Any, asyncio_only: None
) -> None:
    """The batch is sent by a task of its own: cancelling one caller (a client that
    disconnected) leaves the round trip of the others alone."""
    store = RedisStore.from_url(private_redis.url)
    ten = spec(10, 60)
    try:
        assert await store.remember("warm", 10)
        pause(private_redis)
        try:
            tasks = [
                asyncio.ensure_future(store.hit_buckets(["shared"], [ten], 1)) for _ in range(8)
            ]
            await asyncio.sleep(0.05)  # sent, waiting for the frozen Redis
            tasks[0].cancel()
        finally:
            resume(private_redis)
        results = await asyncio.gather(*tasks[1:])
        assert tasks[0].cancelled()
        assert all(allowed for allowed, _, _ in results)
        # The cancelled caller's call ran all the same (it was sent): 8 tokens taken.
        assert (await store.hit_buckets(["shared"], [ten], 2))[0]
        assert not (await store.hit_buckets(["shared"], [ten], 1))[0]
        assert _failures(store) == dict.fromkeys(CONCERNS, 0)
    finally:
        await store.aclose()


async def test_finishing_work_is_never_shed_while_a_big_command_waits_its_turn(
    private_redis: Any, asyncio_only: None
) -> None:
    """A big record write (over 64 KiB) put back to wait for a batch of its own is still
    work being finished: however long it waits, it is never shed as ``Overloaded``."""
    store = RedisStore.from_url(private_redis.url, max_in_flight=1, timeout=0.3, queue_timeout=0.1)
    value = b"r" * 100_000
    try:
        assert await store.lease_acquire("pay", b"lease", 60) is None
        assert await store.lease_acquire("other", b"o", 60) is None
        pause(private_redis)
        try:
            held = asyncio.ensure_future(store.hit_buckets(["a"], [spec(1, 1)], 1))
            await asyncio.sleep(0.01)  # sent: the frozen Redis holds the one batch slot
            release = asyncio.ensure_future(store.lease_release("other", b"o"))
            complete = asyncio.ensure_future(store.lease_complete("pay", b"lease", value, 60))
            with pytest.raises(StoreError):
                await held  # timed out; the release goes next, the big write waits
            await asyncio.sleep(0.02)
            late = asyncio.ensure_future(store.remember("n", 10))  # new work: shed
            await asyncio.sleep(0.2)
        finally:
            resume(private_redis)
        assert await release
        assert await complete
        with pytest.raises(Overloaded):
            await late
        assert await store.lease_acquire("pay", b"again", 60) == value
    finally:
        await store.aclose()


async def test_a_caller_that_goes_away_before_its_call_is_sent_consumes_nothing(
    private_redis: Any, asyncio_only: None
) -> None:
    """A waiting call whose caller is cancelled is dropped from the queue, never sent."""
    store = RedisStore.from_url(private_redis.url, max_in_flight=1)
    ten = spec(10, 60)
    try:
        assert await store.remember("warm", 10)
        pause(private_redis)
        try:
            held = asyncio.ensure_future(store.hit_buckets(["q"], [ten], 1))
            await asyncio.sleep(0.05)  # sent: the one batch slot is taken
            waiting = [asyncio.ensure_future(store.hit_buckets(["q"], [ten], 1)) for _ in range(5)]
            await asyncio.sleep(0.01)
            waiting[1].cancel()
            waiting[3].cancel()
        finally:
            resume(private_redis)
        assert (await held)[0]
        sent = [await waiting[i] for i in (0, 2, 4)]
        assert all(allowed for allowed, _, _ in sent)
        # 1 + 3 tokens taken: 6 left.
        assert (await store.hit_buckets(["q"], [ten], 6))[0]
        assert not (await store.hit_buckets(["q"], [ten], 1))[0]
        assert store.breakers["rate_limit"].stats.calls == 6
    finally:
        await store.aclose()


async def _warm(store: RedisStore, server: Any, connections: int) -> None:
    """Use ``connections`` pooled connections (every batch slot at once), then check that
    the server saw exactly that many."""
    await asyncio.gather(*(store.remember(f"warm:{i}", 60) for i in range(150 * connections)))
    assert len(redis_clients(server)) == connections


async def test_a_restart_costs_no_call_on_a_warm_pool(
    private_redis: Any, asyncio_only: None
) -> None:
    """Redis restarted under four warm pooled connections: the first batch on each is
    lost and sent again on a new connection. Every call of every concern answers, each
    ran once (exactly the limit admitted), and no breaker counts a failure."""
    store = RedisStore.from_url(private_redis.url, max_in_flight=4)
    ten = spec(10, 3600)
    try:
        await _warm(store, private_redis, 4)
        restart(private_redis)  # an empty Redis; the pooled sockets are closed by it
        results = await asyncio.gather(
            *(store.hit_buckets(["after"], [ten], 1) for _ in range(200)),
            *(store.lease_acquire(f"pay:{i}", b"lease-%d" % i, 60) for i in range(200)),
            *(store.remember(f"evt:{i}", 60) for i in range(200)),
            return_exceptions=True,
        )
        assert store.stale_connections == 4
        assert [type(result) for result in results if isinstance(result, Exception)] == []
        assert sum(allowed for allowed, _, _ in results[:200]) == 10
        assert results[200:400] == [None] * 200
        assert results[400:] == [True] * 200
        done = await asyncio.gather(
            *(store.lease_complete(f"pay:{i}", b"lease-%d" % i, b"ok", 60) for i in range(100)),
            *(store.lease_release(f"pay:{i}", b"lease-%d" % i) for i in range(100, 200)),
            *(store.forget(f"evt:{i}") for i in range(200)),
        )
        assert done == [True] * 200 + [None] * 200
        assert _failures(store) == dict.fromkeys(CONCERNS, 0)
        states = {concern: breaker.state.value for concern, breaker in store.breakers.items()}
        assert states == dict.fromkeys(CONCERNS, "closed")
        assert store.stale_connections == 4  # the new connections were not stale
    finally:
        await store.aclose()


async def test_a_redis_that_is_gone_fails_each_call_once(
    private_redis: Any, asyncio_only: None
) -> None:
    """A stale connection's batch is sent once more, not more: with Redis gone, the new
    connection is refused and the calls fail, each counted once by its own concern."""
    store = RedisStore.from_url(private_redis.url, max_in_flight=1)
    try:
        await _warm(store, private_redis, 1)
        private_redis.stop()
        results = await asyncio.gather(
            store.remember("n", 10),
            store.lease_acquire("l", b"lease", 10),
            return_exceptions=True,
        )
        assert [type(result) for result in results] == [StoreError, StoreError]
        assert store.stale_connections == 1
        with pytest.raises(StoreError):
            await store.remember("m", 10)  # a new connection, refused: not sent again
        assert store.stale_connections == 1
        assert _failures(store) == {"rate_limit": 0, "idempotency": 1, "replay": 2}
    finally:
        await store.aclose()


async def test_a_give_back_is_never_sent_twice(private_redis: Any, asyncio_only: None) -> None:
    """A give-back run twice would give back twice (admitting past the limit): on a stale
    connection it fails and its tokens stay taken; the take beside it is sent again."""
    store = RedisStore.from_url(private_redis.url, max_in_flight=1)
    three = spec(3, 3600)
    try:
        await _warm(store, private_redis, 1)
        restart(private_redis)
        back, take = await asyncio.gather(
            store.hit_buckets(["given"], [(three[0], 0.0)], -1),
            store.hit_buckets(["taken"], [three], 1),
            return_exceptions=True,
        )
        assert isinstance(back, StoreError)
        assert not isinstance(take, BaseException)
        assert take[0]
        assert store.stale_connections == 1
        stats = store.breakers["rate_limit"].stats
        assert (stats.calls, stats.failures) == (2, 1)
        # The connection is new now: a give-back is sent (and answered) as usual.
        allowed, _, _ = await store.hit_buckets(["given"], [(three[0], 0.0)], -1)
        assert allowed
    finally:
        await store.aclose()


async def test_a_demoted_primary_is_left_and_nothing_runs_there(
    private_redis: Any, asyncio_only: None
) -> None:
    """The Redis a store writes to becomes a replica (a failover demoted it): its
    ``READONLY`` reply is a lost connection, not an answer. The batch is sent once more on
    a connection made anew (a Sentinel's asks for the current master); here the address
    is still the replica, so the call fails and its tokens were never taken. Promoted
    again, the next call is answered on a new connection."""
    store = RedisStore.from_url(private_redis.url, max_in_flight=1)
    admin = redis.Redis(host="127.0.0.1", port=private_redis.port)
    one = spec(1, 3600)
    try:
        assert (await store.hit_buckets(["warm"], [one], 1))[0] is True
        admin.replicaof("127.0.0.1", "1")  # a master that is never reached: read-only now
        with pytest.raises(StoreError, match="ConnectionError"):
            await store.hit_buckets(["demoted"], [one], 1)
        assert store.stale_connections == 1  # the warm connection, sent again once
        admin.replicaof("no", "one")
        assert (await store.hit_buckets(["demoted"], [one], 1))[0] is True  # nothing taken
    finally:
        admin.replicaof("no", "one")
        admin.close()
        await store.aclose()
