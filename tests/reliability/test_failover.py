"""Failover under load: a Redis Cluster primary, and separately a Sentinel-managed master,
killed (SIGKILL) during a mixed load on two uvicorn workers.

The load: pings (one rate-limit layer), requests against a global quota of ``QUOTA`` per
day, and payments with a fresh ``Idempotency-Key`` each, re-sent until answered 201. The
node killed holds the quota's bucket (on the cluster: the primary of its slot). While the
store converges each concern's failure policy answers (rate limits fail open, payments
fail closed with 503), never a 500; then service resumes with no restart:

- no response 500, no connection error;
- every payment ran exactly once (its handler's runs are counted in a separate Redis), and
  a retry of each is answered with the recorded payment;
- the quota admitted at most ``QUOTA`` requests by a decision of the store, before and
  after the failover (its bucket survived the promotion); requests let through by the
  fail-open policy came only while the store was failing;
- the time from the kill to the last answer of a failure policy, and the requests/s
  before, during and after, are printed.

``make test`` runs a 10 s load; the 30 s load is ``make soak`` (``slow``).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

import anyio
import httpx
import pytest
from store_app import QUOTA
from store_load import Load, burst, mixed_load, runs, workers

from asgi_armor.stores.cluster import cluster_key, key_slot
from tests.redis_groups import RedisClusterServers, SentinelGroup

pytestmark = [pytest.mark.anyio]

LOADS = [
    pytest.param(10.0, id="10s"),
    pytest.param(30.0, id="30s", marks=pytest.mark.slow),
]


def _failed(kind: str, status: int, decided: bool) -> bool:
    """An answer of a failure policy: a 503, or a rate-limited route let through undecided."""
    return status == 503 or (kind in ("ping", "quota") and status == 200 and not decided)


async def _check(
    load: Load,
    client: httpx.AsyncClient,
    ports: list[int],
    runs_url: str,
    killed_at: float,
    seconds: float,
    label: str,
) -> None:
    statuses = load.statuses()
    failed = [t for t, kind, status, decided in load.answers if _failed(kind, status, decided)]
    recovered_at = max(failed, default=killed_at)
    end = load.answers[-1][0]
    admitted = sum(1 for _, k, s, decided in load.answers if k == "quota" and s == 200 and decided)
    let_through = [
        t for t, k, s, decided in load.answers if k == "quota" and s == 200 and not decided
    ]

    # Every payment: one run, and its retry now is the recorded answer.
    keys = list(load.paid)
    counts = {key: await runs(runs_url, key) for key in keys}
    replays: list[tuple[str, httpx.Response]] = []
    for start in range(0, len(keys), 50):
        async with anyio.create_task_group() as tg:
            for index, key in enumerate(keys[start : start + 50]):

                async def again(key: str = key, port: int = ports[index % len(ports)]) -> None:
                    response = await client.post(
                        f"http://127.0.0.1:{port}/api/pay",
                        json={"amount": 100},
                        headers={"Idempotency-Key": key},
                    )
                    replays.append((key, response))

                tg.start_soon(again)
    duplicates = sum(max(0, count - 1) for count in counts.values())
    pings = [d for t, k, s, d in load.answers if k == "ping" and killed_at <= t <= recovered_at]
    print(
        f"\n[{label}, {seconds:g} s] answers {statuses}; recovery "
        f"{recovered_at - killed_at:.2f} s after the kill at {killed_at:.1f} s; requests/s "
        f"before {load.rate(0, killed_at):.0f}, during {load.rate(killed_at, recovered_at):.0f}, "
        f"after {load.rate(recovered_at, end):.0f}; payments {len(keys)}, duplicates "
        f"{duplicates}; quota admitted by the store {admitted} (of {QUOTA}), let through "
        f"while failing {len(let_through)}; pings decided during the failover "
        f"{sum(pings)} of {len(pings)}; transport errors {len(load.errors)}"
    )
    assert set(statuses) <= {200, 201, 409, 429, 503}, statuses
    assert load.errors == []
    assert duplicates == 0
    assert all(count == 1 for count in counts.values()), counts
    assert all(answers[-1] == 201 for answers in load.paid.values())
    assert {r.status_code for _, r in replays} == {201}
    assert all(r.headers.get("idempotent-replayed") == "true" for _, r in replays)
    assert all(r.json()["payment_id"] == load.payment_ids[key] for key, r in replays)
    assert admitted <= QUOTA
    assert all(killed_at <= t <= recovered_at for t in let_through)
    # Back without a restart, well before the load ended, and answering since.
    assert recovered_at - killed_at < 12
    assert end - recovered_at > 1
    assert load.rate(recovered_at, end) > 0


async def _run(
    store_url: str,
    runs_url: str,
    prefix: str,
    seconds: float,
    kill: Callable[[], None],
    label: str,
) -> None:
    killed_at = 0.0

    async def crash(load: Load) -> None:
        nonlocal killed_at
        await anyio.sleep(seconds / 3)
        killed_at = load.at()
        kill()

    async with workers(store_url, runs_url, prefix) as (ports, client):
        # Each worker has read the store's layout and loaded its scripts before the load.
        await burst(client, ports, 4, "GET", "/api/ping")
        load = await mixed_load(client, ports, seconds, during=crash)
        await _check(load, client, ports, runs_url, killed_at, seconds, label)


@pytest.mark.parametrize("seconds", LOADS)
async def test_a_cluster_primary_killed_under_load(
    private_redis_cluster: RedisClusterServers,
    private_redis: Any,
    seconds: float,
    asyncio_only: None,
) -> None:
    prefix = f"armortest:{uuid.uuid4().hex[:12]}:"
    victim = private_redis_cluster.owner(key_slot(prefix + cluster_key("rl:quota:*")))
    await _run(
        private_redis_cluster.url,
        private_redis.url,
        prefix,
        seconds,
        lambda: private_redis_cluster.kill(victim),
        "cluster primary killed",
    )
    # The promoted replica serves the slots now: the cluster is whole without the victim.
    private_redis_cluster.wait_healthy(10)


@pytest.mark.parametrize("seconds", LOADS)
async def test_the_sentinel_master_killed_under_load(
    private_sentinel: SentinelGroup,
    private_redis: Any,
    seconds: float,
    asyncio_only: None,
) -> None:
    prefix = f"armortest:{uuid.uuid4().hex[:12]}:"
    master = private_sentinel.master_port()
    await _run(
        private_sentinel.url,
        private_redis.url,
        prefix,
        seconds,
        lambda: private_sentinel.kill(master),
        "sentinel master killed",
    )
    assert private_sentinel.master_port() != master
