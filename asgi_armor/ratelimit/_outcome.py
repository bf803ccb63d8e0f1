"""The rule options that change *when* a rule is charged or *whether* it refuses.

Small pure pieces, so every request path (the middleware, ``armor()``'s pipeline, the
FastAPI dependency) applies them the same way:

- ``count="failures"``: the token is taken before the app runs, in the same store call
  as every other matching rule (so an empty bucket refuses, and concurrent attempts can
  never outnumber the tokens: each one holds its own), and given back when the response
  starts with a status below 400 (``refunded``, ``give_back_specs``), in one more call.
  A failure costs no call of its own; a success one.
- ``shadow=True``: decided and counted like any rule and reported in the headers, but a
  refusal is never sent (``shadow_only``, ``enforced_waits``).
"""

from __future__ import annotations

from collections.abc import Sequence

from asgi_armor.ratelimit import bucket

__all__ = [
    "STATUS_MESSAGES",
    "enforced_waits",
    "give_back_specs",
    "lacking",
    "refunded",
    "shadow_only",
]

#: The messages that carry a response's status: an HTTP response, a refused handshake.
STATUS_MESSAGES = frozenset({"http.response.start", "websocket.http.response.start"})


def refunded(status: int) -> bool:
    """Whether a response gives a ``count="failures"`` token back: any status below 400."""
    return status < 400


def give_back_specs(steps: Sequence[float], tats: Sequence[float]) -> list[tuple[float, float]]:
    """The negative-cost ``hit_buckets`` specs that undo takes of ``steps`` seconds.

    ``tats`` are the buckets' full-at times right after the take (as the store returned
    them): each take added its step, so the time before it was ``tat - step``.
    """
    return [(steps[i], tats[i] - steps[i]) for i in range(len(steps))]


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
