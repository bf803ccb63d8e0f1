"""One small API written five times: Starlette, FastAPI, Quart, Litestar and bare ASGI.

Every app serves the same routes through the same ``Service`` (the business logic and its
state), so a test can wrap each in the same ``armor(app, config)`` and check that the
error responses are the same bytes on every framework:

- ``GET /api/items``: 200 ``{"items": [...]}`` (rate limited by the config);
- ``POST /api/users``: ``decode(body, CreateUser)``; 201, or ``ValidationFailed`` (422) /
  ``InvalidJSON`` (400) raised in the route;
- ``POST /api/payments``: 201 ``{"payment_id", "amount"}`` (idempotency by the config);
- ``GET /api/db``: a call through a circuit breaker that is open: ``CircuitOpenError``
  raised in the route (503, ``Retry-After: 30``);
- ``GET /api/slow``: sleeps 5 s (the config's timeout answers 504 first);
- ``POST /api/webhook``: 200 ``{"received": true}`` (signature checked by the config);
- ``GET /api/boom``: an unexpected exception whose text must never reach the client.
"""

from __future__ import annotations

import contextlib
import json
import threading
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import anyio
import anyio.lowlevel
import fastapi
import litestar
import msgspec
import quart
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from asgi_armor import CircuitBreaker, Email, Int, MethodNotAllowed, Name, NotFound, decode
from asgi_armor._asgi import Receive, Scope, Send, read_body
from asgi_armor.contrib import litestar as armor_litestar
from asgi_armor.contrib import quart as armor_quart
from asgi_armor.contrib import starlette as armor_starlette

__all__ = [
    "BOOM_TEXT",
    "BUILDERS",
    "CreatePayment",
    "CreateUser",
    "Service",
    "bare_app",
    "fastapi_app",
    "litestar_app",
    "quart_app",
    "starlette_app",
]

# FastAPI and Litestar read the routes' annotations (strings here, because of the
# ``from __future__`` import) in this module's namespace: these names must live here.
FastAPIRequest = fastapi.Request
LitestarRequest = litestar.Request

#: The unexpected exception's message: it must appear in the server log, never in a response.
BOOM_TEXT = "connection to postgres://admin:hunter2@db.internal failed"


class CreateUser(msgspec.Struct, forbid_unknown_fields=True):
    """``POST /api/users``."""

    email: Email
    name: Name
    age: Int(ge=0, le=150) | None = None  # type: ignore[valid-type]


class CreatePayment(msgspec.Struct, forbid_unknown_fields=True):
    """``POST /api/payments``."""

    amount: Int(gt=0)  # type: ignore[valid-type]
    currency: str = "EUR"


class Service:
    """The business logic every framework's routes call; counts what really ran.

    ``calls`` counts every entry into a handler (``"items"``, ``"payments"``, ``"slow"``,
    ``"webhook"``), before any validation, so a test can tell whether a request reached it.
    ``slow_seconds`` is how long ``GET /api/slow`` takes.
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.calls: Counter[str] = Counter()
        self.payments = 0
        self.webhooks = 0
        self.slow_seconds = 5.0
        self.slow_outcomes: list[str] = []
        self.lifespan: list[str] = []
        # Frozen clock and one recorded failure: the breaker is open and says
        # "retry in 30 s" on every framework, whenever the test runs.
        self.breaker = CircuitBreaker(fail_max=1, reset_timeout=30, name="db", clock=lambda: 0.0)
        self.breaker.record_failure(0.0)

    async def startup(self) -> None:
        """Lifespan start-up: proves the lifespan scope went through armor to the app."""
        self.lifespan.append("startup")

    async def shutdown(self) -> None:
        """Lifespan shutdown."""
        self.lifespan.append("shutdown")

    def called(self, handler: str) -> None:
        """Record that ``handler`` was entered."""
        with self.lock:
            self.calls[handler] += 1

    def items(self) -> dict[str, Any]:
        """The list of items."""
        self.called("items")
        return {"items": [{"id": 1, "name": "widget"}, {"id": 2, "name": "gadget"}]}

    def create_user(self, body: bytes) -> dict[str, Any]:
        """Validate and echo a user (raises ``ValidationFailed`` / ``InvalidJSON``)."""
        user = decode(body, CreateUser)
        return {"id": 1, "email": user.email, "name": user.name, "age": user.age}

    def create_payment(self, body: bytes) -> dict[str, Any]:
        """Record a payment; idempotency must make this run once per key."""
        self.called("payments")
        payment = decode(body, CreatePayment)
        with self.lock:
            self.payments += 1
            number = self.payments
        return {"payment_id": f"pay_{number}", "amount": payment.amount}

    async def db(self) -> dict[str, Any]:
        """A database call behind the (open) breaker: raises ``CircuitOpenError``."""
        async with self.breaker:
            await anyio.lowlevel.checkpoint()
        return {"rows": []}

    async def slow(self) -> dict[str, Any]:
        """Far slower than the route's budget; records whether it was cancelled."""
        self.called("slow")
        try:
            await anyio.sleep(self.slow_seconds)
        except BaseException:
            self.slow_outcomes.append("cancelled")
            raise
        self.slow_outcomes.append("finished")
        return {"slow": True}

    def webhook(self, body: bytes) -> dict[str, Any]:
        """Accept a (verified) webhook."""
        self.called("webhook")
        with self.lock:
            self.webhooks += 1
        return {"received": True}

    def boom(self) -> dict[str, Any]:
        """Fail the way real code fails: with internals in the message."""
        raise RuntimeError(BOOM_TEXT)


# --------------------------------------------------------------------------- Starlette


def starlette_app(service: Service) -> Any:
    """The API on Starlette, with ``contrib.starlette.install``."""

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await service.startup()
        yield
        await service.shutdown()

    async def items(request: Request) -> JSONResponse:
        return JSONResponse(service.items())

    async def users(request: Request) -> JSONResponse:
        return JSONResponse(service.create_user(await request.body()), status_code=201)

    async def payments(request: Request) -> JSONResponse:
        return JSONResponse(service.create_payment(await request.body()), status_code=201)

    async def db(request: Request) -> JSONResponse:
        return JSONResponse(await service.db())

    async def slow(request: Request) -> JSONResponse:
        return JSONResponse(await service.slow())

    async def webhook(request: Request) -> JSONResponse:
        return JSONResponse(service.webhook(await request.body()))

    async def boom(request: Request) -> JSONResponse:
        return JSONResponse(service.boom())

    app = Starlette(
        routes=[
            Route("/api/items", items, methods=["GET"]),
            Route("/api/users", users, methods=["POST"]),
            Route("/api/payments", payments, methods=["POST"]),
            Route("/api/db", db, methods=["GET"]),
            Route("/api/slow", slow, methods=["GET"]),
            Route("/api/webhook", webhook, methods=["POST"]),
            Route("/api/boom", boom, methods=["GET"]),
        ],
        lifespan=lifespan,
    )
    armor_starlette.install(app)
    return app


# --------------------------------------------------------------------------- FastAPI


def fastapi_app(service: Service) -> Any:
    """The API on FastAPI, with the Starlette adapter's handlers."""

    @contextlib.asynccontextmanager
    async def lifespan(app: fastapi.FastAPI) -> AsyncIterator[None]:
        await service.startup()
        yield
        await service.shutdown()

    app = fastapi.FastAPI(
        exception_handlers=armor_starlette.armor_exception_handlers(),
        openapi_url=None,
        lifespan=lifespan,
    )

    @app.get("/api/items")
    async def items() -> dict[str, Any]:
        return service.items()

    @app.post("/api/users", status_code=201)
    async def users(request: FastAPIRequest) -> dict[str, Any]:
        return service.create_user(await request.body())

    @app.post("/api/payments", status_code=201)
    async def payments(request: FastAPIRequest) -> dict[str, Any]:
        return service.create_payment(await request.body())

    @app.get("/api/db")
    async def db() -> dict[str, Any]:
        return await service.db()

    @app.get("/api/slow")
    async def slow() -> dict[str, Any]:
        return await service.slow()

    @app.post("/api/webhook")
    async def webhook(request: FastAPIRequest) -> dict[str, Any]:
        return service.webhook(await request.body())

    @app.get("/api/boom")
    async def boom() -> dict[str, Any]:
        return service.boom()

    return app


# --------------------------------------------------------------------------- Quart


def quart_app(service: Service) -> Any:
    """The API on Quart, with ``contrib.quart.install``."""
    app = quart.Quart("frameworks_quart")
    app.before_serving(service.startup)
    app.after_serving(service.shutdown)

    async def body() -> bytes:
        data = await quart.request.get_data(as_text=False)
        assert isinstance(data, bytes)
        return data

    @app.get("/api/items")
    async def items() -> Any:
        return service.items()

    @app.post("/api/users")
    async def users() -> Any:
        return service.create_user(await body()), 201

    @app.post("/api/payments")
    async def payments() -> Any:
        return service.create_payment(await body()), 201

    @app.get("/api/db")
    async def db() -> Any:
        return await service.db()

    @app.get("/api/slow")
    async def slow() -> Any:
        return await service.slow()

    @app.post("/api/webhook")
    async def webhook() -> Any:
        return service.webhook(await body())

    @app.get("/api/boom")
    async def boom() -> Any:
        return service.boom()

    armor_quart.install(app)
    return app


# --------------------------------------------------------------------------- Litestar


def litestar_app(service: Service) -> Any:
    """The API on Litestar, with ``contrib.litestar.ArmorPlugin``."""

    @litestar.get("/api/items")
    async def items() -> dict[str, Any]:
        return service.items()

    @litestar.post("/api/users", status_code=201)
    async def users(request: LitestarRequest[Any, Any, Any]) -> dict[str, Any]:
        return service.create_user(await request.body())

    @litestar.post("/api/payments", status_code=201)
    async def payments(request: LitestarRequest[Any, Any, Any]) -> dict[str, Any]:
        return service.create_payment(await request.body())

    @litestar.get("/api/db")
    async def db() -> dict[str, Any]:
        return await service.db()

    @litestar.get("/api/slow")
    async def slow() -> dict[str, Any]:
        return await service.slow()

    @litestar.post("/api/webhook", status_code=200)
    async def webhook(request: LitestarRequest[Any, Any, Any]) -> dict[str, Any]:
        return service.webhook(await request.body())

    @litestar.get("/api/boom")
    async def boom() -> dict[str, Any]:
        return service.boom()

    # logging_config=None: Litestar would otherwise reconfigure the process's logging.
    return litestar.Litestar(
        [items, users, payments, db, slow, webhook, boom],
        plugins=[armor_litestar.ArmorPlugin()],
        on_startup=[service.startup],
        on_shutdown=[service.shutdown],
        logging_config=None,
        openapi_config=None,
    )


# --------------------------------------------------------------------------- bare ASGI


def bare_app(service: Service) -> Any:
    """The API as a bare ASGI callable: errors are raised, ``ErrorMiddleware`` renders them."""

    async def body_of(receive: Receive) -> bytes:
        return await read_body(receive, 1 << 20)

    Handler = Callable[[Receive], Awaitable[tuple[int, dict[str, Any]]]]

    async def items(receive: Receive) -> tuple[int, dict[str, Any]]:
        return 200, service.items()

    async def users(receive: Receive) -> tuple[int, dict[str, Any]]:
        return 201, service.create_user(await body_of(receive))

    async def payments(receive: Receive) -> tuple[int, dict[str, Any]]:
        return 201, service.create_payment(await body_of(receive))

    async def db(receive: Receive) -> tuple[int, dict[str, Any]]:
        return 200, await service.db()

    async def slow(receive: Receive) -> tuple[int, dict[str, Any]]:
        return 200, await service.slow()

    async def webhook(receive: Receive) -> tuple[int, dict[str, Any]]:
        return 200, service.webhook(await body_of(receive))

    async def boom(receive: Receive) -> tuple[int, dict[str, Any]]:
        return 200, service.boom()

    routes: dict[str, dict[str, Handler]] = {
        "/api/items": {"GET": items},
        "/api/users": {"POST": users},
        "/api/payments": {"POST": payments},
        "/api/db": {"GET": db},
        "/api/slow": {"GET": slow},
        "/api/webhook": {"POST": webhook},
        "/api/boom": {"GET": boom},
    }

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await service.startup()
                    await send({"type": "lifespan.startup.complete"})
                else:
                    await service.shutdown()
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        methods = routes.get(scope["path"])
        if methods is None:
            raise NotFound()
        handler = methods.get(scope["method"])
        if handler is None:
            raise MethodNotAllowed(sorted(methods))
        status, payload = await handler(receive)
        body = json.dumps(payload).encode()
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [(b"content-type", b"application/json")],
            }
        )
        await send({"type": "http.response.body", "body": body})

    return app


#: Framework name -> app builder, in the order the tests report them.
BUILDERS: dict[str, Callable[[Service], Any]] = {
    "starlette": starlette_app,
    "fastapi": fastapi_app,
    "quart": quart_app,
    "litestar": litestar_app,
    "bare": bare_app,
}
