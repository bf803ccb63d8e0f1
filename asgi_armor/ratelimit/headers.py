"""Rate-limit response headers: every wire name and format lives here, and only here.

Two families are sent:

* the de-facto ``X-RateLimit-Limit`` / ``X-RateLimit-Remaining`` / ``X-RateLimit-Reset``
  (Unix epoch seconds when the bucket is full again), for the most restrictive layer;
* the IETF fields of draft-ietf-httpapi-ratelimit-headers-11 (RFC 9651 structured fields):
  ``RateLimit-Policy: "ip";q=1000;w=60`` (a List, one item per policy that applies) and
  ``RateLimit: "ip";r=993;t=4`` (``r`` remaining quota, ``t`` whole seconds until the quota
  is fully back) for the most restrictive policy.

An open draft change may rename ``r``/``t``; only the constants below would change.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal

from asgi_armor.ratelimit import bucket
from asgi_armor.ratelimit.bucket import EPSILON

if TYPE_CHECKING:
    from asgi_armor.ratelimit.limiter import Decision
    from asgi_armor.ratelimit.rate import Rate

__all__ = [
    "HEADER_SETS",
    "LIMIT",
    "PARAM_QUOTA",
    "PARAM_REMAINING",
    "PARAM_RESET",
    "PARAM_WINDOW",
    "POLICY",
    "RATELIMIT",
    "REMAINING",
    "RESET",
    "RETRY_AFTER",
    "HeaderSet",
    "decision_headers",
    "fields",
    "most_restrictive",
    "named",
    "policy_item",
    "ratelimit_item",
    "sf_string",
    "whole_seconds",
]

LIMIT = "X-RateLimit-Limit"
REMAINING = "X-RateLimit-Remaining"
RESET = "X-RateLimit-Reset"
POLICY = "RateLimit-Policy"
RATELIMIT = "RateLimit"
RETRY_AFTER = "Retry-After"

#: Which rate-limit fields a response carries: ``"all"`` (the default), ``"ietf"`` (only
#: ``RateLimit`` and ``RateLimit-Policy``), ``"legacy"`` (only ``X-RateLimit-*``) or
#: ``"none"`` (``Retry-After`` on a 429 alone). Every field is one more the server writes
#: per response; ``"ietf"`` is what ``asgi_armor.client`` paces itself from.
HeaderSet = Literal["all", "ietf", "legacy", "none"]
HEADER_SETS: tuple[HeaderSet, ...] = ("all", "ietf", "legacy", "none")

PARAM_QUOTA = "q"
PARAM_WINDOW = "w"
PARAM_REMAINING = "r"
PARAM_RESET = "t"

_LIMIT = LIMIT.lower().encode()
_REMAINING = REMAINING.lower().encode()
_RESET = RESET.lower().encode()
_POLICY = POLICY.lower().encode()
_RATELIMIT = RATELIMIT.lower().encode()
_R = PARAM_REMAINING.encode()
_T = PARAM_RESET.encode()
_NAMES = {
    _LIMIT: LIMIT,
    _REMAINING: REMAINING,
    _RESET: RESET,
    _POLICY: POLICY,
    _RATELIMIT: RATELIMIT,
}


def sf_string(value: str) -> str:
    """``value`` as an RFC 9651 sf-string (quoted, ``"`` and ``\\`` escaped).

    Raises:
        ValueError: ``value`` has characters an sf-string cannot carry (non-printable ASCII).
    """
    if not all(" " <= char <= "~" for char in value):
        raise ValueError(f"{value!r} is not printable ASCII, so it cannot be a policy name")
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def whole_seconds(seconds: float) -> int:
    """``seconds`` rounded up to a whole second, ignoring float noise below ``EPSILON``.

    Honest for ``Retry-After``: the bucket math allows a request up to ``EPSILON`` early,
    so a client that waits this long is let through, and ``6.000000001`` stays ``6``.
    """
    return max(0, math.ceil(seconds - EPSILON))


def policy_item(name: str, rate: Rate) -> str:
    """One ``RateLimit-Policy`` list member: ``"name";q=<limit>;w=<period seconds>``."""
    return f"{sf_string(name)};{PARAM_QUOTA}={rate.limit};{PARAM_WINDOW}={rate.window}"


def ratelimit_item(name: str, remaining: int, reset_after: float) -> str:
    """One ``RateLimit`` list member: ``"name";r=<remaining>;t=<seconds until full>``."""
    return _ratelimit_value(sf_string(name).encode(), b"%d" % remaining, reset_after).decode()


def _ratelimit_value(name: bytes, remaining: bytes, reset_after: float) -> bytes:
    return b"%s;%s=%s;%s=%d" % (name, _R, remaining, _T, whole_seconds(reset_after))


def most_restrictive(decisions: Sequence[Decision]) -> int:
    """Index of the layer to report: the denying one with the longest wait, else the one
    with the fewest tokens left (ties: the one that takes longest to refill)."""
    if decisions[0].allowed:
        return bucket.most_restrictive(
            True, [d.remaining for d in decisions], [d.reset_after for d in decisions], ()
        )
    return bucket.most_restrictive(False, (), (), [d.retry_after for d in decisions])


def fields(
    limit: bytes,
    remaining: int,
    reset_after: float,
    wall: float,
    policy: bytes,
    name: bytes,
    which: HeaderSet = "all",
) -> list[tuple[bytes, bytes]]:
    """The rate-limit header fields of the reported bucket, as ASGI (lower-case) headers.

    Args:
        limit: the bucket depth, as digits.
        remaining: whole tokens left.
        reset_after: seconds until the bucket is full again.
        wall: the current Unix time; used only to express ``X-RateLimit-Reset``.
        policy: the ``RateLimit-Policy`` value (``b""``: none is sent).
        name: the reported policy's name as an sf-string (``sf_string(name)``).
        which: the fields to send (``HeaderSet``; ``"none"`` gives none).
    """
    left = b"%d" % remaining
    raw: list[tuple[bytes, bytes]] = []
    if which == "all" or which == "legacy":
        raw += [
            (_LIMIT, limit),
            (_REMAINING, left),
            (_RESET, b"%d" % math.ceil(wall + reset_after)),
        ]
    if which == "all" or which == "ietf":
        if policy:
            raw.append((_POLICY, policy))
        raw.append((_RATELIMIT, _ratelimit_value(name, left, reset_after)))
    return raw


def decision_headers(decisions: Sequence[Decision], wall: float) -> dict[str, str]:
    """Every rate-limit header for the layers of one request.

    Args:
        decisions: one per layer, as returned together by the limiter.
        wall: the current Unix time; used only to express ``X-RateLimit-Reset``.
    """
    chosen = decisions[most_restrictive(decisions)]
    policies = [policy_item(d.policy, d.rate) for d in decisions if d.rate is not None]
    raw = fields(
        str(chosen.limit).encode(),
        chosen.remaining,
        chosen.reset_after,
        wall,
        ", ".join(policies).encode(),
        sf_string(chosen.policy).encode(),
    )
    return named(raw)


def named(raw: Sequence[tuple[bytes, bytes]]) -> dict[str, str]:
    """``fields``' headers keyed by their canonical names (``X-RateLimit-Limit``, ...)."""
    return {_NAMES[name]: value.decode() for name, value in raw}
