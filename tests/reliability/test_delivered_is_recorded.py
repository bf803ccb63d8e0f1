"""A response delivered is a response recorded: a private redis-server frozen (SIGSTOP) just
as a payment's response goes out, under a real uvicorn.

The freeze is triggered from inside the store, at the record write of a key's first
request, at four points: before the write is sent (it runs in Redis at SIGCONT), just
after it is sent (Redis may or may not have run it), just after it succeeded (the
response goes out while Redis is frozen), and with every write refused unsent until the
thaw (as the store's open breaker refuses them: Redis holds only the lease at SIGCONT).
Redis is thawed 2 s later. Whatever the point,
the handler runs once per key, and every retry is the byte-identical replay, or a 409
``idempotency_key_in_use`` from another worker while the record is still on its way.

"Another worker" is a second ``IdempotencyMiddleware`` with its own ``RedisStore`` (its
own connections and breaker) and its own held records, served by the same uvicorn: it
sees only what is in Redis, as a separate process would.

The measured numbers are printed (``pytest -s``) for the report.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
import uuid
from collections import Counter
from typing import Any

import httpx
import pytest
from reliability_helpers import running_server

from asgi_armor._asgi import Receive, Scope, Send, send_json
from asgi_armor.breaker import CircuitBreaker
from asgi_armor.errors import ErrorMiddleware
from asgi_armor.idempotency import IdempotencyMiddleware
from asgi_armor.stores.base import StoreError
from asgi_armor.stores.redis import RedisStore

pytestmark = [pytest.mark.anyio, pytest.mark.redis]

ROUNDS = 20
PAUSE = 2.0
JSON = {"Content-Type": "application/json"}
BODY = b'{"amount": 4200, "currency": "EUR"}'
# Before the write is sent, just after it is sent, just after it succeeded, never sent.
POINTS = ("before", "sent", "after", "unsent")


class FreezingStore(RedisStore):
    """A RedisStore that freezes its redis-server during the record write of armed keys."""

    pid = 0
    armed: dict[str, tuple[str, str]]  # record key -> (point, idempotency key)
    frozen_at: dict[str, float]  # idempotency key -> when
    refusing = False  # writes refused unsent, until the thaw

    def _refuse(self) -> None:
        if self.refusing:
            raise StoreError("redis store unavailable (breaker open)")

    async def lease_extend(self, key: str, lease: bytes, ttl: float) -> bool:
        self._refuse()
        return await super().lease_extend(key, lease, ttl)

    async def lease_complete(self, key: str, lease: bytes, value: bytes, ttl: float) -> bool:
        self._refuse()
        point, name = self.armed.pop(key, ("", ""))
        if not point:
            return await super().lease_complete(key, lease, value, ttl)
        if point == "before":
            self._freeze(name)
            return await super().lease_complete(key, lease, value, ttl)
        if point == "unsent":
            self._freeze(name)
            self.refusing = True
            self._refuse()
        if point == "sent":
            call = asyncio.ensure_future(super().lease_complete(key, lease, value, ttl))
            await asyncio.sleep(0)  # the command is written to the socket
            self._freeze(name)
            return await call
        done = await super().lease_complete(key, lease, value, ttl)
        self._freeze(name)
        return done

    def _freeze(self, name: str) -> None:
        os.kill(self.pid, signal.SIGSTOP)
        self.frozen_at[name] = time.monotonic()


class Payments:
    """The handler: counts its runs per key; each run answers a body of its own."""

    def __init__(self) -> None:
        self.runs: Counter[str] = Counter()
        self.gate: asyncio.Event | None = None
        self.waiting = 0
        self.batch = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        while (await receive()).get("more_body", False):
            pass
        key = dict(scope["headers"])[b"idempotency-key"].decode()
        self.runs[key] += 1
        if self.batch:
            # Hold every first request of a batch until all have taken their lease, so
            # all their writes meet the frozen Redis.
            if self.gate is None:
                self.gate = asyncio.Event()
            self.waiting += 1
            if self.waiting == self.batch:
                self.gate.set()
            await asyncio.wait_for(self.gate.wait(), 5)
        payload = {"key": key, "run": self.runs[key], "charge": uuid.uuid4().hex}
        await send_json(send, 201, json.dumps(payload).encode())


def _breakers() -> dict[str, CircuitBreaker]:
    return {"idempotency": CircuitBreaker(fail_max=3, reset_timeout=0.3, name="idempotency")}


class Workers:
    """Two idempotency layers over one handler, picked by the ``X-Worker`` header."""

    def __init__(self, url: str, prefix: str, pid: int, lock_ttl: float = 60.0) -> None:
        self.payments = Payments()
        # A breaker that tries again after 0.3 s (not 1 s) keeps the 20 rounds short.
        self.store = FreezingStore.from_url(url, prefix=prefix, breakers=_breakers())
        self.store.pid = pid
        self.store.armed = {}
        self.store.frozen_at = {}
        self.here = IdempotencyMiddleware(
            self.payments, routes=["POST /pay"], store=self.store, lock_ttl=lock_ttl
        )
        self.other_store = RedisStore.from_url(url, prefix=prefix, breakers=_breakers())
        self.elsewhere = IdempotencyMiddleware(
            self.payments, routes=["POST /pay"], store=self.other_store, lock_ttl=lock_ttl
        )
        self.app = ErrorMiddleware(self.route)

    async def route(self, scope: Scope, receive: Receive, send: Send) -> None:
        other = scope["type"] == "http" and (b"x-worker", b"b") in scope["headers"]
        await (self.elsewhere if other else self.here)(scope, receive, send)

    def arm(self, key: str, point: str) -> None:
        from asgi_armor.idempotency import _record_key

        record = _record_key(("ip", "127.0.0.1"), "POST", "POST /pay", key)
        self.store.armed[record] = (point, key)

    async def aclose(self) -> None:
        """Close both stores (on the server's loop, which their connections belong to)."""
        await self.store.aclose()
        await self.other_store.aclose()


async def pay(client: httpx.AsyncClient, key: str, worker: str = "a") -> httpx.Response:
    headers = {"Idempotency-Key": key, "X-Worker": worker, **JSON}
    return await client.post("/pay", content=BODY, headers=headers)


async def first_payment(client: httpx.AsyncClient, key: str) -> httpx.Response:
    """The first request, retried on 503 as a client would (the store's breaker may still
    be open from the last freeze; the handler did not run)."""
    for _ in range(20):
        response = await pay(client, key)
        if response.status_code != 503:
            return response
        await asyncio.sleep(0.1)
    pytest.fail(f"{key}: 503 for 2 s")


async def until_final(
    client: httpx.AsyncClient, key: str, seen: list[str], worker: str = "a"
) -> httpx.Response:
    """Retry as a client would while the answer says "later" (503 while the store's
    breaker is still open after the thaw, 409 while the record is on its way)."""
    for _ in range(30):
        response = await pay(client, key, worker)
        seen.append(f"{worker}:{response.status_code}")
        if response.status_code not in (409, 503):
            return response
        expected = (
            "idempotency_key_in_use" if response.status_code == 409 else "service_unavailable"
        )
        assert response.json()["error"] == expected
        assert response.headers["retry-after"] == "1"
        await asyncio.sleep(0.1)
    pytest.fail(f"{key}: no final answer in 3 s: {seen}")


def is_replay_of(response: httpx.Response, first: httpx.Response) -> bool:
    return (
        response.status_code == 201
        and response.content == first.content
        and response.headers.get("idempotent-replayed") == "true"
    )


async def settled(workers: Workers, budget: float) -> float:
    """Seconds until this worker holds no record any more (all written to Redis)."""
    start = time.monotonic()
    for _ in range(int(budget / 0.02)):
        if not workers.here.pending:
            return time.monotonic() - start
        await asyncio.sleep(0.02)
    pytest.fail(f"{workers.here.pending} records still held after {budget}s")


def thaw(pid: int, workers: Workers) -> None:
    os.kill(pid, signal.SIGCONT)
    workers.store.refusing = False


async def test_redis_frozen_as_the_response_goes_out_20_times(
    private_redis: Any, asyncio_only: None
) -> None:
    pid = private_redis.process.pid
    workers = Workers(private_redis.url, "armor:", pid)
    firsts: dict[str, httpx.Response] = {}
    statuses: dict[str, list[str]] = {}
    first_latency: list[float] = []
    started = time.monotonic()
    try:
        with running_server(workers.app) as served:
            async with httpx.AsyncClient(base_url=served.url, timeout=10) as client:
                assert (await pay(client, "warm-up")).status_code == 201
                for index in range(ROUNDS):
                    key, point = f"order-{index}", POINTS[index % len(POINTS)]
                    workers.arm(key, point)
                    began = time.monotonic()
                    first = await first_payment(client, key)
                    first_latency.append(time.monotonic() - began)
                    assert first.status_code == 201, first.text
                    firsts[key] = first
                    seen = statuses.setdefault(key, [])
                    try:
                        # Redis is frozen: this worker answers from the response it holds
                        # (or 503 when the write landed before the freeze: nothing held).
                        during = await pay(client, key)
                        seen.append(f"a:{during.status_code}")
                        assert is_replay_of(during, first) or (
                            point in ("sent", "after") and during.status_code == 503
                        ), (point, during.status_code, during.text)
                        thaw_at = workers.store.frozen_at[key] + PAUSE
                        await asyncio.sleep(max(0.0, thaw_at - time.monotonic()))
                    finally:
                        thaw(pid, workers)
                    # Thawed: here, the replay; elsewhere, the replay or 409 while the
                    # record is on its way (the lease kept, never released).
                    again = await until_final(client, key, seen)
                    assert is_replay_of(again, first), (point, again.status_code, again.text)
                    other = await until_final(client, key, seen, worker="b")
                    assert is_replay_of(other, first), (point, other.status_code, other.text)
                landed_in = await settled(workers, budget=5)
                # Every record is in Redis now: the other worker replays each of them.
                for key, first in firsts.items():
                    replay = await pay(client, key, worker="b")
                    statuses[key].append(f"b:{replay.status_code}")
                    assert is_replay_of(replay, first), (key, replay.status_code, replay.text)
            served.call(workers.aclose)
    finally:
        thaw(pid, workers)
    in_use = sum(1 for seen in statuses.values() for status in seen if status == "b:409")
    most_in_use = max(seen.count("b:409") for seen in statuses.values())
    print(
        f"\n[frozen as the response goes out] {ROUNDS} keys, {time.monotonic() - started:.1f} s;"
        f" {sum(len(seen) for seen in statuses.values())} retries;"
        f" first response {min(first_latency):.3f}-{max(first_latency):.3f} s;"
        f" 409s from the other worker: {in_use} (at most {most_in_use} for one key);"
        f" last held record written {landed_in:.2f} s after the last thaw; statuses {statuses}"
    )
    assert {key: workers.payments.runs[key] for key in firsts} == dict.fromkeys(firsts, 1)
    assert workers.here.pending_dropped == 0
    # The unsent writes leave only the lease in Redis: the other worker says 409 (the
    # lease kept, never released) for a few polls, then replays.
    assert in_use >= 1
    assert most_in_use <= 15


async def test_redis_frozen_for_longer_than_lock_ttl(
    private_redis: Any, asyncio_only: None
) -> None:
    """Leases lapse in Redis during the freeze; still one execution per key here."""
    pid = private_redis.process.pid
    lock_ttl, pause, batch = 1.0, 3.0, 3
    workers = Workers(private_redis.url, "armor:", pid, lock_ttl=lock_ttl)
    workers.payments.batch = batch
    keys = [f"long-{index}" for index in range(batch)]
    try:
        with running_server(workers.app) as served:
            async with httpx.AsyncClient(base_url=served.url, timeout=10) as client:
                for key in keys:  # the first of their writes freezes Redis
                    workers.arm(key, "before")
                try:
                    firsts = await asyncio.gather(*(pay(client, key) for key in keys))
                    for first in firsts:
                        assert first.status_code == 201, first.text
                    assert workers.here.pending == batch
                    thaw_at = min(workers.store.frozen_at.values()) + pause
                    retries: list[httpx.Response] = []
                    while time.monotonic() < thaw_at:
                        retries += await asyncio.gather(*(pay(client, key) for key in keys))
                        await asyncio.sleep(0.5)
                finally:
                    thaw(pid, workers)
                # The leases are gone from Redis by now; a retry here must not take one.
                retries += await asyncio.gather(*(pay(client, key) for key in keys))
                landed_in = await settled(workers, budget=5)
                retries += await asyncio.gather(*(pay(client, key) for key in keys))
                elsewhere = await asyncio.gather(*(pay(client, key, worker="b") for key in keys))
            served.call(workers.aclose)
    finally:
        thaw(pid, workers)
    by_key = {first.json()["key"]: first for first in firsts}
    for response in [*retries, *elsewhere]:
        key = json.loads(response.content)["key"]
        assert is_replay_of(response, by_key[key]), (response.status_code, response.text)
    print(
        f"\n[frozen {pause:g} s, lock_ttl {lock_ttl:g} s] {len(retries)} retries, all replays;"
        f" held records written {landed_in:.2f} s after the thaw"
    )
    assert workers.payments.runs == dict.fromkeys(keys, 1)
