"""``armor()``: every route-bound layer matches the request the wrapped app routes.

Frameworks route more spellings of a path than its pattern (Quart and Litestar route
``//api//x/`` and a lower-case ``post`` to ``POST /api/x``), and servers and mounts put a
``root_path`` in front of it. Each layer must see the one canonical target
(docs/architecture.md, "Request flow"), or a variant walks past it.
"""

from __future__ import annotations

from typing import Any

import anyio
import pytest

from asgi_armor import ArmorConfig, armor
from asgi_armor.config import (
    IdempotencyEntry,
    LimitsConfig,
    RateLimitEntry,
    SignatureEntry,
    TimeoutEntry,
)
from tests.reliability.reliability_helpers import call_asgi

pytestmark = pytest.mark.anyio

SECRET_ENV = "ARMOR_TEST_STACK_SECRET"


class Recorder:
    """A bare ASGI app answering 200 and recording which paths it ran for."""

    def __init__(self) -> None:
        self.ran: list[str] = []

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        self.ran.append(scope["path"])
        if "slow" in scope["path"]:
            await anyio.sleep_forever()
        while (await receive()).get("more_body", False):
            pass
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})


@pytest.fixture
def armored(monkeypatch: pytest.MonkeyPatch) -> tuple[Any, Recorder]:
    monkeypatch.setenv(SECRET_ENV, "s3cret")
    config = ArmorConfig(
        limits=LimitsConfig(json_routes=["POST /api/json"]),
        rate_limit=[RateLimitEntry(route="POST /api/limited", rate="1/minute", key="ip")],
        signature=[SignatureEntry(route="POST /api/webhook", secret_env=SECRET_ENV)],
        idempotency=[IdempotencyEntry(route="POST /api/pay")],
        timeout=[TimeoutEntry(route="POST /api/slow", seconds=0.05)],
    )
    app = Recorder()
    return armor(app, config), app


def spellings(route: str) -> list[tuple[str, str, str]]:
    """(method, path, root_path) spellings a framework may route to ``POST <route>``."""
    inner = route.replace("/api/", "/api//")
    return [
        ("POST", route, ""),
        ("post", route, ""),
        ("Post", "/" + route, ""),
        ("POST", inner, ""),
        ("POST", route + "//", ""),
        ("POST", "/svc" + route, "/svc"),
        ("post", "/svc/" + inner, "/svc"),
    ]


def request(method: str, path: str, root_path: str, **extra: Any) -> dict[str, Any]:
    return {
        "method": method,
        "path": path,
        "raw_path": path.encode(),
        "root_path": root_path,
        "query_string": b"",
        "headers": [
            (b"content-length", b"2"),
            *extra.get("headers", [(b"content-type", b"application/json")]),
        ],
        "client": ("192.0.2.7", 4711),
        "chunks": [b"{}"],
    }


@pytest.mark.parametrize(("method", "path", "root_path"), spellings("/api/webhook"))
async def test_signature_holds_for_every_spelling(
    armored: tuple[Any, Recorder], method: str, path: str, root_path: str
) -> None:
    app, recorder = armored
    status, _, body = await call_asgi(app, request(method, path, root_path))
    assert (status, recorder.ran) == (401, [])
    assert b'"invalid_signature"' in body


@pytest.mark.parametrize(("method", "path", "root_path"), spellings("/api/pay"))
async def test_idempotency_holds_for_every_spelling(
    armored: tuple[Any, Recorder], method: str, path: str, root_path: str
) -> None:
    app, recorder = armored
    status, _, body = await call_asgi(app, request(method, path, root_path))
    assert (status, recorder.ran) == (400, [])
    assert b'"idempotency_key_missing"' in body


@pytest.mark.parametrize(("method", "path", "root_path"), spellings("/api/pay"))
async def test_a_spelling_is_a_retry_of_the_canonical_request(
    armored: tuple[Any, Recorder], method: str, path: str, root_path: str
) -> None:
    app, recorder = armored
    headers = [(b"content-type", b"application/json"), (b"idempotency-key", b"k-1")]
    first = await call_asgi(app, request("POST", "/api/pay", "", headers=headers))
    again = await call_asgi(app, request(method, path, root_path, headers=headers))
    assert first[0] == again[0] == 200
    assert again[1]["idempotent-replayed"] == "true"
    assert len(recorder.ran) == 1


async def test_every_spelling_shares_the_routes_bucket(armored: tuple[Any, Recorder]) -> None:
    app, recorder = armored
    statuses = [
        (await call_asgi(app, request(method, path, root)))[0]
        for method, path, root in spellings("/api/limited")
    ]
    assert statuses == [200] + [429] * (len(statuses) - 1)
    assert len(recorder.ran) == 1


@pytest.mark.parametrize(("method", "path", "root_path"), spellings("/api/slow"))
async def test_timeout_holds_for_every_spelling(
    armored: tuple[Any, Recorder], method: str, path: str, root_path: str
) -> None:
    app, _ = armored
    status, _, body = await call_asgi(app, request(method, path, root_path))
    assert status == 504
    assert b'"timeout"' in body


@pytest.mark.parametrize(("method", "path", "root_path"), spellings("/api/json"))
async def test_json_only_routes_hold_for_every_spelling(
    armored: tuple[Any, Recorder], method: str, path: str, root_path: str
) -> None:
    app, recorder = armored
    plain = request(method, path, root_path, headers=[(b"content-type", b"text/plain")])
    status, _, body = await call_asgi(app, plain)
    assert (status, recorder.ran) == (415, [])
    assert b'"unsupported_media_type"' in body


async def test_a_root_path_that_is_not_a_prefix_is_not_removed(
    armored: tuple[Any, Recorder],
) -> None:
    app, recorder = armored
    # "/svcx/api/webhook" under root_path "/svc" is not the app's /api/webhook.
    status, _, _ = await call_asgi(app, request("POST", "/svcx/api/webhook", "/svc"))
    assert (status, recorder.ran) == (200, ["/svcx/api/webhook"])
