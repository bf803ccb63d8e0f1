"""IdempotencyMiddleware: keys, scoping, fingerprints, replay, release, exactly-once."""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import AsyncIterator, Callable, Sequence
from functools import partial
from typing import Any

import anyio
import anyio.abc
import httpx
import pytest

from asgi_armor._asgi import Message, Receive, Scope, Send
from asgi_armor.errors import ConfigError, ErrorMiddleware, Overloaded
from asgi_armor.idempotency import (
    IdempotencyMiddleware,
    IdempotencyOptions,
    _record_key,
    parse_idempotency_key,
)
from asgi_armor.stores.base import StoreError
from asgi_armor.stores.memory import MemoryStore
from tests.conftest import FakeClock
from tests.envelope import assert_envelope

pytestmark = pytest.mark.anyio

ROUTES = [
    "POST /api/payments",
    "POST /api/refunds",
    "POST /api/stream",
    "POST /api/status/{code}",
    "POST /api/boom",
    "POST /api/wait",
    "POST /api/disconnect",
    "POST /api/big",
    "POST /api/nothing",
    ("POST /api/optional", {"required": False}),
]


class Backend:
    """The app behind the middleware: counts every run, per path."""

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()
        self.gate: anyio.Event | None = None
        self.started: anyio.Event | None = None
        self.block_first_only = False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        path: str = scope["path"]
        self.calls[path] += 1
        run = self.calls[path]
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body", False):
                break
        if path == "/api/wait":
            assert self.started is not None
            assert self.gate is not None
            self.started.set()
            if run == 1 or not self.block_first_only:
                await self.gate.wait()
        if path == "/api/boom":
            raise RuntimeError("secret database password in here")
        if path == "/api/nothing":
            return  # no response at all
        if path == "/api/disconnect":
            assert self.started is not None
            self.started.set()
            message = await receive()
            assert message["type"] == "http.disconnect"
            return
        if path == "/api/stream":
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": [
                        (b"content-type", b"text/csv; charset=utf-8"),
                        (b"x-run", str(run).encode()),
                        (b"date", b"Mon, 01 Jan 2024 00:00:00 GMT"),
                        (b"x-request-id", b"inner-id"),
                        (b"connection", b"keep-alive, x-hop"),
                        (b"x-hop", b"1"),
                        (b"set-cookie", b"a=1"),
                        (b"set-cookie", b"b=2"),
                    ],
                }
            )
            for chunk in (b"id,amount\n", b"", b"1,100\n", f"2,{run}\n".encode()):
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"\xff\x00end", "more_body": False})
            return
        if path == "/api/big":
            await send({"type": "http.response.start", "status": 200, "headers": []})
            for _ in range(4):
                await send({"type": "http.response.body", "body": b"x" * 1000, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            return
        status = 201
        if path.startswith("/api/status/"):
            status = int(path.rsplit("/", 1)[1])
        payload = json.dumps(
            {
                "run": run,
                "path": path,
                "body": body.decode("latin-1"),
                "query": scope["query_string"].decode(),
            }
        ).encode()
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(payload)).encode()),
                    (b"x-run", str(run).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": payload})


def identify(scope: Scope) -> str | None:
    for name, value in scope["headers"]:
        if name == b"x-user":
            if value == b"explode":
                raise RuntimeError("identity backend down")
            return value.decode()  # type: ignore[no-any-return]
    return None


def build(backend: Backend | None = None, **options: Any) -> tuple[ErrorMiddleware, Backend]:
    backend = backend or Backend()
    options.setdefault("routes", ROUTES)
    options.setdefault("identify", identify)
    return ErrorMiddleware(IdempotencyMiddleware(backend, **options)), backend


def client_for(app: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app, client=("1.2.3.4", 123)), base_url="http://t"
    )


def assert_error(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    return assert_envelope(response, status, code)


def key(value: str) -> dict[str, str]:
    return {"Idempotency-Key": value}


async def call_raw(
    app: Any,
    path: str,
    *,
    headers: Sequence[tuple[bytes, bytes]] = (),
    body_chunks: Sequence[bytes] = (b"",),
    disconnect: anyio.Event | None = None,
    disconnect_mid_body: bool = False,
) -> list[Message]:
    """Drive the ASGI app directly and return every message it sent."""
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": list(headers),
        "client": ("1.2.3.4", 123),
        "server": ("t", 80),
    }
    pending = list(body_chunks)
    sent: list[Message] = []

    async def receive() -> Message:
        if pending:
            chunk = pending.pop(0)
            if disconnect_mid_body and not pending:
                return {"type": "http.disconnect"}
            return {"type": "http.request", "body": chunk, "more_body": bool(pending)}
        if disconnect is not None:
            await disconnect.wait()
        else:
            await anyio.sleep_forever()
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        sent.append(message)

    await app(scope, receive, send)
    return sent


@pytest.fixture
async def app_client() -> AsyncIterator[tuple[httpx.AsyncClient, Backend]]:
    app, backend = build()
    async with client_for(app) as client:
        yield client, backend


# -- the key header ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b"abc", "abc"),
        (b'"abc"', "abc"),
        (b'  "abc" ', "abc"),
        (b'"a\\"b\\\\c"', 'a"b\\c'),
        (b"with space inside", "with space inside"),
        (b"x" * 255, "x" * 255),
        (b'"' + b"x" * 255 + b'"', "x" * 255),
        (b"", None),
        (b'""', None),
        (b"   ", None),
        (b"x" * 256, None),
        (b"caf\xc3\xa9", None),
        (b"a\x01b", None),
        (b"a\x7fb", None),
        (b'"abc', None),
        (b'"a"b"', None),
        (b'"a\\nb"', None),
    ],
)
def test_parse_idempotency_key(raw: bytes, expected: str | None) -> None:
    assert parse_idempotency_key(raw) == expected


async def test_missing_key_is_400(app_client: tuple[httpx.AsyncClient, Backend]) -> None:
    client, backend = app_client
    response = await client.post("/api/payments", json={"amount": 1})
    assert_error(response, 400, "idempotency_key_missing")
    assert backend.calls["/api/payments"] == 0


@pytest.mark.parametrize(
    "header_value",
    [b"", b"x" * 256, b"caf\xc3\xa9", b"a\x01b", b'"unterminated'],
    ids=["empty", "too-long", "non-ascii", "control", "bad-sf-string"],
)
async def test_invalid_key_is_400(anyio_backend: str, header_value: bytes) -> None:
    app, backend = build()
    messages = await call_raw(app, "/api/payments", headers=[(b"idempotency-key", header_value)])
    start = messages[0]
    assert start["status"] == 400
    body = json.loads(messages[1]["body"])
    assert body["error"] == "idempotency_key_invalid"
    assert dict(start["headers"])[b"x-request-id"].decode() == body["request_id"]
    assert backend.calls["/api/payments"] == 0


async def test_several_key_headers_are_invalid(
    app_client: tuple[httpx.AsyncClient, Backend],
) -> None:
    client, backend = app_client
    response = await client.post(
        "/api/payments",
        headers=[("Idempotency-Key", "a"), ("Idempotency-Key", "a")],
        json={},
    )
    assert_error(response, 400, "idempotency_key_invalid")
    assert backend.calls["/api/payments"] == 0


async def test_quoted_key_is_the_bare_key(app_client: tuple[httpx.AsyncClient, Backend]) -> None:
    client, backend = app_client
    first = await client.post("/api/payments", headers=key('"k-1"'), json={"amount": 5})
    second = await client.post("/api/payments", headers=key("k-1"), json={"amount": 5})
    assert first.status_code == second.status_code == 201
    assert second.headers["idempotent-replayed"] == "true"
    assert backend.calls["/api/payments"] == 1


async def test_custom_header_name(anyio_backend: str) -> None:
    app, backend = build(header="X-Request-Key")
    async with client_for(app) as client:
        assert_error(
            await client.post("/api/payments", headers=key("k"), json={}),
            400,
            "idempotency_key_missing",
        )
        first = await client.post("/api/payments", headers={"X-Request-Key": "k"}, json={})
        second = await client.post("/api/payments", headers={"X-Request-Key": "k"}, json={})
    assert first.status_code == 201
    assert second.headers["idempotent-replayed"] == "true"
    assert backend.calls["/api/payments"] == 1


# -- pass-through ------------------------------------------------------------------------


async def test_unconfigured_routes_pass_through(
    app_client: tuple[httpx.AsyncClient, Backend],
) -> None:
    client, backend = app_client
    for _ in range(2):
        response = await client.post("/api/other", headers=key("k"), json={})
        assert response.status_code == 201
        assert "idempotent-replayed" not in response.headers
    # Another method on a configured path is another route.
    assert (await client.put("/api/payments", json={})).status_code == 201
    assert backend.calls["/api/other"] == 2
    assert backend.calls["/api/payments"] == 1


async def test_optional_route_without_key_runs_every_time(
    app_client: tuple[httpx.AsyncClient, Backend],
) -> None:
    client, backend = app_client
    for _ in range(2):
        assert (await client.post("/api/optional", json={})).status_code == 201
    assert backend.calls["/api/optional"] == 2
    first = await client.post("/api/optional", headers=key("k"), json={})
    second = await client.post("/api/optional", headers=key("k"), json={})
    assert first.json() == second.json()
    assert second.headers["idempotent-replayed"] == "true"
    assert backend.calls["/api/optional"] == 3


async def test_non_http_scopes_pass_through(anyio_backend: str) -> None:
    seen: list[str] = []

    async def inner(scope: Scope, receive: Receive, send: Send) -> None:
        seen.append(scope["type"])

    middleware = IdempotencyMiddleware(inner, routes=["* /*"])

    async def receive() -> Message:
        return {"type": "lifespan.startup"}

    async def send(message: Message) -> None:
        raise AssertionError("nothing should be sent")

    await middleware({"type": "lifespan"}, receive, send)
    await middleware({"type": "websocket", "path": "/", "headers": []}, receive, send)
    assert seen == ["lifespan", "websocket"]


# -- replay ------------------------------------------------------------------------------


async def test_replay_is_identical_and_marked(
    app_client: tuple[httpx.AsyncClient, Backend],
) -> None:
    client, backend = app_client
    first = await client.post("/api/payments?x=1", headers=key("pay-1"), json={"amount": 100})
    second = await client.post("/api/payments?x=1", headers=key("pay-1"), json={"amount": 100})
    assert first.status_code == second.status_code == 201
    assert second.content == first.content
    assert second.headers["idempotent-replayed"] == "true"
    assert "idempotent-replayed" not in first.headers
    for name in ("content-type", "content-length", "x-run"):
        assert second.headers[name] == first.headers[name]
    # Each response has its own request id.
    assert second.headers["x-request-id"] != first.headers["x-request-id"]
    assert backend.calls["/api/payments"] == 1


async def test_streaming_replay_is_byte_identical_chunk_by_chunk(anyio_backend: str) -> None:
    app, backend = build()
    headers = [(b"idempotency-key", b"stream-1")]
    first = await call_raw(app, "/api/stream", headers=headers)
    second = await call_raw(app, "/api/stream", headers=headers)
    assert backend.calls["/api/stream"] == 1

    assert [m["type"] for m in second] == [m["type"] for m in first]
    assert len(first) == 6  # start + five body chunks
    for live, replayed in zip(first[1:], second[1:], strict=True):
        assert replayed["body"] == live["body"]
        assert replayed.get("more_body", False) == live.get("more_body", False)
    assert b"".join(m["body"] for m in second[1:]) == b"id,amount\n1,100\n2,1\n\xff\x00end"

    assert first[0]["status"] == second[0]["status"] == 200
    live_headers = first[0]["headers"]
    replayed_headers = second[0]["headers"]
    assert (b"content-type", b"text/csv; charset=utf-8") in replayed_headers
    assert replayed_headers.count((b"set-cookie", b"a=1")) == 1
    assert (b"set-cookie", b"b=2") in replayed_headers
    assert (b"idempotent-replayed", b"true") in replayed_headers
    names = [name for name, _ in replayed_headers]
    # Hop-by-hop (including those named by Connection), Date and the old request id
    # are not replayed; ErrorMiddleware gives this request its own id.
    assert b"date" not in names
    assert b"connection" not in names
    assert b"x-hop" not in names
    assert names.count(b"x-request-id") == 1
    assert dict(replayed_headers)[b"x-request-id"] != dict(live_headers)[b"x-request-id"]
    assert dict(replayed_headers)[b"x-request-id"] != b"inner-id"


async def test_client_errors_are_stored_but_retry_later_ones_are_not(
    app_client: tuple[httpx.AsyncClient, Backend],
) -> None:
    client, backend = app_client
    for code, stored in [(422, True), (404, True), (302, True), (409, False), (429, False)]:
        path = f"/api/status/{code}"
        first = await client.post(path, headers=key(f"k{code}"), json={})
        second = await client.post(path, headers=key(f"k{code}"), json={})
        assert first.status_code == second.status_code == code
        assert ("idempotent-replayed" in second.headers) is stored
        assert backend.calls[path] == (1 if stored else 2)


# -- conflicts ---------------------------------------------------------------------------


async def test_same_key_different_request_is_422(
    app_client: tuple[httpx.AsyncClient, Backend],
) -> None:
    client, backend = app_client
    assert (await client.post("/api/payments", headers=key("k"), json={"a": 1})).status_code == 201
    assert_error(
        await client.post("/api/payments", headers=key("k"), json={"a": 2}),
        422,
        "idempotency_key_reused",
    )
    assert_error(
        await client.post("/api/payments?x=1", headers=key("k"), json={"a": 1}),
        422,
        "idempotency_key_reused",
    )
    # A trailing slash (or a doubled one) reaches the same route: the same request, as the
    # fingerprint is of the canonical target the route matched (docs/architecture.md).
    for spelling in ("/api/payments/", "/api//payments"):
        again = await client.post(spelling, headers=key("k"), json={"a": 1})
        assert (again.status_code, again.headers["idempotent-replayed"]) == (201, "true")
    assert backend.calls["/api/payments"] == 1


async def test_in_flight_same_request_is_409_and_different_request_is_422(
    anyio_backend: str,
) -> None:
    app, backend = build()
    backend.gate, backend.started = anyio.Event(), anyio.Event()
    async with client_for(app) as client, anyio.create_task_group() as tg:
        results: list[httpx.Response] = []

        async def first() -> None:
            results.append(await client.post("/api/wait", headers=key("k"), json={"a": 1}))

        tg.start_soon(first)
        await backend.started.wait()
        in_use = await client.post("/api/wait", headers=key("k"), json={"a": 1})
        assert_error(in_use, 409, "idempotency_key_in_use")
        assert in_use.headers["retry-after"] == "1"
        assert_error(
            await client.post("/api/wait", headers=key("k"), json={"a": 2}),
            422,
            "idempotency_key_reused",
        )
        backend.gate.set()
    assert results[0].status_code == 201
    assert backend.calls["/api/wait"] == 1


# -- scoping and expiry ------------------------------------------------------------------


async def test_key_reused_on_another_route_executes_there(
    app_client: tuple[httpx.AsyncClient, Backend],
) -> None:
    client, backend = app_client
    payment = await client.post("/api/payments", headers=key("shared"), json={"a": 1})
    refund = await client.post("/api/refunds", headers=key("shared"), json={"a": 1})
    assert payment.status_code == refund.status_code == 201
    assert "idempotent-replayed" not in refund.headers
    assert refund.json()["path"] == "/api/refunds"
    assert backend.calls["/api/payments"] == backend.calls["/api/refunds"] == 1


async def test_route_params_share_one_route_scope(
    app_client: tuple[httpx.AsyncClient, Backend],
) -> None:
    client, _ = app_client
    # Same route pattern, other path: the key is already bound to another request.
    assert (await client.post("/api/status/200", headers=key("p"), json={})).status_code == 200
    assert_error(
        await client.post("/api/status/201", headers=key("p"), json={}),
        422,
        "idempotency_key_reused",
    )


async def test_principals_do_not_collide(app_client: tuple[httpx.AsyncClient, Backend]) -> None:
    client, _ = app_client
    alice = await client.post(
        "/api/payments", headers={**key("k"), "X-User": "alice"}, json={"a": 1}
    )
    bob = await client.post("/api/payments", headers={**key("k"), "X-User": "bob"}, json={"a": 2})
    anonymous = await client.post("/api/payments", headers=key("k"), json={"a": 3})
    assert alice.status_code == bob.status_code == anonymous.status_code == 201
    assert [r.json()["run"] for r in (alice, bob, anonymous)] == [1, 2, 3]
    again = await client.post(
        "/api/payments", headers={**key("k"), "X-User": "alice"}, json={"a": 1}
    )
    assert again.headers["idempotent-replayed"] == "true"
    assert again.json()["run"] == 1


async def test_failing_identify_is_500_and_never_anonymous(
    app_client: tuple[httpx.AsyncClient, Backend],
) -> None:
    client, backend = app_client
    response = await client.post(
        "/api/payments", headers={**key("k"), "X-User": "explode"}, json={}
    )
    data = assert_error(response, 500, "internal_error")
    assert "identity" not in data["message"]
    assert backend.calls["/api/payments"] == 0


async def test_replay_after_ttl_executes_anew(anyio_backend: str, clock: FakeClock) -> None:
    app, _ = build(store=MemoryStore(clock=clock), clock=clock, ttl=100.0)
    async with client_for(app) as client:
        first = await client.post("/api/payments", headers=key("k"), json={})
        clock.advance(99)
        replay = await client.post("/api/payments", headers=key("k"), json={})
        clock.advance(2)
        fresh = await client.post("/api/payments", headers=key("k"), json={})
    assert replay.headers["idempotent-replayed"] == "true"
    assert replay.json()["run"] == first.json()["run"] == 1
    assert "idempotent-replayed" not in fresh.headers
    assert fresh.json()["run"] == 2


async def test_per_route_ttl_option(anyio_backend: str, clock: FakeClock) -> None:
    routes = [("POST /api/payments", IdempotencyOptions(ttl=10.0)), "POST /api/refunds"]
    app, backend = build(routes=routes, store=MemoryStore(clock=clock), clock=clock)
    async with client_for(app) as client:
        for path in ("/api/payments", "/api/refunds"):
            await client.post(path, headers=key("k"), json={})
        clock.advance(11)
        for path in ("/api/payments", "/api/refunds"):
            await client.post(path, headers=key("k"), json={})
    assert backend.calls == {"/api/payments": 2, "/api/refunds": 1}


# -- release -----------------------------------------------------------------------------


async def test_server_errors_release_the_key(
    app_client: tuple[httpx.AsyncClient, Backend],
) -> None:
    client, backend = app_client
    for expected_runs in (1, 2):
        response = await client.post("/api/status/503", headers=key("k"), json={})
        assert response.status_code == 503
        assert "idempotent-replayed" not in response.headers
        assert backend.calls["/api/status/503"] == expected_runs


async def test_exception_releases_the_key(app_client: tuple[httpx.AsyncClient, Backend]) -> None:
    client, backend = app_client
    for expected_runs in (1, 2):
        data = assert_error(
            await client.post("/api/boom", headers=key("k"), json={}), 500, "internal_error"
        )
        assert "secret" not in json.dumps(data)
        assert backend.calls["/api/boom"] == expected_runs


async def test_no_response_releases_the_key(anyio_backend: str) -> None:
    app, backend = build()
    for expected_runs in (1, 2):
        await call_raw(app, "/api/nothing", headers=[(b"idempotency-key", b"k")])
        assert backend.calls["/api/nothing"] == expected_runs


async def test_cancellation_mid_handler_leaves_no_locked_key(anyio_backend: str) -> None:
    app, backend = build()
    backend.gate, backend.started = anyio.Event(), anyio.Event()
    backend.block_first_only = True
    async with client_for(app) as client:
        async with anyio.create_task_group() as tg:
            tg.start_soon(partial(client.post, "/api/wait", headers=key("k")))
            await backend.started.wait()
            tg.cancel_scope.cancel()
        response = await client.post("/api/wait", headers=key("k"))
    assert response.status_code == 201
    assert "idempotent-replayed" not in response.headers
    assert backend.calls["/api/wait"] == 2


async def test_disconnect_mid_handler_leaves_no_locked_key(anyio_backend: str) -> None:
    app, backend = build()
    backend.started = anyio.Event()
    gone = anyio.Event()
    headers = [(b"idempotency-key", b"k")]
    async with anyio.create_task_group() as tg:
        tg.start_soon(lambda: call_raw(app, "/api/disconnect", headers=headers, disconnect=gone))
        await backend.started.wait()
        gone.set()
    backend.started = anyio.Event()
    gone = anyio.Event()
    gone.set()
    await call_raw(app, "/api/disconnect", headers=headers, disconnect=gone)
    assert backend.calls["/api/disconnect"] == 2


async def test_disconnect_mid_body_never_runs_the_app(anyio_backend: str) -> None:
    app, backend = build()
    headers = [(b"idempotency-key", b"k")]
    sent = await call_raw(
        app, "/api/payments", headers=headers, body_chunks=[b'{"a":', b""], disconnect_mid_body=True
    )
    assert sent == []
    assert backend.calls["/api/payments"] == 0
    # Nothing was locked or stored: the full request runs.
    messages = await call_raw(app, "/api/payments", headers=headers, body_chunks=[b'{"a":1}'])
    assert messages[0]["status"] == 201
    assert backend.calls["/api/payments"] == 1


async def test_lease_expiry_lets_a_new_request_run(anyio_backend: str, clock: FakeClock) -> None:
    app, backend = build(store=MemoryStore(clock=clock), clock=clock, lock_ttl=30.0)
    backend.gate, backend.started = anyio.Event(), anyio.Event()
    backend.block_first_only = True
    async with client_for(app) as client, anyio.create_task_group() as tg:
        stuck: list[httpx.Response] = []

        async def first() -> None:
            stuck.append(await client.post("/api/wait", headers=key("k")))

        tg.start_soon(first)
        await backend.started.wait()
        assert (await client.post("/api/wait", headers=key("k"))).status_code == 409
        clock.advance(31)
        second = await client.post("/api/wait", headers=key("k"))
        assert second.status_code == 201
        assert second.json()["run"] == 2
        backend.gate.set()
    # The first request outlived its lease: its answer reached its client but was not
    # stored over the second one's.
    assert stuck[0].json()["run"] == 1
    async with client_for(app) as client:
        third = await client.post("/api/wait", headers=key("k"))
    assert third.headers["idempotent-replayed"] == "true"
    assert third.json()["run"] == 2


# -- limits ------------------------------------------------------------------------------


async def test_request_body_over_cap_is_413(anyio_backend: str) -> None:
    app, backend = build(max_body_bytes=10)
    async with client_for(app) as client:
        response = await client.post("/api/payments", headers=key("k"), content=b"x" * 11)
        assert_error(response, 413, "payload_too_large")
        ok = await client.post("/api/payments", headers=key("k"), content=b"x" * 10)
        assert ok.status_code == 201
    # Streamed without Content-Length: counted as it arrives.
    messages = await call_raw(
        app, "/api/payments", headers=[(b"idempotency-key", b"k2")], body_chunks=[b"x" * 6] * 2
    )
    assert messages[0]["status"] == 413
    assert backend.calls["/api/payments"] == 1


async def test_big_response_is_passed_through_unstored(
    anyio_backend: str, caplog: pytest.LogCaptureFixture
) -> None:
    app, backend = build(max_response_bytes=3000)
    async with client_for(app) as client:
        with caplog.at_level(logging.WARNING, logger="asgi_armor.idempotency"):
            first = await client.post("/api/big", headers=key("k"))
        second = await client.post("/api/big", headers=key("k"))
    assert first.status_code == second.status_code == 200
    assert first.content == second.content == b"x" * 4000
    assert "idempotent-replayed" not in second.headers
    assert backend.calls["/api/big"] == 2
    assert any("not stored" in record.getMessage() for record in caplog.records)


# -- store failures ----------------------------------------------------------------------


class BrokenStore:
    """A store whose backend is down: every call fails as a real one would."""

    async def lease_acquire(self, key: str, lease: bytes, ttl: float) -> bytes | None:
        raise StoreError("down")

    async def lease_complete(self, key: str, lease: bytes, value: bytes, ttl: float) -> bool:
        raise StoreError("down")

    async def lease_release(self, key: str, lease: bytes) -> bool:
        raise StoreError("down")


async def test_store_failure_denies_by_default(anyio_backend: str) -> None:
    app, backend = build(store=BrokenStore())
    async with client_for(app) as client:
        response = await client.post("/api/payments", headers=key("k"), json={})
    assert_error(response, 503, "service_unavailable")
    assert response.headers["retry-after"] == "1"
    assert backend.calls["/api/payments"] == 0


async def test_store_failure_allow_runs_unprotected(
    anyio_backend: str, caplog: pytest.LogCaptureFixture
) -> None:
    app, backend = build(store=BrokenStore(), on_store_error="allow")
    async with client_for(app) as client:
        with caplog.at_level(logging.WARNING, logger="asgi_armor.idempotency"):
            for _ in range(2):
                response = await client.post("/api/payments", headers=key("k"), json={"a": 1})
                assert response.status_code == 201
                assert response.json()["body"] == '{"a":1}'
    assert backend.calls["/api/payments"] == 2
    assert any("without idempotency" in r.getMessage() for r in caplog.records)


async def test_garbage_in_the_store_is_a_store_failure(anyio_backend: str) -> None:
    store = MemoryStore()
    app, backend = build(store=store)
    async with client_for(app) as client:
        assert (await client.post("/api/payments", headers=key("k"), json={})).status_code == 201
        for stored_key in list(store._entries):
            store._entries[stored_key] = (store._entries[stored_key][0], b"not msgpack \xc1")
        response = await client.post("/api/payments", headers=key("k"), json={})
    assert_error(response, 503, "service_unavailable")
    assert backend.calls["/api/payments"] == 1


@pytest.mark.redis
async def test_dead_redis_denies(redis_url: str, asyncio_only: None) -> None:
    from asgi_armor.stores.redis import RedisStore

    store = RedisStore.from_url("redis://127.0.0.1:1/0", timeout=0.2)
    try:
        app, backend = build(store=store)
        async with client_for(app) as client:
            response = await client.post("/api/payments", headers=key("k"), json={})
        assert_error(response, 503, "service_unavailable")
        assert backend.calls["/api/payments"] == 0
    finally:
        await store.aclose()


# -- configuration -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "names"),
    [
        ({"routes": []}, "routes"),
        ({"routes": "POST /api/x"}, "routes"),
        ({"routes": ["POST api/x"]}, "api/x"),
        ({"routes": [("POST /api/x", {"ttl": 0})]}, "'POST /api/x' ttl"),
        ({"routes": [("POST /api/x", {"tll": 5})]}, "tll"),
        ({"routes": [("POST /api/x", {"ttl": "soon"})]}, "ttl"),
        ({"routes": [("POST /api/x", 5)]}, "'POST /api/x'"),
        ({"routes": ["POST /api/x"], "ttl": -1}, "ttl"),
        ({"routes": ["POST /api/x"], "lock_ttl": float("nan")}, "lock_ttl"),
        ({"routes": ["POST /api/x"], "max_body_bytes": -1}, "max_body_bytes"),
        ({"routes": ["POST /api/x"], "max_response_bytes": 1.5}, "max_response_bytes"),
        ({"routes": ["POST /api/x"], "ttl": "1h"}, "ttl"),
        ({"routes": ["POST /api/x"], "required": "yes"}, "required"),
        ({"routes": ["POST /api/x"], "on_store_error": "maybe"}, "on_store_error"),
        ({"routes": ["POST /api/x"], "header": "Bad Header"}, "header"),
    ],
)
def test_config_errors_name_the_entry(options: dict[str, Any], names: str) -> None:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        raise AssertionError

    with pytest.raises(ConfigError, match=names.replace("(", r"\(")):
        IdempotencyMiddleware(app, **options)


# -- exactly once ------------------------------------------------------------------------


async def hammer(app: Any, backend: Backend, requests: int = 100) -> list[httpx.Response]:
    """``requests`` identical requests at once; the handler is held until half have answered."""
    backend.gate, backend.started = anyio.Event(), anyio.Event()
    original_done = anyio.Event()
    responses: list[httpx.Response] = []
    half = requests // 2

    async with client_for(app) as client:

        async def one(index: int) -> None:
            if index >= half:
                # The second half arrives while the first request is finishing or done.
                await original_done.wait()
            response = await client.post("/api/wait", headers=key("once"), json={"amount": 7})
            responses.append(response)
            if response.status_code == 201 and "idempotent-replayed" not in response.headers:
                original_done.set()
            if len(responses) == half - 1:
                assert backend.gate is not None
                backend.gate.set()

        with anyio.fail_after(20):
            async with anyio.create_task_group() as tg:
                for index in range(requests):
                    tg.start_soon(one, index)
    return responses


def assert_exactly_once(responses: list[httpx.Response], backend: Backend) -> None:
    assert backend.calls["/api/wait"] == 1
    assert len(responses) == 100
    originals = [
        r for r in responses if r.status_code == 201 and "idempotent-replayed" not in r.headers
    ]
    assert len(originals) == 1
    replays = [r for r in responses if r.headers.get("idempotent-replayed") == "true"]
    in_use = [r for r in responses if r.status_code == 409]
    assert len(replays) + len(in_use) == 99
    assert replays
    assert in_use
    for response in replays:
        assert response.status_code == 201
        assert response.content == originals[0].content
    for response in in_use:
        assert_error(response, 409, "idempotency_key_in_use")


async def test_exactly_once_under_concurrency_memory(anyio_backend: str) -> None:
    app, backend = build()
    assert_exactly_once(await hammer(app, backend), backend)


@pytest.mark.redis
async def test_exactly_once_under_concurrency_redis(
    redis_url: str, redis_prefix: str, asyncio_only: None
) -> None:
    from asgi_armor.stores.redis import RedisStore

    store = RedisStore.from_url(redis_url, prefix=redis_prefix, timeout=2.0)
    try:
        app, backend = build(store=store)
        assert_exactly_once(await hammer(app, backend), backend)
    finally:
        await store.aclose()


@pytest.mark.redis
async def test_redis_records_are_prefixed_and_expire(
    redis_url: str, redis_prefix: str, asyncio_only: None
) -> None:
    import redis.asyncio as aioredis

    from asgi_armor.stores.redis import RedisStore

    store = RedisStore.from_url(redis_url, prefix=redis_prefix)
    client = aioredis.Redis.from_url(redis_url)
    try:
        app, _ = build(store=store, ttl=3600.0)
        async with client_for(app) as http:
            first = await http.post("/api/stream", headers={**key("k"), "X-User": "u1"})
            second = await http.post("/api/stream", headers={**key("k"), "X-User": "u1"})
        assert second.content == first.content
        assert second.headers["idempotent-replayed"] == "true"
        keys = [k async for k in client.scan_iter(match=redis_prefix + "*")]
        assert keys == [
            (redis_prefix + _record_key("u1", "POST", "POST /api/stream", "k")).encode()
        ]
        assert 3500 < await client.ttl(keys[0]) <= 3600
    finally:
        await client.aclose()
        await store.aclose()


async def test_exception_after_complete_response_keeps_the_record() -> None:
    """A background task failing after the 201 was sent must not let a retry charge again."""
    runs = 0

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        nonlocal runs
        runs += 1
        await send({"type": "http.response.start", "status": 201, "headers": []})
        await send({"type": "http.response.body", "body": b"charged", "more_body": False})
        raise RuntimeError("background task failed")

    armored = ErrorMiddleware(IdempotencyMiddleware(app, routes=["POST /pay"]))
    transport = httpx.ASGITransport(app=armored, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        first = await client.post("/pay", headers={"Idempotency-Key": "k"})
        again = await client.post("/pay", headers={"Idempotency-Key": "k"})
    assert (first.status_code, again.status_code) == (201, 201)
    assert again.headers["idempotent-replayed"] == "true"
    assert runs == 1


async def test_store_failure_while_keeping_does_not_free_the_key() -> None:
    """The handler succeeded: a failed lease_complete must not let a retry run it again.

    The record is written again after the response (httpx's ASGITransport waits for the
    app's task, so by the time it answers the record has landed): the retry is the replay.
    """
    runs = 0

    class FlakyComplete(MemoryStore):
        failed = False

        async def lease_complete(self, key: str, lease: bytes, value: bytes, ttl: float) -> bool:
            if not self.failed:
                self.failed = True
                raise StoreError("redis hiccup")
            return await super().lease_complete(key, lease, value, ttl)

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        nonlocal runs
        runs += 1
        await send({"type": "http.response.start", "status": 201, "headers": []})
        await send({"type": "http.response.body", "body": b"charged", "more_body": False})

    armored = ErrorMiddleware(
        IdempotencyMiddleware(app, routes=["POST /pay"], store=FlakyComplete())
    )
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=armored), base_url="http://t"
    ) as client:
        assert (await client.post("/pay", headers={"Idempotency-Key": "k"})).status_code == 201
        retry = await client.post("/pay", headers={"Idempotency-Key": "k"})
    assert (retry.status_code, retry.content) == (201, b"charged")
    assert retry.headers["idempotent-replayed"] == "true"
    assert runs == 1


async def test_integer_principals_work() -> None:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 201, "headers": []})
        await send({"type": "http.response.body", "body": b"ok", "more_body": False})

    armored = ErrorMiddleware(
        IdempotencyMiddleware(app, routes=["POST /pay"], identify=lambda scope: 42)  # type: ignore[arg-type, return-value]
    )
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=armored), base_url="http://t"
    ) as client:
        first = await client.post("/pay", headers={"Idempotency-Key": "k"})
        again = await client.post("/pay", headers={"Idempotency-Key": "k"})
    assert (first.status_code, again.headers.get("idempotent-replayed")) == (201, "true")


# -- a response delivered is a response recorded -------------------------------------------


class Outage(MemoryStore):
    """A MemoryStore whose listed operations fail, as a frozen or unreachable Redis would.

    ``lost_replies`` lists operations that do their work and then fail: the command ran in
    the store, its answer never came back (a Redis frozen after it read the command).
    """

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.failing: set[str] = set()
        self.lost_replies: set[str] = set()
        self.overloaded: set[str] = set()  # each fails once, as a saturated process does
        self.calls: Counter[str] = Counter()

    def _fail(self, name: str) -> None:
        self.calls[name] += 1
        if name in self.failing:
            raise StoreError("redis store call failed: TimeoutError")
        if name in self.overloaded:
            self.overloaded.discard(name)
            raise Overloaded(retry_after=1.0)

    async def lease_acquire(self, key: str, lease: bytes, ttl: float) -> bytes | None:
        self._fail("lease_acquire")
        return await super().lease_acquire(key, lease, ttl)

    async def lease_complete(self, key: str, lease: bytes, value: bytes, ttl: float) -> bool:
        self._fail("lease_complete")
        done = await super().lease_complete(key, lease, value, ttl)
        if "lease_complete" in self.lost_replies:
            self.lost_replies.discard("lease_complete")
            raise StoreError("redis store call failed: TimeoutError")
        return done

    async def lease_extend(self, key: str, lease: bytes, ttl: float) -> bool:
        self._fail("lease_extend")
        return await super().lease_extend(key, lease, ttl)

    async def lease_release(self, key: str, lease: bytes) -> bool:
        self._fail("lease_release")
        return await super().lease_release(key, lease)


WRITES = {"lease_complete", "lease_extend", "lease_release"}


def _scope(path: str, headers: Sequence[tuple[bytes, bytes]], client: str) -> Scope:
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": list(headers),
        "client": (client, 123),
        "server": ("t", 80),
    }


class Answer:
    """What a client received: the status, the headers and the body, once complete."""

    def __init__(self) -> None:
        self.status = 0
        self.headers: dict[bytes, bytes] = {}
        self.body = b""
        self.complete = anyio.Event()


async def respond(
    tg: anyio.abc.TaskGroup,
    app: Any,
    path: str = "/api/payments",
    idem_key: str = "k",
    *,
    body: bytes = b'{"amount": 1}',
    client: str = "1.2.3.4",
    on_last: Callable[[], None] | None = None,
) -> Answer:
    """Start one request in ``tg``; return when its response is complete, as a server would.

    The app's task may go on after that (as it does under uvicorn): that is where a write
    that failed is retried.
    """
    answer = Answer()
    given = False

    async def receive() -> Message:
        nonlocal given
        if not given:
            given = True
            return {"type": "http.request", "body": body, "more_body": False}
        await anyio.sleep_forever()
        raise AssertionError("unreachable")

    async def send(message: Message) -> None:
        assert not answer.complete.is_set(), message
        if message["type"] == "http.response.start":
            answer.status = message["status"]
            answer.headers = dict(message.get("headers", []))
        elif message["type"] == "http.response.body":
            answer.body += message.get("body", b"")
            if not message.get("more_body", False):
                if on_last is not None:
                    on_last()
                answer.complete.set()

    headers = [(b"idempotency-key", idem_key.encode()), (b"content-type", b"application/json")]
    tg.start_soon(app, _scope(path, headers, client), receive, send)
    with anyio.fail_after(5):
        await answer.complete.wait()
    return answer


def inner(app: Any) -> IdempotencyMiddleware:
    middleware = app.app
    assert isinstance(middleware, IdempotencyMiddleware)
    return middleware


async def wait_settled(app: Any) -> None:
    """Wait (at most 5 s) until the app's held records have reached the store."""
    for _ in range(500):
        if not inner(app).pending:
            return
        await anyio.sleep(0.01)
    pytest.fail(f"{inner(app).pending} records still held after 5 s")


@pytest.mark.parametrize("path", ["/api/payments", "/api/stream", "/api/big"])
async def test_the_record_is_stored_before_the_last_chunk_goes_out(
    anyio_backend: str, path: str
) -> None:
    """A client holding the complete response can count on its replay (streamed, or with
    an empty last chunk, too)."""
    store = MemoryStore()
    app, backend = build(store=store)
    record = _record_key("u1", "POST", f"POST {path}", "k")
    stored_when_last_sent: list[bool] = []

    def check() -> None:
        value = store._get(record, store.clock())
        stored_when_last_sent.append(value is not None and b"idem1.done" in value)

    async with anyio.create_task_group() as tg:
        headers = [(b"idempotency-key", b"k"), (b"x-user", b"u1")]
        answer = Answer()

        async def receive() -> Message:
            return {"type": "http.request", "body": b"{}", "more_body": False}

        async def send(message: Message) -> None:
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                check()
                answer.complete.set()

        tg.start_soon(app, _scope(path, headers, "1.2.3.4"), receive, send)
        await answer.complete.wait()
    assert stored_when_last_sent == [True]
    assert backend.calls[path] == 1


async def test_a_failed_write_is_kept_and_retried_until_it_lands(anyio_backend: str) -> None:
    store = Outage()
    backend = Backend()
    here, _ = build(backend, store=store)
    elsewhere, _ = build(backend, store=store)  # another process sharing the store
    async with client_for(elsewhere) as other, anyio.create_task_group() as tg:
        store.failing = set(WRITES)
        first = await respond(tg, here)
        assert first.status == 201
        assert inner(here).pending == 1
        # This process holds the response: a retry reaching it is the replay.
        again = await respond(tg, here)
        assert (again.status, again.body) == (201, first.body)
        assert again.headers[b"idempotent-replayed"] == b"true"
        # Another process finds the lease kept, never released: 409, never a second run.
        busy = await other.post("/api/payments", headers=key("k"), content=b'{"amount": 1}')
        assert_error(busy, 409, "idempotency_key_in_use")
        assert busy.headers["retry-after"] == "1"
        store.failing = set()
        await wait_settled(here)
        landed = await other.post("/api/payments", headers=key("k"), content=b'{"amount": 1}')
    assert (landed.status_code, landed.content) == (201, first.body)
    assert landed.headers["idempotent-replayed"] == "true"
    assert backend.calls["/api/payments"] == 1
    assert inner(here).pending_dropped == 0


async def test_a_lease_that_lapsed_during_the_outage_is_taken_back(
    anyio_backend: str, clock: FakeClock
) -> None:
    """The store failed for longer than lock_ttl: still one execution while we hold it."""
    store = Outage(clock=clock)
    backend = Backend()
    here, _ = build(backend, store=store, clock=clock, lock_ttl=1.0)
    elsewhere, _ = build(backend, store=store, clock=clock, lock_ttl=1.0)
    async with client_for(elsewhere) as other, anyio.create_task_group() as tg:
        store.failing = set(WRITES)
        first = await respond(tg, here)
        clock.advance(3)  # the lease expires in the store meanwhile
        again = await respond(tg, here)
        assert (again.status, again.body) == (201, first.body)
        assert again.headers[b"idempotent-replayed"] == b"true"
        store.failing = set()
        await wait_settled(here)
        landed = await other.post("/api/payments", headers=key("k"), content=b'{"amount": 1}')
    assert (landed.status_code, landed.content) == (201, first.body)
    assert backend.calls["/api/payments"] == 1


async def test_a_write_that_ran_but_whose_reply_was_lost_is_recognised(
    anyio_backend: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Redis froze after reading the command: it stored the record, we saw a timeout."""
    store = Outage()
    store.lost_replies = {"lease_complete"}
    app, backend = build(store=store)
    with caplog.at_level(logging.INFO, logger="asgi_armor.idempotency"):
        async with anyio.create_task_group() as tg:
            first = await respond(tg, app)
        async with client_for(app) as client:
            again = await client.post("/api/payments", headers=key("k"), content=b'{"amount": 1}')
    assert (again.status_code, again.content) == (201, first.body)
    assert backend.calls["/api/payments"] == 1
    assert inner(app).pending == 0
    assert not any("lost" in record.getMessage() for record in caplog.records)


async def test_an_overloaded_process_still_holds_the_record(anyio_backend: str) -> None:
    """Overloaded (no turn to reach the store in time) is a failed write, not a lost one."""
    store = Outage()
    store.overloaded = {"lease_complete"}
    app, backend = build(store=store)
    async with anyio.create_task_group() as tg:
        first = await respond(tg, app)
        assert inner(app).pending == 1
        await wait_settled(app)
    async with client_for(app) as client:
        again = await client.post("/api/payments", headers=key("k"), content=b'{"amount": 1}')
    assert (first.status, again.status_code, again.content) == (201, 201, first.body)
    assert backend.calls["/api/payments"] == 1


async def test_pending_records_are_bounded_and_the_lease_is_kept(
    anyio_backend: str, caplog: pytest.LogCaptureFixture
) -> None:
    store = Outage()
    backend = Backend()
    here, _ = build(backend, store=store, max_pending=1)
    elsewhere, _ = build(backend, store=store)
    with caplog.at_level(logging.WARNING, logger="asgi_armor.idempotency"):
        async with client_for(elsewhere) as other, anyio.create_task_group() as tg:
            store.failing = set(WRITES)
            kept = await respond(tg, here, idem_key="k1")
            await respond(tg, here, idem_key="k2")
            assert inner(here).pending == 1
            assert inner(here).pending_dropped == 1
            # Past the bound the lease is kept (fail closed), not released.
            busy = await other.post("/api/payments", headers=key("k2"), content=b'{"amount": 1}')
            assert_error(busy, 409, "idempotency_key_in_use")
            store.failing = set()
            await wait_settled(here)
            replay = await other.post("/api/payments", headers=key("k1"), content=b'{"amount": 1}')
    assert replay.content == kept.body
    assert backend.calls["/api/payments"] == 2
    assert any("max_pending" in record.getMessage() for record in caplog.records)


async def test_pending_bytes_are_bounded(anyio_backend: str) -> None:
    store = Outage()
    app, _ = build(store=store, max_pending_bytes=10)
    async with anyio.create_task_group() as tg:
        store.failing = set(WRITES)
        await respond(tg, app)
        assert (inner(app).pending, inner(app).pending_dropped) == (0, 1)
        store.failing = set()


@pytest.mark.parametrize(
    "options", [{"max_pending": -1}, {"max_pending_bytes": -1}, {"max_pending": True}]
)
def test_pending_bounds_are_checked(options: dict[str, Any]) -> None:
    with pytest.raises(ConfigError, match=next(iter(options))):
        IdempotencyMiddleware(Backend(), routes=ROUTES, **options)


# -- scoping and what is stored (issue 15) -------------------------------------------------


@pytest.mark.parametrize("code", [307, 308])
async def test_redirects_are_not_stored(anyio_backend: str, code: int) -> None:
    """The client repeats the request at the new location with the same key."""
    app, backend = build()
    async with client_for(app) as client:
        for expected_runs in (1, 2):
            response = await client.post(f"/api/status/{code}", headers=key("k"))
            assert response.status_code == code
            assert "idempotent-replayed" not in response.headers
            assert backend.calls[f"/api/status/{code}"] == expected_runs


def anonymous_client(app: Any, address: str) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app, client=(address, 123)), base_url="http://t"
    )


async def test_anonymous_callers_are_scoped_by_client_address(anyio_backend: str) -> None:
    """A guessed key never hands one anonymous caller another's response (or cookies)."""
    app, backend = build(identify=None)
    async with anonymous_client(app, "1.2.3.4") as alice, anonymous_client(app, "5.6.7.8") as eve:
        mine = await alice.post("/api/stream", headers=key("order-1"))
        guessed = await eve.post("/api/stream", headers=key("order-1"))
        again = await alice.post("/api/stream", headers=key("order-1"))
    assert guessed.headers["x-run"] == "2"
    assert "idempotent-replayed" not in guessed.headers
    assert (again.content, again.headers["idempotent-replayed"]) == (mine.content, "true")
    assert backend.calls["/api/stream"] == 2


async def test_anonymous_scoping_uses_the_full_ipv6_address(anyio_backend: str) -> None:
    app, backend = build(identify=None)
    async with (
        anonymous_client(app, "2001:db8::1") as one,
        anonymous_client(app, "2001:db8::2") as neighbour,
    ):
        await one.post("/api/payments", headers=key("k"))
        other = await neighbour.post("/api/payments", headers=key("k"))
    assert "idempotent-replayed" not in other.headers
    assert backend.calls["/api/payments"] == 2


async def test_principals_are_not_scoped_by_address(anyio_backend: str) -> None:
    """A signed-in user retrying from another network still gets their replay."""
    app, backend = build()
    async with anonymous_client(app, "1.2.3.4") as home, anonymous_client(app, "5.6.7.8") as phone:
        first = await home.post("/api/payments", headers={**key("k"), "X-User": "u1"})
        retry = await phone.post("/api/payments", headers={**key("k"), "X-User": "u1"})
    assert (retry.content, retry.headers["idempotent-replayed"]) == (first.content, "true")
    assert backend.calls["/api/payments"] == 1


async def test_client_ip_option_names_the_anonymous_scope(anyio_backend: str) -> None:
    app, backend = build(identify=None, client_ip=lambda scope: "one-tenant")
    async with anonymous_client(app, "1.2.3.4") as one, anonymous_client(app, "5.6.7.8") as two:
        await one.post("/api/payments", headers=key("k"))
        replay = await two.post("/api/payments", headers=key("k"))
    assert replay.headers["idempotent-replayed"] == "true"
    assert backend.calls["/api/payments"] == 1


async def test_armor_scopes_anonymous_callers_by_the_forwarded_client(anyio_backend: str) -> None:
    from asgi_armor import ArmorConfig, armor
    from asgi_armor.config import IdempotencyEntry

    backend = Backend()
    config = ArmorConfig(
        trusted_proxies=["10.0.0.1"], idempotency=[IdempotencyEntry(route="POST /api/payments")]
    )
    app = armor(backend, config)
    async with anonymous_client(app, "10.0.0.1") as proxy:
        first = await proxy.post(
            "/api/payments", headers={**key("k"), "X-Forwarded-For": "198.51.100.7"}
        )
        other = await proxy.post(
            "/api/payments", headers={**key("k"), "X-Forwarded-For": "203.0.113.9"}
        )
        retry = await proxy.post(
            "/api/payments", headers={**key("k"), "X-Forwarded-For": "198.51.100.7"}
        )
    assert "idempotent-replayed" not in other.headers
    assert (retry.content, retry.headers["idempotent-replayed"]) == (first.content, "true")
    assert backend.calls["/api/payments"] == 2


async def test_armor_request_cap_follows_limits(anyio_backend: str) -> None:
    """Bodies the [limits] allow reach an idempotent route."""
    from asgi_armor import ArmorConfig, armor
    from asgi_armor.config import IdempotencyEntry, LimitsConfig

    backend = Backend()
    config = ArmorConfig(
        limits=LimitsConfig(max_body_bytes=4 * 1_048_576),
        idempotency=[IdempotencyEntry(route="POST /api/payments")],
    )
    async with client_for(armor(backend, config)) as client:
        big_body = b"x" * (2 * 1_048_576)
        response = await client.post("/api/payments", headers=key("k"), content=big_body)
    assert response.status_code == 201, response.text
    assert backend.calls["/api/payments"] == 1


async def test_armor_entry_sets_its_own_caps(anyio_backend: str) -> None:
    from asgi_armor import ArmorConfig, armor
    from asgi_armor.config import IdempotencyEntry

    backend = Backend()
    entry = IdempotencyEntry(route="POST /api/big", max_body_bytes=100, max_response_bytes=3000)
    async with client_for(armor(backend, ArmorConfig(idempotency=[entry]))) as client:
        assert_error(
            await client.post("/api/big", headers=key("k"), content=b"x" * 101),
            413,
            "payload_too_large",
        )
        # 4000 bytes answered, over the entry's 3000: passed through unstored.
        for _ in range(2):
            assert (await client.post("/api/big", headers=key("k"))).status_code == 200
    assert backend.calls["/api/big"] == 2


def test_config_entry_caps_are_checked() -> None:
    from asgi_armor import ArmorConfig, armor
    from asgi_armor.config import IdempotencyEntry

    config = ArmorConfig(idempotency=[IdempotencyEntry(route="POST /x", max_body_bytes=-1)])
    with pytest.raises(ConfigError, match=r"idempotency.*max_body_bytes"):
        armor(Backend(), config)


class ResendingStore(MemoryStore):
    """A store whose client sends ``lease_acquire`` twice, as redis-py's retry does when
    the first reply is lost on a broken connection: the second run sees our own lease."""

    async def lease_acquire(self, key: str, lease: bytes, ttl: float) -> bytes | None:
        await super().lease_acquire(key, lease, ttl)
        return await super().lease_acquire(key, lease, ttl)


async def test_a_resent_lease_acquire_that_finds_our_own_lease_runs_the_app() -> None:
    app, backend = build(store=ResendingStore())
    async with client_for(app) as client:
        first = await client.post("/api/payments", headers=key("resent"), json={"a": 1})
        again = await client.post("/api/payments", headers=key("resent"), json={"a": 1})
    assert first.status_code == 201, first.text
    assert again.headers["idempotent-replayed"] == "true"
    assert backend.calls["/api/payments"] == 1


# -- release and trailers (tests helper, issue 23) ---------------------------------------


class FailingRelease(MemoryStore):
    """A store that takes and keeps leases but fails every release, as Redis going away
    between the handler's start and its end would."""

    releases = 0

    async def lease_release(self, key: str, lease: bytes) -> bool:
        self.releases += 1
        raise StoreError("redis went away")


async def test_store_failure_while_releasing_still_delivers_the_answer(
    clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    """A 5xx is delivered whole even when the key cannot be freed; the key then stays
    leased (retries are told 409 in use, the app is not run again) until lock_ttl."""
    store = FailingRelease(clock=clock)
    app, backend = build(store=store, clock=clock, lock_ttl=30)
    async with client_for(app) as client:
        with caplog.at_level(logging.WARNING, logger="asgi_armor.idempotency"):
            first = await client.post("/api/status/503", headers=key("k"), json={})
        assert first.status_code == 503
        assert first.json()["run"] == 1
        assert store.releases == 1
        warnings = [r.getMessage() for r in caplog.records]
        assert any(
            "failed to release" in m and first.headers["x-request-id"] in m for m in warnings
        )
        assert_error(
            await client.post("/api/status/503", headers=key("k"), json={}),
            409,
            "idempotency_key_in_use",
        )
        assert backend.calls["/api/status/503"] == 1
        clock.advance(30.5)
        again = await client.post("/api/status/503", headers=key("k"), json={})
    assert again.status_code == 503
    assert backend.calls["/api/status/503"] == 2


async def test_store_failure_while_releasing_after_an_exception_is_still_the_envelope(
    clock: FakeClock,
) -> None:
    app, backend = build(store=FailingRelease(clock=clock), clock=clock)
    async with client_for(app) as client:
        data = assert_error(
            await client.post("/api/boom", headers=key("k"), json={}), 500, "internal_error"
        )
    assert "secret" not in json.dumps(data)
    assert backend.calls["/api/boom"] == 1


async def test_a_response_with_trailers_is_never_stored() -> None:
    """Trailers come after the body: a replay could not reproduce them, so the response
    is passed through unstored and a retry runs the handler again."""
    runs = 0

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        nonlocal runs
        runs += 1
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"trailer", b"x-checksum")],
                "trailers": True,
            }
        )
        await send({"type": "http.response.body", "body": b"part 1, ", "more_body": True})
        await send({"type": "http.response.body", "body": b"part 2", "more_body": False})
        await send(
            {
                "type": "http.response.trailers",
                "headers": [(b"x-checksum", b"%d" % runs)],
                "more_trailers": False,
            }
        )

    armored = IdempotencyMiddleware(app, routes=["POST /pay"])
    headers = [(b"idempotency-key", b"k")]
    first = await call_raw(armored, "/pay", headers=headers)
    again = await call_raw(armored, "/pay", headers=headers)
    assert runs == 2
    for run, sent in enumerate((first, again), start=1):
        assert [m["type"] for m in sent] == [
            "http.response.start",
            "http.response.body",
            "http.response.body",
            "http.response.trailers",
        ]
        assert (b"idempotent-replayed", b"true") not in sent[0]["headers"]
        assert sent[3]["headers"] == [(b"x-checksum", b"%d" % run)]


# -- make mutate survivors (docs/mutation.md): behaviour that stays ------------------------


def _raw_scope(path: str = "/pay", **extra: Any) -> dict[str, Any]:
    scope: dict[str, Any] = {
        "type": "http",
        "method": "POST",
        "path": path,
        "query_string": b"",
        "headers": [(b"idempotency-key", b"k")],
        "client": ("1.2.3.4", 1),
    }
    scope.update(extra)
    return scope


async def _drive(app: Any, scope: dict[str, Any], body: bytes = b"") -> list[Message]:
    pending = [{"type": "http.request", "body": body, "more_body": False}]
    sent: list[Message] = []

    async def receive() -> Message:
        return pending.pop(0) if pending else {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        sent.append(message)

    await app(scope, receive, send)
    return sent


class Scripted:
    """An app that sends the messages it is given (then raises, if told to), counting runs."""

    def __init__(self, *messages: Message, then_raise: bool = False) -> None:
        self.messages = messages
        self.then_raise = then_raise
        self.runs = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.runs += 1
        for message in self.messages:
            await send(message)
        if self.then_raise:
            raise RuntimeError("the stream broke")


START = {"type": "http.response.start", "status": 201, "headers": []}


async def test_a_stream_cut_short_is_released_not_stored() -> None:
    app = Scripted(
        START, {"type": "http.response.body", "body": b"half", "more_body": True}, then_raise=True
    )
    armored = IdempotencyMiddleware(app, routes=["POST /pay"])
    for runs in (1, 2):
        with pytest.raises(RuntimeError):
            await _drive(armored, _raw_scope())
        assert app.runs == runs


async def test_the_apps_own_500_is_released() -> None:
    app = Scripted({**START, "status": 500}, {"type": "http.response.body", "body": b"oops"})
    armored = IdempotencyMiddleware(app, routes=["POST /pay"])
    for runs in (1, 2):
        sent = await _drive(armored, _raw_scope())
        assert (sent[0]["status"], app.runs) == (500, runs)


async def test_messages_without_optional_keys_are_stored_and_replayed_the_same() -> None:
    app = Scripted({"type": "http.response.start", "status": 201}, {"type": "http.response.body"})
    armored = IdempotencyMiddleware(app, routes=["POST /pay"])
    await _drive(armored, _raw_scope())
    replay = await _drive(armored, _raw_scope())
    assert app.runs == 1
    assert replay[0]["headers"] == [(b"idempotent-replayed", b"true")]
    assert [m.get("body") for m in replay[1:]] == [b""]


@pytest.mark.parametrize(("size", "stored"), [(10, True), (11, False)])
async def test_a_response_of_exactly_the_cap_is_stored(size: int, stored: bool) -> None:
    chunks = [b"x" * (size - 4), b"yyyy"]
    app = Scripted(
        START,
        {"type": "http.response.body", "body": chunks[0], "more_body": True},
        {"type": "http.response.body", "body": chunks[1]},
    )
    armored = IdempotencyMiddleware(app, routes=["POST /pay"], max_response_bytes=10)
    await _drive(armored, _raw_scope())
    again = await _drive(armored, _raw_scope())
    assert app.runs == (1 if stored else 2)
    assert b"".join(m.get("body", b"") for m in again[1:]) == b"".join(chunks)


class _YieldingStore(MemoryStore):
    """A MemoryStore whose release yields to the event loop, as a network store does."""

    async def lease_release(self, key: str, lease: bytes) -> bool:
        await anyio.lowlevel.checkpoint()
        return await super().lease_release(key, lease)


async def test_a_cancelled_request_releases_through_a_store_that_yields() -> None:
    started = anyio.Event()
    runs = 0

    async def hangs_first(scope: Scope, receive: Receive, send: Send) -> None:
        nonlocal runs
        runs += 1
        if runs == 1:
            started.set()
            await anyio.sleep_forever()
        await send(START)
        await send({"type": "http.response.body", "body": b"ok"})

    store = _YieldingStore()
    armored = IdempotencyMiddleware(hangs_first, routes=["POST /pay"], store=store)
    async with anyio.create_task_group() as tg:
        tg.start_soon(_drive, armored, _raw_scope())
        await started.wait()
        tg.cancel_scope.cancel()
    assert len(store) == 0, "the cancelled request left its lease behind"
    assert (await _drive(armored, _raw_scope()))[0]["status"] == 201


class _FailingKeepAndRelease(MemoryStore):
    """Fails the first write of a record (then the held record lands) and every release."""

    def __init__(self) -> None:
        super().__init__()
        self.failed_keeps = 0

    async def lease_complete(self, key: str, lease: bytes, value: bytes, ttl: float) -> bool:
        if not self.failed_keeps:
            self.failed_keeps += 1
            raise StoreError("redis went away")
        return await super().lease_complete(key, lease, value, ttl)

    async def lease_release(self, key: str, lease: bytes) -> bool:
        raise StoreError("redis went away")


@pytest.mark.parametrize("path", ["/api/payments", "/api/big"])
async def test_store_failures_after_the_answer_are_warnings_with_the_request_id(
    caplog: pytest.LogCaptureFixture, path: str
) -> None:
    """Keeping (a normal answer, held and written again) or releasing (one too big to
    store) fails: the client has its answer, the log says why with the request id, and
    nothing is an error."""
    store = _FailingKeepAndRelease()
    app, backend = build(store=store, max_response_bytes=100)
    async with client_for(app) as client:
        with caplog.at_level(logging.WARNING):
            response = await client.post(path, headers=key("k"), json={})
            again = await client.post(path, headers=key("k"), json={})
    assert response.status_code in (200, 201)
    if path == "/api/payments":
        # The held record landed on the second write: the retry is its replay.
        assert again.headers["idempotent-replayed"] == "true"
        assert backend.calls[path] == 1
    request_id = response.headers["x-request-id"]
    assert [r for r in caplog.records if r.levelno >= logging.ERROR] == []
    assert any(
        request_id in r.getMessage() for r in caplog.records if "store failed" in r.getMessage()
    )


async def test_a_handler_outliving_its_lease_is_a_warning_not_an_error(
    clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    store = MemoryStore(clock=clock)
    taken = False

    async def slow(scope: Scope, receive: Receive, send: Send) -> None:
        clock.advance(31)  # past lock_ttl: another request may take the key
        if taken:
            # Another request (another process) takes the lapsed key meanwhile.
            (record_key,) = list(store._held)
            assert await store.lease_acquire(record_key, b"another request", 30) is None
        await send(START)
        await send({"type": "http.response.body", "body": b"late"})

    armored = IdempotencyMiddleware(
        slow, routes=["POST /pay"], store=store, lock_ttl=30, clock=clock
    )
    with caplog.at_level(logging.WARNING, logger="asgi_armor.idempotency"):
        # Nobody took the lapsed key: it is taken back and the response kept, silently.
        sent = await _drive(armored, _raw_scope())
        replay = await _drive(armored, _raw_scope())
        assert caplog.records == []
        taken = True
        lost = await _drive(armored, _raw_scope(headers=[(b"idempotency-key", b"other")]))
    assert sent[1]["body"] == replay[1]["body"] == lost[1]["body"] == b"late"
    assert (b"idempotent-replayed", b"true") in replay[0]["headers"]
    messages = [(r.levelno, r.getMessage()) for r in caplog.records]
    assert len(messages) == 1
    assert messages[0][0] == logging.WARNING
    assert messages[0][1].startswith("idempotency lease lost after 31.0s (lock_ttl=30s)")


async def test_a_normal_run_logs_nothing(caplog: pytest.LogCaptureFixture) -> None:
    app, _ = build()
    async with client_for(app) as client:
        with caplog.at_level(logging.DEBUG, logger="asgi_armor.idempotency"):
            await client.post("/api/payments", headers=key("k"), json={})
            await client.post("/api/payments", headers=key("k"), json={})
    assert [r for r in caplog.records if r.name.startswith("asgi_armor")] == []


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (
            lambda: IdempotencyMiddleware(Backend(), routes="POST /pay"),  # type: ignore[arg-type]
            "idempotency routes: expected a list of routes, not one string",
        ),
        (
            lambda: IdempotencyMiddleware(Backend(), routes=[]),
            "idempotency routes: at least one route is required",
        ),
        (
            lambda: IdempotencyMiddleware(Backend(), routes=["POST /pay"], ttl=0),
            "idempotency ttl must be a positive number of seconds (finite), not 0",
        ),
        (
            lambda: IdempotencyMiddleware(Backend(), routes=[("POST /pay", {}, 1)]),  # type: ignore[list-item]
            "idempotency route ('POST /pay', {}, 1): expected (pattern, options)",
        ),
        (
            lambda: IdempotencyMiddleware(Backend(), routes=[("POST /pay", {"lock_ttl": 0})]),
            "idempotency route 'POST /pay' lock_ttl must be a positive number of seconds "
            "(finite), not 0.0",
        ),
    ],
)
def test_config_errors_say_exactly_what_is_wrong(make: Any, message: str) -> None:
    with pytest.raises(ConfigError) as excinfo:
        make()
    assert str(excinfo.value) == message


def test_the_smallest_settings_are_accepted() -> None:
    IdempotencyMiddleware(
        Backend(),
        routes=["POST /pay"],
        ttl=0.5,
        lock_ttl=0.5,
        max_body_bytes=0,
        max_response_bytes=0,
    )


async def test_defaults(clock: FakeClock) -> None:
    """Header Idempotency-Key, replays for 24 h, leases for 60 s, 1 MiB caps both ways."""
    app = Scripted(START, {"type": "http.response.body", "body": b"x" * 1_048_576})
    armored = IdempotencyMiddleware(
        app, routes=["POST /pay"], store=MemoryStore(clock=clock), clock=clock
    )
    assert armored.header == "Idempotency-Key"
    assert (
        repr(armored)
        == "IdempotencyMiddleware(routes=['POST /pay'], store=MemoryStore(max_keys=100000))"
    )
    await _drive(armored, _raw_scope(), body=b"b" * 1_048_576)
    clock.advance(86_399)
    await _drive(armored, _raw_scope(), body=b"b" * 1_048_576)
    assert app.runs == 1  # replayed: a 1 MiB body and a 1 MiB response are within the caps
    clock.advance(1.5)  # 24 h and half a second after: expired
    await _drive(armored, _raw_scope(), body=b"b" * 1_048_576)
    assert app.runs == 2
    for headers in ([], [(b"content-length", b"1048577")]):  # read, or refused unread
        scope = _raw_scope(headers=[(b"idempotency-key", b"k"), *headers])
        too_big = await _drive(armored, scope, body=b"b" * 1_048_577)
        assert too_big[0]["status"] == 413
        assert json.loads(too_big[1]["body"])["message"] == "Request body exceeds 1048576 bytes"
    bigger = Scripted(START, {"type": "http.response.body", "body": b"x" * 1_048_577})
    not_stored = IdempotencyMiddleware(bigger, routes=["POST /pay"])
    for _ in range(2):
        await _drive(not_stored, _raw_scope())
    assert bigger.runs == 2  # a response over 1 MiB is passed through, not stored


async def test_the_default_lease_lasts_sixty_seconds(clock: FakeClock) -> None:
    started, gate = anyio.Event(), anyio.Event()

    async def waits(scope: Scope, receive: Receive, send: Send) -> None:
        started.set()
        await gate.wait()
        await send(START)
        await send({"type": "http.response.body", "body": b""})

    armored = IdempotencyMiddleware(
        waits, routes=["POST /pay"], store=MemoryStore(clock=clock), clock=clock
    )
    async with anyio.create_task_group() as tg:
        tg.start_soon(_drive, armored, _raw_scope())
        await started.wait()
        clock.advance(59.5)
        assert (await _drive(armored, _raw_scope()))[0]["status"] == 409
        clock.advance(1)
        started = anyio.Event()
        tg.start_soon(_drive, armored, _raw_scope())
        await started.wait()  # the lease lapsed: a second run started
        gate.set()


async def test_non_http_scopes_and_the_disconnect_after_the_body_reach_the_app() -> None:
    heard: list[Message] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        while True:
            heard.append(await receive())
            if heard[-1]["type"] in ("http.disconnect", "lifespan.startup"):
                break
        await send({"type": "lifespan.startup.complete"} if scope["type"] == "lifespan" else START)
        if scope["type"] == "http":
            await send({"type": "http.response.body", "body": b""})

    armored = IdempotencyMiddleware(app, routes=["POST /pay"])
    sent: list[Message] = []

    async def lifespan_receive() -> Message:
        return {"type": "lifespan.startup"}

    async def capture(message: Message) -> None:
        sent.append(message)

    await armored({"type": "lifespan"}, lifespan_receive, capture)
    assert sent == [{"type": "lifespan.startup.complete"}]
    await _drive(armored, _raw_scope(), body=b"pay")
    assert [m["type"] for m in heard] == ["lifespan.startup", "http.request", "http.disconnect"]


def test_keys_are_taken_as_sent_apart_from_spaces_and_tabs() -> None:
    assert parse_idempotency_key(b" \tXkeyX\t ") == "XkeyX"
    assert parse_idempotency_key(b"X") == "X"
    assert parse_idempotency_key(b"\x0bkey") is None


async def test_headers_named_by_connection_without_spaces_are_not_replayed() -> None:
    app = Scripted(
        {
            **START,
            "headers": [(b"connection", b"close,x-hop"), (b"x-hop", b"1"), (b"x-kept", b"1")],
        },
        {"type": "http.response.body", "body": b""},
    )
    armored = IdempotencyMiddleware(app, routes=["POST /pay"])
    await _drive(armored, _raw_scope())
    replay = await _drive(armored, _raw_scope())
    assert replay[0]["headers"] == [(b"x-kept", b"1"), (b"idempotent-replayed", b"true")]


async def test_records_are_idem_keys_of_a_40_character_digest() -> None:
    store = MemoryStore()
    armored = IdempotencyMiddleware(
        Scripted(START, {"type": "http.response.body"}), routes=["POST /pay"], store=store
    )
    await _drive(armored, _raw_scope())
    (stored,) = list(store._entries)
    prefix, digest = stored.split(":")
    assert (prefix, len(digest)) == ("idem", 40)


async def test_odd_scopes_are_fingerprinted_not_fatal() -> None:
    """A path with an undecodable byte (surrogate-escaped by the server) and a scope
    without ``query_string``: both run once and replay."""
    app = Scripted(START, {"type": "http.response.body", "body": b"ok"})
    armored = IdempotencyMiddleware(app, routes=["POST /*"])
    odd_path = _raw_scope(path="/pay/\udcff")
    no_query = _raw_scope(headers=[(b"idempotency-key", b"other")])
    del no_query["query_string"]
    for scope in (odd_path, no_query):
        await _drive(armored, dict(scope))
        replay = await _drive(armored, dict(scope))
        assert (b"idempotent-replayed", b"true") in replay[0]["headers"]
    assert app.runs == 2
