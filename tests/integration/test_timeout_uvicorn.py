"""TimeoutMiddleware under a real uvicorn: 504 in time, aborted streams, bounded uploads."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import httpx
import pytest

from asgi_armor._asgi import Receive, Scope, Send
from asgi_armor.errors import ErrorMiddleware
from asgi_armor.timeout import TimeoutMiddleware

if TYPE_CHECKING:
    from tests.integration.conftest import Served


class SlowApp:
    """/sleep sleeps 10 s; /stall streams one chunk, then stalls; /upload reads the body."""

    def __init__(self) -> None:
        self.finally_ran = threading.Event()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            if scope["path"] == "/sleep":
                await asyncio.sleep(10)
            elif scope["path"] == "/stall":
                await send(
                    {
                        "type": "http.response.start",
                        "status": 200,
                        "headers": [(b"content-type", b"text/plain")],
                    }
                )
                await send(
                    {"type": "http.response.body", "body": b"first chunk", "more_body": True}
                )
                await asyncio.sleep(10)
                await send({"type": "http.response.body", "body": b"never sent"})
                return
            elif scope["path"] == "/upload":
                more = True
                while more:
                    message = await receive()
                    more = message.get("more_body", False)
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"done"})
        finally:
            self.finally_ran.set()


def armored(app: SlowApp) -> Any:
    return ErrorMiddleware(TimeoutMiddleware(app, routes={"* /*": 1.0}))


def wait_for_no_tasks(served: Served) -> None:
    deadline = time.monotonic() + 5
    while served.tasks():
        if time.monotonic() > deadline:
            pytest.fail(f"tasks left on the server loop: {served.tasks()!r}")
        time.sleep(0.02)


def test_slow_handler_answers_504_in_about_the_budget(
    running_server: Callable[..., Any],
) -> None:
    app = SlowApp()
    with running_server(armored(app)) as served, httpx.Client(base_url=served.url) as client:
        start = time.monotonic()
        response = client.get("/sleep", timeout=10)
        elapsed = time.monotonic() - start
        assert response.status_code == 504
        body = response.json()
        assert body["error"] == "timeout"
        assert body["message"] == "Request timed out after 1s"
        assert body["request_id"] == response.headers["x-request-id"]
        assert 0.9 <= elapsed < 3
        assert app.finally_ran.wait(2)
        # The connection is still usable: a 504 is an ordinary, complete response.
        assert client.get("/fast").status_code == 200
        wait_for_no_tasks(served)


def test_stalled_stream_is_aborted_not_answered_twice(
    running_server: Callable[..., Any],
) -> None:
    app = SlowApp()
    with running_server(armored(app)) as served, httpx.Client(base_url=served.url) as client:
        start = time.monotonic()
        received: list[bytes] = []

        def read_all() -> None:
            with client.stream("GET", "/stall", timeout=10) as response:
                assert response.status_code == 200
                received.extend(response.iter_raw())

        # The client sees the one response it was promised, cut short: never a second one.
        with pytest.raises(httpx.RemoteProtocolError):
            read_all()
        assert b"".join(received) == b"first chunk"
        assert time.monotonic() - start < 3
        assert app.finally_ran.wait(2)
        wait_for_no_tasks(served)
        # The server is fine afterwards.
        assert client.get("/fast").status_code == 200


def test_slow_upload_is_bounded(running_server: Callable[..., Any]) -> None:
    app = SlowApp()
    with running_server(armored(app)) as served:
        port = int(served.url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
            conn.sendall(
                b"POST /upload HTTP/1.1\r\nHost: t\r\nContent-Length: 1000\r\n\r\n" + b"x" * 10
            )
            start = time.monotonic()
            reply = b""
            while b"\r\n\r\n" not in reply:
                chunk = conn.recv(65536)
                if not chunk:
                    break
                reply += chunk
            elapsed = time.monotonic() - start
        assert reply.startswith(b"HTTP/1.1 504 ")
        assert 0.9 <= elapsed < 3
        assert app.finally_ran.wait(2)
        wait_for_no_tasks(served)
