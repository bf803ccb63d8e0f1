"""``RateLimiter``: token buckets in a store, several decided at once, with a failure policy."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence

import msgspec

from asgi_armor import _checks
from asgi_armor._store_policy import StorePolicy
from asgi_armor.errors import RateLimited
from asgi_armor.ratelimit import bucket
from asgi_armor.ratelimit.headers import decision_headers, whole_seconds
from asgi_armor.ratelimit.rate import Rate
from asgi_armor.stores.base import BucketSpec, OnStoreError, RateLimitStore, StoreError, make_key
from asgi_armor.stores.memory import MemoryStore

__all__ = ["Decision", "Item", "RateLimiter", "check_cost", "rate_limited"]

logger = logging.getLogger("asgi_armor.ratelimit")

#: One bucket to hit: ``(key, rate)`` or ``(key, rate, policy name)``.
Item = tuple[str, Rate | str] | tuple[str, Rate | str, str | None]

# A key this short is at most 64 UTF-8 bytes, so make_key would keep it as it is.
_SHORT = 16
# (rate, policy) -> what a check needs, worked out once: most programs use a few rates.
_POLICY_CACHE = 256
_Policy = tuple[Rate, str, str, float, float, int]


# gc=False: one is made per check, and its fields (numbers, a str, a Rate of numbers) can
# never lead back to it, so the cycle collector has nothing to track.
class Decision(msgspec.Struct, frozen=True, gc=False):
    """The outcome of one rate-limit check on one bucket.

    Attributes:
        allowed: whether the request was let through (its tokens taken from every bucket
            decided with it). In a denied multi-bucket decision every ``Decision`` says
            False, and the buckets that lacked tokens are those with ``retry_after > 0``.
        limit: the bucket depth (the rate's burst, by default its limit).
        remaining: whole tokens left after this decision.
        reset_after: seconds until the bucket is full again.
        retry_after: seconds until this request would be allowed (0 when allowed).
        policy: the policy (rule) name the bucket belongs to.
        rate: the rate of that policy.
    """

    allowed: bool
    limit: int
    remaining: int
    reset_after: float
    retry_after: float
    policy: str = ""
    rate: Rate | None = None


def check_cost(cost: int, rate: Rate, what: str = "cost") -> None:
    """Reject a cost no request could ever pay.

    Raises:
        ValueError: ``cost`` is negative, not an int, or more than the bucket holds.
    """
    _checks.count(cost, what, minimum=0, error=ValueError)
    if cost > rate.capacity:
        raise ValueError(
            f"{what} {cost} exceeds the burst of {rate} ({rate.capacity}): "
            "such a request could never be allowed"
        )


class RateLimiter:
    """Token-bucket rate limiting over a ``RateLimitStore`` (``MemoryStore``, ``RedisStore``).

    Args:
        store: where buckets live; one atomic store call per check.
        on_store_error: when the store fails, ``"allow"`` lets requests through (logged at
            most once per ``warn_every`` seconds, counted in ``store_errors``); ``"deny"``
            raises ``ServiceUnavailable``.
        warn_every: seconds between two warnings about a failing store.
        clock: monotonic seconds, only for spacing the warnings (decisions use the
            store's clock).
        logger: where store failures are reported.

    Raises:
        ConfigError: ``on_store_error`` is not ``"allow"`` or ``"deny"``.
    """

    __slots__ = ("_policies", "_take", "policy", "store")

    def __init__(
        self,
        store: RateLimitStore,
        *,
        on_store_error: OnStoreError = "allow",
        warn_every: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
        logger: logging.Logger = logger,
    ) -> None:
        self.policy = StorePolicy(
            on_store_error,
            what="rate-limit store",
            allowing="allowing requests",
            denying="denying requests",
            logger=logger,
            concern="rate_limit",
            warn_every=warn_every,
            clock=clock,
        )
        self.store = store
        # A MemoryStore decides in this process: called directly, no coroutine to await.
        self._take = store.take_one if type(store) is MemoryStore else None
        self._policies: dict[Rate | str | tuple[Rate | str, str], _Policy] = {}

    async def take(
        self, keys: Sequence[str], specs: Sequence[BucketSpec], cost: int
    ) -> tuple[bool, float, list[float]] | None:
        """The low-level check: ``store.hit_buckets`` under the failure policy.

        Keys are used as given (build them with ``make_key``). Returns the store's
        ``(allowed, now, tats)``, or None when the store failed and the policy allows.

        Raises:
            ServiceUnavailable: the store failed and ``on_store_error`` is ``"deny"``.
            Overloaded: this process could not send the store call in time (local
                overload, never the failure policy).
        """
        try:
            return await self.store.hit_buckets(keys, specs, cost)
        except StoreError as exc:
            self.store_failed(exc)
            return None

    def store_failed(self, exc: StoreError, request_id: str | None = None) -> None:
        """Count and (at most once per ``warn_every``) log a store failure, then apply the
        policy: return under ``"allow"``.

        Raises:
            ServiceUnavailable: ``on_store_error`` is ``"deny"``.
        """
        self.policy.failed(exc, request_id)

    @property
    def on_store_error(self) -> OnStoreError:
        """``"allow"`` or ``"deny"``: what a store failure does to the request."""
        return self.policy.on_store_error

    @property
    def store_errors(self) -> int:
        """Store failures so far."""
        return self.policy.failures

    async def hit(
        self,
        key: str,
        rate: Rate | str,
        cost: int = 1,
        *,
        policy: str | None = None,
        enforce: bool = False,
    ) -> Decision:
        """Take ``cost`` tokens from the bucket of ``key`` at ``rate``.

        Args:
            key: what is limited (a user id, an address, ...); long values are hashed.
            rate: a ``Rate`` or its text (``"10/minute"``).
            cost: tokens this request takes (0 only looks).
            policy: the bucket namespace and header policy name (default: ``str(rate)``).
            enforce: raise ``RateLimited`` instead of returning a denied decision.

        Raises:
            RateLimited: ``enforce`` is set and the bucket lacks the tokens.
            ServiceUnavailable: the store failed and ``on_store_error`` is ``"deny"``.
            Overloaded: this process could not send the store call in time (local
                overload, never the failure policy).
            ValueError: ``cost`` exceeds the bucket depth or is negative.
        """
        # The one-bucket fast path: the same decision as hit_many([(key, rate, policy)]),
        # with the rate's parsing, naming and key prefix worked out once per (rate, policy).
        try:
            found = self._policies.get(rate if policy is None else (rate, policy))
        except TypeError:  # an unhashable rate: let hit_many report it
            found = None
        if found is None or type(key) is not str:
            return (await self.hit_many([(key, rate, policy)], cost, enforce=enforce))[0]
        parsed, name, prefix, interval, tolerance, capacity = found
        if type(cost) is not int or not 0 <= cost <= capacity:
            check_cost(cost, parsed)
        store_key = prefix + key if len(key) <= _SHORT else make_key("rl", name, key)
        try:
            take = self._take
            if take is not None:
                allowed, now, tat = take(store_key, interval, tolerance, cost)
            else:
                allowed, now, tats = await self.store.hit_buckets(
                    [store_key], [(interval, tolerance)], cost
                )
                tat = tats[0]
        except StoreError as exc:
            self.store_failed(exc)
            # Fail open: the store's state is unknown, so report the bucket as untouched.
            return Decision(True, capacity, capacity, 0.0, 0.0, name, parsed)
        left, reset = bucket.status(tat, now, interval, tolerance)
        if allowed:
            return Decision(True, capacity, left, reset, 0.0, name, parsed)
        retry = bucket.retry_after(tat, now, interval, tolerance, cost)
        decision = Decision(False, capacity, left, reset, retry, name, parsed)
        if enforce:
            raise rate_limited([decision])
        return decision

    async def enforce(
        self, key: str, rate: Rate | str, cost: int = 1, *, policy: str | None = None
    ) -> Decision:
        """``hit(..., enforce=True)``: the decision, or ``RateLimited`` with its headers.

        Raises:
            RateLimited: the bucket lacks the tokens (``retry_after`` and headers set).
            ServiceUnavailable: the store failed and ``on_store_error`` is ``"deny"``.
            Overloaded: this process could not send the store call in time (local
                overload, never the failure policy).
        """
        return await self.hit(key, rate, cost, policy=policy, enforce=True)

    async def hit_many(
        self, items: Sequence[Item], cost: int = 1, *, enforce: bool = False
    ) -> list[Decision]:
        """Take ``cost`` tokens from every bucket, or from none, in one store call.

        Args:
            items: ``(key, rate)`` or ``(key, rate, policy)`` per bucket; a bucket is named
                by its policy (default ``str(rate)``) and key.
            cost: tokens taken from each bucket.
            enforce: raise ``RateLimited`` instead of returning denied decisions.

        Raises:
            RateLimited: ``enforce`` is set and a bucket lacks the tokens.
            ServiceUnavailable: the store failed and ``on_store_error`` is ``"deny"``.
            Overloaded: this process could not send the store call in time (local
                overload, never the failure policy).
            ValueError: no items, the same bucket twice, or an impossible ``cost``.
        """
        if not items:
            raise ValueError("hit_many needs at least one (key, rate) item")
        rates: list[Rate] = []
        policies: list[str] = []
        keys: list[str] = []
        for item in items:
            rate = Rate.parse(item[1])
            named = item[2] if len(item) > 2 else None
            policy = str(rate) if named is None else named
            check_cost(cost, rate)
            self._remember(item[1], named, rate, policy)
            rates.append(rate)
            policies.append(policy)
            keys.append(make_key("rl", policy, item[0]))
        if len(set(keys)) != len(keys):
            raise ValueError("hit_many got the same bucket twice")
        specs = [rate.spec for rate in rates]
        result = await self.take(keys, specs, cost)
        if result is None:
            # Fail open: the store's state is unknown, so report the bucket as untouched.
            return [
                Decision(True, r.capacity, r.capacity, 0.0, 0.0, p, r)
                for r, p in zip(rates, policies, strict=True)
            ]
        allowed, now, tats = result
        decisions = []
        for tat, (interval, tolerance), rate, policy in zip(
            tats, specs, rates, policies, strict=True
        ):
            decisions.append(
                Decision(
                    allowed,
                    rate.capacity,
                    bucket.remaining(tat, now, interval, tolerance),
                    bucket.reset_after(tat, now),
                    0.0 if allowed else bucket.retry_after(tat, now, interval, tolerance, cost),
                    policy,
                    rate,
                )
            )
        if enforce and not allowed:
            raise rate_limited(decisions)
        return decisions

    def _remember(self, given: Rate | str, named: str | None, rate: Rate, policy: str) -> None:
        """Keep what ``hit`` needs for ``(given, named)``, so its next call skips the work."""
        policies = self._policies
        # Keyed by the rate alone when no policy is named: no tuple to build per hit.
        cache_key = given if named is None else (given, named)
        try:
            if cache_key in policies:
                return
        except TypeError:
            return
        if len(policies) >= _POLICY_CACHE:
            policies.clear()  # rates minted per call: start over rather than grow
        interval, tolerance = rate.spec
        policies[cache_key] = (
            rate,
            policy,
            make_key("rl", policy) + ":",
            interval,
            tolerance,
            rate.capacity,
        )

    def __repr__(self) -> str:
        return f"RateLimiter({self.store!r}, on_store_error={self.on_store_error!r})"


def rate_limited(decisions: Sequence[Decision]) -> RateLimited:
    """The ``RateLimited`` error for a denied set of decisions, headers included."""
    retry = max(decision.retry_after for decision in decisions)
    return RateLimited(whole_seconds(retry), headers=decision_headers(decisions, time.time()))
