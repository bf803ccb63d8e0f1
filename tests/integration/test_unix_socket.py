"""Behind a proxy on a unix socket (``uvicorn --uds``): what the server gives, and whom we limit.

uvicorn asks the socket for its peer name; a unix-socket client has none, so
``scope["client"]`` is None. Without ``"unix"`` in ``trusted_proxies`` every client is
"unknown" and shares one bucket (and a warning says so, once); with it, the proxy's
``X-Forwarded-For`` names each client.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest

from asgi_armor._asgi import Receive, Scope, Send
from asgi_armor.config import ArmorConfig, RateLimitEntry
from asgi_armor.stack import armor
from tests.integration.conftest import running_server

HTTP = ["h11", "httptools"]


async def echo_client(scope: Scope, receive: Receive, send: Send) -> None:
    """Answers with what the server put in ``scope["client"]``."""
    body = msgspec.json.encode({"client": scope.get("client")})
    headers = [(b"content-type", b"application/json")]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": body})


@pytest.fixture
def socket_path() -> Iterator[str]:
    # A short directory: a unix socket path is limited to about 100 bytes.
    with tempfile.TemporaryDirectory(prefix="armor-") as directory:
        yield str(Path(directory) / "app.sock")


def limited(trusted_proxies: list[str]) -> Any:
    config = ArmorConfig(
        trusted_proxies=trusted_proxies,
        rate_limit=[RateLimitEntry(route="* /*", rate="2/minute", key="ip", name="per-ip")],
    )
    return armor(echo_client, config)


def statuses(url: str, path: str, clients: list[str]) -> list[int]:
    transport = httpx.HTTPTransport(uds=path)
    with httpx.Client(transport=transport, base_url=url, timeout=10) as client:
        return [
            client.get("/", headers={"X-Forwarded-For": f"203.0.113.66, {ip}"}).status_code
            for ip in clients
        ]


@pytest.mark.parametrize("http", HTTP)
def test_uvicorn_on_a_unix_socket_gives_no_client_address(socket_path: str, http: str) -> None:
    with running_server(echo_client, uds=socket_path, http=http) as served:
        transport = httpx.HTTPTransport(uds=socket_path)
        with httpx.Client(transport=transport, base_url=served.url, timeout=10) as client:
            response = client.get("/")
    assert response.json() == {"client": None}


@pytest.mark.parametrize("http", HTTP)
def test_trusted_unix_proxy_names_each_client(socket_path: str, http: str) -> None:
    with running_server(limited(["unix"]), uds=socket_path, http=http) as served:
        alice = ["198.51.100.1"] * 3
        bob = ["198.51.100.2"] * 3
        assert statuses(served.url, socket_path, alice + bob) == [200, 200, 429] * 2


@pytest.mark.parametrize("http", HTTP)
def test_untrusted_unix_peer_is_one_shared_bucket_and_warns_once(
    socket_path: str, http: str, caplog: pytest.LogCaptureFixture
) -> None:
    with (
        caplog.at_level(logging.WARNING, logger="asgi_armor"),
        running_server(limited([]), uds=socket_path, http=http) as served,
    ):
        got = statuses(served.url, socket_path, ["198.51.100.1", "198.51.100.2"] * 2)
    assert got == [200, 200, 429, 429]
    warnings = [r for r in caplog.records if "without a peer address" in r.getMessage()]
    assert len(warnings) == 1, warnings
    assert 'add "unix" to trusted_proxies' in warnings[0].getMessage()
