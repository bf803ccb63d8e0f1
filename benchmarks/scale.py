"""Scale: memory per rate-limit key, and per-request cost as the number of rules grows.

* ``MemoryStore`` bytes per key at 10k, 100k and 1M distinct keys (tracemalloc: every byte
  allocated while the keys were hit and still held, the key strings included), next to
  limits' ``MemoryStorage`` (fixed and moving window) at the same counts up to 100k;
* ``RateLimitMiddleware`` with 1, 4 and 16 rules matching every request: microseconds per
  request in-process (memory store, and Redis when there is one), and the Redis commands
  each request sent (``INFO commandstats``: one ``EVALSHA`` whatever the number of rules).
"""

from __future__ import annotations

import asyncio
import gc
import statistics
import time
import tracemalloc
from typing import Any

__all__ = ["memory_per_key", "rules_scaling"]


def _keys(count: int) -> list[str]:
    # What RateLimitMiddleware stores for an "ip" rule: its prefix plus the address.
    return [f"rl:ip:10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}" for i in range(count)]


def _traced(fill: Any) -> float:
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        keep = fill()
        gc.collect()
        after = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    del keep
    return float(after - before)


def memory_per_key(counts: tuple[int, ...], peer_max: int) -> list[dict[str, Any]]:
    """Bytes per distinct key held by each store after one hit per key."""
    import limits
    import limits.storage
    import limits.strategies

    from asgi_armor.ratelimit.bucket import spec
    from asgi_armor.stores.memory import MemoryStore

    rows = []
    specs = [spec(100, 3600.0)]  # one hit keeps a key for 36 s: nothing expires meanwhile
    for count in counts:
        print(f"  scale: memory per key at {count:,} keys ...", flush=True)

        def fill_armor(count: int = count) -> Any:
            store = MemoryStore(max_keys=count)
            hit = store.hit_buckets

            async def go() -> None:
                for key in _keys(count):
                    await hit([key], specs, 1)

            asyncio.run(go())
            if len(store) != count:
                raise RuntimeError(f"MemoryStore kept {len(store)} of {count} keys")
            return store

        row: dict[str, Any] = {"keys": count, "asgi_armor": _traced(fill_armor) / count}
        if count <= peer_max:
            item = limits.parse("100/hour")
            for label, cls in (
                ("limits FixedWindow", limits.strategies.FixedWindowRateLimiter),
                ("limits MovingWindow", limits.strategies.MovingWindowRateLimiter),
            ):

                def fill_limits(count: int = count, cls: Any = cls, item: Any = item) -> Any:
                    storage = limits.storage.MemoryStorage()
                    limiter = cls(storage)
                    for key in _keys(count):
                        limiter.hit(item, key)
                    return storage

                row[label] = _traced(fill_limits) / count
        rows.append(row)
    return rows


def _scope() -> dict[str, Any]:
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/api/items",
        "raw_path": b"/api/items",
        "query_string": b"",
        "root_path": "",
        "headers": [(b"host", b"t"), (b"content-type", b"application/json")],
        "client": ("127.0.0.1", 40000),
        "server": ("127.0.0.1", 8000),
    }


async def _app(scope: Any, receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"{}"})


def rules_scaling(
    rule_counts: tuple[int, ...], redis_url: str | None, requests: int, repeats: int
) -> list[dict[str, Any]]:
    """Per-request cost of RateLimitMiddleware with n matching rules (memory and Redis)."""
    from asgi_armor import MemoryStore, RateLimitMiddleware, RedisStore, Rule

    def middleware(count: int, store: Any) -> Any:
        rules = [
            Rule("* /api/*", "100000000/minute", "ip", name=f"rule{index}")
            for index in range(count)
        ]
        return RateLimitMiddleware(_app, rules=rules, store=store)

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    statuses: list[int] = []

    async def send(message: Any) -> None:
        if message["type"] == "http.response.start":
            statuses.append(message["status"])

    async def timed(app: Any, n: int) -> float:
        start = time.perf_counter_ns()
        for _ in range(n):
            await app(_scope(), receive, send)
        return (time.perf_counter_ns() - start) / n / 1000

    async def run() -> list[dict[str, Any]]:
        apps: dict[str, Any] = {"bare": _app}
        stores = []
        for count in rule_counts:
            apps[f"memory-{count}"] = middleware(count, MemoryStore())
            if redis_url is not None:
                store = RedisStore.from_url(redis_url, prefix=f"armorbench-rules{count}:")
                stores.append(store)
                apps[f"redis-{count}"] = middleware(count, store)
        samples: dict[str, list[float]] = {name: [] for name in apps}
        for app in apps.values():
            await timed(app, 50)  # warm-up; loads the Lua script
        commands: dict[str, float] = {}
        for _ in range(repeats):
            for name, app in apps.items():
                statuses.clear()
                if name.startswith("redis") and redis_url is not None:
                    client = stores[0].client
                    await client.config_resetstat()
                samples[name].append(
                    await timed(app, requests // 5 if name.startswith("redis") else requests)
                )
                if set(statuses) != {200}:
                    raise RuntimeError(f"rules scaling {name}: statuses {set(statuses)}")
                if name.startswith("redis") and redis_url is not None:
                    stats = await stores[0].client.info("commandstats")
                    sent = sum(
                        int(value["calls"])
                        for key, value in stats.items()
                        if key in ("cmdstat_evalsha", "cmdstat_eval")
                    )
                    commands[name] = sent / (requests // 5)
        for store in stores:
            keys = [key async for key in store.client.scan_iter(match=store.prefix + "*")]
            if keys:
                await store.client.delete(*keys)
            await store.aclose()
        bare = statistics.median(samples["bare"])
        rows = []
        for count in rule_counts:
            row: dict[str, Any] = {
                "rules": count,
                "memory_us": statistics.median(samples[f"memory-{count}"]) - bare,
            }
            if redis_url is not None:
                row["redis_us"] = statistics.median(samples[f"redis-{count}"]) - bare
                row["redis_scripts_per_request"] = commands.get(f"redis-{count}")
            rows.append(row)
        return rows

    print("  scale: cost per request with 1, 4, 16 rules ...", flush=True)
    return asyncio.run(run())
