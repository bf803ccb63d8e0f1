"""with_timeout and TimeoutMiddleware, in process, on asyncio and trio."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import anyio
import anyio.lowlevel
import httpx
import pytest

from asgi_armor._asgi import Message, Receive, Scope, Send
from asgi_armor.errors import ConfigError, ErrorMiddleware, RequestTimeout
from asgi_armor.timeout import TimeoutMiddleware, remaining, with_timeout

if TYPE_CHECKING:
    from tests.conftest import FakeClock

pytestmark = pytest.mark.anyio

# Budgets that expire are tiny and their work sleeps forever, so the tests are quick and
# cannot be flaky; budgets that must not expire are huge.
SHORT = 0.05
LONG = 30.0


def client(app: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app, client=("1.2.3.4", 123)), base_url="http://t"
    )


def http_scope(method: str = "GET", path: str = "/", **extra: Any) -> Scope:
    return {"type": "http", "method": method, "path": path, "headers": [], **extra}


class Recorder:
    def __init__(self) -> None:
        self.messages: list[Message] = []

    async def __call__(self, message: Message) -> None:
        self.messages.append(message)

    def starts(self) -> list[Message]:
        return [m for m in self.messages if m["type"] == "http.response.start"]


async def empty_receive() -> Message:
    return {"type": "http.request", "body": b"", "more_body": False}


async def ok(send: Send, body: bytes = b"ok") -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": body})


# --- with_timeout ---------------------------------------------------------------------


async def test_with_timeout_returns_the_result_of_an_awaitable_or_a_callable() -> None:
    async def work() -> int:
        await anyio.lowlevel.checkpoint()
        return 42

    assert await with_timeout(work(), LONG) == 42
    assert await with_timeout(work, LONG) == 42
    assert await with_timeout(work, None) == 42


async def test_with_timeout_expired_raises_request_timeout_after_cleanup() -> None:
    cleaned = False

    async def slow() -> None:
        nonlocal cleaned
        try:
            await anyio.sleep_forever()
        finally:
            cleaned = True

    with pytest.raises(RequestTimeout) as info:
        await with_timeout(slow, SHORT)
    assert cleaned
    assert info.value.status == 504
    assert info.value.error == "timeout"
    assert info.value.message == "Request timed out after 0.05s"
    assert str(RequestTimeout(5)) == "Request timed out after 5s"


async def test_with_timeout_zero_or_negative_means_already_expired() -> None:
    with pytest.raises(RequestTimeout):
        await with_timeout(anyio.sleep_forever, 0)
    with pytest.raises(RequestTimeout):
        await with_timeout(anyio.sleep_forever, -1)


async def test_with_timeout_rejects_nan() -> None:
    with pytest.raises(ValueError, match="NaN"):
        await with_timeout(anyio.sleep_forever, float("nan"))


async def test_with_timeout_does_not_swallow_an_outer_cancellation() -> None:
    reached_after = False
    with anyio.move_on_after(SHORT) as outer:
        await with_timeout(anyio.sleep_forever, LONG)
        reached_after = True
    assert outer.cancelled_caught
    assert not reached_after

    with anyio.CancelScope() as explicit:
        explicit.cancel()
        await with_timeout(anyio.sleep_forever, LONG)
        reached_after = True
    assert explicit.cancelled_caught
    assert not reached_after


async def test_with_timeout_passes_the_works_own_timeout_error_through() -> None:
    async def inner_timeout() -> None:
        raise TimeoutError("from a client library")

    with pytest.raises(TimeoutError, match="client library"):
        await with_timeout(inner_timeout, LONG)


async def test_with_timeout_passes_other_exceptions_through() -> None:
    async def boom() -> None:
        raise KeyError("x")

    with pytest.raises(KeyError):
        await with_timeout(boom, LONG)


# --- TimeoutMiddleware over HTTP --------------------------------------------------------


def timed_app(events: list[str]) -> Any:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        path = scope["path"]
        events.append(f"start {path}")
        try:
            if path == "/slow":
                await anyio.sleep_forever()
            if path == "/untimed":
                await anyio.sleep(SHORT * 3)
            await ok(send, repr(scope["state"].get("deadline") is not None).encode())
        finally:
            events.append(f"finally {path}")

    return app


async def test_fast_route_passes() -> None:
    events: list[str] = []
    app = ErrorMiddleware(TimeoutMiddleware(timed_app(events), routes={"GET /fast": LONG}))
    async with client(app) as c:
        response = await c.get("/fast")
    assert response.status_code == 200
    assert response.text == "True"
    assert events == ["start /fast", "finally /fast"]


async def test_slow_route_gets_504_envelope_and_the_app_is_cancelled_not_abandoned() -> None:
    events: list[str] = []
    app = ErrorMiddleware(TimeoutMiddleware(timed_app(events), routes={"GET /slow": SHORT}))
    async with client(app) as c:
        with anyio.fail_after(5):
            response = await c.get("/slow", headers={"X-Request-ID": "req-abc"})
    assert response.status_code == 504
    assert response.headers["x-request-id"] == "req-abc"
    assert response.headers["content-type"] == "application/json"
    assert response.json() == {
        "error": "timeout",
        "message": "Request timed out after 0.05s",
        "details": [],
        "request_id": "req-abc",
    }
    assert events == ["start /slow", "finally /slow"]


async def test_routes_without_budget_are_untouched() -> None:
    events: list[str] = []
    app = ErrorMiddleware(TimeoutMiddleware(timed_app(events), routes=[("GET /slow", SHORT)]))
    async with client(app) as c:
        response = await c.get("/untimed")
    # It ran longer than the /slow budget and kept no deadline.
    assert response.status_code == 200
    assert response.text == "False"


async def test_default_budget_applies_to_unmatched_routes() -> None:
    events: list[str] = []
    app = ErrorMiddleware(
        TimeoutMiddleware(timed_app(events), routes={"GET /untimed": LONG}, default=SHORT)
    )
    async with client(app) as c:
        assert (await c.get("/untimed")).status_code == 200
        assert (await c.get("/slow")).status_code == 504


def test_first_matching_route_wins() -> None:
    mw = TimeoutMiddleware(
        timed_app([]),
        routes=[("GET /api/search", 5), ("* /api/*", 30), ("GET /api/search", 1)],
        default=60,
    )
    assert mw.budget_for("GET", "/api/search") == 5
    assert mw.budget_for("POST", "/api/search") == 30
    assert mw.budget_for("GET", "/other") == 60
    assert TimeoutMiddleware(timed_app([])).budget_for("GET", "/") is None


# --- TimeoutMiddleware, raw ASGI --------------------------------------------------------


async def test_timeout_504_goes_through_send_so_outer_layers_see_a_5xx() -> None:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await anyio.sleep_forever()

    sent = Recorder()
    await TimeoutMiddleware(app, default=SHORT)(http_scope(), empty_receive, sent)
    assert [m["status"] for m in sent.starts()] == [504]
    assert sent.messages[-1]["type"] == "http.response.body"
    assert not sent.messages[-1].get("more_body", False)


async def test_stalled_stream_is_aborted_with_one_start_and_no_complete_body() -> None:
    finally_ran = False

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        nonlocal finally_ran
        try:
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"part 1", "more_body": True})
            await anyio.sleep_forever()
        finally:
            finally_ran = True

    sent = Recorder()
    wrapped = ErrorMiddleware(TimeoutMiddleware(app, default=SHORT))
    with pytest.raises(RequestTimeout):
        await wrapped(http_scope(), empty_receive, sent)
    assert finally_ran
    assert len(sent.starts()) == 1
    bodies = [m for m in sent.messages if m["type"] == "http.response.body"]
    assert all(m.get("more_body", False) for m in bodies)


async def test_work_after_a_complete_response_is_cut_short_silently() -> None:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await ok(send)
        await anyio.sleep_forever()  # e.g. post-response bookkeeping that hangs

    sent = Recorder()
    await TimeoutMiddleware(app, default=SHORT)(http_scope(), empty_receive, sent)
    assert [m["status"] for m in sent.starts()] == [200]


async def test_a_slow_request_body_is_bounded_too() -> None:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await receive()
        await ok(send)

    async def trickling_receive() -> Message:
        await anyio.sleep_forever()
        raise AssertionError("unreachable")

    sent = Recorder()
    await TimeoutMiddleware(app, default=SHORT)(http_scope("POST"), trickling_receive, sent)
    assert [m["status"] for m in sent.starts()] == [504]


async def test_deadline_and_remaining_in_scope_state(clock: FakeClock) -> None:
    seen: dict[str, Any] = {}

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        seen["deadline"] = scope["state"]["deadline"]
        seen["remaining"] = remaining(scope)
        clock.advance(2)
        seen["later"] = remaining(scope)
        clock.advance(10)
        seen["past"] = remaining(scope)
        await ok(send)

    mw = TimeoutMiddleware(app, routes={"GET /": 5}, clock=clock)
    await mw(http_scope(), empty_receive, Recorder())
    assert seen == {"deadline": 1005.0, "remaining": 5.0, "later": 3.0, "past": 0.0}
    assert remaining(http_scope()) is None


async def test_default_deadline_is_on_the_anyio_clock_for_inner_cancel_scopes() -> None:
    seen: dict[str, Any] = {}

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        deadline = scope["state"]["deadline"]
        seen["left"] = deadline - anyio.current_time()
        # Budget an inner call to end SHORT after start: only works if the stored deadline
        # is on the clock cancel scopes use (trio's clock has a random offset).
        with anyio.CancelScope(deadline=deadline - 1.0 + SHORT) as inner:
            await anyio.sleep_forever()
        seen["inner_expired"] = inner.cancelled_caught
        await ok(send)

    sent = Recorder()
    await TimeoutMiddleware(app, default=1.0)(http_scope(), empty_receive, sent)
    assert 0.5 < seen["left"] <= 1.0
    assert seen["inner_expired"] is True
    assert [m["status"] for m in sent.starts()] == [200]


async def test_an_outer_tighter_deadline_is_kept(clock: FakeClock) -> None:
    seen: list[float] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        seen.append(scope["state"]["deadline"])
        await ok(send)

    inner = TimeoutMiddleware(app, default=10, clock=clock)
    outer = TimeoutMiddleware(inner, default=3, clock=clock)
    await outer(http_scope(), empty_receive, Recorder())
    assert seen == [1003.0]


async def test_an_outer_cancellation_is_not_turned_into_a_504() -> None:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await anyio.sleep_forever()

    sent = Recorder()
    with anyio.move_on_after(SHORT) as outer:
        await TimeoutMiddleware(app, default=LONG)(http_scope(), empty_receive, sent)
    assert outer.cancelled_caught
    assert sent.messages == []


async def test_cleanup_failing_during_timeout_still_answers_504(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await anyio.sleep_forever()
        finally:
            raise RuntimeError("cleanup failed")

    sent = Recorder()
    with caplog.at_level(logging.WARNING, logger="asgi_armor"):
        await TimeoutMiddleware(app, default=SHORT)(http_scope(), empty_receive, sent)
    assert [m["status"] for m in sent.starts()] == [504]
    assert "timed out request" in caplog.text


async def test_app_errors_without_timeout_propagate() -> None:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        raise RuntimeError("bug")

    with pytest.raises(RuntimeError, match="bug"):
        await TimeoutMiddleware(app, default=LONG)(http_scope(), empty_receive, Recorder())


async def test_non_http_scopes_pass_straight_through() -> None:
    seen: list[str] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await anyio.sleep(SHORT * 2)
        seen.append(scope["type"])

    await TimeoutMiddleware(app, default=SHORT)({"type": "lifespan"}, empty_receive, Recorder())
    assert seen == ["lifespan"]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"routes": {"GET /x": 0}}, "timeout 'GET /x'"),
        ({"routes": {"GET /x": -1}}, "timeout 'GET /x'"),
        ({"routes": {"GET /x": float("inf")}}, "timeout 'GET /x'"),
        ({"routes": {"GET /x": "5"}}, "not a number"),
        ({"routes": [("GET /x", 1, 2)]}, "not a \\(route, seconds\\) pair"),
        ({"routes": {"GET x": 1}}, "route 'GET x'"),
        ({"default": 0}, "timeout default"),
    ],
)
def test_bad_config_fails_at_start_up(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        TimeoutMiddleware(timed_app([]), **kwargs)


@pytest.mark.parametrize(("outer_budget", "inner_budget"), [(3, 10), (10, 3), (3, 3)])
async def test_nested_budgets_tell_the_app_the_tightest(
    clock: FakeClock, outer_budget: float, inner_budget: float
) -> None:
    """Whichever layer is tighter, outer or inner, is the budget the app sees."""
    seen: list[tuple[float, float | None]] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        seen.append((scope["state"]["deadline"], remaining(scope)))
        await ok(send)

    inner = TimeoutMiddleware(app, default=inner_budget, clock=clock)
    outer = TimeoutMiddleware(inner, default=outer_budget, clock=clock)
    await outer(http_scope(), empty_receive, Recorder())
    tightest = min(outer_budget, inner_budget)
    assert seen == [(1000.0 + tightest, tightest)]


async def test_nested_budgets_cut_at_the_inner_deadline_when_it_is_tighter() -> None:
    """The inner, tighter layer answers the 504, naming its own budget, and the app's
    cancel scope built from the stored deadline fires with it."""
    events: list[str] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        left = remaining(scope)
        assert left is not None
        events.append("short" if left <= SHORT else "long")
        await anyio.sleep(LONG)

    stack = ErrorMiddleware(TimeoutMiddleware(TimeoutMiddleware(app, default=SHORT), default=LONG))
    async with client(stack) as c:
        response = await c.get("/")
    assert response.status_code == 504
    assert response.json()["message"] == f"Request timed out after {SHORT:g}s"
    assert events == ["short"]
