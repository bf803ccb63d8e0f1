"""Who is calling: the ``identify(scope)`` hook shared by per-user limits and idempotency.

The hook returns a principal (user id, API key id, ...) or None for anonymous callers.
It may be sync or async. It runs at most once per request: the answer is kept in
``scope["state"]["principal"]``. A hook that raises is not swallowed: the request fails
(500 internal_error), it is never let through as anonymous.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable

from asgi_armor._asgi import Scope, scope_state

__all__ = ["Identify", "principal"]

Identify = Callable[[Scope], str | Awaitable[str | None] | None]

_KEY = "principal"
_UNSET = object()


async def principal(scope: Scope, identify: Identify | None) -> str | None:
    """The principal of this request according to ``identify`` (None: anonymous)."""
    if identify is None:
        return None
    state = scope_state(scope)
    found = state.get(_KEY, _UNSET)
    if found is not _UNSET:
        return found  # type: ignore[no-any-return]
    raw: object = identify(scope)
    # The common answers (a name, or None) skip the awaitable check, which costs more.
    if raw is not None and type(raw) is not str and inspect.isawaitable(raw):
        raw = await raw
    # Hooks return ids from databases (ints, UUIDs): keys need text. An empty id is anonymous.
    result = None if raw is None or raw == "" else str(raw)
    state[_KEY] = result
    return result
