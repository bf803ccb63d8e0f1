"""Validation: InputLimits over HTTP, decode/decode_query collecting every error, Email, Name."""

from __future__ import annotations

import contextlib
import datetime
import enum
import uuid
from collections.abc import AsyncIterator
from typing import Annotated, Any, Literal

import httpx
import msgspec
import pytest

from asgi_armor._asgi import Message, Receive, Scope, Send, read_body, send_json
from asgi_armor.errors import (
    ConfigError,
    ErrorDetail,
    ErrorMiddleware,
    InvalidJSON,
    PayloadTooLarge,
    ValidationFailed,
)
from asgi_armor.validation import (
    MAX_DETAILS,
    Email,
    Float,
    InputLimits,
    Int,
    InvalidValue,
    Name,
    Normalize,
    Text,
    decode,
    decode_query,
    normalize_email,
    normalize_name,
)
from tests.envelope import assert_envelope


class CreateUserRequest(msgspec.Struct, forbid_unknown_fields=True):
    """The seed's example model."""

    email: Email
    name: Name
    age: Int(ge=0, le=150) | None = None  # type: ignore[valid-type]


# --------------------------------------------------------------------------------------
# InputLimits
# --------------------------------------------------------------------------------------

CAP = 1000


class Recorder:
    """An app that reads the whole body chunk by chunk and answers 200 with its size."""

    def __init__(self) -> None:
        self.calls = 0
        self.seen = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.calls += 1
        while True:
            message = await receive()
            if message["type"] != "http.request":
                break
            self.seen += len(message.get("body", b""))
            if not message.get("more_body", False):
                break
        await send_json(send, 200, msgspec.json.encode({"bytes": self.seen}))


def client_for(app: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app, client=("1.2.3.4", 123)), base_url="http://t"
    )


def armored(app: Any, **limits: Any) -> Any:
    limits.setdefault("max_body_bytes", CAP)
    return ErrorMiddleware(InputLimits(app, **limits))


@pytest.mark.anyio
async def test_requests_within_limits_reach_the_app() -> None:
    app = Recorder()
    async with client_for(armored(app)) as client:
        response = await client.post("/x?a=1", content=b"y" * CAP)
    assert response.status_code == 200
    assert response.json() == {"bytes": CAP}
    assert response.headers["x-request-id"].startswith("req_")
    assert app.calls == 1


@pytest.mark.anyio
async def test_long_path_is_414() -> None:
    app = Recorder()
    async with client_for(armored(app, max_url_bytes=100)) as client:
        ok = await client.get("/" + "a" * 99)
        response = await client.get("/" + "a" * 100)
    assert ok.status_code == 200
    body = assert_envelope(response, 414, "uri_too_long")
    assert body["message"] == "Request URI exceeds 100 bytes"
    assert body["details"] == []
    assert app.calls == 1


@pytest.mark.anyio
async def test_long_query_is_414() -> None:
    app = Recorder()
    async with client_for(armored(app, max_url_bytes=100)) as client:
        # "/" + "?" + 98 bytes of query = 100 bytes: allowed; one more is not.
        ok = await client.get("/?" + "q" * 98)
        response = await client.get("/?" + "q" * 99)
    assert ok.status_code == 200
    assert_envelope(response, 414, "uri_too_long")
    assert app.calls == 1


@pytest.mark.anyio
async def test_too_many_headers_is_431() -> None:
    app = Recorder()
    async with client_for(armored(app, max_headers=20)) as client:
        response = await client.get("/", headers={f"x-h{i}": "1" for i in range(20)})
    body = assert_envelope(response, 431, "headers_too_large")
    assert body["message"] == "More than 20 request headers"
    assert app.calls == 0


@pytest.mark.anyio
async def test_too_many_header_bytes_is_431() -> None:
    app = Recorder()
    async with client_for(armored(app, max_header_bytes=500)) as client:
        ok = await client.get("/", headers={"x-big": "v" * 300})
        response = await client.get("/", headers={"x-big": "v" * 500})
    assert ok.status_code == 200
    body = assert_envelope(response, 431, "headers_too_large")
    assert body["message"] == "Request headers exceed 500 bytes"
    assert app.calls == 1


@pytest.mark.anyio
async def test_content_length_over_cap_is_413_without_reading() -> None:
    app = Recorder()
    async with client_for(armored(app)) as client:
        response = await client.post("/", content=b"x" * (CAP + 1))
    body = assert_envelope(response, 413, "payload_too_large")
    assert body["message"] == f"Request body exceeds {CAP} bytes"
    assert app.calls == 0


async def call(
    app: Any,
    headers: list[tuple[bytes, bytes]],
    chunks: list[bytes],
    *,
    path: str = "/",
    http_version: str = "2",
) -> tuple[list[Message], list[int]]:
    """Drive ``app`` by hand: every ``chunks`` item is one http.request message.

    HTTP/2 by default: its body is framed by DATA frames, not headers, so these bodies
    may disagree with their headers as the tests need.
    """
    scope: Scope = {
        "type": "http",
        "http_version": http_version,
        "method": "POST",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "headers": headers,
    }
    sent: list[Message] = []
    pulled: list[int] = []  # how many messages the middleware took from the client

    async def receive() -> Message:
        if len(pulled) < len(chunks):
            index = len(pulled)
            pulled.append(index)
            return {
                "type": "http.request",
                "body": chunks[index],
                "more_body": index < len(chunks) - 1,
            }
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        sent.append(message)

    await app(scope, receive, send)
    return sent, pulled


def response_of(sent: list[Message]) -> tuple[int, dict[str, Any]]:
    assert [m["type"] for m in sent] == ["http.response.start", "http.response.body"]
    return sent[0]["status"], msgspec.json.decode(sent[1]["body"])


@pytest.mark.anyio
async def test_content_length_over_cap_never_touches_receive() -> None:
    app = Recorder()
    sent, pulled = await call(
        armored(app), [(b"content-length", str(CAP + 1).encode())], [b"x" * (CAP + 1)]
    )
    assert response_of(sent)[0] == 413
    assert pulled == []
    assert app.calls == 0


@pytest.mark.anyio
@pytest.mark.parametrize(
    "value",
    [b"abc", b"-5", b"+5", b"1.5", b"", b" ", b"0x10", "\u0661".encode()],
)
async def test_malformed_content_length_is_413(value: bytes) -> None:
    app = Recorder()
    sent, pulled = await call(armored(app), [(b"content-length", value)], [b"x"])
    status, body = response_of(sent)
    assert status == 413
    assert body["error"] == "payload_too_large"
    assert body["message"] == "Content-Length header is not a valid length"
    assert pulled == []
    assert app.calls == 0


@pytest.mark.anyio
async def test_conflicting_content_lengths_are_413_but_agreeing_ones_pass() -> None:
    app = Recorder()
    sent, _ = await call(
        armored(app), [(b"content-length", b"1"), (b"content-length", b"2")], [b"x"]
    )
    assert response_of(sent)[0] == 413
    sent, _ = await call(
        armored(app), [(b"content-length", b"1"), (b"content-length", b"1")], [b"x"]
    )
    assert response_of(sent) == (200, {"bytes": 1})


@pytest.mark.anyio
async def test_huge_content_length_digits_are_413() -> None:
    sent, _ = await call(armored(Recorder()), [(b"content-length", b"9" * 5000)], [b"x"])
    assert response_of(sent)[0] == 413
    sent, _ = await call(armored(Recorder()), [(b"content-length", b"0" * 50 + b"7")], [b"x" * 7])
    assert response_of(sent) == (200, {"bytes": 7})


@pytest.mark.anyio
async def test_lying_content_length_is_cut_off_at_the_cap_under_http2() -> None:
    # HTTP/2 frames a body by its DATA frames, not by Content-Length: the body is counted.
    app = Recorder()
    chunks = [b"x" * 300] * 10  # 3000 bytes behind a Content-Length of 10
    sent, pulled = await call(armored(app), [(b"content-length", b"10")], chunks)
    status, body = response_of(sent)
    assert status == 413
    assert body["error"] == "payload_too_large"
    assert body["request_id"].startswith("req_")
    assert (b"x-request-id", body["request_id"].encode()) in sent[0]["headers"]
    assert app.seen == 900  # three chunks; the fourth would pass 1000 and is withheld
    assert len(pulled) == 4  # nothing read past the chunk that crossed the cap


@pytest.mark.anyio
@pytest.mark.parametrize("version", ["1.0", "1.1"])
async def test_http1_body_within_its_content_length_is_not_recounted(version: str) -> None:
    # HTTP/1 framing (RFC 9112 section 6.3) bounds the body by its Content-Length: the
    # server delivers exactly that many bytes, so the app reads the server's own receive.
    seen: list[Any] = []

    async def app(scope: Scope, receive: Any, send: Any) -> None:
        seen.append(receive)
        await Recorder()(scope, receive, send)

    limits = InputLimits(app, max_body_bytes=CAP)

    async def receive() -> Message:
        return {"type": "http.request", "body": b"x" * 10, "more_body": False}

    scope: Scope = {
        "type": "http",
        "http_version": version,
        "method": "POST",
        "path": "/",
        "headers": [(b"content-length", b"10")],
    }
    sent: list[Message] = []

    async def send(message: Message) -> None:
        sent.append(message)

    await limits(scope, receive, send)
    assert seen == [receive]
    assert sent[0]["status"] == 200
    # Chunked, or with a body timeout, the body is counted whatever the version.
    seen.clear()
    await InputLimits(app, max_body_bytes=CAP, body_timeout=5)(scope, receive, send)
    assert seen[0] is not receive


@pytest.mark.anyio
async def test_chunked_body_over_cap_is_cut_off() -> None:
    app = Recorder()

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(100):
            yield b"y" * 64

    async with client_for(armored(app)) as client:
        response = await client.post("/upload", content=chunks())
    assert response.request.headers["transfer-encoding"] == "chunked"
    assert_envelope(response, 413, "payload_too_large")
    assert app.seen <= CAP
    assert app.seen == 15 * 64


@pytest.mark.anyio
async def test_chunked_body_under_cap_passes_whole() -> None:
    app = Recorder()

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(10):
            yield b"y" * 100

    async with client_for(armored(app)) as client:
        response = await client.post("/upload", content=chunks())
    assert response.status_code == 200
    assert response.json() == {"bytes": 1000}


@pytest.mark.anyio
async def test_read_body_in_the_app_sees_payload_too_large() -> None:
    """An app using read_body with a bigger cap still gets cut off at InputLimits' cap."""
    got: list[BaseException] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await read_body(receive, 10 * CAP)
        except PayloadTooLarge as exc:
            got.append(exc)
            # A framework might still try to answer; that must go nowhere.
            await send_json(send, 500, b"{}")
            raise

    sent, _ = await call(armored(app), [], [b"z" * 600, b"z" * 600])
    assert response_of(sent)[0] == 413
    assert len(got) == 1


@pytest.mark.anyio
async def test_receive_after_cut_off_reports_disconnect() -> None:
    after: list[Message] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        with pytest.raises(PayloadTooLarge):
            await receive()
        after.append(await receive())

    sent, _ = await call(armored(app), [], [b"z" * (CAP + 1)])
    assert response_of(sent)[0] == 413
    assert after == [{"type": "http.disconnect"}]


@pytest.mark.anyio
async def test_cut_off_after_response_started_aborts() -> None:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await read_body(receive, 10 * CAP)

    with pytest.raises(PayloadTooLarge):
        await call(InputLimits(app, max_body_bytes=CAP), [], [b"z" * 800, b"z" * 800])


@pytest.mark.anyio
async def test_unrelated_error_after_cut_off_is_logged_not_raised(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        with contextlib.suppress(PayloadTooLarge):
            await receive()
        raise RuntimeError("boom")

    sent, _ = await call(armored(app), [], [b"z" * (CAP + 1)])
    assert response_of(sent)[0] == 413
    assert "exception after InputLimits answered" in caplog.text


JSON_APP_ROUTES = ["POST /api/*", "PUT /items/{item_id}"]


@pytest.mark.anyio
@pytest.mark.parametrize(
    "content_type",
    [
        "application/json",
        "application/json; charset=utf-8",
        "Application/JSON",
        "application/merge-patch+json",
        "application/vnd.api+json ; q=1",
    ],
)
async def test_json_content_types_are_accepted(content_type: str) -> None:
    app = Recorder()
    async with client_for(armored(app, json_routes=JSON_APP_ROUTES)) as client:
        response = await client.post(
            "/api/users", content=b"{}", headers={"content-type": content_type}
        )
    assert response.status_code == 200


@pytest.mark.anyio
@pytest.mark.parametrize(
    "content_type",
    [None, "text/plain", "application/xml", "application/jsonp", "application/+json", "json"],
)
async def test_non_json_body_on_json_route_is_415(content_type: str | None) -> None:
    app = Recorder()
    headers = {} if content_type is None else {"content-type": content_type}
    async with client_for(armored(app, json_routes=JSON_APP_ROUTES)) as client:
        response = await client.put("/items/7", content=b"{}", headers=headers)
    body = assert_envelope(response, 415, "unsupported_media_type")
    assert body["message"] == "Content-Type must be application/json"
    assert app.calls == 0


@pytest.mark.anyio
async def test_json_routes_leave_other_routes_and_empty_bodies_alone() -> None:
    app = Recorder()
    async with client_for(armored(app, json_routes=JSON_APP_ROUTES)) as client:
        other = await client.post("/upload", content=b"raw", headers={"content-type": "text/plain"})
        get = await client.get("/api/users")
        empty = await client.post("/api/users")
    assert other.status_code == 200
    assert get.status_code == 200
    assert empty.status_code == 200


@pytest.mark.anyio
async def test_body_without_framing_headers_is_checked_when_it_arrives() -> None:
    """HTTP/2 may send a body with no Content-Length: the type is checked on the first byte."""
    app = Recorder()
    sent, _ = await call(armored(app, json_routes=JSON_APP_ROUTES), [], [b"{}"], path="/api/x")
    status, body = response_of(sent)
    assert status == 415
    assert body["error"] == "unsupported_media_type"
    assert app.seen == 0


@pytest.mark.anyio
async def test_chunked_non_json_body_on_json_route_is_415() -> None:
    app = Recorder()

    async def chunks() -> AsyncIterator[bytes]:
        yield b"{}"

    async with client_for(armored(app, json_routes=JSON_APP_ROUTES)) as client:
        response = await client.post(
            "/api/users", content=chunks(), headers={"content-type": "text/plain"}
        )
    assert_envelope(response, 415, "unsupported_media_type")
    assert app.calls == 0


@pytest.mark.anyio
async def test_non_http_scopes_pass_through() -> None:
    seen: list[str] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        seen.append(scope["type"])

    async def receive() -> Message:
        raise AssertionError("not called")

    async def send(message: Message) -> None:
        raise AssertionError("not called")

    limits = InputLimits(app, max_url_bytes=1, max_headers=1)
    await limits({"type": "lifespan"}, receive, send)
    await limits(
        {"type": "websocket", "path": "/" * 10, "headers": [(b"a", b"b")] * 5}, receive, send
    )
    assert seen == ["lifespan", "websocket"]


@pytest.mark.parametrize(
    ("kwargs", "entry"),
    [
        ({"max_body_bytes": 0}, "max_body_bytes"),
        ({"max_url_bytes": -1}, "max_url_bytes"),
        ({"max_headers": True}, "max_headers"),
        ({"max_header_bytes": 1.5}, "max_header_bytes"),
        ({"json_routes": "POST /api/*"}, "json_routes"),
        ({"json_routes": ["POST api"]}, "POST api"),
    ],
)
def test_bad_config_fails_at_start_up(kwargs: dict[str, Any], entry: str) -> None:
    with pytest.raises(ConfigError, match=entry):
        InputLimits(Recorder(), **kwargs)


def test_repr_names_the_limits() -> None:
    limits = InputLimits(Recorder(), json_routes=["POST /api/*"])
    assert "max_body_bytes=1048576" in repr(limits)
    assert "'POST /api/*'" in repr(limits)


# --------------------------------------------------------------------------------------
# decode: fast path, every error at once, each code
# --------------------------------------------------------------------------------------


def details_of(excinfo: pytest.ExceptionInfo[ValidationFailed]) -> list[tuple[str, str | None]]:
    return [(d.code, d.field) for d in excinfo.value.details]


def test_valid_input_is_decoded_and_normalised() -> None:
    user = decode(
        b'{"email": "  Ann.Lee@Example.COM ", "name": "  Ann \\t  Lee\\u0085 ", "age": 30}',
        CreateUserRequest,
    )
    assert user == CreateUserRequest(email="ann.lee@example.com", name="Ann Lee", age=30)
    assert decode('{"email": "a@b.io", "name": "Bo"}', CreateUserRequest).age is None


def test_the_seed_example_reports_every_field_error() -> None:
    with pytest.raises(ValidationFailed) as excinfo:
        decode(b'{"email": "not-an-email", "age": 151, "role": "admin"}', CreateUserRequest)
    error = excinfo.value
    assert error.status == 422
    assert error.error == "validation_error"
    assert error.message == "Invalid request parameters"
    assert list(error.details) == [
        ErrorDetail("invalid_email", "Email format is invalid", "email"),
        ErrorDetail("required", "This field is required", "name"),
        ErrorDetail("out_of_range", "Must be >= 0 and <= 150", "age"),
        ErrorDetail("unknown_field", "Unknown field", "role"),
    ]


def test_normaliser_errors_alone_are_all_reported() -> None:
    """msgspec accepts the types, then both normalisers object: both are reported."""
    with pytest.raises(ValidationFailed) as excinfo:
        decode(b'{"email": "x@", "name": " \\u0000 "}', CreateUserRequest)
    assert details_of(excinfo) == [("invalid_email", "email"), ("too_short", "name")]


class Color(enum.Enum):
    RED = "red"
    GREEN = "green"


class Priority(enum.IntEnum):
    LOW = 1
    HIGH = 2


class Item(msgspec.Struct, forbid_unknown_fields=True):
    sku: Text(min_length=3, max_length=8, pattern="^[A-Z0-9-]+$")  # type: ignore[valid-type]
    price: Float(gt=0)  # type: ignore[valid-type]
    quantity: Int(ge=1, le=99) = 1  # type: ignore[valid-type]


class Customer(msgspec.Struct):
    email: Email
    name: Name
    notify: list[Email] = []


class Order(msgspec.Struct, forbid_unknown_fields=True):
    customer: Customer
    items: Annotated[list[Item], msgspec.Meta(min_length=1, max_length=5)]
    color: Color = Color.RED
    priority: Priority = Priority.LOW
    channel: Literal["web", "phone"] | None = None
    tags: dict[str, Annotated[int, msgspec.Meta(ge=0)]] = {}
    note: str | None = None
    flags: tuple[bool, int] = (False, 0)


VALID_ORDER = {
    "customer": {"email": "A@B.CO", "name": " Zoë  Quinn ", "notify": [" X@Y.ORG "]},
    "items": [{"sku": "AB-1", "price": 9.5}, {"sku": "ZZZ", "price": 1, "quantity": 3}],
    "color": "green",
    "priority": 2,
    "channel": "web",
    "tags": {"a": 1},
    "flags": [True, 7],
}


def test_nested_valid_order_round_trips_normalised() -> None:
    order = decode(msgspec.json.encode(VALID_ORDER), Order)
    assert order.customer == Customer("a@b.co", "Zoë Quinn", ["x@y.org"])
    assert order.items == [Item("AB-1", 9.5), Item("ZZZ", 1.0, 3)]
    assert (order.color, order.priority, order.channel) == (Color.GREEN, Priority.HIGH, "web")
    assert order.flags == (True, 7)


def test_nested_and_list_errors_have_dotted_paths() -> None:
    bad = {
        "customer": {"email": 5, "notify": ["ok@ok.io", "nope"]},
        "items": [
            {"sku": "AB-1", "price": 9.5},
            {"sku": "ab", "price": 0, "quantity": 100},
            {"sku": "lower", "price": "1", "extra": True},
        ],
        "color": "blue",
        "priority": 3,
        "channel": "fax",
        "tags": {"a": -1, "b": "x"},
        "note": 7,
        "flags": [1, 2, 3],
    }
    with pytest.raises(ValidationFailed) as excinfo:
        decode(msgspec.json.encode(bad), Order)
    assert details_of(excinfo) == [
        ("invalid_type", "customer.email"),
        ("required", "customer.name"),
        ("invalid_email", "customer.notify.1"),
        ("too_short", "items.1.sku"),
        ("out_of_range", "items.1.price"),
        ("out_of_range", "items.1.quantity"),
        ("invalid_format", "items.2.sku"),
        ("invalid_type", "items.2.price"),
        ("unknown_field", "items.2.extra"),
        ("invalid_format", "color"),
        ("invalid_format", "priority"),
        ("invalid_format", "channel"),
        ("out_of_range", "tags.a"),
        ("invalid_type", "tags.b"),
        ("invalid_type", "note"),
        ("invalid_type", "flags"),
    ]
    messages = {d.field: d.message for d in excinfo.value.details}
    assert messages["items.1.sku"] == "Must be at least 3 characters"
    assert messages["items.1.price"] == "Must be > 0"
    assert messages["items.1.quantity"] == "Must be >= 1 and <= 99"
    assert messages["items.2.sku"] == "Does not match the required format"
    assert messages["items.2.price"] == "Expected a number"
    assert messages["color"] == "Must be one of 'red', 'green'"
    assert messages["channel"] == "Must be one of 'web', 'phone'"
    assert messages["note"] == "Expected a string or null"
    assert messages["flags"] == "Expected an array of 2 items"


def test_each_code() -> None:
    class Every(msgspec.Struct, forbid_unknown_fields=True):
        required: int
        short: Text(min_length=2)  # type: ignore[valid-type]
        long: Text(max_length=2)  # type: ignore[valid-type]
        typed: int
        ranged: Int(lt=10)  # type: ignore[valid-type]
        formatted: Text(pattern=r"^\d+$")  # type: ignore[valid-type]
        email: Email
        few: Annotated[list[int], msgspec.Meta(min_length=1)]
        many: Annotated[list[int], msgspec.Meta(max_length=1)]

    body = {
        "short": "a",
        "long": "abc",
        "typed": True,
        "ranged": 10,
        "formatted": "12a",
        "email": "a@@b.co",
        "few": [],
        "many": [1, 2],
        "surprise": None,
    }
    with pytest.raises(ValidationFailed) as excinfo:
        decode(msgspec.json.encode(body), Every)
    assert details_of(excinfo) == [
        ("required", "required"),
        ("too_short", "short"),
        ("too_long", "long"),
        ("invalid_type", "typed"),
        ("out_of_range", "ranged"),
        ("invalid_format", "formatted"),
        ("invalid_email", "email"),
        ("too_short", "few"),
        ("too_long", "many"),
        ("unknown_field", "surprise"),
    ]
    messages = [d.message for d in excinfo.value.details]
    assert messages[2] == "Must be at most 2 characters"
    assert messages[7] == "Must have at least 1 item"
    assert messages[8] == "Must have at most 1 item"
    assert messages[4] == "Must be < 10"


def test_wrong_top_level_type_has_no_field() -> None:
    with pytest.raises(ValidationFailed) as excinfo:
        decode(b"[1, 2]", CreateUserRequest)
    assert list(excinfo.value.details) == [ErrorDetail("invalid_type", "Expected an object", None)]


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"{",
        b'{"email": "a@b.co",}',
        b"{'email': 1}",
        b'{"age": NaN}',
        b'{"age": Infinity}',
        b'{"age": -Infinity}',
        b'{"name": "\xff\xfe"}',
        b'{"name": "\\ud800"}',
        b'{"a": 1} trailing',
        b"\xef\xbb\xbf{}",
    ],
)
def test_malformed_json_is_invalid_json(body: bytes) -> None:
    with pytest.raises(InvalidJSON) as excinfo:
        decode(body, CreateUserRequest)
    assert excinfo.value.status == 400
    assert excinfo.value.error == "invalid_json"
    assert excinfo.value.message.startswith("Request body is not valid JSON")


def test_invalid_json_names_the_byte_but_nothing_else() -> None:
    with pytest.raises(InvalidJSON) as excinfo:
        decode(b'{"email": SECRET}', CreateUserRequest)
    assert excinfo.value.message == "Request body is not valid JSON (at byte 10)"
    assert excinfo.value.__cause__ is None
    assert excinfo.value.__suppress_context__


def test_str_bodies_and_lone_surrogates() -> None:
    assert decode('{"email":"a@b.co","name":"Al"}', CreateUserRequest).name == "Al"
    with pytest.raises(InvalidJSON):
        decode('{"email":"a@b.co","name":"\ud800"}', CreateUserRequest)


def test_body_of_the_wrong_python_type_is_a_type_error() -> None:
    with pytest.raises(TypeError):
        decode(5, CreateUserRequest)  # type: ignore[arg-type]
    assert decode(bytearray(b'{"email":"a@b.co","name":"Al"}'), CreateUserRequest).name == "Al"  # type: ignore[arg-type]


def nest(depth: int) -> bytes:
    return b'{"a":' * (depth - 1) + b"[1]" + b"}" * (depth - 1)


def test_depth_at_the_limit_passes_and_deeper_is_rejected() -> None:
    assert decode(nest(32), object) is not None
    with pytest.raises(InvalidJSON) as excinfo:
        decode(nest(33), object)
    assert excinfo.value.message == "JSON nesting is deeper than 32 levels"
    with pytest.raises(InvalidJSON):
        decode(b"[" * 100_000, object)
    assert decode(b"[" * 5 + b"]" * 5, object, max_json_depth=5) == [[[[[]]]]]
    with pytest.raises(InvalidJSON, match="deeper than 4"):
        decode(b"[" * 5 + b"]" * 5, object, max_json_depth=4)


def test_depth_ignores_brackets_inside_strings() -> None:
    tricky = msgspec.json.encode({"s": "[[[[{{{{" * 20 + '\\"[' + "]" * 3, "t": ['"]]', "\\"]})
    assert decode(tricky, dict[str, Any])["s"].startswith("[[[[")
    wide = msgspec.json.encode([[1]] * 1000)  # many brackets, shallow
    assert len(decode(wide, list[list[int]])) == 1000


def test_unbalanced_brackets_are_invalid_json_not_a_crash() -> None:
    with pytest.raises(InvalidJSON):
        decode(b"]" * 50 + b"[" * 50, object)
    with pytest.raises(InvalidJSON, match="not valid JSON"):
        decode(b"]]" + b"[[[]]]" * 20, object)
    with pytest.raises(InvalidJSON):
        decode(b'"' + b'\\"' * 50_000 + b"[" * 40, object)


class Shallow(msgspec.Struct, forbid_unknown_fields=True):
    tags: list[str] = []


class Lenient(msgspec.Struct):
    name: str = ""


class Tree(msgspec.Struct, forbid_unknown_fields=True):
    children: list[Tree] = []


def test_deep_documents_are_rejected_whatever_bounds_the_model() -> None:
    # A model that bounds the depth skips the counting on success, never the rejection:
    # a deep document fails the typed decode and is counted then.
    for model in (CreateUserRequest, Shallow, Lenient, Tree):
        with pytest.raises(InvalidJSON, match="deeper than 32"):
            decode(b'{"tags":' + b"[" * 40 + b"]" * 40 + b"}", model)
        with pytest.raises(InvalidJSON, match="deeper than 32"):
            decode(b"[" * 100_000, model)  # malformed and deep: the depth is what is told
    # Unknown fields are skipped by msgspec however deep they are: always counted.
    with pytest.raises(InvalidJSON, match="deeper than 32"):
        decode(b'{"junk":' + b"[" * 40 + b"]" * 40 + b"}", Lenient)
    # A limit below the model's own depth counts too.
    with pytest.raises(InvalidJSON, match="deeper than 1"):
        decode(b'{"tags":["a"]}', Shallow, max_json_depth=1)
    assert decode(b'{"tags":["a"]}', Shallow, max_json_depth=2).tags == ["a"]
    # Recursive models have no bound.
    deep_tree = b'{"children":[' * 20 + b"]}" * 20
    with pytest.raises(InvalidJSON, match="deeper than 32"):
        decode(deep_tree, Tree)
    assert decode(deep_tree, Tree, max_json_depth=40).children


class Circle(msgspec.Struct, tag=True, forbid_unknown_fields=True):
    radius: int = 0


class Square(msgspec.Struct, tag=True, forbid_unknown_fields=True):
    side: int = 0


class Drawing(msgspec.Struct, forbid_unknown_fields=True):
    shape: Circle | Square


def test_deep_values_before_a_union_tag_are_rejected_not_a_crash() -> None:
    # msgspec skips the values before the tag of a tagged union, recursively: such
    # models are counted first, so a deep one is a 400, never a RecursionError.
    deep = b'{"shape": {"radius": ' + b"[" * 200_000 + b"]" * 200_000 + b', "type": "Circle"}}'
    with pytest.raises(InvalidJSON, match="deeper than 32"):
        decode(deep, Drawing)
    assert decode(b'{"shape": {"side": 2, "type": "Square"}}', Drawing).shape == Square(2)


def test_normalisers_run_for_fields_named_by_keywords() -> None:
    # Such names cannot be written as attributes in generated code: the loop runs them.
    odd = msgspec.defstruct("Odd", [("from", Email), ("class", Name)])
    value = decode(b'{"from":" A@B.CO ","class":"  Ann   Lee "}', odd)
    assert (getattr(value, "from"), getattr(value, "class")) == ("a@b.co", "Ann Lee")
    with pytest.raises(ValidationFailed) as excinfo:
        decode(b'{"from":"nope","class":""}', odd)
    assert details_of(excinfo) == [("invalid_email", "from"), ("too_short", "class")]


def test_max_json_depth_must_be_positive() -> None:
    with pytest.raises(ValueError, match="max_json_depth"):
        decode(b"{}", CreateUserRequest, max_json_depth=0)


def test_huge_numbers_are_clean_errors() -> None:
    with pytest.raises(ValidationFailed) as excinfo:
        decode(b'{"email":"a@b.co","name":"Al","age":' + b"9" * 30 + b"}", CreateUserRequest)
    assert details_of(excinfo) == [("out_of_range", "age")]
    with pytest.raises(ValidationFailed) as excinfo:
        decode(b'{"email":"a@b.co","name":"Al","age":' + b"9" * 5000 + b"}", CreateUserRequest)
    assert details_of(excinfo) == [("out_of_range", "age")]
    with pytest.raises(ValidationFailed) as excinfo:
        decode(b'{"sku":"ABC","price":1e999}', Item)
    assert details_of(excinfo) == [("out_of_range", "price")]


def test_duplicate_keys_last_one_wins() -> None:
    user = decode(b'{"email":"a@b.co","name":"First","name":"Second"}', CreateUserRequest)
    assert user.name == "Second"


def test_messages_never_echo_the_input() -> None:
    secret = "S3CRET" * 1000
    body = msgspec.json.encode(
        {"email": secret, "name": secret * 2, "age": secret, secret: 1, "color": secret}
    )
    with pytest.raises(ValidationFailed) as excinfo:
        decode(body, CreateUserRequest)
    for detail in excinfo.value.details:
        assert "S3CRET" not in detail.message
        assert detail.field is None or len(detail.field) <= 70
    with pytest.raises(ValidationFailed) as excinfo:
        decode(msgspec.json.encode({**VALID_ORDER, "color": secret}), Order)
    assert "S3CRET" not in excinfo.value.details[0].message


def test_details_are_capped() -> None:
    body = msgspec.json.encode({f"k{i}": i for i in range(1000)})
    with pytest.raises(ValidationFailed) as excinfo:
        decode(body, CreateUserRequest)
    assert len(excinfo.value.details) == MAX_DETAILS


def test_frozen_structs_and_defaults() -> None:
    class Frozen(msgspec.Struct, frozen=True):
        email: Email
        name: Name = "  keep  this  default  "

    decoded = decode(b'{"email": " X@Y.IO "}', Frozen)
    assert decoded == Frozen("x@y.io", "  keep  this  default  ")


def to_slug(value: str) -> str:
    value = value.strip().lower().replace(" ", "-")
    if not value.isascii():
        raise InvalidValue("invalid_format", "Slug must be ASCII")
    return value


def to_even(value: int) -> int:
    if value % 2:
        raise ValueError(f"odd: {value}")
    return value


class Post(msgspec.Struct):
    slug: Annotated[str, Normalize(to_slug)]
    count: Annotated[int, msgspec.Meta(ge=0), Normalize(to_even)] = 0
    title: Text(min_length=1, max_length=5, strip=True) = "x"  # type: ignore[valid-type]


class Node(msgspec.Struct):
    owner: Email
    children: list[Node] = []


class Card(msgspec.Struct, tag="card"):
    number: Text(min_length=12)  # type: ignore[valid-type]


class Bank(msgspec.Struct, tag="bank"):
    iban: str


class Payment(msgspec.Struct):
    method: Card | Bank


class Event(msgspec.Struct):
    at: datetime.datetime
    id: uuid.UUID
    name: Name

    def __post_init__(self) -> None:
        if self.name == "Forbidden":
            raise ValueError("Forbidden is not allowed: Forbidden")


def test_custom_normalizers() -> None:
    assert decode(b'{"slug": " Hello World ", "count": 4, "title": "  abc  "}', Post) == Post(
        "hello-world", 4, "abc"
    )
    with pytest.raises(ValidationFailed) as excinfo:
        decode(b'{"slug": "h\\u00e9", "count": 3, "title": "      "}', Post)
    assert [(d.code, d.message, d.field) for d in excinfo.value.details] == [
        ("invalid_format", "Slug must be ASCII", "slug"),
        ("invalid_format", "Invalid value", "count"),
        ("too_short", "Must be at least 1 character", "title"),
    ]
    # Meta checks the raw value; the normaliser only runs on what passed it.
    with pytest.raises(ValidationFailed) as excinfo:
        decode(b'{"slug": 5, "count": -1, "title": "abcdefg"}', Post)
    assert details_of(excinfo) == [
        ("invalid_type", "slug"),
        ("out_of_range", "count"),
        ("too_long", "title"),
    ]


def test_normalize_requires_a_callable() -> None:
    with pytest.raises(ConfigError, match="not callable"):
        Normalize("strip")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("factory", "kwargs", "entry"),
    [
        (Text, {"min_length": -1}, "min_length"),
        (Text, {"min_length": 3, "max_length": 2}, "min_length=3"),
        (Text, {"pattern": "("}, "pattern"),
        (Int, {"ge": 1.5}, "ge=1.5"),
        (Int, {"le": True}, "le=True"),
        (Float, {"gt": "0"}, "gt='0'"),
    ],
)
def test_helper_misuse_is_a_config_error(factory: Any, kwargs: dict[str, Any], entry: str) -> None:
    with pytest.raises(ConfigError, match=entry):
        factory(**kwargs)


def test_recursive_models() -> None:
    tree = decode(b'{"owner":"A@B.CO","children":[{"owner":"C@D.CO","children":[]}]}', Node)
    assert tree.children[0].owner == "c@d.co"
    with pytest.raises(ValidationFailed) as excinfo:
        decode(b'{"owner":"a@b.co","children":[{"owner":"x"},{"children":[{"owner":1}]}]}', Node)
    assert details_of(excinfo) == [
        ("invalid_email", "children.0.owner"),
        ("required", "children.1.owner"),
        ("invalid_type", "children.1.children.0.owner"),
    ]


def test_tagged_unions() -> None:
    assert decode(b'{"method":{"type":"bank","iban":"X"}}', Payment).method == Bank("X")
    with pytest.raises(ValidationFailed) as excinfo:
        decode(b'{"method":{"type":"card","number":"1"}}', Payment)
    assert details_of(excinfo) == [("too_short", "method.number")]
    with pytest.raises(ValidationFailed) as excinfo:
        decode(b'{"method":{"type":"cash"}}', Payment)
    assert details_of(excinfo) == [("invalid_format", "method.type")]
    with pytest.raises(ValidationFailed) as excinfo:
        decode(b'{"method":{"iban":"X"}}', Payment)
    assert details_of(excinfo) == [("required", "method.type")]


def test_other_types_fall_back_to_msgspec_checks() -> None:
    good = b'{"at":"2024-01-01T00:00:00Z","id":"6f1e0c4e-9d2a-4d7e-8f57-3f0b2a1c9e11","name":"A"}'
    assert decode(good, Event).at.year == 2024
    with pytest.raises(ValidationFailed) as excinfo:
        decode(b'{"at":"yesterday","id":"x","name":""}', Event)
    assert details_of(excinfo) == [
        ("invalid_format", "at"),
        ("invalid_format", "id"),
        ("too_short", "name"),
    ]
    with pytest.raises(ValidationFailed) as excinfo:
        decode(good.replace(b'"A"', b'"Forbidden"'), Event)
    assert details_of(excinfo) == [("invalid_format", None)]
    assert "Forbidden" not in excinfo.value.details[0].message


def test_decoders_are_cached_per_model() -> None:
    from asgi_armor import validation

    decode(b'{"email":"a@b.co","name":"Al"}', CreateUserRequest)
    plan = validation._plans[CreateUserRequest]
    decode(b'{"email":"a@b.co","name":"Al"}', CreateUserRequest)
    assert validation._plans[CreateUserRequest] is plan
    assert Int(ge=0, le=150) == Int(ge=0, le=150)  # equal helper types share one plan


# --------------------------------------------------------------------------------------
# Email and Name
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "normal"),
    [
        ("user@example.com", "user@example.com"),
        ("  User.Name+tag@Sub.Example.CO.uk\t", "user.name+tag@sub.example.co.uk"),
        ("o'hara!#$%&*/=?^_`{|}~-@x-y.io", "o'hara!#$%&*/=?^_`{|}~-@x-y.io"),
        ("a@xn--bcher-kva.de", "a@xn--bcher-kva.de"),
        ("a@example.xn--p1ai", "a@example.xn--p1ai"),
        ("\u00a0a@b.co\u2003", "a@b.co"),
        ("x" * 64 + "@example.com", "x" * 64 + "@example.com"),
        ("a@" + "b" * 63 + ".com", "a@" + "b" * 63 + ".com"),
        ("a@" + "b" * 63 + ".co", "a@" + "b" * 63 + ".co"),
        ("X" * 64 + "@A.CO", "x" * 64 + "@a.co"),
        ("a@B.XN--P1AI", "a@b.xn--p1ai"),
        (
            "x" * 64 + "@" + ("y" * 60 + ".") * 3 + "abcdef",
            "x" * 64 + "@" + ("y" * 60 + ".") * 3 + "abcdef",
        ),
    ],
)
def test_valid_emails_are_normalised(raw: str, normal: str) -> None:
    assert normalize_email(raw) == normal
    assert len(normal) <= 254


@pytest.mark.parametrize(
    "raw",
    [
        "",
        "   ",
        "plainaddress",
        "@example.com",
        "user@",
        "a@@b.co",
        "a@b@c.co",
        ".a@b.co",
        "a.@b.co",
        "a..b@b.co",
        "a b@b.co",
        "a@b c.co",
        "a\x00@b.co",
        "a\n@b.co",
        "a@localhost",
        "a@b.c",
        "a@b.c0m",
        "a@b.123",
        "a@-b.co",
        "a@b-.co",
        "a@b..co",
        "a@.b.co",
        "a@b.co.",
        "x" * 65 + "@example.com",
        "a@" + "b" * 64 + ".com",
        # The shortest addresses with a part too long (the length checks' threshold).
        "a@" + "b" * 64 + ".co",
        "x" * 65 + "@a.co",
        "A@" + "B" * 64 + ".CO",
        "x" * 64 + "@" + ("y" * 60 + ".") * 3 + "abcdefg",  # 255 characters
        "ü@b.co",
        "a@bücher.de",
        "a@\u212aexample.com",  # KELVIN SIGN lower-cases to ASCII "k"
        '"quoted"@b.co',
        "a@[127.0.0.1]",
        "a@b.xn--",
        "a@b.xn---",
    ],
)
def test_invalid_emails_are_rejected(raw: str) -> None:
    with pytest.raises(InvalidValue) as excinfo:
        normalize_email(raw)
    assert excinfo.value.code == "invalid_email"


def test_email_length_message() -> None:
    with pytest.raises(InvalidValue, match="at most 254 characters"):
        normalize_email("x" * 64 + "@" + ("y" * 60 + ".") * 3 + "abcdefg")


@pytest.mark.parametrize(
    ("raw", "normal"),
    [
        ("Ann Lee", "Ann Lee"),
        ("  Ann   Lee  ", "Ann Lee"),
        ("Ann\tLee", "Ann Lee"),
        ("Ann\r\nLee", "Ann Lee"),
        ("Ann\x00Lee", "AnnLee"),
        ("\x07Ann\x1b[31mLee", "Ann[31mLee"),
        ("Ann\x7fLee", "AnnLee"),
        ("Ann\x80\x9fLee", "AnnLee"),  # C1 controls
        ("Ann\x85Lee", "Ann Lee"),  # NEL is a C1 control and whitespace
        ("Ann\u00a0Lee", "Ann Lee"),  # no-break space
        ("Ann\u2003\u3000Lee", "Ann Lee"),  # em space, ideographic space
        ("Ann\u2028Lee", "Ann Lee"),  # line separator
        ("Ann\u202eeeL", "AnneeL"),  # right-to-left override
        ("\ufeffAnn\u200bLee", "AnnLee"),
        ("Zoe\u0308", "Zoë"),  # NFC
        ("李小龍", "李小龍"),
        ("👩\u200d💻 Dev", "👩\u200d💻 Dev"),  # ZWJ sequences survive
        ("x" * 100, "x" * 100),
        ("  " + "x" * 100 + "\t\n", "x" * 100),
    ],
)
def test_names_are_normalised(raw: str, normal: str) -> None:
    assert normalize_name(raw) == normal


@pytest.mark.parametrize(
    ("raw", "code"),
    [
        ("", "too_short"),
        ("   ", "too_short"),
        ("\x00\x01\x9f", "too_short"),
        ("x" * 101, "too_long"),
    ],
)
def test_bad_names(raw: str, code: str) -> None:
    with pytest.raises(InvalidValue) as excinfo:
        normalize_name(raw)
    assert excinfo.value.code == code


def test_email_and_name_in_json_schema() -> None:
    schema = msgspec.json.schema(CreateUserRequest)
    props = schema["$defs"]["CreateUserRequest"]["properties"]
    assert props["email"]["format"] == "email"
    assert props["name"]["maxLength"] == 100


# --------------------------------------------------------------------------------------
# decode_query
# --------------------------------------------------------------------------------------


class Search(msgspec.Struct, forbid_unknown_fields=True):
    q: Text(min_length=1, max_length=200)  # type: ignore[valid-type]
    page: Int(ge=1) = 1  # type: ignore[valid-type]
    size: Int(ge=1, le=100) | None = None  # type: ignore[valid-type]
    exact: bool = False
    score: float = 0.0
    tag: list[str] = []
    ids: list[Int(ge=0)] = []  # type: ignore[valid-type]
    sort: Literal["asc", "desc"] = "asc"
    owner: Email | None = None


def qscope(query: bytes) -> Scope:
    return {"type": "http", "query_string": query, "headers": []}


def test_query_coercion_and_repeated_keys() -> None:
    search = decode_query(
        qscope(
            b"q=red+shoes&page=2&size=10&exact=true&score=1.5&tag=a&tag=b"
            b"&ids=1&ids=2&sort=desc&owner=%20Me%40X.IO"
        ),
        Search,
    )
    assert search == Search(
        q="red shoes",
        page=2,
        size=10,
        exact=True,
        score=1.5,
        tag=["a", "b"],
        ids=[1, 2],
        sort="desc",
        owner="me@x.io",
    )
    assert decode_query(qscope(b"q=x&tag=only"), Search).tag == ["only"]
    assert decode_query(b"q=%E2%9C%93", Search).q == "\u2713"
    assert decode_query("q=x&exact=0", Search).exact is False


def test_query_errors_are_all_reported() -> None:
    with pytest.raises(ValidationFailed) as excinfo:
        decode_query(
            qscope(
                b"page=zero&size=500&exact=maybe&score=x&ids=1&ids=-2&ids=z&sort=up&owner=no&x=1"
            ),
            Search,
        )
    assert details_of(excinfo) == [
        ("required", "q"),
        ("invalid_type", "page"),
        ("out_of_range", "size"),
        ("invalid_type", "exact"),
        ("invalid_type", "score"),
        ("out_of_range", "ids.1"),
        ("invalid_type", "ids.2"),
        ("invalid_format", "sort"),
        ("invalid_email", "owner"),
        ("unknown_field", "x"),
    ]


def test_query_repeated_single_value_key_is_an_error() -> None:
    with pytest.raises(ValidationFailed) as excinfo:
        decode_query(qscope(b"q=a&q=b&page=x"), Search)
    assert details_of(excinfo) == [("invalid_type", "q"), ("invalid_type", "page")]
    assert excinfo.value.details[0].message == "Expected a single value"


def test_query_limits_and_encoding() -> None:
    with pytest.raises(ValidationFailed) as excinfo:
        decode_query(qscope(b"&".join([b"tag=x"] * 101)), Search)
    assert details_of(excinfo) == [("too_long", None)]
    assert (
        len(decode_query(qscope(b"q=a&" + b"&".join([b"tag=x"] * 9)), Search, max_fields=10).tag)
        == 9
    )
    with pytest.raises(ValidationFailed) as excinfo:
        decode_query(qscope(b"q=%ff"), Search)
    assert list(excinfo.value.details) == [
        ErrorDetail("invalid_format", "The query string is not valid UTF-8", None)
    ]
    with pytest.raises(ValidationFailed):
        decode_query(qscope(b"q=\xff"), Search)
    with pytest.raises(ValidationFailed) as excinfo:
        decode_query(qscope(b"q="), Search)
    assert details_of(excinfo) == [("too_short", "q")]


def test_query_needs_a_struct() -> None:
    with pytest.raises(TypeError):
        decode_query(qscope(b"a=1"), dict[str, str])


# --------------------------------------------------------------------------------------
# Over HTTP: an app that decodes, behind ErrorMiddleware + InputLimits
# --------------------------------------------------------------------------------------


async def users_app(scope: Scope, receive: Receive, send: Send) -> None:
    user = decode(await read_body(receive, 1 << 20), CreateUserRequest)
    await send_json(send, 201, msgspec.json.encode(user))


@pytest.mark.anyio
async def test_decode_errors_render_as_the_envelope() -> None:
    app = ErrorMiddleware(InputLimits(users_app, json_routes=["POST /api/users"]))
    async with client_for(app) as client:
        created = await client.post(
            "/api/users", json={"email": " A@B.CO ", "name": "Ann\u0000 Lee", "age": 3}
        )
        invalid = await client.post("/api/users", json={"email": "nope", "age": -1})
        malformed = await client.post(
            "/api/users", content=b"{nope", headers={"content-type": "application/json"}
        )
    assert created.status_code == 201
    assert created.json() == {"email": "a@b.co", "name": "Ann Lee", "age": 3}
    body = assert_envelope(invalid, 422, "validation_error")
    assert body["details"] == [
        {"code": "invalid_email", "message": "Email format is invalid", "field": "email"},
        {"code": "required", "message": "This field is required", "field": "name"},
        {"code": "out_of_range", "message": "Must be >= 0 and <= 150", "field": "age"},
    ]
    assert_envelope(malformed, 400, "invalid_json")


def test_integer_too_big_for_a_float_is_reported_with_the_rest() -> None:
    with pytest.raises(ValidationFailed) as excinfo:
        decode(b'{"sku": "", "price": 1' + b"0" * 400 + b"}", Item)
    assert details_of(excinfo) == [("too_short", "sku"), ("out_of_range", "price")]


def test_normalizers_never_see_none() -> None:
    seen: list[Any] = []

    def spy(value: Any) -> Any:
        seen.append(value)
        return value

    model = msgspec.defstruct("Spy", [("v", Annotated[str | None, Normalize(spy)])])
    assert decode(b'{"v": null}', model).v is None  # type: ignore[attr-defined]
    assert decode(b'{"v": "x"}', model).v == "x"  # type: ignore[attr-defined]
    assert seen == ["x"]


@pytest.mark.anyio
async def test_duplicate_content_type_is_refused_on_json_routes() -> None:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    limited = ErrorMiddleware(InputLimits(app, json_routes=["POST /api/*"]))
    transport = httpx.ASGITransport(app=limited)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        one = await client.post(
            "/api/x", content=b"{}", headers={"content-type": "application/json"}
        )
        two = await client.post(
            "/api/x",
            content=b"{}",
            headers=[("content-type", "application/json"), ("content-type", "text/plain")],
        )
    assert one.status_code == 200
    assert two.status_code == 415
    assert two.json()["error"] == "unsupported_media_type"
