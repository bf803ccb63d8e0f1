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
from typing import TYPE_CHECKING

from asgi_armor.ratelimit.bucket import EPSILON

if TYPE_CHECKING:
    from asgi_armor.ratelimit.limiter import Decision
    from asgi_armor.ratelimit.rate import Rate

__all__ = [
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
    "decision_headers",
    "most_restrictive",
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

PARAM_QUOTA = "q"
PARAM_WINDOW = "w"
PARAM_REMAINING = "r"
PARAM_RESET = "t"


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
    return (
        f"{sf_string(name)};{PARAM_REMAINING}={remaining};"
        f"{PARAM_RESET}={whole_seconds(reset_after)}"
    )


def most_restrictive(decisions: Sequence[Decision]) -> int:
    """Index of the layer to report: the denying one with the longest wait, else the one
    with the fewest tokens left (ties: the one that takes longest to refill)."""
    best = 0
    if decisions[0].allowed:
        for index, decision in enumerate(decisions):
            chosen = decisions[best]
            if decision.remaining < chosen.remaining or (
                decision.remaining == chosen.remaining and decision.reset_after > chosen.reset_after
            ):
                best = index
    else:
        for index, decision in enumerate(decisions):
            if decision.retry_after > decisions[best].retry_after:
                best = index
    return best


def decision_headers(decisions: Sequence[Decision], wall: float) -> dict[str, str]:
    """Every rate-limit header for the layers of one request.

    Args:
        decisions: one per layer, as returned together by the limiter.
        wall: the current Unix time; used only to express ``X-RateLimit-Reset``.
    """
    chosen = decisions[most_restrictive(decisions)]
    headers = {
        LIMIT: str(chosen.limit),
        REMAINING: str(chosen.remaining),
        RESET: str(math.ceil(wall + chosen.reset_after)),
    }
    policies = [policy_item(d.policy, d.rate) for d in decisions if d.rate is not None]
    if policies:
        headers[POLICY] = ", ".join(policies)
    headers[RATELIMIT] = ratelimit_item(chosen.policy, chosen.remaining, chosen.reset_after)
    return headers
