"""gather_partial: concurrent components, each with its own timeout and fallback."""

from __future__ import annotations

import inspect
import logging
import time
from typing import Any

import anyio
import msgspec
import pytest

from asgi_armor.breaker import CircuitBreaker
from asgi_armor.degrade import Component, ComponentError, Partial, gather_partial
from asgi_armor.errors import CircuitOpenError, ConfigError

pytestmark = pytest.mark.anyio


async def fetch_user() -> dict[str, Any]:
    await anyio.lowlevel.checkpoint()
    return {"id": 1, "name": "Ada"}


async def fetch_notifications() -> list[str]:
    await anyio.lowlevel.checkpoint()
    return ["welcome"]


async def broken() -> list[str]:
    await anyio.lowlevel.checkpoint()
    raise RuntimeError("connection refused to 10.0.0.7:5432")


async def hangs() -> list[str]:
    await anyio.sleep_forever()
    raise AssertionError("unreachable")


async def test_all_components_ok() -> None:
    result = await gather_partial(
        {"user": (fetch_user, None), "notifications": (fetch_notifications, [])}
    )
    assert result == Partial(
        data={"user": {"id": 1, "name": "Ada"}, "notifications": ["welcome"]},
        partial=False,
        errors=[],
    )
    assert msgspec.json.encode(result) == (
        b'{"data":{"user":{"id":1,"name":"Ada"},"notifications":["welcome"]},'
        b'"partial":false,"errors":[]}'
    )


async def test_a_failing_component_takes_its_fallback(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="asgi_armor"):
        result = await gather_partial(
            {"user": (fetch_user, None), "notifications": (broken, [])}, timeout=1.0
        )
    assert result.data == {"user": {"id": 1, "name": "Ada"}, "notifications": []}
    assert result.partial is True
    assert result.errors == [ComponentError("notifications")]
    encoded = msgspec.json.encode(result)
    assert encoded == (
        b'{"data":{"user":{"id":1,"name":"Ada"},"notifications":[]},"partial":true,'
        b'"errors":[{"component":"notifications","error":"unavailable"}]}'
    )
    assert b"10.0.0.7" not in encoded  # the cause is logged, never returned
    assert "10.0.0.7" in caplog.text
    assert "'notifications' unavailable" in caplog.text


async def test_a_slow_component_times_out(caplog: pytest.LogCaptureFixture) -> None:
    start = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="asgi_armor"):
        result = await gather_partial(
            {"user": (fetch_user, None), "notifications": (hangs, [])}, timeout=0.05
        )
    assert time.monotonic() - start < 0.4
    assert result.data == {"user": {"id": 1, "name": "Ada"}, "notifications": []}
    assert result.errors == [ComponentError("notifications", "unavailable")]
    assert "no answer within 0.05s" in caplog.text


async def test_per_component_timeout_overrides_the_default() -> None:
    async def takes_a_while() -> str:
        await anyio.sleep(0.05)
        return "done"

    result = await gather_partial(
        {
            "patient": (takes_a_while, "fallback", 1.0),
            "impatient": (takes_a_while, "fallback", 0.01),
            "unlimited": (takes_a_while, "fallback", None),
        },
        timeout=0.01,
    )
    assert result.data == {"patient": "done", "impatient": "fallback", "unlimited": "done"}
    assert result.errors == [ComponentError("impatient")]


async def test_an_open_circuit_is_unavailable_at_once() -> None:
    breaker = CircuitBreaker(fail_max=1, reset_timeout=30, name="notifications")
    with pytest.raises(RuntimeError):
        await breaker.call(broken)
    calls = 0

    @breaker
    async def guarded() -> list[str]:
        nonlocal calls
        calls += 1
        return await fetch_notifications()

    start = time.monotonic()
    result = await gather_partial(
        {"user": (fetch_user, None), "notifications": (guarded, [])}, timeout=5.0
    )
    assert time.monotonic() - start < 0.4
    assert calls == 0
    assert result.data["notifications"] == []
    assert result.errors == [ComponentError("notifications")]


async def test_circuit_open_error_raised_directly(caplog: pytest.LogCaptureFixture) -> None:
    async def rejected() -> None:
        await anyio.lowlevel.checkpoint()
        raise CircuitOpenError(12.0, name="search")

    with caplog.at_level(logging.WARNING, logger="asgi_armor"):
        result = await gather_partial({"search": (rejected, None)})
    assert result == Partial(data={"search": None}, partial=True, errors=[ComponentError("search")])
    assert "circuit breaker 'search' open" in caplog.text


async def test_every_kind_of_failure_together() -> None:
    breaker = CircuitBreaker(fail_max=1, reset_timeout=30)
    with pytest.raises(RuntimeError):
        await breaker.call(broken)

    result = await gather_partial(
        {
            "ok": (fetch_user, None),
            "failed": (broken, []),
            "slow": (hangs, []),
            "open": (breaker(fetch_notifications), []),
        },
        timeout=0.05,
    )
    assert msgspec.json.decode(msgspec.json.encode(result)) == {
        "data": {"ok": {"id": 1, "name": "Ada"}, "failed": [], "slow": [], "open": []},
        "partial": True,
        "errors": [
            {"component": "failed", "error": "unavailable"},
            {"component": "slow", "error": "unavailable"},
            {"component": "open", "error": "unavailable"},
        ],
    }


async def test_components_run_concurrently() -> None:
    """Each component waits until all five have started: run one after another, the first
    would wait out its timeout and fall back. No wall clock involved."""
    started = 0
    all_started = anyio.Event()

    async def waits_for_the_others(index: int) -> int:
        nonlocal started
        started += 1
        if started == 5:
            all_started.set()
        await all_started.wait()
        return index

    def component(index: int) -> Any:
        return (lambda: waits_for_the_others(index), None)

    with anyio.fail_after(10):
        result = await gather_partial({f"c{i}": component(i) for i in range(5)}, timeout=5.0)
    assert result.data == {f"c{i}": i for i in range(5)}
    assert not result.partial


async def test_awaitables_and_sync_functions_are_components() -> None:
    result = await gather_partial(
        {
            "coroutine": (fetch_notifications(), []),
            "sync": (lambda: 42, 0),
            "sync_fails": (lambda: 1 // 0, -1),
        }
    )
    assert result.data == {"coroutine": ["welcome"], "sync": 42, "sync_fails": -1}
    assert result.errors == [ComponentError("sync_fails")]


async def test_caller_cancellation_propagates() -> None:
    finished = False
    cancelled_components = 0

    async def component() -> None:
        nonlocal cancelled_components
        try:
            await anyio.sleep_forever()
        except anyio.get_cancelled_exc_class():
            cancelled_components += 1
            raise

    start = time.monotonic()
    with anyio.move_on_after(0.05) as scope:
        await gather_partial({"a": (component, None), "b": (component, None)}, timeout=5.0)
        finished = True
    assert scope.cancelled_caught
    assert not finished
    assert cancelled_components == 2
    assert time.monotonic() - start < 0.4


async def test_cancelled_before_start_leaves_no_unawaited_coroutine() -> None:
    # filterwarnings=error turns "coroutine ... was never awaited" into a failure.
    with anyio.CancelScope() as scope:
        scope.cancel()
        await gather_partial({"a": (fetch_user(), None), "b": (fetch_notifications(), [])})
    assert scope.cancelled_caught


async def test_empty_components() -> None:
    result = await gather_partial({})
    assert msgspec.json.encode(result) == b'{"data":{},"partial":false,"errors":[]}'


@pytest.mark.parametrize(
    ("component", "message"),
    [
        ((fetch_user,), "must be \\(fn, fallback\\)"),
        ((fetch_user, None, 1.0, "x"), "must be \\(fn, fallback\\)"),
        ([fetch_user, None], "must be \\(fn, fallback\\)"),
        ((42, None), "neither callable nor awaitable"),
        ((fetch_user, None, 0), "timeout must be a positive number"),
        ((fetch_user, None, -1.0), "timeout must be a positive number"),
        ((fetch_user, None, "1"), "timeout must be a positive number"),
        ((fetch_user, None, float("nan")), "timeout must be a positive number"),
    ],
)
async def test_malformed_components_fail_before_anything_runs(component: Any, message: str) -> None:
    ran = False

    async def should_not_run() -> None:
        nonlocal ran
        ran = True

    components: dict[str, Component] = {"first": (should_not_run, None), "bad": component}
    with pytest.raises(ConfigError, match=f"component 'bad'.*{message}"):
        await gather_partial(components)
    assert not ran


async def test_default_timeout_is_validated() -> None:
    with pytest.raises(ConfigError, match="timeout must be a positive number"):
        await gather_partial({"a": (fetch_user, None)}, timeout=0)


async def test_malformed_component_closes_the_coroutines_it_was_given() -> None:
    coroutine = fetch_user()
    components: dict[str, Any] = {"user": (coroutine, None), "bad": (fetch_user,)}
    with pytest.raises(ConfigError):
        await gather_partial(components)
    assert inspect.getcoroutinestate(coroutine) == "CORO_CLOSED"
