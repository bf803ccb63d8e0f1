"""TimeoutMiddleware's deadline sweep on asyncio: no timer per request, and deadlines kept
across budgets (the semantics themselves are tests/test_timeout.py's, on both backends)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import anyio
import pytest

from asgi_armor._asgi import Message, Receive, Scope, Send
from asgi_armor.timeout import TimeoutMiddleware

SHORT = 0.05
LONG = 30.0


def _scope(path: str) -> Scope:
    return {"type": "http", "method": "GET", "path": path, "headers": []}


async def _receive() -> Message:
    return {"type": "http.request", "body": b"", "more_body": False}


async def app(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["path"] == "/slow":
        await anyio.sleep_forever()
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


async def _status(middleware: Any, path: str) -> int:
    sent: list[Message] = []

    async def send(message: Message) -> None:
        sent.append(message)

    await middleware(_scope(path), _receive, send)
    status: int = sent[0]["status"]
    return status


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_requests_share_one_timer(
    anyio_backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # asyncio.timeout_at per request scheduled (and cancelled) one loop timer each.
    loop = asyncio.get_running_loop()
    timers = 0
    call_at = loop.call_at

    def counting(*args: Any, **kwargs: Any) -> asyncio.TimerHandle:
        nonlocal timers
        timers += 1
        return call_at(*args, **kwargs)

    monkeypatch.setattr(loop, "call_at", counting)
    middleware = TimeoutMiddleware(app, default=LONG)
    for _ in range(200):
        assert await _status(middleware, "/fast") == 200
    assert timers <= 1
    async with anyio.create_task_group() as group:
        for _ in range(50):
            group.start_soon(_status, middleware, "/fast")
    assert timers <= 1


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_a_short_budget_behind_a_long_one_still_expires_on_time(anyio_backend: str) -> None:
    middleware = TimeoutMiddleware(app, routes={"GET /slow": SHORT}, default=LONG)
    results: list[int] = []

    async def run(path: str) -> None:
        results.append(await _status(middleware, path))

    async with anyio.create_task_group() as group:
        # A long-budget request in flight first: the sweep's timer is set for it.
        long_one = anyio.CancelScope()

        async def long_request() -> None:
            with long_one:
                await middleware(_scope("/slow-long"), _receive, _noop)

        group.start_soon(long_request)
        await anyio.sleep(0.01)
        started = time.monotonic()
        await run("/slow")
        elapsed = time.monotonic() - started
        long_one.cancel()
    assert results == [504]
    assert elapsed < SHORT + 1.0  # not LONG: the earlier deadline moved the timer


async def _noop(message: Message) -> None:
    if message["type"] == "http.response.start":
        await anyio.sleep_forever()


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_mixed_budgets_in_flight_each_get_their_own_answer(anyio_backend: str) -> None:
    # Requests of three budgets interleaved, half of them stuck: every stuck one is cut at
    # its own deadline (504), every other one answers (200), and none is cut twice or late.
    budgets = {"GET /slow": SHORT, "GET /slow2": 2 * SHORT, "GET /slow3": 3 * SHORT}

    async def mixed(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["path"].startswith("/slow"):
            await anyio.sleep_forever()
        await anyio.sleep(0.001)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    middleware = TimeoutMiddleware(mixed, routes=budgets, default=LONG)
    results: dict[str, list[tuple[int, float]]] = {}
    started = time.monotonic()

    async def run(path: str) -> None:
        status = await _status(middleware, path)
        results.setdefault(path, []).append((status, time.monotonic() - started))

    async with anyio.create_task_group() as group:
        for _ in range(20):
            for path in ("/slow3", "/fast", "/slow", "/slow2", "/fast"):
                group.start_soon(run, path)
    assert [status for status, _ in results["/fast"]] == [200] * 40
    for path, budget in (("/slow", SHORT), ("/slow2", 2 * SHORT), ("/slow3", 3 * SHORT)):
        assert [status for status, _ in results[path]] == [504] * 20
        # Not before its own budget (a loaded machine may be late, never early).
        assert min(elapsed for _, elapsed in results[path]) >= budget * 0.9
    # The sweep holds nothing once the requests are done.
    assert middleware._sweep is not None
    assert all(not queue for queue in middleware._sweep.queues.values())
