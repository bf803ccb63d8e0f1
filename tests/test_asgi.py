"""ASGI helpers: one Content-Length rule (RFC 9110 8.6) for every layer that reads a body."""

from __future__ import annotations

import json
from typing import Any

import pytest

from asgi_armor._asgi import INVALID_LENGTH, ASGIApp, Message, Scope, content_length
from asgi_armor.errors import ErrorMiddleware
from asgi_armor.idempotency import IdempotencyMiddleware
from asgi_armor.signing import SignatureMiddleware, SignedRoute, StandardWebhooks
from asgi_armor.validation import InputLimits

pytestmark = pytest.mark.anyio

# Lists, signs, spaces inside, digit separators, non-ASCII digits, hex: none is a length.
MALFORMED = [b"5, 5", b"+5", b"-5", b"5 5", b"1_0", b"\xd9\xa5", b"0x5", b"", b"5.0"]


@pytest.mark.parametrize("value", MALFORMED)
def test_content_length_is_ascii_digits_only(value: bytes) -> None:
    assert content_length([value]) == INVALID_LENGTH


def test_content_length_values() -> None:
    assert content_length([b"0"]) == 0
    assert content_length([b" 42 "]) == 42
    assert content_length([b"007"]) == 7
    # Repeated fields must agree (RFC 9110 8.6); copies that agree are one length.
    assert content_length([b"5", b"5"]) == 5
    assert content_length([b"5", b"6"]) == INVALID_LENGTH
    # Huge is huge, without converting thousands of digits.
    assert content_length([b"9" * 5000]) > 10**17
    assert content_length([b"0" * 5000 + b"12"]) == 12


class App:
    """Answers 200 after reading the body; counts its runs."""

    def __init__(self) -> None:
        self.runs = 0

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        self.runs += 1
        while (await receive()).get("more_body", False):
            pass
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})


def _layers(app: App) -> dict[str, ASGIApp]:
    secret = "whsec_" + "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
    return {
        "InputLimits": InputLimits(app, max_body_bytes=100),
        "IdempotencyMiddleware": IdempotencyMiddleware(app, routes=["POST /x"]),
        "SignatureMiddleware": SignatureMiddleware(
            app, routes={"POST /x": SignedRoute(StandardWebhooks(), secret)}, max_body_bytes=100
        ),
    }


async def _call(app: ASGIApp, lengths: list[bytes]) -> list[Message]:
    headers = [(b"content-length", value) for value in lengths]
    headers.append((b"idempotency-key", b"k" * 16))
    scope: Scope = {
        "type": "http",
        "method": "POST",
        "path": "/x",
        "raw_path": b"/x",
        "query_string": b"",
        "headers": headers,
        "client": ("1.2.3.4", 1),
    }
    sent: list[Message] = []
    bodies = [{"type": "http.request", "body": b"hello", "more_body": False}]

    async def receive() -> Message:
        return bodies.pop(0) if bodies else {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        sent.append(message)

    await ErrorMiddleware(app)(scope, receive, send)
    return sent


@pytest.mark.parametrize("layer", ["InputLimits", "IdempotencyMiddleware", "SignatureMiddleware"])
@pytest.mark.parametrize("lengths", [[b"5, 5"], [b"+5"], [b"5", b"6"], [b"1_0"]])
async def test_every_layer_refuses_a_malformed_length_alike(
    layer: str, lengths: list[bytes]
) -> None:
    # Before one parser: idempotency read "+5" as 5 and ignored "5, 5", signing read
    # past any length that was not plain digits.
    app = App()
    sent = await _call(_layers(app)[layer], lengths)
    assert sent[0]["status"] == 413
    body = json.loads(sent[1]["body"])
    assert body["error"] == "payload_too_large"
    assert body["message"] == "Content-Length header is not a valid length"
    assert app.runs == 0


@pytest.mark.parametrize("layer", ["InputLimits", "IdempotencyMiddleware", "SignatureMiddleware"])
async def test_every_layer_refuses_a_declared_length_over_its_cap(layer: str) -> None:
    app = App()
    layers = _layers(app)
    if layer == "IdempotencyMiddleware":
        layers[layer] = IdempotencyMiddleware(app, routes=[("POST /x", {"max_body_bytes": 100})])
    sent = await _call(layers[layer], [b"0" * 40 + b"101"])
    assert sent[0]["status"] == 413
    assert json.loads(sent[1]["body"])["message"] == "Request body exceeds 100 bytes"
    assert app.runs == 0
