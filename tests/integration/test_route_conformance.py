"""Every request a framework routes to a protected handler gets that handler's protection.

Route patterns match the path the wrapped app routes on (docs/architecture.md, "Request
flow", canonical target): ``scope["path"]`` without ``scope["root_path"]`` when it is a
prefix, repeated ``/`` collapsed, methods compared upper-case. This suite checks the
property, not the rules: for Starlette, FastAPI, Quart and Litestar (``frameworks_apps``),
for each protected route kind (a signed webhook, an idempotent payment, a rate-limited
list, a route with a time budget) and each request variant (path forms x method spellings):

1. the variant is sent to the app *without* armor, and the handler's call counter says
   whether the framework routed it there (nothing here says which variants a framework
   routes: it is measured, and recorded in docs/frameworks.md, "Which paths a protection
   covers", which ``test_docs_table_matches_the_frameworks`` keeps true);
2. the same variant is sent to the armored app: when the framework routes it, the
   protection answers (unsigned: 401 ``invalid_signature``; no ``Idempotency-Key``: 400
   ``idempotency_key_missing``, and the variant replays the canonical request's record; over
   the limit: 429 ``rate_limited`` in the canonical route's bucket; over budget: 504
   ``timeout``); when it does not, the handler still does not run.

Each variant goes through several transports, because what reaches the app depends on the
server: an in-process ASGI call (the scope built from the request target the way uvicorn's
h11 protocol builds it; httpx would already drop dot segments and fragments), the same with
a ``root_path`` that does not prefix ``path`` (left alone, as Starlette does), inside a
Starlette ``Mount("/v1", ...)``, and a real uvicorn with h11 and with httptools (raw
sockets: the request line is exactly the variant), and with h11 under ``--root-path /svc``.
The patterns in the config never mention ``/svc`` or ``/v1``.

The bare and the armored app are served side by side by one dispatcher (the
``x-conform-app`` header picks one), so each (transport, framework) needs one server.
"""

from __future__ import annotations

import contextlib
import http.client
import socket
import time
import tomllib
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import anyio
import anyio.from_thread
import msgspec
import pytest
from starlette.applications import Starlette
from starlette.routing import Mount

from asgi_armor import ArmorConfig, armor
from asgi_armor._asgi import Message, Receive, Scope, Send
from tests.integration.conftest import running_server
from tests.integration.frameworks_apps import BUILDERS, Service

FRAMEWORKS = ("starlette", "fastapi", "quart", "litestar")
SECRET_ENV = "ARMOR_CONFORMANCE_WEBHOOK_SECRET"
ROOT = "/svc"
MOUNT = "/v1"
RATE = 2
BUDGET = 0.02
TIMEOUT = 10.0
DOCS = Path(__file__).resolve().parents[2] / "docs" / "frameworks.md"

CONFIG = f"""
store = "memory"

[[rate_limit]]
route = "GET /api/items"
rate = "{RATE}/minute"
key = "header:X-Client"

[[idempotency]]
route = "POST /api/payments"

[[timeout]]
route = "GET /api/slow"
seconds = {BUDGET}

[[signature]]
route = "POST /api/webhook"
scheme = "hex-hmac"
header = "X-Signature"
secret_env = "{SECRET_ENV}"
"""


@dataclass(frozen=True)
class Kind:
    """A protected route: its handler (also its ``Service.calls`` key) and method spellings."""

    name: str
    handler: str
    methods: tuple[str, ...]

    @property
    def canonical_method(self) -> str:
        return self.methods[0]


KINDS = {
    kind.name: kind
    for kind in (
        Kind("signature", "webhook", ("POST", "post", "Post")),
        Kind("idempotency", "payments", ("POST", "post", "Post")),
        Kind("rate_limit", "items", ("GET", "get", "Get", "HEAD")),
        Kind("timeout", "slow", ("GET", "get", "Get", "HEAD")),
    )
}

#: Path forms of ``/api/<handler>``; ``{x}`` is the handler's name, ``{px}`` the same with its
#: first letter percent-encoded. Shown with the handler named ``x`` (``/api/%78``).
FORMS = (
    "/api/{x}",
    "//api/{x}",
    "/api//{x}",
    "/api/{x}/",
    "/api/{x}//",
    "///api///{x}",
    "/api/{px}",
    "/api%2F{x}",
    "/%2Fapi/{x}",
    "/api/{x}%2F",
    "/api/./{x}",
    "/api/../api/{x}",
    "/api/{x}/.",
    "/API/{x}",
    "/api/{x}?",
    "/api/{x}#top",
    "/api/{x};v=1",
    "http://127.0.0.1/api/{x}",
)
CANONICAL = FORMS[0]
ABSOLUTE = FORMS[-1]


def render(form: str, handler: str) -> str:
    """The path form for ``handler``."""
    return form.format(x=handler, px=f"%{ord(handler[0]):02X}{handler[1:]}")


def shown(form: str) -> str:
    """The path form as tests ids and the docs show it."""
    return render(form, "x")


# --------------------------------------------------------------------------- transports


@dataclass(frozen=True)
class Transport:
    """How a request target reaches the app.

    ``server`` is ``None`` for an in-process call, else uvicorn's ``http`` implementation.
    ``root_path`` is, in-process, the scope's ``root_path`` with ``path`` left as the client
    wrote it (a server that sets one without prefixing the path); under uvicorn, its
    ``--root-path`` (uvicorn prefixes ``path`` with it). ``mount`` serves the app inside a
    Starlette ``Mount`` and puts the mount's path before the client's path.
    """

    name: str
    server: str | None = None
    root_path: str = ""
    mount: bool = False


TRANSPORTS = {
    t.name: t
    for t in (
        Transport("asgi"),
        Transport("asgi-root-not-prefix", root_path=ROOT),
        Transport("asgi-mount", mount=True),
        Transport("h11", server="h11"),
        Transport("httptools", server="httptools"),
        Transport("h11-root", server="h11", root_path=ROOT),
    )
}


@dataclass
class Answer:
    """A response: status, headers (lower-case names; the last value wins) and body."""

    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> dict[str, Any]:
        data = msgspec.json.decode(self.body)
        assert isinstance(data, dict), self.body
        return data

    def __str__(self) -> str:
        return f"{self.status} {self.body[:200]!r}"


def dispatcher(bare: Any, armored: Any) -> Any:
    """One ASGI app serving both: ``x-conform-app: armored`` picks the armored one."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        chosen = bare
        if scope["type"] == "http" and (b"x-conform-app", b"armored") in scope["headers"]:
            chosen = armored
        await chosen(scope, receive, send)

    return app


def client_target(transport: Transport, target: str) -> str:
    """The request target the client writes (a Mount's path goes before the app's path)."""
    if not transport.mount:
        return target
    if target.startswith("http://"):
        scheme_host, _, rest = target.partition("/api")
        return f"{scheme_host}{MOUNT}/api{rest}"
    return MOUNT + target


def asgi_scope(
    transport: Transport, method: str, target: str, headers: list[tuple[str, str]]
) -> Scope:
    """The scope uvicorn's h11 protocol builds for ``method target`` (plus a root_path)."""
    raw_path, _, query = target.encode("ascii").partition(b"?")
    path = unquote(raw_path.decode("ascii"))
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": raw_path,
        "query_string": query,
        "root_path": transport.root_path,
        "headers": [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 80),
        "state": {},
    }


async def call_asgi(app: Any, scope: Scope, body: bytes) -> Answer:
    """Run one request through ``app`` in-process."""
    pending = [{"type": "http.request", "body": body, "more_body": False}]
    done = anyio.Event()
    start: list[Message] = []
    chunks: list[bytes] = []

    async def receive() -> Message:
        if pending:
            return pending.pop()
        await done.wait()
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        if message["type"] == "http.response.start":
            start.append(message)
        elif message["type"] == "http.response.body":
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                done.set()

    with anyio.fail_after(TIMEOUT):
        await app(scope, receive, send)
    assert start, "the app returned without a response"
    headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in start[0]["headers"]}
    return Answer(start[0]["status"], headers, b"".join(chunks))


def call_socket(
    port: int, method: str, target: str, headers: list[tuple[str, str]], body: bytes
) -> Answer:
    """One request over a fresh connection; the request line is exactly ``method target``."""
    lines = [f"{method} {target} HTTP/1.1", f"Host: 127.0.0.1:{port}"]
    lines += [f"{name}: {value}" for name, value in headers]
    lines += [f"Content-Length: {len(body)}", "Connection: close", "", ""]
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as sock:
        sock.sendall("\r\n".join(lines).encode("latin-1") + body)
        response = http.client.HTTPResponse(sock, method=method.upper())
        response.begin()
        data = response.read()
        names = {name.lower(): value for name, value in response.getheaders()}
        return Answer(response.status, names, data)


# --------------------------------------------------------------------------- harness


@dataclass
class Outcome:
    """What the bare app did with a variant: its status, and whether the handler ran."""

    status: int
    routed: bool

    def __str__(self) -> str:
        return "handler" if self.routed else str(self.status)


#: (transport, framework, kind, form, method) -> what the bare framework did.
ROUTED: dict[tuple[str, str, str, str, str], Outcome] = {}


@dataclass
class Harness:
    """One framework, bare and armored, reachable through one transport."""

    transport: Transport
    framework: str
    bare: Service
    armored: Service
    send: Callable[[str, str, list[tuple[str, str]], bytes], Answer]
    probed: dict[tuple[str, str, str], Outcome] = field(default_factory=dict)

    def request(
        self,
        app: str,
        method: str,
        target: str,
        headers: list[tuple[str, str]] | None = None,
        body: bytes = b"",
    ) -> Answer:
        """Send ``method target`` to the ``"bare"`` or ``"armored"`` app."""
        headers = [*(headers or []), ("x-conform-app", app)]
        return self.send(method, client_target(self.transport, target), headers, body)

    def probe(self, kind: Kind, form: str, method: str) -> Outcome:
        """Whether the framework, without armor, routes the variant to ``kind``'s handler."""
        key = (kind.name, form, method)
        if key not in self.probed:
            before = self.bare.calls[kind.handler]
            answer = self.request("bare", method, render(form, kind.handler), *request_for(kind))
            outcome = Outcome(answer.status, self.bare.calls[kind.handler] > before)
            self.probed[key] = outcome
            ROUTED[(self.transport.name, self.framework, *key)] = outcome
        return self.probed[key]


def request_for(kind: Kind) -> tuple[list[tuple[str, str]], bytes]:
    """Headers and body of a request the handler accepts (minus the protection's part)."""
    if kind.name == "idempotency":
        return [("content-type", "application/json")], b'{"amount": 100}'
    if kind.name == "signature":
        return [("content-type", "application/json")], b'{"event": "payment.succeeded"}'
    return [], b""


@contextlib.contextmanager
def open_harness(transport_name: str, framework: str) -> Iterator[Harness]:
    """Build the bare and the armored app and serve them through the transport."""
    transport = TRANSPORTS[transport_name]
    bare, armored = Service(), Service()
    # Probing the slow route must not wait for it; the armored one outlasts its budget
    # 50 times (and a variant that escapes the budget costs 1 s, not 5).
    bare.slow_seconds = 0.0
    armored.slow_seconds = 1.0
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setenv(SECRET_ENV, "conformance-secret")
        config = ArmorConfig.from_dict(tomllib.loads(CONFIG), source="conformance")
        build = BUILDERS[framework]
        app = dispatcher(build(bare), armor(build(armored), config))
    if transport.mount:
        app = Starlette(routes=[Mount(MOUNT, app=app)])
    if transport.server is None:
        with anyio.from_thread.start_blocking_portal() as portal:

            def send_asgi(
                method: str, target: str, headers: list[tuple[str, str]], body: bytes
            ) -> Answer:
                scope = asgi_scope(transport, method, target, headers)
                answer: Answer = portal.call(call_asgi, app, scope, body)
                return answer

            yield Harness(transport, framework, bare, armored, send_asgi)
        return
    options: dict[str, Any] = {"http": transport.server}
    if transport.root_path:
        options["root_path"] = transport.root_path
    with running_server(app, **options) as served:
        port = int(served.url.rsplit(":", 1)[1])

        def send_socket(
            method: str, target: str, headers: list[tuple[str, str]], body: bytes
        ) -> Answer:
            return call_socket(port, method, target, headers, body)

        yield Harness(transport, framework, bare, armored, send_socket)


@pytest.fixture(scope="module")
def harness(request: pytest.FixtureRequest) -> Iterator[Harness]:
    """One harness per ``(transport, framework)``, shared by that pair's variants."""
    transport_name, framework = request.param
    with open_harness(transport_name, framework) as built:
        yield built


# --------------------------------------------------------------------------- checks


def envelope_problems(answer: Answer, status: int, error: str, method: str) -> list[str]:
    """What is wrong with ``answer`` as the ``error`` envelope (HEAD answers have no body)."""
    if answer.status != status:
        return [f"answered {answer}, not {status} {error}"]
    if method.upper() == "HEAD":
        return []
    data = answer.json()
    problems = []
    if data.get("error") != error:
        problems.append(f"error {data.get('error')!r}, not {error!r}")
    if not data.get("request_id") or data.get("request_id") != answer.headers.get("x-request-id"):
        problems.append(f"request_id {data.get('request_id')!r} is not X-Request-ID")
    return problems


def check_signature(h: Harness, kind: Kind, form: str, method: str) -> list[str]:
    """An unsigned webhook is refused before the handler."""
    headers, body = request_for(kind)
    before = h.armored.calls[kind.handler]
    answer = h.request("armored", method, render(form, kind.handler), headers, body)
    problems = envelope_problems(answer, 401, "invalid_signature", method)
    if h.armored.calls[kind.handler] > before:
        problems.append("the handler ran unsigned")
    return problems


def check_idempotency(h: Harness, kind: Kind, form: str, method: str) -> list[str]:
    """No key: refused; with the canonical request's key: its record is replayed."""
    headers, body = request_for(kind)
    target = render(form, kind.handler)
    before = h.armored.calls[kind.handler]
    missing = h.request("armored", method, target, headers, body)
    problems = envelope_problems(missing, 400, "idempotency_key_missing", method)
    if h.armored.calls[kind.handler] > before:
        problems.append("the handler ran without an Idempotency-Key")
    keyed = [*headers, ("idempotency-key", f"conform-{uuid.uuid4()}")]
    first = h.request(
        "armored", kind.canonical_method, render(CANONICAL, kind.handler), keyed, body
    )
    if first.status != 201:
        return [*problems, f"the canonical request answered {first}"]
    ran = h.armored.calls[kind.handler]
    again = h.request("armored", method, target, keyed, body)
    # The record is written once the first request has ended, which can be just after its
    # client has read the whole response: 409 in_use is the answer to retry later.
    deadline = time.monotonic() + TIMEOUT
    while again.status == 409 and time.monotonic() < deadline:
        time.sleep(0.02)
        again = h.request("armored", method, target, keyed, body)
    if h.armored.calls[kind.handler] > ran:
        problems.append(f"the same key ran the payment again ({again})")
    elif (again.status, again.body) != (first.status, first.body):
        problems.append(f"the same key answered {again}, not the replay of {first}")
    elif again.headers.get("idempotent-replayed") != "true":
        problems.append("the replay has no Idempotent-Replayed: true")
    return problems


def check_rate_limit(h: Harness, kind: Kind, form: str, method: str) -> list[str]:
    """The variant spends the canonical route's tokens and is limited with it."""
    headers = [("x-client", f"conform-{uuid.uuid4()}")]
    target = render(form, kind.handler)
    problems = []
    for number in range(1, RATE):
        answer = h.request(
            "armored", kind.canonical_method, render(CANONICAL, kind.handler), headers
        )
        if answer.status != 200:
            return [f"canonical request {number} answered {answer}"]
    before = h.armored.calls[kind.handler]
    last = h.request("armored", method, target, headers)
    if last.status != 200 or h.armored.calls[kind.handler] == before:
        problems.append(f"the last request within the limit answered {last}")
    before = h.armored.calls[kind.handler]
    over = h.request("armored", method, target, headers)
    problems += envelope_problems(over, 429, "rate_limited", method)
    if h.armored.calls[kind.handler] > before:
        problems.append("the handler ran over the limit")
    return problems


def check_timeout(h: Harness, kind: Kind, form: str, method: str) -> list[str]:
    """The route's budget applies: 504 long before the handler would finish."""
    outcomes = len(h.armored.slow_outcomes)
    answer = h.request("armored", method, render(form, kind.handler))
    problems = envelope_problems(answer, 504, "timeout", method)
    if "finished" in h.armored.slow_outcomes[outcomes:]:
        problems.append("the handler ran to completion")
    return problems


CHECKS: dict[str, Callable[[Harness, Kind, str, str], list[str]]] = {
    "signature": check_signature,
    "idempotency": check_idempotency,
    "rate_limit": check_rate_limit,
    "timeout": check_timeout,
}
#: The status each protection answers with, for variants the framework does not route.
REFUSALS = {"signature": 401, "idempotency": 400, "rate_limit": 429, "timeout": 504}


def check_unrouted(h: Harness, kind: Kind, form: str, method: str, bare: Outcome) -> list[str]:
    """A variant the framework does not route: armored, the handler does not run either."""
    headers, body = request_for(kind)
    if kind.name == "rate_limit":
        headers = [("x-client", f"conform-{uuid.uuid4()}")]
    before = h.armored.calls[kind.handler]
    answer = h.request("armored", method, render(form, kind.handler), headers, body)
    problems = []
    if h.armored.calls[kind.handler] > before:
        problems.append(f"armored, the handler ran ({answer}); bare, it did not ({bare.status})")
    if answer.status not in (bare.status, REFUSALS[kind.name]):
        problems.append(f"armored it answered {answer}; bare {bare.status}")
    return problems


HARNESSES = [(t, f) for t in TRANSPORTS for f in FRAMEWORKS]


@pytest.mark.parametrize("harness", HARNESSES, indirect=True, ids=lambda p: "-".join(p))
@pytest.mark.parametrize("form", FORMS, ids=shown)
@pytest.mark.parametrize("kind_name", list(KINDS))
def test_protection_applies_to_every_routed_variant(
    harness: Harness, kind_name: str, form: str
) -> None:
    """For each method spelling of the path form: routed -> protected; else not run."""
    kind = KINDS[kind_name]
    problems = []
    for method in kind.methods:
        bare = harness.probe(kind, form, method)
        found = (
            CHECKS[kind.name](harness, kind, form, method)
            if bare.routed
            else check_unrouted(harness, kind, form, method, bare)
        )
        routed = "routed to the handler" if bare.routed else f"not routed ({bare.status})"
        problems += [f"{method} {render(form, kind.handler)} ({routed}): {p}" for p in found]
    assert not problems, "\n".join(problems)


# --------------------------------------------------------------------------- the table

#: How the docs name the transports and the frameworks.
SHOWN_TRANSPORTS = {"asgi": "in-process", "h11": "h11", "httptools": "httptools"}
SHOWN_FRAMEWORKS = {
    "starlette": "Starlette",
    "fastapi": "FastAPI",
    "quart": "Quart",
    "litestar": "Litestar",
}
#: The docs' second table: each prefix, against the transport it is a variation of.
PREFIXED = (
    ("`uvicorn --root-path /svc` (h11)", "h11-root", "h11"),
    ('inside `Mount("/v1", ...)`', "asgi-mount", "asgi"),
    ("`root_path` `/svc`, the path not starting with it", "asgi-root-not-prefix", "asgi"),
)
TABLE_KIND = "signature"
TABLE_START = "<!-- conformance-table: start -->"
TABLE_END = "<!-- conformance-table: end -->"


def outcome(transport: str, framework: str, form: str, method: str) -> Outcome:
    """The bare framework's outcome for a variant of the table's route (measured if need be)."""
    key = (transport, framework, TABLE_KIND, form, method)
    if key not in ROUTED:
        with open_harness(transport, framework) as h:
            for form_ in FORMS:
                for method_ in KINDS[TABLE_KIND].methods:
                    h.probe(KINDS[TABLE_KIND], form_, method_)
    return ROUTED[key]


def cell(framework: str, form: str, method: str) -> str:
    """One cell of the variant table: the outcome, per transport where they differ."""
    groups: dict[str, list[str]] = {}
    for transport, name in SHOWN_TRANSPORTS.items():
        found = outcome(transport, framework, form, method)
        groups.setdefault("**handler**" if found.routed else str(found.status), []).append(name)
    if len(groups) == 1:
        return next(iter(groups))
    return "; ".join(f"{value} ({', '.join(names)})" for value, names in groups.items())


def variant_table() -> list[str]:
    """What each framework does, without armor, with each variant of ``POST /api/x``."""
    lines = [
        "| request | " + " | ".join(SHOWN_FRAMEWORKS.values()) + " |",
        "|---" * (len(SHOWN_FRAMEWORKS) + 1) + "|",
    ]
    for form in FORMS:
        rows: dict[tuple[str, ...], list[str]] = {}
        for method in KINDS[TABLE_KIND].methods:
            rows.setdefault(tuple(cell(f, form, method) for f in FRAMEWORKS), []).append(method)
        for cells, methods in rows.items():
            lines.append(
                f"| `{'`, `'.join(methods)}` `{shown(form)}` | " + " | ".join(cells) + " |"
            )
    return lines


def prefix_cell(framework: str, transport: str, base: str) -> str:
    """How the variants routed under a prefix differ from those routed without one."""
    differences = []
    routed_any = False
    for form in FORMS:
        for method in KINDS[TABLE_KIND].methods:
            found, without = (
                outcome(transport, framework, form, method),
                outcome(base, framework, form, method),
            )
            routed_any = routed_any or found.routed
            if found.routed != without.routed:
                differences.append(f"`{method} {shown(form)}`: {found}")
    if not routed_any:
        return "nothing reaches the handler"
    if not differences:
        return "the same"
    return "the same, except " + ", ".join(differences)


def prefix_table() -> list[str]:
    """Under each prefix: the variants routed, against the same server without the prefix."""
    lines = [
        "| the app runs | " + " | ".join(SHOWN_FRAMEWORKS.values()) + " |",
        "|---" * (len(SHOWN_FRAMEWORKS) + 1) + "|",
    ]
    for shown_, transport, base in PREFIXED:
        cells = [prefix_cell(f, transport, base) for f in FRAMEWORKS]
        lines.append(f"| {shown_} | " + " | ".join(cells) + " |")
    return lines


def test_docs_table_matches_the_frameworks() -> None:
    """docs/frameworks.md shows what the installed frameworks route, as measured here."""
    text = DOCS.read_text(encoding="utf-8")
    assert TABLE_START in text, f"{DOCS} has no {TABLE_START} line"
    assert TABLE_END in text, f"{DOCS} has no {TABLE_END} line"
    documented = text.split(TABLE_START, 1)[1].split(TABLE_END, 1)[0].strip()
    measured = "\n".join([*variant_table(), "", *prefix_table()])
    assert documented == measured, (
        "the frameworks route differently from what docs/frameworks.md shows "
        f"(a new framework version?); the measured tables:\n{measured}"
    )
