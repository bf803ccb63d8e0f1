"""The apps the macro benchmark serves under uvicorn: ``uvicorn apps:create --factory``.

A demo-like API (health check, users, builds, payments) written twice, as a pure ASGI app
and as a Starlette app. The benchmarked request is the demo's
``POST /api/projects/{project_id}/builds`` with a small JSON body and a bearer token, which
every one of the four rate-limit rules matches:

* ``ip``: every ``/api/*`` route, per client address;
* ``builds-ip``: the builds route, per client address;
* ``user``: every ``POST /api/*``, per user (from the bearer token);
* ``builds``: the builds route, per ``project_id``.

Limits are far above what a run can send, so nothing is denied (the run checks that every
answer is a 202). The environment chooses the variant:

* ``BENCH_APP``: ``asgi`` or ``starlette``;
* ``BENCH_VARIANT``: ``bare``, ``armor`` (ErrorMiddleware, InputLimits, the four rules,
  a timeout), ``metrics`` (the same stack reporting to a ``PrometheusMetrics`` sink),
  ``armor-ietf`` (the same stack sending the IETF rate-limit fields only), ``headers``
  (the app adding only the response fields the stack adds) or ``slowapi`` (the
  same four limits with slowapi, Starlette only);
* ``BENCH_STORE``: ``memory`` or a ``redis://`` URL; ``BENCH_PREFIX``: the Redis key prefix.
"""

from __future__ import annotations

import itertools
import os
from typing import Any

import msgspec

__all__ = ["RATE", "create"]

RATE = "100000000/minute"  # never reached by a 10 s run: nothing is denied
TOKENS = {"alice-token": "alice", "bob-token": "bob"}


class BuildRequest(msgspec.Struct):
    """The builds route's body."""

    branch: str = "main"


_decode_build = msgspec.json.Decoder(BuildRequest).decode
_encode = msgspec.json.Encoder().encode
_ids = itertools.count(1)


def identify(scope: Any) -> str | None:
    """``Authorization: Bearer alice-token`` is alice (the demo's hook)."""
    for name, value in scope["headers"]:
        if name == b"authorization":
            if value.startswith(b"Bearer "):
                return TOKENS.get(value[7:].decode("latin-1"))
            return None
    return None


def build_body(project_id: str, body: bytes) -> bytes:
    """What the builds route answers (the same bytes in every variant)."""
    request = _decode_build(body) if body else BuildRequest()
    return _encode(
        {"build_id": f"bld_{next(_ids)}", "project_id": project_id, "branch": request.branch}
    )


# --------------------------------------------------------------------------------------
# Pure ASGI
# --------------------------------------------------------------------------------------

_JSON = [(b"content-type", b"application/json")]


async def _read_body(receive: Any) -> bytes:
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body", False):
            return body


async def _respond(send: Any, status: int, body: bytes) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [*_JSON, (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def asgi_app(scope: Any, receive: Any, send: Any) -> None:
    """The demo-like API as one plain ASGI callable."""
    if scope["type"] != "http":
        return
    method, path = scope["method"], scope["path"]
    if path == "/healthz":
        await _respond(send, 200, b'{"status":"ok"}')
        return
    parts = path.split("/")
    if (
        method == "POST"
        and len(parts) == 5
        and parts[1:3] == ["api", "projects"]
        and parts[4] == "builds"
    ):
        body = await _read_body(receive)
        await _respond(send, 202, build_body(parts[3], body))
        return
    if method == "POST" and path == "/api/users":
        body = await _read_body(receive)
        await _respond(send, 201, body)
        return
    await _respond(send, 404, b'{"error":"not_found"}')


# --------------------------------------------------------------------------------------
# Starlette
# --------------------------------------------------------------------------------------


def starlette_app(decorate: Any = None) -> Any:
    """The same API on Starlette; ``decorate`` wraps the builds endpoint (slowapi)."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import Route

    async def healthz(request: Request) -> Response:
        return Response(b'{"status":"ok"}', media_type="application/json")

    async def create_user(request: Request) -> Response:
        return Response(await request.body(), status_code=201, media_type="application/json")

    async def trigger_build(request: Request) -> Response:
        body = build_body(request.path_params["project_id"], await request.body())
        return Response(body, status_code=202, media_type="application/json")

    if decorate is not None:
        trigger_build = decorate(trigger_build)

    return Starlette(
        routes=[
            Route("/healthz", healthz, methods=["GET"]),
            Route("/api/users", create_user, methods=["POST"]),
            Route("/api/projects/{project_id}/builds", trigger_build, methods=["POST"]),
        ]
    )


# --------------------------------------------------------------------------------------
# The protections
# --------------------------------------------------------------------------------------


_BUILDS = "POST /api/projects/{project_id}/builds"
# The four rate-limit rules of the served stack.
_RULES = [
    {"name": "ip", "route": "* /api/*", "rate": RATE, "key": "ip"},
    {"name": "builds-ip", "route": _BUILDS, "rate": RATE, "key": "ip"},
    {"name": "user", "route": "POST /api/*", "rate": RATE, "key": "user"},
    {"name": "builds", "route": _BUILDS, "rate": RATE, "key": "path:project_id"},
]


def armor_config(store: str, prefix: str) -> Any:
    """The full stack: errors, input limits, four rate-limit rules, a timeout."""
    from asgi_armor import ArmorConfig

    return ArmorConfig.from_dict(armor_settings(store, prefix))


def armor_settings(store: str, prefix: str) -> dict[str, Any]:
    """``armor_config``'s settings, as the dict an armor.toml would load to."""
    return {
        "store": store,
        "store_prefix": prefix,
        "limits": {"max_body_bytes": 65_536, "json_routes": ["POST /api/*"]},
        "rate_limit": [dict(rule) for rule in _RULES],
        "rate_limit_exempt": ["GET /healthz"],
        "timeout": []
        if os.environ.get("BENCH_NO_TIMEOUT")
        else [{"route": "* /api/*", "seconds": 5}],
    }


def with_slowapi(store: str, prefix: str) -> Any:
    """The Starlette app with slowapi: the same four limits, memory or Redis storage."""
    from slowapi import Limiter, _rate_limit_exceeded_handler
    from slowapi.errors import RateLimitExceeded
    from slowapi.middleware import SlowAPIASGIMiddleware
    from slowapi.util import get_remote_address
    from starlette.requests import Request

    def user_key(request: Request) -> str:
        who = identify(request.scope)
        return "u:" + who if who is not None else "ip:" + get_remote_address(request)

    def project_key(request: Request) -> str:
        return str(request.path_params.get("project_id", ""))

    limiter = Limiter(
        key_func=get_remote_address,
        storage_uri="memory://" if store == "memory" else store,
        key_prefix=prefix,
    )

    def decorate(endpoint: Any) -> Any:
        # slowapi's application_limits are not applied to routes that have their own
        # limits, so the "ip" rule of every /api/* route is a shared limit (one bucket per
        # address across the routes that carry it), as its docs suggest.
        endpoint = limiter.limit(RATE, key_func=project_key)(endpoint)  # builds
        endpoint = limiter.limit(RATE, key_func=user_key)(endpoint)  # user
        endpoint = limiter.limit(RATE)(endpoint)  # builds-ip
        return limiter.shared_limit(RATE, scope="api-ip")(endpoint)  # ip

    app = starlette_app(decorate)
    app.state.limiter = limiter
    app.add_exception_handler(RateLimitExceeded, _rate_limit_exceeded_handler)
    app.add_middleware(SlowAPIASGIMiddleware)
    return app


def with_armor_headers(app: Any) -> Any:
    """``app`` sending the response fields the armored stack adds (the request id and the
    five rate-limit fields, values of the same length), and nothing else: what writing
    them costs the server."""
    from asgi_armor import Rule
    from asgi_armor.ratelimit import headers as h

    rules = [Rule(e["route"], e["rate"], e["key"], name=e["name"]) for e in _RULES]
    policy = ", ".join(h.policy_item(rule.name, rule.rate) for rule in rules).encode()
    depth = rules[0].rate.capacity
    added = h.fields(str(depth).encode(), depth - 1, 0.0, 1.8e9, policy, b'"builds"')
    added.append((b"x-request-id", b"req_" + b"0" * 20))

    async def armored_headers(scope: Any, receive: Any, send: Any) -> None:
        async def send_with_headers(message: Any) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", ()), *added]
            await send(message)

        await app(scope, receive, send_with_headers)

    return armored_headers


def create() -> Any:
    """The ASGI app the environment asks for (uvicorn ``--factory``)."""
    kind = os.environ.get("BENCH_APP", "asgi")
    variant = os.environ.get("BENCH_VARIANT", "bare")
    store = os.environ.get("BENCH_STORE", "memory")
    prefix = os.environ.get("BENCH_PREFIX", "bench:")
    if variant == "slowapi":
        if kind != "starlette":
            raise SystemExit("slowapi needs BENCH_APP=starlette")
        return with_slowapi(store, prefix)
    app = asgi_app if kind == "asgi" else starlette_app()
    if variant == "bare":
        return app
    if variant == "armor":
        from asgi_armor import armor

        return armor(app, armor_config(store, prefix), identify=identify)
    if variant == "armor-ietf":
        from asgi_armor import ArmorConfig, armor

        settings = {**armor_settings(store, prefix), "rate_limit_headers": "ietf"}
        return armor(app, ArmorConfig.from_dict(settings), identify=identify)
    if variant == "metrics":
        from asgi_armor import PrometheusMetrics, armor

        return armor(
            app, armor_config(store, prefix), identify=identify, metrics=PrometheusMetrics()
        )
    if variant == "headers":
        return with_armor_headers(app)
    raise SystemExit(f"unknown BENCH_VARIANT {variant!r}")
