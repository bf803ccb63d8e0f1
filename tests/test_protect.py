"""``@protect``: declarations found in each framework's route table, applied exactly like
the same entries in the config, and bad declarations failing ``armor()`` by endpoint."""

from __future__ import annotations

from typing import Any

import anyio
import httpx
import litestar
import pytest
import quart
from litestar.params import FromPath
from starlette.applications import Starlette
from starlette.endpoints import HTTPEndpoint
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Mount, Route, Router, WebSocketRoute

from asgi_armor import ArmorConfig, ConfigError, armor, protect
from asgi_armor.protect import declared_routes
from tests.integration.protect_apps import (
    FRAMEWORKS,
    SECRET,
    SECRET_ENV,
    build,
    exercise,
    snapshot,
)

pytestmark = pytest.mark.anyio


@pytest.fixture(autouse=True)
def _secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(SECRET_ENV, SECRET)


async def run(framework: str, declared: bool) -> dict[str, list[Any]]:
    app, config = build(framework, declared)
    armored = armor(app, config)
    transport = httpx.ASGITransport(app=armored, client=("203.0.113.5", 4000))
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        answers = await exercise(client)
    return {name: [snapshot(r) for r in responses] for name, responses in answers.items()}


# Quart runs on asyncio only: its trio copy is deselected (tests/conftest.py).
IN_PROCESS = [
    pytest.param(name, marks=pytest.mark.asyncio_only) if name == "quart" else name
    for name in FRAMEWORKS
]


@pytest.mark.parametrize("framework", IN_PROCESS)
async def test_declared_is_the_same_bytes_as_configured(framework: str) -> None:
    declared = await run(framework, True)
    configured = await run(framework, False)
    assert declared == configured
    items = declared["items"]
    assert [status for status, _, _ in items] == [200, 200, 429]
    policy = dict(items[0][2])["ratelimit-policy"]
    assert policy == '"ip-items";q=2;w=60, "path.item_id-items";q=3;w=60'
    assert items[2][1]["error"] == "rate_limited"  # type: ignore[index]
    assert [s for s, _, _ in declared["payments"]] == [400, 201, 201, 422]
    assert [s for s, _, _ in declared["webhook"]] == [401, 401, 200]
    assert declared["slow"][0][0] == 504
    assert declared["health"][0][0] == 200
    assert "ratelimit" not in dict(declared["health"][0][2])


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_routes_are_the_frameworks_templates(framework: str) -> None:
    app, _ = build(framework, True)
    found = sorted(route for _, route, _ in declared_routes(app))
    assert found == [
        "GET /api/items/{item_id}",
        "GET /api/slow",
        "POST /api/payments",
        "POST /api/webhook",
    ]


def test_mounts_hosts_websockets_class_endpoints_and_converters() -> None:
    @protect(rate_limit=["1/second"])
    async def files(request: Request) -> JSONResponse:
        return JSONResponse({})

    @protect(rate_limit=["1/second"])
    async def ws(websocket: Any) -> None:
        return None

    class Thing(HTTPEndpoint):
        @protect(timeout=1)
        async def put(self, request: Request) -> JSONResponse:
            return JSONResponse({})

        async def get(self, request: Request) -> JSONResponse:
            return JSONResponse({})

    @protect(idempotency=True)
    async def both(request: Request) -> JSONResponse:
        return JSONResponse({})

    inner = Router(
        [
            Route("/files/{rest:path}", files),
            Route("/things/{thing_id:int}", Thing),
            Route("/both", both, methods=["GET", "POST"]),
        ]
    )
    app = Starlette(
        routes=[Mount("/v1", routes=[Mount("/x", app=inner)]), WebSocketRoute("/ws", ws)]
    )
    assert sorted((name, route) for name, route, _ in declared_routes(app)) == [
        ("both", "GET|POST /v1/x/both"),
        ("files", "GET /v1/x/files/*"),
        ("put", "PUT /v1/x/things/{thing_id}"),
        ("ws", "GET /ws"),
    ]


def make_app(**options: Any) -> Starlette:
    @protect(**options)
    async def create_payment(request: Request) -> JSONResponse:
        return JSONResponse({})

    return Starlette(routes=[Route("/api/payments", create_payment, methods=["POST"])])


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (
            {"rate_limit": ["10/minuet"]},
            "@protect on create_payment (POST /api/payments): rate_limit[0]: "
            "'10/minuet' is not a rate: unknown unit 'minuet'",
        ),
        (
            {"rate_limit": "10/minute"},
            "@protect on create_payment (POST /api/payments): rate_limit: expected a list",
        ),
        (
            {"rate_limit": [("10/minute", "path:id")]},
            "rate_limit[0]: key 'path:id' names no parameter of route 'POST /api/payments'",
        ),
        ({"rate_limit": [("1/s", "user")]}, "rate_limit[0].key: 'user' needs an identify hook"),
        ({"rate_limit": [{"rate": "1/s", "count": "all"}]}, "rate_limit[0].count: Invalid enum"),
        ({"rate_limit": [("1/s", "ip", "x")]}, "rate_limit[0]: ('1/s', 'ip', 'x') is not a rate"),
        ({"rate_limit": [{"rate": "1/s", "route": "*"}]}, "route comes from the framework"),
        ({"idempotency": {"ttl": "forever"}}, "idempotency.ttl: 'forever' is not a duration"),
        ({"idempotency": {"tll": "1h"}}, "idempotency.tll: unknown setting"),
        ({"timeout": "soon"}, "@protect on create_payment (POST /api/payments): timeout: 'soon'"),
        ({"timeout": 0}, "timeout: must be more than 0 seconds"),
        (
            {"signature": {"secret_env": "ARMOR_PROTECT_UNSET"}},
            "signature: environment variable 'ARMOR_PROTECT_UNSET' is not set or empty",
        ),
        ({"signature": {"scheme": "md5"}}, "signature.scheme: Invalid enum value 'md5'"),
    ],
)
def test_a_bad_declaration_fails_armor_naming_the_endpoint(
    options: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigError) as info:
        armor(make_app(**options), ArmorConfig())
    assert message in str(info.value)
    assert str(info.value).startswith("@protect on create_payment (POST /api/payments): ")


async def test_declared_and_configured_rules_on_one_route_are_decided_together() -> None:
    from asgi_armor import RateLimitEntry

    app = make_app(rate_limit=["3/minute", {"rate": "1/minute", "shadow": True}])
    config = ArmorConfig(rate_limit=[RateLimitEntry(route="* /api/*", rate="100/minute")])
    armored = armor(app, config)
    assert [entry.route for entry in armored.config.rate_limit] == [
        "* /api/*",
        "POST /api/payments",
        "POST /api/payments",
    ]
    transport = httpx.ASGITransport(app=armored, client=("203.0.113.5", 4000))
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        answers = [await client.post("/api/payments") for _ in range(4)]
    assert [a.status_code for a in answers] == [200, 200, 200, 429]
    assert answers[0].headers["ratelimit-policy"] == (
        '"ip";q=100;w=60, "ip-payments";q=3;w=60, "ip-payments-2";q=1;w=60'
    )


def test_stacked_declarations_add_rate_limits_and_refuse_a_second_timeout() -> None:
    @protect(rate_limit=["1/second"], timeout=2)
    @protect(rate_limit=[("5/minute", "global")])
    async def endpoint(request: Request) -> JSONResponse:
        return JSONResponse({})

    app = Starlette(routes=[Route("/x", endpoint)])
    config = armor(app, ArmorConfig()).config
    # In the order written.
    assert [(e.rate, e.key) for e in config.rate_limit] == [
        ("1/second", "ip"),
        ("5/minute", "global"),
    ]
    assert [(e.route, e.seconds) for e in config.timeout] == [("GET /x", 2.0)]
    with pytest.raises(ConfigError, match="@protect on endpoint: timeout is declared twice"):
        protect(timeout=1)(endpoint)


def test_declarations_are_found_through_asgi_middleware() -> None:
    from starlette.middleware.cors import CORSMiddleware

    app = make_app(timeout=3)
    wrapped = CORSMiddleware(app, allow_origins=["*"])
    assert [e.route for e in armor(wrapped, ArmorConfig()).config.timeout] == ["POST /api/payments"]


def test_quart_and_litestar_websockets_and_converters() -> None:
    q = quart.Quart("protect_ws")

    @q.websocket("/ws/<int:room>")
    @protect(rate_limit=["10/minute"])
    async def room(room: int) -> None:
        return None

    @q.route("/files/<path:rest>", methods=["GET", "PUT"])
    @protect(timeout=1)
    async def files(rest: str) -> Any:
        return {}

    assert sorted(route for _, route, _ in declared_routes(q)) == [
        "GET /ws/{room}",
        "GET|PUT /files/*",
    ]

    @litestar.websocket("/live/{channel:str}")
    @protect(rate_limit=["10/minute"])
    async def live(socket: litestar.WebSocket[Any, Any, Any], channel: FromPath[str]) -> None:
        return None

    @litestar.route("/both", http_method=["GET", "POST"])
    @protect(timeout=1)
    async def both() -> None:
        return None

    app = litestar.Litestar([live, both], logging_config=None, openapi_config=None)
    assert sorted(route for _, route, _ in declared_routes(app)) == [
        "GET /live/{channel}",
        "GET|POST /both",
    ]


async def lifespan_startup(app: Any) -> dict[str, Any]:
    """Drive an ASGI lifespan start-up; the app's first answer."""
    sent: list[dict[str, Any]] = []
    answered = anyio.Event()

    async def receive() -> dict[str, Any]:
        if not sent:
            return {"type": "lifespan.startup"}
        await anyio.sleep_forever()
        raise AssertionError  # pragma: no cover

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)
        answered.set()

    with anyio.fail_after(5):
        async with anyio.create_task_group() as group:
            group.start_soon(app, {"type": "lifespan", "asgi": {"version": "3.0"}}, receive, send)
            await answered.wait()
            group.cancel_scope.cancel()
    return sent[0]


async def test_a_route_declared_after_armor_fails_the_lifespan_start_up() -> None:
    from fastapi import APIRouter, FastAPI

    inner = FastAPI()

    @inner.get("/early")
    @protect(rate_limit=["1/second"])
    async def early() -> dict[str, Any]:
        return {}

    app = armor(inner, ArmorConfig())
    assert (await lifespan_startup(app))["type"] == "lifespan.startup.complete"

    router = APIRouter(prefix="/api")

    @router.post("/late")
    @protect(rate_limit=["1/second"])
    async def late() -> dict[str, Any]:
        return {}

    inner.include_router(router)
    failed = await lifespan_startup(app)
    assert failed == {
        "type": "lifespan.startup.failed",
        "message": "@protect on late (POST /api/late): the route was added after armor() read "
        "the route table; add routes before calling armor()",
    }
