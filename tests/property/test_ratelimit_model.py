"""The limiter on a MemoryStore with a fake clock against a reference model that counts
tokens exactly (``fractions.Fraction``), refilling continuously up to the bucket depth;
then the same model on a Redis, a Sentinel service and a Redis Cluster.

``LimiterModel``: rates, clock steps and the start time are exact binary fractions, so the
float GCRA state holds the model's values exactly and both sides agree to the bit.
``NonBinaryLimiterModel``: intervals of 1/3, 1/7, 3/7 and 1/10 s, which no float holds, so
the GCRA state drifts by rounding and a bucket refilled to exactly the tokens asked for
sits within an ulp of the limit: there the epsilon must decide as the exact model does.
Decisions and token counts must still agree exactly; the times to the second.
"""

from __future__ import annotations

import asyncio
import math
import time
import uuid
from collections.abc import Coroutine
from fractions import Fraction
from typing import Any, ClassVar, TypeVar

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from asgi_armor.errors import RateLimited
from asgi_armor.ratelimit import Decision, Rate, RateLimiter
from asgi_armor.stores.base import Store
from asgi_armor.stores.cluster import RedisClusterStore
from asgi_armor.stores.memory import MemoryStore
from asgi_armor.stores.redis import RedisStore
from asgi_armor.stores.sentinel import RedisSentinelStore
from tests.conftest import FakeClock

T = TypeVar("T")

RATES = [
    Rate(4, 2),  # interval 0.5 s
    Rate(8, 1, burst=12),  # interval 0.125 s, deeper than its limit
    Rate(2, 4, burst=1),  # interval 2 s, shallower than its limit
    Rate(16, 8),  # interval 0.5 s, deep
]
KEYS = ["a", "b"]


def run(coroutine: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine that never suspends (MemoryStore never awaits) to completion."""
    try:
        coroutine.send(None)
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]
    coroutine.close()
    raise AssertionError("MemoryStore suspended")


class Bucket:
    """Exact token counting: ``tokens`` at time ``at``, refilled continuously."""

    def __init__(self, rate: Rate, now: Fraction) -> None:
        self.rate = rate
        self.per_second = Fraction(rate.limit) / Fraction(rate.period)
        self.tokens = Fraction(rate.capacity)
        self.at = now

    def refill(self, now: Fraction) -> None:
        self.tokens = min(
            Fraction(self.rate.capacity), self.tokens + (now - self.at) * self.per_second
        )
        self.at = now

    def seconds_for(self, tokens: Fraction) -> Fraction:
        return tokens / self.per_second


def take(buckets: list[Bucket], chosen: list[int], cost: int) -> list[Decision]:
    """The model's decision: ``cost`` tokens from every bucket or from none (each bucket
    ``chosen[i]`` named ``p<i>``), and what each decision reports."""
    allowed = all(b.tokens >= cost for b in buckets)
    if allowed:
        for b in buckets:
            b.tokens -= cost
    return [
        Decision(
            allowed,
            b.rate.capacity,
            math.floor(b.tokens),
            float(b.seconds_for(b.rate.capacity - b.tokens)),
            0.0 if allowed else float(max(Fraction(0), b.seconds_for(cost - b.tokens))),
            f"p{i}",
            b.rate,
        )
        for i, b in zip(chosen, buckets, strict=True)
    ]


class LimiterModel(RuleBasedStateMachine):
    rates: ClassVar[list[Rate]] = RATES
    #: Whether times (reset_after, retry_after) must agree to the bit.
    exact = True

    def __init__(self) -> None:
        super().__init__()
        self.clock = FakeClock(1024.0)
        self.store = MemoryStore(clock=self.clock)
        self.limiter = RateLimiter(self.store)
        self.buckets: dict[tuple[int, str], Bucket] = {}

    def now(self) -> Fraction:
        return Fraction(self.clock.now)

    def bucket(self, index: int, key: str) -> Bucket:
        found = self.buckets.get((index, key))
        if found is None:
            found = self.buckets[index, key] = Bucket(self.rates[index], self.now())
        found.refill(self.now())
        return found

    @rule(sixteenths=st.integers(0, 80))
    def advance(self, sixteenths: int) -> None:
        self.clock.advance(sixteenths / 16)

    @rule(
        chosen=st.lists(st.integers(0, 3), min_size=1, max_size=4, unique=True),
        key=st.sampled_from(KEYS),
        cost=st.integers(0, 3),
        enforce=st.booleans(),
    )
    def hit(self, chosen: list[int], key: str, cost: int, enforce: bool) -> None:
        rates = self.rates
        items = [(key, rates[i], f"p{i}") for i in chosen]
        if cost > min(rates[i].capacity for i in chosen):
            with pytest.raises(ValueError, match="exceeds the burst"):
                run(self.limiter.hit_many(items, cost))
            return
        buckets = [self.bucket(i, key) for i in chosen]
        expected = take(buckets, chosen, cost)
        if enforce and not expected[0].allowed:
            with pytest.raises(RateLimited) as info:
                run(self.limiter.hit_many(items, cost, enforce=True))
            longest = max(d.retry_after for d in expected)
            assert info.value.retry_after == math.ceil(longest)
            return
        got = run(self.limiter.hit_many(items, cost, enforce=enforce))
        if self.exact:
            assert got == expected
            return
        assert [(d.allowed, d.limit, d.remaining, d.policy, d.rate) for d in got] == [
            (d.allowed, d.limit, d.remaining, d.policy, d.rate) for d in expected
        ]
        for g, e in zip(got, expected, strict=True):
            assert g.reset_after == pytest.approx(e.reset_after, abs=1e-9)
            assert g.retry_after == pytest.approx(e.retry_after, abs=1e-9)

    @precondition(lambda self: bool(self.buckets))
    @rule(data=st.data())
    def peek(self, data: st.DataObject) -> None:
        index, key = data.draw(st.sampled_from(sorted(self.buckets)))
        b = self.bucket(index, key)
        decision = run(self.limiter.hit(key, self.rates[index], 0, policy=f"p{index}"))
        assert (decision.allowed, decision.remaining) == (True, math.floor(b.tokens))

    @invariant()
    def store_never_holds_more_than_the_depth(self) -> None:
        now = self.clock.now
        for key, tat in self.store._tats.items():
            index = int(key.split(":")[1][1:])
            assert tat - now <= self.rates[index].spec[1] + 1e-9


TestLimiterModel = LimiterModel.TestCase
TestLimiterModel.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)


class NonBinaryLimiterModel(LimiterModel):
    rates: ClassVar[list[Rate]] = [
        Rate.parse("3/second"),  # interval 1/3 s
        Rate.parse("7/second"),  # interval 1/7 s
        Rate(7, 3, burst=2),  # interval 3/7 s, shallow
        Rate(10, 1, burst=3),  # interval 0.1 s
    ]
    exact = False


TestNonBinaryLimiterModel = NonBinaryLimiterModel.TestCase
TestNonBinaryLimiterModel.settings = settings(
    max_examples=150, stateful_step_count=40, deadline=None
)


# The same model against the networked stores. Their clock is Redis's own and cannot be
# moved by hand, so the rates are slow (an interval of 2**16 s and more): the seconds a
# run takes refill a negligible fraction of a token, whole-token counts stay exact, and
# only the times (reset, retry) are compared within the seconds elapsed. Each layer may
# key on its own value, so on a cluster a decision spans several hash slots.
SLOW_RATES = [
    Rate(4, 2**22),  # interval 2**20 s
    Rate(8, 2**19, burst=12),  # interval 2**16 s, deeper than its limit
    Rate(2, 2**22, burst=1),  # interval 2**21 s, shallower than its limit
    Rate(16, 2**23),  # interval 2**19 s, deep
]


class StoreLimiterModel(RuleBasedStateMachine):
    """``LimiterModel`` on a store given by the test (set ``store`` and ``loop``)."""

    store: Store
    loop: asyncio.AbstractEventLoop

    def __init__(self) -> None:
        super().__init__()
        self.limiter = RateLimiter(self.store)
        self.run_id = uuid.uuid4().hex[:8]  # fresh buckets for every example
        self.started = time.monotonic()
        self.buckets: dict[tuple[int, str], Bucket] = {}

    def bucket(self, index: int, key: str) -> Bucket:
        found = self.buckets.get((index, key))
        if found is None:
            found = self.buckets[index, key] = Bucket(SLOW_RATES[index], Fraction(0))
        return found

    def slack(self) -> float:
        return time.monotonic() - self.started + 0.01

    def same(self, got: Decision, expected: Decision) -> None:
        slack = self.slack()
        assert (got.allowed, got.limit, got.remaining, got.policy, got.rate) == (
            expected.allowed,
            expected.limit,
            expected.remaining,
            expected.policy,
            expected.rate,
        )
        assert expected.reset_after - slack <= got.reset_after <= expected.reset_after + 1e-6
        assert expected.retry_after - slack <= got.retry_after <= expected.retry_after + 1e-6

    @rule(
        chosen=st.lists(
            st.integers(0, len(SLOW_RATES) - 1), min_size=1, max_size=len(SLOW_RATES), unique=True
        ),
        keys=st.lists(st.sampled_from(KEYS), min_size=len(SLOW_RATES), max_size=len(SLOW_RATES)),
        cost=st.integers(0, 3),
        enforce=st.booleans(),
    )
    def hit(self, chosen: list[int], keys: list[str], cost: int, enforce: bool) -> None:
        items = [(self.run_id + keys[i], SLOW_RATES[i], f"p{i}") for i in chosen]
        if cost > min(SLOW_RATES[i].capacity for i in chosen):
            with pytest.raises(ValueError, match="exceeds the burst"):
                self.loop.run_until_complete(self.limiter.hit_many(items, cost))
            return
        buckets = [self.bucket(i, keys[i]) for i in chosen]
        expected = take(buckets, chosen, cost)
        if enforce and not expected[0].allowed:
            with pytest.raises(RateLimited) as info:
                self.loop.run_until_complete(self.limiter.hit_many(items, cost, enforce=True))
            longest = math.ceil(max(d.retry_after for d in expected))
            assert longest - math.ceil(self.slack()) <= info.value.retry_after <= longest
            return
        got = self.loop.run_until_complete(self.limiter.hit_many(items, cost, enforce=enforce))
        for decision, want in zip(got, expected, strict=True):
            self.same(decision, want)

    @precondition(lambda self: bool(self.buckets))
    @rule(data=st.data())
    def peek(self, data: st.DataObject) -> None:
        index, key = data.draw(st.sampled_from(sorted(self.buckets)))
        b = self.bucket(index, key)
        decision = self.loop.run_until_complete(
            self.limiter.hit(self.run_id + key, SLOW_RATES[index], 0, policy=f"p{index}")
        )
        assert (decision.allowed, decision.remaining) == (True, math.floor(b.tokens))


@pytest.mark.parametrize("backend", ["redis", "sentinel", "cluster"])
def test_limiter_model_on_networked_stores(backend: str, request: pytest.FixtureRequest) -> None:
    """The state machine on one (private) Redis, on the Sentinel service's master and on
    the Redis Cluster: the same exact decisions as the reference model."""
    group = request.getfixturevalue("redis_sentinel")
    prefix = f"armortest:{uuid.uuid4().hex[:12]}:"
    store: Store
    if backend == "redis":
        store = RedisStore.from_url(f"redis://127.0.0.1:{group.master_port()}/0", prefix=prefix)
    elif backend == "sentinel":
        store = RedisSentinelStore.from_url(group.url, prefix=prefix)
    else:
        store = RedisClusterStore.from_url(
            request.getfixturevalue("redis_cluster").url, prefix=prefix
        )
    loop = asyncio.new_event_loop()

    class Model(StoreLimiterModel):
        pass

    Model.store = store
    Model.loop = loop
    try:
        run_state_machine_as_test(
            Model,
            settings=settings(
                max_examples=25,
                stateful_step_count=30,
                deadline=None,
                suppress_health_check=[HealthCheck.too_slow],
            ),
        )
    finally:
        loop.run_until_complete(store.aclose())
        loop.close()
