"""ConcurrencyLimit, ConcurrencyLimiter and AIMDLimit, in process, on asyncio and trio."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import anyio
import anyio.lowlevel
import httpx
import pytest

from asgi_armor._asgi import Message, Receive, Scope, Send
from asgi_armor.errors import ConfigError, ErrorMiddleware, Overloaded
from asgi_armor.shedding import AIMDLimit, ConcurrencyLimit, ConcurrencyLimiter

if TYPE_CHECKING:
    from tests.conftest import FakeClock

pytestmark = pytest.mark.anyio


def client(app: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app, client=("1.2.3.4", 123)), base_url="http://t"
    )


async def empty_receive() -> Message:
    return {"type": "http.request", "body": b"", "more_body": False}


async def discard(message: Message) -> None:
    pass


def http_scope(path: str = "/work", method: str = "GET") -> Scope:
    return {"type": "http", "method": method, "path": path, "headers": []}


async def until(predicate: Any) -> None:
    """Let other tasks run until ``predicate()`` holds (bounded)."""
    with anyio.fail_after(5):
        while not predicate():
            await anyio.lowlevel.checkpoint()


class GatedApp:
    """An app whose requests run until the test opens the gate; it records what it sees."""

    def __init__(self) -> None:
        self.gate = anyio.Event()
        self.running = 0
        self.peak = 0
        self.order: list[str] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["path"] == "/healthz":
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"ok"})
            return
        self.running += 1
        self.peak = max(self.peak, self.running)
        self.order.append(scope["query_string"].decode() if "query_string" in scope else "")
        try:
            await self.gate.wait()
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"done"})
        finally:
            self.running -= 1


async def test_in_flight_never_exceeds_the_limit() -> None:
    running = 0
    peak = 0

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        try:
            await anyio.sleep(0.01)
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b""})
        finally:
            running -= 1

    mw = ConcurrencyLimit(app, max_concurrent=3, max_queue=100, queue_timeout=10)
    statuses: list[int] = []

    async def one() -> None:
        async def record(message: Message) -> None:
            if message["type"] == "http.response.start":
                statuses.append(message["status"])

        await mw(http_scope(), empty_receive, record)

    async with anyio.create_task_group() as tg:
        for _ in range(20):
            tg.start_soon(one)
    assert peak == 3
    assert mw.max_seen == 3
    assert statuses == [200] * 20
    assert (mw.in_flight, mw.queued, mw.shed, mw.admitted) == (0, 0, 0, 20)


async def test_queue_is_fifo() -> None:
    app = GatedApp()
    mw = ConcurrencyLimit(app, max_concurrent=1, max_queue=10, queue_timeout=10)

    async def one(n: int) -> None:
        scope = http_scope()
        scope["query_string"] = str(n).encode()
        await mw(scope, empty_receive, discard)

    async with anyio.create_task_group() as tg:
        tg.start_soon(one, 0)
        await until(lambda: mw.in_flight == 1)
        for n in range(1, 7):
            tg.start_soon(one, n)
            await until(lambda n=n: mw.queued == n)
        app.gate.set()
    assert app.order == [str(n) for n in range(7)]
    assert app.peak == 1


async def test_queue_full_is_503_overloaded_with_retry_after() -> None:
    app = GatedApp()
    mw = ConcurrencyLimit(app, max_concurrent=1, max_queue=0, retry_after=1.5)
    async with client(ErrorMiddleware(mw)) as c, anyio.create_task_group() as tg:
        tg.start_soon(c.get, "/work")
        await until(lambda: mw.in_flight == 1)
        response = await c.get("/work", headers={"X-Request-ID": "req-shed"})
        app.gate.set()
    assert response.status_code == 503
    assert response.headers["retry-after"] == "2"
    assert response.headers["x-request-id"] == "req-shed"
    assert response.json() == {
        "error": "overloaded",
        "message": "Server is overloaded, retry later",
        "details": [],
        "request_id": "req-shed",
    }
    assert mw.shed == 1
    assert mw.in_flight == 0


async def test_queue_timeout_is_503() -> None:
    app = GatedApp()
    mw = ConcurrencyLimit(app, max_concurrent=1, max_queue=5, queue_timeout=0.05)
    async with client(ErrorMiddleware(mw)) as c, anyio.create_task_group() as tg:
        tg.start_soon(c.get, "/work")
        await until(lambda: mw.in_flight == 1)
        start = anyio.current_time()
        response = await c.get("/work")
        waited = anyio.current_time() - start
        assert mw.queued == 0
        app.gate.set()
    assert response.status_code == 503
    assert response.json()["error"] == "overloaded"
    assert 0.04 <= waited < 5
    assert mw.shed == 1


async def test_queued_request_that_gets_a_slot_in_time_is_served() -> None:
    app = GatedApp()
    mw = ConcurrencyLimit(app, max_concurrent=1, max_queue=1, queue_timeout=10)
    async with client(ErrorMiddleware(mw)) as c, anyio.create_task_group() as tg:
        tg.start_soon(c.get, "/work")
        await until(lambda: mw.in_flight == 1)
        responses: list[httpx.Response] = []

        async def queued() -> None:
            responses.append(await c.get("/work"))

        tg.start_soon(queued)
        await until(lambda: mw.queued == 1)
        app.gate.set()
    assert [r.status_code for r in responses] == [200]
    assert mw.shed == 0


async def test_exempt_route_passes_while_saturated() -> None:
    app = GatedApp()
    mw = ConcurrencyLimit(app, max_concurrent=1, max_queue=0)
    async with client(ErrorMiddleware(mw)) as c, anyio.create_task_group() as tg:
        tg.start_soon(c.get, "/work")
        await until(lambda: mw.in_flight == 1)
        assert (await c.get("/work")).status_code == 503
        health = await c.get("/healthz")
        head = await c.head("/healthz")
        app.gate.set()
    assert health.status_code == 200
    assert head.status_code == 200
    assert mw.admitted == 1


async def test_cancelled_queued_waiter_frees_its_place() -> None:
    app = GatedApp()
    mw = ConcurrencyLimit(app, max_concurrent=1, max_queue=1, queue_timeout=10)
    async with anyio.create_task_group() as tg:
        tg.start_soon(mw, http_scope(), empty_receive, discard)
        await until(lambda: mw.in_flight == 1)
        with anyio.CancelScope() as waiter_scope:

            async def cancel_soon() -> None:
                await until(lambda: mw.queued == 1)
                waiter_scope.cancel()

            tg.start_soon(cancel_soon)
            await mw(http_scope(), empty_receive, discard)
        assert waiter_scope.cancelled_caught
        assert mw.queued == 0
        # Its place in the queue is free again: the next request queues, not 503.
        sent: list[int] = []

        async def record(message: Message) -> None:
            if message["type"] == "http.response.start":
                sent.append(message["status"])

        tg.start_soon(mw, http_scope(), empty_receive, record)
        await until(lambda: mw.queued == 1)
        app.gate.set()
    assert sent == [200]
    assert (mw.in_flight, mw.queued, mw.shed) == (0, 0, 0)


@pytest.mark.parametrize("cancel_first", [False, True], ids=["release-cancel", "cancel-release"])
@pytest.mark.parametrize("with_next_waiter", [False, True], ids=["alone", "next-waiting"])
async def test_waiter_cancelled_as_its_slot_is_handed_over_passes_it_on(
    with_next_waiter: bool, cancel_first: bool
) -> None:
    limiter = ConcurrencyLimiter(1, max_queue=2, queue_timeout=10)
    await limiter.acquire()
    got: list[str] = []

    async def wait_for_slot(name: str, scope: anyio.CancelScope) -> None:
        with scope:
            await limiter.acquire()
            got.append(name)
            limiter.release()

    first_scope = anyio.CancelScope()
    async with anyio.create_task_group() as tg:
        tg.start_soon(wait_for_slot, "first", first_scope)
        await until(lambda: limiter.queued == 1)
        if with_next_waiter:
            tg.start_soon(wait_for_slot, "second", anyio.CancelScope())
            await until(lambda: limiter.queued == 2)
        # No checkpoint between: the slot is handed to "first" as it is being cancelled,
        # before it can run. Whichever way it is resolved, the slot must not leak.
        if cancel_first:
            first_scope.cancel()
            limiter.release()
        else:
            limiter.release()
            first_scope.cancel()
    assert limiter.in_flight == 0
    assert limiter.queued == 0
    if with_next_waiter:
        assert "second" in got
    if cancel_first:
        assert "first" not in got


async def test_limiter_slot_primitive_without_asgi() -> None:
    limiter = ConcurrencyLimiter(2)
    async with limiter.slot(), limiter.slot():
        assert limiter.in_flight == 2
        with pytest.raises(Overloaded) as info:
            await limiter.acquire()
        assert info.value.headers == {"Retry-After": "1"}
    assert limiter.in_flight == 0
    with pytest.raises(KeyError):
        async with limiter.slot():
            raise KeyError("x")
    assert limiter.in_flight == 0
    assert limiter.shed == 1


async def test_app_errors_release_the_slot_and_propagate() -> None:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        raise RuntimeError("bug")

    mw = ConcurrencyLimit(app, max_concurrent=1)
    with pytest.raises(RuntimeError):
        await mw(http_scope(), empty_receive, discard)
    assert mw.in_flight == 0


async def test_non_http_scopes_pass_straight_through() -> None:
    app = GatedApp()
    app.gate.set()
    mw = ConcurrencyLimit(app, max_concurrent=1)
    await mw({"type": "lifespan", "path": "/x"}, empty_receive, discard)
    assert mw.admitted == 0


# --- adaptive limit ---------------------------------------------------------------------


def test_aimd_backs_off_multiplicatively_and_grows_additively() -> None:
    aimd = AIMDLimit(max_limit=20, min_limit=2, initial_limit=10, latency_threshold=1.0)
    assert aimd.on_sample(2.0, in_flight=10, dropped=False) == 9  # too slow
    assert aimd.on_sample(0.1, in_flight=9, dropped=True) == 8  # failed
    assert aimd.on_sample(0.1, in_flight=8, dropped=False) == 9  # fine and in use: +1
    assert aimd.on_sample(0.1, in_flight=1, dropped=False) == 9  # idle: no growth
    for _ in range(50):
        aimd.on_sample(5.0, in_flight=1, dropped=False)
    assert aimd.limit == 2
    for _ in range(50):
        aimd.on_sample(0.1, in_flight=aimd.limit, dropped=False)
    assert aimd.limit == 20


async def test_adaptive_limit_shrinks_under_slow_responses(clock: FakeClock) -> None:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        clock.advance(3.0 if scope["path"] == "/slow" else 0.01)
        status = 500 if scope["path"] == "/fail" else 200
        await send({"type": "http.response.start", "status": status, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    aimd = AIMDLimit(max_limit=100, initial_limit=10, latency_threshold=1.0, backoff_ratio=0.5)
    mw = ConcurrencyLimit(app, max_concurrent=8, adaptive=aimd, clock=clock)
    assert mw.limiter.limit == 8  # max_concurrent stays the ceiling
    await mw(http_scope("/slow"), empty_receive, discard)
    assert mw.limiter.limit == 5
    await mw(http_scope("/fail"), empty_receive, discard)
    assert mw.limiter.limit == 2
    await mw(http_scope("/fast"), empty_receive, discard)  # in use (1 of 2): grows
    assert mw.limiter.limit == 3


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"max_concurrent": 0}, "max_concurrent"),
        ({"max_concurrent": 1.5}, "max_concurrent"),
        ({"max_concurrent": True}, "max_concurrent"),
        ({"max_concurrent": 1, "max_queue": -1}, "max_queue"),
        ({"max_concurrent": 1, "queue_timeout": -1}, "queue_timeout"),
        ({"max_concurrent": 1, "queue_timeout": float("nan")}, "queue_timeout"),
        ({"max_concurrent": 1, "retry_after": float("inf")}, "retry_after"),
        ({"max_concurrent": 1, "exempt": "GET /healthz"}, "exempt"),
        ({"max_concurrent": 1, "exempt": ["GET healthz"]}, "route 'GET healthz'"),
        ({"max_concurrent": 1, "adaptive": 5}, "adaptive"),
    ],
)
def test_bad_config_fails_at_start_up(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        ConcurrencyLimit(GatedApp(), **kwargs)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"max_limit": 0}, "max_limit"),
        ({"max_limit": 5, "min_limit": 6}, "min_limit"),
        ({"max_limit": 5, "initial_limit": 6}, "initial_limit"),
        ({"max_limit": 5, "min_limit": 2, "initial_limit": 1}, "initial_limit"),
        ({"max_limit": 5, "backoff_ratio": 1}, "backoff_ratio"),
        ({"max_limit": 5, "backoff_ratio": 0}, "backoff_ratio"),
        ({"max_limit": 5, "latency_threshold": 0}, "latency_threshold"),
    ],
)
def test_bad_aimd_config_fails(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        AIMDLimit(**kwargs)
