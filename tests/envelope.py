"""The one check of the error envelope, for every test that looks at an error response.

The contract (docs/errors.md): ``{"error", "message", "details", "request_id"}`` as
``application/json``; ``error`` a stable snake_case code whose status is fixed by the
error class; every detail has ``code``, ``message`` and ``field`` (a dotted path or null);
``request_id`` is the response's ``X-Request-ID`` (a replay carries the first response's
envelope under a new id); and nothing leaks: no traceback, exception name or path.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

import httpx

from asgi_armor import errors

__all__ = [
    "ENVELOPE_KEYS",
    "LEAK_MARKERS",
    "STATUS_OF_ERROR",
    "assert_envelope",
    "assert_no_leak",
]

ENVELOPE_KEYS = frozenset({"error", "message", "details", "request_id"})
# What must never reach a client: traceback text, exception repr, driver messages, paths.
LEAK_MARKERS = (
    b"Traceback",
    b'File "',
    b"Error:",
    b"Exception",
    b"DependencyError",
    b"10.0.0.12",
    b"connection refused",
    b"site-packages",
    b"asgi_armor/",
)
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:\-]{1,128}")
_SNAKE = re.compile(r"[a-z][a-z0-9]*(_[a-z0-9]+)*")


def _statuses() -> dict[str, set[int]]:
    """Each error code and the statuses it may come with, from the error classes."""
    table: dict[str, set[int]] = {}
    pending = [errors.ArmorError]
    while pending:
        cls = pending.pop()
        pending.extend(cls.__subclasses__())
        error, status = cls.__dict__.get("error"), cls.__dict__.get("status")
        if isinstance(error, str) and isinstance(status, int):
            table.setdefault(error, set()).add(status)
    # HTTPError: any status a framework raised, named from one fixed table.
    for status, error in errors._HTTP_ERROR_CODES.items():
        table.setdefault(error, set()).add(status)
    return table


#: Every error code the package can answer with, and its status(es).
STATUS_OF_ERROR: dict[str, set[int]] = _statuses()

Raw = tuple[int, Mapping[str, str], bytes]


def assert_no_leak(body: bytes) -> None:
    """No traceback, exception name, driver message or file path in a response body."""
    for marker in LEAK_MARKERS:
        assert marker not in body, (marker, body[:500])


def assert_envelope(
    response: httpx.Response | Raw, status: int, error: str | None = None
) -> dict[str, Any]:
    """Assert ``response`` is the error envelope with ``status`` (and ``error`` if given).

    Args:
        response: an httpx response, or ``(status, headers, body)`` from a raw ASGI or
            socket exchange (header names lower-case).
        status: the status the test expects.
        error: the expected code; None accepts any code whose status is ``status``.

    Returns:
        The decoded envelope.
    """
    if isinstance(response, httpx.Response):
        got, headers, body = response.status_code, dict(response.headers), response.content
    else:
        got, headers, body = (
            response[0],
            {k.lower(): v for k, v in response[1].items()},
            response[2],
        )
    assert got == status, (got, body[:500])
    assert headers.get("content-type") == "application/json", headers
    data = json.loads(body)
    assert isinstance(data, dict), data
    assert set(data) == ENVELOPE_KEYS, data
    code = data["error"]
    assert isinstance(code, str), data
    assert _SNAKE.fullmatch(code), code
    if error is not None:
        assert code == error, data
    assert status in STATUS_OF_ERROR.get(code, set()), f"{code!r} is not a {status} error"
    assert isinstance(data["message"], str), data
    assert data["message"], data
    assert isinstance(data["details"], list), data
    for detail in data["details"]:
        assert isinstance(detail, dict), detail
        assert set(detail) == {"code", "message", "field"}, detail
        assert isinstance(detail["code"], str), detail
        assert detail["code"], detail
        assert isinstance(detail["message"], str), detail
        assert detail["field"] is None or isinstance(detail["field"], str), detail
    request_id = data["request_id"]
    assert isinstance(request_id, str), data
    assert _REQUEST_ID.fullmatch(request_id), request_id
    if headers.get("idempotent-replayed") != "true":
        # A replay is the first response byte for byte: its envelope names the request
        # that produced it, while X-Request-ID names this one.
        assert headers.get("x-request-id") == request_id, (headers, data)
    assert_no_leak(body)
    return data
