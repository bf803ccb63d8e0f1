"""ASGI plumbing shared by every layer: types, header lookup, body reading, sending."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from typing import Any

from asgi_armor.errors import PayloadTooLarge

__all__ = [
    "ASGIApp",
    "Headers",
    "Message",
    "Receive",
    "Scope",
    "Send",
    "get_header",
    "get_headers",
    "read_body",
    "replay_body",
    "scope_state",
    "send_json",
]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]
Headers = list[tuple[bytes, bytes]]


def get_header(scope: Scope, name: bytes) -> bytes | None:
    """Return the first value of header ``name`` (lower-case bytes), or None."""
    for key, value in scope["headers"]:
        if key == name:
            return value  # type: ignore[no-any-return]
    return None


def get_headers(scope: Scope, name: bytes) -> list[bytes]:
    """Return every value of header ``name`` (lower-case bytes), in order."""
    return [value for key, value in scope["headers"] if key == name]


def scope_state(scope: Scope) -> dict[str, Any]:
    """Return ``scope["state"]``, creating it when the server did not."""
    state = scope.get("state")
    if state is None:
        state = scope["state"] = {}
    return state


async def read_body(receive: Receive, max_bytes: int) -> bytes:
    """Read the whole request body, refusing to hold more than ``max_bytes``.

    Raises:
        PayloadTooLarge: the client sent more than ``max_bytes``.
    """
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            # A disconnect mid-body: what arrived is all there is.
            break
        chunk: bytes = message.get("body", b"")
        size += len(chunk)
        if size > max_bytes:
            raise PayloadTooLarge(max_bytes=max_bytes)
        chunks.append(chunk)
        if not message.get("more_body", False):
            break
    return b"".join(chunks)


def replay_body(body: bytes, receive: Receive) -> Receive:
    """Return a ``receive`` that yields ``body`` once, then defers to the real one.

    Used after a layer had to read the body (signature check, idempotency fingerprint):
    the app still sees the exact bytes, and later waits for ``http.disconnect`` as usual.
    """
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


async def send_json(
    send: Send, status: int, body: bytes, headers: Iterable[tuple[bytes, bytes]] = ()
) -> None:
    """Send a complete ``application/json`` response whose body is already encoded."""
    raw = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        *headers,
    ]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body, "more_body": False})
