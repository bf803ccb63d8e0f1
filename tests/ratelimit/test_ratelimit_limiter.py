"""RateLimiter on MemoryStore driven by a fake clock: exact limits, refill, burst, cost,
all-or-nothing layers, enforcement and the store failure policy."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

import anyio
import anyio.lowlevel
import pytest

from asgi_armor.errors import ConfigError, RateLimited, ServiceUnavailable, render
from asgi_armor.ratelimit import Decision, Rate, RateLimiter
from asgi_armor.stores.base import BucketSpec, RateLimitStore, StoreError
from asgi_armor.stores.memory import MemoryStore

if TYPE_CHECKING:
    from tests.conftest import FakeClock

pytestmark = pytest.mark.anyio


class FailingStore:
    """A store whose backend is down: every call fails the way a real store reports it."""

    def __init__(self) -> None:
        self.calls = 0

    async def hit_buckets(
        self, keys: Sequence[str], specs: Sequence[BucketSpec], cost: int
    ) -> tuple[bool, float, list[float]]:
        self.calls += 1
        raise StoreError("connection refused")


class RecordingStore:
    """A MemoryStore that remembers the keys it was asked about."""

    def __init__(self, inner: MemoryStore) -> None:
        self.inner = inner
        self.calls: list[list[str]] = []

    async def hit_buckets(
        self, keys: Sequence[str], specs: Sequence[BucketSpec], cost: int
    ) -> tuple[bool, float, list[float]]:
        self.calls.append(list(keys))
        return await self.inner.hit_buckets(keys, specs, cost)


def test_stores_implement_the_protocol() -> None:
    assert isinstance(MemoryStore(), RateLimitStore)
    assert isinstance(FailingStore(), RateLimitStore)


@pytest.fixture
def limiter(clock: FakeClock) -> RateLimiter:
    return RateLimiter(MemoryStore(clock=clock))


async def test_exact_limit_then_denied(limiter: RateLimiter) -> None:
    rate = Rate.parse("10/minute")
    for n in range(10):
        decision = await limiter.hit("k", rate)
        assert decision == Decision(True, 10, 9 - n, 6.0 * (n + 1), 0.0, "10/minute", rate)
    denied = await limiter.hit("k", rate)
    assert denied == Decision(False, 10, 0, 60.0, 6.0, "10/minute", rate)


async def test_refill_over_time(limiter: RateLimiter, clock: FakeClock) -> None:
    rate = Rate.parse("10/minute")
    for _ in range(10):
        assert (await limiter.hit("k", rate)).allowed
    clock.advance(5.5)
    denied = await limiter.hit("k", rate)
    assert not denied.allowed
    assert denied.retry_after == pytest.approx(0.5)
    clock.advance(0.5)
    assert (await limiter.hit("k", rate)).allowed
    assert not (await limiter.hit("k", rate)).allowed
    clock.advance(60)  # long idle: the bucket is full again, and no fuller
    for n in range(10):
        assert (await limiter.hit("k", rate)).remaining == 9 - n
    assert not (await limiter.hit("k", rate)).allowed


async def test_burst(limiter: RateLimiter, clock: FakeClock) -> None:
    rate = Rate.parse("10/minute burst 20")
    results = [(await limiter.hit("k", rate)).allowed for _ in range(21)]
    assert results == [True] * 20 + [False]
    clock.advance(6)
    decision = await limiter.hit("k", rate)
    assert (decision.allowed, decision.limit, decision.remaining) == (True, 20, 0)
    assert not (await limiter.hit("k", rate)).allowed


async def test_cost(limiter: RateLimiter, clock: FakeClock) -> None:
    rate = Rate.parse("10/minute")
    for left in (7, 4, 1):
        assert (await limiter.hit("k", rate, cost=3)).remaining == left
    denied = await limiter.hit("k", rate, cost=3)
    assert (denied.allowed, denied.remaining, denied.retry_after) == (False, 1, 12.0)
    assert (await limiter.hit("k", rate, cost=1)).allowed  # the cheap request still fits
    clock.advance(18)
    assert (await limiter.hit("k", rate, cost=3)).allowed


async def test_cost_zero_only_looks(limiter: RateLimiter) -> None:
    rate = Rate.parse("2/minute")
    await limiter.hit("k", rate)
    peek = await limiter.hit("k", rate, cost=0)
    assert (peek.allowed, peek.remaining) == (True, 1)
    assert (await limiter.hit("k", rate)).remaining == 0


async def test_impossible_costs_are_clear_errors(limiter: RateLimiter) -> None:
    with pytest.raises(ValueError, match=r"cost 11 exceeds the burst of 10/minute \(10\)"):
        await limiter.hit("k", "10/minute", cost=11)
    with pytest.raises(ValueError, match="cost must be a whole number >= 0"):
        await limiter.hit("k", "10/minute", cost=-1)
    assert (await limiter.hit("k", "10/minute burst 20", cost=20)).allowed


async def test_rate_text_and_policy_namespaces(limiter: RateLimiter) -> None:
    assert (await limiter.hit("k", "1/minute")).allowed
    assert not (await limiter.hit("k", "1/minute")).allowed
    # Another policy name is another bucket for the same key.
    decision = await limiter.hit("k", "1/minute", policy="other")
    assert (decision.allowed, decision.policy) == (True, "other")
    assert (await limiter.hit("k2", "1/minute")).allowed


async def test_all_or_nothing_across_layers(limiter: RateLimiter) -> None:
    wide, narrow = Rate.parse("10/minute"), Rate.parse("2/minute")
    items = [("ip", wide, "wide"), ("ip", narrow, "narrow")]
    for _ in range(2):
        assert all(d.allowed for d in await limiter.hit_many(items))
    denied = await limiter.hit_many(items)
    assert [d.allowed for d in denied] == [False, False]
    assert [d.retry_after for d in denied] == [0.0, 30.0]  # only the narrow layer lacks tokens
    assert [d.remaining for d in denied] == [8, 0]
    # The denied request took nothing from the wide layer.
    assert (await limiter.hit("ip", wide, policy="wide")).remaining == 7


async def test_hit_many_rejects_bad_input(limiter: RateLimiter) -> None:
    with pytest.raises(ValueError, match="at least one"):
        await limiter.hit_many([])
    with pytest.raises(ValueError, match="same bucket twice"):
        await limiter.hit_many([("a", "1/s"), ("a", "1/s")])


async def test_long_keys_are_hashed(clock: FakeClock) -> None:
    store = RecordingStore(MemoryStore(clock=clock))
    limiter = RateLimiter(store)
    await limiter.hit("x" * 10_000, "1/minute", policy="p")
    await limiter.hit("short", "1/minute", policy="p")
    long_key, short_key = store.calls[0][0], store.calls[1][0]
    assert short_key == "rl:p:short"
    assert long_key.startswith("rl:p:h")
    assert len(long_key) < 60
    assert not (await limiter.hit("x" * 10_000, "1/minute", policy="p")).allowed


async def test_enforce_raises_rate_limited_with_headers(limiter: RateLimiter) -> None:
    rate = Rate.parse("2/minute")
    await limiter.enforce("k", rate)
    await limiter.hit("k", rate, enforce=True)
    with pytest.raises(RateLimited) as info:
        await limiter.enforce("k", rate)
    exc = info.value
    assert exc.retry_after == 30
    assert exc.headers["Retry-After"] == "30"
    assert exc.headers["X-RateLimit-Limit"] == "2"
    assert exc.headers["X-RateLimit-Remaining"] == "0"
    assert exc.headers["RateLimit-Policy"] == '"2/minute";q=2;w=60'
    assert exc.headers["RateLimit"] == '"2/minute";r=0;t=60'
    status, headers, body = render(exc, "req_1")
    assert status == 429
    assert (b"retry-after", b"30") in headers
    assert body == (
        b'{"error":"rate_limited","message":"Rate limit exceeded","details":[],'
        b'"request_id":"req_1"}'
    )


async def test_enforce_many(limiter: RateLimiter) -> None:
    items = [("a", "5/minute"), ("a", "1/hour")]
    await limiter.hit_many(items, enforce=True)
    with pytest.raises(RateLimited) as info:
        await limiter.hit_many(items, enforce=True)
    assert info.value.retry_after == 3600
    assert info.value.headers["RateLimit"] == '"1/hour";r=0;t=3600'
    assert info.value.headers["RateLimit-Policy"] == '"5/minute";q=5;w=60, "1/hour";q=1;w=3600'


async def test_store_failure_allow_logs_once_per_interval_and_counts(
    clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    store = FailingStore()
    limiter = RateLimiter(store, clock=clock, warn_every=60)
    caplog.set_level(logging.WARNING, logger="asgi_armor.ratelimit")
    for _ in range(5):
        decision = await limiter.hit("k", "1/minute")
        assert decision == Decision(True, 1, 1, 0.0, 0.0, "1/minute", Rate(1, 60))
    assert store.calls == limiter.store_errors == 5
    assert len(caplog.records) == 1
    assert "rate-limit store failed" in caplog.records[0].getMessage()
    clock.advance(60)
    await limiter.hit("k", "1/minute")
    assert len(caplog.records) == 2
    assert limiter.store_errors == 6


async def test_store_failure_deny(clock: FakeClock) -> None:
    limiter = RateLimiter(FailingStore(), on_store_error="deny", clock=clock)
    with pytest.raises(ServiceUnavailable) as info:
        await limiter.hit("k", "1/minute")
    assert info.value.status == 503
    assert info.value.headers == {"Retry-After": "1"}
    assert limiter.store_errors == 1


def test_bad_failure_policy() -> None:
    with pytest.raises(ConfigError, match="on_store_error: 'maybe'"):
        RateLimiter(MemoryStore(), on_store_error="maybe")  # type: ignore[arg-type]


async def test_concurrency_exact_on_memory(limiter: RateLimiter) -> None:
    rate = Rate.parse("50/hour")
    allowed = 0

    async def one() -> None:
        nonlocal allowed
        await anyio.lowlevel.checkpoint()
        if (await limiter.hit("shared", rate)).allowed:
            allowed += 1

    async with anyio.create_task_group() as tg:
        for _ in range(200):
            tg.start_soon(one)
    assert allowed == 50


@pytest.mark.parametrize("rate", ["10/minute", Rate.parse("10/minute"), "10/minute burst 20"])
@pytest.mark.parametrize(
    ("cost", "message"),
    [
        (-1, "cost must be a whole number >= 0"),
        (-20, "cost must be a whole number >= 0"),
        (True, "cost must be a whole number >= 0"),
        (1.5, "cost must be a whole number >= 0"),
        (21, "exceeds the burst"),
    ],
)
async def test_impossible_costs_are_refused_on_every_call_and_take_nothing(
    limiter: RateLimiter, rate: Rate | str, cost: int, message: str
) -> None:
    """Not only on a rate's first use: a negative cost on a warmed-up rate would refund
    tokens and let a client past its limit."""
    for _ in range(3):
        await limiter.hit("k", rate)
    before = await limiter.hit("k", rate, cost=0)
    for _ in range(2):
        with pytest.raises(ValueError, match=message):
            await limiter.hit("k", rate, cost=cost)
        with pytest.raises(ValueError, match=message):
            await limiter.hit_many([("k", rate)], cost=cost)
    assert await limiter.hit("k", rate, cost=0) == before


# -- make mutate survivors (docs/mutation.md) ----------------------------------------------


async def test_error_messages_say_what_is_wrong(limiter: RateLimiter) -> None:
    with pytest.raises(ValueError, match=r"\(10\): such a request could never be allowed$"):
        await limiter.hit("k", "10/minute", cost=11)
    with pytest.raises(ValueError, match=r"^hit_many needs at least one \(key, rate\) item$"):
        await limiter.hit_many([])
    with pytest.raises(ValueError, match=r"^hit_many got the same bucket twice$"):
        await limiter.hit_many([("a", "1/s"), ("a", "1/s")])
    for _ in range(2):  # cold, then with the rate's policy cached
        with pytest.raises(ConfigError, match=r"^\['1/s'\] is not a rate"):
            await limiter.hit("k", ["1/s"])  # type: ignore[arg-type]


async def test_store_failures_are_logged_with_the_cause_once_a_minute_by_default(
    clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    limiter = RateLimiter(FailingStore(), clock=clock)
    caplog.set_level(logging.WARNING, logger="asgi_armor.ratelimit")
    await limiter.hit("k", "1/minute")  # cold: through hit_many
    clock.advance(59.5)
    await limiter.hit("k", "1/minute")  # warm: the one-bucket fast path
    assert len(caplog.records) == 1
    clock.advance(0.5)
    await limiter.hit("k", "1/minute")
    assert [r.getMessage().endswith(": connection refused") for r in caplog.records] == [
        True,
        True,
    ]


async def test_enforce_honours_cost_and_policy_from_the_first_call(clock: FakeClock) -> None:
    store = MemoryStore(clock=clock)
    first, second = RateLimiter(store), RateLimiter(store)
    assert (await first.enforce("k", "5/minute", cost=4, policy="p")).remaining == 1
    # A new limiter on the same store: its first call (cold) must enforce too.
    with pytest.raises(RateLimited):
        await second.enforce("k", "5/minute", cost=2, policy="p")
    assert (await second.hit("k", "5/minute", policy="p", cost=0)).remaining == 1
    assert (await second.hit("k", "5/minute", cost=0)).remaining == 5  # another policy


async def test_a_named_policy_never_answers_for_the_unnamed_one(limiter: RateLimiter) -> None:
    for _ in range(3):
        await limiter.hit_many([("k", "5/minute", "named")])
    assert (await limiter.hit("k", "5/minute")).remaining == 4
    assert (await limiter.hit("k", "5/minute", policy="named")).remaining == 1
