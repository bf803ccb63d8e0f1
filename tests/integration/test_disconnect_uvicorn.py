"""A client that hangs up in the middle of its body, under uvicorn (h11 and httptools).

Starlette's ``request.body()`` raises ``ClientDisconnect`` when uvicorn reports
``http.disconnect``. That is the client's doing: armor logs one INFO line with the request
id and no traceback, nothing at ERROR, and the server carries on serving.
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import AsyncIterator

import httpx
import pytest
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from asgi_armor import armor
from tests.integration.conftest import running_server

LEFT = "client disconnected before the response"


async def upload(request: Request) -> Response:
    return Response(b"%d bytes" % len(await request.body()))


def broken_task() -> None:
    raise RuntimeError("a bug in a background task")


async def chunks() -> AsyncIterator[bytes]:
    yield b"hello"


async def streamed(request: Request) -> Response:
    # A streaming response reads receive while it streams (ASGI spec < 2.4), and uvicorn
    # answers http.disconnect once the response is complete: the client never left.
    return StreamingResponse(chunks(), background=BackgroundTask(broken_task))


@pytest.mark.parametrize("http", ["h11", "httptools"])
def test_a_client_gone_mid_upload_is_one_info_line(
    http: str, caplog: pytest.LogCaptureFixture
) -> None:
    app = armor(Starlette(routes=[Route("/upload", upload, methods=["POST"])]))
    with (
        caplog.at_level(logging.INFO),
        running_server(app, http=http) as served,
    ):
        port = int(served.url.rsplit(":", 1)[1])
        for _ in range(3):
            with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
                conn.sendall(
                    b"POST /upload HTTP/1.1\r\nHost: t\r\nContent-Length: 1000\r\n\r\n" + b"x" * 10
                )
                time.sleep(0.05)  # the route is reading the body when the client goes
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            if len([r for r in caplog.records if r.getMessage().startswith(LEFT)]) == 3:
                break
            time.sleep(0.02)
        # The server serves on: a whole body is answered.
        answer = httpx.post(served.url + "/upload", content=b"y" * 10, timeout=5)
        assert (answer.status_code, answer.text) == (200, "10 bytes")
    left = [r for r in caplog.records if r.getMessage().startswith(LEFT)]
    assert [(r.levelno, r.exc_info) for r in left] == [(logging.INFO, None)] * 3
    assert all("ClientDisconnect" in r.getMessage() for r in left)
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == []


@pytest.mark.parametrize("http", ["h11", "httptools"])
def test_a_bug_after_a_whole_response_is_still_an_error(
    http: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The http.disconnect a server reports after a complete response is not a client
    that hung up: a background task failing after a streamed answer is logged at ERROR,
    with its traceback."""
    app = armor(Starlette(routes=[Route("/streamed", streamed)]))
    with caplog.at_level(logging.INFO), running_server(app, http=http) as served:
        answer = httpx.get(served.url + "/streamed", timeout=5)
        assert (answer.status_code, answer.text) == (200, "hello")
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and not any(
            r.name == "asgi_armor" for r in caplog.records
        ):
            time.sleep(0.02)
    ours = [r for r in caplog.records if r.name == "asgi_armor"]
    assert [r.levelno for r in ours] == [logging.ERROR]
    assert ours[0].getMessage().startswith("unhandled exception in GET '/streamed'")
    assert ours[0].exc_info is not None
    assert not any(r.getMessage().startswith(LEFT) for r in caplog.records)
