"""asgi_armor.client against the armored demo under a real uvicorn (and a hostile proxy)."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from asgi_armor._asgi import ASGIApp, Receive, Scope, Send
from asgi_armor.breaker import BreakerState
from asgi_armor.client import ArmorTransport, CircuitOpenError, SyncArmorTransport
from asgi_armor.config import ArmorConfig, RateLimitEntry
from asgi_armor.demo import create_demo
from asgi_armor.demo.app import BUNDLED_CONFIG, WEBHOOK_SECRET_ENV, Demo
from asgi_armor.signing import HexHmac
from asgi_armor.stack import armor
from tests.conftest import FakeClock

pytestmark = pytest.mark.anyio

Serve = Callable[..., Any]


class Counting:
    """Counts the requests under ``prefix`` that reach the wrapped app."""

    def __init__(self, app: ASGIApp, prefix: str) -> None:
        self.app = app
        self.prefix = prefix
        self.count = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith(self.prefix):
            self.count += 1
        await self.app(scope, receive, send)


def bundled_demo(monkeypatch: pytest.MonkeyPatch, wrap: Callable[[ASGIApp], ASGIApp]) -> ASGIApp:
    """The demo with its bundled protections, with ``wrap`` around the unprotected app."""
    monkeypatch.setenv(WEBHOOK_SECRET_ENV, "demo-webhook-secret")
    return armor(wrap(Demo().app()), ArmorConfig.from_toml(BUNDLED_CONFIG))


# -- pacing --------------------------------------------------------------------------


async def test_steady_client_sees_no_429_and_takes_the_quota_time(
    asyncio_only: None, serve: Serve
) -> None:
    config = ArmorConfig(
        rate_limit=[RateLimitEntry(name="ip", route="* /api/*", rate="5/second", key="ip")]
    )
    app = Counting(armor(Demo().app(), config), "/api/")
    with serve(app) as url:
        async with httpx.AsyncClient(transport=ArmorTransport(), base_url=url) as client:
            start = time.monotonic()
            statuses = [(await client.get("/api/users/1")).status_code for _ in range(30)]
            elapsed = time.monotonic() - start
    assert statuses.count(429) == 0
    assert statuses == [200] * 30
    assert app.count == 30  # no retries were needed: nothing was refused
    # 5 at once, then 5 more each time the quota is back: (30 - 5) / 5 s of waiting.
    print(f"30 paced requests at 5/second: {elapsed:.2f} s, 0 x 429")
    assert 4.5 <= elapsed <= 9.0, elapsed


# -- a connection dropped after the server acted -------------------------------------


def read_message(sock: socket.socket, buffer: bytes) -> tuple[bytes | None, bytes]:
    """One HTTP/1.1 message with a Content-Length body (or none); None at a clean EOF."""
    while b"\r\n\r\n" not in buffer:
        chunk = sock.recv(65536)
        if not chunk:
            if buffer:
                raise ConnectionError("connection closed mid-message")
            return None, b""
        buffer += chunk
    head, _, rest = buffer.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value.strip())
        assert name.strip().lower() != b"transfer-encoding", "the proxy needs Content-Length"
    while len(rest) < length:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("connection closed mid-body")
        rest += chunk
    return head + b"\r\n\r\n" + rest[:length], rest[length:]


def header_value(message: bytes, name: bytes) -> bytes | None:
    head = message.partition(b"\r\n\r\n")[0]
    for line in head.split(b"\r\n")[1:]:
        key, _, value = line.partition(b":")
        if key.strip().lower() == name:
            return value.strip()
    return None


class DroppingProxy:
    """A loopback proxy that loses the answer to the first request bearing each key.

    It forwards the request to the upstream, waits for the upstream's full answer (the
    handler has run, the payment is made), then closes the client's connection without
    sending a byte of it: the client cannot know whether the request was processed.
    """

    def __init__(self, upstream: str) -> None:
        url = httpx.URL(upstream)
        self.upstream = (url.host, url.port or 80)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.keys: set[bytes] = set()
        self.dropped = 0
        self.forwarded = 0
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._accept, daemon=True)

    def __enter__(self) -> DroppingProxy:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopping.set()
        self.thread.join(5)
        self.listener.close()

    def _accept(self) -> None:
        # Polled: closing a socket does not wake a thread blocked in accept().
        self.listener.settimeout(0.05)
        while not self.stopping.is_set():
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            conn.setblocking(True)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        conn.settimeout(10)
        buffer = b""
        with conn:
            while True:
                try:
                    request, buffer = read_message(conn, buffer)
                except (ConnectionError, TimeoutError):
                    return
                if request is None:
                    return
                with socket.create_connection(self.upstream, timeout=10) as upstream:
                    upstream.sendall(request)
                    response, _ = read_message(upstream, b"")
                assert response is not None
                key = header_value(request, b"idempotency-key")
                with self.lock:
                    self.forwarded += 1
                    drop = key is not None and key not in self.keys
                    if drop:
                        self.keys.add(key)  # type: ignore[arg-type]
                        self.dropped += 1
                if drop:
                    return
                conn.sendall(response)


async def test_dropped_payments_are_retried_with_their_key_and_run_once(
    monkeypatch: pytest.MonkeyPatch, serve: Serve
) -> None:
    counters: list[Counting] = []

    def count_payments(app: ASGIApp) -> ASGIApp:
        counters.append(Counting(app, "/api/payments"))
        return counters[0]

    app = bundled_demo(monkeypatch, count_payments)
    with serve(app) as url, DroppingProxy(url) as proxy:
        transport = ArmorTransport(idempotency_keys=True, backoff=0.01)
        async with httpx.AsyncClient(transport=transport, base_url=proxy.url) as client:
            responses = [
                await client.post("/api/payments", json={"amount": 100 + n, "currency": "EUR"})
                for n in range(20)
            ]
    assert [r.status_code for r in responses] == [201] * 20
    assert [r.json()["amount"] for r in responses] == [100 + n for n in range(20)]
    # Every first attempt was lost after the handler ran; the retry got the stored answer.
    assert proxy.dropped == 20
    assert proxy.forwarded == 40
    assert all(r.headers["idempotent-replayed"] == "true" for r in responses)
    assert len({r.json()["payment_id"] for r in responses}) == 20
    print(f"20 payments through a dropping proxy: handler ran {counters[0].count} times")
    assert counters[0].count == 20


# -- a failing dependency ------------------------------------------------------------


def test_breaker_opens_on_a_failing_dependency_and_recovers(
    monkeypatch: pytest.MonkeyPatch, serve: Serve, clock: FakeClock
) -> None:
    app = Counting(bundled_demo(monkeypatch, lambda app: app), "/api/users/")
    with serve(app) as url, httpx.Client(base_url=url) as plain:
        assert plain.put("/demo/faults/db", json={"mode": "fail"}).status_code == 200
        # Fewer failures than the demo's own breaker needs (5): the server stays closed,
        # so what recovers below is the client's breaker.
        transport = SyncArmorTransport(
            fail_max=3, reset_timeout=30.0, clock=clock, sleep=clock.advance
        )
        with httpx.Client(transport=transport, base_url=url) as client:
            for _ in range(3):
                response = client.get("/api/users/1")
                assert response.status_code == 500
                assert response.json()["error"] == "internal_error"
            assert app.count == 3
            for _ in range(5):
                with pytest.raises(CircuitOpenError):
                    client.get("/api/users/1")
            assert app.count == 3  # nothing reached the server

            assert plain.put("/demo/faults/db", json={"mode": "ok"}).status_code == 200
            clock.advance(29.5)
            with pytest.raises(CircuitOpenError) as caught:
                client.get("/api/users/1")
            assert caught.value.retry_after == pytest.approx(0.5)
            assert app.count == 3

            clock.advance(0.5)
            response = client.get("/api/users/1")
            assert response.status_code == 200
            assert response.json()["name"] == "Ada Lovelace"
            assert app.count == 4
            breaker = transport.breaker(url)
            assert breaker is not None
            assert breaker.state is BreakerState.CLOSED


# -- signed webhooks -----------------------------------------------------------------


@pytest.fixture
def demo_with_default_secret(monkeypatch: pytest.MonkeyPatch) -> ASGIApp:
    monkeypatch.delenv(WEBHOOK_SECRET_ENV, raising=False)
    app, _ = create_demo()
    return app


async def test_signed_webhooks_pass_the_demos_check(
    demo_with_default_secret: ASGIApp, serve: Serve
) -> None:
    body = b'{"event": "payment.succeeded", "payment_id": "pay_1"}'
    headers = {"Content-Type": "application/json"}
    transport = ArmorTransport(sign=(HexHmac(), "demo-webhook-secret"), idempotency_keys=True)
    with serve(demo_with_default_secret) as url:
        async with httpx.AsyncClient(base_url=url) as plain:
            unsigned = await plain.post("/api/webhooks/payment", content=body, headers=headers)
        async with httpx.AsyncClient(transport=transport, base_url=url) as client:
            signed = await client.post("/api/webhooks/payment", content=body, headers=headers)
            other = await client.post(
                "/api/webhooks/payment", content=body.replace(b"pay_1", b"pay_2"), headers=headers
            )
    assert unsigned.status_code == 401
    assert unsigned.json()["error"] == "invalid_signature"
    assert signed.status_code == 200, signed.text
    assert signed.json() == {"received": True}
    assert other.status_code == 200
