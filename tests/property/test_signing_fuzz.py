"""Hostile headers and bodies: verify raises only InvalidSignature; the middleware says 401/413."""

from __future__ import annotations

from typing import Any

import anyio
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from asgi_armor._asgi import Message, Scope, declared_length
from asgi_armor.errors import ErrorMiddleware, InvalidSignature, PayloadTooLarge
from asgi_armor.signing import (
    GitHub,
    HexHmac,
    Scheme,
    SignatureMiddleware,
    SignedRoute,
    StandardWebhooks,
    Stripe,
    sign,
    verify,
)

NOW = 1_700_000_000
SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
CODES = {
    "missing_signature",
    "malformed_signature",
    "timestamp_out_of_tolerance",
    "replayed",
    "signature_mismatch",
}
SCHEMES: list[Scheme] = [
    HexHmac(),
    HexHmac(timestamp_header="X-Timestamp"),
    StandardWebhooks(),
    Stripe(),
    GitHub(),
]
NAMES = [
    "x-signature",
    "X-Timestamp",
    "webhook-id",
    "webhook-timestamp",
    "webhook-signature",
    "svix-id",
    "svix-timestamp",
    "svix-signature",
    "Stripe-Signature",
    "x-hub-signature-256",
    "content-type",
]
VALID = sign(b"{}", SECRET, StandardWebhooks(), timestamp=NOW) | {
    "Stripe-Signature": sign(b"{}", SECRET, Stripe(), timestamp=NOW)["Stripe-Signature"],
    "x-hub-signature-256": sign(b"{}", SECRET, GitHub())["X-Hub-Signature-256"],
    "x-signature": sign(b"{}", SECRET)["X-Signature"],
    "X-Timestamp": str(NOW),
}

# Values that reach deep into the parsers: near-valid fragments glued with junk.
fragments = st.sampled_from(
    [
        "t=",
        "v1=",
        "v0=",
        "v1,",
        "v1a,",
        "sha256=",
        ",",
        " ",
        "=",
        str(NOW),
        "-1",
        "1e9",
        "a" * 64,
        "A" * 44,
        "YWJj",
        "==",
        "msg_1",
        "\x00",
        "é",
        "\u2028",
        *VALID.values(),
    ]
)
texts = st.one_of(st.text(max_size=200), st.lists(fragments, max_size=12).map("".join))
raw_values = st.one_of(st.binary(max_size=200), texts.map(lambda t: t.encode("utf-8")))
names = st.one_of(st.sampled_from(NAMES), st.text(max_size=20))
raw_names = st.one_of(st.sampled_from(NAMES).map(str.encode), st.binary(max_size=20))

text_headers = st.dictionaries(names, texts, max_size=8)
raw_headers = st.lists(st.tuples(raw_names, raw_values), max_size=8)
mixed_headers = st.builds(
    lambda base, extra: {**{k: v for k, v in VALID.items() if k in base}, **extra},
    st.sets(st.sampled_from(list(VALID))),
    st.dictionaries(st.sampled_from(NAMES), texts, max_size=3),
)
known_headers = st.dictionaries(st.sampled_from(NAMES), texts, min_size=1, max_size=5)
headers_strategy = st.one_of(text_headers, raw_headers, mixed_headers, known_headers)
bodies = st.one_of(st.just(b"{}"), st.binary(max_size=300))


@settings(max_examples=400, deadline=None)
@given(
    headers=headers_strategy,
    body=bodies,
    scheme=st.sampled_from(SCHEMES),
    now=st.one_of(st.just(float(NOW)), st.floats(allow_nan=False, allow_infinity=False)),
)
def test_verify_raises_only_invalid_signature(
    headers: Any, body: bytes, scheme: Scheme, now: float
) -> None:
    error: InvalidSignature | PayloadTooLarge | None = None
    try:
        message = verify(headers, body, [SECRET, b"old"], scheme, now=now, max_body_bytes=256)
    except (InvalidSignature, PayloadTooLarge) as exc:
        error = exc
    if isinstance(error, InvalidSignature):
        assert error.code in CODES
        assert error.status == 401
        assert len(error.details) == 1
    elif isinstance(error, PayloadTooLarge):
        assert len(body) > 256
    else:
        # Only a genuine signature gets here.
        assert body == b"{}"
        assert message.scheme == scheme.name


@settings(max_examples=100, deadline=None)
@given(
    body=st.binary(max_size=500),
    secret=st.one_of(st.text(min_size=1, max_size=40), st.binary(min_size=1, max_size=40)),
    scheme=st.sampled_from(SCHEMES),
    flip=st.integers(min_value=0),
    timestamp=st.integers(min_value=0, max_value=10**12),
)
def test_sign_verify_round_trip_and_any_flipped_byte_fails(
    body: bytes, secret: str | bytes, scheme: Scheme, flip: int, timestamp: int
) -> None:
    if isinstance(scheme, StandardWebhooks) and isinstance(secret, str):
        secret = "plain-" + secret  # a whsec_ prefix would be base64-decoded
    headers = sign(body, secret, scheme, timestamp=timestamp)
    assert verify(headers, body, secret, scheme, now=timestamp).scheme == scheme.name
    if body:
        index = flip % len(body)
        tampered = body[:index] + bytes([body[index] ^ 0x01]) + body[index + 1 :]
        with pytest.raises(InvalidSignature) as excinfo:
            verify(headers, tampered, secret, scheme, now=timestamp)
        assert excinfo.value.code == "signature_mismatch"


def _middleware() -> Any:
    routes = {
        "POST /hex": SignedRoute(HexHmac(), SECRET),
        "POST /hexts": SignedRoute(HexHmac(timestamp_header="X-Timestamp"), SECRET),
        "POST /sw": SignedRoute(StandardWebhooks(), SECRET),
        "POST /stripe": SignedRoute(Stripe(), SECRET),
        "POST /github": SignedRoute(GitHub(), SECRET),
    }

    async def app(scope: Scope, receive: Any, send: Any) -> None:
        raise AssertionError("the app must not run for a forged request")

    return ErrorMiddleware(
        SignatureMiddleware(app, routes=routes, max_body_bytes=256, wall_clock=lambda: float(NOW))
    )


APP = _middleware()


async def _call(path: str, headers: list[tuple[bytes, bytes]], chunks: list[bytes]) -> int:
    scope: Scope = {
        "type": "http",
        "method": "POST",
        "path": path,
        "headers": headers,
        "state": {},
    }
    incoming: list[Message] = [
        {"type": "http.request", "body": chunk, "more_body": i < len(chunks) - 1}
        for i, chunk in enumerate(chunks)
    ] or [{"type": "http.request", "body": b"", "more_body": False}]
    sent: list[Message] = []

    async def receive() -> Message:
        return incoming.pop(0) if incoming else {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        sent.append(message)

    await APP(scope, receive, send)
    starts = [m for m in sent if m["type"] == "http.response.start"]
    assert len(starts) == 1
    return int(starts[0]["status"])


def _raw(headers: Any) -> list[tuple[bytes, bytes]]:
    if isinstance(headers, dict):
        return [
            (k.lower().encode("utf-8", "replace"), v.encode("utf-8", "replace"))
            for k, v in headers.items()
        ]
    return [(k.lower(), v) for k, v in headers]


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    headers=headers_strategy,
    chunks=st.lists(st.binary(max_size=120), max_size=4),
    path=st.sampled_from(["/hex", "/hexts", "/sw", "/stripe", "/github"]),
)
@example(headers=[(b"content-length", b"")], chunks=[], path="/hex")  # no valid length: 413
def test_middleware_answers_only_401_or_413(headers: Any, chunks: list[bytes], path: str) -> None:
    # The same valid headers may verify once for the body b"{}" (then the app would run);
    # keep the body different so every example is a forgery.
    if b"".join(chunks) == b"{}":
        chunks = [*chunks, b" "]
    raw = _raw(headers)
    status = anyio.run(_call, path, raw, chunks)
    # 413 before a byte is read when the Content-Length is over the cap or no valid
    # length at all (the one rule, asgi_armor._asgi.content_length); else the body decides.
    try:
        declared_length({"headers": raw}, 256)
    except PayloadTooLarge:
        assert status == 413
        return
    assert status == (413 if sum(map(len, chunks)) > 256 else 401)
