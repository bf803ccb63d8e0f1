"""The rule options that change *when* a rule decides or *whether* it refuses.

Small pure pieces, so any request path (the middleware today, a compiled pipeline later)
applies them the same way:

- ``count="failures"``: before the app runs, the rule is only *peeked* (``peek_spec``:
  would its cost fit?) inside the same store call as every other matching rule, so an
  empty bucket refuses without a second round trip; the token is taken after the
  response has started, and only when ``counts_as_failure(status)``. A success costs
  no store call of its own; a failure costs one more (the take).
- ``shadow=True``: decided and counted like any rule and reported in the headers, but a
  refusal is never sent (``shadow_only``, ``enforced_waits``).
"""

from __future__ import annotations

from collections.abc import Sequence

from asgi_armor.ratelimit import bucket

__all__ = ["counts_as_failure", "enforced_waits", "lacking", "peek_spec", "shadow_only"]

#: The messages that carry a response's status: an HTTP response, a refused handshake.
STATUS_MESSAGES = frozenset({"http.response.start", "websocket.http.response.start"})


def peek_spec(step: float, tolerance: float) -> tuple[float, float]:
    """The bucket spec that asks "would ``step`` seconds of tokens fit?" and takes nothing.

    GCRA allows when ``tat + step - now <= tolerance``; with a step of 0 and a tolerance
    of ``tolerance - step`` the store evaluates the same inequality and moves ``tat`` by
    nothing, so a peek rides in the one ``hit_buckets`` call (memory, Redis, Cluster: no
    new store operation).
    """
    return 0.0, tolerance - step


def counts_as_failure(status: int) -> bool:
    """Whether a response takes a ``count="failures"`` token: any status >= 400."""
    return status >= 400


def lacking(now: float, tats: Sequence[float], specs: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the buckets that lacked tokens in a refused decision."""
    return [
        index
        for index in range(len(tats))
        if bucket.retry_after(tats[index], now, specs[index][0], specs[index][1]) > 0.0
    ]


def shadow_only(indices: Sequence[int], shadow: Sequence[bool]) -> bool:
    """True when every bucket that refused belongs to a shadow rule: let it through."""
    return bool(indices) and all(shadow[index] for index in indices)


def enforced_waits(waits: Sequence[float], shadow: Sequence[bool]) -> list[float]:
    """The waits a refusal may report: a shadow rule's wait never becomes ``Retry-After``."""
    return [0.0 if shadow[index] else wait for index, wait in enumerate(waits)]
