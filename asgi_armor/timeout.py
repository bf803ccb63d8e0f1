"""Request timeouts: ``with_timeout`` for one call, ``TimeoutMiddleware`` for whole requests.

Both run the work under a deadline, so work that overruns its budget is *cancelled* (its
``finally`` blocks and ``async with`` exits run), never abandoned in the background. A
cancellation that comes from outside (server shutdown, an enclosing timeout) is never
mistaken for this timeout and always propagates.

On asyncio ``TimeoutMiddleware`` keeps no timer per request: one deadline sweep (per
middleware and event loop) holds the requests in flight, one queue per budget (deadlines
in a queue are in arrival order), and a single loop timer set to the earliest deadline
cancels the overdue requests' tasks through ``Task.cancel``/``Task.uncancel``, as
``asyncio.timeout`` does (a timer handle per request was the largest single cost of the
served stack, more so under uvloop, where each handle is a libuv timer). On trio it uses
an anyio cancel scope. On asyncio the work is cancelled once at the deadline, so an app
that swallows the cancellation keeps running, as it would under ``asyncio.timeout`` or
``asyncio.wait_for``; anyio shielded scopes in the app's cleanup are honoured.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import math
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import TYPE_CHECKING, TypeVar

import anyio

from asgi_armor import _checks
from asgi_armor._asgi import scope_state
from asgi_armor.errors import ConfigError, RequestTimeout, ensure_request_id, send_error
from asgi_armor.routes import RouteMap, target

if TYPE_CHECKING:
    from asgi_armor._asgi import ASGIApp, Message, Receive, Scope, Send

__all__ = [
    "DEADLINE_CLOCK_KEY",
    "DEADLINE_KEY",
    "Progress",
    "TimeoutMiddleware",
    "remaining",
    "with_timeout",
]

T = TypeVar("T")

logger = logging.getLogger("asgi_armor")

_anyio_time = anyio.current_time


#: ``scope["state"]`` key holding the request's absolute deadline (seconds on the clock below).
DEADLINE_KEY = "deadline"
#: ``scope["state"]`` key holding the clock the deadline is expressed on.
DEADLINE_CLOCK_KEY = "armor_deadline_clock"


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


class Progress:
    """How far a response got: ``started`` (``http.response.start`` sent) and ``complete``
    (its last body chunk sent)."""

    __slots__ = ("complete", "started")

    def __init__(self) -> None:
        self.started = False
        self.complete = False

    def track(self, message: Message) -> None:
        """Follow one message sent: the start, then the last one (a body chunk without
        ``more_body``, a ``pathsend``, the last trailers)."""
        if message["type"] == "http.response.start":
            self.started = True
        elif not message.get("more_body", False) and not message.get("more_trailers", False):
            self.complete = True


def _running_loop() -> asyncio.AbstractEventLoop | None:
    """The running asyncio loop, or None on trio."""
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


class _Entry:
    """One request under a sweep: its deadline, its task, and how it ended."""

    __slots__ = ("cancelling", "deadline", "expired", "queue", "task")

    def __init__(
        self, deadline: float, task: asyncio.Task[object], queue: dict[_Entry, None]
    ) -> None:
        self.deadline = deadline
        self.task = task
        self.queue = queue
        # Cancellations already requested when the request started: ours is one more, and
        # only ours is turned into the timeout (asyncio.timeout's rule).
        self.cancelling = task.cancelling()
        self.expired = False


class _Sweep:
    """The requests in flight on one event loop and the one timer that cancels the overdue."""

    __slots__ = ("_at", "_handle", "loop", "queues")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        # One queue per budget, so each is in deadline order; dicts, so a request that
        # ends removes itself in O(1) wherever it is.
        self.queues: dict[float, dict[_Entry, None]] = {}
        self._handle: asyncio.TimerHandle | None = None
        self._at = math.inf

    def add(self, budget: float, task: asyncio.Task[object]) -> _Entry:
        queue = self.queues.get(budget)
        if queue is None:
            queue = self.queues[budget] = {}
        entry = _Entry(self.loop.time() + budget, task, queue)
        queue[entry] = None
        if entry.deadline < self._at:
            self._schedule(entry.deadline)
        return entry

    def _schedule(self, when: float) -> None:
        if self._handle is not None:
            self._handle.cancel()
        self._at = when
        self._handle = self.loop.call_at(when, self._sweep)

    def _sweep(self) -> None:
        self._handle = None
        self._at = math.inf
        now = self.loop.time()
        following = math.inf
        for budget, queue in list(self.queues.items()):
            overdue: list[_Entry] = []
            for entry in queue:
                if entry.deadline > now:
                    following = min(following, entry.deadline)
                    break
                overdue.append(entry)
            for entry in overdue:
                del queue[entry]
                entry.expired = True
                entry.task.cancel()
            if not queue:
                del self.queues[budget]
        if following < math.inf:
            self._schedule(following)


class TimeoutMiddleware:
    """Give each request a time budget; answer 504 or abort the connection when it runs out.

    The app runs under a deadline (the loop's deadline sweep on asyncio, an anyio cancel
    scope on trio), reading the request body included (a slow upload is bounded too).
    When the deadline passes:

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
            checked.append((pattern, _checks.seconds(seconds, f"timeout {pattern!r}")))
        self.app = app
        self.routes: RouteMap[float] = RouteMap(checked)
        self.default = None if default is None else _checks.seconds(default, "timeout default")
        self.clock = clock
        self._sweep: _Sweep | None = None

    def budget_for(self, method: str, path: str) -> float | None:
        """The budget in seconds for a request, or None when it has none."""
        found = self.routes.first(method, path)
        return self.default if found is None else found[0]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        budget = self.budget_for(*target(scope))
        if budget is None:
            await self.app(scope, receive, send)
        else:
            await self.run(scope, receive, send, self.app, budget)

    async def run(
        self, scope: Scope, receive: Receive, send: Send, app: ASGIApp, budget: float
    ) -> None:
        """Run ``app`` within ``budget`` seconds (the rules above)."""
        progress = Progress()

        async def send_tracking(message: Message) -> None:
            progress.track(message)
            await send(message)

        await self.run_tracked(scope, receive, send_tracking, app, budget, progress)

    async def run_tracked(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        app: ASGIApp,
        budget: float,
        progress: Progress,
    ) -> None:
        """:meth:`run`, where ``progress`` already follows what ``app`` sends to ``send``
        (the pipeline's own ``send`` wrapper does), so no second wrapper is needed."""
        loop = _running_loop()
        state = scope_state(scope)
        clock = self.clock
        # On asyncio anyio's clock is the loop's: read it without anyio's backend lookup.
        deadline = (loop.time() if clock is _anyio_time and loop is not None else clock()) + budget
        outer_deadline = state.get(DEADLINE_KEY)
        if outer_deadline is None or state.get(DEADLINE_CLOCK_KEY) is not clock:
            state[DEADLINE_KEY] = deadline
            state[DEADLINE_CLOCK_KEY] = clock
        elif deadline < outer_deadline:
            state[DEADLINE_KEY] = deadline

        task = None if loop is None else asyncio.current_task(loop)
        if loop is not None and task is not None:
            sweep = self._sweep
            if sweep is None or sweep.loop is not loop:
                # One sweep per middleware and event loop: a middleware serves one loop
                # (a new one, in tests, replaces the old sweep and lets its loop go).
                sweep = self._sweep = _Sweep(loop)
            entry = sweep.add(budget, task)
            try:
                await app(scope, receive, send)
            except asyncio.CancelledError:
                # Ours only when the sweep cancelled this task and no one else did too.
                if not (entry.expired and task.uncancel() <= entry.cancelling):
                    raise
                entry.expired = False  # uncancelled already
                timed_out = True
            except Exception:
                if not entry.expired:
                    raise
                self._log_cleanup_failure(scope)
                timed_out = True
            else:
                timed_out = entry.expired
            finally:
                entry.queue.pop(entry, None)
            if entry.expired:
                # The app swallowed our cancellation (or failed while cleaning up):
                # take it back, as asyncio.timeout does on exit.
                task.uncancel()
        else:
            cancel_scope = anyio.CancelScope(deadline=anyio.current_time() + budget)
            try:
                with cancel_scope:
                    await app(scope, receive, send)
            except Exception:
                if not cancel_scope.cancel_called:
                    raise
                self._log_cleanup_failure(scope)
            timed_out = cancel_scope.cancel_called
        if not timed_out or progress.complete:
            # Either no timeout, or the response was fully sent and only work after it
            # was cut short: the client already has its answer.
            return
        if progress.started:
            logger.warning(
                "aborting response that timed out after %gs [request_id=%s]",
                budget,
                ensure_request_id(scope),
            )
            raise RequestTimeout(budget)
        await send_error(scope, send, RequestTimeout(budget))

    @staticmethod
    def _log_cleanup_failure(scope: Scope) -> None:
        # Cleanup code that fails while being cancelled: the root cause is still the
        # timeout, and the client should hear that, not a 500.
        logger.warning(
            "exception while cancelling a timed out request [request_id=%s]",
            ensure_request_id(scope),
            exc_info=True,
        )

    def __repr__(self) -> str:
        return f"TimeoutMiddleware(routes={len(self.routes)}, default={self.default!r})"
