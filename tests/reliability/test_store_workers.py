"""Two uvicorn worker processes on the private Redis Cluster: exact limits across hash
slots, nothing consumed by a denied request, one run per idempotency key, and the script
calls one request costs (counted on every primary with ``INFO commandstats``).

The four layers of ``POST /api/limited/{item}`` key on four values (the address, the
``X-Tenant`` header, ``*``, the path item): four hash slots, decided concurrently, with a
give-back in the others whenever the global layer denies.
"""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from store_app import LAYERS
from store_load import burst, runs, tally, workers

from asgi_armor.ratelimit.bucket import spec
from asgi_armor.ratelimit.rate import Rate
from asgi_armor.stores.cluster import RedisClusterStore, cluster_key, key_slot
from tests.redis_groups import RedisClusterServers

pytestmark = [pytest.mark.anyio]

# The middleware's bucket keys: rl:<rule>:<value>, the value as each key kind writes it.
VALUES = {"ip": "127.0.0.1", "tenant": "h:acme", "global": "*"}


def _bucket_keys(item: str) -> dict[str, str]:
    return {name: f"rl:{name}:{VALUES.get(name, item)}" for name in LAYERS}


def _slots(prefix: str, keys: list[str]) -> set[int]:
    return {key_slot(prefix + cluster_key(key)) for key in keys}


async def _evalsha(servers: RedisClusterServers, *, reset: bool = False) -> int:
    import redis.asyncio as aioredis

    total = 0
    for port in servers.primaries():
        probe = aioredis.Redis(port=port)
        try:
            if reset:
                await probe.config_resetstat()
            stats = await probe.info("commandstats")
            total += int(stats.get("cmdstat_evalsha", {}).get("calls", 0))
        finally:
            await probe.aclose()
    return total


async def test_two_workers_on_a_cluster_limit_exactly_across_slots_and_pay_once(
    redis_cluster: RedisClusterServers, private_redis: Any, asyncio_only: None
) -> None:
    prefix = f"armortest:{uuid.uuid4().hex[:12]}:"
    item = next(
        f"item{i}"
        for i in range(100)
        if len(_slots(prefix, list(_bucket_keys(f"item{i}").values()))) == 4
    )
    keys = _bucket_keys(item)
    headers = {"X-Tenant": "acme"}
    async with workers(redis_cluster.url, private_redis.url, prefix) as (ports, client):
        # Script calls per request, each worker warmed up (scripts loaded, slot map read).
        await burst(client, ports, 2, "GET", "/api/ping")
        await burst(client, ports, 2, "POST", f"/api/limited/{item}", headers=headers)
        await _evalsha(redis_cluster, reset=True)
        assert tally(await burst(client, ports, 10, "GET", "/api/ping")) == {200: 10}
        one_layer = await _evalsha(redis_cluster)
        await _evalsha(redis_cluster, reset=True)
        limited = await burst(client, ports, 10, "POST", f"/api/limited/{item}", headers=headers)
        assert tally(limited) == {200: 10}
        four_slots = await _evalsha(redis_cluster)

        # 200 concurrent requests over both workers: exactly what is left of the global 50.
        answers = tally(
            await burst(client, ports, 200, "POST", f"/api/limited/{item}", headers=headers)
        )

        # 20 concurrent payments with one key, at both workers: one run.
        key = f"order-{uuid.uuid4().hex[:8]}"
        paid = await burst(
            client,
            ports,
            20,
            "POST",
            "/api/pay",
            json={"amount": 4200},
            headers={"Idempotency-Key": key},
        )
        retry = await client.post(
            f"http://127.0.0.1:{ports[1]}/api/pay",
            json={"amount": 4200},
            headers={"Idempotency-Key": key},
        )
        pay_runs = await runs(private_redis.url, key)

    # What each layer has left: a look (cost 0) at the buckets the workers used.
    store = RedisClusterStore.from_url(redis_cluster.url, prefix=prefix)
    try:
        rates = {name: Rate.parse(rate) for name, (rate, _) in LAYERS.items()}
        specs = [spec(rates[name].limit, rates[name].period) for name in LAYERS]
        _allowed, now, tats = await store.hit_buckets(list(keys.values()), specs, 0)
    finally:
        await store.aclose()
    left = {
        name: int((tolerance - max(0.0, tat - now)) // interval + 1e-9)
        for name, (interval, tolerance), tat in zip(LAYERS, specs, tats, strict=True)
    }
    print(
        f"\n[cluster, 2 workers] EVALSHA per request: 1 layer {one_layer / 10:g}, "
        f"4 layers over 4 slots {four_slots / 10:g}; 200 concurrent: {answers}; "
        f"left per layer: {left}; 20 payments, one key: {tally(paid)}, runs {pay_runs}"
    )
    assert one_layer == 10
    assert four_slots == 40
    assert answers == {200: 38, 429: 162}  # 50 in all: 12 went in the counts above
    # 50 admitted in all; the 162 denied by the global layer took nothing from the others.
    assert left == {"ip": 950, "tenant": 450, "global": 0, "item": 250}
    assert pay_runs == 1
    originals = [r for r in paid if r.status_code == 201 and "idempotent-replayed" not in r.headers]
    assert len(originals) == 1
    assert {r.status_code for r in paid} <= {201, 409}
    assert retry.status_code == 201
    assert retry.headers["idempotent-replayed"] == "true"
    assert retry.json() == originals[0].json()
