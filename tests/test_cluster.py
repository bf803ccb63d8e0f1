"""RedisClusterStore on a private 6-node cluster: the key layout, decisions across hash
slots, commands per decision, MOVED and NOSCRIPT. (The conformance suite in
tests/test_stores.py runs on it too.)"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest

from asgi_armor.config import ArmorConfig
from asgi_armor.errors import ConfigError, Overloaded
from asgi_armor.ratelimit.bucket import spec
from asgi_armor.stack import build_store
from asgi_armor.stores.base import BucketSpec, StoreError
from asgi_armor.stores.cluster import RedisClusterStore, cluster_key, key_slot
from asgi_armor.stores.redis import RedisStore
from asgi_armor.stores.sentinel import RedisSentinelStore
from tests.redis_groups import RedisClusterServers

pytestmark = pytest.mark.anyio


def _slot(prefix: str, key: str) -> int:
    return key_slot(prefix + cluster_key(key))


def test_layers_keyed_on_one_value_share_a_slot() -> None:
    assert cluster_key("rl:ip:ip:1.2.3.4") == "rl:{ip:1.2.3.4}:ip"
    rules = ("ip", "email", "user-send-email", "h" + "0" * 40)
    assert len({_slot("armor:", f"rl:{rule}:u:alice") for rule in rules}) == 1
    assert _slot("armor:", "rl:ip:u:alice") != _slot("armor:", "rl:ip:u:bob")


def test_a_brace_in_a_key_never_pools_unrelated_keys_in_one_slot() -> None:
    # A replay nonce key holds its route pattern, braces and all.
    nonces = {_slot("armor:", f"nonce:POST /hooks/{{id}}:msg_{i}") for i in range(50)}
    assert len(nonces) > 45
    assert cluster_key("idem:abc") == "idem:abc"


def test_cluster_keys_stay_distinct() -> None:
    keys = ["rl:a:b:c", "rl:a:b", "rl:a", "rl:{a}:b", "rl:a:{b}", "{x}y", "x{y}", "rl:", "idem:1"]
    assert len({cluster_key(key) for key in keys}) == len(keys)


async def test_key_slot_is_the_clusters(
    redis_cluster: RedisClusterServers, asyncio_only: None
) -> None:
    import redis.asyncio as aioredis

    probe = aioredis.Redis(port=redis_cluster.ports[0])
    try:
        for key in ["armor:rl:{ip:1.2.3.4}:ip", "plain", "a{}b", "{}{x}", "é{ü}", "{{a}}"]:
            assert key_slot(key) == await probe.execute_command("CLUSTER", "KEYSLOT", key)
    finally:
        await probe.aclose()


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("redis+cluster://", "at least one host"),
        ("redis+cluster://h:0", "1..65535"),
        ("redis+cluster://h:99999", "1..65535"),
        ("redis+cluster://h:7000,h:x", "1..65535"),
        ("redis+cluster://h:7000/3", "database 0 only"),
        ("redis+cluster://h:7000?decode_responses=true", "decode_responses"),
        ("redis+sentinel://h:26379", "name the Sentinel service"),
        ("redis+sentinel://h:26379/armor/x", "must be a number"),
        ("redis+sentinel://h:26379/armor/1/2", "the path must be"),
        ("redis+shard://h:1", "redis+cluster://"),
        ("memcached://h:1", "is not 'memory' or a redis://"),
        ("redis+cluster://:s3cret@h:notaport", "1..65535"),
    ],
)
def test_malformed_store_urls_fail_at_start_up(url: str, message: str) -> None:
    with pytest.raises(ConfigError, match=r"^store: ") as info:
        build_store(ArmorConfig(store=url))
    assert message in str(info.value)
    assert "s3cret" not in str(info.value)


async def test_store_urls_build_their_stores(asyncio_only: None) -> None:
    built = [
        build_store(ArmorConfig(store=url))
        for url in (
            "valkey://127.0.0.1:6379/15",
            "valkeys+cluster://user:pw@127.0.0.1:7000,[::1]:7001",
            "redis+sentinel://127.0.0.1:26379,127.0.0.1:26380/armor/2",
        )
    ]
    try:
        assert [type(store) for store in built] == [
            RedisStore,
            RedisClusterStore,
            RedisSentinelStore,
        ]
        cluster = built[1]
        assert isinstance(cluster, RedisClusterStore)
        assert cluster.startup_nodes == (("127.0.0.1", 7000), ("::1", 7001))
        node = next(iter(cluster.nodes.values()))
        assert node.client.connection_pool.connection_kwargs["password"] == "pw"
        sentinel = built[2]
        assert isinstance(sentinel, RedisSentinelStore)
        assert sentinel.client.connection_pool.connection_kwargs["db"] == 2
    finally:
        for store in built:
            await store.aclose()


def test_a_hash_tag_in_the_prefix_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"^store_prefix: .*one slot"):
        RedisClusterStore.from_url("redis+cluster://127.0.0.1:7000", prefix="armor:{app}:")


@pytest.fixture
async def cluster_store(
    redis_cluster: RedisClusterServers, asyncio_only: None
) -> AsyncIterator[RedisClusterStore]:
    store = RedisClusterStore.from_url(
        redis_cluster.url, prefix=f"armortest:{uuid.uuid4().hex[:12]}:"
    )
    yield store
    await store.aclose()


def _values_in_distinct_slots(prefix: str, count: int) -> list[str]:
    """``count`` key values whose buckets fall in ``count`` different slots."""
    values: list[str] = []
    slots: set[int] = set()
    for index in range(1000):
        value = f"v{index}"
        slot = _slot(prefix, f"rl:r:{value}")
        if slot not in slots:
            slots.add(slot)
            values.append(value)
        if len(values) == count:
            return values
    raise AssertionError("no distinct slots found")


async def _remaining(
    store: RedisClusterStore, keys: list[str], specs: list[BucketSpec]
) -> list[int]:
    """Whole tokens left in each bucket (a cost-0 look, which takes nothing)."""
    _allowed, now, tats = await store.hit_buckets(keys, specs, 0)
    return [
        int((tolerance - max(0.0, tat - now)) // interval + 1e-9)
        for (interval, tolerance), tat in zip(specs, tats, strict=True)
    ]


async def test_a_denied_layer_consumes_nothing_in_the_other_slots(
    cluster_store: RedisClusterStore,
) -> None:
    values = _values_in_distinct_slots(cluster_store.prefix, 4)
    keys = [f"rl:layer{i}:{value}" for i, value in enumerate(values)]
    assert len({_slot(cluster_store.prefix, key) for key in keys}) == 4
    day = 86_400
    specs = [spec(100, day), spec(50, day), spec(2, day), spec(100, day)]
    results = [await cluster_store.hit_buckets(keys, specs, 1) for _ in range(10)]
    assert [allowed for allowed, _, _ in results] == [True, True] + [False] * 8
    # Two requests went through: every layer gave exactly two tokens, whatever was denied.
    assert await _remaining(cluster_store, keys, specs) == [98, 48, 0, 98]
    # The denial says which layer lacked tokens: the others read as before the call.
    _allowed, now, tats = results[-1]
    assert [
        round((tat - now) / interval) for tat, (interval, _) in zip(tats, specs, strict=True)
    ] == [
        2,
        2,
        2,
        2,
    ]


async def test_concurrent_decisions_across_slots_admit_exactly_the_limit(
    cluster_store: RedisClusterStore,
) -> None:
    values = _values_in_distinct_slots(cluster_store.prefix, 4)
    keys = [f"rl:layer{i}:{value}" for i, value in enumerate(values)]
    day = 86_400
    specs = [spec(1000, day), spec(500, day), spec(50, day), spec(300, day)]
    results = await asyncio.gather(*(cluster_store.hit_buckets(keys, specs, 1) for _ in range(300)))
    assert sum(allowed for allowed, _, _ in results) == 50
    assert await _remaining(cluster_store, keys, specs) == [950, 450, 0, 250]


async def _evalsha_calls(servers: RedisClusterServers, reset: bool = False) -> dict[int, int]:
    import redis.asyncio as aioredis

    calls: dict[int, int] = {}
    for port in servers.primaries():
        probe = aioredis.Redis(port=port)
        try:
            if reset:
                await probe.config_resetstat()
            stats = await probe.info("commandstats")
            calls[port] = int(stats.get("cmdstat_evalsha", {}).get("calls", 0))
        finally:
            await probe.aclose()
    return calls


async def test_script_calls_per_decision_are_its_distinct_slots(
    redis_cluster: RedisClusterServers, cluster_store: RedisClusterStore
) -> None:
    """Counted on every primary with INFO commandstats (replicas run no scripts)."""
    prefix = cluster_store.prefix
    day = 86_400
    specs = [spec(1000, day), spec(1000, day), spec(1000, day), spec(1000, day)]
    same_value = [f"rl:layer{i}:ip:10.0.0.1" for i in range(4)]
    four_values = [
        f"rl:layer{i}:{value}" for i, value in enumerate(("ip:10.0.0.1", "*", "u:1", "h:x"))
    ]
    spread = len({_slot(prefix, key) for key in four_values})
    await cluster_store.hit_buckets(same_value + four_values, specs * 2, 0)  # scripts loaded
    measured: dict[str, int] = {}
    for name, keys in (("same value", same_value), ("four values", four_values)):
        await _evalsha_calls(redis_cluster, reset=True)
        for _ in range(10):
            assert (await cluster_store.hit_buckets(keys, specs, 1))[0]
        measured[name] = sum((await _evalsha_calls(redis_cluster)).values())
    # A denied decision: a reservation per slot, then a give-back in each slot that allowed.
    tight = [spec(1000, day), spec(1000, day), spec(1, day), spec(1000, day)]
    denied_keys = [
        f"rl:tight{i}:{value}" for i, value in enumerate(_values_in_distinct_slots(prefix, 4))
    ]
    assert (await cluster_store.hit_buckets(denied_keys, tight, 1))[0]
    await _evalsha_calls(redis_cluster, reset=True)
    assert not (await cluster_store.hit_buckets(denied_keys, tight, 1))[0]
    measured["denied over 4 slots"] = sum((await _evalsha_calls(redis_cluster)).values())
    print(f"\n[cluster] EVALSHA per decision ({spread} slots for four values): {measured}")
    assert measured == {"same value": 10, "four values": 10 * spread, "denied over 4 slots": 4 + 3}


async def test_noscript_after_a_script_flush_is_reloaded_on_that_node(
    redis_cluster: RedisClusterServers, cluster_store: RedisClusterStore
) -> None:
    import redis.asyncio as aioredis

    key = "rl:ip:ip:10.9.8.7"
    owner = redis_cluster.owner(_slot(cluster_store.prefix, key))
    assert (await cluster_store.hit_buckets([key], [spec(10, 60)], 1))[0]
    probe = aioredis.Redis(port=owner)
    try:
        await probe.script_flush()
        await probe.config_resetstat()
        assert (await cluster_store.hit_buckets([key], [spec(10, 60)], 1))[0]
        stats = await probe.info("commandstats")
    finally:
        await probe.aclose()
    assert stats["cmdstat_script|load"]["calls"] == 1
    node = cluster_store.nodes[("127.0.0.1", owner)]
    assert node.breakers["rate_limit"].stats.failures == 0


async def _node_id(port: int) -> str:
    import redis.asyncio as aioredis

    probe = aioredis.Redis(port=port)
    try:
        node_id: bytes = await probe.execute_command("CLUSTER", "MYID")
        return node_id.decode()
    finally:
        await probe.aclose()


async def _move_empty_slot(servers: RedisClusterServers, slot: int, target: int) -> None:
    """Hand an empty ``slot`` to the primary on ``target`` (the resharding steps)."""
    import redis.asyncio as aioredis

    source = servers.owner(slot)
    source_id, target_id = await _node_id(source), await _node_id(target)
    steps: list[tuple[int, list[Any]]] = [
        (target, ["IMPORTING", source_id]),
        (source, ["MIGRATING", target_id]),
        *((port, ["NODE", target_id]) for port in (target, source)),
        *(
            (port, ["NODE", target_id])
            for port in servers.primaries()
            if port not in (source, target)
        ),
    ]
    for port, args in steps:
        probe = aioredis.Redis(port=port)
        try:
            await probe.execute_command("CLUSTER", "SETSLOT", slot, *args)
        finally:
            await probe.aclose()


async def test_moved_is_followed_to_the_slots_new_owner(
    redis_cluster: RedisClusterServers, cluster_store: RedisClusterStore
) -> None:
    """A slot moved under the store (a resharding): the call that meets MOVED runs once, on
    the new owner, and the store's map is corrected."""
    import redis.asyncio as aioredis

    prefix = cluster_store.prefix
    assert await cluster_store.remember("warm", 60)  # the slot map is read
    for index in range(1000):
        key = f"idem:moved{index}"
        slot = _slot(prefix, key)
        probe = aioredis.Redis(port=redis_cluster.owner(slot))
        try:
            empty = await probe.execute_command("CLUSTER", "COUNTKEYSINSLOT", slot) == 0
        finally:
            await probe.aclose()
        if empty:
            break
    source = redis_cluster.owner(slot)
    target = next(port for port in redis_cluster.primaries() if port != source)
    await _move_empty_slot(redis_cluster, slot, target)
    assert redis_cluster.owner(slot) == target
    assert await cluster_store.lease_acquire(key, b"lease", 60) is None
    assert await cluster_store.lease_acquire(key, b"other", 60) == b"lease"
    probe = aioredis.Redis(port=target)
    try:
        assert await probe.get(prefix + cluster_key(key)) == b"lease"
    finally:
        await probe.aclose()


async def _setslot(port: int, slot: int, *args: Any) -> None:
    import redis.asyncio as aioredis

    probe = aioredis.Redis(port=port)
    try:
        await probe.execute_command("CLUSTER", "SETSLOT", slot, *args)
    finally:
        await probe.aclose()


async def _migrate(source: int, target: int, *keys: str) -> None:
    """Move ``keys`` from ``source`` to ``target`` (the resharding step for a few keys)."""
    import redis.asyncio as aioredis

    probe = aioredis.Redis(port=source)
    try:
        await probe.execute_command("MIGRATE", "127.0.0.1", target, "", 0, 5000, "KEYS", *keys)
    finally:
        await probe.aclose()


async def test_a_slot_in_migration_is_followed_by_ask_and_decided_exactly(
    redis_cluster: RedisClusterServers, cluster_store: RedisClusterStore
) -> None:
    """A resharding under way (a slot MIGRATING on its owner, IMPORTING on another node):
    keys still on the owner are served there; keys that left, or are new, follow ASK to
    the importing node; a decision whose keys are split between the two (TRYAGAIN) is
    decided key by key. No call fails, and a 10-token limit admits exactly 10."""
    import redis.asyncio as aioredis

    prefix = cluster_store.prefix
    assert await cluster_store.remember("warm", 60)  # the slot map is read
    value = f"ask{uuid.uuid4().hex[:8]}"
    slot = _slot(prefix, f"rl:ip:{value}")
    same_slot = [f"idem:ask{i}" for i in range(200_000) if _slot(prefix, f"idem:ask{i}") == slot]
    lease_key = same_slot[0]
    # Another value whose two buckets share that slot, new when the migration starts.
    fresh = next(f"n{i}" for i in range(200_000) if _slot(prefix, f"rl:ip:n{i}") == slot)
    ten = spec(10, 3600)
    layers = [f"rl:ip:{value}", f"rl:route:{value}"]
    stored = [prefix + cluster_key(key) for key in layers]
    assert key_slot(stored[0]) == key_slot(stored[1]) == slot
    for _ in range(3):
        assert (await cluster_store.hit_buckets(layers, [ten, ten], 1))[0]
    source = redis_cluster.owner(slot)
    target = next(port for port in redis_cluster.primaries() if port != source)
    source_id, target_id = await _node_id(source), await _node_id(target)
    await _setslot(target, slot, "IMPORTING", source_id)
    await _setslot(source, slot, "MIGRATING", target_id)
    try:
        # Both buckets still on the owner: served there.
        assert await _remaining(cluster_store, layers, [ten, ten]) == [7, 7]
        # One bucket moved: TRYAGAIN for the script of two keys, then one call each.
        await _migrate(source, target, stored[0])
        assert (await cluster_store.hit_buckets(layers, [ten, ten], 1))[0]
        # Both moved: ASK, and one script call on the importing node.
        await _migrate(source, target, stored[1])
        assert (await cluster_store.hit_buckets(layers, [ten, ten], 1))[0]
        assert await _remaining(cluster_store, layers, [ten, ten]) == [5, 5]
        # New keys: ASK for the lease; ASK then TRYAGAIN for two new buckets.
        assert await cluster_store.lease_acquire(lease_key, b"lease", 60) is None
        assert await cluster_store.lease_acquire(lease_key, b"other", 60) == b"lease"
        news = [f"rl:ip:{fresh}", f"rl:route:{fresh}"]
        decided = await asyncio.gather(
            *(cluster_store.hit_buckets(news, [ten, ten], 1) for _ in range(14))
        )
        assert sum(allowed for allowed, _, _ in decided) == 10
    finally:
        # The migration finished whatever happened above, for the tests that follow.
        probe = aioredis.Redis(port=source)
        try:
            left = await probe.execute_command("CLUSTER", "GETKEYSINSLOT", slot, 1000)
        finally:
            await probe.aclose()
        if left:
            await _migrate(source, target, *(key.decode() for key in left))
        for port in redis_cluster.primaries():
            await _setslot(port, slot, "NODE", target_id)
    # The slot has moved: everything the store wrote during the migration is there.
    assert redis_cluster.owner(slot) == target
    assert await _remaining(cluster_store, layers, [ten, ten]) == [5, 5]
    assert await _remaining(cluster_store, news, [ten, ten]) == [0, 0]
    assert await cluster_store.lease_acquire(lease_key, b"third", 60) == b"lease"
    probe = aioredis.Redis(port=source)
    try:
        assert await probe.execute_command("CLUSTER", "COUNTKEYSINSLOT", slot) == 0
    finally:
        await probe.aclose()
    # Redirections are no failures, on the owner's store nor on the asking one.
    assert list(cluster_store._asking) == [("127.0.0.1", target)]
    for node in [*cluster_store.nodes.values(), *cluster_store._asking.values()]:
        for breaker in node.breakers.values():
            assert breaker.stats.failures == 0


async def test_a_cluster_that_cannot_be_reached_fails_fast(asyncio_only: None) -> None:
    """No node answers: every call is a StoreError (the concern's policy), quickly, and the
    slot map is asked for at most every refresh_interval, not once per call."""
    store = RedisClusterStore.from_url("redis+cluster://127.0.0.1:1,127.0.0.1:2", timeout=0.2)
    try:
        loop = asyncio.get_running_loop()
        started = loop.time()
        for _ in range(100):
            with pytest.raises(StoreError):
                await store.hit_buckets(["rl:ip:1.2.3.4", "rl:g:*"], [spec(1, 1)] * 2, 1)
            with pytest.raises(StoreError):
                await store.lease_acquire("idem:x", b"lease", 1)
            with pytest.raises(StoreError):
                await store.remember("nonce:x", 1)
        assert loop.time() - started < 2.0
    finally:
        await store.aclose()


@pytest.mark.parametrize("anyio_backend", ["trio"])
async def test_a_cluster_store_on_trio_fails_start_up_and_each_call(anyio_backend: str) -> None:
    store = RedisClusterStore.from_url("redis+cluster://127.0.0.1:7000")
    with pytest.raises(ConfigError, match=r"^store: RedisStore runs on asyncio only"):
        store.check_runtime()
    with pytest.raises(StoreError, match="not running on asyncio"):
        await store.hit_buckets(["rl:ip:1.2.3.4"], [spec(1, 1)], 1)
    with pytest.raises(StoreError, match="not running on asyncio"):
        await store.lease_acquire("idem:x", b"lease", 1)


async def test_values_a_client_controls_braces_and_all_are_decided_all_or_nothing(
    cluster_store: RedisClusterStore,
) -> None:
    """Header and path values holding braces (an empty hash tag hashes the whole key) still
    give all-or-nothing decisions and distinct buckets."""
    values = ["}", "{", "", "a}b{c", "{}", "}{"]
    keys = [f"rl:layer{i}:h:{value}" for i, value in enumerate(values)]
    keys += [f"rl:path{i}:{value}" for i, value in enumerate(values)]
    assert len({cluster_key(key) for key in keys}) == len(keys)
    assert len({_slot(cluster_store.prefix, key) for key in keys}) > 2
    day = 86_400
    specs = [spec(100, day)] * (len(keys) - 1) + [spec(1, day)]
    assert (await cluster_store.hit_buckets(keys, specs, 1))[0]
    assert not (await cluster_store.hit_buckets(keys, specs, 1))[0]
    assert await _remaining(cluster_store, keys, specs) == [99] * (len(keys) - 1) + [0]


async def test_a_frozen_node_sheds_new_work_and_gives_the_other_slots_tokens_back(
    redis_cluster: RedisClusterServers, asyncio_only: None
) -> None:
    """One node frozen (its calls pending): new work queued behind them for that node is
    shed with Overloaded, also inside a decision over several slots, whose other slots get
    their tokens back; the frozen calls themselves fail as a store failure."""
    prefix = f"armortest:{uuid.uuid4().hex[:12]}:"
    store = RedisClusterStore.from_url(
        redis_cluster.url, prefix=prefix, timeout=0.5, max_in_flight=1, queue_timeout=0.1
    )
    day = 86_400
    frozen_key, other_key = "rl:a:frozen0", ""
    frozen = redis_cluster.owner(_slot(prefix, frozen_key))
    for index in range(1000):
        other_key = f"rl:b:free{index}"
        if redis_cluster.owner(_slot(prefix, other_key)) != frozen:
            break
    specs = [spec(100, day), spec(100, day)]
    try:
        assert (await store.hit_buckets([frozen_key, other_key], specs, 1))[0]  # connected
        redis_cluster.pause(frozen)
        try:
            held = asyncio.ensure_future(store.hit_buckets([frozen_key], specs[:1], 1))
            await asyncio.sleep(0.05)
            with pytest.raises(Overloaded):
                await store.hit_buckets([frozen_key, other_key], specs, 1)
            with pytest.raises(StoreError, match="call failed"):
                await held
        finally:
            redis_cluster.resume(frozen)
        # The other slot's token was given back: one taken in all, by the first call.
        assert await _remaining(store, [frozen_key, other_key], specs) == [98, 99]
    finally:
        await store.aclose()


async def test_a_give_back_keeps_the_refill_of_a_bucket_that_was_full(
    redis_url: str, redis_prefix: str, asyncio_only: None
) -> None:
    """The give-back mode of hit_buckets.lua (any RedisStore runs it for the cluster store).

    A full bucket: a reservation at t0 (denied in another slot), another request taking a
    token 0.3 s later, then the give-back. Without the reservation the second request
    would have found the bucket full at t0 + 0.3: giving the whole token back (full at
    t0 + 1) would admit 0.3 s early. The refill since t0 is kept: full at t0 + 1.3.
    """
    store = RedisStore.from_url(redis_url, prefix=redis_prefix)
    one_per_second = spec(10, 10)
    interval = one_per_second[0]
    try:
        _allowed, start, (reserved,) = await store.hit_buckets(["k"], [one_per_second], 1)
        assert reserved == pytest.approx(start + interval)
        await asyncio.sleep(0.3)
        allowed, taken_at, _ = await store.hit_buckets(["k"], [one_per_second], 1)
        assert allowed
        base = reserved - interval  # the bucket's full-at time before the reservation
        _, given_at, (tat,) = await store.hit_buckets(["k"], [(interval, base)], -1)
    finally:
        await store.aclose()
    assert taken_at + interval - 1e-6 <= tat <= given_at + interval + 1e-6
    assert tat - start > interval + 0.25  # never the whole token: not full at t0 + 1


async def test_a_sentinel_stores_batches_reach_the_master_it_names(
    redis_sentinel: Any, asyncio_only: None
) -> None:
    """Every batch connection asks the sentinels for the master as it connects: none falls
    back to redis-py's default address (127.0.0.1:6379, the shared Redis here)."""
    import redis.asyncio as aioredis

    name = f"armor-master-{uuid.uuid4().hex[:8]}"
    prefix = f"armortest:{uuid.uuid4().hex[:12]}:"
    store = RedisSentinelStore.from_url(redis_sentinel.url, prefix=prefix, client_name=name)
    master = redis_sentinel.master_port()
    try:
        # Enough concurrent calls to open every batch connection (max_in_flight of them).
        await asyncio.gather(*(store.remember(f"n:{i}", 60) for i in range(600)))
        seen: dict[int, int] = {}
        for port in (6379, *redis_sentinel.data_ports):
            admin = aioredis.Redis(host="127.0.0.1", port=port)
            try:
                clients = await admin.client_list()
                seen[port] = sum(client["name"] == name for client in clients)
                if port == master:
                    assert await admin.exists(f"{prefix}n:0") == 1
            finally:
                await admin.aclose()
        assert seen == {6379: 0, **dict.fromkeys(redis_sentinel.data_ports, 0), master: 4}
    finally:
        await store.aclose()
