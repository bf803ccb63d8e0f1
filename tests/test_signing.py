"""Request and webhook signing: schemes, verify/sign, and SignatureMiddleware."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
import standardwebhooks
import stripe

from asgi_armor._asgi import Message, Receive, Scope, Send
from asgi_armor.errors import ConfigError, ErrorMiddleware, InvalidSignature, PayloadTooLarge
from asgi_armor.signing import (
    SCHEMES,
    GitHub,
    HexHmac,
    ParsedSignature,
    Scheme,
    SignatureMiddleware,
    SignedRoute,
    StandardWebhooks,
    Stripe,
    VerifiedMessage,
    sign,
    verify,
)
from asgi_armor.stores.base import StoreError
from asgi_armor.stores.memory import MemoryStore
from asgi_armor.stores.redis import RedisStore
from tests.envelope import assert_envelope

NOW = 1_700_000_000
WHSEC = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
BODY = b'{"type":"payment.succeeded","amount":4200}'
GITHUB_SECRET = "It's a Secret to Everybody"
GITHUB_SIGNATURE = "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17"


def code_of(excinfo: pytest.ExceptionInfo[InvalidSignature]) -> str:
    return excinfo.value.code


# -- official vectors ----------------------------------------------------------------


def test_github_documented_example_verifies() -> None:
    headers = {"X-Hub-Signature-256": GITHUB_SIGNATURE}
    message = verify(headers, b"Hello, World!", GITHUB_SECRET, GitHub())
    assert message.scheme == "github"
    assert message.secret_index == 0
    assert sign(b"Hello, World!", GITHUB_SECRET, GitHub()) == headers


def test_standardwebhooks_library_signature_verifies_with_ours() -> None:
    theirs = standardwebhooks.Webhook(WHSEC)
    signature = theirs.sign("msg_p5jXN8AQM9LWM0D4loKWxJek", datetime.fromtimestamp(NOW, UTC), "hi")
    headers = {"webhook-id": "msg_p5jXN8AQM9LWM0D4loKWxJek", "webhook-timestamp": str(NOW)}
    headers["webhook-signature"] = signature
    message = verify(headers, b"hi", WHSEC, StandardWebhooks(), now=NOW)
    assert message.msg_id == "msg_p5jXN8AQM9LWM0D4loKWxJek"
    assert message.timestamp == NOW


def test_our_standardwebhooks_signature_verifies_with_the_library() -> None:
    # The library checks the timestamp against the real clock, so sign "now".
    headers = sign(BODY, WHSEC, StandardWebhooks())
    assert standardwebhooks.Webhook(WHSEC).verify(BODY, headers) == json.loads(BODY)
    raw_key = b"\x01\x02secret-bytes"
    headers = sign(BODY, raw_key, StandardWebhooks(), msg_id="msg_x")
    assert standardwebhooks.Webhook(raw_key).verify(BODY, headers, json_parse=False) is None
    assert headers["webhook-id"] == "msg_x"


def test_standardwebhooks_svix_aliases_and_several_entries() -> None:
    theirs = standardwebhooks.Webhook(WHSEC)
    good = theirs.sign("msg_1", datetime.fromtimestamp(NOW, UTC), "body")
    wrong = "v1," + base64.b64encode(b"\0" * 32).decode()
    headers = {
        "svix-id": "msg_1",
        "svix-timestamp": str(NOW),
        "svix-signature": f"v1a,c29tZXRoaW5n {wrong}  {good}",
    }
    assert verify(headers, b"body", WHSEC, StandardWebhooks(), now=NOW).msg_id == "msg_1"
    with pytest.raises(InvalidSignature) as excinfo:
        verify(headers, b"body", WHSEC, StandardWebhooks(svix_aliases=False), now=NOW)
    assert code_of(excinfo) == "missing_signature"


def test_standardwebhooks_whsec_secret_decoded_plain_secret_is_utf8() -> None:
    scheme = StandardWebhooks()
    assert scheme.key(WHSEC) == base64.b64decode(WHSEC[6:])
    assert scheme.key("whsec_YWJj") == b"abc"
    assert scheme.key("whsec_YWI") == b"ab"  # unpadded, as the official library allows
    assert scheme.key("plain-secret") == b"plain-secret"
    assert scheme.key(b"whsec_YWJj") == b"whsec_YWJj"  # bytes are the key itself


def test_stripe_library_accepts_our_header() -> None:
    secret = "whsec_test_secret"
    headers = sign(BODY, secret, Stripe())
    assert set(headers) == {"Stripe-Signature"}
    assert stripe.WebhookSignature.verify_header(BODY, headers["Stripe-Signature"], secret, 300)


def test_stripe_library_header_verifies_with_ours() -> None:
    secret = "whsec_test_secret"
    header = stripe.WebhookSignature.generate_signature_header(BODY.decode(), secret, NOW)
    message = verify({"Stripe-Signature": header}, BODY, secret, Stripe(), now=NOW)
    assert message.timestamp == NOW


def test_stripe_documented_algorithm_with_several_entries() -> None:
    # https://docs.stripe.com/webhooks#verify-manually: HMAC-SHA256 of "{t}.{payload}",
    # hex; several v1 entries while a secret is rolled; v0 is ignored.
    secret = "whsec_new"
    expected = hmac.new(secret.encode(), b"%d." % NOW + BODY, hashlib.sha256).hexdigest()
    other = hmac.new(b"whsec_old", b"%d." % NOW + BODY, hashlib.sha256).hexdigest()
    header = f"t={NOW},v1={other},v1={expected},v0={'a' * 64}"
    verify({"stripe-signature": header}, BODY, secret, Stripe(), now=NOW)


def test_hex_hmac_seed_format_with_and_without_prefix() -> None:
    digest = hmac.new(b"demo-webhook-secret", BODY, hashlib.sha256).hexdigest()
    for value in (digest, "sha256=" + digest, digest.upper(), "SHA256=" + digest):
        verify({"X-Signature": value}, BODY, "demo-webhook-secret")
    assert sign(BODY, "demo-webhook-secret") == {"X-Signature": digest}


def test_hex_hmac_options() -> None:
    scheme = HexHmac(header="X-Sig", algorithm="sha512", prefix_optional=None)
    digest = hmac.new(b"k", BODY, hashlib.sha512).hexdigest()
    verify({"x-sig": digest}, BODY, "k", scheme)
    with pytest.raises(InvalidSignature) as excinfo:
        verify({"x-sig": "sha256=" + digest}, BODY, "k", scheme)
    assert code_of(excinfo) == "malformed_signature"


def test_hex_hmac_with_timestamp_header() -> None:
    scheme = HexHmac(timestamp_header="X-Timestamp")
    headers = sign(BODY, "k", scheme, timestamp=NOW)
    expected = hmac.new(b"k", f"{NOW}.".encode() + BODY, hashlib.sha256).hexdigest()
    assert headers == {"X-Timestamp": str(NOW), "X-Signature": expected}
    assert verify(headers, BODY, "k", scheme, now=NOW).timestamp == NOW
    with pytest.raises(InvalidSignature) as excinfo:
        verify({"X-Signature": expected}, BODY, "k", scheme, now=NOW)
    assert code_of(excinfo) == "missing_signature"
    assert excinfo.value.details[0].field == "X-Timestamp"
    with pytest.raises(InvalidSignature) as excinfo:
        verify(headers, BODY, "k", scheme, now=NOW + 301)
    assert code_of(excinfo) == "timestamp_out_of_tolerance"


# -- verification failures -----------------------------------------------------------

ALL_SCHEMES: list[Scheme] = [
    HexHmac(),
    HexHmac(timestamp_header="X-Timestamp"),
    StandardWebhooks(),
    Stripe(),
    GitHub(),
]


@pytest.mark.parametrize("scheme", ALL_SCHEMES, ids=repr)
def test_round_trip_and_tampering(scheme: Scheme) -> None:
    headers = sign(BODY, "secret", scheme, timestamp=NOW)
    message = verify(headers, BODY, "secret", scheme, now=NOW)
    assert message.scheme == scheme.name
    with pytest.raises(InvalidSignature) as excinfo:
        verify(headers, BODY + b" ", "secret", scheme, now=NOW)
    assert code_of(excinfo) == "signature_mismatch"
    assert excinfo.value.status == 401
    assert excinfo.value.error == "invalid_signature"
    with pytest.raises(InvalidSignature) as excinfo:
        verify(headers, BODY, "other-secret", scheme, now=NOW)
    assert code_of(excinfo) == "signature_mismatch"


@pytest.mark.parametrize("scheme", ALL_SCHEMES, ids=repr)
def test_rotated_secrets_old_and_new_both_verify(scheme: Scheme) -> None:
    secrets: list[str | bytes] = ["new-secret", b"old-secret"]
    old = sign(BODY, b"old-secret", scheme, timestamp=NOW)
    new = sign(BODY, "new-secret", scheme, timestamp=NOW)
    assert verify(old, BODY, secrets, scheme, now=NOW).secret_index == 1
    assert verify(new, BODY, secrets, scheme, now=NOW).secret_index == 0
    with pytest.raises(InvalidSignature):
        verify(sign(BODY, "retired", scheme, timestamp=NOW), BODY, secrets, scheme, now=NOW)


@pytest.mark.parametrize(
    "scheme", [HexHmac(timestamp_header="X-Timestamp"), StandardWebhooks(), Stripe()], ids=repr
)
def test_timestamps_checked_in_both_directions(scheme: Scheme) -> None:
    headers = sign(BODY, "s", scheme, timestamp=NOW)
    verify(headers, BODY, "s", scheme, now=NOW + 300)  # boundary included
    verify(headers, BODY, "s", scheme, now=NOW - 300)
    for now in (NOW + 301, NOW - 301, NOW + 10**9, 0):
        with pytest.raises(InvalidSignature) as excinfo:
            verify(headers, BODY, "s", scheme, now=now)
        assert code_of(excinfo) == "timestamp_out_of_tolerance"
    verify(headers, BODY, "s", scheme, now=NOW + 3000, tolerance=3600)


def test_sign_makes_timestamp_and_id_now() -> None:
    before = int(time.time())
    headers = sign(BODY, WHSEC, StandardWebhooks())
    assert headers["webhook-id"].startswith("msg_")
    assert before <= int(headers["webhook-timestamp"]) <= time.time()
    assert verify(headers, BODY, WHSEC, StandardWebhooks()).msg_id == headers["webhook-id"]
    assert sign(BODY, WHSEC, StandardWebhooks())["webhook-id"] != headers["webhook-id"]
    verify(sign(BODY, "s", Stripe()), BODY, "s", Stripe())


def test_raw_asgi_headers_are_accepted() -> None:
    headers = sign(BODY, WHSEC, StandardWebhooks(), timestamp=NOW)
    raw = [(b"host", b"t")] + [(k.encode(), v.encode()) for k, v in headers.items()]
    verify(raw, BODY, WHSEC, StandardWebhooks(), now=NOW)


def test_unrelated_non_ascii_header_is_ignored() -> None:
    headers = [(b"x-signature", sign(BODY, "s")["X-Signature"].encode()), (b"x-name", b"\xff\xfe")]
    verify(headers, BODY, "s")


SW_OK = sign(BODY, WHSEC, StandardWebhooks(), timestamp=NOW, msg_id="msg_1")
STRIPE_OK = sign(BODY, "s", Stripe(), timestamp=NOW)["Stripe-Signature"]
HEX_OK = sign(BODY, "s")["X-Signature"]


def _sw(**changes: str | None) -> dict[str, str]:
    headers = dict(SW_OK)
    for name, value in changes.items():
        name = "webhook-" + name
        if value is None:
            del headers[name]
        else:
            headers[name] = value
    return headers


@pytest.mark.parametrize(
    ("scheme", "headers", "code", "field"),
    [
        (HexHmac(), {}, "missing_signature", "X-Signature"),
        (HexHmac(), {"X-Signature": "  "}, "missing_signature", "X-Signature"),
        (HexHmac(), {"X-Signature": "xyz"}, "malformed_signature", "X-Signature"),
        (HexHmac(), {"X-Signature": HEX_OK[:-1]}, "malformed_signature", "X-Signature"),
        (HexHmac(), {"X-Signature": HEX_OK + "00"}, "malformed_signature", "X-Signature"),
        (HexHmac(), {"X-Signature": HEX_OK[:-2] + " 0"}, "malformed_signature", "X-Signature"),
        (HexHmac(), {"X-Signature": "sha1=" + HEX_OK}, "malformed_signature", "X-Signature"),
        (HexHmac(), {"X-Signature": HEX_OK[:-1] + "é"}, "malformed_signature", "X-Signature"),
        (HexHmac(), {"X-Signature": "a" * 100_000}, "malformed_signature", "X-Signature"),
        (
            HexHmac(),
            [(b"x-signature", HEX_OK.encode() + b"\xff")],
            "malformed_signature",
            "X-Signature",
        ),
        (HexHmac(), [(b"x-signature", HEX_OK.encode())] * 2, "malformed_signature", "X-Signature"),
        (
            HexHmac(),
            {"X-Signature": HEX_OK, "x-signature": HEX_OK},
            "malformed_signature",
            "X-Signature",
        ),
        (GitHub(), {"X-Hub-Signature-256": HEX_OK}, "malformed_signature", "X-Hub-Signature-256"),
        (
            GitHub(),
            {"X-Hub-Signature": "sha1=" + "a" * 40},
            "missing_signature",
            "X-Hub-Signature-256",
        ),
        (
            GitHub(),
            {"X-Hub-Signature-256": "sha256="},
            "malformed_signature",
            "X-Hub-Signature-256",
        ),
        (Stripe(), {}, "missing_signature", "Stripe-Signature"),
        (Stripe(), {"Stripe-Signature": "garbage"}, "malformed_signature", "Stripe-Signature"),
        (Stripe(), {"Stripe-Signature": f"v1={HEX_OK}"}, "malformed_signature", "Stripe-Signature"),
        (Stripe(), {"Stripe-Signature": f"t={NOW}"}, "malformed_signature", "Stripe-Signature"),
        (
            Stripe(),
            {"Stripe-Signature": f"t={NOW},v0={HEX_OK}"},
            "malformed_signature",
            "Stripe-Signature",
        ),
        (
            Stripe(),
            {"Stripe-Signature": f"t=1{'0' * 40},v1={HEX_OK}"},
            "malformed_signature",
            "Stripe-Signature",
        ),
        (
            Stripe(),
            {"Stripe-Signature": f"t=-5,v1={HEX_OK}"},
            "malformed_signature",
            "Stripe-Signature",
        ),
        (
            Stripe(),
            {"Stripe-Signature": f"t={NOW},t={NOW},{STRIPE_OK}"},
            "malformed_signature",
            "Stripe-Signature",
        ),
        (
            Stripe(),
            {"Stripe-Signature": f"t={NOW},v1=zz"},
            "malformed_signature",
            "Stripe-Signature",
        ),
        (
            Stripe(),
            {"Stripe-Signature": STRIPE_OK + ",v1"},
            "malformed_signature",
            "Stripe-Signature",
        ),
        (
            Stripe(),
            {"Stripe-Signature": STRIPE_OK + ",x=1" * 50},
            "malformed_signature",
            "Stripe-Signature",
        ),
        (StandardWebhooks(), _sw(id=None), "missing_signature", "webhook-id"),
        (StandardWebhooks(), _sw(timestamp=None), "missing_signature", "webhook-timestamp"),
        (StandardWebhooks(), _sw(signature=None), "missing_signature", "webhook-signature"),
        (StandardWebhooks(), _sw(timestamp="1.5e9"), "malformed_signature", "webhook-timestamp"),
        (StandardWebhooks(), _sw(id="msg id"), "malformed_signature", "webhook-id"),
        (StandardWebhooks(), _sw(id="m" * 300), "malformed_signature", "webhook-id"),
        (StandardWebhooks(), _sw(id="msg_ü"), "malformed_signature", "webhook-id"),
        (StandardWebhooks(), _sw(signature="v1"), "malformed_signature", "webhook-signature"),
        (StandardWebhooks(), _sw(signature="v1,"), "malformed_signature", "webhook-signature"),
        (StandardWebhooks(), _sw(signature="v1,!!!"), "malformed_signature", "webhook-signature"),
        (StandardWebhooks(), _sw(signature="v1,YWJj"), "malformed_signature", "webhook-signature"),
        (StandardWebhooks(), _sw(signature="v1,YWJ"), "malformed_signature", "webhook-signature"),
        (
            Stripe(),
            {"Stripe-Signature": STRIPE_OK + ",zz"},
            "malformed_signature",
            "Stripe-Signature",
        ),
        (
            Stripe(),
            {"Stripe-Signature": STRIPE_OK + ",=x"},
            "malformed_signature",
            "Stripe-Signature",
        ),
        (StandardWebhooks(), _sw(signature="v1a,YWJj"), "malformed_signature", "webhook-signature"),
        (
            StandardWebhooks(),
            _sw(signature="v1,YWJj" * 100),
            "malformed_signature",
            "webhook-signature",
        ),
        (
            StandardWebhooks(),
            _sw(signature="v2,YWJj " * 20),
            "malformed_signature",
            "webhook-signature",
        ),
    ],
)
def test_missing_and_malformed_headers(scheme: Scheme, headers: Any, code: str, field: str) -> None:
    with pytest.raises(InvalidSignature) as excinfo:
        verify(
            headers, BODY, WHSEC if isinstance(scheme, StandardWebhooks) else "s", scheme, now=NOW
        )
    assert code_of(excinfo) == code
    assert excinfo.value.details[0].field == field


def test_verify_caps_the_body() -> None:
    headers = sign(BODY, "s")
    verify(headers, BODY, "s", max_body_bytes=len(BODY))
    with pytest.raises(PayloadTooLarge):
        verify(headers, BODY, "s", max_body_bytes=len(BODY) - 1)


def test_replay_ids() -> None:
    sw = verify(SW_OK, BODY, WHSEC, StandardWebhooks(), now=NOW)
    assert sw.replay_id == f"msg_1:{NOW}"
    # Secret-independent: a message signed with the old and the new secret is one message.
    a = verify(sign(BODY, "a", Stripe(), timestamp=NOW), BODY, ["a", "b"], Stripe(), now=NOW)
    b = verify(sign(BODY, "b", Stripe(), timestamp=NOW), BODY, ["a", "b"], Stripe(), now=NOW)
    assert a.replay_id == b.replay_id
    c = verify(sign(BODY, "a", Stripe(), timestamp=NOW + 1), BODY, "a", Stripe(), now=NOW)
    assert c.replay_id != a.replay_id


@pytest.mark.parametrize(
    ("secrets", "scheme"),
    [
        ("", HexHmac()),
        (b"", GitHub()),
        ([], Stripe()),
        (["ok", ""], HexHmac()),
        ("whsec_", StandardWebhooks()),
        ("whsec_not base64!", StandardWebhooks()),
        ([42], HexHmac()),
    ],
)
def test_verify_refuses_missing_secrets(secrets: Any, scheme: Scheme) -> None:
    with pytest.raises(ConfigError):
        verify({"X-Signature": HEX_OK}, BODY, secrets, scheme)


def test_scheme_config_errors() -> None:
    with pytest.raises(ConfigError, match="algorithm"):
        HexHmac(algorithm="md5")
    with pytest.raises(ConfigError, match="header"):
        HexHmac(header="X Signature")
    with pytest.raises(ConfigError, match="timestamp_header"):
        HexHmac(timestamp_header="")
    with pytest.raises(ConfigError):
        Stripe(header="a:b")
    with pytest.raises(ConfigError):
        verify({}, BODY, "s", tolerance=0)
    with pytest.raises(ValueError, match="msg_id"):
        sign(BODY, WHSEC, StandardWebhooks(), msg_id="has space")


def test_schemes_are_frozen_slotted_and_named() -> None:
    assert {
        "github": GitHub,
        "hex-hmac": HexHmac,
        "standard-webhooks": StandardWebhooks,
        "stripe": Stripe,
    } == SCHEMES
    scheme = HexHmac()
    assert not hasattr(scheme, "__dict__")
    with pytest.raises(AttributeError):
        scheme.header = "X-Other"  # type: ignore[misc]
    assert HexHmac() == HexHmac()
    parsed = Stripe().extract({"stripe-signature": STRIPE_OK})
    assert isinstance(parsed, ParsedSignature)
    assert Stripe().signed_payload(parsed, BODY) == f"{NOW}.".encode() + BODY


# -- middleware ----------------------------------------------------------------------


class Recorder:
    """A bare ASGI app that records what it received."""

    def __init__(self) -> None:
        self.bodies: list[bytes] = []
        self.messages: list[VerifiedMessage | None] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        chunks = []
        while True:
            message = await receive()
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                break
        self.bodies.append(b"".join(chunks))
        self.messages.append(scope.get("state", {}).get("signature"))
        body = b'{"received":true}'
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"application/json")],
            }
        )
        await send({"type": "http.response.body", "body": body})


class FailingStore:
    """A NonceStore whose backend is down."""

    async def remember(self, key: str, ttl: float) -> bool:
        raise StoreError("down")


ROUTES: dict[str, Any] = {
    "POST /webhooks/hex": SignedRoute(HexHmac(), "hex-secret"),
    "POST /webhooks/sw": SignedRoute(StandardWebhooks(), WHSEC),
    "POST /webhooks/stripe": (Stripe(), ["whsec_new", "whsec_old"]),
    "POST /webhooks/github": SignedRoute(GitHub(), GITHUB_SECRET),
}


def client_for(app: Any) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=ErrorMiddleware(app), client=("1.2.3.4", 123))
    return httpx.AsyncClient(transport=transport, base_url="http://t")


def make(recorder: Recorder, **options: Any) -> SignatureMiddleware:
    options.setdefault("routes", ROUTES)
    options.setdefault("wall_clock", lambda: float(NOW))
    return SignatureMiddleware(recorder, **options)


def assert_signature_error(response: httpx.Response, code: str) -> None:
    payload = assert_envelope(response, 401, "invalid_signature")
    assert [d["code"] for d in payload["details"]] == [code]


@pytest.mark.anyio
async def test_middleware_accepts_each_scheme_and_replays_exact_body() -> None:
    recorder = Recorder()
    body = b'{"a": 1,\n "b": "\xc3\xa9"}  '  # whitespace and UTF-8 kept byte for byte
    cases = [
        ("/webhooks/hex", sign(body, "hex-secret")),
        ("/webhooks/sw", sign(body, WHSEC, StandardWebhooks(), timestamp=NOW)),
        ("/webhooks/stripe", sign(body, "whsec_old", Stripe(), timestamp=NOW)),
        ("/webhooks/github", sign(body, GITHUB_SECRET, GitHub())),
    ]
    async with client_for(make(recorder)) as client:
        for path, headers in cases:
            response = await client.post(path, content=body, headers=headers)
            assert response.status_code == 200, response.text
            assert response.json() == {"received": True}
    assert recorder.bodies == [body] * 4
    assert [m.scheme for m in recorder.messages if m] == [
        "hex-hmac",
        "standard-webhooks",
        "stripe",
        "github",
    ]
    assert recorder.messages[2] is not None
    assert recorder.messages[2].secret_index == 1


@pytest.mark.anyio
async def test_middleware_rejects_wrong_and_missing_signatures() -> None:
    recorder = Recorder()
    async with client_for(make(recorder)) as client:
        response = await client.post("/webhooks/hex", content=BODY)
        assert_signature_error(response, "missing_signature")
        assert response.json()["details"][0]["field"] == "X-Signature"
        wrong = sign(BODY, "not-the-secret")
        assert_signature_error(
            await client.post("/webhooks/hex", content=BODY, headers=wrong), "signature_mismatch"
        )
        tampered = sign(BODY, "hex-secret")
        assert_signature_error(
            await client.post("/webhooks/hex", content=BODY + b"!", headers=tampered),
            "signature_mismatch",
        )
        bad = {b"X-Signature": "sha256=\u00e9".encode() + b"0" * 62}
        response = await client.post("/webhooks/hex", content=BODY, headers=bad)
        assert_signature_error(response, "malformed_signature")
        stale = sign(BODY, WHSEC, StandardWebhooks(), timestamp=NOW - 301)
        assert_signature_error(
            await client.post("/webhooks/sw", content=BODY, headers=stale),
            "timestamp_out_of_tolerance",
        )
        future = sign(BODY, "whsec_new", Stripe(), timestamp=NOW + 301)
        assert_signature_error(
            await client.post("/webhooks/stripe", content=BODY, headers=future),
            "timestamp_out_of_tolerance",
        )
    assert recorder.bodies == []


@pytest.mark.anyio
async def test_middleware_rejects_replays() -> None:
    recorder = Recorder()
    sw = sign(BODY, WHSEC, StandardWebhooks(), timestamp=NOW, msg_id="msg_dup")
    hexed = sign(BODY, "hex-secret")
    async with client_for(make(recorder)) as client:
        for path, headers in (("/webhooks/sw", sw), ("/webhooks/hex", hexed)):
            first = await client.post(path, content=BODY, headers=headers)
            assert first.status_code == 200
            assert_signature_error(
                await client.post(path, content=BODY, headers=headers), "replayed"
            )
        # A sender's retry re-signs with a new timestamp: the same message id gets through
        # (deduplicating deliveries is the app's job, with VerifiedMessage.msg_id).
        retry = sign(BODY, WHSEC, StandardWebhooks(), timestamp=NOW + 5, msg_id="msg_dup")
        assert (await client.post("/webhooks/sw", content=BODY, headers=retry)).status_code == 200
    assert len(recorder.bodies) == 3


@pytest.mark.anyio
async def test_replay_cache_lasts_twice_the_tolerance(clock: Any) -> None:
    recorder = Recorder()
    store = MemoryStore(clock=clock)
    headers = sign(BODY, "hex-secret")
    async with client_for(make(recorder, store=store, tolerance=60)) as client:
        assert (
            await client.post("/webhooks/hex", content=BODY, headers=headers)
        ).status_code == 200
        clock.advance(119)
        assert_signature_error(
            await client.post("/webhooks/hex", content=BODY, headers=headers), "replayed"
        )
        clock.advance(2)
        assert (
            await client.post("/webhooks/hex", content=BODY, headers=headers)
        ).status_code == 200


@pytest.mark.anyio
async def test_replay_protection_can_be_disabled() -> None:
    recorder = Recorder()
    headers = sign(BODY, "hex-secret")
    async with client_for(make(recorder, replay_protection=False)) as client:
        for _ in range(2):
            response = await client.post("/webhooks/hex", content=BODY, headers=headers)
            assert response.status_code == 200


@pytest.mark.anyio
async def test_middleware_body_cap() -> None:
    recorder = Recorder()
    body = b"x" * 101
    headers = sign(body, "hex-secret")
    async with client_for(make(recorder, max_body_bytes=100)) as client:
        response = await client.post("/webhooks/hex", content=body, headers=headers)
        assert response.status_code == 413
        assert response.json()["error"] == "payload_too_large"
        assert response.headers["x-request-id"] == response.json()["request_id"]
        ok = b"y" * 100
        response = await client.post("/webhooks/hex", content=ok, headers=sign(ok, "hex-secret"))
        assert response.status_code == 200
    assert recorder.bodies == [ok]
    # Streamed without a Content-Length: refused once the bytes pass the cap.
    app = ErrorMiddleware(make(recorder, max_body_bytes=100))
    status, sent = await call_asgi(app, "/webhooks/hex", headers, [b"x" * 50] * 3)
    assert status == 413
    assert json.loads(sent[1]["body"])["error"] == "payload_too_large"
    assert recorder.bodies == [ok]


async def call_asgi(
    app: Any, path: str, headers: dict[str, str], chunks: list[bytes]
) -> tuple[int, list[Message]]:
    """Call ``app`` directly with a body in ``chunks`` and no Content-Length."""
    scope: Scope = {
        "type": "http",
        "method": "POST",
        "path": path,
        "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
        "state": {},
    }
    incoming: list[Message] = [
        {"type": "http.request", "body": chunk, "more_body": i < len(chunks) - 1}
        for i, chunk in enumerate(chunks)
    ]
    sent: list[Message] = []

    async def receive() -> Message:
        return incoming.pop(0) if incoming else {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        sent.append(message)

    await app(scope, receive, send)
    return sent[0]["status"], sent


@pytest.mark.anyio
async def test_chunked_body_is_reassembled_and_replayed() -> None:
    recorder = Recorder()
    body = b"0123456789" * 10
    chunks = [body[i : i + 7] for i in range(0, len(body), 7)]
    status, _ = await call_asgi(make(recorder), "/webhooks/hex", sign(body, "hex-secret"), chunks)
    assert status == 200
    assert recorder.bodies == [body]


@pytest.mark.anyio
async def test_unmatched_routes_and_other_scopes_pass_through() -> None:
    recorder = Recorder()
    async with client_for(make(recorder)) as client:
        assert (await client.post("/other", content=b"raw")).status_code == 200
        assert (await client.get("/webhooks/hex")).status_code == 200  # POST only
    assert recorder.bodies == [b"raw", b""]
    assert recorder.messages == [None, None]

    seen: list[str] = []

    async def lifespan_app(scope: Scope, receive: Receive, send: Send) -> None:
        seen.append(scope["type"])

    async def no_receive() -> Message:
        raise AssertionError("not called")

    async def no_send(message: Message) -> None:
        raise AssertionError("not called")

    await SignatureMiddleware(lifespan_app, routes=ROUTES)(
        {"type": "lifespan"}, no_receive, no_send
    )
    assert seen == ["lifespan"]


@pytest.mark.anyio
async def test_store_failure_denies_by_default_and_allows_when_asked() -> None:
    recorder = Recorder()
    headers = sign(BODY, "hex-secret")
    async with client_for(make(recorder, store=FailingStore())) as client:
        response = await client.post("/webhooks/hex", content=BODY, headers=headers)
        assert response.status_code == 503
        assert response.json()["error"] == "service_unavailable"
        assert response.json()["request_id"] == response.headers["x-request-id"]
        # A bad signature is refused before the store is asked.
        wrong = sign(BODY, "nope")
        assert_signature_error(
            await client.post("/webhooks/hex", content=BODY, headers=wrong), "signature_mismatch"
        )
    assert recorder.bodies == []
    # "allow" accepts the delivery unremembered in the store, but never twice here: see
    # test_an_accepted_delivery_stays_remembered_when_the_store_fails_open.


@pytest.mark.anyio
async def test_replay_cache_on_redis(redis_url: str, redis_prefix: str, asyncio_only: None) -> None:
    recorder = Recorder()
    store = RedisStore.from_url(redis_url, prefix=redis_prefix)
    try:
        headers = sign(BODY, WHSEC, StandardWebhooks(), timestamp=NOW)
        async with client_for(make(recorder, store=store)) as client:
            response = await client.post("/webhooks/sw", content=BODY, headers=headers)
            assert response.status_code == 200
            assert_signature_error(
                await client.post("/webhooks/sw", content=BODY, headers=headers), "replayed"
            )
        keys = [key async for key in store.client.scan_iter(match=redis_prefix + "*")]
        assert len(keys) == 1
        assert keys[0].startswith((redis_prefix + "nonce:").encode())
        ttl = await store.client.pttl(keys[0])
        assert 590_000 < ttl <= 600_000
    finally:
        await store.aclose()


@pytest.mark.anyio
async def test_dead_redis_is_a_503(asyncio_only: None) -> None:
    store = RedisStore.from_url("redis://127.0.0.1:1/0", timeout=0.2)
    try:
        async with client_for(make(Recorder(), store=store)) as client:
            headers = sign(BODY, "hex-secret")
            response = await client.post("/webhooks/hex", content=BODY, headers=headers)
            assert response.status_code == 503
    finally:
        await store.aclose()


def _reject(**options: Any) -> str:
    with pytest.raises(ConfigError) as excinfo:
        SignatureMiddleware(Recorder(), **options)
    return str(excinfo.value)


def test_middleware_config_fails_closed() -> None:
    assert "'POST /hook'" in _reject(routes={"POST /hook": SignedRoute(HexHmac(), "")})
    assert "'POST /hook'" in _reject(routes={"POST /hook": SignedRoute(HexHmac(), [])})
    assert "'POST /hook'" in _reject(routes={"POST /hook": (HexHmac(), [b"", "x"])})
    assert "'POST /hook'" in _reject(routes={"POST /hook": (HexHmac(),)})
    assert "'POST /hook'" in _reject(routes={"POST /hook": ("hex-hmac", "s")})
    assert "'POST /hook'" in _reject(routes={"POST /hook": SignedRoute(HexHmac(), "s", -1)})
    assert "'POST /hook'" in _reject(routes=[("POST /hook", (StandardWebhooks(), "whsec_%%"))])
    assert "hook" in _reject(routes={"POST hook": SignedRoute(HexHmac(), "s")})
    assert "at least one" in _reject(routes={})
    assert "on_store_error" in _reject(routes=ROUTES, on_store_error="maybe")
    assert "tolerance" in _reject(routes=ROUTES, tolerance=0)
    assert "max_body_bytes" in _reject(routes=ROUTES, max_body_bytes=0)


def test_middleware_repr_and_route_tolerance() -> None:
    app = SignatureMiddleware(
        Recorder(), routes=[("POST /a", SignedRoute(Stripe(), "s", tolerance=10))]
    )
    assert repr(app) == "SignatureMiddleware(routes=['POST /a'])"
    assert app.routes.entries[0][1].tolerance == 10


@pytest.mark.anyio
async def test_per_route_tolerance_is_used() -> None:
    recorder = Recorder()
    routes = {"POST /a": SignedRoute(Stripe(), "s", tolerance=10)}
    headers = sign(BODY, "s", Stripe(), timestamp=NOW - 11)
    async with client_for(make(recorder, routes=routes)) as client:
        assert_signature_error(
            await client.post("/a", content=BODY, headers=headers), "timestamp_out_of_tolerance"
        )


def _clock_of(value: float) -> Callable[[], float]:
    return lambda: value


@pytest.mark.anyio
async def test_wall_clock_is_injectable() -> None:
    headers = sign(BODY, "s", Stripe(), timestamp=5_000)
    routes = {"POST /a": SignedRoute(Stripe(), "s")}
    async with client_for(make(Recorder(), routes=routes, wall_clock=_clock_of(5_100))) as c:
        assert (await c.post("/a", content=BODY, headers=headers)).status_code == 200
    async with client_for(make(Recorder(), routes=routes, wall_clock=_clock_of(9_000))) as c:
        assert_signature_error(
            await c.post("/a", content=BODY, headers=headers), "timestamp_out_of_tolerance"
        )


@pytest.mark.anyio
async def test_retry_after_a_failed_delivery_is_not_a_replay() -> None:
    """The app answered 500: the sender's identical retry must be verified, not refused."""
    calls = 0

    async def flaky(scope: Scope, receive: Receive, send: Send) -> None:
        nonlocal calls
        calls += 1
        status = 500 if calls == 1 else 200
        await send({"type": "http.response.start", "status": status, "headers": []})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    app = ErrorMiddleware(SignatureMiddleware(flaky, routes={"POST /hook": (HexHmac(), "s")}))
    body = b'{"event": 1}'
    headers = sign(body, "s", scheme=HexHmac())
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://t"
    ) as client:
        assert (await client.post("/hook", content=body, headers=headers)).status_code == 500
        assert (await client.post("/hook", content=body, headers=headers)).status_code == 200
        replay = await client.post("/hook", content=body, headers=headers)
    assert replay.status_code == 401
    assert replay.json()["details"][0]["code"] == "replayed"


def test_list_shaped_asgi_headers_are_read() -> None:
    body = b"{}"
    ((name, value),) = sign(body, "s", scheme=HexHmac()).items()
    verify([[name.lower().encode(), value.encode()]], body, "s", scheme=HexHmac())  # type: ignore[list-item]


# -- tests helper (issue 23) ---------------------------------------------------------


@pytest.mark.anyio
async def test_replay_protection_is_per_route() -> None:
    """The same signed delivery twice: refused as a replay on the protected route, let
    through on the route that turned protection off, and a middleware default applies to
    routes that say nothing."""
    recorder = Recorder()
    routes = {
        "POST /a": SignedRoute(HexHmac(), "s"),
        "POST /b": SignedRoute(HexHmac(), "s", replay_protection=False),
        "POST /c": SignedRoute(HexHmac(), "s", replay_protection=True),
    }
    headers = sign(BODY, "s", scheme=HexHmac())
    async with client_for(make(recorder, routes=routes)) as client:
        assert (await client.post("/a", content=BODY, headers=headers)).status_code == 200
        assert_signature_error(await client.post("/a", content=BODY, headers=headers), "replayed")
        for _ in range(3):
            assert (await client.post("/b", content=BODY, headers=headers)).status_code == 200
    assert len(recorder.bodies) == 4
    off_by_default = make(Recorder(), routes=routes, replay_protection=False)
    async with client_for(off_by_default) as client:
        for _ in range(2):
            assert (await client.post("/a", content=BODY, headers=headers)).status_code == 200
        assert (await client.post("/c", content=BODY, headers=headers)).status_code == 200
        assert_signature_error(await client.post("/c", content=BODY, headers=headers), "replayed")


class _ComparisonLog:
    """``hmac`` for the signing module, recording every ``compare_digest`` it is asked."""

    def __init__(self) -> None:
        self.new = hmac.new
        self.pairs: list[tuple[bytes, bytes]] = []

    def compare_digest(self, a: bytes, b: bytes) -> bool:
        self.pairs.append((a, b))
        return hmac.compare_digest(a, b)


def _stripe_entry(secret: str) -> str:
    header = sign(BODY, secret, Stripe(), timestamp=NOW)["Stripe-Signature"]
    return header.split(",v1=", 1)[1]


@pytest.mark.parametrize(
    ("signed_with", "expected_index"),
    [
        (["a"], 0),  # the first secret, the first entry: an early exit would stop here
        (["zz", "c"], 2),  # the last secret, the last entry
        (["b", "a"], 0),  # both match: the first secret wins, the rest still compared
        (["zz"], None),  # nothing matches
    ],
)
def test_every_secret_is_compared_with_every_signature_entry(
    monkeypatch: pytest.MonkeyPatch, signed_with: list[str], expected_index: int | None
) -> None:
    """No early exit (the time taken must not say which secret or entry matched): each of
    the secrets against each of the entries, exactly once."""
    import asgi_armor.signing as signing

    log = _ComparisonLog()
    monkeypatch.setattr(signing, "hmac", log)
    secrets = ["a", "b", "c"]
    entries = [_stripe_entry(secret) for secret in signed_with] + ["0" * 64]
    header = f"t={NOW}," + ",".join(f"v1={entry}" for entry in entries)
    if expected_index is None:
        with pytest.raises(InvalidSignature) as excinfo:
            verify({"Stripe-Signature": header}, BODY, secrets, Stripe(), now=NOW)
        assert code_of(excinfo) == "signature_mismatch"
    else:
        message = verify({"Stripe-Signature": header}, BODY, secrets, Stripe(), now=NOW)
        assert message.secret_index == expected_index
    digests = {bytes.fromhex(_stripe_entry(secret)): secret for secret in secrets}
    compared = [(digests[a], b) for a, b in log.pairs]
    assert sorted(compared) == sorted(
        (secret, bytes.fromhex(entry)) for secret in secrets for entry in entries
    )


@pytest.mark.anyio
async def test_the_middleware_compares_every_secret_too(monkeypatch: pytest.MonkeyPatch) -> None:
    import asgi_armor.signing as signing

    log = _ComparisonLog()
    monkeypatch.setattr(signing, "hmac", log)
    routes = {"POST /hook": (Stripe(), ["new", "old", "older"])}
    headers = {"Stripe-Signature": f"t={NOW},v1={_stripe_entry('new')},v1={'0' * 64}"}
    recorder = Recorder()
    async with client_for(make(recorder, routes=routes)) as client:
        assert (await client.post("/hook", content=BODY, headers=headers)).status_code == 200
    assert len(log.pairs) == 3 * 2
    assert recorder.messages[0] is not None
    assert recorder.messages[0].secret_index == 0


# -- make mutate survivors (docs/mutation.md) ----------------------------------------------


@pytest.mark.parametrize(
    ("make_error", "message"),
    [
        (lambda: verify({}, BODY, ""), "verify: secret #0: the secret is empty"),
        (lambda: verify({}, BODY, ["s", 5]), "verify: secret #1 is not str or bytes"),
        (lambda: verify({}, BODY, []), "verify: no secret configured"),
        (
            lambda: verify({}, BODY, "s", tolerance=0),
            "verify: tolerance must be a positive number of seconds (finite), not 0",
        ),
        (
            lambda: verify({}, BODY, "whsec_YWJj!", StandardWebhooks()),
            "verify: secret #0: a whsec_ secret must be base64 after the prefix",
        ),
        (
            lambda: verify({}, BODY, "whsec_", StandardWebhooks()),
            "verify: secret #0: the secret is empty",
        ),
        (
            lambda: HexHmac(header="bad header"),
            "HexHmac.header: 'bad header' is not a valid header name",
        ),
        (
            lambda: HexHmac(timestamp_header="x y"),
            "HexHmac.timestamp_header: 'x y' is not a valid header name",
        ),
        (lambda: Stripe(header="a b"), "Stripe.header: 'a b' is not a valid header name"),
        (lambda: GitHub(header=" "), "GitHub.header: ' ' is not a valid header name"),
        (
            lambda: SignatureMiddleware(Recorder(), routes=ROUTES, tolerance=0),
            "signature tolerance: tolerance must be a positive number of seconds (finite), not 0",
        ),
        (
            lambda: SignatureMiddleware(Recorder(), routes=ROUTES, max_body_bytes=0),
            "signature max_body_bytes must be a whole number >= 1, not 0",
        ),
        (
            lambda: SignatureMiddleware(Recorder(), routes={}),
            "signature routes: at least one route is required",
        ),
    ],
)
def test_config_errors_say_exactly_what_is_wrong(
    make_error: Callable[[], object], message: str
) -> None:
    with pytest.raises(ConfigError) as excinfo:
        make_error()
    assert str(excinfo.value) == message


def test_the_smallest_settings_are_accepted() -> None:
    headers = sign(BODY, "s", HexHmac(timestamp_header="X-Timestamp"), timestamp=NOW)
    verify(headers, BODY, "s", HexHmac(timestamp_header="X-Timestamp"), tolerance=0.5, now=NOW)
    middleware = SignatureMiddleware(Recorder(), routes=ROUTES, max_body_bytes=1)
    assert (middleware.max_body_bytes, middleware.replay_protection) == (1, True)
    with pytest.raises(ValueError, match=r"^msg_id must be 1\.\.256 printable ASCII characters"):
        sign(BODY, WHSEC, StandardWebhooks(), msg_id="a b")


def test_standard_webhooks_message_ids_up_to_256_characters() -> None:
    longest = "m" * 256
    headers = sign(BODY, WHSEC, StandardWebhooks(), timestamp=NOW, msg_id=longest)
    assert set(headers) == {"webhook-id", "webhook-timestamp", "webhook-signature"}
    assert verify(headers, BODY, WHSEC, StandardWebhooks(), now=NOW).msg_id == longest
    with pytest.raises(ValueError, match="msg_id"):
        sign(BODY, WHSEC, StandardWebhooks(), msg_id=longest + "m")


def test_signing_without_a_timestamp_uses_now() -> None:
    scheme = HexHmac(timestamp_header="X-Timestamp")
    headers = sign(BODY, "s", scheme)
    assert abs(int(headers["X-Timestamp"]) - time.time()) < 60
    verify(headers, BODY, "s", scheme)


def test_the_payload_too_large_error_names_the_cap() -> None:
    with pytest.raises(PayloadTooLarge) as excinfo:
        verify(sign(BODY, "s"), BODY, "s", max_body_bytes=len(BODY) - 1)
    assert str(excinfo.value) == f"Request body exceeds {len(BODY) - 1} bytes"


@pytest.mark.parametrize(
    ("scheme", "headers", "field"),
    [
        (HexHmac(), sign(BODY, "other"), "X-Signature"),
        (GitHub(), sign(BODY, "other", GitHub()), "X-Hub-Signature-256"),
        (Stripe(), sign(BODY, "other", Stripe(), timestamp=NOW), "Stripe-Signature"),
        (
            StandardWebhooks(),
            sign(BODY, "whsec_b3RoZXI=", StandardWebhooks(), timestamp=NOW),
            "webhook-signature",
        ),
    ],
)
def test_a_mismatch_names_the_signature_header(
    scheme: Scheme, headers: dict[str, str], field: str
) -> None:
    secret = WHSEC if isinstance(scheme, StandardWebhooks) else "s"
    with pytest.raises(InvalidSignature) as excinfo:
        verify(headers, BODY, secret, scheme, now=NOW)
    assert (code_of(excinfo), excinfo.value.details[0].field) == ("signature_mismatch", field)


@pytest.mark.parametrize(
    ("scheme", "secret", "field"),
    [
        (Stripe(), "s", "Stripe-Signature"),
        (StandardWebhooks(), WHSEC, "webhook-timestamp"),
        (HexHmac(timestamp_header="X-Timestamp"), "s", "X-Timestamp"),
    ],
)
def test_a_stale_timestamp_names_the_timestamp_header(
    scheme: Scheme, secret: str, field: str
) -> None:
    headers = sign(BODY, secret, scheme, timestamp=NOW - 1000)
    with pytest.raises(InvalidSignature) as excinfo:
        verify(headers, BODY, secret, scheme, now=NOW)
    assert code_of(excinfo) == "timestamp_out_of_tolerance"
    assert excinfo.value.details[0].field == field


def test_stripe_header_item_count_bound() -> None:
    """Up to 16 signatures plus the timestamp and one more item; past that, malformed."""
    entries = [_stripe_entry("s")] + ["0" * 64] * 15
    header = f"t={NOW}," + ",".join(f"v1={entry}" for entry in entries)
    verify({"Stripe-Signature": header + ",v0=x"}, BODY, "s", Stripe(), now=NOW)
    with pytest.raises(InvalidSignature) as excinfo:
        verify({"Stripe-Signature": header + ",v0=x,v0=y"}, BODY, "s", Stripe(), now=NOW)
    assert code_of(excinfo) == "malformed_signature"


class _CustomHeaderScheme(HexHmac):
    """A user's scheme reading its headers through the Mapping interface."""

    def extract(self, headers: Any) -> ParsedSignature:
        assert "x-custom" in headers
        assert "X-CUSTOM" in headers
        assert "x-custom" in [name.lower() for name in headers]
        with pytest.raises(KeyError, match="x-absent"):
            headers["x-absent"]
        return ParsedSignature((bytes.fromhex(headers["X-Custom"]),), field="X-Custom")


def test_custom_schemes_read_headers_as_a_mapping() -> None:
    value = sign(BODY, "s")["X-Signature"]
    for headers in ({"X-Custom": value}, [(b"x-custom", value.encode())]):
        assert verify(headers, BODY, "s", _CustomHeaderScheme()).scheme == "hex-hmac"


def test_the_default_body_cap_is_one_mebibyte() -> None:
    assert SignatureMiddleware(Recorder(), routes=ROUTES).max_body_bytes == 1_048_576


@pytest.mark.anyio
async def test_non_http_scopes_pass_through_with_their_channels() -> None:
    seen: list[Message] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        seen.append(await receive())
        await send({"type": "lifespan.startup.complete"})

    async def receive() -> Message:
        return {"type": "lifespan.startup"}

    async def send(message: Message) -> None:
        seen.append(message)

    await SignatureMiddleware(app, routes=ROUTES)({"type": "lifespan"}, receive, send)
    assert seen == [{"type": "lifespan.startup"}, {"type": "lifespan.startup.complete"}]


def _signed_scope(path: str, headers: dict[str, str]) -> Scope:
    return {
        "type": "http",
        "method": "POST",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
    }


@pytest.mark.anyio
@pytest.mark.parametrize("replay_protection", [True, False])
async def test_the_app_hears_the_disconnect_after_the_replayed_body(
    replay_protection: bool,
) -> None:
    heard: list[Message] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            heard.append(message)
            if message["type"] == "http.disconnect":
                break
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    pending = [{"type": "http.request", "body": BODY, "more_body": False}]

    async def receive() -> Message:
        return pending.pop(0) if pending else {"type": "http.disconnect"}

    sent: list[Message] = []

    async def send(message: Message) -> None:
        sent.append(message)

    middleware = SignatureMiddleware(
        app, routes=ROUTES, wall_clock=lambda: float(NOW), replay_protection=replay_protection
    )
    await middleware(_signed_scope("/webhooks/hex", sign(BODY, "hex-secret")), receive, send)
    assert [m["type"] for m in heard][-1] == "http.disconnect"
    assert b"".join(m.get("body", b"") for m in heard) == BODY
    assert sent[0]["status"] == 200


@pytest.mark.anyio
async def test_an_app_that_fails_before_answering_lets_the_retry_through() -> None:
    calls = 0

    async def fails_then_works(scope: Scope, receive: Receive, send: Send) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("crashed before any response")
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    app = ErrorMiddleware(
        SignatureMiddleware(fails_then_works, routes={"POST /hook": (HexHmac(), "s")})
    )
    headers = sign(BODY, "s")
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        assert (await client.post("/hook", content=BODY, headers=headers)).status_code == 500
        assert (await client.post("/hook", content=BODY, headers=headers)).status_code == 200
        assert_signature_error(
            await client.post("/hook", content=BODY, headers=headers), "replayed"
        )


class _CheckpointingStore(MemoryStore):
    """A MemoryStore that yields to the event loop in ``forget``, as a network store does:
    in a cancelled task, an unshielded ``forget`` would be cancelled right there."""

    async def forget(self, key: str) -> None:
        import anyio.lowlevel

        await anyio.lowlevel.checkpoint()
        await super().forget(key)


@pytest.mark.anyio
async def test_a_cancelled_delivery_is_forgotten_so_the_retry_gets_through() -> None:
    """The client went away (or a timeout cancelled the handler): the message was not
    handled, so the shielded clean-up forgets it even though the request is cancelled."""
    import anyio

    started = anyio.Event()
    calls = 0

    async def hangs_first(scope: Scope, receive: Receive, send: Send) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            started.set()
            await anyio.sleep_forever()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    store = _CheckpointingStore()
    middleware = SignatureMiddleware(
        hangs_first, routes={"POST /hook": (HexHmac(), "s")}, store=store
    )
    headers = sign(BODY, "s")

    async def deliver() -> list[Message]:
        pending = [{"type": "http.request", "body": BODY, "more_body": False}]
        sent: list[Message] = []

        async def receive() -> Message:
            if pending:
                return pending.pop(0)
            await anyio.sleep_forever()
            raise AssertionError  # pragma: no cover

        async def send(message: Message) -> None:
            sent.append(message)

        await middleware(_signed_scope("/hook", headers), receive, send)
        return sent

    async with anyio.create_task_group() as tg:
        tg.start_soon(deliver)
        await started.wait()
        tg.cancel_scope.cancel()
    assert len(store) == 0, "the cancelled delivery is still remembered"
    assert (await deliver())[0]["status"] == 200


class _ForgetFails(MemoryStore):
    """Fails the first forget; the id, held meanwhile, is forgotten on the next try."""

    def __init__(self) -> None:
        super().__init__()
        self.failed = 0

    async def forget(self, key: str) -> None:
        if not self.failed:
            self.failed += 1
            raise StoreError("redis went away")
        await super().forget(key)


@pytest.mark.anyio
async def test_a_failing_forget_is_logged_and_the_answer_stands(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def fails(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 503, "headers": []})
        await send({"type": "http.response.body", "body": b"down"})

    app = ErrorMiddleware(
        SignatureMiddleware(fails, routes={"POST /hook": (HexHmac(), "s")}, store=_ForgetFails())
    )
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        with caplog.at_level("WARNING", logger="asgi_armor.signing"):
            response = await c.post("/hook", content=BODY, headers=sign(BODY, "s"))
    assert (response.status_code, response.content) == (503, b"down")
    (record,) = [r for r in caplog.records if "could not forget" in r.getMessage()]
    assert response.headers["x-request-id"] in record.getMessage()


@pytest.mark.anyio
async def test_a_failing_replay_cache_is_503_with_retry_after_one_second() -> None:
    app = ErrorMiddleware(
        SignatureMiddleware(
            Recorder(), routes={"POST /hook": (HexHmac(), "s")}, store=FailingStore()
        )
    )
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        response = await c.post("/hook", content=BODY, headers=sign(BODY, "s"))
    assert_envelope(response, 503, "service_unavailable")
    assert response.headers["retry-after"] == "1"


@pytest.mark.anyio
async def test_a_declared_oversized_body_is_413_naming_the_cap() -> None:
    app = ErrorMiddleware(
        SignatureMiddleware(Recorder(), routes={"POST /hook": (HexHmac(), "s")}, max_body_bytes=10)
    )
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        response = await c.post("/hook", content=b"x" * 11, headers=sign(b"x" * 11, "s"))
    data = assert_envelope(response, 413, "payload_too_large")
    assert data["message"] == "Request body exceeds 10 bytes"


def test_a_malformed_timestamp_names_its_header() -> None:
    scheme = HexHmac(timestamp_header="X-Timestamp")
    headers = {**sign(BODY, "s", scheme, timestamp=NOW), "X-Timestamp": "soon"}
    with pytest.raises(InvalidSignature) as excinfo:
        verify(headers, BODY, "s", scheme, now=NOW)
    assert (code_of(excinfo), excinfo.value.details[0].field) == (
        "malformed_signature",
        "X-Timestamp",
    )
    mismatched = sign(BODY, "other", scheme, timestamp=NOW)
    with pytest.raises(InvalidSignature) as excinfo:
        verify(mismatched, BODY, "s", scheme, now=NOW)
    assert excinfo.value.details[0].field == "X-Signature"


def test_header_values_are_kept_as_sent_apart_from_spaces_and_tabs() -> None:
    for msg_id in ("msg_X", "X", "msg_XX"):
        headers = sign(BODY, WHSEC, StandardWebhooks(), timestamp=NOW, msg_id=msg_id)
        headers["webhook-id"] = f" \t{msg_id}\t "
        assert verify(headers, BODY, WHSEC, StandardWebhooks(), now=NOW).msg_id == msg_id
    vertical_tab = {"X-Signature": sign(BODY, "s")["X-Signature"] + "\x0b"}
    with pytest.raises(InvalidSignature):
        verify(vertical_tab, BODY, "s")


def test_odd_raw_header_items_are_skipped_not_fatal() -> None:
    ((name, value),) = sign(BODY, "s").items()
    good = (name.lower().encode(), value.encode())
    for junk in ((b"a", b"b", b"c"), (b"only",), (5, b"x"), "ab"):
        assert verify([junk, good], BODY, "s").secret_index == 0  # type: ignore[list-item]


def test_a_value_at_the_length_cap_is_read() -> None:
    from asgi_armor.signing import MAX_HEADER_CHARS

    at_cap = "a" * MAX_HEADER_CHARS
    for headers in ({"X-Signature": at_cap}, [(b"x-signature", at_cap.encode())]):
        with pytest.raises(InvalidSignature) as excinfo:
            verify(headers, BODY, "s")  # type: ignore[arg-type]
        # Read, then refused as a wrong-length hex signature: same code, same field.
        assert (code_of(excinfo), excinfo.value.details[0].field) == (
            "malformed_signature",
            "X-Signature",
        )


def test_standard_webhooks_takes_sixteen_signatures_and_no_more() -> None:
    headers = sign(BODY, WHSEC, StandardWebhooks(), timestamp=NOW)
    others = " ".join(["v1," + base64.b64encode(b"x" * 32).decode()] * 15)
    headers["webhook-signature"] = headers["webhook-signature"] + " " + others
    verify(headers, BODY, WHSEC, StandardWebhooks(), now=NOW)
    headers["webhook-signature"] += " v1," + base64.b64encode(b"y" * 32).decode()
    with pytest.raises(InvalidSignature) as excinfo:
        verify(headers, BODY, WHSEC, StandardWebhooks(), now=NOW)
    assert code_of(excinfo) == "malformed_signature"


@pytest.mark.parametrize("entry", [",YWJj", "v1,", "v1"])
def test_standard_webhooks_entries_need_a_version_and_a_value(entry: str) -> None:
    headers = sign(BODY, WHSEC, StandardWebhooks(), timestamp=NOW)
    headers["webhook-signature"] = entry + " " + headers["webhook-signature"]
    with pytest.raises(InvalidSignature) as excinfo:
        verify(headers, BODY, WHSEC, StandardWebhooks(), now=NOW)
    assert code_of(excinfo) == "malformed_signature"


@pytest.mark.parametrize(
    "headers",
    [
        {"X-Signature": 5},
        [(b"x-signature", b"a" * 100_000)],
        [(b"x-signature", b"\xff" * 64)],
        [(b"x-signature", b"a" * 64), (b"X-Signature", b"b" * 64)],
    ],
    ids=["not-text", "oversized-bytes", "not-ascii-bytes", "repeated"],
)
def test_unreadable_header_values_name_the_header(headers: Any) -> None:
    with pytest.raises(InvalidSignature) as excinfo:
        verify(headers, BODY, "s")
    assert (code_of(excinfo), excinfo.value.details[0].field) == (
        "malformed_signature",
        "X-Signature",
    )


# -- WWW-Authenticate (RFC 9110 section 15.5.2: a 401 carries a challenge) ------------


CHALLENGES = {
    "/webhooks/hex": 'Signature scheme="hex-hmac", header="X-Signature"',
    "/webhooks/sw": 'Signature scheme="standard-webhooks", header="webhook-signature"',
    "/webhooks/stripe": 'Signature scheme="stripe", header="Stripe-Signature"',
    "/webhooks/github": 'Signature scheme="github", header="X-Hub-Signature-256"',
}


@pytest.mark.anyio
async def test_every_401_names_the_routes_scheme_in_www_authenticate() -> None:
    custom = SignedRoute(HexHmac(header="X-Acme-Sig"), "s")
    routes = {**ROUTES, "POST /webhooks/acme": custom}
    hexed = sign(BODY, "hex-secret")
    async with client_for(make(Recorder(), routes=routes)) as client:
        for path, challenge in CHALLENGES.items():
            missing = await client.post(path, content=BODY)
            assert_signature_error(missing, "missing_signature")
            assert missing.headers.get_list("www-authenticate") == [challenge]
        acme = await client.post("/webhooks/acme", content=BODY)
        assert acme.headers["www-authenticate"] == (
            'Signature scheme="hex-hmac", header="X-Acme-Sig"'
        )
        assert (await client.post("/webhooks/hex", content=BODY, headers=hexed)).status_code == 200
        replayed = await client.post("/webhooks/hex", content=BODY, headers=hexed)
        assert_signature_error(replayed, "replayed")
        assert replayed.headers["www-authenticate"] == CHALLENGES["/webhooks/hex"]
        # A 413 is not an authentication failure: no challenge.
        big = await client.post("/webhooks/hex", content=b"x" * 2_000_000, headers=hexed)
        assert big.status_code == 413
        assert "www-authenticate" not in big.headers


def test_verify_raises_with_its_schemes_challenge() -> None:
    with pytest.raises(InvalidSignature) as caught:
        verify({}, BODY, "s", GitHub())
    assert caught.value.headers == {
        "WWW-Authenticate": 'Signature scheme="github", header="X-Hub-Signature-256"'
    }
    assert InvalidSignature().headers == {"WWW-Authenticate": "Signature"}
    assert Stripe().challenge() == 'Signature scheme="stripe", header="Stripe-Signature"'


# -- an accepted delivery stays remembered; a failed one stays retryable -------------------


class FlakyNonces(MemoryStore):
    """A MemoryStore whose replay-cache calls fail while listed, as a frozen Redis's would.

    ``lost_replies`` lists calls that do their work and then fail (the command ran in the
    store; its answer never came back).
    """

    def __init__(self) -> None:
        super().__init__()
        self.failing: set[str] = set()
        self.lost_replies: set[str] = set()

    async def remember(self, key: str, ttl: float) -> bool:
        if "remember" in self.failing:
            raise StoreError("redis store call failed: TimeoutError")
        new = await super().remember(key, ttl)
        if "remember" in self.lost_replies:
            self.lost_replies.discard("remember")
            raise StoreError("redis store call failed: TimeoutError")
        return new

    async def forget(self, key: str) -> None:
        if "forget" in self.failing:
            raise StoreError("redis store call failed: TimeoutError")
        await super().forget(key)


async def deliver(
    tg: Any, app: Any, path: str, body: bytes, headers: dict[str, str]
) -> tuple[int, bytes]:
    """Start one delivery in ``tg``; return its status and body once the response is
    complete (the app's task may go on after that, as under a real server)."""
    import anyio

    status = 0
    answer = b""
    complete = anyio.Event()
    given = False

    async def receive() -> Message:
        nonlocal given
        if not given:
            given = True
            return {"type": "http.request", "body": body, "more_body": False}
        await anyio.sleep_forever()
        raise AssertionError("unreachable")

    async def send(message: Message) -> None:
        nonlocal status, answer
        if message["type"] == "http.response.start":
            status = message["status"]
        elif message["type"] == "http.response.body":
            answer += message.get("body", b"")
            if not message.get("more_body", False):
                complete.set()

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(name.lower().encode(), value.encode()) for name, value in headers.items()],
        "client": ("1.2.3.4", 123),
        "server": ("t", 80),
    }
    tg.start_soon(ErrorMiddleware(app), scope, receive, send)
    with anyio.fail_after(5):
        await complete.wait()
    return status, answer


async def settled(*middlewares: SignatureMiddleware) -> None:
    import anyio

    for _ in range(500):
        if not any(middleware.pending for middleware in middlewares):
            return
        await anyio.sleep(0.01)
    pytest.fail("message ids still held after 5 s")


def replayed(answer: tuple[int, bytes]) -> bool:
    status, body = answer
    return status == 401 and json.loads(body)["details"][0]["code"] == "replayed"


def failing_once() -> tuple[Callable[..., Any], list[int]]:
    """An app answering 500 to its first delivery and 200 after; the list counts runs."""
    runs: list[int] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        runs.append(1)
        status = 500 if len(runs) == 1 else 200
        await send({"type": "http.response.start", "status": status, "headers": []})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    return app, runs


@pytest.mark.anyio
async def test_an_accepted_delivery_stays_remembered_when_the_store_fails_open() -> None:
    import anyio

    store = FlakyNonces()
    recorder = Recorder()
    here = make(recorder, store=store, on_store_error="allow")
    elsewhere = make(recorder, store=store, on_store_error="allow")
    headers = sign(BODY, "hex-secret")
    async with anyio.create_task_group() as tg:
        store.failing = {"remember"}
        assert (await deliver(tg, here, "/webhooks/hex", BODY, headers))[0] == 200
        # Still down: this process knows of the delivery and refuses its replay.
        assert replayed(await deliver(tg, here, "/webhooks/hex", BODY, headers))
        other = sign(b'{"other": 1}', "hex-secret")
        assert (await deliver(tg, here, "/webhooks/hex", b'{"other": 1}', other))[0] == 200
        store.failing = set()
        await settled(here)
        # Remembered in the store once it answers: other processes refuse it too.
        assert replayed(await deliver(tg, elsewhere, "/webhooks/hex", BODY, headers))
    assert recorder.bodies == [BODY, b'{"other": 1}']


@pytest.mark.anyio
async def test_a_failed_delivery_stays_retryable_when_forget_fails() -> None:
    import anyio

    store = FlakyNonces()
    app, runs = failing_once()
    routes = {"POST /hook": (HexHmac(), "s")}
    here = SignatureMiddleware(app, routes=routes, store=store)
    elsewhere = SignatureMiddleware(app, routes=routes, store=store)
    body = b'{"event": 1}'
    headers = sign(body, "s", scheme=HexHmac())
    async with anyio.create_task_group() as tg:
        store.failing = {"forget"}
        assert (await deliver(tg, here, "/hook", body, headers))[0] == 500
        # The sender's retry is the genuine delivery, not a replay.
        assert (await deliver(tg, here, "/hook", body, headers))[0] == 200
        assert replayed(await deliver(tg, here, "/hook", body, headers))
        store.failing = set()
        await settled(here)
        assert replayed(await deliver(tg, elsewhere, "/hook", body, headers))
    assert len(runs) == 2


@pytest.mark.anyio
async def test_a_failed_delivery_is_forgotten_once_the_store_answers() -> None:
    import anyio

    store = FlakyNonces()
    app, runs = failing_once()
    routes = {"POST /hook": (HexHmac(), "s")}
    here = SignatureMiddleware(app, routes=routes, store=store)
    elsewhere = SignatureMiddleware(app, routes=routes, store=store)
    body = b'{"event": 2}'
    headers = sign(body, "s", scheme=HexHmac())
    async with anyio.create_task_group() as tg:
        store.failing = {"forget"}
        assert (await deliver(tg, here, "/hook", body, headers))[0] == 500
        store.failing = set()
        await settled(here)
        # The retry reaches another process: the failed delivery was forgotten there too.
        assert (await deliver(tg, elsewhere, "/hook", body, headers))[0] == 200
    assert len(runs) == 2


@pytest.mark.anyio
async def test_a_refused_delivery_whose_remember_ran_stays_retryable() -> None:
    """The store kept the id but its answer was lost: the 503'd delivery is no replay here.

    (A retry reaching another process is refused until the id expires: see
    docs/security.md, "Known limits".)
    """
    import anyio

    store = FlakyNonces()
    recorder = Recorder()
    here = make(recorder, store=store)
    elsewhere = make(recorder, store=store)
    headers = sign(BODY, "hex-secret")
    async with anyio.create_task_group() as tg:
        store.lost_replies = {"remember"}
        assert (await deliver(tg, here, "/webhooks/hex", BODY, headers))[0] == 503
        assert here.pending == 1
        assert (await deliver(tg, here, "/webhooks/hex", BODY, headers))[0] == 200
        assert here.pending == 0
        assert replayed(await deliver(tg, here, "/webhooks/hex", BODY, headers))
        assert replayed(await deliver(tg, elsewhere, "/webhooks/hex", BODY, headers))
    assert recorder.bodies == [BODY]


@pytest.mark.anyio
async def test_past_max_pending_a_delivery_the_store_misses_is_refused() -> None:
    """Fail closed: never accepted unremembered, even under "allow"."""
    import anyio

    store = FlakyNonces()
    store.failing = {"remember"}
    recorder = Recorder()
    app = make(recorder, store=store, on_store_error="allow", max_pending=0)
    async with anyio.create_task_group() as tg:
        status, _ = await deliver(tg, app, "/webhooks/hex", BODY, sign(BODY, "hex-secret"))
    assert status == 503
    assert (app.pending, app.pending_dropped) == (0, 1)
    assert recorder.bodies == []


@pytest.mark.parametrize("bound", [-1, True, 1.5])
def test_signature_max_pending_is_checked(bound: Any) -> None:
    with pytest.raises(ConfigError, match="max_pending"):
        make(Recorder(), max_pending=bound)
