"""Bursts never switch protection off (docs/stores.md, "Bursts").

A burst of concurrent requests against a Redis-backed ``10/minute`` global rule, with
idempotent payments and signed webhooks sent in the same burst, on a healthy Redis:

- the rule admits at most its limit (exactly 10 when nothing was shed), never a 500;
- no store call is counted as failed: the event loop's backlog (thousands of requests
  started at once) is this process's load, not a slow Redis, so no breaker opens and the
  rate limit never fails open;
- payments and webhooks answer normally (201 / 200), never 503, while the burst runs.

In-process: 1,500 requests through ``httpx.ASGITransport``, 5 runs in a row. Under a real
uvicorn: 2,500 concurrent connections from a raw asyncio socket client, 5 runs in a row.
Each run uses a fresh store (new pool, new connections: the first calls of a burst also
connect) and fresh keys. The admitted counts and p99 latencies are printed (``pytest -s``).
"""

from __future__ import annotations

import asyncio
import json
import resource
import time
from collections import Counter
from typing import Any, NamedTuple

import anyio
import httpx
import pytest
from reliability_helpers import pause, percentile, resume, running_server

from asgi_armor._asgi import Receive, Scope, Send
from asgi_armor.config import (
    ArmorConfig,
    IdempotencyEntry,
    LimitsConfig,
    RateLimitEntry,
    SignatureEntry,
)
from asgi_armor.idempotency import IdempotencyMiddleware, IdempotencyOptions
from asgi_armor.ratelimit import RateLimitMiddleware, Rule
from asgi_armor.signing import HexHmac, SignatureMiddleware, SignedRoute, sign
from asgi_armor.stack import Armored, armor
from asgi_armor.stores.redis import RedisStore

pytestmark = [pytest.mark.anyio]

RUNS = 5
IN_PROCESS = 1500
CONNECTIONS = 2500
LIMIT = 10
SIDE = 20  # payments, and webhooks, sent in each burst
SECRET = "burst-webhook-secret"
SCHEME = HexHmac(header="X-Signature")


class Answer(NamedTuple):
    kind: str  # "burst", "pay" or "hook"
    status: int
    error: str | None
    seconds: float


async def app(scope: Scope, receive: Receive, send: Send) -> None:
    """200 for the burst route and the webhook, 201 for a payment."""
    while (await receive()).get("more_body", False):
        pass
    status = 201 if scope["path"] == "/api/pay" else 200
    await send({"type": "http.response.start", "status": status, "headers": []})
    await send({"type": "http.response.body", "body": b'{"ok":true}'})


def stack(redis_url: str, prefix: str, monkeypatch: pytest.MonkeyPatch) -> Armored:
    monkeypatch.setenv("BURST_SECRET", SECRET)
    config = ArmorConfig(
        store=redis_url,
        limits=LimitsConfig(),
        rate_limit=[RateLimitEntry(route="GET /api/burst", rate=f"{LIMIT}/minute", key="global")],
        idempotency=[IdempotencyEntry(route="POST /api/pay")],
        signature=[
            SignatureEntry(route="POST /api/hook", secret_env="BURST_SECRET", header="X-Signature")
        ],
    )
    return armor(app, config, store=RedisStore.from_url(redis_url, prefix=prefix))


def requests(run: int, total: int) -> list[tuple[str, str, str, dict[str, str], bytes]]:
    """``(kind, method, path, headers, body)``: the burst with payments and hooks spread in."""
    out: list[tuple[str, str, str, dict[str, str], bytes]] = [
        ("burst", "GET", "/api/burst", {}, b"") for _ in range(total - 2 * SIDE)
    ]
    step = len(out) // SIDE
    for index in range(SIDE):
        pay = json.dumps({"amount": 100 + index}).encode()
        hook = json.dumps({"id": f"evt_{run}_{index}"}).encode()
        out.insert(
            index * step + index * 2,
            (
                "pay",
                "POST",
                "/api/pay",
                {"Idempotency-Key": f"pay-{run}-{index}", "Content-Type": "application/json"},
                pay,
            ),
        )
        out.insert(
            index * step + index * 2 + 1,
            (
                "hook",
                "POST",
                "/api/hook",
                {**sign(pay + hook, SECRET, SCHEME), "Content-Type": "application/json"},
                pay + hook,
            ),
        )
    return out


def check(run: int, where: str, answers: list[Answer], store: RedisStore) -> int:
    """Assert the burst held; return how many burst requests were admitted."""
    counts = Counter((a.kind, a.status, a.error) for a in answers)
    burst = [a for a in answers if a.kind == "burst"]
    admitted = sum(1 for a in burst if a.status == 200)
    shed = sum(1 for a in burst if a.status == 503)
    latencies = [a.seconds for a in answers]
    print(
        f"\n[burst {where} run {run}] {len(answers)} requests: admitted {admitted}, "
        f"shed {shed}, p99 {percentile(latencies, 0.99) * 1e3:.0f} ms, "
        f"max {max(latencies) * 1e3:.0f} ms; {dict(counts)}"
    )
    assert admitted <= LIMIT
    # Shedding (503 overloaded) is the only other answer allowed, and only under overload;
    # with nothing shed the store decided every request: exactly the limit got through.
    allowed = {(200, None), (429, "rate_limited"), (503, "overloaded")}
    assert {(a.status, a.error) for a in burst} <= allowed
    if shed == 0:
        assert admitted == LIMIT
    assert [a.status for a in answers if a.kind == "pay"] == [201] * SIDE, counts
    assert [a.status for a in answers if a.kind == "hook"] == [200] * SIDE, counts
    # A healthy Redis was never counted as failing, whatever the backlog here.
    for concern, breaker in store.breakers.items():
        assert breaker.stats.failures == 0, (concern, breaker.stats)
        assert breaker.state.value == "closed", concern
    return admitted


async def test_in_process_burst_admits_at_most_the_limit(
    redis_url: str, redis_prefix: str, monkeypatch: pytest.MonkeyPatch, asyncio_only: None
) -> None:
    for run in range(RUNS):
        armored = stack(redis_url, f"{redis_prefix}run{run}:", monkeypatch)
        store = armored.store
        assert isinstance(store, RedisStore)
        transport = httpx.ASGITransport(app=armored, client=("10.2.0.1", 4000))
        limits = httpx.Limits(max_connections=None)
        try:
            async with httpx.AsyncClient(
                transport=transport, base_url="http://t", limits=limits
            ) as client:

                async def one(
                    kind: str, method: str, path: str, headers: dict[str, str], body: bytes
                ) -> Answer:
                    start = time.perf_counter()
                    response = await client.request(method, path, headers=headers, content=body)
                    error = response.json().get("error") if response.status_code >= 400 else None
                    return Answer(kind, response.status_code, error, time.perf_counter() - start)

                answers = await asyncio.gather(*(one(*r) for r in requests(run, IN_PROCESS)))
            check(run, "in-process", answers, store)
        finally:
            await armored.aclose()


def _raise_fd_limit(needed: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft != resource.RLIM_INFINITY and soft < needed:
        pytest.fail(f"need {needed} file descriptors for the burst, the hard limit is {hard}")


async def _http(
    port: int, kind: str, method: str, path: str, headers: dict[str, str], body: bytes
) -> Answer:
    """One request on its own connection (``Connection: close``), read to the end."""
    start = time.perf_counter()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", "Connection: close"]
        lines += [f"{name}: {value}" for name, value in headers.items()]
        lines.append(f"Content-Length: {len(body)}")
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
        data = await reader.read()
    finally:
        writer.close()
    head, _, payload = data.partition(b"\r\n\r\n")
    status = int(head[9:12])
    error = json.loads(payload).get("error") if status >= 400 else None
    return Answer(kind, status, error, time.perf_counter() - start)


async def test_uvicorn_burst_of_2500_connections_admits_at_most_the_limit(
    redis_url: str, redis_prefix: str, monkeypatch: pytest.MonkeyPatch, asyncio_only: None
) -> None:
    # Client and server sockets of 2,500 connections live in this process.
    _raise_fd_limit(2 * CONNECTIONS + 256)
    for run in range(RUNS):
        armored = stack(redis_url, f"{redis_prefix}uv{run}:", monkeypatch)
        store = armored.store
        assert isinstance(store, RedisStore)
        # The server's store lives on the server's loop: it is closed there.
        with running_server(armored, backlog=4096) as served:
            port = int(served.url.rsplit(":", 1)[1])
            with anyio.fail_after(60):
                answers = await asyncio.gather(
                    *(_http(port, *r) for r in requests(run, CONNECTIONS))
                )
            served.call(armored.aclose)
        check(run, "uvicorn", answers, store)


async def test_a_call_that_cannot_be_sent_in_time_is_shed_never_failed_open(
    private_redis: Any, asyncio_only: None
) -> None:
    """Local overload is 503 overloaded: not the failure policy, not a breaker failure.

    One slot (``max_in_flight=1``) is held by a call into a frozen Redis; the calls queued
    behind it wait ``queue_timeout`` and are shed. The layers run without ErrorMiddleware,
    so each must answer the envelope itself (no exception reaching the server as a 500).
    The held call is a real store failure: its rate limit fails open, as configured.
    """
    store = RedisStore.from_url(private_redis.url, max_in_flight=1, queue_timeout=0.1)
    ran: list[str] = []

    async def inner(scope: Scope, receive: Receive, send: Send) -> None:
        ran.append(scope["path"])
        await app(scope, receive, send)

    layers = RateLimitMiddleware(
        SignatureMiddleware(
            IdempotencyMiddleware(inner, routes=[("POST /pay", IdempotencyOptions())], store=store),
            routes=[("POST /hook", SignedRoute(SCHEME, [SECRET]))],
            store=store,
        ),
        rules=[Rule("GET /limited", "10/minute", "global")],
        store=store,
    )
    transport = httpx.ASGITransport(app=layers, client=("10.2.0.2", 4000))
    body = b'{"id":"evt_shed"}'
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            assert (await client.get("/limited")).status_code == 200  # connects, loads script
            pause(private_redis)
            try:
                held = asyncio.ensure_future(client.get("/limited"))
                await asyncio.sleep(0.05)
                queued = await asyncio.gather(
                    client.get("/limited"),
                    client.post("/pay", content=b"{}", headers={"Idempotency-Key": "k1"}),
                    client.post("/hook", content=body, headers=sign(body, SECRET, SCHEME)),
                )
                first = await held
            finally:
                resume(private_redis)
    finally:
        await store.aclose()
    for response in queued:
        assert response.status_code == 503, response.text
        assert response.json()["error"] == "overloaded"
        assert response.headers["retry-after"] == "1"
    # The held call timed out in Redis: a store failure, and the policy (fail open) applies.
    assert first.status_code == 200
    assert ran == ["/limited", "/limited"]
    assert store.breakers["rate_limit"].stats.failures == 1
    for concern in ("idempotency", "replay"):
        assert store.breakers[concern].stats.calls == 0, concern
