"""The limiter on the batching ``RedisStore`` against the exact token model of
``test_ratelimit_model``: each step sends a burst of concurrent decisions (shared
round trips, split into several batches), and every decision must be the one the model
makes when it takes them in the order they were issued.

Redis keeps its own clock, so rates here refill far below one token over a run (hours
per token): the model's buckets never refill, and no decision can depend on timing.
With one batch in flight, batches (and the calls within one) reach Redis in the order
the calls were issued.
"""

from __future__ import annotations

import asyncio
import math
import uuid
from typing import Any

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, rule, run_state_machine_as_test

from asgi_armor.ratelimit import Rate, RateLimiter
from asgi_armor.stores.redis import RedisStore
from tests.property.test_ratelimit_model import Bucket

RATES = [
    Rate(4, 3600),
    Rate(8, 3600, burst=12),
    Rate(2, 7200, burst=1),
    Rate(16, 86400),
]
KEYS = ["a", "b"]

hits = st.lists(
    st.tuples(
        st.lists(st.integers(0, len(RATES) - 1), min_size=1, max_size=len(RATES), unique=True),
        st.sampled_from(KEYS),
        st.integers(0, 2),
    ),
    min_size=1,
    max_size=12,
)


class RedisLimiterModel(RuleBasedStateMachine):
    """One store per run (a fresh key prefix), driven on one event loop."""

    redis_url = ""

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.prefix = f"armortest:{uuid.uuid4().hex[:12]}:"
        self.store = RedisStore.from_url(
            self.redis_url, prefix=self.prefix, max_in_flight=1, max_batch=3
        )
        self.limiter = RateLimiter(self.store)
        self.buckets: dict[tuple[int, str], Bucket] = {}

    def bucket(self, index: int, key: str) -> Bucket:
        found = self.buckets.get((index, key))
        if found is None:
            found = self.buckets[index, key] = Bucket(RATES[index], 0)
        return found

    @rule(burst=hits)
    def concurrent_hits(self, burst: list[tuple[list[int], str, int]]) -> None:
        burst = [
            (chosen, key, cost)
            for chosen, key, cost in burst
            if cost <= min(RATES[i].capacity for i in chosen)
        ]
        if not burst:
            return

        async def send() -> list[Any]:
            return await asyncio.gather(
                *(
                    self.limiter.hit_many([(key, RATES[i], f"p{i}") for i in chosen], cost)
                    for chosen, key, cost in burst
                )
            )

        got = self.loop.run_until_complete(send())
        for (chosen, key, cost), decisions in zip(burst, got, strict=True):
            buckets = [self.bucket(i, key) for i in chosen]
            allowed = all(b.tokens >= cost for b in buckets)
            if allowed:
                for b in buckets:
                    b.tokens -= cost
            assert [(d.allowed, d.remaining, d.limit) for d in decisions] == [
                (allowed, math.floor(b.tokens), b.rate.capacity) for b in buckets
            ]
            for decision, b in zip(decisions, buckets, strict=True):
                wait = 0.0 if allowed else float(max(0, b.seconds_for(cost - b.tokens)))
                assert decision.retry_after == pytest.approx(wait, abs=1.0)
        assert self.limiter.store_errors == 0

    def teardown(self) -> None:
        import redis

        self.loop.run_until_complete(self.store.aclose())
        self.loop.close()
        client = redis.Redis.from_url(self.redis_url)
        try:
            keys = list(client.scan_iter(match=self.prefix + "*", count=1000))
            if keys:
                client.delete(*keys)
        finally:
            client.close()


@pytest.mark.redis
def test_batched_decisions_match_the_model(redis_url: str) -> None:
    RedisLimiterModel.redis_url = redis_url
    run_state_machine_as_test(
        RedisLimiterModel,
        settings=settings(max_examples=40, stateful_step_count=12, deadline=None),
    )
