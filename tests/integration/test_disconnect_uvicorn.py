"""A client that hangs up in the middle of its body, under uvicorn (h11 and httptools).

Starlette's ``request.body()`` raises ``ClientDisconnect`` when uvicorn reports
``http.disconnect``. That is the client's doing: armor logs one INFO line with the request
id and no traceback, nothing at ERROR, and the server carries on serving.
"""

from __future__ import annotations

import logging
import socket
import time

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from asgi_armor import armor
from tests.integration.conftest import running_server

LEFT = "client disconnected before the response"


async def upload(request: Request) -> Response:
    return Response(b"%d bytes" % len(await request.body()))


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
