"""The breaker's pure core against a deliberately naive reference model.

The model keeps the whole outcome history of the current closed period and recomputes the
consecutive run and the window rate from scratch; calls remember the *phase* (one per state
period) that admitted them. Times are multiples of 0.25 s, so float arithmetic is exact
and both sides must agree to the bit.
"""

from __future__ import annotations

from dataclasses import dataclass, field

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


class BreakerMachine(RuleBasedStateMachine):
    calls = Bundle("calls")

    def __init__(self) -> None:
        super().__init__()
        self.now = 100.0
        self.breaker: CircuitBreaker
        self.model: Model

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
            fail_max = 1
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
        call = self._begin()
        if call is not None:
            self._end(call, failed=False)

    @rule()
    def call_fails(self) -> None:
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
