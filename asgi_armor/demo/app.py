"""The demo API: the article's endpoints, written as a plain Starlette app.

The app itself only uses the primitives (``decode``, a ``CircuitBreaker``,
``gather_partial``); everything else (limits, rate limits, idempotency, timeouts,
signatures, shedding, the error envelope) comes from ``armor(app, config)`` and the
bundled ``armor.toml``.
"""

from __future__ import annotations

import itertools
import os
import secrets
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import msgspec
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from asgi_armor._asgi import ASGIApp, Scope, get_header
from asgi_armor.breaker import CircuitBreaker
from asgi_armor.config import ArmorConfig
from asgi_armor.contrib.starlette import armor_exception_handlers
from asgi_armor.degrade import gather_partial
from asgi_armor.demo.dashboard import DemoMetrics, dashboard_routes, route_patterns
from asgi_armor.demo.services import COMPONENTS, FaultBoard
from asgi_armor.errors import NotFound, Unauthorized
from asgi_armor.metrics import PrometheusMetrics, RouteLabels
from asgi_armor.protect import protect
from asgi_armor.stack import armor
from asgi_armor.validation import Email, Int, Name, Text, decode, decode_query

__all__ = [
    "DEMO_PASSWORDS",
    "DEMO_TOKENS",
    "WEBHOOK_SECRET_ENV",
    "CreateUserRequest",
    "Demo",
    "banner",
    "create_demo",
    "demo_identify",
]

BUNDLED_CONFIG = Path(__file__).with_name("armor.toml")
WEBHOOK_SECRET_ENV = "ARMOR_DEMO_WEBHOOK_SECRET"  # noqa: S105 - a variable name
DEFAULT_WEBHOOK_SECRET = "demo-webhook-secret"  # noqa: S105 - announced, demo only
DEMO_TOKENS = {"alice-token": "alice", "bob-token": "bob"}
DEMO_PASSWORDS = {"alice": "wonderland", "bob": "builder"}  # announced, demo only

_json = msgspec.json.Encoder()


class CreateUserRequest(msgspec.Struct, forbid_unknown_fields=True):
    """The article's model: every field bounded, e-mail and name normalised."""

    email: Email
    name: Name
    age: Int(ge=0, le=150) | None = None  # type: ignore[valid-type]


class PaymentRequest(msgspec.Struct, forbid_unknown_fields=True):
    """A payment: a positive amount in minor units and an ISO 4217 currency code."""

    amount: Int(gt=0, le=10**12)  # type: ignore[valid-type]
    currency: Annotated[str, msgspec.Meta(pattern="^[A-Za-z]{3}$")]


class RefundRequest(msgspec.Struct, forbid_unknown_fields=True):
    """A refund of (part of) a payment."""

    payment_id: Text(min_length=1, max_length=64)  # type: ignore[valid-type]
    amount: Int(gt=0, le=10**12)  # type: ignore[valid-type]


class LoginRequest(msgspec.Struct, forbid_unknown_fields=True):
    """``POST /api/login``: the demo credentials are alice/wonderland and bob/builder."""

    username: Text(min_length=1, max_length=64)  # type: ignore[valid-type]
    password: Text(min_length=1, max_length=256)  # type: ignore[valid-type]


class SearchQuery(msgspec.Struct, forbid_unknown_fields=True):
    """``GET /api/search?q=``."""

    q: Text(min_length=1, max_length=200)  # type: ignore[valid-type]


def demo_identify(scope: Scope) -> str | None:
    """The demo's ``identify`` hook: ``Authorization: Bearer alice-token`` is alice."""
    header = get_header(scope, b"authorization")
    if header is None or not header.startswith(b"Bearer "):
        return None
    return DEMO_TOKENS.get(header[7:].decode("latin-1").strip())


def _json_response(data: object, status: int = 200) -> Response:
    return Response(_json.encode(data), status_code=status, media_type="application/json")


class Demo:
    """The demo's state: fake services, their faults, the database breaker, the metrics.

    Args:
        clock: monotonic seconds for the database breaker (tests step it past the 30 s
            ``reset_timeout`` instead of sleeping).
    """

    def __init__(self, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.board = FaultBoard()
        self.metrics = DemoMetrics(PrometheusMetrics())
        self.db_breaker = CircuitBreaker(
            fail_max=5, reset_timeout=30.0, name="db", clock=clock, metrics=self.metrics
        )
        self._user_ids = itertools.count(1001)

    async def healthz(self, request: Request) -> Response:
        return _json_response({"status": "ok"})

    async def create_user(self, request: Request) -> Response:
        user = decode(await request.body(), CreateUserRequest)
        return _json_response({"id": next(self._user_ids), **msgspec.to_builtins(user)}, 201)

    async def expensive_operation(self, request: Request) -> Response:
        return _json_response({"ok": True})

    # Brute force: 5 failed logins per 15 minutes per address; correct ones cost nothing.
    @protect(rate_limit=[{"rate": "5/15minutes", "count": "failures", "name": "login"}])
    async def login(self, request: Request) -> Response:
        attempt = decode(await request.body(), LoginRequest)
        expected = DEMO_PASSWORDS.get(attempt.username)
        # compare_digest: the answer's timing says nothing about the password's prefix.
        if expected is None or not secrets.compare_digest(
            attempt.password.encode(), expected.encode()
        ):
            raise Unauthorized("Wrong username or password")
        token = next(t for t, user in DEMO_TOKENS.items() if user == attempt.username)
        return _json_response({"token": token})

    async def send_email(self, request: Request) -> Response:
        if demo_identify(request.scope) is None:
            raise Unauthorized("Send 'Authorization: Bearer alice-token' (or bob-token)")
        return _json_response({"queued": True}, 202)

    async def trigger_build(self, request: Request) -> Response:
        project_id = request.path_params["project_id"]
        build_id = "bld_" + secrets.token_hex(6)
        return _json_response({"build_id": build_id, "project_id": project_id}, 202)

    async def create_payment(self, request: Request) -> Response:
        payment = decode(await request.body(), PaymentRequest)
        return _json_response(
            {
                "payment_id": "pay_" + secrets.token_hex(8),
                "amount": payment.amount,
                "currency": payment.currency.upper(),
                "status": "succeeded",
            },
            201,
        )

    async def create_refund(self, request: Request) -> Response:
        refund = decode(await request.body(), RefundRequest)
        return _json_response(
            {
                "refund_id": "re_" + secrets.token_hex(8),
                "payment_id": refund.payment_id,
                "amount": refund.amount,
                "status": "succeeded",
            },
            201,
        )

    async def get_user(self, request: Request) -> Response:
        raw_id = request.path_params["user_id"]
        if not (raw_id.isascii() and raw_id.isdigit()) or len(raw_id) > 18:
            raise NotFound("No such user")
        # A database error counts against the breaker; "no such row" does not.
        user = await self.db_breaker.call(self.board.get_user, int(raw_id))
        if user is None:
            raise NotFound("No such user")
        return _json_response(user)

    async def search(self, request: Request) -> Response:
        query = decode_query(request.scope, SearchQuery)
        return _json_response({"results": await self.board.search(query.q)})

    async def dashboard(self, request: Request) -> Response:
        result = await gather_partial(
            {
                "user": (self.board.current_user, None),
                "notifications": (self.board.notifications, []),
            },
            timeout=1.0,
        )
        return _json_response(result)

    async def payment_webhook(self, request: Request) -> Response:
        # The signature layer verified these exact bytes before the route ran.
        await request.body()
        return _json_response({"received": True})

    async def set_fault(self, request: Request) -> Response:
        from asgi_armor.demo.services import Fault

        component = request.path_params["component"]
        if component not in COMPONENTS:
            raise NotFound(f"Unknown component; one of: {', '.join(COMPONENTS)}")
        fault = decode(await request.body(), Fault)
        self.board.faults[component] = fault
        return _json_response({"component": component, "mode": fault.mode, "delay": fault.delay})

    def app(self) -> Starlette:
        """The unprotected Starlette app."""
        app = Starlette(
            routes=[
                Route("/healthz", self.healthz, methods=["GET"]),
                Route("/api/users", self.create_user, methods=["POST"]),
                Route("/api/users/{user_id}", self.get_user, methods=["GET"]),
                Route("/api/login", self.login, methods=["POST"]),
                Route("/api/expensive-operation", self.expensive_operation, methods=["POST"]),
                Route("/api/send-email", self.send_email, methods=["POST"]),
                Route("/api/projects/{project_id}/builds", self.trigger_build, methods=["POST"]),
                Route("/api/payments", self.create_payment, methods=["POST"]),
                Route("/api/refunds", self.create_refund, methods=["POST"]),
                Route("/api/search", self.search, methods=["GET"]),
                Route("/api/dashboard", self.dashboard, methods=["GET"]),
                Route("/api/webhooks/payment", self.payment_webhook, methods=["POST"]),
                Route("/demo/faults/{component}", self.set_fault, methods=["PUT"]),
                *dashboard_routes(self.metrics, self.board),
            ],
            exception_handlers=armor_exception_handlers(),
        )
        self.metrics.labels = RouteLabels(route_patterns(app.routes))
        # Starlette's trailing-slash redirect decodes the raw query string as UTF-8 and
        # raises on any other byte (a 500 for "GET /api/users/?\xe0"); an unknown path is
        # simply a 404 envelope here.
        app.router.redirect_slashes = False
        return app


_BANNER = """\
asgi_armor demo: {url}  (store: {store})
live dashboard: {url}/   Prometheus metrics: {url}/metrics

  curl -i {url}/healthz
  curl -i -X POST {url}/api/users -H 'Content-Type: application/json' \\
       -d '{{"email": " Ada@Example.COM ", "name": "  Ada   Lovelace "}}'
  curl -i -X POST {url}/api/payments -H 'Idempotency-Key: order-1' \\
       -H 'Content-Type: application/json' -d '{{"amount": 1000, "currency": "eur"}}'
  curl -i -X PUT {url}/demo/faults/db -H 'Content-Type: application/json' \\
       -d '{{"mode": "fail"}}'        # then GET {url}/api/users/1 six times

webhook secret (X-Signature: hex HMAC-SHA256 of the raw body): {secret}
demo tokens: 'Authorization: Bearer alice-token' (or bob-token)
docs: `make docs` builds them into site/
"""


def _webhook_secret() -> str:
    if not os.environ.get(WEBHOOK_SECRET_ENV):
        os.environ[WEBHOOK_SECRET_ENV] = DEFAULT_WEBHOOK_SECRET
    return os.environ[WEBHOOK_SECRET_ENV]


def banner(config: ArmorConfig, host: str, port: int) -> str:
    """What ``asgi-armor demo`` prints at start-up: where it is, how to try it, the secret."""
    return _BANNER.format(url=f"http://{host}:{port}", store=config.store, secret=_webhook_secret())


def create_demo(
    *,
    config_path: str | Path | None = None,
    store: str | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> tuple[ASGIApp, ArmorConfig]:
    """The armored demo app and its config.

    The webhook secret comes from ``$ARMOR_DEMO_WEBHOOK_SECRET``, else the announced demo
    default ``demo-webhook-secret``.

    Args:
        config_path: an armor.toml replacing the bundled one.
        store: ``"memory"`` or a Redis URL, overriding the config's.
        clock: monotonic seconds for the database breaker.

    Raises:
        ConfigError: the config is invalid (the message names the entry).
    """
    _webhook_secret()
    config = ArmorConfig.from_toml(config_path or BUNDLED_CONFIG)
    if store is not None:
        config = config.with_store(store)
    demo = Demo(clock=clock)
    # One sink for the layers and the app's breaker: GET /metrics and the dashboard
    # read it (the bundled [metrics] section names the route labels).
    armored = armor(demo.app(), config, metrics=demo.metrics)
    # The config with the demo's @protect declarations (the login limit) merged in.
    return armored, armored.config
