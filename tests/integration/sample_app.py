"""A bare ASGI app for ``asgi-armor run`` tests: echoes what it saw."""

from __future__ import annotations

import msgspec

from asgi_armor._asgi import Receive, Scope, Send, send_json


async def app(scope: Scope, receive: Receive, send: Send) -> None:
    """Echo the client address the server gave and the request id armor chose."""
    if scope["type"] != "http":
        return
    body = {"client": scope["client"][0], "request_id": scope["state"]["request_id"]}
    await send_json(send, 200, msgspec.json.encode(body))
