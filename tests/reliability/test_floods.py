"""Floods: a million client addresses, slowloris bodies, a 10x overload burst.

- Distinct keys: memory stays bounded by ``MemoryStore(max_keys=...)`` whatever the number
  of clients (measured with tracemalloc); 100k clients in ``make test``, 1M in ``make soak``.
- Slow bodies: ``[limits] body_timeout`` cuts a trickling upload on every route, the
  signature and idempotency routes included (they read the body before
  ``TimeoutMiddleware`` runs), and the server keeps answering everyone else.
- Overload: a burst of 10x what ``ConcurrencyLimit`` admits is shed with 503 overloaded +
  ``Retry-After``; the admitted requests succeed, the health check keeps answering, and
  nothing errors.
- A full store: fresh idempotency keys or webhook ids never push out an in-flight lease or
  an unexpired nonce (no second payment, no replay); when nothing else can go, new ones
  are refused (503, fail closed).
"""

from __future__ import annotations

import gc
import json
import logging
import socket
import time
import tracemalloc
from typing import Any

import anyio
import httpx
import msgspec
import pytest
from reliability_helpers import (
    demo_stack,
    parse_response,
    running_server,
    wait_until,
)

from asgi_armor.config import Duration, SheddingConfig
from asgi_armor.errors import ConfigError, ErrorMiddleware
from asgi_armor.idempotency import IdempotencyMiddleware
from asgi_armor.ratelimit import RateLimitMiddleware, Rule
from asgi_armor.signing import HexHmac, SignatureMiddleware, SignedRoute, sign
from asgi_armor.stores.memory import MemoryStore
from asgi_armor.validation import InputLimits
from tests.envelope import assert_envelope

MAX_KEYS = 10_000


async def _ok(scope: Any, receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 204, "headers": []})
    await send({"type": "http.response.body", "body": b""})


async def _flood(clients: int) -> dict[str, float]:
    store = MemoryStore(max_keys=MAX_KEYS)
    app = RateLimitMiddleware(
        _ok, rules=[Rule("* /api/*", "5/minute", "ip", name="ip")], store=store
    )
    statuses: dict[int, int] = {}

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Any) -> None:
        if message["type"] == "http.response.start":
            # A counter, not a list: the flood must not grow the test's own memory.
            statuses[message["status"]] = statuses.get(message["status"], 0) + 1

    def scope_for(index: int) -> dict[str, Any]:
        address = f"10.{index >> 16 & 255}.{index >> 8 & 255}.{index & 255}"
        if index >= 1 << 24:
            address = f"2001:db8::{index:x}"
        return {
            "type": "http",
            "method": "GET",
            "path": "/api/items",
            "raw_path": b"/api/items",
            "query_string": b"",
            "headers": [],
            "client": (address, 1234),
        }

    gc.collect()
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        # Fill the store twice over, so every later client evicts an older one.
        for index in range(2 * MAX_KEYS):
            await app(scope_for(index), receive, send)
        gc.collect()
        full = tracemalloc.get_traced_memory()[0]
        start = time.perf_counter()
        for index in range(2 * MAX_KEYS, clients):
            await app(scope_for(index), receive, send)
        elapsed = time.perf_counter() - start
        gc.collect()
        end, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(store) == MAX_KEYS
    assert store.evictions >= clients - MAX_KEYS - MAX_KEYS // 10
    # Every client was new to the limiter, so every request was allowed.
    assert statuses == {204: clients}
    return {
        "per_key": (full - base) / MAX_KEYS,
        "growth": end - full,
        "peak": peak - base,
        "full": full - base,
        "rate": (clients - 2 * MAX_KEYS) / elapsed,
    }


def _check_flood(clients: int) -> None:
    result = anyio.run(_flood, clients, backend="asyncio")
    print(
        f"\n[flood {clients:,} IPs] store held {MAX_KEYS:,} keys: "
        f"{result['full'] / 1e6:.2f} MB ({result['per_key']:.0f} B/key), "
        f"growth after filling {result['growth'] / 1e3:+.1f} kB, "
        f"peak {result['peak'] / 1e6:.2f} MB, "
        f"{result['rate']:,.0f} req/s under tracemalloc"
    )
    # Bounded: once full, more clients cost nothing more (noise: well under a key's worth x 100).
    assert abs(result["growth"]) < 64 * 1024
    assert result["peak"] < 2 * result["full"] + 1024 * 1024
    assert result["per_key"] < 400


def test_flood_of_100k_client_ips_stays_bounded() -> None:
    _check_flood(100_000)


@pytest.mark.slow
def test_flood_of_1m_client_ips_stays_bounded() -> None:
    _check_flood(1_000_000)


# -- slowloris ----------------------------------------------------------------------------


def _limits(body_timeout: float) -> Any:
    from asgi_armor.config import ArmorConfig
    from asgi_armor.demo.app import BUNDLED_CONFIG

    limits = ArmorConfig.from_toml(BUNDLED_CONFIG).limits
    assert limits is not None
    return msgspec.structs.replace(limits, body_timeout=Duration(body_timeout))


@pytest.mark.anyio
async def test_slow_body_is_cut_in_process(anyio_backend: str) -> None:
    ran = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        while (await receive()).get("more_body", False):
            pass
        ran.append(scope["path"])
        await _ok(scope, receive, send)

    armored = ErrorMiddleware(InputLimits(app, body_timeout=0.3))
    messages: list[dict[str, Any]] = []

    async def trickle() -> dict[str, Any]:
        await anyio.sleep(0.1)
        return {"type": "http.request", "body": b"x", "more_body": True}

    async def send(message: Any) -> None:
        messages.append(message)

    scope = {"type": "http", "method": "POST", "path": "/up", "headers": [], "query_string": b""}
    start = anyio.current_time()
    with anyio.fail_after(3):
        await armored(scope, trickle, send)
    elapsed = anyio.current_time() - start
    assert 0.3 <= elapsed < 1.0
    headers = {k.decode(): v.decode() for k, v in messages[0]["headers"]}
    assert_envelope((messages[0]["status"], headers, messages[1]["body"]), 504, "timeout")
    assert ran == []


def test_body_timeout_is_checked_at_start_up() -> None:
    for bad in (0, -1, float("inf"), float("nan"), True, "5"):
        with pytest.raises(ConfigError, match="body_timeout"):
            InputLimits(_ok, body_timeout=bad)  # type: ignore[arg-type]


def _slowloris(
    port: int, path: bytes, headers: bytes, body: bytes, interval: float
) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    sock.sendall(
        b"POST %s HTTP/1.1\r\nhost: t\r\nconnection: close\r\ncontent-type: application/json\r\n"
        b"%scontent-length: %d\r\n\r\n" % (path, headers, len(body))
    )
    sock.sendall(body[:1])
    return sock


def test_slowloris_is_cut_under_uvicorn_while_others_are_served() -> None:
    """Slow uploads to plain, idempotent and signed routes: all answered 504 at the budget."""
    budget = 1.0
    stack = demo_stack(limits=_limits(budget))
    body = json.dumps({"amount": 100, "currency": "EUR"}).encode()
    signature = sign(body, "demo-webhook-secret", scheme=HexHmac(header="X-Signature"))
    targets = [
        (b"/api/users", b""),
        (b"/api/payments", b"idempotency-key: slow-1\r\n"),
        (b"/api/webhooks/payment", b"x-signature: %s\r\n" % signature["X-Signature"].encode()),
    ]
    with running_server(stack.app) as served:
        port = int(served.url.rsplit(":", 1)[1])
        opened = time.monotonic()
        socks = [_slowloris(port, path, extra, body, 0.2) for path, extra in targets * 4]
        # Meanwhile everyone else is served at once.
        fast = []
        with httpx.Client(base_url=served.url, timeout=5) as client:
            for _ in range(5):
                start = time.monotonic()
                assert client.get("/healthz").status_code == 200
                assert (
                    client.post("/api/users", json={"email": "a@b.co", "name": "A"}).status_code
                    == 201
                )
                fast.append(time.monotonic() - start)
        answers = []
        for sock in socks:
            data = b""
            try:
                for _ in range(40):
                    try:
                        sock.sendall(b" ")  # one more byte of whitespace now and then
                    except OSError:
                        break
                    sock.settimeout(0.2)
                    try:
                        chunk = sock.recv(65536)
                    except TimeoutError:
                        continue
                    if not chunk:
                        break
                    data += chunk
                sock.settimeout(2)
                while chunk := sock.recv(65536):
                    data += chunk
            except OSError:
                pass
            finally:
                sock.close()
            answers.append((parse_response(data), time.monotonic() - opened))
        for (status, headers, payload), _ in answers:
            assert_envelope((status, headers, payload), 504, "timeout")
        cut_after = max(elapsed for _, elapsed in answers)
        assert cut_after < budget + 2.0
        assert max(fast) < 0.5
        # The slow requests never reached a handler, nor took an idempotency key.
        assert stack.counter.calls.get("/api/payments", 0) == 0
        assert stack.counter.calls.get("/api/webhooks/payment", 0) == 0
        assert wait_until(lambda: not served.tasks(), 3), served.tasks()
    print(
        f"\n[slowloris] {len(socks)} trickling uploads cut by a {budget:g}s body_timeout "
        f"(all answered 504 within {cut_after:.2f}s); other clients: max {max(fast) * 1e3:.1f} ms"
    )


# -- overload -----------------------------------------------------------------------------


@pytest.mark.anyio
async def test_tenfold_burst_is_shed_without_errors_elsewhere(
    anyio_backend: str, caplog: pytest.LogCaptureFixture
) -> None:
    # The queue wait (5 s) is ten times a search (0.5 s): the 8 queued requests always get
    # the slots the first 8 free, however loaded the machine, so exactly 16 are served.
    delay = 0.5
    shedding = SheddingConfig(
        max_concurrent=8, max_queue=8, queue_timeout=Duration(5.0), retry_after=Duration(1.0)
    )
    stack = demo_stack(shedding=shedding)
    stack.demo.board.faults["search"] = msgspec.convert(
        {"mode": "slow", "delay": delay}, type(stack.demo.board.faults["search"])
    )
    transport = httpx.ASGITransport(app=stack.app, client=("10.9.9.9", 1))
    results: list[httpx.Response] = []
    health: list[tuple[int, float]] = []
    burst = 10 * (8 + 8)
    caplog.set_level(logging.ERROR)
    async with httpx.AsyncClient(transport=transport, base_url="http://t", timeout=10) as client:

        async def search(index: int) -> None:
            results.append(await client.get("/api/search", params={"q": "armor"}))

        async def healthz() -> None:
            for _ in range(10):
                start = anyio.current_time()
                response = await client.get("/healthz")
                health.append((response.status_code, anyio.current_time() - start))
                await anyio.sleep(0.02)

        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                for index in range(burst):
                    tg.start_soon(search, index)
                tg.start_soon(healthz)
        shedder: Any = next(
            layer for layer in stack.app.layers if type(layer).__name__ == "ConcurrencyLimit"
        )
        assert shedder.in_flight == 0
        assert shedder.queued == 0
        after = await client.get("/api/search", params={"q": "armor"})
    ok = [r for r in results if r.status_code == 200]
    shed = [r for r in results if r.status_code == 503]
    assert len(ok) + len(shed) == burst, sorted({r.status_code for r in results})
    assert len(ok) == 8 + 8  # docs/security.md: 16 served, 144 shed
    assert len(shed) == burst - 16
    for response in shed:
        assert_envelope(response, 503, "overloaded")
        assert response.headers["retry-after"] == "1"
    assert all(status == 200 for status, _ in health)
    # Exempt, so never queued: a queued health check would wait a whole search (0.5 s).
    assert max(elapsed for _, elapsed in health) < delay * 0.8
    assert after.status_code == 200
    assert shedder.max_seen == 8
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    print(
        f"\n[overload {anyio_backend}] burst of {burst} on 8 slots + 8 queued: {len(ok)} served, "
        f"{len(shed)} shed (503 overloaded); healthz max {max(e for _, e in health) * 1e3:.1f} ms"
    )


# -- a full store never forgets what protects ----------------------------------------------

FULL_KEYS = 50


@pytest.mark.anyio
async def test_key_flood_never_evicts_an_in_flight_payment(anyio_backend: str) -> None:
    """Fresh anonymous keys fill a small MemoryStore while a payment is running: its lease
    stays, so its retry is 409 in_use and the payment runs once, never twice."""
    store = MemoryStore(max_keys=FULL_KEYS)
    runs: dict[str, int] = {}
    started, release = anyio.Event(), anyio.Event()

    async def pay(scope: Any, receive: Any, send: Any) -> None:
        key = dict(scope["headers"])[b"idempotency-key"].decode()
        runs[key] = runs.get(key, 0) + 1
        if key == "order-1" and runs[key] == 1:
            started.set()
            await release.wait()
        await send({"type": "http.response.start", "status": 201, "headers": []})
        await send({"type": "http.response.body", "body": b'{"paid":true}'})

    app = ErrorMiddleware(IdempotencyMiddleware(pay, routes=["POST /api/pay"], store=store))
    transport = httpx.ASGITransport(app=app, client=("10.7.0.1", 1))
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:

        def payment(key: str) -> Any:
            return client.post("/api/pay", content=b"{}", headers={"Idempotency-Key": key})

        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                first: list[httpx.Response] = []

                async def original() -> None:
                    first.append(await payment("order-1"))

                tg.start_soon(original)
                await started.wait()
                # Each completes at once: its stored response may be evicted, not the lease.
                for index in range(10 * FULL_KEYS):
                    assert (await payment(f"flood-{index}")).status_code == 201
                retry = await payment("order-1")
                release.set()
        replay = await payment("order-1")
    assert retry.status_code == 409, retry.text
    assert retry.json()["error"] == "idempotency_key_in_use"
    assert first[0].status_code == 201
    assert replay.headers["idempotent-replayed"] == "true"
    assert runs["order-1"] == 1
    assert store.evictions > 0
    assert len(store) <= FULL_KEYS


@pytest.mark.anyio
async def test_nonce_flood_never_reenables_a_webhook_replay(anyio_backend: str) -> None:
    """Fresh signed webhooks fill a small MemoryStore: once it is full of unexpired nonces,
    new messages are refused (503, fail closed) and an old message's replay is still 401."""
    store = MemoryStore(max_keys=FULL_KEYS)
    scheme = HexHmac(header="X-Signature")
    secret = "flood-secret"
    app = ErrorMiddleware(
        SignatureMiddleware(
            _ok, routes=[("POST /hook", SignedRoute(scheme, [secret]))], store=store
        )
    )
    transport = httpx.ASGITransport(app=app, client=("10.7.0.2", 1))

    def signed(event: str) -> tuple[bytes, dict[str, str]]:
        body = json.dumps({"id": event}).encode()
        return body, sign(body, secret, scheme)

    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        body, headers = signed("evt_first")
        assert (await client.post("/hook", content=body, headers=headers)).status_code == 204
        statuses: dict[int, int] = {}
        for index in range(10 * FULL_KEYS):
            fresh_body, fresh_headers = signed(f"evt_{index}")
            response = await client.post("/hook", content=fresh_body, headers=fresh_headers)
            statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
            if response.status_code == 503:
                assert response.json()["error"] == "service_unavailable"
        replay = await client.post("/hook", content=body, headers=headers)
    assert statuses == {204: FULL_KEYS - 1, 503: 10 * FULL_KEYS - FULL_KEYS + 1}
    assert replay.status_code == 401, replay.text
    assert replay.json()["details"][0]["code"] == "replayed"
    assert store.refusals == statuses[503]
    assert len(store) == FULL_KEYS
