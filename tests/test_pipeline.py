"""The compiled pipeline (``armor()``) on its fast path: no shedding, no body timeout, so
the rate limit is decided inline, its headers added by the pipeline's one ``send`` wrapper,
and the timeout called with the pipeline's own progress tracking (docs/architecture.md,
"Request flow"). ``test_facades.py`` compares the demo's stack, which takes the composed
path (shedding, a body timeout); this module compares the seed's stack, which does not.

Every answer must match the same classes composed by hand, byte for byte (request ids and
the wall-clock reset aside), and the per-request caches must stay bounded whatever paths
and addresses clients invent.
"""

from __future__ import annotations

from typing import Any

import anyio
import httpx
import pytest

from asgi_armor import (
    ArmorConfig,
    ConfigError,
    ErrorMiddleware,
    InputLimits,
    MemoryStore,
    RateLimitMiddleware,
    Rule,
    TimeoutMiddleware,
    armor,
)
from asgi_armor._asgi import read_body
from asgi_armor.clientip import ClientIP
from tests.reliability.reliability_helpers import call_asgi

pytestmark = pytest.mark.anyio

BUILDS = "POST /api/projects/{project_id}/builds"
BUDGET = 0.2


def identify(scope: Any) -> str | None:
    for name, value in scope["headers"]:
        if name == b"authorization" and value.startswith(b"Bearer "):
            return value[7:].decode()
    return None


async def app(scope: Any, receive: Any, send: Any) -> None:
    """Builds (202), a slow search, a failing route, one that fails mid-response."""
    path = scope["path"]
    await read_body(receive, 1 << 20)
    if path == "/api/search":
        await anyio.sleep(10 * BUDGET)
    if path == "/api/boom":
        raise RuntimeError("secret detail")
    await send(
        {
            "type": "http.response.start",
            "status": 202,
            "headers": [(b"content-type", b"application/json"), (b"x-request-id", b"app")],
        }
    )
    if path == "/api/half":
        await send({"type": "http.response.body", "body": b"{", "more_body": True})
        raise RuntimeError("after the start")
    await send({"type": "http.response.body", "body": b'{"ok": true}'})


CONFIG = {
    "limits": {"max_body_bytes": 64, "json_routes": ["POST /api/*"]},
    "rate_limit": [
        {"name": "ip", "route": "* /api/*", "rate": "6/minute", "key": "ip"},
        {"name": "builds-ip", "route": BUILDS, "rate": "5/minute", "key": "ip"},
        {"name": "user", "route": "POST /api/*", "rate": "4/minute", "key": "user"},
        {"name": "builds", "route": BUILDS, "rate": "3/minute", "key": "path:project_id"},
    ],
    "rate_limit_exempt": ["GET /healthz"],
    "timeout": [{"route": "* /api/*", "seconds": BUDGET}],
}


def by_hand() -> Any:
    """``CONFIG`` written out with the public classes in the canonical order."""
    layered: Any = TimeoutMiddleware(app, routes=[("* /api/*", BUDGET)])
    layered = RateLimitMiddleware(
        layered,
        rules=[
            Rule("* /api/*", "6/minute", "ip", name="ip"),
            Rule(BUILDS, "5/minute", "ip", name="builds-ip"),
            Rule("POST /api/*", "4/minute", "user", name="user"),
            Rule(BUILDS, "3/minute", "path:project_id", name="builds"),
        ],
        store=MemoryStore(),
        identify=identify,
        client_ip=ClientIP([]),
        exempt=["GET /healthz"],
    )
    layered = InputLimits(layered, max_body_bytes=64, json_routes=["POST /api/*"])
    return ErrorMiddleware(layered)


JSON = {"content-type": "application/json"}
ALICE = {**JSON, "authorization": "Bearer alice"}
BOB = {**JSON, "authorization": "Bearer bob"}

# (method, path, headers, body, times): every kind of answer of the fast path.
REQUESTS: list[tuple[str, str, dict[str, str], bytes, int]] = [
    ("GET", "/healthz", {}, b"", 1),
    ("POST", "/api/projects/p1/builds", ALICE, b"{}", 4),  # the path bucket runs out
    ("POST", "/api/projects/p2/builds", BOB, b"{}", 3),  # the address's "builds-ip" runs out
    ("POST", "/api/other", {"content-type": "text/plain"}, b"hi", 1),  # 415
    ("POST", "/api/other", JSON, b"x" * 65, 1),  # 413 from Content-Length
    ("GET", "/api/" + "x" * 9000, {}, b"", 1),  # 414
]

SLOW: list[tuple[str, str, dict[str, str], bytes, int]] = [
    ("GET", "/api/search", {}, b"", 1),  # 504
    ("GET", "/api/boom", {}, b"", 1),  # 500, nothing leaked
    ("POST", "/api/half", JSON, b"{}", 1),  # aborted mid-response
]

_VOLATILE = {b"x-request-id", b"x-ratelimit-reset"}


def _normal(response: httpx.Response) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    # Volatile values masked in place: the order of the fields is compared too.
    headers = [
        (k.lower(), b"<volatile>" if k.lower() in _VOLATILE else v) for k, v in response.headers.raw
    ]
    body = response.content
    if b'"request_id"' in body:
        body = body[: body.index(b'"request_id"')]
    return response.status_code, headers, body


async def answers(
    target: Any, requests: list[tuple[str, str, dict[str, str], bytes, int]]
) -> list[Any]:
    found: list[Any] = []
    transport = httpx.ASGITransport(app=target, client=("198.51.100.7", 50000))
    async with httpx.AsyncClient(transport=transport, base_url="http://api") as client:
        for method, path, headers, body, times in requests:
            for _ in range(times):
                try:
                    response = await client.request(method, path, headers=headers, content=body)
                except RuntimeError as exc:
                    # An aborted response: the exception reaches the server.
                    found.append(("aborted", str(exc)))
                    continue
                found.append(_normal(response))
                assert response.headers["x-request-id"] != "app"
    return found


async def test_the_seed_stack_answers_like_the_hand_composed_classes() -> None:
    armored = armor(app, ArmorConfig.from_dict(CONFIG), identify=identify)
    ours, theirs = await answers(armored, REQUESTS), await answers(by_hand(), REQUESTS)
    assert [answer[0] for answer in ours] == [202, 202, 202, 202, 429, 202, 202, 429, 415, 413, 414]
    assert ours == theirs
    # The fast path: the pipeline decides the rate limit itself, the timeout is its only layer.
    plan = armored._plans["POST", "/api/projects/p1/builds"]
    assert plan.rate is not None
    assert plan.budget == BUDGET


async def test_timeouts_and_failures_answer_like_the_hand_composed_classes() -> None:
    armored = armor(app, ArmorConfig.from_dict(CONFIG), identify=identify)
    ours, theirs = await answers(armored, SLOW), await answers(by_hand(), SLOW)
    assert [answer[0] for answer in ours] == [504, 500, "aborted"]
    assert b"secret" not in ours[1][2]
    assert ours == theirs


async def test_a_streamed_body_is_counted_and_its_rejection_carries_no_rate_headers() -> None:
    # HTTP/2 (or chunked) bodies are counted as they stream: the guarded path, whose 413
    # is InputLimits' own, as when the classes are composed.
    request = {
        "method": "POST",
        "path": "/api/projects/p9/builds",
        "raw_path": b"/api/projects/p9/builds",
        "query_string": b"",
        "headers": [(b"content-type", b"application/json"), (b"transfer-encoding", b"chunked")],
        "client": ("203.0.113.9", 4000),
        "chunks": [b"{" + b" " * 40, b" " * 40 + b"}"],
    }
    armored = armor(app, ArmorConfig.from_dict(CONFIG), identify=identify)
    ours = await call_asgi(armored, request)
    theirs = await call_asgi(by_hand(), request)
    assert ours[0] == theirs[0] == 413
    for found in (ours, theirs):
        assert "ratelimit" not in found[1]
        assert found[1]["x-request-id"].startswith("req_")


async def test_plans_and_bucket_keys_stay_bounded_and_exact_per_caller() -> None:
    config = ArmorConfig.from_dict(
        {"rate_limit": [{"name": "ip", "route": "* /api/*", "rate": "2/minute", "key": "ip"}]}
    )
    armored = armor(app, config)
    rate_limit = armored._rate_limit
    assert rate_limit is not None
    statuses: dict[str, list[int]] = {}
    for index in range(5000):
        address = f"10.{index // 65536}.{index // 256 % 256}.{index % 256}"
        request = {
            "method": "GET",
            "path": f"/api/items/{index % 1500}",
            "raw_path": b"/api/items/x",
            "query_string": b"",
            "headers": [],
            "client": (address, 4000),
            "chunks": [b""],
        }
        for _ in range(3 if index % 1000 == 0 else 1):
            status = (await call_asgi(armored, request))[0]
            statuses.setdefault(address, []).append(status)
    assert len(armored._plans) <= 1024
    assert len(rate_limit._keys) <= 4096
    # Every caller has its own bucket, cached or not: the third request is the one refused.
    assert all(found == [202, 202, 429] for found in statuses.values() if len(found) == 3)
    assert all(found == [202] for found in statuses.values() if len(found) == 1)


async def test_a_route_without_protections_costs_no_check() -> None:
    armored = armor(app, ArmorConfig.from_dict(CONFIG), identify=identify)
    sent = await call_asgi(
        armored,
        {
            "method": "GET",
            "path": "/healthz",
            "raw_path": b"/healthz",
            "query_string": b"",
            "headers": [],
            "client": ("203.0.113.1", 1),
            "chunks": [b""],
        },
    )
    assert sent[0] == 202
    plan = armored._plans["GET", "/healthz"]
    assert (plan.rate, plan.run, plan.budget) == (None, None, None)
    assert plan.app is app


RATE_FIELDS = {
    "all": {"x-ratelimit-limit", "x-ratelimit-remaining", "x-ratelimit-reset"}
    | {"ratelimit", "ratelimit-policy"},
    "ietf": {"ratelimit", "ratelimit-policy"},
    "legacy": {"x-ratelimit-limit", "x-ratelimit-remaining", "x-ratelimit-reset"},
    "none": set(),
}


@pytest.mark.parametrize("which", list(RATE_FIELDS))
async def test_rate_limit_headers_choose_the_fields_sent(which: str) -> None:
    config = ArmorConfig.from_dict(
        {
            "rate_limit": [{"name": "ip", "route": "* /api/*", "rate": "1/minute"}],
            "rate_limit_headers": which,
        }
    )
    transport = httpx.ASGITransport(app=armor(app, config), client=("203.0.113.4", 1))
    async with httpx.AsyncClient(transport=transport, base_url="http://api") as client:
        allowed = await client.get("/api/x")
        refused = await client.get("/api/x")
    assert (allowed.status_code, refused.status_code) == (202, 429)
    for response in (allowed, refused):
        sent = {name for name in response.headers if "ratelimit" in name}
        assert sent == RATE_FIELDS[which]
    assert refused.headers["retry-after"] == "60"


def test_an_unknown_header_set_names_the_entry() -> None:
    with pytest.raises(ConfigError, match="rate_limit_headers"):
        ArmorConfig.from_dict({"rate_limit_headers": "draft"})
    with pytest.raises(ConfigError, match="headers: 'draft'"):
        RateLimitMiddleware(app, rules=[], headers="draft")  # type: ignore[arg-type]


def _get(path: str, address: str = "203.0.113.8") -> dict[str, Any]:
    return {
        "method": "GET",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "headers": [],
        "client": (address, 1),
        "chunks": [b""],
    }


async def test_each_route_keeps_its_own_bucket_for_the_same_caller() -> None:
    # Plans of address-keyed rules share the per-caller key cache: it is keyed by the
    # rules the plan holds, so two routes' rules never swap their buckets.
    config = ArmorConfig.from_dict(
        {
            "rate_limit": [
                {"name": "a", "route": "GET /api/a", "rate": "1/minute"},
                {"name": "b", "route": "GET /api/b", "rate": "1/minute"},
            ]
        }
    )
    armored = armor(app, config)
    statuses = [(await call_asgi(armored, _get(path)))[0] for path in ("/api/a", "/api/b")]
    statuses += [(await call_asgi(armored, _get(path)))[0] for path in ("/api/a", "/api/b")]
    assert statuses == [202, 202, 429, 429]


async def test_a_long_path_reuses_its_callers_keys() -> None:
    # Paths over 256 characters are planned anew each time; their callers' keys are not.
    config = ArmorConfig.from_dict(
        {"rate_limit": [{"name": "ip", "route": "* /api/*", "rate": "1000/minute"}]}
    )
    armored = armor(app, config)
    rate_limit = armored._rate_limit
    assert rate_limit is not None
    path = "/api/" + "x" * 300
    for _ in range(50):
        assert (await call_asgi(armored, _get(path)))[0] == 202
    assert len(armored._plans) == 0
    assert len(rate_limit._keys) == 1


async def test_request_metrics_record_the_status_the_client_got_like_the_classes() -> None:
    from asgi_armor.metrics import Metrics, RequestMetrics

    class Statuses(Metrics):
        def __init__(self) -> None:
            super().__init__()
            self.seen: list[int] = []

        def request(self, method: str, route: str, status: int, seconds: float) -> None:
            self.seen.append(status)

    ours, theirs = Statuses(), Statuses()
    armored = armor(app, ArmorConfig.from_dict(CONFIG), identify=identify, metrics=ours)
    composed = RequestMetrics(by_hand(), metrics=theirs)
    for target in (armored, composed):
        transport = httpx.ASGITransport(app=target, client=("198.51.100.9", 1))
        async with httpx.AsyncClient(transport=transport, base_url="http://api") as client:
            with pytest.raises(RuntimeError):
                await client.post("/api/half", headers=JSON, content=b"{}")  # 202, then fails
            await client.get("/api/boom")  # 500
            await client.post("/api/other", headers={"content-type": "text/plain"}, content=b"x")
    assert ours.seen == theirs.seen == [202, 500, 415]
