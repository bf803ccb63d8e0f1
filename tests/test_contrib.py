"""The framework adapters, in process: Starlette (and FastAPI), Quart and Litestar.

Each framework catches what its routes raise before an outer middleware sees it; the
adapters make that render the envelope, with the request id ``ErrorMiddleware`` chose, the
error's headers, and nothing leaked; unexpected exceptions are logged exactly once.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import anyio
import httpx
import litestar
import msgspec
import pytest
import quart
import starlette.exceptions
from litestar.exceptions import PermissionDeniedException
from litestar.params import JSONBody
from quart.asgi import ASGIHTTPConnection
from quart.testing import WebsocketResponseError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from asgi_armor import (
    CircuitOpenError,
    ErrorMiddleware,
    MemoryStore,
    RateLimiter,
    TimeoutMiddleware,
    Unauthorized,
)
from asgi_armor.contrib import litestar as armor_litestar
from asgi_armor.contrib import quart as armor_quart
from asgi_armor.contrib import starlette as armor_starlette
from asgi_armor.errors import HTTPError, InternalError, MethodNotAllowed, NotFound
from asgi_armor.signing import Stripe, verify
from tests.envelope import assert_envelope

SECRET_TEXT = "password=hunter2 at /srv/app/db.py"

LitestarRequest = litestar.Request


class Item(msgspec.Struct):
    """A body Litestar decodes (and validates) itself."""

    name: str
    price: int


class Routes:
    """What every test app does, whatever the framework: one method per route."""

    def __init__(self) -> None:
        self.limiter = RateLimiter(MemoryStore())
        self.slow_outcomes: list[str] = []

    def ok(self) -> dict[str, Any]:
        return {"ok": True}

    async def limited(self) -> dict[str, Any]:
        await self.limiter.enforce("caller", "1/minute", policy="direct")
        return {"ok": True}

    async def group(self) -> dict[str, Any]:
        async def dependency() -> None:
            raise CircuitOpenError(7.2)

        async with anyio.create_task_group() as tg:
            tg.start_soon(dependency)
        return {"ok": True}

    def boom(self) -> dict[str, Any]:
        raise RuntimeError(SECRET_TEXT)

    def unauthorized(self) -> dict[str, Any]:
        raise Unauthorized()

    def unsigned(self) -> dict[str, Any]:
        # A route verifying a webhook itself, with the stand-alone verify().
        verify({}, b"{}", "secret", Stripe())
        return {"ok": True}

    async def slow(self) -> dict[str, Any]:
        try:
            await anyio.sleep(5)
        except BaseException:
            self.slow_outcomes.append("cancelled")
            raise
        return {"ok": True}


def starlette_app(routes: Routes, logger: logging.Logger | None = None) -> Any:
    def forbidden(request: Request) -> JSONResponse:
        raise starlette.exceptions.HTTPException(403, "No access to this project")

    def http500(request: Request) -> JSONResponse:
        raise starlette.exceptions.HTTPException(500, SECRET_TEXT)

    async def call(request: Request) -> JSONResponse:
        name = request.url.path.strip("/")
        result = getattr(routes, name)()
        if not isinstance(result, dict):
            result = await result
        return JSONResponse(result)

    names = ["ok", "limited", "group", "boom", "unauthorized", "unsigned", "slow"]
    app = Starlette(
        routes=[Route(f"/{name}", call, methods=["GET"]) for name in names]
        + [Route("/forbidden", forbidden), Route("/http500", http500)]
    )
    armor_starlette.install(app)
    return app


def quart_app(routes: Routes, logger: logging.Logger | None = None) -> Any:
    app = quart.Quart("test_contrib")

    def view(name: str) -> Callable[[], Any]:
        async def call() -> Any:
            result = getattr(routes, name)()
            if not isinstance(result, dict):
                result = await result
            return result

        return call

    for name in ["ok", "limited", "group", "boom", "unauthorized", "unsigned", "slow"]:
        app.add_url_rule(f"/{name}", name, view(name), methods=["GET"])

    @app.get("/forbidden")
    async def forbidden() -> Any:
        quart.abort(403, description="No access to this project")

    @app.get("/http500")
    async def http500() -> Any:
        quart.abort(500, description=SECRET_TEXT)

    @app.get("/plain-403")
    async def plain_403() -> Any:
        quart.abort(403)

    @app.get("/folder/")
    async def folder() -> Any:
        return {"ok": True}

    armor_quart.install(app, logger=logger)
    return app


def litestar_app(routes: Routes, logger: logging.Logger | None = None) -> Any:
    def handler(name: str) -> Any:
        async def call() -> dict[str, Any]:
            result = getattr(routes, name)()
            if not isinstance(result, dict):
                result = await result
            return result  # type: ignore[no-any-return]

        return litestar.get(f"/{name}", name=name)(call)

    handlers = [
        handler(n) for n in ["ok", "limited", "group", "boom", "unauthorized", "unsigned", "slow"]
    ]

    @litestar.get("/forbidden")
    async def forbidden() -> None:
        raise PermissionDeniedException("No access to this project")

    @litestar.get("/http500")
    async def http500() -> None:
        raise litestar.exceptions.InternalServerException(SECRET_TEXT)

    @litestar.post("/items")
    async def create_item(data: JSONBody[Item]) -> dict[str, Any]:
        return {"name": data.name}

    return litestar.Litestar(
        [*handlers, forbidden, http500, create_item],
        plugins=[armor_litestar.ArmorPlugin(logger=logger)],
        logging_config=None,
        openapi_config=None,
    )


FRAMEWORKS: dict[str, Callable[..., Any]] = {
    "starlette": starlette_app,
    "quart": quart_app,
    "litestar": litestar_app,
}
# Quart runs on asyncio only (it schedules its own asyncio tasks).
PARAMS = [
    pytest.param("starlette"),
    pytest.param("quart", marks=pytest.mark.asyncio_only),
    pytest.param("litestar"),
]


def wrapped(app: Any) -> Any:
    """Any framework's app as the plain ASGI callable ErrorMiddleware is typed for."""
    return app


def client_for(app: Any) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=app, client=("1.2.3.4", 123))
    return httpx.AsyncClient(transport=transport, base_url="http://t")


def envelope(response: httpx.Response) -> dict[str, Any]:
    return assert_envelope(response, response.status_code)


@pytest.fixture(params=PARAMS)
def framework(request: pytest.FixtureRequest) -> str:
    return request.param  # type: ignore[no-any-return]


@pytest.fixture
def routes() -> Routes:
    return Routes()


@pytest.fixture
def armored(framework: str, routes: Routes) -> Any:
    return ErrorMiddleware(FRAMEWORKS[framework](routes))


@pytest.mark.anyio
async def test_armor_error_in_a_route_renders_with_its_headers(armored: Any) -> None:
    async with client_for(armored) as client:
        assert (await client.get("/limited")).status_code == 200
        response = await client.get("/limited")
    assert response.status_code == 429
    data = envelope(response)
    assert data["error"] == "rate_limited"
    assert response.headers["retry-after"] == "60"
    assert response.headers["x-ratelimit-limit"] == "1"
    assert response.headers["x-ratelimit-remaining"] == "0"
    assert response.headers["ratelimit-policy"] == '"direct";q=1;w=60'
    assert int(response.headers["content-length"]) == len(response.content)


@pytest.mark.anyio
async def test_armor_error_inside_an_exception_group(armored: Any) -> None:
    async with client_for(armored) as client:
        response = await client.get("/group")
    assert response.status_code == 503
    assert envelope(response)["error"] == "service_unavailable"
    assert response.headers["retry-after"] == "8"


@pytest.mark.anyio
async def test_request_id_is_the_one_error_middleware_chose(armored: Any) -> None:
    async with client_for(armored) as client:
        response = await client.get("/unauthorized", headers={"X-Request-ID": "abc-123"})
        generated = await client.get("/unauthorized")
    assert response.status_code == 401
    assert envelope(response)["request_id"] == "abc-123"
    assert response.headers.get_list("x-request-id") == ["abc-123"]
    assert envelope(generated)["request_id"].startswith("req_")


@pytest.mark.anyio
async def test_401_raised_in_a_route_keeps_its_challenge(armored: Any) -> None:
    # RFC 9110 section 15.5.2: a 401 carries WWW-Authenticate, whatever framework renders it.
    async with client_for(armored) as client:
        bearer = await client.get("/unauthorized")
        unsigned = await client.get("/unsigned")
    assert bearer.status_code == 401
    assert envelope(bearer)["error"] == "unauthorized"
    assert bearer.headers.get_list("www-authenticate") == ["Bearer"]
    assert unsigned.status_code == 401
    assert envelope(unsigned)["error"] == "invalid_signature"
    assert unsigned.headers.get_list("www-authenticate") == [
        'Signature scheme="stripe", header="Stripe-Signature"'
    ]


@pytest.mark.anyio
async def test_unknown_route_and_wrong_method(armored: Any) -> None:
    async with client_for(armored) as client:
        missing = await client.get("/nope")
        wrong = await client.post("/ok")
    assert missing.status_code == 404
    assert envelope(missing)["error"] == "not_found"
    assert envelope(missing)["message"] == "Resource not found"
    assert wrong.status_code == 405
    assert envelope(wrong)["error"] == "method_not_allowed"
    assert "GET" in wrong.headers["allow"]


@pytest.mark.anyio
async def test_other_http_errors_keep_their_status_and_message(armored: Any) -> None:
    async with client_for(armored) as client:
        forbidden = await client.get("/forbidden")
        http500 = await client.get("/http500")
    assert forbidden.status_code == 403
    assert envelope(forbidden)["error"] == "forbidden"
    assert envelope(forbidden)["message"] == "No access to this project"
    # A 500 the app raised on purpose is still opaque.
    assert http500.status_code == 500
    assert envelope(http500)["error"] == "internal_error"
    assert SECRET_TEXT not in http500.text


@pytest.mark.anyio
async def test_unexpected_exception_is_opaque_and_logged_once(
    armored: Any, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO):
        async with client_for(armored) as client:
            response = await client.get("/boom")
    assert response.status_code == 500
    data = envelope(response)
    assert data == {
        "error": "internal_error",
        "message": "An internal error occurred",
        "details": [],
        "request_id": data["request_id"],
    }
    assert SECRET_TEXT not in response.text
    assert "RuntimeError" not in response.text
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1, [r.getMessage() for r in errors]
    assert errors[0].name == "asgi_armor"
    assert data["request_id"] in errors[0].getMessage()
    assert errors[0].exc_info is not None
    assert str(errors[0].exc_info[1]) == SECRET_TEXT


@pytest.mark.anyio
async def test_problem_format_is_honoured(framework: str, routes: Routes) -> None:
    app = ErrorMiddleware(FRAMEWORKS[framework](routes), error_format="problem")
    async with client_for(app) as client:
        response = await client.get("/nope")
    assert response.status_code == 404
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json()["type"] == "urn:asgi-armor:error:not_found"


@pytest.mark.anyio
async def test_adapter_alone_still_answers_the_envelope(framework: str, routes: Routes) -> None:
    # Without ErrorMiddleware the adapter makes the request id itself.
    async with client_for(FRAMEWORKS[framework](routes)) as client:
        response = await client.get("/unauthorized")
    assert response.status_code == 401
    assert envelope(response)["request_id"].startswith("req_")


@pytest.mark.anyio
async def test_timeout_cancels_the_route_before_the_504(framework: str, routes: Routes) -> None:
    app = ErrorMiddleware(
        TimeoutMiddleware(FRAMEWORKS[framework](routes), routes={"GET /slow": 0.2})
    )
    async with client_for(app) as client:
        response = await client.get("/slow")
        # Recorded before the 504 left: the route's cleanup ran, nothing runs on.
        outcomes = list(routes.slow_outcomes)
    assert response.status_code == 504
    assert envelope(response)["error"] == "timeout"
    assert outcomes == ["cancelled"]


# ----------------------------------------------------------------- the mappings alone


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (starlette.exceptions.HTTPException(404), NotFound),
        (starlette.exceptions.HTTPException(405, headers={"Allow": "GET, HEAD"}), MethodNotAllowed),
        (starlette.exceptions.HTTPException(418), HTTPError),
        (starlette.exceptions.HTTPException(500), InternalError),
        (ValueError("x"), InternalError),
    ],
)
def test_starlette_mapping(exc: Exception, expected: type[Exception]) -> None:
    assert type(armor_starlette.as_armor_error(exc)) is expected


def test_starlette_mapping_keeps_allow() -> None:
    error = armor_starlette.as_armor_error(
        starlette.exceptions.HTTPException(405, headers={"Allow": "GET, HEAD"})
    )
    assert error.headers == {"Allow": "GET, HEAD"}


def test_quart_mapping() -> None:
    from werkzeug import exceptions as wz
    from werkzeug.datastructures import WWWAuthenticate

    assert type(armor_quart.as_armor_error(wz.NotFound())) is NotFound
    error = armor_quart.as_armor_error(wz.MethodNotAllowed(["GET", "POST"]))
    assert error.headers == {"Allow": "GET, POST"}
    teapot = armor_quart.as_armor_error(wz.ImATeapot())
    assert (teapot.status, teapot.error, teapot.message) == (418, "i_m_a_teapot", "I'm a Teapot")
    assert armor_quart.as_armor_error(wz.Forbidden("Nope")).message == "Nope"
    assert type(armor_quart.as_armor_error(wz.InternalServerError(SECRET_TEXT))) is InternalError
    assert armor_quart.as_armor_error(wz.ServiceUnavailable(SECRET_TEXT)).message == (
        "Service Unavailable"
    )
    assert type(armor_quart.as_armor_error(KeyError("x"))) is InternalError
    challenge = WWWAuthenticate("bearer", {"realm": "api"})
    denied = armor_quart.as_armor_error(wz.Unauthorized(www_authenticate=challenge))
    assert (denied.status, denied.error) == (401, "unauthorized")
    assert denied.headers == {"WWW-Authenticate": "Bearer realm=api"}
    assert armor_quart.as_armor_error(wz.TooManyRequests(retry_after=5)).headers == {
        "Retry-After": "5"
    }


def test_litestar_mapping() -> None:
    from litestar import exceptions as lx

    assert type(armor_litestar.as_armor_error(lx.NotFoundException())) is NotFound
    error = armor_litestar.as_armor_error(lx.MethodNotAllowedException(headers={"allow": "GET"}))
    assert error.headers == {"Allow": "GET"}
    denied = armor_litestar.as_armor_error(
        lx.NotAuthorizedException("Token expired", headers={"WWW-Authenticate": "Bearer"})
    )
    assert (denied.status, denied.error, denied.message) == (401, "unauthorized", "Token expired")
    assert denied.headers == {"WWW-Authenticate": "Bearer"}
    assert type(armor_litestar.as_armor_error(lx.InternalServerException(SECRET_TEXT))) is (
        InternalError
    )
    assert type(armor_litestar.as_armor_error(RuntimeError())) is InternalError


# ----------------------------------------------------------------- Quart specifics


@pytest.mark.anyio
async def test_quart_default_descriptions_are_not_passed_on(asyncio_only: None) -> None:
    app = ErrorMiddleware(quart_app(Routes()))
    async with client_for(app) as client:
        response = await client.get("/plain-403")
    assert response.status_code == 403
    assert envelope(response)["message"] == "Forbidden"


@pytest.mark.anyio
async def test_quart_routing_redirects_are_left_alone(asyncio_only: None) -> None:
    app = ErrorMiddleware(quart_app(Routes()))
    async with client_for(app) as client:
        response = await client.get("/folder")
    assert response.status_code in (301, 308)
    assert response.headers["location"].endswith("/folder/")


@pytest.mark.anyio
async def test_quart_custom_logger(asyncio_only: None, caplog: pytest.LogCaptureFixture) -> None:
    logger = logging.getLogger("myapp.errors")
    app = ErrorMiddleware(quart_app(Routes(), logger=logger))
    async with client_for(app) as client:
        response = await client.get("/boom")
    assert response.status_code == 500
    assert [r.name for r in caplog.records if r.levelno >= logging.ERROR] == ["myapp.errors"]


@pytest.mark.anyio
async def test_quart_failure_outside_the_route_is_logged_once_with_the_id(
    asyncio_only: None, caplog: pytest.LogCaptureFixture
) -> None:
    app = quart.Quart("after")

    @app.get("/")
    async def index() -> Any:
        # Not a valid response value: Quart fails while finalizing, outside the route.
        return object()

    armor_quart.install(app)
    async with client_for(ErrorMiddleware(wrapped(app))) as client:
        response = await client.get("/")
    assert response.status_code == 500
    data = envelope(response)
    assert data["error"] == "internal_error"
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert [r.name for r in errors] == ["asgi_armor"]
    assert data["request_id"] in errors[0].getMessage()
    assert "object" not in response.text


@pytest.mark.anyio
async def test_quart_still_signals_got_request_exception(asyncio_only: None) -> None:
    app = quart_app(Routes())
    seen: list[BaseException] = []

    async def receiver(sender: Any, exception: BaseException, **_: Any) -> None:
        seen.append(exception)

    quart.got_request_exception.connect(receiver, app)
    try:
        async with client_for(ErrorMiddleware(wrapped(app))) as client:
            await client.get("/boom")
            await client.get("/unauthorized")  # an ArmorError is not an "exception" to report
    finally:
        quart.got_request_exception.disconnect(receiver, app)
    assert [str(exc) for exc in seen] == [SECRET_TEXT]


@pytest.mark.anyio
async def test_quart_websocket_errors_are_answered_too(
    asyncio_only: None, caplog: pytest.LogCaptureFixture
) -> None:
    app = quart.Quart("ws")

    @app.websocket("/ws")
    async def ws() -> None:
        raise RuntimeError(SECRET_TEXT)

    armor_quart.install(app)
    with anyio.fail_after(5):
        with pytest.raises(WebsocketResponseError) as info:
            async with app.test_client().websocket("/ws") as socket:
                await socket.send("hello")
    response = info.value.response
    assert response.status_code == 500
    data = msgspec.json.decode(await response.get_data())
    assert data["error"] == "internal_error"
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert [r.name for r in errors] == ["asgi_armor"]
    assert data["request_id"] in errors[0].getMessage()


def test_quart_install_keeps_a_custom_connection_class() -> None:
    class Custom(ASGIHTTPConnection):
        pass

    app = quart.Quart("custom")
    app.asgi_http_class = Custom
    armor_quart.install(app)
    assert issubclass(app.asgi_http_class, Custom)
    assert issubclass(app.asgi_http_class, armor_quart.CancellableHTTPConnection)
    chosen = app.asgi_http_class
    armor_quart.install(app)  # idempotent
    assert app.asgi_http_class is chosen

    plain = quart.Quart("plain")
    armor_quart.install(plain)
    assert plain.asgi_http_class is armor_quart.CancellableHTTPConnection


@pytest.mark.anyio
async def test_quart_route_finishing_normally_is_not_cancelled(asyncio_only: None) -> None:
    app = quart.Quart("normal")

    @app.get("/")
    async def index() -> Any:
        await asyncio.sleep(0.01)
        return {"ok": True}

    armor_quart.install(app)
    async with client_for(ErrorMiddleware(wrapped(app))) as client:
        responses = [await client.get("/") for _ in range(3)]
    assert [r.json() for r in responses] == [{"ok": True}] * 3


# ----------------------------------------------------------------- Litestar specifics


@pytest.mark.anyio
async def test_litestar_body_validation_renders_as_the_envelope() -> None:
    app = ErrorMiddleware(litestar_app(Routes()))
    async with client_for(app) as client:
        response = await client.post("/items", json={"name": "x", "price": "free"})
    assert response.status_code == 400
    data = envelope(response)
    assert data["error"] == "bad_request"
    assert data["details"] == [
        {"code": "invalid", "message": "Expected `int`, got `str`", "field": "price"}
    ]


@pytest.mark.anyio
async def test_litestar_exception_handlers_mapping() -> None:
    @litestar.get("/")
    async def index() -> None:
        raise RuntimeError(SECRET_TEXT)

    app = litestar.Litestar(
        [index],
        exception_handlers=armor_litestar.armor_exception_handlers(),
        logging_config=None,
        openapi_config=None,
    )
    async with client_for(ErrorMiddleware(wrapped(app))) as client:
        response = await client.get("/")
        missing = await client.get("/nope")
    assert envelope(response)["error"] == "internal_error"
    assert envelope(missing)["error"] == "not_found"


@pytest.mark.anyio
async def test_litestar_plugin_lets_the_apps_own_handlers_win() -> None:
    def teapot(request: LitestarRequest[Any, Any, Any], exc: Exception) -> litestar.Response[Any]:
        return litestar.Response({"mine": True}, status_code=418)

    @litestar.get("/")
    async def index() -> None:
        raise KeyError("x")

    app = litestar.Litestar(
        [index],
        exception_handlers={KeyError: teapot},
        plugins=[armor_litestar.ArmorPlugin()],
        logging_config=None,
        openapi_config=None,
    )
    async with client_for(ErrorMiddleware(wrapped(app))) as client:
        response = await client.get("/")
        missing = await client.get("/nope")
    assert response.status_code == 418
    assert response.json() == {"mine": True}
    assert envelope(missing)["error"] == "not_found"


@pytest.mark.anyio
async def test_starlette_http_exception_keeps_headers_and_string_message() -> None:
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.routing import Route as StarletteRoute

    from asgi_armor.contrib.starlette import install

    async def login(request: object) -> None:
        raise HTTPException(401, headers={"WWW-Authenticate": 'Bearer realm="api"'})

    async def odd(request: object) -> None:
        raise HTTPException(400, detail={"x": [1, 2]})  # type: ignore[arg-type]

    inner = Starlette(routes=[StarletteRoute("/login", login), StarletteRoute("/odd", odd)])
    install(inner)
    transport = httpx.ASGITransport(app=ErrorMiddleware(inner))
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        denied = await client.get("/login")
        odd_response = await client.get("/odd")
    assert denied.status_code == 401
    assert denied.headers["www-authenticate"] == 'Bearer realm="api"'
    assert denied.json()["error"] == "unauthorized"
    assert odd_response.json()["message"] == "Bad Request"


@pytest.mark.anyio
async def test_starlette_client_disconnect_is_not_logged_as_an_error(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from starlette.applications import Starlette
    from starlette.routing import Route as StarletteRoute

    from asgi_armor.contrib.starlette import install

    async def upload(request: Request) -> None:
        await request.body()

    inner = Starlette(routes=[StarletteRoute("/upload", upload, methods=["POST"])])
    install(inner)
    messages = iter(
        [
            {"type": "http.request", "body": b"part", "more_body": True},
            {"type": "http.disconnect"},
        ]
    )

    async def receive() -> dict[str, Any]:
        return next(messages)

    async def send(message: dict[str, Any]) -> None:
        pass

    scope = {
        "type": "http", "method": "POST", "path": "/upload", "raw_path": b"/upload",
        "query_string": b"", "headers": [], "root_path": "",
    }  # fmt: skip
    with caplog.at_level(logging.ERROR, logger="asgi_armor"):
        await ErrorMiddleware(inner)(scope, receive, send)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
