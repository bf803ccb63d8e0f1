"""CircuitBreaker: the pure core's transitions, and the async-with / decorator / call façades."""

from __future__ import annotations

import contextvars
import inspect
import logging
import math
import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, assert_type

import anyio
import httpx
import msgspec
import pytest

from asgi_armor._asgi import Receive, Scope, Send, send_json
from asgi_armor.breaker import BreakerState, BreakerStats, CircuitBreaker, CircuitOpenError
from asgi_armor.errors import ConfigError, ErrorMiddleware
from tests.conftest import FakeClock

CLOSED, OPEN, HALF_OPEN = BreakerState.CLOSED, BreakerState.OPEN, BreakerState.HALF_OPEN


class Boom(Exception):
    pass


class NotFoundError(Exception):
    pass


Transition = tuple[BreakerState, BreakerState]


def recorder() -> tuple[
    list[Transition], Callable[[CircuitBreaker, BreakerState, BreakerState], None]
]:
    seen: list[Transition] = []

    def listener(breaker: CircuitBreaker, old: BreakerState, new: BreakerState) -> None:
        seen.append((old, new))

    return seen, listener


def fail(breaker: CircuitBreaker, now: float, times: int = 1) -> None:
    for _ in range(times):
        epoch = breaker.acquire(now)
        breaker.record_failure(now, epoch=epoch)


def succeed(breaker: CircuitBreaker, now: float, duration: float = 0.0) -> None:
    epoch = breaker.acquire(now)
    breaker.record_success(now, duration, epoch=epoch)


# --------------------------------------------------------------------------- configuration


@pytest.mark.parametrize(
    ("kwargs", "entry"),
    [
        ({"fail_max": 0}, "fail_max"),
        ({"fail_max": True}, "fail_max"),
        ({"reset_timeout": -1}, "reset_timeout"),
        ({"reset_timeout": math.nan}, "reset_timeout"),
        ({"reset_timeout": math.inf}, "reset_timeout"),
        ({"failure_rate_threshold": 0.0}, "failure_rate_threshold"),
        ({"failure_rate_threshold": 1.5}, "failure_rate_threshold"),
        ({"fail_max": None}, "fail_max=None"),
        ({"window_size": 0}, "window_size"),
        ({"minimum_calls": 0}, "minimum_calls"),
        ({"window_size": 5, "minimum_calls": 6}, "minimum_calls"),
        ({"slow_call_seconds": 0}, "slow_call_seconds"),
        ({"half_open_max_calls": 0}, "half_open_max_calls"),
        ({"exclude": (KeyError, "nope")}, "exclude"),
    ],
)
@pytest.mark.parametrize("name", ["db", ""])
def test_bad_config_names_the_entry(kwargs: dict[str, Any], entry: str, name: str) -> None:
    where = f"CircuitBreaker({name!r})" if name else "CircuitBreaker"
    with pytest.raises(ConfigError, match=rf"^{re.escape(where)}: .*{re.escape(entry)}"):
        CircuitBreaker(name=name, **kwargs)


def test_bare_exclude_type_is_accepted(clock: FakeClock) -> None:
    breaker = CircuitBreaker(1, exclude=KeyError, clock=clock)  # type: ignore[arg-type]

    @breaker
    def lookup() -> None:
        raise KeyError("x")

    with pytest.raises(KeyError):
        lookup()
    assert breaker.state is CLOSED


def test_state_values() -> None:
    assert [s.value for s in BreakerState] == ["closed", "open", "half_open"]


# --------------------------------------------------------------------------- the pure core


def test_every_transition(clock: FakeClock) -> None:
    seen, listener = recorder()
    breaker = CircuitBreaker(fail_max=3, reset_timeout=10, listeners=[listener], clock=clock)
    now = clock()
    assert breaker.state_at(now) is CLOSED
    fail(breaker, now, 2)
    assert breaker.state_at(now) is CLOSED
    fail(breaker, now)  # the third consecutive failure opens
    assert breaker.state_at(now) is OPEN
    assert not breaker.allow(now + 9.999)
    assert breaker.state_at(now + 10) is HALF_OPEN  # lazily, from the clock
    epoch = breaker.acquire(now + 10)
    breaker.record_failure(now + 10, epoch=epoch)  # trial failure: open again, new timeout
    assert breaker.state_at(now + 19) is OPEN
    assert breaker.retry_after(now + 19) == 1
    assert breaker.state_at(now + 20) is HALF_OPEN
    succeed(breaker, now + 20)  # trial success: closed
    assert breaker.state_at(now + 20) is CLOSED
    assert seen == [
        (CLOSED, OPEN),
        (OPEN, HALF_OPEN),
        (HALF_OPEN, OPEN),
        (OPEN, HALF_OPEN),
        (HALF_OPEN, CLOSED),
    ]
    assert breaker.stats.state_changes == 5


def test_success_resets_the_consecutive_count(clock: FakeClock) -> None:
    breaker = CircuitBreaker(fail_max=3, clock=clock)
    now = clock()
    for _ in range(5):
        fail(breaker, now, 2)
        succeed(breaker, now)
    assert breaker.state_at(now) is CLOSED
    assert breaker.stats.consecutive_failures == 0
    fail(breaker, now, 3)
    assert breaker.state_at(now) is OPEN


def test_open_rejects_with_honest_retry_after(clock: FakeClock) -> None:
    breaker = CircuitBreaker(fail_max=1, reset_timeout=30, name="db", clock=clock)
    fail(breaker, clock())
    clock.advance(12.5)
    with pytest.raises(CircuitOpenError) as info:
        breaker.acquire(clock())
    assert info.value.retry_after == 17.5
    assert info.value.name == "db"
    assert info.value.status == 503
    assert info.value.error == "service_unavailable"
    assert info.value.headers == {"Retry-After": "18"}
    # Waiting exactly retry_after gets the caller in, as the trial.
    clock.advance(info.value.retry_after)
    assert breaker.allow(clock())
    assert breaker.state is HALF_OPEN


def _rounding_cases() -> list[tuple[float, float]]:
    """(now, deadline) pairs where ``now + (deadline - now)`` falls one ulp short.

    With round-half-even this happens only when the subtraction is inexact (``now`` below
    half the deadline) and lands exactly on a tie: ``now`` an odd multiple of half the
    deadline's ulp, the deadline's last mantissa bit odd.
    """
    cases = []
    for deadline in (math.nextafter(1.0, 2.0), 30.0 + 2**-48, 4.0 + 2**-50 * 3, 0.75 + 2**-53):
        half_ulp = math.ulp(deadline) / 2
        for k in range(1, 40, 2):
            now = half_ulp * k
            if now + (deadline - now) < deadline:
                cases.append((now, deadline))
    return cases


def test_retry_after_reaches_the_deadline_despite_rounding() -> None:
    """Waiting exactly ``retry_after`` gets a caller in, even where the float subtraction
    behind it rounds down."""
    cases = _rounding_cases()
    assert len(cases) >= 4, cases
    for now, deadline in cases:
        clock = FakeClock(0.0)
        breaker = CircuitBreaker(fail_max=1, reset_timeout=deadline, clock=clock)
        fail(breaker, 0.0)
        wait = breaker.retry_after(now)
        assert wait > 0
        with pytest.raises(CircuitOpenError) as info:
            breaker.acquire(now)
        assert info.value.retry_after == wait
        assert breaker.state_at(now + wait) is HALF_OPEN, (now, deadline, wait)


@pytest.mark.parametrize(("opened_at", "reset_timeout"), [(0.1, 1030.7), (1e9 + 0.3, 0.7)])
def test_retry_after_reaches_the_deadline_at_ordinary_times(
    opened_at: float, reset_timeout: float
) -> None:
    for now in (opened_at, opened_at + 0.01, opened_at + reset_timeout / 3):
        breaker = CircuitBreaker(fail_max=1, reset_timeout=reset_timeout)
        fail(breaker, opened_at)
        wait = breaker.retry_after(now)
        assert wait > 0
        assert breaker.state_at(now + wait) is HALF_OPEN


def test_rate_window_trips(clock: FakeClock) -> None:
    breaker = CircuitBreaker(
        fail_max=None, failure_rate_threshold=0.5, window_size=4, minimum_calls=4, clock=clock
    )
    now = clock()
    # Under minimum_calls nothing trips, even at 100% failures.
    fail(breaker, now, 3)
    assert breaker.state_at(now) is CLOSED
    # The call that fills the window to minimum_calls trips it, even a success: F F F S.
    succeed(breaker, now)
    assert breaker.state_at(now) is OPEN


def test_rate_below_threshold_does_not_trip(clock: FakeClock) -> None:
    breaker = CircuitBreaker(
        fail_max=None, failure_rate_threshold=0.75, window_size=4, minimum_calls=4, clock=clock
    )
    now = clock()
    fail(breaker, now, 2)
    succeed(breaker, now)
    succeed(breaker, now)  # F F S S: 50% < 75%
    fail(breaker, now)  # F S S F: 50%
    assert breaker.state_at(now) is CLOSED
    fail(breaker, now)  # S S F F: 50%
    fail(breaker, now)  # S F F F: 75%
    assert breaker.state_at(now) is OPEN


def test_rate_window_slides(clock: FakeClock) -> None:
    breaker = CircuitBreaker(
        fail_max=None, failure_rate_threshold=0.5, window_size=4, minimum_calls=2, clock=clock
    )
    now = clock()
    for _ in range(20):  # S S S F repeated: 25% over any 4-call window
        succeed(breaker, now)
        succeed(breaker, now)
        succeed(breaker, now)
        fail(breaker, now)
    assert breaker.state_at(now) is CLOSED
    fail(breaker, now)  # window S S F F: the oldest failure slid out, two are in: 50%
    assert breaker.state_at(now) is OPEN


def test_consecutive_and_rate_rules_together(clock: FakeClock) -> None:
    # The rate rule trips first on alternating failures ...
    breaker = CircuitBreaker(
        fail_max=3, failure_rate_threshold=0.5, window_size=10, minimum_calls=6, clock=clock
    )
    now = clock()
    for _ in range(2):
        succeed(breaker, now)
        fail(breaker, now)
    assert breaker.state_at(now) is CLOSED
    succeed(breaker, now)
    fail(breaker, now)  # 3 failures out of 6
    assert breaker.state_at(now) is OPEN
    # ... the consecutive rule trips first on a burst, before minimum_calls.
    breaker = CircuitBreaker(
        fail_max=3, failure_rate_threshold=0.9, window_size=10, minimum_calls=10, clock=clock
    )
    fail(breaker, now, 3)
    assert breaker.state_at(now) is OPEN


def test_rate_window_is_cleared_when_the_breaker_closes(clock: FakeClock) -> None:
    breaker = CircuitBreaker(
        fail_max=None,
        failure_rate_threshold=0.5,
        window_size=4,
        minimum_calls=2,
        reset_timeout=1,
        clock=clock,
    )
    fail(breaker, clock(), 2)
    clock.advance(1)
    succeed(breaker, clock())
    assert breaker.state is CLOSED
    succeed(breaker, clock())
    fail(breaker, clock())  # window S F (the trial is not in it): 50%
    assert breaker.state is OPEN


def test_slow_calls_count_as_failures(clock: FakeClock) -> None:
    breaker = CircuitBreaker(fail_max=2, slow_call_seconds=0.5, reset_timeout=5, clock=clock)
    now = clock()
    succeed(breaker, now, duration=0.5)  # not slower than the threshold
    succeed(breaker, now, duration=0.6)
    assert breaker.stats.consecutive_failures == 1
    succeed(breaker, now, duration=3.0)
    assert breaker.state_at(now) is OPEN
    assert breaker.stats.slow_calls == 2
    assert breaker.stats.failures == 2
    assert breaker.stats.successes == 1
    # A slow trial re-opens.
    succeed(breaker, now + 5, duration=0.6)
    assert breaker.state_at(now + 5) is OPEN


def test_half_open_admits_at_most_n_trials(clock: FakeClock) -> None:
    breaker = CircuitBreaker(fail_max=1, reset_timeout=10, half_open_max_calls=2, clock=clock)
    fail(breaker, clock())
    clock.advance(10)
    now = clock()
    first = breaker.acquire(now)
    second = breaker.acquire(now)
    assert not breaker.allow(now)
    with pytest.raises(CircuitOpenError) as info:
        breaker.acquire(now)
    assert info.value.retry_after == 1.0  # min(reset_timeout, 1 s): the trials' outcome is unknown
    breaker.release(epoch=first)  # a cancelled trial gives its slot back
    third = breaker.acquire(now)
    assert breaker.state_at(now) is HALF_OPEN
    breaker.record_success(now, epoch=second)
    assert breaker.state_at(now) is CLOSED
    # The other trial's late failure belongs to the half-open epoch: it does not re-open.
    breaker.record_failure(now, epoch=third)
    assert breaker.state_at(now) is CLOSED
    assert breaker.stats.consecutive_failures == 0
    assert breaker.stats.rejections == 2


def test_half_open_retry_after_is_short_for_short_timeouts(clock: FakeClock) -> None:
    breaker = CircuitBreaker(fail_max=1, reset_timeout=0.25, clock=clock)
    fail(breaker, clock())
    clock.advance(0.25)
    breaker.acquire(clock())
    assert breaker.retry_after(clock()) == 0.25


def test_late_outcomes_of_earlier_epochs_do_not_move_the_state(clock: FakeClock) -> None:
    breaker = CircuitBreaker(fail_max=1, reset_timeout=10, clock=clock)
    now = clock()
    slow_success = breaker.acquire(now)  # admitted while closed, still running
    slow_failure = breaker.acquire(now)
    fail(breaker, now)
    assert breaker.state_at(now) is OPEN
    breaker.record_failure(now + 1, epoch=slow_failure)  # stale: does not extend the open time
    assert breaker.retry_after(now + 1) == 9
    trial = breaker.acquire(now + 10)
    breaker.record_success(now + 10, epoch=slow_success)  # stale: must not close without a trial
    assert breaker.state_at(now + 10) is HALF_OPEN
    assert not breaker.allow(now + 10)  # the trial slot is still taken
    breaker.record_success(now + 10, epoch=trial)
    assert breaker.state_at(now + 10) is CLOSED
    stats = breaker.stats
    assert (stats.calls, stats.successes, stats.failures) == (4, 2, 2)


def test_epochless_core_use(clock: FakeClock) -> None:
    # Scripts may ignore epochs: outcomes then apply to the current state.
    breaker = CircuitBreaker(fail_max=2, reset_timeout=1, clock=clock)
    now = clock()
    for _ in range(2):
        assert breaker.allow(now)
        breaker.record_failure(now)
    assert not breaker.allow(now)
    assert breaker.allow(now + 1)
    breaker.release()
    assert breaker.allow(now + 1)
    breaker.record_success(now + 1)
    assert breaker.state_at(now + 1) is CLOSED


def test_reset(clock: FakeClock) -> None:
    seen, listener = recorder()
    breaker = CircuitBreaker(fail_max=2, listeners=[listener], clock=clock)
    fail(breaker, clock(), 1)
    breaker.reset()  # closed -> closed: forgets the failure, no transition
    fail(breaker, clock(), 1)
    assert breaker.state is CLOSED
    fail(breaker, clock(), 1)
    assert breaker.state is OPEN
    breaker.reset()
    assert breaker.state is CLOSED
    assert breaker.allow(clock())
    assert seen == [(CLOSED, OPEN), (OPEN, CLOSED)]
    assert breaker.stats.failures == 3  # stats are lifetime counters


def test_stats(clock: FakeClock) -> None:
    breaker = CircuitBreaker(fail_max=2, reset_timeout=5, slow_call_seconds=1, clock=clock)
    now = clock()
    succeed(breaker, now)
    fail(breaker, now)
    epoch = breaker.acquire(now)
    breaker.release(epoch=epoch)
    succeed(breaker, now, duration=2)  # slow: second consecutive failure, opens
    assert not breaker.allow(now)
    assert not breaker.allow(now + 1)
    assert breaker.stats == BreakerStats(
        calls=4,
        successes=1,
        failures=2,
        slow_calls=1,
        rejections=2,
        cancellations=1,
        state_changes=1,
        consecutive_failures=0,
    )
    assert msgspec.json.decode(msgspec.json.encode(breaker.stats))["rejections"] == 2


def test_listeners_that_raise_are_logged_and_ignored(
    clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    seen, listener = recorder()

    def broken(breaker: CircuitBreaker, old: BreakerState, new: BreakerState) -> None:
        raise RuntimeError("listener bug")

    states: list[BreakerState] = []
    breaker = CircuitBreaker(
        fail_max=1, reset_timeout=1, name="db", listeners=[broken], clock=clock
    )
    breaker.add_listener(listener)
    # A listener sees the new state when it reads the breaker.
    breaker.add_listener(lambda b, old, new: states.append(b.state))
    with caplog.at_level(logging.ERROR, logger="asgi_armor"):
        fail(breaker, clock())
    assert breaker.state is OPEN
    assert seen == [(CLOSED, OPEN)]
    assert states == [OPEN]
    assert "listener" in caplog.text
    assert "listener bug" in caplog.text
    breaker.remove_listener(broken)
    clock.advance(1)
    assert breaker.state is HALF_OPEN
    assert seen == [(CLOSED, OPEN), (OPEN, HALF_OPEN)]
    with pytest.raises(ValueError, match="not in list"):
        breaker.remove_listener(broken)


def test_transitions_are_logged(clock: FakeClock, caplog: pytest.LogCaptureFixture) -> None:
    breaker = CircuitBreaker(fail_max=1, reset_timeout=3, name="redis", clock=clock)
    with caplog.at_level(logging.INFO, logger="asgi_armor"):
        fail(breaker, clock())
        clock.advance(3)
        succeed(breaker, clock())
    messages = [r.getMessage() for r in caplog.records]
    assert messages == [
        "circuit breaker 'redis' opened; rejecting calls for 3s",
        "circuit breaker 'redis' is half_open",
        "circuit breaker 'redis' is closed",
    ]


def test_repr() -> None:
    assert repr(CircuitBreaker(name="db")) == "CircuitBreaker(name='db', state='closed')"


# --------------------------------------------------------------------------- façades


@pytest.mark.anyio
async def test_async_with_counts_outcomes(clock: FakeClock) -> None:
    breaker = CircuitBreaker(fail_max=2, reset_timeout=5, name="store", clock=clock)
    async with breaker:
        pass
    for _ in range(2):
        with pytest.raises(Boom):
            async with breaker:
                raise Boom
    assert breaker.state is OPEN
    entered = False
    with pytest.raises(CircuitOpenError) as info:
        async with breaker:
            entered = True
    assert not entered
    assert info.value.retry_after == 5
    clock.advance(5)
    async with breaker:
        assert breaker.state is HALF_OPEN
    assert breaker.state is CLOSED
    stats = breaker.stats
    assert (stats.calls, stats.successes, stats.failures, stats.rejections) == (4, 2, 2, 1)


@pytest.mark.anyio
async def test_cancellation_in_async_with_releases_the_trial(clock: FakeClock) -> None:
    breaker = CircuitBreaker(fail_max=1, reset_timeout=5, clock=clock)
    with pytest.raises(Boom):
        async with breaker:
            raise Boom
    clock.advance(5)
    with anyio.CancelScope() as scope:
        async with breaker:
            assert not breaker.allow(clock())  # the only trial slot is ours
            scope.cancel()
            await anyio.sleep_forever()
    assert scope.cancelled_caught
    assert breaker.state is HALF_OPEN  # neither success nor failure
    assert breaker.stats.cancellations == 1
    assert breaker.stats.failures == 1
    async with breaker:  # the slot is free again
        pass
    assert breaker.state is CLOSED


@pytest.mark.anyio
async def test_timeout_outside_async_with_is_not_a_failure_inside_it_is(clock: FakeClock) -> None:
    breaker = CircuitBreaker(fail_max=1, clock=clock)
    with anyio.move_on_after(0.01):
        async with breaker:
            await anyio.sleep_forever()
    assert breaker.state is CLOSED
    with pytest.raises(TimeoutError):  # noqa: PT012 - the block is what is tested
        async with breaker:
            with anyio.fail_after(0.01):
                await anyio.sleep_forever()
    assert breaker.state is OPEN


@pytest.mark.anyio
async def test_half_open_concurrency_limit(clock: FakeClock) -> None:
    breaker = CircuitBreaker(fail_max=1, reset_timeout=2, half_open_max_calls=3, clock=clock)
    with pytest.raises(Boom):
        async with breaker:
            raise Boom
    clock.advance(2)
    release = anyio.Event()
    admitted = 0
    rejected: list[CircuitOpenError] = []

    async def trial() -> None:
        nonlocal admitted
        try:
            async with breaker:
                admitted += 1
                await release.wait()
        except CircuitOpenError as exc:
            rejected.append(exc)  # at once, without waiting for the trials

    async with anyio.create_task_group() as tg:
        for _ in range(10):
            tg.start_soon(trial)
        await anyio.wait_all_tasks_blocked()
        assert admitted == 3
        assert [exc.retry_after for exc in rejected] == [1.0] * 7
        assert breaker.state is HALF_OPEN
        release.set()
    assert breaker.state is CLOSED
    assert breaker.stats.rejections == 7


@pytest.mark.anyio
async def test_no_lock_is_held_across_the_guarded_call() -> None:
    breaker = CircuitBreaker()
    inside = 0
    peak = 0
    gate = anyio.Event()

    async def guarded() -> None:
        nonlocal inside, peak
        async with breaker:
            inside += 1
            peak = max(peak, inside)
            await gate.wait()
            inside -= 1

    async with anyio.create_task_group() as tg:
        for _ in range(5):
            tg.start_soon(guarded)
        await anyio.wait_all_tasks_blocked()
        gate.set()
    assert peak == 5
    assert breaker.stats.successes == 5


@pytest.mark.anyio
async def test_slow_calls_through_async_with(clock: FakeClock) -> None:
    breaker = CircuitBreaker(fail_max=1, slow_call_seconds=1.0, clock=clock)
    async with breaker:
        clock.advance(0.5)
    assert breaker.state is CLOSED
    async with breaker:
        clock.advance(1.5)
    assert breaker.state is OPEN
    assert breaker.stats.slow_calls == 1


@pytest.mark.anyio
async def test_exclude_counts_as_success(clock: FakeClock) -> None:
    breaker = CircuitBreaker(fail_max=2, reset_timeout=1, exclude=(NotFoundError,), clock=clock)
    for _ in range(5):
        with pytest.raises(Boom):
            async with breaker:
                raise Boom
        with pytest.raises(NotFoundError):  # still propagates ...
            async with breaker:
                raise NotFoundError
    assert breaker.state is CLOSED  # ... but resets the consecutive count
    for _ in range(2):
        with pytest.raises(Boom):
            async with breaker:
                raise Boom
    assert breaker.state is OPEN
    clock.advance(1)
    with pytest.raises(NotFoundError):
        async with breaker:
            raise NotFoundError
    assert breaker.state is CLOSED  # the dependency answered: the trial succeeded


@pytest.mark.anyio
async def test_nested_breakers(clock: FakeClock) -> None:
    outer = CircuitBreaker(fail_max=1, clock=clock)
    inner = CircuitBreaker(fail_max=1, clock=clock)
    with pytest.raises(Boom):  # noqa: PT012 - the block is what is tested
        async with outer:
            async with inner:
                pass
            raise Boom
    assert outer.state is OPEN
    assert inner.state is CLOSED
    # The same breaker nested in itself keeps one frame per block.
    same = CircuitBreaker(fail_max=1, slow_call_seconds=1, clock=clock)
    async with same:
        async with same:
            clock.advance(0.5)
        clock.advance(0.75)  # outer block: 1.25 s, slow
    assert same.state is OPEN
    assert same.stats.slow_calls == 1


def test_exit_in_another_context_is_recorded(clock: FakeClock) -> None:
    breaker = CircuitBreaker(fail_max=1, clock=clock)
    other = CircuitBreaker(clock=clock)
    ctx = contextvars.copy_context()
    ctx.run(breaker.__enter__)
    ctx.run(other.__enter__)
    # Exited out of order, in the same context: found below the top frame.
    ctx.run(breaker.__exit__, Boom, Boom(), None)
    ctx.run(other.__exit__, None, None, None)
    assert breaker.state is OPEN
    assert other.stats.successes == 1
    breaker.reset()
    # Exited in a context that never saw the enter: recorded against the current epoch.
    contextvars.copy_context().run(breaker.__enter__)
    breaker.__exit__(Boom, Boom(), None)
    assert breaker.state is OPEN
    assert breaker.stats.failures == 2


def test_sync_with_and_keyboard_interrupt(clock: FakeClock) -> None:
    breaker = CircuitBreaker(fail_max=1, clock=clock)
    with breaker:
        pass
    with pytest.raises(KeyboardInterrupt), breaker:
        raise KeyboardInterrupt
    assert breaker.state is CLOSED
    assert breaker.stats.cancellations == 1
    with pytest.raises(Boom), breaker:
        raise Boom
    assert breaker.state is OPEN


def test_decorator_on_a_sync_function(clock: FakeClock) -> None:
    breaker = CircuitBreaker(fail_max=2, clock=clock)

    @breaker
    def divide(a: int, b: int = 1, *, scale: float = 1.0) -> float:
        """Divide a by b."""
        return a / b * scale

    quotient = divide(6, 3, scale=2.0)
    assert_type(quotient, float)
    assert quotient == 4.0
    if TYPE_CHECKING:  # the signature survives: mypy (strict, warn_unused_ignores) checks these
        divide("6")  # type: ignore[arg-type]
        divide(6, scale="2")  # type: ignore[arg-type]
    assert divide.__name__ == "divide"
    assert divide.__doc__ == "Divide a by b."
    assert (
        str(inspect.signature(divide))
        == "(a: 'int', b: 'int' = 1, *, scale: 'float' = 1.0) -> 'float'"
    )
    assert not inspect.iscoroutinefunction(divide)
    for _ in range(2):
        with pytest.raises(ZeroDivisionError):
            divide(1, 0)
    with pytest.raises(CircuitOpenError):
        divide(1, 1)
    assert breaker.stats.calls == 3


@pytest.mark.anyio
async def test_decorator_on_an_async_function(clock: FakeClock) -> None:
    breaker = CircuitBreaker(fail_max=1, reset_timeout=1, clock=clock)

    @breaker
    async def fetch(user_id: int, *, fields: tuple[str, ...] = ()) -> dict[str, int]:
        """Fetch a user."""
        await anyio.lowlevel.checkpoint()
        if user_id < 0:
            raise Boom
        return {"id": user_id}

    if TYPE_CHECKING:
        await fetch("7")  # type: ignore[arg-type]
        await fetch(7, fields=[1])  # type: ignore[arg-type]
    assert inspect.iscoroutinefunction(fetch)
    assert fetch.__name__ == "fetch"
    assert fetch.__doc__ == "Fetch a user."
    assert str(inspect.signature(fetch)).startswith("(user_id: 'int', *, fields:")
    result = await fetch(7, fields=("id",))
    assert_type(result, dict[str, int])
    assert result == {"id": 7}
    with pytest.raises(Boom):
        await fetch(-1)
    with pytest.raises(CircuitOpenError):
        await fetch(1)
    clock.advance(1)
    assert await fetch(2) == {"id": 2}
    assert breaker.state is CLOSED


@pytest.mark.anyio
async def test_call_with_sync_and_async_functions(clock: FakeClock) -> None:
    breaker = CircuitBreaker(fail_max=3, clock=clock)

    async def add(a: int, b: int) -> int:
        await anyio.lowlevel.checkpoint()
        return a + b

    def mul(a: int, *, b: int) -> int:
        return a * b

    empty: dict[str, int] = {}

    total = await breaker.call(add, 1, b=2)
    assert_type(total, int)
    product = await breaker.call(mul, 3, b=4)
    assert_type(product, int)
    assert (total, product) == (3, 12)
    if TYPE_CHECKING:
        await breaker.call(mul, 3, 4)  # type: ignore[call-overload]
        await breaker.call(add, 1, "2")  # type: ignore[call-overload]
    with pytest.raises(KeyError):
        await breaker.call(empty.__getitem__, "missing")
    assert breaker.stats == BreakerStats(
        calls=3,
        successes=2,
        failures=1,
        slow_calls=0,
        rejections=0,
        cancellations=0,
        state_changes=0,
        consecutive_failures=1,
    )


@pytest.mark.anyio
async def test_call_cancelled_is_neither(clock: FakeClock) -> None:
    breaker = CircuitBreaker(fail_max=1, clock=clock)
    with anyio.move_on_after(0.01):
        await breaker.call(anyio.sleep_forever)
    assert breaker.state is CLOSED
    assert breaker.stats.cancellations == 1


# --------------------------------------------------------------------------- over HTTP


@pytest.mark.anyio
async def test_open_breaker_renders_503_with_retry_after(clock: FakeClock) -> None:
    breaker = CircuitBreaker(fail_max=1, reset_timeout=30, name="db", clock=clock)

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        async with breaker:
            if scope["path"] == "/fail":
                raise Boom("db down at 10.0.0.5")
        await send_json(send, 200, b'{"ok":true}', [])

    client = httpx.AsyncClient(
        transport=httpx.ASGITransport(app=ErrorMiddleware(app), client=("1.2.3.4", 123)),
        base_url="http://t",
    )
    async with client:
        assert (await client.get("/ok")).status_code == 200
        first = await client.get("/fail")
        assert first.status_code == 500
        assert "10.0.0.5" not in first.text
        clock.advance(0.5)
        response = await client.get("/ok")
    assert response.status_code == 503
    assert response.headers["retry-after"] == "30"
    assert response.headers["x-request-id"]
    body = response.json()
    assert body == {
        "error": "service_unavailable",
        "message": "Service temporarily unavailable",
        "details": [],
        "request_id": response.headers["x-request-id"],
    }


@pytest.mark.anyio
async def test_rate_rule_through_async_with(clock: FakeClock) -> None:
    breaker = CircuitBreaker(
        fail_max=None, failure_rate_threshold=0.5, window_size=2, minimum_calls=2, clock=clock
    )
    with pytest.raises(Boom):
        async with breaker:
            raise Boom
    async with breaker:  # window F S: 50%, the success completes the minimum
        pass
    assert breaker.state is OPEN


@pytest.mark.anyio
async def test_a_call_in_flight_when_the_breaker_opens_is_stale(clock: FakeClock) -> None:
    breaker = CircuitBreaker(fail_max=1, reset_timeout=5, clock=clock)
    entered = anyio.Event()
    finish = anyio.Event()

    async def slow_success() -> None:
        async with breaker:
            entered.set()
            await finish.wait()

    async with anyio.create_task_group() as tg:
        tg.start_soon(slow_success)
        await entered.wait()
        with pytest.raises(Boom):
            async with breaker:
                raise Boom
        clock.advance(5)
        assert breaker.state is HALF_OPEN
        finish.set()  # the old closed-state call succeeds during half-open ...
    assert breaker.state is HALF_OPEN  # ... and is no trial: the breaker stays half-open
    async with breaker:
        pass
    assert breaker.state is CLOSED


# -- make mutate survivors (docs/mutation.md): frames, stale outcomes, defaults ------------


def _enter(breaker: CircuitBreaker, kind: str, ctx: contextvars.Context) -> None:
    if kind == "with":
        ctx.run(breaker.__enter__)
    else:
        coro = breaker.__aenter__()
        with pytest.raises(StopIteration):
            ctx.run(coro.send, None)


def _exit(
    breaker: CircuitBreaker, kind: str, ctx: contextvars.Context, exc: BaseException | None
) -> None:
    args = (type(exc) if exc else None, exc, None)
    if kind == "with":
        ctx.run(breaker.__exit__, *args)
    else:
        coro = breaker.__aexit__(*args)
        with pytest.raises(StopIteration):
            ctx.run(coro.send, None)


@pytest.mark.parametrize("kind", ["with", "async_with"])
def test_out_of_order_exits_each_use_their_own_admission(clock: FakeClock, kind: str) -> None:
    """Two breakers entered in one context and exited out of order: each exit finds its
    own frame (its epoch, its start time), and the other's frame stays for its own exit."""
    a = CircuitBreaker(fail_max=1, slow_call_seconds=5, clock=clock)
    b = CircuitBreaker(fail_max=1, slow_call_seconds=5, clock=clock)
    a.reset()  # epochs differ (a: 1, b: 0), so a frame taken for the other's would show
    ctx = contextvars.copy_context()
    _enter(a, kind, ctx)
    clock.advance(1)
    _enter(b, kind, ctx)
    clock.advance(5)
    _exit(a, kind, ctx, None)  # below b's frame; 6 s since a's enter (5 since b's): slow
    assert (a.state, a.stats.slow_calls) == (OPEN, 1)
    clock.advance(2)
    _exit(b, kind, ctx, None)  # 7 s since b's enter: slow, so b's frame was kept
    assert (b.state, b.stats.slow_calls) == (OPEN, 1)
    # Both frames are gone: a block on a new breaker in this context is its own.
    c = CircuitBreaker(fail_max=1, slow_call_seconds=5, clock=clock)
    _enter(c, kind, ctx)
    _exit(c, kind, ctx, None)
    assert (c.state, c.stats.successes) == (CLOSED, 1)


@pytest.mark.parametrize("kind", ["with", "async_with"])
def test_a_success_out_of_order_leaves_the_other_frame_alone(clock: FakeClock, kind: str) -> None:
    a = CircuitBreaker(fail_max=1, clock=clock)
    b = CircuitBreaker(fail_max=1, clock=clock)
    ctx = contextvars.copy_context()
    _enter(a, kind, ctx)
    _enter(b, kind, ctx)
    b.reset()  # b's block is stale
    _exit(a, kind, ctx, None)  # a's own frame, below b's
    _exit(b, kind, ctx, Boom())  # finds its stale frame: opens nothing
    assert (a.stats.successes, b.state, b.stats.failures) == (1, CLOSED, 1)


@pytest.mark.parametrize("kind", ["with", "async_with"])
def test_a_stale_outcome_below_another_frame_moves_nothing(clock: FakeClock, kind: str) -> None:
    a = CircuitBreaker(fail_max=1, clock=clock)
    b = CircuitBreaker(fail_max=1, clock=clock)
    ctx = contextvars.copy_context()
    _enter(a, kind, ctx)
    _enter(b, kind, ctx)
    a.reset()  # a's block now belongs to an old epoch
    _exit(a, kind, ctx, Boom())
    assert (a.state, a.stats.failures) == (CLOSED, 1)
    _exit(b, kind, ctx, Boom())
    assert b.state is OPEN


@pytest.mark.parametrize("kind", ["with", "async_with"])
def test_nested_exit_keeps_the_outer_frame(clock: FakeClock, kind: str) -> None:
    outer = CircuitBreaker(fail_max=1, clock=clock)
    inner = CircuitBreaker(fail_max=1, clock=clock)
    ctx = contextvars.copy_context()
    _enter(outer, kind, ctx)
    outer.reset()  # the outer block is stale from here on
    _enter(inner, kind, ctx)
    _exit(inner, kind, ctx, None)
    _exit(outer, kind, ctx, Boom())  # found its frame: stale, so it opens nothing
    assert (outer.state, outer.stats.failures) == (CLOSED, 1)
    assert inner.stats.successes == 1


@pytest.mark.parametrize("kind", ["with", "async_with"])
def test_an_exit_in_a_context_that_never_entered_is_timed_from_the_exit(
    clock: FakeClock, kind: str
) -> None:
    """Its start is unknown: the call counts, with no duration (never slow), for the
    current epoch."""
    breaker = CircuitBreaker(fail_max=1, slow_call_seconds=1, clock=clock)
    _enter(breaker, kind, contextvars.copy_context())
    clock.advance(5)
    _exit(breaker, kind, contextvars.copy_context(), None)
    assert (breaker.state, breaker.stats.successes, breaker.stats.slow_calls) == (CLOSED, 1, 0)
    fail(breaker, clock())
    clock.advance(60)
    assert breaker.state is HALF_OPEN
    _enter(breaker, kind, contextvars.copy_context())
    _exit(breaker, kind, contextvars.copy_context(), None)  # the trial, half-open
    assert breaker.state is CLOSED


def test_record_success_without_a_duration_is_not_slow(clock: FakeClock) -> None:
    breaker = CircuitBreaker(fail_max=1, slow_call_seconds=0.5, clock=clock)
    assert breaker.allow(clock())
    breaker.record_success(clock())
    assert (breaker.state, breaker.stats.successes, breaker.stats.slow_calls) == (CLOSED, 1, 0)


def test_defaults(clock: FakeClock) -> None:
    """fail_max 5, reset_timeout 30 s, one half-open trial, rate window 100 / 10 calls."""
    breaker = CircuitBreaker(clock=clock)
    fail(breaker, clock(), times=4)
    assert breaker.state is CLOSED
    fail(breaker, clock())
    assert breaker.state is OPEN
    assert breaker.retry_after(clock()) == 30.0
    clock.advance(30)
    assert breaker.allow(clock())
    assert not breaker.allow(clock())
    assert repr(breaker) == "CircuitBreaker(name='', state='half_open')"
    rated = CircuitBreaker(fail_max=None, failure_rate_threshold=0.5, clock=clock)
    for _ in range(9):
        fail(rated, clock())
    assert rated.state is CLOSED  # 9 calls: under minimum_calls
    fail(rated, clock())
    assert rated.state is OPEN
    windowed = CircuitBreaker(fail_max=None, failure_rate_threshold=0.5, clock=clock)
    for _ in range(100):
        succeed(windowed, clock())
    for _ in range(49):
        fail(windowed, clock())
    assert windowed.state is CLOSED  # 49 of the last 100
    fail(windowed, clock())
    assert windowed.state is OPEN  # 50 of the last 100 (of the last 101: 50, under half)
