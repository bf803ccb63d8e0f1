"""Circuit breaker: stop calling a dependency that keeps failing, probe it, resume.

The state machine is a pure, synchronous core driven by an explicit ``now``
(:meth:`CircuitBreaker.acquire`, :meth:`~CircuitBreaker.record_success`,
:meth:`~CircuitBreaker.record_failure`, :meth:`~CircuitBreaker.release`), so scripts and
hypothesis drive it without an event loop or a sleep. ``async with breaker:``, ``@breaker``
and ``await breaker.call(fn)`` are thin façades over it that hold no lock across the
guarded call (pybreaker serialises every call through one lock: we do not) and never
await inside a state update, so concurrent tasks cannot interleave half an update.

Every transition starts a new *epoch*. A call remembers the epoch that admitted it, and
its outcome only moves the state machine while that epoch is current: a slow call admitted
while closed that fails after the breaker opened is counted in the stats but cannot re-open
a half-open breaker, and one that succeeds late cannot close it without a trial.
"""

from __future__ import annotations

import enum
import functools
import inspect
import logging
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from contextvars import ContextVar
from types import TracebackType
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar, overload

import msgspec

from asgi_armor import _checks
from asgi_armor.errors import CircuitOpenError, ConfigError, current_request_id

if TYPE_CHECKING:
    from asgi_armor.metrics import Metrics

__all__ = [
    "BreakerState",
    "BreakerStats",
    "CircuitBreaker",
    "CircuitOpenError",
    "Listener",
]

logger = logging.getLogger("asgi_armor")

P = ParamSpec("P")
T = TypeVar("T")


class BreakerState(enum.Enum):
    """The three states of a circuit breaker; ``.value`` is the wire/log name."""

    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


_CLOSED = BreakerState.CLOSED
_OPEN = BreakerState.OPEN
_HALF_OPEN = BreakerState.HALF_OPEN

#: ``listener(breaker, old_state, new_state)``, called after every transition.
Listener = Callable[["CircuitBreaker", BreakerState, BreakerState], object]


class BreakerStats(msgspec.Struct, frozen=True):
    """Counters since the breaker was created (``reset()`` does not clear them).

    Attributes:
        calls: calls admitted (closed calls and half-open trials).
        successes: admitted calls that succeeded (excluded exceptions included, slow calls not).
        failures: admitted calls that failed (slow calls included).
        slow_calls: successful calls slower than ``slow_call_seconds`` (also in ``failures``).
        rejections: calls refused with ``CircuitOpenError``.
        cancellations: admitted calls cancelled or interrupted (neither success nor failure).
        state_changes: transitions so far.
        consecutive_failures: the current run of failures while closed.
    """

    calls: int
    successes: int
    failures: int
    slow_calls: int
    rejections: int
    cancellations: int
    state_changes: int
    consecutive_failures: int


# One frame per ``async with``/``with`` block in flight in this task: (breaker, epoch,
# start, previous frame). A context variable because the same breaker guards many
# concurrent tasks, so per-call state cannot live on ``self``; module level because
# ContextVars are never collected.
_Frame = tuple["CircuitBreaker", int, float, Any]
_FRAMES: ContextVar[_Frame | None] = ContextVar("asgi_armor_breaker_frames", default=None)


class CircuitBreaker:
    """A circuit breaker (closed -> open -> half_open -> closed) with a pure core.

    Closed: calls pass; the breaker opens after ``fail_max`` consecutive failures or,
    when ``failure_rate_threshold`` is set, when at least ``minimum_calls`` of the last
    ``window_size`` calls were recorded and the share of failures among them is
    ``>= failure_rate_threshold``. Open: calls are rejected at once with
    ``CircuitOpenError(retry_after=seconds until reset_timeout has passed)``. Once
    ``reset_timeout`` has passed the breaker is half-open (computed from the clock when it
    is next consulted: no timers, no tasks): up to ``half_open_max_calls`` concurrent trial
    calls are admitted and the rest rejected at once; the first trial to succeed closes the
    breaker (counters reset), the first to fail re-opens it for a new ``reset_timeout``.

    Exceptions (``Exception`` subclasses) are failures, except instances of ``exclude``,
    which count as successes (pybreaker's semantics: the dependency answered, with a
    business error such as "not found"). A success slower than ``slow_call_seconds``
    counts as a failure. Cancellation and other ``BaseException``\\s are neither: they give
    back a half-open trial slot and change nothing else.

    Args:
        fail_max: consecutive failures that open a closed breaker (None: only the rate does).
        reset_timeout: seconds an open breaker rejects calls before admitting a trial.
        name: shown in ``CircuitOpenError.name``, logs and ``repr``.
        failure_rate_threshold: failure share in (0, 1] over the sliding window that opens
            the breaker; None disables the rate rule.
        window_size: how many of the most recent closed-state calls the rate looks at.
        minimum_calls: calls the window must hold before the rate can open the breaker.
        slow_call_seconds: a success taking longer than this counts as a failure.
        half_open_max_calls: concurrent trial calls admitted while half-open.
        exclude: exception types that count as successes, not failures.
        listeners: ``listener(breaker, old_state, new_state)`` callables told of every
            transition; one that raises is logged and ignored.
        clock: monotonic seconds, used by the façades and by ``state``.
        metrics: the sink told of every transition and every call (success, failure,
            rejected); its breaker-state gauge reads this breaker when collected.

    Raises:
        ConfigError: a parameter is out of range; the message names it.
    """

    __slots__ = (
        "__weakref__",
        "_calls",
        "_cancellations",
        "_clock",
        "_consecutive",
        "_epoch",
        "_exclude",
        "_fail_max",
        "_failures",
        "_half_open_max",
        "_listeners",
        "_metrics",
        "_min_calls",
        "_open_until",
        "_rate",
        "_rejections",
        "_reset_timeout",
        "_slow",
        "_slow_calls",
        "_state",
        "_state_changes",
        "_successes",
        "_trials",
        "_window",
        "_window_failures",
        "name",
    )

    def __init__(
        self,
        fail_max: int | None = 5,
        reset_timeout: float = 30.0,
        *,
        name: str = "",
        failure_rate_threshold: float | None = None,
        window_size: int = 100,
        minimum_calls: int = 10,
        slow_call_seconds: float | None = None,
        half_open_max_calls: int = 1,
        exclude: tuple[type[BaseException], ...] = (),
        listeners: Iterable[Listener] = (),
        clock: Callable[[], float] = time.monotonic,
        metrics: Metrics | None = None,
    ) -> None:
        where = f"CircuitBreaker({name!r})" if name else "CircuitBreaker"
        if fail_max is not None:
            _checks.count(fail_max, f"{where}: fail_max (or None)")
        _checks.seconds(reset_timeout, f"{where}: reset_timeout", zero=True)
        if failure_rate_threshold is not None and not 0 < failure_rate_threshold <= 1:
            raise ConfigError(
                f"{where}: failure_rate_threshold must be in (0, 1], got {failure_rate_threshold!r}"
            )
        if fail_max is None and failure_rate_threshold is None:
            raise ConfigError(f"{where}: fail_max=None needs a failure_rate_threshold")
        _checks.count(window_size, f"{where}: window_size")
        _checks.count(minimum_calls, f"{where}: minimum_calls")
        if minimum_calls > window_size:
            raise ConfigError(
                f"{where}: minimum_calls must be in 1..window_size ({window_size}), "
                f"got {minimum_calls!r}"
            )
        if slow_call_seconds is not None:
            _checks.seconds(slow_call_seconds, f"{where}: slow_call_seconds")
        _checks.count(half_open_max_calls, f"{where}: half_open_max_calls")
        # Checked at run time too; ``exclude=(KeyError)`` (a bare type) is forgiven.
        given: object = exclude
        if not isinstance(given, tuple):
            given = (given,)
        exc_types = tuple(t for t in given if isinstance(t, type) and issubclass(t, BaseException))
        if len(exc_types) != len(given):
            raise ConfigError(f"{where}: exclude must be a tuple of exception types")
        self.name = name
        self._fail_max = fail_max
        self._reset_timeout = float(reset_timeout)
        self._rate = 1.0 if failure_rate_threshold is None else failure_rate_threshold
        self._min_calls = minimum_calls
        self._slow = slow_call_seconds
        self._half_open_max = half_open_max_calls
        self._exclude = exc_types
        self._listeners: list[Listener] = list(listeners)
        self._clock = clock
        # The window exists only when the rate rule is on, so the closed happy path
        # of a consecutive-only breaker touches no deque.
        self._window: deque[bool] | None = (
            deque(maxlen=window_size) if failure_rate_threshold is not None else None
        )
        self._window_failures = 0
        self._state = _CLOSED
        self._epoch = 0
        self._open_until = 0.0
        self._consecutive = 0
        self._trials = 0
        self._calls = 0
        self._successes = 0
        self._failures = 0
        self._slow_calls = 0
        self._rejections = 0
        self._cancellations = 0
        self._state_changes = 0
        self._metrics: Metrics | None = None
        if metrics is not None:
            self.metrics = metrics

    @property
    def metrics(self) -> Metrics | None:
        """The sink this breaker reports to (None: none).

        Setting it reports the current state and registers the breaker with the sink, which
        reads its state when collected (and so keeps it alive as long as the sink lives).
        """
        return self._metrics

    @metrics.setter
    def metrics(self, metrics: Metrics | None) -> None:
        self._metrics = metrics
        if metrics is not None:
            metrics.breaker_state(self.name, self._state.value)
            # Collecting reads the state, which applies a due open -> half_open.
            metrics.watch(self, _read_state)

    # ------------------------------------------------------------------ observation

    @property
    def state(self) -> BreakerState:
        """The state now (an open breaker whose ``reset_timeout`` has passed is half-open)."""
        return self.state_at(self._clock())

    def state_at(self, now: float) -> BreakerState:
        """The state at ``now``, applying the open -> half_open transition if it is due."""
        if self._state is _OPEN and now >= self._open_until:
            self._transition(_HALF_OPEN, now)
        return self._state

    @property
    def epoch(self) -> int:
        """The current epoch: it changes on every transition and on ``reset()``."""
        return self._epoch

    @property
    def stats(self) -> BreakerStats:
        """A snapshot of the counters."""
        return BreakerStats(
            calls=self._calls,
            successes=self._successes,
            failures=self._failures,
            slow_calls=self._slow_calls,
            rejections=self._rejections,
            cancellations=self._cancellations,
            state_changes=self._state_changes,
            consecutive_failures=self._consecutive,
        )

    def retry_after(self, now: float) -> float:
        """Seconds a caller should wait before trying again; 0 when a call would be admitted.

        Open: exactly the time until ``reset_timeout`` has passed, so a caller that waits
        that long is admitted as a trial (unless other callers took the trial slots first).
        Half-open with every trial slot taken: the trials' outcome is unknown, so the
        answer is the shortest useful wait, ``min(reset_timeout, 1.0)``: if a trial
        succeeds the breaker is closed by then, and if it failed the breaker is open again
        and the next rejection carries the honest open wait.
        """
        state = self.state_at(now)
        if state is _OPEN:
            wait = self._open_until - now
            # Round up by one ulp if needed, so ``now + wait`` really reaches the deadline.
            while now + wait < self._open_until:
                wait = math.nextafter(wait, math.inf)
            return wait
        if state is _HALF_OPEN and self._trials >= self._half_open_max:
            return min(self._reset_timeout, 1.0)
        return 0.0

    # ------------------------------------------------------------------ pure core

    def allow(self, now: float) -> bool:
        """Admit a call at ``now`` (taking a trial slot when half-open), or count a rejection.

        Pair every ``True`` with exactly one ``record_success``, ``record_failure`` or
        ``release``.
        """
        return self._admit(now) >= 0

    def acquire(self, now: float) -> int:
        """Admit a call at ``now`` and return its epoch, for ``record_*``/``release``.

        Raises:
            CircuitOpenError: the breaker is open, or half-open with every trial slot taken.
        """
        epoch = self._admit(now)
        if epoch < 0:
            raise CircuitOpenError(self.retry_after(now), name=self.name)
        return epoch

    def record_success(
        self, now: float, duration: float = 0.0, *, epoch: int | None = None
    ) -> None:
        """Record that an admitted call succeeded after ``duration`` seconds.

        A success slower than ``slow_call_seconds`` is recorded as a failure. ``epoch`` is
        what ``acquire`` returned; outcomes of calls admitted in an earlier epoch are
        counted in ``stats`` only. None means the current epoch.
        """
        if self._slow is not None and duration > self._slow:
            self._slow_calls += 1
            self.record_failure(now, epoch=epoch)
            return
        self._successes += 1
        if self._metrics is not None:
            self._metrics.breaker_call(self.name, "success")
        state = self.state_at(now)
        if epoch is not None and epoch != self._epoch:
            return
        if state is _CLOSED:
            self._consecutive = 0
            if self._window is not None:
                self._push(self._window, False)
                # A success can trip the rate rule too: it may be the call that brings the
                # window to minimum_calls (resilience4j checks after every call as well).
                if self._rate_exceeded(self._window):
                    self._transition(_OPEN, now)
        elif state is _HALF_OPEN:
            self._transition(_CLOSED, now)

    def record_failure(self, now: float, *, epoch: int | None = None) -> None:
        """Record that an admitted call failed at ``now``.

        ``epoch`` is what ``acquire`` returned; outcomes of calls admitted in an earlier
        epoch are counted in ``stats`` only. None means the current epoch.
        """
        self._failures += 1
        if self._metrics is not None:
            self._metrics.breaker_call(self.name, "failure")
        state = self.state_at(now)
        if epoch is not None and epoch != self._epoch:
            return
        if state is _CLOSED:
            self._consecutive += 1
            tripped = self._fail_max is not None and self._consecutive >= self._fail_max
            window = self._window
            if window is not None:
                self._push(window, True)
                tripped = tripped or self._rate_exceeded(window)
            if tripped:
                self._transition(_OPEN, now)
        elif state is _HALF_OPEN:
            self._transition(_OPEN, now)

    def release(self, *, epoch: int | None = None) -> None:
        """Give back an admitted call that was cancelled: neither a success nor a failure."""
        self._cancellations += 1
        if (epoch is None or epoch == self._epoch) and self._trials > 0:
            self._trials -= 1

    def reset(self) -> None:
        """Close the breaker and forget its failure history (``stats`` are kept).

        Calls in flight belong to the old epoch: their outcomes no longer move the state.
        """
        self._transition(_CLOSED, self._clock(), force=True)

    def add_listener(self, listener: Listener) -> None:
        """Tell ``listener(breaker, old_state, new_state)`` of every future transition."""
        self._listeners.append(listener)

    def remove_listener(self, listener: Listener) -> None:
        """Stop telling ``listener`` of transitions.

        Raises:
            ValueError: ``listener`` was not registered.
        """
        self._listeners.remove(listener)

    def _admit(self, now: float) -> int:
        state = self._state
        if state is _CLOSED:
            self._calls += 1
            return self._epoch
        if state is _OPEN:
            state = self.state_at(now)
        if state is _HALF_OPEN and self._trials < self._half_open_max:
            self._trials += 1
            self._calls += 1
            return self._epoch
        self._rejections += 1
        if self._metrics is not None:
            self._metrics.breaker_call(self.name, "rejected")
        return -1

    def _rate_exceeded(self, window: deque[bool]) -> bool:
        size = len(window)
        return size >= self._min_calls and self._window_failures / size >= self._rate

    def _push(self, window: deque[bool], failed: bool) -> None:
        if len(window) == window.maxlen and window[0]:
            self._window_failures -= 1
        window.append(failed)
        if failed:
            self._window_failures += 1

    def _transition(self, new: BreakerState, now: float, *, force: bool = False) -> None:
        old = self._state
        # Every change of state, and every reset, starts a new epoch: outcomes of calls
        # admitted before it must not move the new state (see the module docstring).
        self._epoch += 1
        self._trials = 0
        self._consecutive = 0
        if self._window is not None:
            self._window.clear()
            self._window_failures = 0
        if new is _OPEN:
            self._open_until = now + self._reset_timeout
        self._state = new
        if old is new and force:
            return
        self._state_changes += 1
        # With metrics on, the id of the request whose call moved the breaker. An open
        # breaker stays open for reset_timeout, which spaces these lines out already.
        request_id = current_request_id()
        suffix = "" if request_id is None else f" [request_id={request_id}]"
        if new is _OPEN:
            logger.warning(
                "circuit breaker %r opened; rejecting calls for %gs%s",
                self.name,
                self._reset_timeout,
                suffix,
            )
        else:
            logger.info("circuit breaker %r is %s%s", self.name, new.value, suffix)
        if self._metrics is not None:
            self._metrics.breaker_state(self.name, new.value)
        # Listeners run after the update is complete, so one that reads the breaker sees
        # the new state; one that raises must not break the breaker.
        for listener in tuple(self._listeners):
            try:
                listener(self, old, new)
            except Exception:
                logger.exception("circuit breaker %r: listener %r raised", self.name, listener)

    # ------------------------------------------------------------------ façades

    def _enter(self) -> tuple[int, float]:
        """The one admission of every façade: ``(epoch, start)``, or ``CircuitOpenError``."""
        if self._state is _CLOSED:
            # Closed admission needs no clock reading: the happy path stays cheap.
            self._calls += 1
            epoch = self._epoch
        else:
            epoch = self.acquire(self._clock())
        return epoch, (self._clock() if self._slow is not None else 0.0)

    def _closed_success(self, epoch: int) -> bool:
        """Record a success on the closed fast path (no clock, no window); False when the
        call needs the full ``_finish``."""
        if (
            self._state is _CLOSED
            and epoch == self._epoch
            and self._slow is None
            and self._window is None
        ):
            self._successes += 1
            self._consecutive = 0
            if self._metrics is not None:
                self._metrics.breaker_call(self.name, "success")
            return True
        return False

    def _finish(self, exc: BaseException | None, epoch: int, start: float) -> None:
        if exc is None or (self._exclude and isinstance(exc, self._exclude)):
            if not self._closed_success(epoch):
                now = self._clock()
                self.record_success(now, now - start, epoch=epoch)
        elif isinstance(exc, Exception):
            self.record_failure(self._clock(), epoch=epoch)
        else:
            # Cancellation, KeyboardInterrupt, SystemExit: says nothing about the dependency.
            self.release(epoch=epoch)

    def _push_frame(self) -> None:
        epoch, start = self._enter()
        _FRAMES.set((self, epoch, start, _FRAMES.get()))

    def _pop_frame(self, exc: BaseException | None) -> None:
        frame = _FRAMES.get()
        if frame is not None and frame[0] is self:
            _FRAMES.set(frame[3])
            if exc is None and self._closed_success(frame[1]):
                return
            self._finish(exc, frame[1], frame[2])
            return
        # Not on top: exit in another context than the enter (or out of order). Find our
        # frame if it is there; else record against the current epoch.
        frames: list[_Frame] = []
        while frame is not None and frame[0] is not self:
            frames.append(frame)
            frame = frame[3]
        if frame is None:
            self._finish(exc, self._epoch, self._clock())
            return
        found, rest = frame, frame[3]
        for skipped in reversed(frames):
            rest = (skipped[0], skipped[1], skipped[2], rest)
        _FRAMES.set(rest)
        self._finish(exc, found[1], found[2])

    async def __aenter__(self) -> None:
        """Admit the block, or raise ``CircuitOpenError``."""
        # _push_frame's two lines, not a call to it: the hot path of every guarded block.
        epoch, start = self._enter()
        _FRAMES.set((self, epoch, start, _FRAMES.get()))

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Record the block's outcome; exceptions propagate unchanged."""
        self._pop_frame(exc)

    def __enter__(self) -> None:
        """Admit the block (synchronous code), or raise ``CircuitOpenError``."""
        self._push_frame()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Record the block's outcome; exceptions propagate unchanged."""
        self._pop_frame(exc)

    @overload
    def __call__(
        self, fn: Callable[P, Coroutine[Any, Any, T]]
    ) -> Callable[P, Coroutine[Any, Any, T]]: ...

    @overload
    def __call__(self, fn: Callable[P, T]) -> Callable[P, T]: ...

    def __call__(self, fn: Callable[P, Any]) -> Callable[P, Any]:
        """Decorate a sync or async function so every call goes through the breaker.

        The wrapper keeps the function's signature, name and docstring, and stays sync for
        a sync function.

        Raises:
            CircuitOpenError: (from the wrapper) the breaker rejects the call.
        """
        if inspect.iscoroutinefunction(fn):

            @functools.wraps(fn)
            async def async_wrapper(*args: P.args, **kwargs: P.kwargs) -> Any:
                epoch, start = self._enter()
                try:
                    result = await fn(*args, **kwargs)
                except BaseException as exc:
                    self._finish(exc, epoch, start)
                    raise
                self._finish(None, epoch, start)
                return result

            return async_wrapper

        @functools.wraps(fn)
        def sync_wrapper(*args: P.args, **kwargs: P.kwargs) -> Any:
            epoch, start = self._enter()
            try:
                result = fn(*args, **kwargs)
            except BaseException as exc:
                self._finish(exc, epoch, start)
                raise
            self._finish(None, epoch, start)
            return result

        return sync_wrapper

    @overload
    async def call(
        self, fn: Callable[P, Awaitable[T]], /, *args: P.args, **kwargs: P.kwargs
    ) -> T: ...

    @overload
    async def call(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T: ...

    async def call(self, fn: Callable[P, Any], /, *args: P.args, **kwargs: P.kwargs) -> Any:
        """Call ``fn(*args, **kwargs)`` through the breaker, awaiting its result if awaitable.

        A sync ``fn`` runs inline on the event loop; hand blocking work to
        ``anyio.to_thread.run_sync`` inside ``fn``'s caller instead.

        Raises:
            CircuitOpenError: the breaker rejects the call (``fn`` is not called).
        """
        epoch, start = self._enter()
        try:
            result = fn(*args, **kwargs)
            if inspect.isawaitable(result):
                result = await result
        except BaseException as exc:
            self._finish(exc, epoch, start)
            raise
        self._finish(None, epoch, start)
        return result

    def __repr__(self) -> str:
        return f"CircuitBreaker(name={self.name!r}, state={self._state.value!r})"


def _read_state(breaker: CircuitBreaker) -> object:
    """A metrics refresher: reading the state reports it (a due open -> half_open too)."""
    return breaker.state
