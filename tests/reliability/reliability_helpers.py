"""Shared tools for the reliability suite: a faulty private Redis, the demo stack, raw HTTP.

Everything here is loopback-only and bounded: every wait has a deadline, every server the
suite starts is stopped by the fixture or context manager that started it.
"""

from __future__ import annotations

import contextlib
import importlib.util
import signal
import socket
import sys
import time
from collections import Counter
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import anyio

from tests.servers import free_port

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
__all__ = [
    "HERE",
    "ROOT",
    "CountingApp",
    "DemoStack",
    "call_asgi",
    "demo_stack",
    "free_port",
    "load_integration_conftest",
    "parse_response",
    "pause",
    "percentile",
    "raw_http",
    "redis_clients",
    "restart",
    "resume",
    "running_server",
    "wait_until",
]


def load_integration_conftest() -> Any:
    """The integration suite's ``running_server`` helpers (a real uvicorn in a thread)."""
    name = "armor_integration_conftest"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, ROOT / "tests/integration/conftest.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def running_server(app: Any, **options: Any) -> AbstractContextManager[Any]:
    """``tests/integration/conftest.py``'s ``running_server``: uvicorn on a free port."""
    manager: AbstractContextManager[Any] = load_integration_conftest().running_server(
        app, **options
    )
    return manager


# -- the private Redis ------------------------------------------------------------------


def pause(server: Any) -> None:
    """Freeze the private redis-server (SIGSTOP): connections stay open, nothing answers."""
    assert server.process is not None
    server.process.send_signal(signal.SIGSTOP)


def resume(server: Any) -> None:
    """Thaw a paused redis-server (SIGCONT)."""
    assert server.process is not None
    server.process.send_signal(signal.SIGCONT)


def restart(server: Any) -> None:
    """Start the private redis-server again on its port (empty: scripts and keys gone)."""
    server.stop()
    server.start()


def redis_clients(server: Any) -> list[dict[str, str]]:
    """The connections the private Redis sees, other than the one asking."""
    import redis

    client = redis.Redis(host="127.0.0.1", port=server.port, socket_timeout=5)
    try:
        me = client.client_id()
        return [c for c in client.client_list() if int(c["id"]) != me]
    finally:
        client.close()


def wait_until(predicate: Callable[[], bool], timeout: float, step: float = 0.05) -> bool:
    """Poll ``predicate`` until it holds or ``timeout`` seconds pass."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(step)


# -- the demo stack ---------------------------------------------------------------------


class CountingApp:
    """An ASGI shim that counts how often each path reaches the demo's own handlers."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.calls: Counter[str] = Counter()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            self.calls[scope["path"]] += 1
        await self.app(scope, receive, send)


class DemoStack:
    """The armored demo, with its fault board and a count of handler runs per path."""

    def __init__(self, app: Any, config: Any, demo: Any, counter: CountingApp) -> None:
        self.app = app
        self.config = config
        self.demo = demo
        self.counter = counter

    def reset_faults(self) -> None:
        """Every fake dependency back to "ok" (garbage may have flipped one)."""
        from asgi_armor.demo.services import Fault

        for name in self.demo.board.faults:
            self.demo.board.faults[name] = Fault("ok")


def demo_stack(store: str | None = None, **config_changes: Any) -> DemoStack:
    """Exactly what ``create_demo(store=...)`` builds, plus a handler-run counter inside.

    ``create_demo`` returns only the armored app; the suite also needs the fault board
    (to undo faults that fuzzed bodies may set) and the count of handler runs (to prove
    that a refused request never ran), so it composes the same pieces the same way.
    """
    import msgspec

    from asgi_armor.config import ArmorConfig
    from asgi_armor.demo.app import BUNDLED_CONFIG, Demo, _webhook_secret, demo_identify
    from asgi_armor.stack import armor

    _webhook_secret()
    config = ArmorConfig.from_toml(BUNDLED_CONFIG)
    if store is not None:
        config = config.with_store(store)
    if config_changes:
        config = msgspec.structs.replace(config, **config_changes)
    demo = Demo()
    counter = CountingApp(demo.app())
    return DemoStack(armor(counter, config, identify=demo_identify), config, demo, counter)


# -- checks -------------------------------------------------------------------------------


def percentile(values: list[float], fraction: float) -> float:
    """The ``fraction`` quantile of ``values`` (nearest rank)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(fraction * len(ordered)) - 1))]


# -- raw ASGI ------------------------------------------------------------------------------


async def call_asgi(app: Any, request: dict[str, Any]) -> tuple[int, dict[str, str], bytes]:
    """Drive ``app`` with one request; fail on a protocol error or an escaping exception."""
    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.4"},
        "http_version": "1.1",
        "method": request["method"],
        "scheme": "http",
        "path": request["path"],
        "raw_path": request["raw_path"],
        "query_string": request["query_string"],
        "root_path": request.get("root_path", ""),
        "headers": list(request["headers"]),
        "client": request["client"],
        "server": ("127.0.0.1", 8000),
        "state": {},
    }
    pending = list(request["chunks"])
    done = anyio.Event()
    messages: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        if pending:
            chunk = pending.pop(0)
            return {"type": "http.request", "body": chunk, "more_body": bool(pending)}
        # The client stays until the answer is complete, as a real one does.
        await done.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        assert not done.is_set(), f"message after the response completed: {message['type']}"
        messages.append(message)
        if message["type"] == "http.response.body" and not message.get("more_body", False):
            done.set()

    with anyio.fail_after(10):
        await app(scope, receive, send)
    starts = [m for m in messages if m["type"] == "http.response.start"]
    assert len(starts) == 1, messages
    assert messages[0]["type"] == "http.response.start"
    assert done.is_set(), "response never completed"
    headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in starts[0]["headers"]}
    body = b"".join(m.get("body", b"") for m in messages[1:])
    return starts[0]["status"], headers, body


# -- raw HTTP over a socket ---------------------------------------------------------------


def raw_http(port: int, request: bytes, timeout: float = 5.0) -> tuple[int, dict[str, str], bytes]:
    """Send ``request`` as is and read the response until the server closes.

    The request should say ``Connection: close``.

    Returns ``(status, lower-cased headers, body)``; status 0 when the server closed the
    connection without answering.
    """
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        # The server may answer early (413) and close: its answer may still be readable.
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(request)
        # No half-close (SHUT_WR): uvicorn takes it for a disconnect and drops the answer.
        chunks = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                chunk = sock.recv(65536)
            except (ConnectionResetError, TimeoutError):
                break
            if not chunk:
                break
            chunks.append(chunk)
    return parse_response(b"".join(chunks))


def parse_response(data: bytes) -> tuple[int, dict[str, str], bytes]:
    """Split a raw HTTP/1.1 response (identity or chunked body)."""
    if not data:
        return 0, {}, b""
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split(b" ")[1])
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        headers[name.strip().lower().decode("latin-1")] = value.strip().decode("latin-1")
    if headers.get("transfer-encoding") == "chunked":
        out = b""
        rest = body
        while rest:
            size_line, _, rest = rest.partition(b"\r\n")
            size = int(size_line.split(b";")[0] or b"0", 16)
            if size == 0:
                break
            out += rest[:size]
            rest = rest[size + 2 :]
        body = out
    elif "content-length" in headers:
        body = body[: int(headers["content-length"])]
    return status, headers, body
