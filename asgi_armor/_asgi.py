"""ASGI plumbing shared by every layer: types, header lookup, body reading, sending.

Below every layer: it imports only the type aliases (``_types``) and the error hierarchy
(``errors``), which import nothing back (docs/architecture.md, "Module map").
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from asgi_armor._types import ASGIApp, Headers, Message, Receive, Scope, Send
from asgi_armor.errors import PayloadTooLarge

__all__ = [
    "INVALID_LENGTH",
    "ASGIApp",
    "Headers",
    "Message",
    "Receive",
    "Scope",
    "Send",
    "content_length",
    "declared_length",
    "get_header",
    "get_headers",
    "read_body",
    "replay_body",
    "scope_state",
    "send_json",
]

#: What ``content_length`` answers for a ``Content-Length`` that is not a valid length.
INVALID_LENGTH = -1
# Longer than this (leading zeros aside), a length is beyond any body a server accepts,
# and int() of it would cost time (or trip the 4300-digit guard).
_MAX_DIGITS = 18
_HUGE_LENGTH = 1_000_000_000_000_000_000


def get_header(scope: Scope, name: bytes) -> bytes | None:
    """Return the first value of header ``name`` (lower-case bytes), or None."""
    for key, value in scope["headers"]:
        if key == name:
            return value  # type: ignore[no-any-return]
    return None


def get_headers(scope: Scope, name: bytes) -> list[bytes]:
    """Return every value of header ``name`` (lower-case bytes), in order."""
    return [value for key, value in scope["headers"] if key == name]


def content_length(values: list[bytes]) -> int:
    """The body length that the ``Content-Length`` field values declare (RFC 9110 8.6).

    The one rule every layer applies: a length is ASCII digits only (no sign, no inner
    space, no ``1_000``, no list such as ``5, 5``); repeated fields must all agree. Returns
    ``INVALID_LENGTH`` otherwise; a length of more than 18 digits is answered as
    ``10**18`` without converting it (no cap in this package is that large).

    Args:
        values: every ``Content-Length`` value of the request, at least one.
    """
    first: bytes = values[0].strip()
    # Checked only when repeated: the generator costs more than the rest of the check.
    if len(values) > 1 and any(v.strip() != first for v in values[1:]):
        return INVALID_LENGTH
    if not first.isdigit():  # bytes.isdigit is ASCII digits only
        return INVALID_LENGTH
    if len(first) > _MAX_DIGITS:
        first = first.lstrip(b"0") or b"0"
        if len(first) > _MAX_DIGITS:
            return _HUGE_LENGTH
    return int(first)


def declared_length(scope: Scope, max_bytes: int) -> int | None:
    """The request's declared body length, or None when it declares none.

    Raises:
        PayloadTooLarge: the length is over ``max_bytes``, or it is not a valid length
            (RFC 9110 wants 400, but a length we cannot read cannot be shown to be
            within the cap).
    """
    values = [value for key, value in scope["headers"] if key == b"content-length"]
    if not values:
        return None
    length = content_length(values)
    if length == INVALID_LENGTH:
        raise PayloadTooLarge("Content-Length header is not a valid length")
    if length > max_bytes:
        raise PayloadTooLarge(max_bytes=max_bytes)
    return length


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
