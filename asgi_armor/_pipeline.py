"""The compiled pipeline: every configured protection as one ASGI callable.

Per HTTP request it picks the request id, computes the canonical target once, looks up
one cached plan per ``(method, path)`` and runs the checks that apply, in the canonical
order, with one ``send`` wrapper (request id, rate-limit headers) and one exception
boundary. The checks are the middleware classes' own methods (``admit``, ``guard``,
``decide``, ``run``): a class used by hand and the pipeline share every rule
(docs/architecture.md, "Request flow").
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Final

from asgi_armor._context import CONTEXT_KEY
from asgi_armor.errors import (
    _STATE_FORMAT,
    STATE_ON_RESPONSE,
    ErrorMiddleware,
    _run_on_response,
    _with_id,
    ensure_request_id,
    send_error,
)
from asgi_armor.routes import target
from asgi_armor.timeout import Progress

if TYPE_CHECKING:
    from asgi_armor._context import ArmorContext
    from asgi_armor._types import ASGIApp, Message, Receive, Scope, Send
    from asgi_armor.idempotency import IdempotencyMiddleware
    from asgi_armor.metrics import RequestMetrics
    from asgi_armor.ratelimit.middleware import RateLimitMiddleware
    from asgi_armor.ratelimit.middleware import _Plan as RatePlan
    from asgi_armor.shedding import ConcurrencyLimit
    from asgi_armor.signing import SignatureMiddleware
    from asgi_armor.timeout import TimeoutMiddleware
    from asgi_armor.validation import InputLimits

__all__ = ["Pipeline"]

#: A layer's ``run(scope, receive, send, app, spec)``: the layer around ``app``.
Run = Callable[["Scope", "Receive", "Send", "ASGIApp", Any], Awaitable[None]]

# Plans kept per (method, path): at most this many, of short paths only, so the cache
# stays small whatever paths clients invent.
_PLAN_CACHE: Final = 1024
_PLAN_CACHE_PATH: Final = 256


class _Step:
    """A layer's ``run`` bound to the app it wraps and the spec it matched."""

    __slots__ = ("app", "run", "spec")

    def __init__(self, run: Run, app: ASGIApp, spec: object) -> None:
        self.run = run
        self.app = app
        self.spec = spec

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.run(scope, receive, send, self.app, self.spec)


def _chain(app: ASGIApp, steps: list[tuple[Run, object]]) -> ASGIApp:
    """``steps`` (outermost first) around ``app``, as one ASGI callable."""
    for run, spec in reversed(steps):
        app = _Step(run, app, spec)
    return app


class _Exchange(Progress):
    """One request's response on its way out: the request id and the rate-limit headers
    added to it, and how far it got."""

    __slots__ = ("_receive", "_send", "added", "gone", "id_header", "state", "status")

    def __init__(
        self,
        receive: Receive,
        send: Send,
        id_header: tuple[bytes, bytes],
        state: dict[str, Any],
    ) -> None:
        self.started = False
        self.complete = False
        self.gone = False  # http.disconnect came before the response was complete
        self.status = 500
        self._receive = receive
        self._send = send
        self.id_header = id_header
        self.state = state
        self.added: list[tuple[bytes, bytes]] | None = None

    async def receive(self) -> Message:
        message = await self._receive()
        # After the response, uvicorn answers every receive with http.disconnect (ASGI
        # spec 2.3), and Starlette's streaming responses listen for it: not a client gone.
        if message["type"] == "http.disconnect" and not self.complete:
            self.gone = True
        return message

    async def send(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.started = True
            self.status = message["status"]
            headers = message.get("headers", ())
            if self.added is not None:
                headers = [*headers, *self.added]
            # The id last, as ErrorMiddleware, outermost, puts it when the classes compose.
            message["headers"] = _with_id(headers, self.id_header)
            if STATE_ON_RESPONSE in self.state:
                # Checks made inside the app see the response start (their headers, the
                # failures-only tokens a dependency gives back).
                await _run_on_response(self.state, message)
        elif not message.get("more_body", False) and not message.get("more_trailers", False):
            self.complete = True  # Progress.track's rule, inline on the hot path
        await self._send(message)


class _Plan:
    """What the requests of one ``(method, path)`` go through, worked out once.

    ``rate`` is the rate-limit plan the pipeline decides itself, with its headers added by
    its own ``send`` wrapper; ``run(scope, receive, send, app, spec)`` is the first layer
    around the app after it (None: the app itself). ``guarded`` is the whole chain, rate
    limit included, for a request whose body ``InputLimits`` counts as it streams.
    """

    __slots__ = ("app", "budget", "guarded", "json_only", "rate", "run", "spec")

    def __init__(
        self,
        json_only: bool,
        rate: RatePlan | None,
        steps: list[tuple[Run, object]],
        app: ASGIApp,
        guarded: ASGIApp,
        budget: float | None,
    ) -> None:
        self.json_only = json_only
        self.rate = rate
        self.guarded = guarded
        self.run: Run | None = None
        self.spec: object = None
        self.app = app
        self.budget: float | None = None
        if steps:
            self.run, self.spec = steps[0]
            self.app = _chain(app, steps[1:])
            if len(steps) == 1 and budget is not None:
                # The timeout is the only layer: the pipeline calls it with its exchange.
                self.budget = budget


class Pipeline:
    """The configured layers compiled into one ASGI callable for HTTP requests.

    Websocket and other scopes go through ``chain``, the same layers composed as
    middleware (their handshake rules are the classes' own, see docs/architecture.md,
    "Websockets").

    Args:
        app: the wrapped app.
        chain: the same layers composed as middleware (``RequestMetrics`` outermost when
            metrics are on, then ``ErrorMiddleware``).
        errors: that ``ErrorMiddleware`` (the error format, the logger, the metrics sink).
        measure: ``RequestMetrics`` when metrics are on: the request duration and the
            scrape endpoint.
        limits, shedding, rate_limit, signature, idempotency, timeout: the configured
            layers (None: not configured), in the canonical order.
        context: put in every request's ``scope["state"]["asgi_armor"]``, for checks made
            inside the app (``asgi_armor.contrib.fastapi.rate_limit``).
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        chain: ASGIApp,
        errors: ErrorMiddleware,
        measure: RequestMetrics | None = None,
        limits: InputLimits | None = None,
        shedding: ConcurrencyLimit | None = None,
        rate_limit: RateLimitMiddleware | None = None,
        signature: SignatureMiddleware | None = None,
        idempotency: IdempotencyMiddleware | None = None,
        timeout: TimeoutMiddleware | None = None,
        context: ArmorContext | None = None,
    ) -> None:
        self.app = chain
        self._app = app
        self._errors = errors
        self._measure = measure
        self._problem = errors.error_format == "problem"
        self._limits = limits
        self._shedding = shedding
        self._rate_limit = rate_limit
        self._signature = signature
        self._idempotency = idempotency
        self._timeout = timeout
        self._context = context
        self._plans: dict[tuple[str, str], _Plan] = {}

    def _compile(self, method: str, path: str) -> _Plan:
        """The plan for ``(method, path)``: every layer's own route match, in order."""
        limits = self._limits
        json_only = (
            limits is not None
            and bool(limits.json_routes)
            and limits.json_routes.first(method, path) is not None
        )
        outer: list[tuple[Run, object]] = []
        if self._shedding is not None and self._shedding.match(method, path):
            outer.append((self._shedding.run, None))
        rate = None if self._rate_limit is None else self._rate_limit.match(method, path)
        limited: list[tuple[Run, object]] = []
        if rate is not None:
            assert self._rate_limit is not None
            limited.append((self._rate_limit.run, rate))
        inner: list[tuple[Run, object]] = []
        for layer in (self._signature, self._idempotency):
            spec = None if layer is None else layer.match(method, path)
            if spec is not None:
                assert layer is not None
                inner.append((layer.run, spec))
        budget = None if self._timeout is None else self._timeout.budget_for(method, path)
        if budget is not None:
            assert self._timeout is not None
            inner.append((self._timeout.run, budget))
        guarded = _chain(self._app, outer + limited + inner)
        if outer or (rate is not None and rate.after):
            # The rate limit decides inside the shedding slot, as the classes compose; and
            # failures-only rules see the response through the rate limit's own wrapper.
            return _Plan(json_only, None, outer + limited + inner, self._app, guarded, None)
        return _Plan(json_only, rate, inner, self._app, guarded, budget)

    def _plan(self, method: str, path: str) -> _Plan:
        """:meth:`_compile`, remembered for short paths."""
        plan = self._compile(method, path)
        if len(path) <= _PLAN_CACHE_PATH:
            plans = self._plans
            if len(plans) >= _PLAN_CACHE:
                # Paths with parameters are unbounded: start over rather than grow.
                plans.clear()
            plans[method, path] = plan
        return plan

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.other(scope, receive, send)
            return
        measure = self._measure
        if measure is not None and measure.serves(scope):
            await measure.scrape(scope, send)
            return
        await self._handle(scope, receive, send, measure)

    async def _handle(
        self, scope: Scope, receive: Receive, send: Send, measure: RequestMetrics | None
    ) -> None:
        """One HTTP request through the plan of its target (timed and counted by its route
        pattern and status when ``measure`` is given)."""
        start = 0.0 if measure is None else measure.start()
        request_id = ensure_request_id(scope)
        state = scope["state"]
        if self._problem:
            state[_STATE_FORMAT] = "problem"
        if self._context is not None:
            state[CONTEXT_KEY] = self._context
        if self._errors.metrics is not None:
            self._errors._with_metrics(scope, request_id)
        method, path = target(scope)
        plan = self._plans.get((method, path))
        if plan is None:
            plan = self._plan(method, path)
        exchange = _Exchange(receive, send, (b"x-request-id", request_id.encode()), state)
        receive = exchange.receive
        try:
            limits = self._limits
            json_ok = None if limits is None else limits.admit(scope, plan.json_only)
            if json_ok is not None:
                assert limits is not None
                await limits.guard(scope, receive, exchange.send, plan.guarded, json_ok)
            else:
                if plan.rate is not None:
                    rate_limit = self._rate_limit
                    assert rate_limit is not None  # a plan has rate rules only with the layer
                    decided = await rate_limit.decide(scope, plan.rate)
                    if decided is not None and decided[0]:
                        exchange.added = decided[0]
                if plan.budget is not None:
                    # The first layer is the timeout: it reads how far the response got
                    # from this exchange instead of wrapping send once more.
                    timeout = self._timeout
                    assert timeout is not None  # a plan has a budget only with the layer
                    await timeout.run_tracked(
                        scope, receive, exchange.send, plan.app, plan.budget, exchange
                    )
                elif plan.run is None:
                    await plan.app(scope, receive, exchange.send)
                else:
                    await plan.run(scope, receive, exchange.send, plan.app, plan.spec)
        except Exception as exc:
            error = self._errors._error_for(scope, exc, exchange.gone)
            if exchange.complete:
                # A framework already answered (Starlette renders its 500 page, then
                # re-raises "so servers can log it"): logged, nothing left to send.
                return
            if exchange.started:
                # A second http.response.start is a protocol error: abort the connection.
                self._errors.logger.warning(
                    "aborting response already started [request_id=%s]: %s",
                    request_id,
                    error.error,
                )
                raise
            exchange.status = error.status
            await send_error(scope, send, error)
        finally:
            if measure is not None:
                # The status the client got: its start line, even of an aborted response.
                measure.observe(scope, exchange.status, start)

    async def other(self, scope: Scope, receive: Receive, send: Send) -> None:
        """A websocket, lifespan or other scope: through the composed layers."""
        await self.app(scope, receive, send)
