"""ConcurrencyLimit under a real uvicorn and a loopback burst: bounded, fast to shed, no leak."""

from __future__ import annotations

import asyncio
import gc
import time
import tracemalloc
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple

import httpx
import pytest

from asgi_armor._asgi import Message, Receive, Scope, Send
from asgi_armor.errors import ErrorMiddleware
from asgi_armor.shedding import ConcurrencyLimit

if TYPE_CHECKING:
    from tests.integration.conftest import Served

pytestmark = pytest.mark.anyio

N = 4
CLIENTS = 10 * N
MEASURED_WAVES = 2
MEMORY_WAVES = 3  # CLIENTS * (2 + 3) = 200 requests
HANDLER_SECONDS = 0.2


class ServerTiming:
    """Outermost layer: how long the server took to start answering /work, per status."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.seconds: dict[int, list[float]] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        start = time.monotonic()

        async def timed_send(message: Message) -> None:
            if message["type"] == "http.response.start" and scope["path"] == "/work":
                elapsed = time.monotonic() - start
                self.seconds.setdefault(message["status"], []).append(elapsed)
            await send(message)

        await self.app(scope, receive, timed_send)


class Result(NamedTuple):
    status: int
    seconds: float
    error: str | None
    retry_after: str | None
    request_id: str | None


class CountingApp:
    """/work takes HANDLER_SECONDS and records how many run at once; /healthz is instant."""

    def __init__(self) -> None:
        self.running = 0
        self.peak = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["path"] != "/healthz":
            self.running += 1
            self.peak = max(self.peak, self.running)
            try:
                await asyncio.sleep(HANDLER_SECONDS)
            finally:
                self.running -= 1
        body = b'{"ok":true}'
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"application/json")],
            }
        )
        await send({"type": "http.response.body", "body": body})


async def timed_get(client: httpx.AsyncClient, path: str) -> Result:
    start = time.monotonic()
    response = await client.get(path)
    seconds = time.monotonic() - start
    error = response.json().get("error") if response.status_code >= 400 else None
    return Result(
        response.status_code,
        seconds,
        error,
        response.headers.get("retry-after"),
        response.headers.get("x-request-id"),
    )


async def burst(client: httpx.AsyncClient) -> list[Result]:
    return await asyncio.gather(*(timed_get(client, "/work") for _ in range(CLIENTS)))


def median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]


async def test_burst_is_bounded_shed_fast_and_leaves_no_trace(
    asyncio_only: None, running_server: Callable[..., Any]
) -> None:
    app = CountingApp()
    limit = ConcurrencyLimit(app, max_concurrent=N, max_queue=0, retry_after=1)
    timing = ServerTiming(ErrorMiddleware(limit))
    results: list[Result] = []
    memory_statuses: list[int] = []
    health: list[Result] = []
    bursting = True

    async def poll_health(client: httpx.AsyncClient) -> None:
        while bursting:
            health.append(await timed_get(client, "/healthz"))
            await asyncio.sleep(0.02)

    served: Served
    with running_server(timing) as served:
        limits = httpx.Limits(max_connections=CLIENTS + 5, max_keepalive_connections=CLIENTS + 5)
        async with (
            httpx.AsyncClient(base_url=served.url, limits=limits, timeout=10) as client,
            httpx.AsyncClient(base_url=served.url, timeout=10) as health_client,
        ):
            started = time.monotonic()
            poller = asyncio.ensure_future(poll_health(health_client))
            # Measured waves; they also warm up connections, pools and caches.
            for _ in range(MEASURED_WAVES):
                results += await burst(client)
            bursting = False
            await poller
            # Memory waves: only statuses are kept, so what stays allocated is the stack's.
            # The first traced wave replaces per-connection objects allocated before
            # tracing began (timers, events); growth is measured over the next two.
            gc.collect()
            tracemalloc.start()
            try:
                for wave in range(MEMORY_WAVES):
                    memory_statuses.extend(r.status for r in await burst(client))
                    gc.collect()
                    if wave == 0:
                        before = tracemalloc.get_traced_memory()[0]
                        objects_before = len(gc.get_objects())
                after = tracemalloc.get_traced_memory()[0]
                objects_after = len(gc.get_objects())
            finally:
                tracemalloc.stop()
            elapsed = time.monotonic() - started

        while served.tasks():  # only the last requests' tasks, finishing
            await asyncio.sleep(0.02)
            assert time.monotonic() - started < 20, served.tasks()

    ok = [r for r in results if r.status == 200]
    shed = [r for r in results if r.status == 503]
    assert len(results) + len(memory_statuses) == 200
    statuses = {r.status for r in results} | set(memory_statuses)
    assert statuses <= {200, 503}, sorted(statuses)  # no 500s, nothing else
    # Never more than N in the app, measured inside it; and the limit was reached.
    assert app.peak == N
    assert limit.max_seen == N
    assert len(ok) >= N * MEASURED_WAVES
    assert limit.admitted == len(ok) + memory_statuses.count(200)
    assert limit.shed == len(shed) + memory_statuses.count(503)
    assert shed
    assert (limit.in_flight, limit.queued) == (0, 0)
    for r in shed:
        assert (r.error, r.retry_after) == ("overloaded", "1")
        assert r.request_id
    # Shed requests are answered at once by the server, not after waiting for a slot.
    server_shed = timing.seconds[503]
    assert median(server_shed) < 0.02, sorted(server_shed)
    assert max(server_shed) < 0.5, sorted(server_shed)
    assert min(timing.seconds[200]) >= HANDLER_SECONDS
    # and, seen from the clients, faster than the admitted ones.
    assert median([r.seconds for r in shed]) < median([r.seconds for r in ok])
    # The exempt health check kept answering during the burst.
    assert len(health) >= 5
    assert all(r.status == 200 for r in health)
    assert max(r.seconds for r in health) < 1.5
    assert elapsed < 15
    # After 80 more requests, memory and live objects are where they were, within the
    # noise of keep-alive timers and pools (about +-200 KiB and +-100 objects here): a
    # leak of a few KiB, or a few objects, per request would show.
    assert after - before < 512 * 1024, f"grew by {after - before} bytes"
    assert objects_after - objects_before < 400, objects_after - objects_before
