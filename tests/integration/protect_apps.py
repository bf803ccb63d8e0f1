"""One small API on Starlette, FastAPI, Quart and Litestar, protected two ways.

``build(framework, declared=True)`` puts the protections on the endpoints with
``@protect``; ``declared=False`` leaves the endpoints bare and returns the same
protections as config entries (``CONFIG``). Tests wrap both in ``armor`` and compare the
answers byte for byte:

- ``GET /api/items/{item_id}``: 200 ``{"item": id}``; 2/minute per address and 3/minute
  per item (a parameter in the route template);
- ``POST /api/payments``: 201 ``{"paid": <amount>}``; an ``Idempotency-Key`` is required;
- ``POST /api/webhook``: 200 ``{"received": true}``; hex HMAC in ``X-Signature``;
- ``GET /api/slow``: sleeps 5 s; its budget is 0.2 s;
- ``GET /healthz``: 200, unprotected.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import anyio
import fastapi
import litestar
import quart
from litestar.params import FromPath
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Mount, Route

from asgi_armor import (
    ArmorConfig,
    IdempotencyEntry,
    RateLimitEntry,
    SignatureEntry,
    TimeoutEntry,
    protect,
)
from asgi_armor.contrib import litestar as armor_litestar
from asgi_armor.contrib import quart as armor_quart
from asgi_armor.contrib import starlette as armor_starlette

__all__ = ["CONFIG", "FRAMEWORKS", "SECRET", "SECRET_ENV", "build"]

# FastAPI and Litestar read annotations (strings, by the __future__ import) here.
FastAPIRequest = fastapi.Request
LitestarRequest = litestar.Request

SECRET_ENV = "ARMOR_PROTECT_TEST_SECRET"
SECRET = "protect-test-secret"
FRAMEWORKS = ("starlette", "fastapi", "quart", "litestar")

ITEMS = {"rate_limit": ["2/minute", ("3/minute", "path:item_id")]}
PAYMENTS = {"idempotency": {"ttl": "24h", "required": True}}
WEBHOOK = {"signature": {"scheme": "hex-hmac", "header": "X-Signature", "secret_env": SECRET_ENV}}
SLOW = {"timeout": 0.2}

#: The same protections, written in the config.
CONFIG = ArmorConfig(
    rate_limit=[
        RateLimitEntry(route="GET /api/items/{item_id}", rate="2/minute"),
        RateLimitEntry(route="GET /api/items/{item_id}", rate="3/minute", key="path:item_id"),
    ],
    idempotency=[IdempotencyEntry(route="POST /api/payments", ttl=86400.0, required=True)],  # type: ignore[arg-type]
    signature=[
        SignatureEntry(
            route="POST /api/webhook",
            scheme="hex-hmac",
            header="X-Signature",
            secret_env=SECRET_ENV,
        )
    ],
    timeout=[TimeoutEntry(route="GET /api/slow", seconds=0.2)],  # type: ignore[arg-type]
)


def _decorator(declared: bool, options: dict[str, Any]) -> Callable[[Any], Any]:
    return protect(**options) if declared else (lambda fn: fn)


def _paid(body: bytes) -> dict[str, Any]:
    return {"paid": json.loads(body or b"{}").get("amount")}


async def _slow() -> dict[str, Any]:
    await anyio.sleep(5)
    return {"slow": True}


def starlette_app(declared: bool) -> Any:
    """Starlette, the API under ``Mount("/api")`` (a prefix the discovery must add)."""

    @_decorator(declared, ITEMS)
    async def item(request: Request) -> JSONResponse:
        return JSONResponse({"item": request.path_params["item_id"]})

    @_decorator(declared, PAYMENTS)
    async def payments(request: Request) -> JSONResponse:
        return JSONResponse(_paid(await request.body()), status_code=201)

    @_decorator(declared, WEBHOOK)
    async def webhook(request: Request) -> JSONResponse:
        await request.body()
        return JSONResponse({"received": True})

    @_decorator(declared, SLOW)
    async def slow(request: Request) -> JSONResponse:
        return JSONResponse(await _slow())

    async def health(request: Request) -> JSONResponse:
        return JSONResponse({"ok": True})

    api = [
        Route("/items/{item_id}", item),
        Route("/payments", payments, methods=["POST"]),
        Route("/webhook", webhook, methods=["POST"]),
        Route("/slow", slow),
    ]
    return Starlette(
        routes=[Mount("/api", routes=api), Route("/healthz", health)],
        exception_handlers=armor_starlette.armor_exception_handlers(),
    )


def fastapi_app(declared: bool) -> Any:
    """FastAPI, the API on an ``APIRouter`` included with the prefix ``/api``."""
    app = fastapi.FastAPI(
        exception_handlers=armor_starlette.armor_exception_handlers(), openapi_url=None
    )
    router = fastapi.APIRouter(prefix="/api")

    @router.get("/items/{item_id}")
    @_decorator(declared, ITEMS)
    async def item(item_id: str) -> dict[str, Any]:
        return {"item": item_id}

    @router.post("/payments", status_code=201)
    @_decorator(declared, PAYMENTS)
    async def payments(request: FastAPIRequest) -> dict[str, Any]:
        return _paid(await request.body())

    @router.post("/webhook")
    @_decorator(declared, WEBHOOK)
    async def webhook(request: FastAPIRequest) -> dict[str, Any]:
        await request.body()
        return {"received": True}

    @router.get("/slow")
    @_decorator(declared, SLOW)
    async def slow() -> dict[str, Any]:
        return await _slow()

    @app.get("/healthz")
    async def health() -> dict[str, Any]:
        return {"ok": True}

    app.include_router(router)
    return app


def quart_app(declared: bool) -> Any:
    """Quart, the API on a blueprint with the prefix ``/api`` (``<item_id>`` parameters)."""
    app = quart.Quart("protect_quart")
    api = quart.Blueprint("api", "protect_quart_api", url_prefix="/api")

    @api.get("/items/<item_id>")
    @_decorator(declared, ITEMS)
    async def item(item_id: str) -> Any:
        return {"item": item_id}

    # @protect above the route decorator works too: the function is what Quart keeps.
    @_decorator(declared, PAYMENTS)
    @api.post("/payments")
    async def payments() -> Any:
        return _paid(await quart.request.get_data()), 201

    @api.post("/webhook")
    @_decorator(declared, WEBHOOK)
    async def webhook() -> Any:
        await quart.request.get_data()
        return {"received": True}

    @api.get("/slow")
    @_decorator(declared, SLOW)
    async def slow() -> Any:
        return await _slow()

    @app.get("/healthz")
    async def health() -> Any:
        return {"ok": True}

    app.register_blueprint(api)
    armor_quart.install(app)
    return app


def litestar_app(declared: bool) -> Any:
    """Litestar, the API on a ``Router`` at ``/api`` (``{item_id:str}`` parameters)."""

    @litestar.get("/items/{item_id:str}")
    @_decorator(declared, ITEMS)
    async def item(item_id: FromPath[str]) -> dict[str, Any]:
        return {"item": item_id}

    # Above the route decorator: the handler object's fn carries the declaration.
    @_decorator(declared, PAYMENTS)
    @litestar.post("/payments", status_code=201)
    async def payments(request: LitestarRequest[Any, Any, Any]) -> dict[str, Any]:
        return _paid(await request.body())

    @litestar.post("/webhook", status_code=200)
    @_decorator(declared, WEBHOOK)
    async def webhook(request: LitestarRequest[Any, Any, Any]) -> dict[str, Any]:
        await request.body()
        return {"received": True}

    @litestar.get("/slow")
    @_decorator(declared, SLOW)
    async def slow() -> dict[str, Any]:
        return await _slow()

    @litestar.get("/healthz")
    async def health() -> dict[str, Any]:
        return {"ok": True}

    api = litestar.Router("/api", route_handlers=[item, payments, webhook, slow])
    return litestar.Litestar(
        [api, health],
        plugins=[armor_litestar.ArmorPlugin()],
        logging_config=None,
        openapi_config=None,
    )


_BUILDERS = {
    "starlette": starlette_app,
    "fastapi": fastapi_app,
    "quart": quart_app,
    "litestar": litestar_app,
}


def build(framework: str, declared: bool) -> tuple[Any, ArmorConfig]:
    """The app and the config to armor it with: ``@protect`` + empty config, or config."""
    app = _BUILDERS[framework](declared)
    return app, ArmorConfig() if declared else CONFIG


# Headers that differ between two correct runs: the request id, the clock, the server.
VOLATILE = frozenset({"x-request-id", "date", "server", "x-ratelimit-reset"})


def snapshot(response: Any) -> tuple[int, dict[str, Any] | str, list[tuple[str, str]]]:
    """Status, body (the envelope without its request id) and headers a test compares."""
    try:
        body: dict[str, Any] | str = response.json()
    except ValueError:
        body = response.text
    if isinstance(body, dict):
        body.pop("request_id", None)
    headers = sorted((k, v) for k, v in response.headers.items() if k not in VOLATILE)
    return response.status_code, body, headers


async def exercise(client: Any) -> dict[str, list[Any]]:
    """The scenario every test runs: rate limit, idempotency, signature, timeout."""
    from asgi_armor import sign

    out: dict[str, list[Any]] = {}
    out["items"] = [
        await client.get(path) for path in ("/api/items/a", "/api/items/a", "/api/items/b")
    ]
    key = {"Idempotency-Key": "order-1"}
    out["payments"] = [
        await client.post("/api/payments", json={"amount": 5}),
        await client.post("/api/payments", json={"amount": 5}, headers=key),
        await client.post("/api/payments", json={"amount": 5}, headers=key),
        await client.post("/api/payments", json={"amount": 6}, headers=key),
    ]
    body = b'{"event": "paid"}'
    out["webhook"] = [
        await client.post("/api/webhook", content=body),
        await client.post("/api/webhook", content=body, headers={"X-Signature": "00"}),
        await client.post("/api/webhook", content=body, headers=sign(body, SECRET)),
    ]
    out["slow"] = [await client.get("/api/slow")]
    out["health"] = [await client.get("/healthz")]
    return out


def bad_app() -> Any:
    """A uvicorn factory whose ``@protect`` is wrong: ``armor()`` must fail the start-up."""
    from asgi_armor import armor

    @protect(rate_limit=["10/minuet"])
    async def create_payment(request: Request) -> JSONResponse:
        return JSONResponse({})

    app = Starlette(routes=[Route("/api/payments", create_payment, methods=["POST"])])
    return armor(app, ArmorConfig())
