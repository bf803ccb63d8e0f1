"""Websocket handshakes under a real uvicorn: rate limits and shedding hold for them too.

A rule whose route matches a websocket path limits connections (a handshake is a ``GET``
of its path); shedding counts open connections. A refused handshake is the usual envelope,
sent through the ASGI websocket denial-response extension that uvicorn offers.
"""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.routing import WebSocketRoute
from starlette.websockets import WebSocket
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from asgi_armor import ArmorConfig, armor
from asgi_armor.config import RateLimitEntry, SheddingConfig
from asgi_armor.contrib.starlette import armor_exception_handlers
from asgi_armor.errors import RateLimited

pytestmark = pytest.mark.asyncio_only


async def echo(websocket: WebSocket) -> None:
    await websocket.accept()
    async for text in websocket.iter_text():
        await websocket.send_text(text)


def starlette_ws() -> Any:
    return Starlette(routes=[WebSocketRoute("/ws/echo", echo)])


def ws_url(base: str, path: str = "/ws/echo") -> str:
    return base.replace("http://", "ws://") + path


def refused(url: str) -> tuple[int, dict[str, str], dict[str, Any]]:
    with pytest.raises(InvalidStatus) as caught:
        connect(url, open_timeout=5).close()
    response = caught.value.response
    headers = {name.lower(): value for name, value in response.headers.raw_items()}
    return response.status_code, headers, json.loads(response.body)


def test_a_rule_on_a_websocket_path_limits_connections(serve: Any) -> None:
    config = ArmorConfig(rate_limit=[RateLimitEntry(route="* /ws/*", rate="2/minute")])
    with serve(armor(starlette_ws(), config)) as base:
        for _ in range(2):
            with connect(ws_url(base), open_timeout=5) as ws:
                ws.send("hi")
                assert ws.recv(timeout=5) == "hi"
                assert ws.response.headers["RateLimit-Policy"]
        status, headers, body = refused(ws_url(base))
    assert status == 429
    assert body["error"] == "rate_limited"
    assert body["request_id"] == headers["x-request-id"]
    assert int(headers["retry-after"]) >= 1


def test_shedding_counts_open_connections(serve: Any) -> None:
    config = ArmorConfig(shedding=SheddingConfig(max_concurrent=1, exempt=[]))
    with serve(armor(starlette_ws(), config)) as base:
        with connect(ws_url(base), open_timeout=5) as first:
            first.send("held")
            assert first.recv(timeout=5) == "held"
            status, headers, body = refused(ws_url(base))
            assert (status, body["error"]) == (503, "overloaded")
            assert body["request_id"] == headers["x-request-id"]
        # The slot is given back when the connection closes.
        for _ in range(50):
            try:
                with connect(ws_url(base), open_timeout=5) as again:
                    again.send("back")
                    assert again.recv(timeout=5) == "back"
                    break
            except InvalidStatus:
                time.sleep(0.05)
        else:
            pytest.fail("the slot of a closed connection was never given back")


def test_accepted_handshakes_carry_a_request_id(serve: Any) -> None:
    with serve(armor(starlette_ws(), ArmorConfig())) as base, connect(ws_url(base)) as ws:
        assert ws.response.headers["X-Request-ID"].startswith("req_")


async def limited_ws(websocket: WebSocket) -> None:
    raise RateLimited(7)


def test_an_armor_error_raised_in_a_starlette_websocket_route_refuses_with_the_envelope(
    serve: Any,
) -> None:
    app = Starlette(
        routes=[WebSocketRoute("/ws/limited", limited_ws)],
        exception_handlers=armor_exception_handlers(),
    )
    with serve(armor(app)) as base:
        status, headers, body = refused(ws_url(base, "/ws/limited"))
    assert (status, body["error"], headers["retry-after"]) == (429, "rate_limited", "7")
    assert body["request_id"] == headers["x-request-id"]
