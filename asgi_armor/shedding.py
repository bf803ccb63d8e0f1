"""Load shedding: at most N requests at once, a short fair queue, a fast 503 for the rest.

A server that accepts every request under overload answers all of them slowly, then
none of them. Bounding the work in flight keeps latency flat for the requests that are
admitted and tells the others at once (``503 overloaded`` + ``Retry-After``) to come back
later, while a health check that is exempted keeps answering.

``ConcurrencyLimiter`` is the primitive (usable with no ASGI at all), ``ConcurrencyLimit``
the middleware, and ``AIMDLimit`` an optional adaptive limit in the style of Netflix's
concurrency-limits.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

import anyio

from asgi_armor import _checks
from asgi_armor.errors import ConfigError, Overloaded, send_error
from asgi_armor.routes import RouteMap, target

if TYPE_CHECKING:
    from asgi_armor._asgi import ASGIApp, Message, Receive, Scope, Send
    from asgi_armor.metrics import Metrics

__all__ = ["AIMDLimit", "ConcurrencyLimit", "ConcurrencyLimiter"]


class AIMDLimit:
    """An adaptive concurrency limit: additive increase, multiplicative decrease.

    After each request: if it failed (exception or 5xx) or took longer than
    ``latency_threshold``, the limit is multiplied by ``backoff_ratio``; otherwise, if the
    limit was actually in use (at least half of it in flight), it grows by one. Pure and
    synchronous, so it can be driven without an event loop.

    Args:
        max_limit: the limit never grows above this.
        min_limit: the limit never shrinks below this.
        initial_limit: the starting limit (default ``max_limit``).
        backoff_ratio: factor applied on a bad sample, in (0, 1).
        latency_threshold: seconds above which a request counts as a sign of overload.

    Raises:
        ConfigError: a bound is not a positive integer, ``min_limit > max_limit``, the
            initial limit is outside them, or the ratio or threshold is out of range.
    """

    __slots__ = ("backoff_ratio", "latency_threshold", "limit", "max_limit", "min_limit")

    def __init__(
        self,
        *,
        max_limit: int,
        min_limit: int = 1,
        initial_limit: int | None = None,
        backoff_ratio: float = 0.9,
        latency_threshold: float = 1.0,
    ) -> None:
        self.max_limit = _checks.count(max_limit, "AIMDLimit max_limit", minimum=1)
        self.min_limit = _checks.count(min_limit, "AIMDLimit min_limit", minimum=1)
        if min_limit > max_limit:
            raise ConfigError(f"AIMDLimit min_limit: {min_limit} is above max_limit {max_limit}")
        initial = max_limit if initial_limit is None else initial_limit
        _checks.count(initial, "AIMDLimit initial_limit", minimum=min_limit)
        if initial > max_limit:
            raise ConfigError(f"AIMDLimit initial_limit: {initial} is above max_limit {max_limit}")
        self.limit = initial
        self.backoff_ratio = _checks.number(backoff_ratio, "AIMDLimit backoff_ratio", minimum=0)
        if self.backoff_ratio >= 1:
            raise ConfigError(f"AIMDLimit backoff_ratio: {backoff_ratio!r} must be below 1")
        self.latency_threshold = _checks.number(
            latency_threshold, "AIMDLimit latency_threshold", minimum=0
        )

    def on_sample(self, latency: float, in_flight: int, dropped: bool) -> int:
        """Record one finished request and return the new limit.

        Args:
            latency: how long the request ran, in seconds.
            in_flight: requests in flight when it started finishing (itself included).
            dropped: it failed (an exception or a 5xx answer).
        """
        if dropped or latency > self.latency_threshold:
            self.limit = max(self.min_limit, int(self.limit * self.backoff_ratio))
        elif in_flight * 2 >= self.limit:
            # Only grow a limit that is actually used, or an idle server would
            # "learn" a limit it never tested.
            self.limit = min(self.max_limit, self.limit + 1)
        return self.limit

    def __repr__(self) -> str:
        return f"AIMDLimit(limit={self.limit}, min={self.min_limit}, max={self.max_limit})"


class ConcurrencyLimiter:
    """At most ``max_concurrent`` holders at once, a bounded FIFO queue for the next ones.

    Waiters are served strictly in arrival order, and a released slot is handed straight
    to the oldest waiter, so a newcomer can never overtake the queue. A waiter that is
    cancelled or times out leaves the queue, and if a slot was being handed to it at that
    very moment, the slot goes on to the next waiter: nothing leaks.

    Use ``async with limiter.slot(): ...`` or ``acquire()`` / ``release()``.

    Args:
        max_concurrent: the most holders at once (the ceiling when ``adaptive`` is set).
        max_queue: how many may wait for a slot; 0 means no queue.
        queue_timeout: the longest wait in the queue, in seconds.
        retry_after: the ``Retry-After`` seconds a rejected caller is given.
        adaptive: an optional ``AIMDLimit`` moving the limit with observed latency.
        clock: monotonic seconds, used to measure latency for ``adaptive``.

    Raises:
        ConfigError: a setting is out of range.
    """

    def __init__(
        self,
        max_concurrent: int,
        *,
        max_queue: int = 0,
        queue_timeout: float = 1.0,
        retry_after: float = 1.0,
        adaptive: AIMDLimit | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_concurrent = _checks.count(max_concurrent, "max_concurrent", minimum=1)
        self.max_queue = _checks.count(max_queue, "max_queue", minimum=0)
        self.queue_timeout = _checks.seconds(queue_timeout, "queue_timeout", zero=True)
        self.retry_after = _checks.seconds(retry_after, "retry_after", zero=True)
        if adaptive is not None and not isinstance(adaptive, AIMDLimit):
            raise ConfigError(f"adaptive: {adaptive!r} is not an AIMDLimit")
        self.adaptive = adaptive
        self.clock = clock
        self._in_flight = 0
        # An OrderedDict is a FIFO with O(1) removal from the middle (a waiter that gives up).
        self._waiters: OrderedDict[anyio.Event, None] = OrderedDict()
        self._admitted = 0
        self._shed = 0
        self._max_seen = 0

    @property
    def limit(self) -> int:
        """The current limit: ``max_concurrent``, or lower when an adaptive limit says so."""
        if self.adaptive is None:
            return self.max_concurrent
        return min(self.max_concurrent, self.adaptive.limit)

    @property
    def in_flight(self) -> int:
        """Slots held right now."""
        return self._in_flight

    @property
    def queued(self) -> int:
        """Callers waiting for a slot right now."""
        return len(self._waiters)

    @property
    def admitted(self) -> int:
        """Slots granted since start."""
        return self._admitted

    @property
    def shed(self) -> int:
        """Callers rejected since start (queue full or queue timeout)."""
        return self._shed

    @property
    def max_seen(self) -> int:
        """The highest number of slots ever held at once."""
        return self._max_seen

    def _grant(self) -> None:
        self._in_flight += 1
        self._admitted += 1
        self._max_seen = max(self._max_seen, self._in_flight)

    def _wake(self) -> None:
        limit = self.limit
        while self._waiters and self._in_flight < limit:
            event, _ = self._waiters.popitem(last=False)
            # The slot is taken on the waiter's behalf before it even runs, so no
            # newcomer can slip in between.
            self._grant()
            event.set()

    def _reject(self) -> Overloaded:
        self._shed += 1
        return Overloaded(self.retry_after)

    async def acquire(self) -> None:
        """Take a slot, waiting in the queue if there is room in it.

        Raises:
            Overloaded: the queue is full, or the wait exceeded ``queue_timeout``.
        """
        if not self._waiters and self._in_flight < self.limit:
            self._grant()
            return
        if len(self._waiters) >= self.max_queue:
            raise self._reject()
        event = anyio.Event()
        self._waiters[event] = None
        granted = False
        try:
            with anyio.move_on_after(self.queue_timeout):
                await event.wait()
            # Checked even after a timeout: a slot handed over at the last moment is ours.
            granted = event.is_set()
        finally:
            if not granted:
                if event.is_set():
                    # Cancelled just as the slot was handed over: pass it on.
                    self.release()
                else:
                    del self._waiters[event]
        if not granted:
            raise self._reject()

    def release(self, latency: float | None = None, *, dropped: bool = False) -> None:
        """Give a slot back.

        Args:
            latency: how long the slot was held; feeds the adaptive limit (None: no sample,
                e.g. the work was cancelled, which says nothing about the server's health).
            dropped: the work failed (an exception or a 5xx answer).
        """
        if self.adaptive is not None and latency is not None:
            self.adaptive.on_sample(latency, self._in_flight, dropped)
        self._in_flight -= 1
        self._wake()

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """Hold a slot for the duration of the block.

        Raises:
            Overloaded: no slot could be had (see ``acquire``).
        """
        await self.acquire()
        start = self.clock()
        latency: float | None = None
        dropped = False
        try:
            yield
        except Exception:
            latency, dropped = self.clock() - start, True
            raise
        else:
            latency = self.clock() - start
        finally:
            self.release(latency, dropped=dropped)

    def __repr__(self) -> str:
        return (
            f"ConcurrencyLimiter(limit={self.limit}, in_flight={self._in_flight}, "
            f"queued={len(self._waiters)}, max_queue={self.max_queue})"
        )


class ConcurrencyLimit:
    """Middleware: at most ``max_concurrent`` requests in the app; 503 overloaded for the excess.

    Requests beyond the limit wait in a FIFO queue of at most ``max_queue`` for at most
    ``queue_timeout`` seconds; beyond the queue, or after the wait, they are answered
    ``503 overloaded`` with ``Retry-After``. Requests matching an ``exempt`` route (health
    checks) bypass the limit and are not counted. The counters (``in_flight``, ``queued``,
    ``shed``, ``max_seen``, ``admitted``) are those of ``self.limiter``.

    Args:
        app: the ASGI app to wrap.
        max_concurrent: the most requests in the app at once.
        max_queue: how many requests may wait for a slot; 0 means none.
        queue_timeout: the longest wait in the queue, in seconds.
        retry_after: the ``Retry-After`` seconds sent with the 503.
        exempt: route patterns that bypass the limit.
        adaptive: an optional ``AIMDLimit`` (``max_concurrent`` stays the ceiling).
        clock: monotonic seconds, used to measure latency for ``adaptive``.
        metrics: the sink whose ``armor_shedding_in_flight`` / ``armor_shedding_queued``
            gauges read this limit when collected (no cost per request).

    Raises:
        ConfigError: a setting is out of range or an exempt pattern is invalid.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        max_concurrent: int,
        max_queue: int = 0,
        queue_timeout: float = 1.0,
        retry_after: float = 1.0,
        exempt: Iterable[str] = ("GET /healthz",),
        adaptive: AIMDLimit | None = None,
        clock: Callable[[], float] = time.monotonic,
        metrics: Metrics | None = None,
    ) -> None:
        if isinstance(exempt, str):
            raise ConfigError(f"exempt: {exempt!r} must be a list of route patterns, not a string")
        self.app = app
        self.limiter = ConcurrencyLimiter(
            max_concurrent,
            max_queue=max_queue,
            queue_timeout=queue_timeout,
            retry_after=retry_after,
            adaptive=adaptive,
            clock=clock,
        )
        self.exempt: RouteMap[bool] = RouteMap((pattern, True) for pattern in exempt)
        self.clock = clock
        if metrics is not None:
            # Read when the sink is collected, so the gauges cost nothing per request.
            metrics.watch(
                self.limiter, lambda limiter: metrics.shedding(limiter.in_flight, limiter.queued)
            )

    @property
    def in_flight(self) -> int:
        """Requests in the app right now (exempt ones not counted)."""
        return self.limiter.in_flight

    @property
    def queued(self) -> int:
        """Requests waiting for a slot right now."""
        return self.limiter.queued

    @property
    def shed(self) -> int:
        """Requests answered 503 overloaded since start."""
        return self.limiter.shed

    @property
    def max_seen(self) -> int:
        """The most requests ever in the app at once."""
        return self.limiter.max_seen

    @property
    def admitted(self) -> int:
        """Requests let into the app since start (exempt ones not counted)."""
        return self.limiter.admitted

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if (kind != "http" and kind != "websocket") or (
            self.exempt and self.exempt.first(*target(scope)) is not None
        ):
            await self.app(scope, receive, send)
        else:
            await self.run(scope, receive, send, self.app, None)

    def match(self, method: str, path: str) -> bool | None:
        """True when shedding applies to ``(method, path)``, None when it is exempt."""
        return None if self.exempt and self.exempt.first(method, path) is not None else True

    async def run(
        self, scope: Scope, receive: Receive, send: Send, app: ASGIApp, spec: object
    ) -> None:
        """Run ``app`` holding a slot, after waiting for one in the queue (or refuse: 503)."""
        kind = scope["type"]
        limiter = self.limiter
        try:
            await limiter.acquire()
        except Overloaded as exc:
            await send_error(scope, send, exc)
            return
        if kind == "websocket":
            # An open connection holds its slot for as long as it lives; how long it
            # lived says nothing about the app's latency, so it does not feed AIMD.
            try:
                await app(scope, receive, send)
            finally:
                limiter.release(None, dropped=False)
            return

        status = 0

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        start = self.clock()
        latency: float | None = None
        dropped = False
        try:
            await app(scope, receive, send_status)
        except Exception:
            latency, dropped = self.clock() - start, True
            raise
        else:
            latency = self.clock() - start
            dropped = status >= 500
        finally:
            # A cancelled request leaves latency None: it is no evidence either way.
            limiter.release(latency, dropped=dropped)

    def __repr__(self) -> str:
        return f"ConcurrencyLimit({self.limiter!r})"
