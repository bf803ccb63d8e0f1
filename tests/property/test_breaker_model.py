"""The breaker's pure core and every façade against a deliberately naive reference model.

The model keeps the whole outcome history of the current closed period and recomputes the
consecutive run and the window rate from scratch; calls remember the *phase* (one per state
period) that admitted them. Times are multiples of 0.25 s, so float arithmetic is exact
and both sides must agree to the bit.

The same rules drive the core (``acquire``/``record_*``/``release``) and the façades
(``with``, ``async with``, ``@breaker`` on sync and async functions, ``call`` with sync and
async functions), completed at once or left in flight across steps, each in-flight call in
its own context as concurrent tasks are. The façades' coroutines never really wait, so
they are stepped by hand: no event loop, and every interleaving is one hypothesis draws.
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable, Coroutine, Generator
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    initialize,
    invariant,
    multiple,
    precondition,
    rule,
)

from asgi_armor.breaker import BreakerState, CircuitBreaker, CircuitOpenError

STEP = 0.25


class Boom(Exception):
    """The dependency failed."""


class Excluded(Exception):
    """A business error: the dependency answered (``exclude``), so a success."""


class Interrupted(BaseException):
    """Cancellation or an interrupt: neither success nor failure."""


OUTCOMES = ["success", "failure", "excluded", "cancel"]
RAISED: dict[str, type[BaseException]] = {
    "failure": Boom,
    "excluded": Excluded,
    "cancel": Interrupted,
}
FACADES = ["with", "async_with", "decorator", "async_decorator", "call", "async_call"]
SUSPENDABLE = ["with", "async_with", "async_decorator", "async_call"]


class Pause:
    """An awaitable that suspends its coroutine once, as a real await on I/O would."""

    def __await__(self) -> Generator[None, None, None]:
        yield


def drive(coro: Coroutine[Any, Any, Any]) -> Any:
    """Run a coroutine that never suspends to its end, synchronously."""
    try:
        coro.send(None)
    except StopIteration as stop:
        return stop.value
    coro.close()
    raise AssertionError("a façade suspended without being asked to")


@dataclass
class Model:
    fail_max: int | None
    reset_timeout: float
    rate: float | None
    window_size: int
    minimum_calls: int
    slow: float | None
    max_trials: int
    state: str = "closed"
    phase: int = 0
    opened_at: float = 0.0
    history: list[bool] = field(default_factory=list)  # True = failure, this closed period
    trials: int = 0
    counts: dict[str, int] = field(
        default_factory=lambda: dict.fromkeys(
            (
                "calls",
                "successes",
                "failures",
                "slow_calls",
                "rejections",
                "cancellations",
                "state_changes",
            ),
            0,
        )
    )

    def _enter(self, state: str) -> None:
        if state != self.state:
            self.counts["state_changes"] += 1
        self.state = state
        self.phase += 1
        self.history = []
        self.trials = 0

    def _open(self, now: float) -> None:
        self._enter("open")
        self.opened_at = now

    def observe(self, now: float) -> str:
        if self.state == "open" and now - self.opened_at >= self.reset_timeout:
            self._enter("half_open")
        return self.state

    def retry_after(self, now: float) -> float:
        state = self.observe(now)
        if state == "open":
            return self.opened_at + self.reset_timeout - now
        if state == "half_open" and self.trials == self.max_trials:
            return min(self.reset_timeout, 1.0)
        return 0.0

    def admit(self, now: float) -> int | None:
        state = self.observe(now)
        if state == "closed" or (state == "half_open" and self.trials < self.max_trials):
            if state == "half_open":
                self.trials += 1
            self.counts["calls"] += 1
            return self.phase
        self.counts["rejections"] += 1
        return None

    def _tripped(self) -> bool:
        run = 0
        for failed in reversed(self.history):
            if not failed:
                break
            run += 1
        if self.fail_max is not None and run >= self.fail_max:
            return True
        window = self.history[-self.window_size :]
        return (
            self.rate is not None
            and len(window) >= self.minimum_calls
            and sum(window) / len(window) >= self.rate
        )

    def finish(self, now: float, phase: int, failed: bool, duration: float) -> None:
        if not failed and self.slow is not None and duration > self.slow:
            self.counts["slow_calls"] += 1
            failed = True
        self.counts["failures" if failed else "successes"] += 1
        state = self.observe(now)
        if phase != self.phase:
            return
        if state == "closed":
            self.history.append(failed)
            if self._tripped():
                self._open(now)
        elif state == "half_open":
            if failed:
                self._open(now)
            else:
                self._enter("closed")

    def cancel(self, phase: int) -> None:
        self.counts["cancellations"] += 1
        if phase == self.phase and self.trials > 0:
            self.trials -= 1

    def reset(self) -> None:
        self._enter("closed")


@dataclass
class Call:
    epoch: int
    phase: int
    start: float


@dataclass
class FacadeCall:
    """A façade call in flight: its own context, and its coroutine when it has one."""

    kind: str
    phase: int
    start: float
    context: contextvars.Context
    coro: Coroutine[Any, Any, Any] | None = None
    outcome: list[str] = field(default_factory=list)


class BreakerMachine(RuleBasedStateMachine):
    calls = Bundle("calls")
    facade_calls = Bundle("facade_calls")
    #: When set, every façade rule goes through this one façade (see the subclasses).
    only: str | None = None

    def __init__(self) -> None:
        super().__init__()
        self.now = 100.0
        self.breaker: CircuitBreaker
        self.model: Model
        self.suspended: list[Coroutine[Any, Any, Any]] = []

    @initialize(
        fail_max=st.none() | st.integers(1, 4),
        reset_timeout=st.sampled_from([0.0, 0.5, 1.0, 3.0]),
        rate=st.none() | st.sampled_from([0.25, 0.5, 0.75, 1.0]),
        window_size=st.integers(1, 6),
        minimum_calls=st.integers(1, 6),
        slow=st.none() | st.sampled_from([0.25, 1.0]),
        max_trials=st.integers(1, 3),
    )
    def setup(
        self,
        fail_max: int | None,
        reset_timeout: float,
        rate: float | None,
        window_size: int,
        minimum_calls: int,
        slow: float | None,
        max_trials: int,
    ) -> None:
        if fail_max is None and rate is None:
            # One rule must be on; derived from another draw, so runs of failures that do
            # not trip at once are common too.
            fail_max = 1 + minimum_calls % 4
        minimum_calls = min(minimum_calls, window_size)
        self.breaker = CircuitBreaker(
            fail_max,
            reset_timeout,
            name="model",
            failure_rate_threshold=rate,
            window_size=window_size,
            minimum_calls=minimum_calls,
            slow_call_seconds=slow,
            half_open_max_calls=max_trials,
            exclude=(Excluded,),
            clock=lambda: self.now,
        )
        self.model = Model(
            fail_max, reset_timeout, rate, window_size, minimum_calls, slow, max_trials
        )

    def _begin(self) -> Call | None:
        expected_wait = self.model.retry_after(self.now)
        phase = self.model.admit(self.now)
        rejection: CircuitOpenError | None = None
        try:
            epoch = self.breaker.acquire(self.now)
        except CircuitOpenError as exc:
            rejection = exc
        if rejection is not None:
            assert phase is None, "the breaker rejected a call the model admits"
            assert rejection.retry_after == expected_wait
            assert rejection.name == "model"
            return None
        assert phase is not None, "the breaker admitted a call the model rejects"
        assert expected_wait == 0.0
        return Call(epoch, phase, self.now)

    def _end(self, call: Call, failed: bool) -> None:
        duration = self.now - call.start
        self.model.finish(self.now, call.phase, failed, duration)
        if failed:
            self.breaker.record_failure(self.now, epoch=call.epoch)
        else:
            self.breaker.record_success(self.now, duration, epoch=call.epoch)

    @rule(target=calls)
    def begin(self) -> Call | object:
        call = self._begin()
        return multiple() if call is None else call

    @rule(call=consumes(calls))
    def end_success(self, call: Call) -> None:
        self._end(call, failed=False)

    @rule(call=consumes(calls))
    def end_failure(self, call: Call) -> None:
        self._end(call, failed=True)

    @rule(call=consumes(calls))
    def cancel(self, call: Call) -> None:
        self.model.cancel(call.phase)
        self.breaker.release(epoch=call.epoch)

    @rule()
    def call_succeeds(self) -> None:
        if self.only is not None:
            self.facade_call(self.only, "success", 0)
            return
        call = self._begin()
        if call is not None:
            self._end(call, failed=False)

    @rule()
    def call_fails(self) -> None:
        if self.only is not None:
            self.facade_call(self.only, "failure", 0)
            return
        call = self._begin()
        if call is not None:
            self._end(call, failed=True)

    @precondition(lambda self: self.model.slow is not None)
    @rule(extra=st.sampled_from([0.0, STEP]))
    def slow_call(self, extra: float) -> None:
        # Exactly the threshold is not slow; one step more is.
        call = self._begin()
        if call is not None:
            assert self.model.slow is not None
            self.now += self.model.slow + extra
            self._end(call, failed=False)

    @rule(steps=st.sampled_from([1, 2, 4]) | st.integers(1, 16))
    def advance_clock(self, steps: int) -> None:
        self.now += steps * STEP

    @rule()
    def wait_retry_after(self) -> None:
        # Honest retry_after: waiting exactly that long ends the open period.
        was_open = self.model.observe(self.now) == "open"
        self.now += self.breaker.retry_after(self.now)
        if was_open:
            assert self.model.observe(self.now) == "half_open"

    @rule()
    def reset(self) -> None:
        self.model.reset()
        self.breaker.reset()

    # -- the façades, under the same rules -------------------------------------------

    def _outcome(self, outcome: str) -> str:
        if outcome in RAISED:
            raise RAISED[outcome]()
        return "result"

    def _through(self, kind: str, fn: Callable[[], str]) -> str:
        """Run ``fn`` through the façade ``kind``, to its end."""
        breaker = self.breaker
        if kind == "with":
            with breaker:
                return fn()
        if kind == "decorator":
            return breaker(fn)()

        async def async_fn() -> str:
            return fn()

        async def async_with() -> str:
            async with breaker:
                return fn()

        if kind == "async_with":
            return drive(async_with())  # type: ignore[no-any-return]
        if kind == "async_decorator":
            return drive(breaker(async_fn)())  # type: ignore[no-any-return]
        if kind == "call":
            return drive(breaker.call(fn))  # type: ignore[no-any-return]
        assert kind == "async_call"
        return drive(breaker.call(async_fn))  # type: ignore[no-any-return]

    def _settle(self, phase: int, start: float, outcome: str) -> None:
        if outcome == "cancel":
            self.model.cancel(phase)
        else:
            self.model.finish(self.now, phase, outcome == "failure", self.now - start)

    @rule(
        kind=st.sampled_from(FACADES),
        outcome=st.sampled_from(OUTCOMES),
        steps=st.sampled_from([0, 1, 4]),
    )
    def facade_call(self, kind: str, outcome: str, steps: int) -> None:
        kind = self.only or kind
        expected_wait = self.model.retry_after(self.now)
        phase = self.model.admit(self.now)
        start = self.now
        ran = False

        def fn() -> str:
            nonlocal ran
            ran = True
            self.now += steps * STEP
            return self._outcome(outcome)

        raised: BaseException | None = None
        try:
            result = self._through(kind, fn)
        except BaseException as exc:
            raised = exc
        if not ran:
            assert isinstance(raised, CircuitOpenError), (kind, raised)
            assert phase is None, f"{kind}: the breaker rejected a call the model admits"
            assert raised.retry_after == expected_wait
            assert raised.name == "model"
            return
        assert phase is not None, f"{kind}: the breaker admitted a call the model rejects"
        if outcome in RAISED:
            assert type(raised) is RAISED[outcome], (kind, raised)  # propagated unchanged
        else:
            assert raised is None
            assert result == "result"
        self._settle(phase, start, outcome)

    @rule(target=facade_calls, kind=st.sampled_from(SUSPENDABLE))
    def facade_begin(self, kind: str) -> FacadeCall | object:
        if self.only is not None:
            kind = self.only if self.only in SUSPENDABLE else "with"
        expected_wait = self.model.retry_after(self.now)
        phase = self.model.admit(self.now)
        call = FacadeCall(kind, -1, self.now, contextvars.copy_context())
        rejection: CircuitOpenError | None = None
        try:
            if kind == "with":
                call.context.run(self.breaker.__enter__)
            elif kind == "async_with":
                call.context.run(drive, self.breaker.__aenter__())
            else:

                async def guarded() -> str:
                    await Pause()
                    return self._outcome(call.outcome[0])

                call.coro = (
                    self.breaker(guarded)()
                    if kind == "async_decorator"
                    else self.breaker.call(guarded)
                )
                call.context.run(call.coro.send, None)
                self.suspended.append(call.coro)
        except CircuitOpenError as exc:
            rejection = exc
        if rejection is not None:
            assert phase is None, f"{kind}: the breaker rejected a call the model admits"
            assert rejection.retry_after == expected_wait
            return multiple()
        assert phase is not None, f"{kind}: the breaker admitted a call the model rejects"
        call.phase = phase
        return call

    @rule(call=consumes(facade_calls), outcome=st.sampled_from(OUTCOMES))
    def facade_end(self, call: FacadeCall, outcome: str) -> None:
        error = RAISED[outcome]() if outcome in RAISED else None
        kind = type(error) if error is not None else None
        if call.kind == "with":
            call.context.run(self.breaker.__exit__, kind, error, None)
        elif call.kind == "async_with":
            call.context.run(drive, self.breaker.__aexit__(kind, error, None))
        else:
            assert call.coro is not None
            self.suspended.remove(call.coro)
            call.outcome.append(outcome)
            raised: BaseException | None = None
            try:
                if outcome == "cancel":
                    # Cancelled where it waits, as a cancel scope would do it.
                    call.context.run(call.coro.throw, Interrupted())
                else:
                    call.context.run(call.coro.send, None)
            except BaseException as exc:
                raised = exc
            if outcome in RAISED:
                assert type(raised) is RAISED[outcome], raised
            else:
                assert isinstance(raised, StopIteration), raised
                assert raised.value == "result"
        self._settle(call.phase, call.start, outcome)

    def teardown(self) -> None:
        for coro in self.suspended:
            coro.close()

    @invariant()
    def state_matches(self) -> None:
        assert self.breaker.state_at(self.now).value == self.model.observe(self.now)
        assert self.breaker.state.value == self.model.state

    @invariant()
    def retry_after_matches(self) -> None:
        assert self.breaker.retry_after(self.now) == self.model.retry_after(self.now)

    @invariant()
    def stats_match(self) -> None:
        stats = self.breaker.stats
        for name, value in self.model.counts.items():
            assert getattr(stats, name) == value, name
        if self.model.state == "closed":
            run = 0
            for failed in reversed(self.model.history):
                if not failed:
                    break
                run += 1
            assert stats.consecutive_failures == run

    @invariant()
    def waiting_retry_after_is_enough(self) -> None:
        # Honest retry_after: a caller that waits exactly that long finds the open timer over.
        if self.breaker.state_at(self.now) is BreakerState.OPEN:
            wait = self.breaker.retry_after(self.now)
            assert wait > 0
            assert self.now + wait >= self.model.opened_at + self.model.reset_timeout


BreakerMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
test_breaker_model = BreakerMachine.TestCase


def _one_facade(kind: str) -> type[BreakerMachine]:
    """The machine with every façade step through ``kind``: each interface gets a whole
    run of its own, rather than a sixth of one."""
    machine = type(f"BreakerMachine_{kind}", (BreakerMachine,), {"only": kind})
    machine.TestCase.settings = settings(max_examples=100, stateful_step_count=40, deadline=None)
    return machine


test_breaker_model_with = _one_facade("with").TestCase
test_breaker_model_async_with = _one_facade("async_with").TestCase
test_breaker_model_decorator = _one_facade("decorator").TestCase
test_breaker_model_async_decorator = _one_facade("async_decorator").TestCase
test_breaker_model_call = _one_facade("call").TestCase
test_breaker_model_async_call = _one_facade("async_call").TestCase


def _script(kind: str, slow: float | None) -> list[tuple[str, tuple[Any, ...]]]:
    """Every transition and outcome once, through ``kind`` (fail_max 3, 1 trial, 1 s)."""
    steps: list[tuple[str, tuple[Any, ...]]] = [
        ("call_fails", ()),
        ("call_succeeds", ()),  # ends the run of failures
        ("facade_call", (kind, "failure", 0)),
        ("facade_call", (kind, "excluded", 0)),  # a success too
        ("facade_call", (kind, "cancel", 0)),  # neither
        ("call_fails", ()),
        ("call_fails", ()),
        ("call_fails", ()),  # open
        ("call_succeeds", ()),  # rejected
        ("facade_call", (kind, "success", 0)),  # rejected
        ("advance_clock", (4,)),  # half-open
        ("facade_begin", (kind,)),  # the trial
        ("call_succeeds", ()),  # rejected: the one trial slot is taken
        ("facade_end", ("success",)),  # closed
        ("call_fails", ()),
        ("call_fails", ()),
        ("facade_call", (kind, "success", 0)),
        ("call_fails", ()),
        ("call_fails", ()),
        ("facade_call", (kind, "failure", 0)),  # open
        ("wait_retry_after", ()),  # half-open
        ("facade_begin", (kind,)),
        ("facade_end", ("cancel",)),  # gives the trial slot back
        ("facade_begin", (kind,)),
        ("facade_end", ("failure",)),  # open again
        ("reset", ()),
        ("facade_begin", (kind,)),
        ("reset", ()),  # the call in flight is stale from here on
        ("call_fails", ()),  # a run of one
        ("facade_end", ("success",)),  # stale: does not end the run
        ("facade_begin", (kind,)),
        ("reset", ()),
        ("call_fails", ()),
        ("call_fails", ()),  # a run of two
        ("facade_end", ("failure",)),  # stale: does not make it three
        ("facade_begin", (kind,)),
        ("reset", ()),
        ("facade_end", ("cancel",)),  # stale: counted, nothing else
    ]
    if slow is not None:
        steps += [
            ("advance_clock", (4,)),
            ("facade_call", (kind, "success", 0)),  # the trial closes it
            ("facade_call", (kind, "success", 4)),  # slow: a failure
            ("facade_call", (kind, "excluded", 4)),  # slow too
            ("facade_call", (kind, "success", 1)),  # at the threshold: not slow
        ]
    return steps


@pytest.mark.parametrize("slow", [None, 0.25])
@pytest.mark.parametrize("kind", FACADES)
def test_every_facade_follows_the_model_on_a_fixed_script(kind: str, slow: float | None) -> None:
    """The random runs above, made certain for the moves every façade must get right."""
    machine = BreakerMachine()
    machine.only = kind
    machine.setup(
        fail_max=3,
        reset_timeout=1.0,
        rate=None,
        window_size=4,
        minimum_calls=4,
        slow=slow,
        max_trials=1,
    )
    pending: list[FacadeCall] = []
    try:
        for name, args in _script(kind, slow):
            if name == "facade_begin":
                begun = machine.facade_begin(*args)
                assert isinstance(begun, FacadeCall), f"{kind}: the trial was rejected"
                pending.append(begun)
            elif name == "facade_end":
                machine.facade_end(pending.pop(), *args)
            else:
                getattr(machine, name)(*args)
            machine.state_matches()
            machine.retry_after_matches()
            machine.stats_match()
            machine.waiting_retry_after_is_enough()
    finally:
        machine.teardown()
    assert machine.breaker.stats.state_changes >= 6
