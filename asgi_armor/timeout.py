"""Request timeouts: ``with_timeout`` for one call, ``TimeoutMiddleware`` for whole requests.

Both run the work under a deadline, so work that overruns its budget is *cancelled* (its
``finally`` blocks and ``async with`` exits run), never abandoned in the background. A
cancellation that comes from outside (server shutdown, an enclosing timeout) is never
mistaken for this timeout and always propagates.

``TimeoutMiddleware`` sits on the path of every request, so on asyncio it does not pay for
an anyio cancel scope and a timer per request (about 9 us, most of the cost of the whole
stack): one ``_Watchdog`` per event loop keeps the pending requests in arrival order and
arms a single timer for the earliest deadline; an expired request's task is cancelled the
way anyio's cancel scopes do it (again while the work swallows the cancellation, not
inside an anyio shielded scope entered by the work), and the cancellation is taken back
with ``Task.uncancel`` when it was ours alone. On trio (and any other backend) the
request runs in an anyio cancel scope with a deadline, which trio makes cheap.
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
import logging
import math
import threading
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any, TypeVar

import anyio

from asgi_armor._asgi import scope_state
from asgi_armor.errors import ConfigError, RequestTimeout, ensure_request_id, send_error
from asgi_armor.routes import RouteMap

if TYPE_CHECKING:
    from asgi_armor._asgi import ASGIApp, Message, Receive, Scope, Send

__all__ = ["DEADLINE_CLOCK_KEY", "DEADLINE_KEY", "TimeoutMiddleware", "remaining", "with_timeout"]

T = TypeVar("T")

logger = logging.getLogger("asgi_armor")

_running_loop = asyncio.events._get_running_loop  # None outside asyncio (on trio)
_anyio_time = anyio.current_time
_get_ident = threading.get_ident
_current_task = asyncio.current_task

_anyio_task_states: Any = None  # anyio's per-task cancel-scope stacks, loaded on first use


def _task_states() -> Any:
    """anyio's asyncio task states (to honour shielded scopes), or False if unavailable."""
    global _anyio_task_states
    if _anyio_task_states is None:
        try:
            module = importlib.import_module("anyio._backends._asyncio")
            _anyio_task_states = getattr(module, "_task_states", False)
        except ImportError:  # pragma: no cover - another anyio layout: no shields seen
            _anyio_task_states = False
    return _anyio_task_states


#: Seconds between two deliveries of the cancellation to work that has not stopped yet
#: (it swallowed the CancelledError, or sits in a shielded scope).
_REDELIVER = 0.001

_RUNNING, _DONE, _FIRED = 0, 1, 2


def _anyio_scope(task: asyncio.Task[Any]) -> Any:
    """The innermost anyio cancel scope ``task`` is in (None if none, or unknown)."""
    states = _anyio_task_states if _anyio_task_states is not None else _task_states()
    if states is False:
        return None
    try:
        state = states.get(task)
        return None if state is None else state.cancel_scope
    except Exception:  # pragma: no cover - anyio internals changed
        return None


class _Pending:
    """One timed request on asyncio: its deadline, its task, and how it ended."""

    __slots__ = ("cancelling", "cancels", "deadline", "outer_scope", "state", "task")

    def __init__(self, deadline: float, task: asyncio.Task[Any]) -> None:
        self.deadline = deadline
        self.task = task
        self.state = _RUNNING
        self.cancels = 0  # Task.cancel() calls made for this request, taken back at the end
        self.cancelling = task.cancelling()  # cancellation requests already pending at entry
        self.outer_scope = _anyio_scope(task)

    def shielded(self) -> bool:
        """Whether the work is inside an anyio shielded scope it entered itself."""
        scope = _anyio_scope(self.task)
        while scope is not None and scope is not self.outer_scope:
            if getattr(scope, "shield", False):
                return True
            scope = getattr(scope, "_parent_scope", None)
        return False

    def deliver(self) -> None:
        """Cancel the task unless a cancellation is already on its way (as anyio does)."""
        task = self.task
        if task.done() or getattr(task, "_must_cancel", False):
            return
        waiter = getattr(task, "_fut_waiter", None)
        if isinstance(waiter, asyncio.Future) and waiter.done():
            return
        if self.shielded():
            return
        task.cancel("request timed out")
        self.cancels += 1

    def close(self) -> bool:
        """Mark the request finished, take back our cancellations; True if it timed out."""
        fired = self.state == _FIRED
        self.state = _DONE
        task = self.task
        for _ in range(self.cancels):
            task.uncancel()
        self.cancels = 0
        return fired


class _Watchdog:
    """One event loop's timed requests, under a single timer for the earliest deadline.

    Requests with the same budget expire in arrival order, so each budget has a FIFO
    queue; finished requests are dropped from the front lazily (they mostly finish in
    order too), which keeps the queues about as long as the number of requests in flight.
    """

    __slots__ = ("fired", "handle", "loop", "queues", "when")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.queues: dict[float, deque[_Pending]] = {}
        self.fired: list[_Pending] = []
        self.handle: asyncio.TimerHandle | None = None
        self.when = math.inf

    def add(self, pending: _Pending, budget: float) -> None:
        queue = self.queues.get(budget)
        if queue is None:
            queue = self.queues[budget] = deque()
        while queue and queue[0].state != _RUNNING:
            queue.popleft()
        queue.append(pending)
        if pending.deadline < self.when:
            self._arm(pending.deadline)

    def _arm(self, when: float) -> None:
        if self.handle is not None:
            self.handle.cancel()
        self.when = when
        self.handle = self.loop.call_at(when, self._run)

    def _run(self) -> None:
        self.handle = None
        self.when = math.inf
        now = self.loop.time()
        following = math.inf
        for queue in self.queues.values():
            while queue:
                pending = queue[0]
                if pending.state != _RUNNING:
                    queue.popleft()
                elif pending.deadline <= now:
                    queue.popleft()
                    pending.state = _FIRED
                    self.fired.append(pending)
                else:
                    following = min(following, pending.deadline)
                    break
        # Expired work that has not finished is cancelled again until it does, as anyio's
        # level-triggered cancel scopes do.
        self.fired = [pending for pending in self.fired if pending.state == _FIRED]
        for pending in self.fired:
            pending.deliver()
        if self.fired:
            following = min(following, now + _REDELIVER)
        if following != math.inf:
            self._arm(following)


#: ``scope["state"]`` key holding the request's absolute deadline (seconds on the clock below).
DEADLINE_KEY = "deadline"
#: ``scope["state"]`` key holding the clock the deadline is expressed on.
DEADLINE_CLOCK_KEY = "armor_deadline_clock"


def _check_seconds(seconds: object, entry: str) -> float:
    if isinstance(seconds, bool) or not isinstance(seconds, int | float):
        raise ConfigError(f"{entry}: {seconds!r} is not a number of seconds")
    if not seconds > 0 or seconds == float("inf"):
        raise ConfigError(f"{entry}: {seconds!r} must be a finite number of seconds > 0")
    return float(seconds)


async def with_timeout(
    awaitable_or_fn: Awaitable[T] | Callable[[], Awaitable[T]], seconds: float | None
) -> T:
    """Await an awaitable, or a zero-argument async callable's result, for at most ``seconds``.

    The work is cancelled when the time is up, so its cleanup code runs before this raises.
    A ``TimeoutError`` the work raises by itself is not converted, and a cancellation from
    an enclosing scope propagates unchanged. ``seconds`` may come straight from
    :func:`remaining`: ``0`` means already expired, ``None`` means no limit.

    Args:
        awaitable_or_fn: a coroutine or other awaitable, or a callable returning one; a
            callable is only called inside the time budget.
        seconds: the budget; negative counts as 0, None as no limit.

    Raises:
        RequestTimeout: the budget ran out (504, "Request timed out after 5s").
        ValueError: ``seconds`` is NaN.
    """
    if seconds is not None and seconds != seconds:
        raise ValueError("with_timeout: seconds is NaN")
    budget = None if seconds is None else max(0.0, float(seconds))
    with anyio.move_on_after(budget):
        # A callable is called inside the scope so that its set-up is on the budget too.
        awaitable = awaitable_or_fn if inspect.isawaitable(awaitable_or_fn) else awaitable_or_fn()
        return await awaitable
    # Only reached when *this* scope's deadline cancelled the work: the scope re-raises
    # an outer cancellation instead of swallowing it.
    raise RequestTimeout(budget)


def remaining(scope: Scope) -> float | None:
    """Seconds left in this request's budget (never negative), or None when it has none.

    Made for budgeting inner calls: ``with anyio.fail_after(remaining(scope)): ...``
    (``fail_after(None)`` means no limit).

    Args:
        scope: the ASGI scope, after ``TimeoutMiddleware`` set its deadline.
    """
    state = scope.get("state") or {}
    deadline: float | None = state.get(DEADLINE_KEY)
    if deadline is None:
        return None
    clock: Callable[[], float] = state.get(DEADLINE_CLOCK_KEY) or anyio.current_time
    return max(0.0, deadline - clock())


class TimeoutMiddleware:
    """Give each request a time budget; answer 504 or abort the connection when it runs out.

    The app runs inside an anyio cancel scope whose deadline is the budget, reading the
    request body included (a slow upload is bounded too). When the deadline passes:

    * before the app started its response: the app is cancelled (its ``finally`` blocks
      run) and the client gets ``504 timeout`` "Request timed out after 5s", sent through
      ``send`` so outer layers (idempotency) see an ordinary 5xx response;
    * after the response started: ``RequestTimeout`` is raised so the server aborts the
      connection; a second ``http.response.start`` or a truncated body passed off as
      complete would both be lies to the client.

    The absolute deadline is stored in ``scope["state"]["deadline"]``, in seconds on
    ``clock`` (by default ``anyio.current_time()``, the clock cancel scopes use, so
    ``anyio.CancelScope(deadline=scope["state"]["deadline"])`` works as is); use
    :func:`remaining` to get the seconds left whatever the clock. A tighter deadline
    already set by an outer layer is kept.

    Args:
        app: the ASGI app to wrap.
        routes: ``{"GET /api/search": 5.0}`` or ``[(pattern, seconds), ...]``; the first
            matching route wins.
        default: budget for requests matching no route; None means no timeout.
        clock: monotonic seconds the stored deadline is expressed on.

    Raises:
        ConfigError: a route pattern is invalid or a budget is not a positive number.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        routes: Mapping[str, float] | Iterable[tuple[str, float]] = (),
        default: float | None = None,
        clock: Callable[[], float] = anyio.current_time,
    ) -> None:
        entries = list(routes.items()) if isinstance(routes, Mapping) else list(routes)
        checked: list[tuple[str, float]] = []
        for entry in entries:
            try:
                pattern, seconds = entry
            except (TypeError, ValueError):
                msg = f"timeout routes: {entry!r} is not a (route, seconds) pair"
                raise ConfigError(msg) from None
            checked.append((pattern, _check_seconds(seconds, f"timeout {pattern!r}")))
        self.app = app
        self.routes: RouteMap[float] = RouteMap(checked)
        self.default = None if default is None else _check_seconds(default, "timeout default")
        self.clock = clock
        self._watchdogs: dict[int, _Watchdog] = {}  # by thread: the loop running there

    def _asyncio_watchdog(self) -> _Watchdog | None:
        """The watchdog of the asyncio loop running in this thread (None: not asyncio).

        Looked up by thread, because asking asyncio for the running loop costs a system
        call (getpid) per request; a loop still running in this thread is the one.
        """
        thread = _get_ident()
        watchdog = self._watchdogs.get(thread)
        if watchdog is not None and watchdog.loop.is_running():
            return watchdog
        loop = _running_loop()
        if loop is None:
            return None
        for key, other in list(self._watchdogs.items()):
            if other.loop.is_closed():
                del self._watchdogs[key]  # forget loops that are gone (tests, restarts)
        watchdog = self._watchdogs[thread] = _Watchdog(loop)
        return watchdog

    def budget_for(self, method: str, path: str) -> float | None:
        """The budget in seconds for a request, or None when it has none."""
        found = self.routes.first(method, path)
        return self.default if found is None else found[0]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        budget = self.budget_for(scope["method"], scope["path"])
        if budget is None:
            await self.app(scope, receive, send)
            return

        watchdog = self._asyncio_watchdog()
        loop = None if watchdog is None else watchdog.loop
        state = scope_state(scope)
        clock = self.clock
        # On asyncio anyio's clock is the loop's: read it without anyio's backend lookup.
        deadline = (loop.time() if clock is _anyio_time and loop is not None else clock()) + budget
        outer_deadline = state.get(DEADLINE_KEY)
        if outer_deadline is None or state.get(DEADLINE_CLOCK_KEY) is not self.clock:
            state[DEADLINE_KEY] = deadline
            state[DEADLINE_CLOCK_KEY] = self.clock
        elif deadline < outer_deadline:
            state[DEADLINE_KEY] = deadline

        response_started = False
        response_complete = False

        async def send_tracking(message: Message) -> None:
            nonlocal response_started, response_complete
            if message["type"] == "http.response.start":
                response_started = True
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                response_complete = True
            await send(message)

        task = None if loop is None else _current_task(loop)
        if watchdog is not None and loop is not None and task is not None:
            # asyncio: the shared watchdog instead of a cancel scope and a timer per request.
            pending = _Pending(loop.time() + budget, task)
            watchdog.add(pending, budget)
            timed_out = False
            try:
                try:
                    await self.app(scope, receive, send_tracking)
                finally:
                    timed_out = pending.close()
            except asyncio.CancelledError:
                # Ours alone: swallowed; one from outside (or also from outside): re-raised.
                if not timed_out or task.cancelling() > pending.cancelling:
                    raise
            except Exception:
                if not timed_out:
                    raise
                # Cleanup code that fails while being cancelled: the root cause is still
                # the timeout, and the client should hear that, not a 500.
                logger.warning(
                    "exception while cancelling a timed out request [request_id=%s]",
                    ensure_request_id(scope),
                    exc_info=True,
                )
            if not timed_out or response_complete:
                return
            if response_started:
                logger.warning(
                    "aborting response that timed out after %gs [request_id=%s]",
                    budget,
                    ensure_request_id(scope),
                )
                raise RequestTimeout(budget)
            await send_error(scope, send, RequestTimeout(budget))
            return

        cancel_scope = anyio.CancelScope(deadline=anyio.current_time() + budget)
        try:
            with cancel_scope:
                await self.app(scope, receive, send_tracking)
        except Exception:
            if not cancel_scope.cancel_called:
                raise
            # Cleanup code that fails while being cancelled: the root cause is still
            # the timeout, and the client should hear that, not a 500.
            logger.warning(
                "exception while cancelling a timed out request [request_id=%s]",
                ensure_request_id(scope),
                exc_info=True,
            )
        if not cancel_scope.cancel_called or response_complete:
            # Either no timeout, or the response was fully sent and only work after it
            # was cut short: the client already has its answer.
            return
        if response_started:
            logger.warning(
                "aborting response that timed out after %gs [request_id=%s]",
                budget,
                ensure_request_id(scope),
            )
            raise RequestTimeout(budget)
        await send_error(scope, send, RequestTimeout(budget))

    def __repr__(self) -> str:
        return f"TimeoutMiddleware(routes={len(self.routes)}, default={self.default!r})"
