"""The envelope, request ids, and what happens to unexpected exceptions."""

from __future__ import annotations

import logging
from typing import Any

import httpx
import msgspec
import pytest

from asgi_armor._asgi import ASGIApp, Message, Receive, Scope, Send, send_json
from asgi_armor.errors import (
    ArmorError,
    CircuitOpenError,
    ConfigError,
    ErrorDetail,
    ErrorMiddleware,
    HeadersTooLarge,
    HTTPError,
    IdempotencyKeyInUse,
    IdempotencyKeyInvalid,
    IdempotencyKeyMissing,
    IdempotencyKeyReused,
    InternalError,
    InvalidJSON,
    InvalidSignature,
    NotFound,
    Overloaded,
    PayloadTooLarge,
    RateLimited,
    RequestTimeout,
    ServiceUnavailable,
    Unauthorized,
    UnsupportedMediaType,
    URITooLong,
    ValidationFailed,
    render,
)
from tests.envelope import assert_envelope

pytestmark = pytest.mark.anyio

ALL_ERRORS: list[tuple[ArmorError, int, str]] = [
    (
        ValidationFailed(details=[ErrorDetail("required", "This field is required", "name")]),
        422,
        "validation_error",
    ),
    (InvalidJSON(), 400, "invalid_json"),
    (PayloadTooLarge(max_bytes=10), 413, "payload_too_large"),
    (URITooLong(), 414, "uri_too_long"),
    (HeadersTooLarge(), 431, "headers_too_large"),
    (UnsupportedMediaType(), 415, "unsupported_media_type"),
    (RateLimited(2.5), 429, "rate_limited"),
    (IdempotencyKeyMissing(), 400, "idempotency_key_missing"),
    (IdempotencyKeyInvalid(), 400, "idempotency_key_invalid"),
    (IdempotencyKeyInUse(1), 409, "idempotency_key_in_use"),
    (IdempotencyKeyReused(), 422, "idempotency_key_reused"),
    (ServiceUnavailable(), 503, "service_unavailable"),
    (CircuitOpenError(29.2), 503, "service_unavailable"),
    (Overloaded(), 503, "overloaded"),
    (RequestTimeout(5), 504, "timeout"),
    (Unauthorized(), 401, "unauthorized"),
    (InvalidSignature("replayed"), 401, "invalid_signature"),
    (NotFound(), 404, "not_found"),
    (InternalError(), 500, "internal_error"),
]


def raising(exc: BaseException):  # type: ignore[no-untyped-def]
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        raise exc

    return app


def client(app, **kwargs):  # type: ignore[no-untyped-def]
    transport = httpx.ASGITransport(app=app, client=("203.0.113.9", 5000))
    return httpx.AsyncClient(transport=transport, base_url="http://test", **kwargs)


@pytest.mark.parametrize(("exc", "status", "error"), ALL_ERRORS, ids=lambda v: str(v)[:30])
async def test_every_error_renders_the_envelope(exc: ArmorError, status: int, error: str) -> None:
    async with client(ErrorMiddleware(raising(exc))) as http:
        response = await http.get("/x")
    assert_envelope(response, status, error)


async def test_seed_envelope_shape_exactly() -> None:
    exc = ValidationFailed(
        details=[
            ErrorDetail("invalid_email", "Email format is invalid", "email"),
            ErrorDetail("required", "This field is required", "name"),
        ]
    )
    _, _, body = render(exc, "req_abc123")
    assert msgspec.json.decode(body) == {
        "error": "validation_error",
        "message": "Invalid request parameters",
        "details": [
            {"code": "invalid_email", "message": "Email format is invalid", "field": "email"},
            {"code": "required", "message": "This field is required", "field": "name"},
        ],
        "request_id": "req_abc123",
    }


def test_detail_field_is_null_not_absent() -> None:
    _, _, body = render(InvalidSignature("signature_mismatch"), "r")
    assert msgspec.json.decode(body)["details"] == [
        {"code": "signature_mismatch", "message": "No signature matches the body", "field": None}
    ]


def test_retry_after_rounds_up() -> None:
    assert RateLimited(0.2).headers["Retry-After"] == "1"
    assert RateLimited(2.0).headers["Retry-After"] == "2"
    assert CircuitOpenError(29.01).headers["Retry-After"] == "30"
    assert RequestTimeout(5).message == "Request timed out after 5s"
    assert RequestTimeout(0.5).message == "Request timed out after 0.5s"


async def test_problem_format() -> None:
    app = ErrorMiddleware(raising(NotFound()), error_format="problem")
    async with client(app) as http:
        response = await http.get("/x")
    assert response.status_code == 404
    assert response.headers["content-type"] == "application/problem+json"
    body = response.json()
    assert body["status"] == 404
    assert body["title"] == "Resource not found"
    assert body["type"] == "urn:asgi-armor:error:not_found"
    assert body["request_id"] == response.headers["x-request-id"]


def test_bad_error_format_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="error_format"):
        ErrorMiddleware(raising(NotFound()), error_format="xml")  # type: ignore[arg-type]


async def ok_app(scope: Scope, receive: Receive, send: Send) -> None:
    await send_json(send, 200, msgspec.json.encode({"rid": scope["state"]["request_id"]}))


async def test_request_id_generated_and_propagated() -> None:
    async with client(ErrorMiddleware(ok_app)) as http:
        first = await http.get("/")
        second = await http.get("/")
    rid = first.headers["x-request-id"]
    assert rid.startswith("req_")
    assert first.json() == {"rid": rid}
    assert rid != second.headers["x-request-id"]


async def test_safe_incoming_request_id_is_reused() -> None:
    async with client(ErrorMiddleware(ok_app)) as http:
        response = await http.get("/", headers={"X-Request-ID": "trace-1234.abc:5"})
    assert response.headers["x-request-id"] == "trace-1234.abc:5"
    assert response.json() == {"rid": "trace-1234.abc:5"}


@pytest.mark.parametrize(
    "incoming",
    ["x" * 129, "evil\tid", "a b", "<script>", "id\u00e9", ""],
)
async def test_unsafe_incoming_request_id_is_replaced(incoming: str) -> None:
    async with client(ErrorMiddleware(ok_app)) as http:
        response = await http.get("/", headers={"X-Request-ID": incoming.encode("utf-8")})
    assert response.headers["x-request-id"].startswith("req_")
    assert response.headers.get_list("x-request-id") == [response.headers["x-request-id"]]


async def test_app_cannot_forge_a_second_request_id() -> None:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await send_json(send, 200, b"{}", [(b"x-request-id", b"other")])

    async with client(ErrorMiddleware(app)) as http:
        response = await http.get("/")
    assert response.headers.get_list("x-request-id") == [scope_id(response)]


def scope_id(response: httpx.Response) -> str:
    rid = response.headers["x-request-id"]
    assert rid.startswith("req_")
    return rid


class SecretDatabaseError(Exception):
    pass


async def test_unexpected_exception_leaks_nothing(caplog: pytest.LogCaptureFixture) -> None:
    exc = SecretDatabaseError("SELECT * FROM users WHERE password='hunter2' /srv/app/db.py")
    with caplog.at_level(logging.ERROR, logger="asgi_armor"):
        async with client(ErrorMiddleware(raising(exc))) as http:
            response = await http.get("/boom")
    assert response.status_code == 500
    body = response.text
    for secret in ("SELECT", "hunter2", "/srv/app", "SecretDatabaseError", "Traceback"):
        assert secret not in body
    rid = response.headers["x-request-id"]
    assert response.json() == {
        "error": "internal_error",
        "message": "An internal error occurred",
        "details": [],
        "request_id": rid,
    }
    # ... but the server log has it all, under the same request id.
    record = next(r for r in caplog.records if rid in r.getMessage())
    assert record.exc_info is not None
    assert record.exc_info[0] is SecretDatabaseError


async def test_armor_error_inside_exception_group_is_rendered() -> None:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        raise ExceptionGroup("tg", [RateLimited(3)])

    async with client(ErrorMiddleware(app)) as http:
        response = await http.get("/")
    assert response.status_code == 429
    assert response.headers["retry-after"] == "3"


async def test_error_after_response_started_aborts_without_second_start() -> None:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"partial", "more_body": True})
        raise RuntimeError("mid-stream failure")

    sent: list[Message] = []

    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Message) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "GET", "path": "/", "headers": [], "query_string": b""}
    with pytest.raises(RuntimeError):
        await ErrorMiddleware(app)(scope, receive, send)
    starts = [m for m in sent if m["type"] == "http.response.start"]
    assert len(starts) == 1
    assert (b"x-request-id", scope["state"]["request_id"].encode()) in starts[0]["headers"]
    assert not any(m["type"] == "http.response.body" and not m.get("more_body") for m in sent)


async def test_non_http_scopes_pass_through() -> None:
    seen = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        seen.append(scope["type"])

    async def receive() -> Message:
        return {"type": "lifespan.startup"}

    async def send(message: Message) -> None:
        pass

    scope = {"type": "lifespan"}
    await ErrorMiddleware(app)(scope, receive, send)
    assert seen == ["lifespan"]
    assert "state" not in scope


@pytest.mark.parametrize(
    ("status", "error"),
    [
        (400, "bad_request"),
        (413, "payload_too_large"),
        (418, "i_m_a_teapot"),
        (429, "rate_limited"),
        (599, "http_error"),
    ],
)
def test_http_error_codes_are_stable_snake_case(status: int, error: str) -> None:
    assert HTTPError(status).error == error
    assert HTTPError(status).status == status


async def drive_websocket(app: ASGIApp, extensions: dict[str, Any] | None) -> list[Message]:
    """Run a websocket handshake through ``app``; return what it sent."""
    sent: list[Message] = []

    async def receive() -> Message:
        return {"type": "websocket.connect"}

    async def send(message: Message) -> None:
        sent.append(message)

    scope: Scope = {"type": "websocket", "path": "/ws", "headers": [], "extensions": extensions}
    await ErrorMiddleware(app)(scope, receive, send)
    return sent


async def refuse(scope: Scope, receive: Receive, send: Send) -> None:
    raise RateLimited(3)


async def test_an_error_before_accept_refuses_the_handshake_with_the_envelope() -> None:
    sent = await drive_websocket(refuse, {"websocket.http.response": {}})
    assert [m["type"] for m in sent] == [
        "websocket.http.response.start",
        "websocket.http.response.body",
    ]
    assert sent[0]["status"] == 429
    body = msgspec.json.decode(sent[1]["body"])
    ids = [v for k, v in sent[0]["headers"] if k == b"x-request-id"]
    assert body["error"] == "rate_limited"
    assert ids == [body["request_id"].encode()]


async def test_without_the_denial_extension_the_handshake_is_closed() -> None:
    sent = await drive_websocket(refuse, None)
    # 1013 "try again later" (RFC 6455 section 7.4.1); the server answers the handshake 403.
    assert sent == [{"type": "websocket.close", "code": 1013, "reason": "rate_limited"}]


async def test_an_unexpected_error_before_accept_leaks_nothing(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def broken(scope: Scope, receive: Receive, send: Send) -> None:
        raise RuntimeError("secret")

    sent = await drive_websocket(broken, {"websocket.http.response": {}})
    assert sent[0]["status"] == 500
    assert b"secret" not in sent[1]["body"]
    assert "unhandled exception" in caplog.text


async def test_an_error_after_accept_is_left_to_the_server() -> None:
    async def accepted_then_broken(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "websocket.accept"})
        raise RuntimeError("mid-stream")

    with pytest.raises(RuntimeError):
        await drive_websocket(accepted_then_broken, {"websocket.http.response": {}})


def test_401s_carry_a_challenge() -> None:
    # RFC 9110 section 15.5.2: a 401 response MUST send WWW-Authenticate.
    _, headers, _ = render(Unauthorized(), "r")
    assert (b"www-authenticate", b"Bearer") in headers
    custom = Unauthorized("Log in first", challenge='Basic realm="admin"')
    assert custom.headers == {"WWW-Authenticate": 'Basic realm="admin"'}
    assert custom.message == "Log in first"
    _, headers, _ = render(InvalidSignature("replayed"), "r")
    assert (b"www-authenticate", b"Signature") in headers


def _reads_then_fails() -> ASGIApp:
    """A Starlette route reading its body: a client gone mid-upload raises ClientDisconnect."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import Route

    async def upload(request: Request) -> Response:
        return Response(await request.body())

    return Starlette(routes=[Route("/upload", upload, methods=["POST"])])


async def _bare_reads_then_fails(scope: Scope, receive: Receive, send: Send) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
    raise RuntimeError("the body never ended")


async def _drive_to_the_log(
    app: ASGIApp,
    wrap: str,
    incoming: list[Message],
    caplog: pytest.LogCaptureFixture,
    method: str = "GET",
    path: str = "/",
    headers: list[tuple[bytes, bytes]] | None = None,
) -> tuple[Scope, list[Message], list[logging.LogRecord]]:
    """``app`` behind ``ErrorMiddleware`` or ``armor()`` (``wrap``), driven by hand: the
    client's ``incoming`` messages, then ``http.disconnect`` on every receive. Returns
    the scope, what was sent, and what asgi_armor logged."""
    from asgi_armor import armor

    wrapped = ErrorMiddleware(app) if wrap == "ErrorMiddleware" else armor(app)

    async def receive() -> Message:
        return incoming.pop(0) if incoming else {"type": "http.disconnect"}

    sent: list[Message] = []

    async def send(message: Message) -> None:
        sent.append(message)

    scope: Scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": headers or [],
        "client": ("192.0.2.7", 50000),
        "server": ("testserver", 80),
        "state": {},
    }
    with caplog.at_level(logging.DEBUG, logger="asgi_armor"):
        await wrapped(scope, receive, send)
    return scope, sent, [record for record in caplog.records if record.name == "asgi_armor"]


@pytest.mark.parametrize("inner", [_reads_then_fails, lambda: _bare_reads_then_fails])
@pytest.mark.parametrize("wrap", ["ErrorMiddleware", "armor"])
async def test_a_client_that_hangs_up_mid_body_is_no_server_error(
    inner: Any, wrap: str, caplog: pytest.LogCaptureFixture
) -> None:
    """An app failing on the ``http.disconnect`` of a client that left mid-upload is the
    client's doing: logged at INFO, without a traceback, and never as an unhandled
    exception; a failure with the client still there is (see above)."""
    scope, _, ours = await _drive_to_the_log(
        inner(),
        wrap,
        [{"type": "http.request", "body": b'{"half": ', "more_body": True}],
        caplog,
        method="POST",
        path="/upload",
        headers=[(b"content-type", b"application/json"), (b"content-length", b"100")],
    )
    assert [(r.levelno, r.exc_info) for r in ours] == [(logging.INFO, None)]
    assert ours[0].getMessage().startswith("client disconnected before the response")
    assert scope["state"]["request_id"] in ours[0].getMessage()


async def _answers_then_fails(scope: Scope, receive: Receive, send: Send) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"done"})
    await receive()  # what a server reports once the response is complete
    raise RuntimeError("a bug after the response")


@pytest.mark.parametrize("wrap", ["ErrorMiddleware", "armor"])
async def test_the_disconnect_after_a_whole_response_is_no_client_gone(
    wrap: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Servers answer ``http.disconnect`` to a receive after the response (uvicorn does):
    a failure then is a bug of the app's, logged at ERROR with its traceback."""
    _, sent, ours = await _drive_to_the_log(_answers_then_fails, wrap, [], caplog)
    assert [m.get("status") for m in sent] == [200, None]
    assert [r.levelno for r in ours] == [logging.ERROR]
    assert ours[0].exc_info is not None
