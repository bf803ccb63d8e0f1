"""One rule for every count and duration in the config: bools, NaN, infinities and
fractions are refused alike, by the entry's name, at start-up."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest

from asgi_armor import _checks
from asgi_armor.breaker import CircuitBreaker
from asgi_armor.degrade import gather_partial
from asgi_armor.errors import ConfigError
from asgi_armor.idempotency import IdempotencyMiddleware
from asgi_armor.ratelimit.rate import Rate
from asgi_armor.shedding import ConcurrencyLimit
from asgi_armor.signing import SignatureMiddleware
from asgi_armor.stores.memory import MemoryStore
from asgi_armor.timeout import TimeoutMiddleware
from asgi_armor.validation import InputLimits


async def _app(scope: object, receive: object, send: object) -> None:
    raise AssertionError("never called")


def test_count() -> None:
    assert _checks.count(3, "n") == 3
    assert _checks.count(0, "n", minimum=0) == 0
    for bad in (True, 1.0, 0, -1, "1", None):
        with pytest.raises(ConfigError, match=r"^n must be a whole number >= 1, not "):
            _checks.count(bad, "n")
    with pytest.raises(ValueError, match="cost") as info:
        _checks.count(-1, "cost", minimum=0, error=ValueError)
    assert type(info.value) is ValueError


def test_seconds() -> None:
    assert _checks.seconds(1, "t") == 1.0
    assert type(_checks.seconds(1, "t")) is float
    assert _checks.seconds(0, "t", zero=True) == 0.0
    for bad in (0, -1.0, math.nan, math.inf, True):
        with pytest.raises(ConfigError, match=r"^t must be a positive number of seconds"):
            _checks.seconds(bad, "t")
    with pytest.raises(ConfigError, match="not a number"):
        _checks.seconds("1", "t")
    with pytest.raises(ConfigError, match=r"^t must be a number of seconds >= 0"):
        _checks.seconds(-1, "t", zero=True)


# The first five were accepted before the one rule (each entry had its own hand-written
# check); the rest pin that every other entry keeps to it.
CASES: list[tuple[str, Callable[[], object]]] = [
    ("max_keys", lambda: MemoryStore(max_keys=1.5)),  # type: ignore[arg-type]
    ("max_keys", lambda: MemoryStore(max_keys=True)),
    (
        "signature max_body_bytes",
        lambda: SignatureMiddleware(_app, routes={}, max_body_bytes=True),
    ),
    ("half_open_max_calls", lambda: CircuitBreaker(half_open_max_calls=True)),
    ("slow_call_seconds", lambda: CircuitBreaker(slow_call_seconds=math.inf)),
    ("window_size", lambda: CircuitBreaker(window_size=2.5)),  # type: ignore[arg-type]
    ("slow_call_seconds", lambda: CircuitBreaker(slow_call_seconds=math.nan)),
    ("max_pending", lambda: IdempotencyMiddleware(_app, routes=["POST /x"], max_pending=True)),
    ("rate period", lambda: Rate(1, True)),
    ("body_timeout", lambda: InputLimits(_app, body_timeout=math.nan)),
    ("queue_timeout", lambda: ConcurrencyLimit(_app, max_concurrent=1, queue_timeout=True)),
    ("timeout default", lambda: TimeoutMiddleware(_app, default=True)),
]


@pytest.mark.parametrize(("entry", "build"), CASES)
def test_every_entry_follows_the_one_rule(entry: str, build: Callable[[], object]) -> None:
    with pytest.raises(ValueError, match=entry):
        build()


@pytest.mark.anyio
async def test_gather_partial_refuses_an_infinite_timeout() -> None:
    # Accepted before (None is how a component says "no timeout").
    async def fetch() -> int:
        return 1

    with pytest.raises(ConfigError, match="timeout must be a positive number"):
        await gather_partial({"a": (fetch, None)}, timeout=math.inf)
