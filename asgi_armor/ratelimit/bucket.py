"""Token-bucket math on one float per key (GCRA-equivalent), pure and I/O-free.

A bucket of ``burst`` tokens refilled at one token every ``interval`` seconds is kept as
its theoretical arrival time ``tat``: the moment it will be full again. With
``tolerance = burst * interval``, taking ``cost`` tokens at ``now`` is allowed when
``max(tat, now) + cost * interval - now <= tolerance``, and moves ``tat`` forward by
``cost * interval``. A missing or past ``tat`` is a full bucket, so stores may forget a
key once its ``tat`` has passed. ``decide_one`` is that step (``decide`` takes it for one
bucket, and writes it out for several); the Redis Lua script implements exactly ``decide``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

__all__ = [
    "EPSILON",
    "decide",
    "decide_one",
    "give_back",
    "most_restrictive",
    "remaining",
    "report",
    "reset_after",
    "retry_after",
    "spec",
    "status",
]

#: Slack for float rounding, so ten 6-second tokens fit a 60-second tolerance.
EPSILON = 1e-6
_floor = math.floor


def spec(limit: int, period: float, burst: int | None = None) -> tuple[float, float]:
    """``(interval, tolerance)`` for ``limit`` tokens per ``period`` seconds, ``burst`` deep."""
    interval = period / limit
    return interval, interval * (limit if burst is None else burst)


def decide_one(
    tat: float | None, now: float, interval: float, tolerance: float, cost: int
) -> tuple[bool, float]:
    """Take ``cost`` tokens from one bucket: ``(allowed, tat)``.

    ``tat`` is the bucket's new "full at" time when allowed, else its current one
    (clamped to ``now``). The GCRA step itself: ``decide`` and the stores' one-bucket
    paths call it, so there is one implementation to keep in step with the Lua script.
    """
    # The same float operations in the same order as the Lua script, so memory and Redis
    # agree to the last bit.
    if tat is None or tat < now:
        tat = now
    step = cost * interval
    if tat + step - now > tolerance + EPSILON:
        return False, tat
    return True, tat + step


def decide(
    tats: Sequence[float | None], now: float, specs: Sequence[tuple[float, float]], cost: int
) -> tuple[bool, list[float]]:
    """Take ``cost`` tokens from every bucket or from none.

    Returns ``(allowed, tats)``: the new ``tat`` of each bucket, or the current ones
    (clamped to ``now``) when any bucket lacks the tokens.

    Raises:
        ValueError: ``tats`` and ``specs`` differ in length.
    """
    # Hot path of every rate-limited request: plain loops, no zip(strict=True) (its keyword
    # call alone costs more than the math).
    if len(tats) == 1 and len(specs) == 1:
        interval, tolerance = specs[0]
        allowed, taken = decide_one(tats[0], now, interval, tolerance, cost)
        return allowed, [taken]
    if len(tats) != len(specs):
        raise ValueError(f"decide: {len(tats)} tats for {len(specs)} specs")
    new: list[float] = []
    # decide_one's step, written out: a call per bucket would cost the middleware's
    # several-rule checks more than the step itself (tests hold the two to the same bits).
    for tat, (interval, tolerance) in zip(tats, specs):  # noqa: B905 - lengths checked
        if tat is None or tat < now:
            tat = now
        step = cost * interval
        if tat + step - now > tolerance + EPSILON:
            return False, [now if tat is None or tat < now else tat for tat in tats]
        new.append(tat + step)
    return True, new


def give_back(tat: float | None, now: float, added: float, before: float) -> float:
    """A bucket's ``tat`` after giving back what an earlier take added to it.

    ``added`` is the seconds that take moved the bucket (``cost * interval``), ``before``
    its ``tat`` before the take. Never more than the take added, and less by the time the
    bucket has refilled since: had the take never happened, the bucket would have been
    full for that long, and a full bucket gains nothing. The result is at least ``now``
    (``now`` itself: the bucket is full and may be forgotten). The Redis script's negative
    cost computes exactly this.
    """
    if tat is None or tat < now:
        return now
    back = added - max(0.0, now - before)
    if back > 0.0:
        return max(now, tat - back)
    return tat


def status(tat: float, now: float, interval: float, tolerance: float) -> tuple[int, float]:
    """``(remaining, reset_after)`` of the bucket at ``now``, in one call: what every
    response reports (``remaining`` is its first half)."""
    reset = tat - now if tat > now else 0.0
    left = _floor((tolerance - reset) / interval + EPSILON)
    return (left if left > 0 else 0), reset


def remaining(tat: float, now: float, interval: float, tolerance: float) -> int:
    """Whole tokens left in the bucket at ``now``."""
    return status(tat, now, interval, tolerance)[0]


def reset_after(tat: float, now: float) -> float:
    """Seconds until the bucket is full again."""
    # max(0.0, tat - now) without the builtin call (the same value for every float), and
    # the same expression as ``status``.
    return tat - now if tat > now else 0.0


def retry_after(tat: float, now: float, interval: float, tolerance: float, cost: int = 1) -> float:
    """Seconds until ``cost`` tokens are available (0 when they are now)."""
    wait = max(tat, now) + cost * interval - tolerance - now
    return wait if wait > EPSILON else 0.0


def report(
    tats: Sequence[float], now: float, rates: Sequence[tuple[float, float]]
) -> tuple[int, int, float]:
    """The bucket an allowed response reports: ``(index, remaining, reset_after)``.

    ``most_restrictive(True, ...)`` over ``remaining`` and ``reset_after`` of each bucket
    (``rates``: each bucket's ``(interval, tolerance)`` for one token), in one pass.
    """
    best = -1
    best_left = 0
    best_reset = 0.0
    for index in range(len(tats)):
        interval, tolerance = rates[index]
        tat = tats[index]
        left, reset = status(tat, now, interval, tolerance)
        if best < 0 or _tighter(left, reset, best_left, best_reset):
            best, best_left, best_reset = index, left, reset
    return best, best_left, best_reset


def _tighter(left: int, reset: float, best_left: int, best_reset: float) -> bool:
    """Fewer tokens left, or as few and longer to refill: the one rule of allowed reports."""
    return left < best_left or (left == best_left and reset > best_reset)


def most_restrictive(
    allowed: bool,
    remainings: Sequence[int],
    reset_afters: Sequence[float],
    retry_afters: Sequence[float],
) -> int:
    """Index of the bucket a response reports, among those decided together.

    Denied: the bucket with the longest wait (``retry_afters``, the others may be empty).
    Allowed: the one with the fewest tokens left, ties going to the one that takes longest
    to refill (``remainings`` and ``reset_afters``).
    """
    best = 0
    if allowed:
        for index in range(1, len(remainings)):
            if _tighter(
                remainings[index], reset_afters[index], remainings[best], reset_afters[best]
            ):
                best = index
    else:
        for index in range(1, len(retry_afters)):
            if retry_afters[index] > retry_afters[best]:
                best = index
    return best
