"""Deployment threats of ``docs/security.md``, against the demo stack: who the client is.

Behind one appending proxy trusted as ``"*"``, the client writes whatever it likes left of
the hop the proxy appended; over IPv6 one host holds a whole /64. Neither may buy a fresh
rate-limit bucket per request. (A proxy on a unix socket, under a real uvicorn:
``tests/integration/test_unix_socket.py``.)
"""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from reliability_helpers import demo_stack

pytestmark = [pytest.mark.anyio]


async def _statuses(app: Any, requests: list[tuple[str, dict[str, str]]]) -> list[int]:
    found = []
    for peer, headers in requests:
        transport = httpx.ASGITransport(app=app, client=(peer, 5555))
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            found.append(
                (await client.post("/api/expensive-operation", headers=headers)).status_code
            )
    return found


async def test_trust_all_proxy_never_lets_the_client_pick_its_bucket(anyio_backend: str) -> None:
    stack = demo_stack(trusted_proxies=["*"])  # expensive-operation: 10/minute per ip
    # The load balancer (any peer) appends who connected to it: 198.51.100.5. Everything
    # left of that is the client's own text, fresh on every request.
    forged = [("10.0.0.1", {"X-Forwarded-For": f"1.2.{n}.3, 198.51.100.5"}) for n in range(12)]
    assert await _statuses(stack.app, forged) == [200] * 10 + [429] * 2
    other = [("10.0.0.2", {"X-Forwarded-For": "198.51.100.6"})]
    assert await _statuses(stack.app, other) == [200]


async def test_one_ipv6_64_is_one_client(anyio_backend: str) -> None:
    stack = demo_stack()
    same_64 = [(f"2001:db8:7:7:{n:x}:{n:x}::1", {}) for n in range(20)]
    assert (await _statuses(stack.app, same_64)).count(200) == 10
    assert await _statuses(stack.app, [("2001:db8:7:8::1", {})]) == [200]
    # An IPv4 client on a dual-stack socket is the same client as over IPv4.
    dual = [("::ffff:192.0.2.9", {})] * 6 + [("192.0.2.9", {})] * 6
    assert await _statuses(stack.app, dual) == [200] * 10 + [429] * 2
