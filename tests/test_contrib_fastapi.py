"""``asgi_armor.contrib.fastapi.rate_limit``: a rate limit as a FastAPI dependency.

The matrix: ``Depends``, ``dependencies=[...]``, ``Annotated``, routers with prefixes,
postponed annotations (this module), sync and async endpoints without a ``Request``
parameter, per-plan rates and per-user keys from dependencies, the rule options, a
websocket route under uvicorn, and the same bytes as the same rule in the config.
"""

from __future__ import annotations

import json
from typing import Annotated, Any

import httpx
import pytest
from fastapi import APIRouter, Depends, FastAPI, Header, WebSocket
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from asgi_armor import ArmorConfig, ConfigError, RateLimitEntry, armor
from asgi_armor.contrib.fastapi import rate_limit
from asgi_armor.contrib.starlette import armor_exception_handlers
from asgi_armor.stores.memory import MemoryStore
from tests.integration.conftest import serve
from tests.integration.protect_apps import snapshot

pytestmark = pytest.mark.anyio

TOKENS = {"alice-token": ("alice", "free"), "bob-token": ("bob", "pro")}


def current_user(authorization: Annotated[str | None, Header()] = None) -> str | None:
    """The authenticated user (a FastAPI dependency), or None."""
    token = (authorization or "").removeprefix("Bearer ")
    found = TOKENS.get(token)
    return None if found is None else found[0]


async def plan_rate(authorization: Annotated[str | None, Header()] = None) -> str:
    """Per plan: free 2/minute, pro 5/minute (an async dependency)."""
    found = TOKENS.get((authorization or "").removeprefix("Bearer "))
    return "5/minute" if found is not None and found[1] == "pro" else "2/minute"


# Module level, so FastAPI finds them when it resolves the postponed annotations.
Limited = Annotated[None, Depends(rate_limit("2/minute"))]
PerPlan = Annotated[None, Depends(rate_limit(plan_rate, key=current_user))]


def make_app() -> FastAPI:
    app = FastAPI(exception_handlers=armor_exception_handlers(), openapi_url=None)

    @app.get("/api/depends")
    async def by_depends(_: None = Depends(rate_limit("2/minute"))) -> dict[str, Any]:
        return {"ok": True}

    @app.get("/api/dependencies", dependencies=[Depends(rate_limit("2/minute"))])
    def by_dependencies() -> dict[str, Any]:  # a sync endpoint
        return {"ok": True}

    @app.get("/api/annotated")
    async def by_annotated(_: Limited) -> dict[str, Any]:
        return {"ok": True}

    @app.get("/api/reports")
    async def reports(_: PerPlan) -> dict[str, Any]:
        return {"ok": True}

    @app.post("/api/login")
    async def login(
        body: dict[str, str],
        _: Annotated[None, Depends(rate_limit("3/15minutes", count="failures"))],
    ) -> dict[str, Any]:
        if body.get("password") != "hunter2":
            from asgi_armor import Unauthorized

            raise Unauthorized("wrong username or password")
        return {"ok": True}

    @app.get("/api/rollout", dependencies=[Depends(rate_limit("1/minute", shadow=True))])
    async def rollout() -> dict[str, Any]:
        return {"ok": True}

    router = APIRouter(prefix="/v1", dependencies=[Depends(rate_limit("3/minute", name="v1"))])

    @router.get("/a")
    async def a() -> dict[str, Any]:
        return {"a": True}

    @router.get("/b/{thing}")
    def b(thing: int) -> dict[str, Any]:
        return {"b": thing}

    app.include_router(router, prefix="/api")
    return app


def client_for(app: Any, ip: str = "203.0.113.9") -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=app, client=(ip, 1000))
    return httpx.AsyncClient(transport=transport, base_url="http://t")


@pytest.fixture
async def client() -> Any:
    async with client_for(armor(make_app(), ArmorConfig())) as c:
        yield c


@pytest.mark.parametrize(
    ("path", "name"),
    [
        ("/api/depends", "ip-by-depends"),
        ("/api/dependencies", "ip-by-dependencies"),
        ("/api/annotated", "ip-by-annotated"),
    ],
)
async def test_each_form_limits_with_the_config_rules_headers_and_envelope(
    client: httpx.AsyncClient, path: str, name: str
) -> None:
    answers = [await client.get(path) for _ in range(3)]
    assert [a.status_code for a in answers] == [200, 200, 429]
    assert answers[0].headers["ratelimit-policy"] == f'"{name}";q=2;w=60'
    assert answers[1].headers["ratelimit"] == f'"{name}";r=0;t=60'
    assert answers[2].json()["error"] == "rate_limited"
    assert answers[2].headers["retry-after"] == "30"

    # The same rule in the config, on a bare endpoint: the same bytes.
    plain = FastAPI(exception_handlers=armor_exception_handlers(), openapi_url=None)
    plain.add_api_route(path, lambda: {"ok": True}, methods=["GET"])
    config = ArmorConfig(
        rate_limit=[RateLimitEntry(route=f"GET {path}", rate="2/minute", name=name)]
    )
    async with client_for(armor(plain, config)) as other:
        configured = [await other.get(path) for _ in range(3)]
    assert [snapshot(a) for a in answers] == [snapshot(a) for a in configured]


async def test_a_router_dependency_covers_its_prefixed_routes(client: httpx.AsyncClient) -> None:
    answers = [
        await client.get(p) for p in ("/api/v1/a", "/api/v1/b/7", "/api/v1/a", "/api/v1/b/8")
    ]
    assert [a.status_code for a in answers] == [200, 200, 200, 429]
    assert answers[1].json() == {"b": 7}
    assert answers[2].headers["ratelimit"] == '"v1";r=0;t=60'


async def test_per_plan_rates_from_one_dependency_and_per_user_buckets(
    client: httpx.AsyncClient,
) -> None:
    async def statuses(token: str | None, times: int) -> list[int]:
        headers = {} if token is None else {"Authorization": f"Bearer {token}"}
        return [
            (await client.get("/api/reports", headers=headers)).status_code for _ in range(times)
        ]

    assert await statuses("alice-token", 3) == [200, 200, 429]  # free: 2/minute
    assert await statuses("bob-token", 6) == [200] * 5 + [429]  # pro: 5/minute
    assert await statuses(None, 3) == [200, 200, 429]  # anonymous: by address, free rate
    pro = await client.get("/api/reports", headers={"Authorization": "Bearer bob-token"})
    assert pro.headers["ratelimit-policy"] == '"current_user-reports";q=5;w=60'


async def test_failures_only_login(client: httpx.AsyncClient) -> None:
    async def login(password: str) -> httpx.Response:
        return await client.post("/api/login", json={"username": "a", "password": password})

    assert [(await login("hunter2")).status_code for _ in range(4)] == [200] * 4
    wrong = [await login("guess") for _ in range(3)]
    assert [w.status_code for w in wrong] == [401, 401, 401]
    assert [w.headers["x-ratelimit-remaining"] for w in wrong] == ["2", "1", "0"]
    locked = await login("hunter2")
    assert (locked.status_code, locked.json()["error"]) == (429, "rate_limited")
    assert locked.headers["retry-after"] == "300"


async def test_shadow_never_refuses() -> None:
    armored = armor(make_app(), ArmorConfig())
    async with client_for(armored) as client:
        answers = [await client.get("/api/rollout") for _ in range(3)]
    assert [a.status_code for a in answers] == [200, 200, 200]
    assert [a.headers["x-ratelimit-remaining"] for a in answers] == ["0", "0", "0"]
    assert armored.context is not None
    assert armored.context.shadow_refusals == {"ip-rollout": 2}


async def test_key_user_uses_the_armors_identify_hook() -> None:
    app = FastAPI(exception_handlers=armor_exception_handlers(), openapi_url=None)

    @app.get("/x", dependencies=[Depends(rate_limit("1/minute", key="user"))])
    async def x() -> dict[str, Any]:
        return {}

    def identify(scope: Any) -> str | None:
        return dict(scope["headers"]).get(b"x-user", b"").decode() or None

    store = MemoryStore()
    async with client_for(armor(app, ArmorConfig(), identify=identify, store=store)) as c:
        assert (await c.get("/x", headers={"X-User": "ann"})).status_code == 200
        assert (await c.get("/x", headers={"X-User": "ann"})).status_code == 429
        assert (await c.get("/x", headers={"X-User": "ben"})).status_code == 200
    # The same key layout as the middleware's: name, then the tagged principal.
    assert sorted(store._tats) == ["rl:user-x:u:ann", "rl:user-x:u:ben"]


async def test_without_armor_the_request_fails_and_says_why() -> None:
    # Answered 500 internal_error by the adapter, and re-raised for the server to log.
    transport = httpx.ASGITransport(app=make_app(), raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
        response = await c.get("/api/depends")
    assert (response.status_code, response.json()["error"]) == (500, "internal_error")
    async with client_for(make_app()) as c:
        with pytest.raises(ConfigError, match="rate_limit needs armor\\(app, config\\) around"):
            await c.get("/api/depends")


def test_bad_definitions_fail_at_once() -> None:
    with pytest.raises(ConfigError, match="'10/minuet' is not a rate"):
        rate_limit("10/minuet")
    with pytest.raises(ConfigError, match="key 'path:x' is not 'ip', 'user', 'global'"):
        rate_limit("1/s", key="path:x")
    with pytest.raises(ConfigError, match="count 'all' is not"):
        rate_limit("1/s", count="all")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="cost 5 exceeds the burst"):
        rate_limit("2/s", cost=5)
    with pytest.raises(ConfigError, match="name 'a:b' must be 1 to 64 printable ASCII"):
        rate_limit("2/s", name="a:b")


async def test_key_user_without_an_identify_hook_fails_closed(
    caplog: pytest.LogCaptureFixture,
) -> None:
    app = FastAPI(exception_handlers=armor_exception_handlers(), openapi_url=None)

    @app.get("/x", dependencies=[Depends(rate_limit("1/minute", key="user"))])
    async def x() -> dict[str, Any]:
        return {}

    async with client_for(armor(app, ArmorConfig())) as c:
        response = await c.get("/x")
    # Never counted by address instead: the request fails, the cause logged with its id.
    assert (response.status_code, response.json()["error"]) == (500, "internal_error")
    assert "key 'user' needs an identify hook" in caplog.text
    assert response.headers["x-request-id"] in caplog.text


@pytest.mark.asyncio_only
def test_a_websocket_route_limits_connections() -> None:
    app = FastAPI(exception_handlers=armor_exception_handlers(), openapi_url=None)

    @app.websocket("/ws", dependencies=[Depends(rate_limit("2/minute"))])
    async def ws(websocket: WebSocket) -> None:
        await websocket.accept()
        await websocket.send_text("hi")
        await websocket.close()

    with serve(armor(app, ArmorConfig())) as base:
        url = base.replace("http://", "ws://") + "/ws"
        for left in ("1", "0"):
            with connect(url, open_timeout=5) as socket:
                assert socket.recv(timeout=5) == "hi"
                assert socket.response.headers["X-RateLimit-Remaining"] == left
                assert socket.response.headers["RateLimit-Policy"] == '"ip-ws";q=2;w=60'
        with pytest.raises(InvalidStatus) as caught:
            connect(url, open_timeout=5).close()
    response = caught.value.response
    body = json.loads(response.body)
    assert (response.status_code, body["error"]) == (429, "rate_limited")
    assert body["request_id"] == response.headers["X-Request-ID"]
    assert response.headers["Retry-After"] == "30"


async def test_dependency_decisions_are_counted_like_configured_rules() -> None:
    from asgi_armor.metrics import Metrics

    class Counted(Metrics):
        def __init__(self) -> None:
            super().__init__()
            self.seen: list[tuple[str, str]] = []

        def rate_limit(self, policy: str, result: str) -> None:
            self.seen.append((policy, result))

    sink = Counted()
    armored = armor(make_app(), ArmorConfig(), store=MemoryStore(), metrics=sink)
    transport = httpx.ASGITransport(app=armored, client=("203.0.113.77", 1))
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        statuses = [(await client.get("/api/depends")).status_code for _ in range(3)]
    assert statuses == [200, 200, 429]
    assert [result for _, result in sink.seen] == ["allowed", "allowed", "limited"]
    assert len({policy for policy, _ in sink.seen}) == 1
