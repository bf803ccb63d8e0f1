"""Garbage in: arbitrary methods, paths, headers, query strings and bodies through the demo.

In-process, scopes are built by hand, so they carry what httpx would refuse to send
(non-UTF-8 header bytes, NUL, duplicates, huge values, hundreds of headers, any unicode
in the path). Over a real uvicorn, raw bytes go through a socket. Whatever comes in:
never a 500 (the demo's only 500s need a db fault, which the board resets), never an
exception escaping the stack, never traceback or exception text in a body, every error
is the envelope with the request id of ``X-Request-ID``, and the server keeps serving.
"""

from __future__ import annotations

import json
import string
from typing import Any
from urllib.parse import quote

import anyio
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reliability_helpers import (
    DemoStack,
    call_asgi,
    demo_stack,
    raw_http,
    running_server,
    wait_until,
)

from asgi_armor.signing import HexHmac, sign
from tests.envelope import assert_envelope, assert_no_leak

TOKEN = string.ascii_letters + string.digits + "!#$%&'*+-.^_`|~"
METHODS = ["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS", "TRACE", "CONNECT"]
PREFIXES = [
    "/",
    "/healthz",
    "/api/users",
    "/api/users/1",
    "/api/users/999",
    "/api/expensive-operation",
    "/api/send-email",
    "/api/projects/p1/builds",
    "/api/payments",
    "/api/refunds",
    "/api/search",
    "/api/dashboard",
    "/api/webhooks/payment",
    "/demo/faults/db",
    "/demo/faults/search",
]
HEADER_NAMES = [
    b"content-type",
    b"content-length",
    b"transfer-encoding",
    b"x-request-id",
    b"idempotency-key",
    b"authorization",
    b"x-signature",
    b"x-forwarded-for",
    b"forwarded",
    b"host",
    b"accept",
    b"cookie",
    b"expect",
]

texts = st.text(st.characters(exclude_categories=["Cs"]), max_size=40)
paths = st.one_of(
    st.sampled_from(PREFIXES),
    st.builds(lambda p, s: p.rstrip("/") + "/" + s, st.sampled_from(PREFIXES), texts),
    st.builds(lambda s: "/" + s, texts),
    st.builds(lambda n: "/api/" + "a" * n, st.integers(100, 12_000)),
)
header_values = st.one_of(
    st.binary(max_size=64),
    st.sampled_from(
        [
            b"application/json",
            b"text/plain",
            b"Bearer alice-token",
            b"Bearer \xff\xfe",
            b'"quoted key"',
            b"0",
            b"-1",
            b"18446744073709551616",
            b"chunked",
            b"1.2.3.4, 5.6.7.8",
            b"for=unknown;proto=http",
            b"sha256=" + b"0" * 64,
            b"req_" + b"a" * 200,
            b"line\x00break",
            "caf\u00e9".encode(),
        ]
    ),
    st.integers(1, 40_000).map(lambda n: b"v" * n),
)
header_names = st.one_of(
    st.sampled_from(HEADER_NAMES),
    st.text(TOKEN, min_size=1, max_size=20).map(lambda s: s.lower().encode()),
)
headers_st = st.one_of(
    st.lists(st.tuples(header_names, header_values), max_size=12),
    st.integers(90, 160).map(lambda n: [(b"x-h%d" % i, b"1") for i in range(n)]),
)
json_bodies = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | texts,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(
            st.sampled_from(
                ["email", "name", "age", "amount", "currency", "payment_id", "mode", "delay", "q"]
            )
            | texts,
            inner,
            max_size=5,
        )
    ),
    max_leaves=12,
).map(lambda v: json.dumps(v).encode())
bodies = st.one_of(
    st.just(b""),
    st.binary(max_size=256),
    json_bodies,
    st.sampled_from([b"{" * 40 + b"}" * 40, b"[" * 200, b'{"email": "\xff"}', b"\x00" * 10]),
    st.integers(60_000, 70_000).map(lambda n: b"x" * n),
)


small_ints = st.one_of(st.integers(-5, 200), st.integers(), st.sampled_from([0, 2**63, -(2**63)]))
# Bodies close to what each route accepts, so that garbage reaches the handlers too.
ROUTE_BODIES: dict[tuple[str, str], st.SearchStrategy[Any]] = {
    ("POST", "/api/users"): st.fixed_dictionaries(
        {"email": st.one_of(texts, st.just("ada@example.com")), "name": texts},
        optional={"age": small_ints, "extra": texts},
    ),
    ("POST", "/api/payments"): st.fixed_dictionaries(
        {"amount": small_ints, "currency": st.one_of(texts, st.just("EUR"))}
    ),
    ("POST", "/api/refunds"): st.fixed_dictionaries({"payment_id": texts, "amount": small_ints}),
    ("PUT", "/demo/faults/search"): st.fixed_dictionaries(
        {"mode": st.sampled_from(["ok", "slow", "fail", "bogus"]), "delay": st.floats()}
    ),
    ("POST", "/api/webhooks/payment"): st.dictionaries(texts, texts, max_size=3),
    ("POST", "/api/expensive-operation"): st.none(),
    ("POST", "/api/send-email"): st.dictionaries(texts, texts, max_size=3),
    ("POST", "/api/projects/{p}/builds"): st.none(),
    ("GET", "/api/users/{p}"): st.none(),
    ("GET", "/api/search"): st.none(),
    ("GET", "/api/dashboard"): st.none(),
    ("GET", "/healthz"): st.none(),
}
idempotency_keys = st.one_of(
    st.text(string.printable, min_size=1, max_size=12).map(str.encode),
    st.binary(max_size=20),
    st.integers(250, 300).map(lambda n: b"k" * n),
    st.just(b'"quoted"'),
)


@st.composite
def targeted(draw: st.DrawFn) -> tuple[str, str, bytes, list[tuple[bytes, bytes]]]:
    """A request aimed at one demo route, with a near-valid body and fitting headers."""
    (method, template), body_st = draw(st.sampled_from(sorted(ROUTE_BODIES.items())))
    path = template.replace("{p}", draw(st.one_of(st.sampled_from(["1", "2", "42"]), texts)))
    value = draw(body_st)
    body = b"" if value is None else json.dumps(value).encode()
    headers = [(b"content-type", b"application/json")] if body else []
    if "payments" in path or "refunds" in path:
        headers += draw(
            st.lists(idempotency_keys, max_size=2).map(
                lambda keys: [(b"idempotency-key", key) for key in keys]
            )
        )
    if "send-email" in path:
        headers.append(
            (
                b"authorization",
                draw(
                    st.sampled_from(
                        [b"Bearer alice-token", b"Bearer bob-token", b"Bearer \xff", b"Basic x"]
                    )
                ),
            )
        )
    return method, path, body, headers


@st.composite
def requests(draw: st.DrawFn) -> dict[str, Any]:
    """One arbitrary request: the parts of an ASGI scope plus body chunks."""
    if draw(st.integers(0, 9)) < 6:
        method, path, body, headers = draw(targeted())
        headers += draw(st.lists(st.tuples(header_names, header_values), max_size=3))
    else:
        method = draw(st.one_of(st.sampled_from(METHODS), st.text(TOKEN, min_size=1, max_size=12)))
        path = draw(paths)
        headers = draw(headers_st)
        body = draw(bodies)
        if draw(st.booleans()) and body:
            headers.append((b"content-type", b"application/json"))
    raw_path = draw(
        st.one_of(
            st.just(quote(path, safe="/").encode("ascii")),
            st.just(quote(path, safe="/").encode("ascii")),
            st.binary(max_size=64).map(lambda b: b"/" + b),
        )
    )
    query = draw(
        st.one_of(
            st.just(b""),
            st.binary(max_size=64),
            texts.map(lambda q: b"q=" + quote(q).encode("ascii")),
            texts.map(str.encode),
        )
    )
    if draw(st.booleans()):
        headers.append((b"content-length", str(len(body)).encode()))
    if draw(st.booleans()):
        signed = sign(body, "demo-webhook-secret", scheme=HexHmac(header="X-Signature"))
        headers += [(k.lower().encode(), v.encode()) for k, v in signed.items()]
    split = draw(st.integers(1, 4))
    size = max(1, len(body) // split)
    chunks = [body[i : i + size] for i in range(0, len(body), size)] or [b""]
    client = draw(st.tuples(st.integers(1, 254), st.integers(0, 255), st.integers(1, 254)))
    return {
        "method": method,
        "path": path,
        "raw_path": raw_path,
        "query_string": query,
        "headers": headers,
        "chunks": chunks,
        "client": ("10.{}.{}.{}".format(*client), 40000),
    }


# What the demo answers garbage with: its handlers' successes, and every rejection the
# stack was designed to give. Never 500 (the demo's only 500s need a db fault, which
# ``reset`` clears), and never a status outside this table.
DESIGNED_STATUSES = {
    200: "ok",
    201: "created (users, payments, refunds)",
    202: "accepted (send-email, builds)",
    400: "invalid_json, idempotency_key_missing, idempotency_key_invalid",
    401: "unauthorized, invalid_signature",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
    414: "uri_too_long",
    415: "unsupported_media_type",
    422: "validation_error, idempotency_key_reused",
    429: "rate_limited",
    431: "headers_too_large",
}


def check_response(status: int, headers: dict[str, str], body: bytes, method: str) -> None:
    """The invariants every answer to garbage must keep."""
    assert status in DESIGNED_STATUSES, (status, body[:300])
    assert headers.get("x-request-id"), headers
    assert_no_leak(body)
    if status >= 400 and method != "HEAD":
        data = assert_envelope((status, headers, body), status)
        designed = DESIGNED_STATUSES[status]
        assert data["error"] in designed.split(", "), (status, data["error"])
    if status == 405:
        assert headers.get("allow"), headers


def reset(stack: DemoStack) -> None:
    stack.reset_faults()
    stack.demo.db_breaker.reset()


@pytest.fixture(scope="module")
def garbage_stack() -> DemoStack:
    return demo_stack()


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
@settings(
    max_examples=250,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    derandomize=False,
)
@given(request=requests())
def test_garbage_in_process_never_500s_or_leaks(
    garbage_stack: DemoStack, backend: str, request: dict[str, Any]
) -> None:
    try:
        status, headers, body = anyio.run(call_asgi, garbage_stack.app, request, backend=backend)
        check_response(status, headers, body, request["method"])
    finally:
        reset(garbage_stack)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["asyncio", "trio"])
@settings(
    max_examples=5000,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(request=requests())
def test_garbage_in_process_soak(
    garbage_stack: DemoStack, backend: str, request: dict[str, Any]
) -> None:
    try:
        status, headers, body = anyio.run(call_asgi, garbage_stack.app, request, backend=backend)
        check_response(status, headers, body, request["method"])
    finally:
        reset(garbage_stack)


_CONTROL = bytes(range(32)) + b"\x7f"
_UNSAFE_IN_TARGET = frozenset(b" #?" + _CONTROL)


def _target_bytes(raw: bytes) -> bytes:
    # Control bytes, spaces and delimiters would end or split the request line; high bytes
    # are left raw, as a careless client sends them.
    return b"".join(b"%%%02X" % c if c in _UNSAFE_IN_TARGET else bytes([c]) for c in raw)


def _wire(request: dict[str, Any]) -> bytes:
    """The request as raw HTTP/1.1 bytes (a single body, Connection: close)."""
    target = b"/" + _target_bytes(request["raw_path"].lstrip(b"/"))
    if request["query_string"]:
        target += b"?" + _target_bytes(request["query_string"])
    lines = [request["method"].encode("ascii") + b" " + target + b" HTTP/1.1", b"host: t"]
    body = b"".join(request["chunks"])
    length_sent = False
    for name, value in request["headers"]:
        if name in (b"host", b"connection", b"transfer-encoding", b"content-length", b"expect"):
            # Framing headers are left to _wire, or the socket would wait for a body that
            # never comes; the in-process run covers their garbage.
            continue
        lines.append(name + b": " + value.translate(None, _CONTROL).strip())
    if body or request["method"] in ("POST", "PUT", "PATCH"):
        lines.append(b"content-length: %d" % len(body))
        length_sent = True
    lines.append(b"connection: close")
    head = b"\r\n".join(lines) + b"\r\n\r\n"
    return head + (body if length_sent else b"")


def _server_rejection(status: int, headers: dict[str, str], body: bytes) -> bool:
    """uvicorn's own answer to bytes it could not parse (armor never saw the request)."""
    return (
        status == 400
        and "x-request-id" not in headers
        and body == b"Invalid HTTP request received."
    )


@pytest.mark.parametrize("http", ["httptools", "h11"])
def test_garbage_over_uvicorn_raw_sockets(http: str) -> None:
    stack = demo_stack()
    seen: dict[str, int] = {"requests": 0, "armor": 0, "server_400": 0, "closed": 0}
    with running_server(stack.app, http=http, h11_max_incomplete_event_size=256 * 1024) as served:
        port = int(served.url.rsplit(":", 1)[1])

        @settings(
            max_examples=80,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        )
        @given(request=requests())
        def one(request: dict[str, Any]) -> None:
            try:
                seen["requests"] += 1
                status, headers, body = raw_http(port, _wire(request))
                if status == 0:
                    # Closed before we read an answer: only acceptable when the body is over
                    # the cap (armor answers 413 early; closing on unread bytes sends a TCP
                    # reset, which may discard the answer in our receive buffer).
                    assert sum(len(c) for c in request["chunks"]) > 65_536, request
                    seen["closed"] += 1
                    return
                if _server_rejection(status, headers, body):
                    seen["server_400"] += 1
                    return
                seen["armor"] += 1
                check_response(status, headers, body, request["method"])
            finally:
                reset(stack)

        one()
        # Still serving, nothing left running on the loop.
        status, _headers, body = raw_http(
            port, b"GET /healthz HTTP/1.1\r\nhost: t\r\nconnection: close\r\n\r\n"
        )
        assert status == 200, body
        assert json.loads(body) == {"status": "ok"}
        assert wait_until(lambda: not served.tasks(), 3), served.tasks()
    print(f"\n[garbage over uvicorn, {http}] {seen}")
    # The server's parser refuses some garbage itself (httptools: unknown methods, raw
    # high bytes); most still reaches armor.
    assert seen["armor"] >= seen["requests"] // 3
