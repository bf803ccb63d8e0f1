"""The embedded store: bounded, in-process, the default.

State lives in insertion-ordered dicts: token buckets; stored responses (completed
idempotency records); and what must not be forgotten early, in-flight leases and replay
nonces. A write moves its key to the end, so the front holds the least recently written
keys: expired ones are swept from there, leases and responses a couple per write, buckets in
a batch once 1024 new ones were written (at most that many expired buckets are kept, and
a server seeing fewer distinct keys never sweeps). When full, the oldest bucket or
stored response is evicted to make room, but an in-flight lease or an unexpired nonce never
is: forgetting one would let a duplicate payment or a replayed webhook through. When the
store is full of those, a new one is refused with ``StoreError`` (each concern's failure
policy answers: 503 by default). Memory therefore stays bounded by ``max_keys`` (and
``max_bytes`` of stored values) under a flood of distinct keys. Every operation runs
without awaiting, so it is atomic on one event loop; one ``MemoryStore`` serves one event
loop (use ``RedisStore`` across processes).
"""

from __future__ import annotations

import heapq
import time
from collections.abc import Callable, Sequence

from asgi_armor import _checks
from asgi_armor.ratelimit.bucket import decide, decide_one, give_back
from asgi_armor.stores.base import BucketSpec, StoreError

__all__ = ["MemoryStore"]

_SWEEP = 2  # expired leases and stored responses dropped per write: amortised cleanup
# Buckets are swept in batches: once this many new buckets were written since the last
# sweep, expired ones are dropped from the front, at most twice as many, so the sweep keeps
# up with any rate of new keys. A few hundred kilobytes of expired buckets at most, and no
# sweep at all while a server sees fewer distinct keys than this.
_SWEEP_EVERY = 1024


class MemoryStore:
    """In-process store for rate limits, idempotency leases and replay nonces.

    Args:
        max_keys: most buckets, and most leases, stored responses and nonces, kept at once
            (each).
        max_bytes: most bytes of lease values (stored responses) kept at once.
        clock: monotonic seconds; inject a fake one in tests.

    Attributes:
        evictions: buckets and stored responses dropped before expiry to make room.
        refusals: writes refused (``StoreError``) because making room would have meant
            evicting an in-flight lease or an unexpired nonce.
    """

    def __init__(
        self,
        *,
        max_keys: int = 100_000,
        max_bytes: int = 64 * 1024 * 1024,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        _checks.count(max_keys, "max_keys", error=ValueError)
        self.max_keys = max_keys
        self.max_bytes = max_bytes
        self.clock = clock
        self._tats: dict[str, float] = {}
        self._sweep_at = min(max_keys, _SWEEP_EVERY)  # bucket count that triggers a sweep
        self._entries: dict[str, tuple[float, bytes]] = {}  # stored responses: evictable
        self._held: dict[str, tuple[float, bytes]] = {}  # leases, nonces: kept until expiry
        self._expiries: list[tuple[float, str]] = []  # heap over _held (stale items skipped)
        self._bytes = 0
        self.evictions = 0
        self.refusals = 0

    def __len__(self) -> int:
        return len(self._tats) + len(self._entries) + len(self._held)

    # -- rate limiting -----------------------------------------------------------------

    async def hit_buckets(
        self, keys: Sequence[str], specs: Sequence[BucketSpec], cost: int
    ) -> tuple[bool, float, list[float]]:
        """See ``RateLimitStore.hit_buckets``."""
        return self.take(keys, specs, cost)

    def take(
        self, keys: Sequence[str], specs: Sequence[BucketSpec], cost: int
    ) -> tuple[bool, float, list[float]]:
        """``hit_buckets`` without the coroutine: the same decision, for callers in this
        process (the rate limiter and its middleware call it directly on a MemoryStore)."""
        if len(keys) == 1 and len(specs) == 1 and cost >= 0:
            interval, tolerance = specs[0]
            allowed, now, tat = self.take_one(keys[0], interval, tolerance, cost)
            return allowed, now, [tat]
        now = self.clock()
        if cost < 0:
            return self._give_back(keys, specs, now)
        tats = self._tats
        allowed, new = decide([tats.get(key) for key in keys], now, specs, cost)
        if allowed and cost:
            for index in range(len(keys)):
                key = keys[index]
                if tats.pop(key, None) is None and len(tats) >= self._sweep_at:
                    self._make_room_for_tat(now)
                tats[key] = new[index]
        return allowed, now, new

    def take_one(
        self, key: str, interval: float, tolerance: float, cost: int
    ) -> tuple[bool, float, float]:
        """``take`` for one bucket, with no list in or out: ``(allowed, now, tat)``.
        ``RateLimiter.hit`` calls it on a MemoryStore.

        Raises:
            ValueError: a negative ``cost`` (giving back takes ``take``'s other specs).
        """
        if cost < 0:
            raise ValueError("take_one: cost must be >= 0 (give back with take)")
        now = self.clock()
        tats = self._tats
        allowed, tat = decide_one(tats.get(key), now, interval, tolerance, cost)
        if allowed and cost:
            if tats.pop(key, None) is None and len(tats) >= self._sweep_at:
                self._make_room_for_tat(now)
            tats[key] = tat
        return allowed, now, tat

    def _give_back(
        self, keys: Sequence[str], given: Sequence[BucketSpec], now: float
    ) -> tuple[bool, float, list[float]]:
        """The negative-cost form of ``hit_buckets``: see ``RateLimitStore.hit_buckets``."""
        tats = self._tats
        out = []
        for index in range(len(keys)):
            key = keys[index]
            added, before = given[index]
            tat = give_back(tats.get(key), now, added, before)
            if tat > now:
                tats[key] = tat
            else:
                tats.pop(key, None)  # full again: absent means full
            out.append(tat)
        return True, now, out

    def _make_room_for_tat(self, now: float) -> None:
        """Sweep expired buckets from the front, then evict the oldest while full.

        Called before a new bucket is written, once the buckets have grown past
        ``_sweep_at``: one call per ``_SWEEP_EVERY`` new buckets instead of a look at the
        front on every write, and each expired key is still swept once.
        """
        tats = self._tats
        expired: list[str] = []
        for key, tat in tats.items():
            if tat > now or len(expired) >= 2 * _SWEEP_EVERY:
                break
            expired.append(key)
        for key in expired:
            del tats[key]
        while len(tats) >= self.max_keys:
            del tats[next(iter(tats))]
            self.evictions += 1
        self._sweep_at = min(self.max_keys, len(tats) + _SWEEP_EVERY)

    # -- leases and nonces -------------------------------------------------------------

    def _get(self, key: str, now: float) -> bytes | None:
        entry = self._held.get(key) or self._entries.get(key)
        if entry is None:
            return None
        if entry[0] <= now:
            self._delete(key)
            return None
        return entry[1]

    def _delete(self, key: str) -> None:
        entry = self._held.pop(key, None) or self._entries.pop(key, None)
        if entry is not None:
            self._bytes -= len(entry[1])

    def _drop_expired_held(self, now: float) -> bool:
        """Drop the held entry that expires first, if it has; True if one was dropped."""
        expiries, held = self._expiries, self._held
        while expiries and expiries[0][0] <= now:
            expires, key = heapq.heappop(expiries)
            entry = held.get(key)
            if entry is not None and entry[0] == expires:
                self._delete(key)
                return True
        return False

    def _make_room(self, size: int, now: float) -> None:
        """Room for one more key of ``size`` bytes, or ``StoreError``: nothing held is evicted."""
        if size > self.max_bytes:
            raise StoreError(f"memory store: {size} bytes is more than max_bytes")
        entries = self._entries
        for _ in range(_SWEEP):
            if not entries:
                break
            front = next(iter(entries))
            if entries[front][0] > now:
                break
            self._delete(front)
        for _ in range(_SWEEP):
            if not self._drop_expired_held(now):
                break
        while len(entries) + len(self._held) >= self.max_keys or (
            self._bytes + size > self.max_bytes
        ):
            if self._drop_expired_held(now):
                continue
            if not entries:
                self.refusals += 1
                raise StoreError(
                    "memory store full of in-flight leases and unexpired nonces (max_keys, "
                    "max_bytes): refused rather than forget one"
                )
            self._delete(next(iter(entries)))
            self.evictions += 1

    def _set(self, key: str, value: bytes, ttl: float, now: float) -> None:
        """Hold ``value`` (a lease or a nonce) until it expires: never evicted before."""
        self._delete(key)
        self._make_room(len(value), now)
        expires = now + ttl
        self._held[key] = (expires, value)
        self._bytes += len(value)
        expiries = self._expiries
        heapq.heappush(expiries, (expires, key))
        if len(expiries) > 2 * len(self._held) + 64:
            # Items of leases completed or released early pile up: rebuild, amortised O(1).
            self._expiries = [(entry[0], k) for k, entry in self._held.items()]
            heapq.heapify(self._expiries)

    def _store(self, key: str, value: bytes, ttl: float, now: float) -> None:
        """Replace our lease under ``key`` by a stored response (evictable, oldest first)."""
        kept_in = self._held if key in self._held else self._entries
        lease = kept_in.pop(key)
        self._bytes -= len(lease[1])
        try:
            self._make_room(len(value), now)
        except StoreError:
            kept_in[key] = lease  # the lease stays: the caller's failure policy decides
            self._bytes += len(lease[1])
            raise
        self._entries[key] = (now + ttl, value)
        self._bytes += len(value)

    async def lease_acquire(self, key: str, lease: bytes, ttl: float) -> bytes | None:
        """See ``IdempotencyStore.lease_acquire``."""
        now = self.clock()
        current = self._get(key, now)
        if current is not None:
            return None if current == lease else current
        self._set(key, lease, ttl, now)
        return None

    async def lease_complete(self, key: str, lease: bytes, value: bytes, ttl: float) -> bool:
        """See ``IdempotencyStore.lease_complete``."""
        now = self.clock()
        current = self._get(key, now)
        if current != lease:
            return current == value  # our value already there: this call ran before
        self._store(key, value, ttl, now)
        return True

    async def lease_release(self, key: str, lease: bytes) -> bool:
        """See ``IdempotencyStore.lease_release``."""
        current = self._get(key, self.clock())
        if current != lease:
            return current is None  # already free: released before, or lapsed
        self._delete(key)
        return True

    async def lease_extend(self, key: str, lease: bytes, ttl: float) -> bool:
        """See ``IdempotencyStore.lease_extend``."""
        now = self.clock()
        current = self._get(key, now)
        if current is not None and current != lease:
            return False
        self._set(key, lease, ttl, now)
        return True

    async def remember(self, key: str, ttl: float, token: bytes | None = None) -> bool:
        """See ``NonceStore.remember``."""
        now = self.clock()
        current = self._get(key, now)
        if current is not None:
            return token is not None and current == token
        self._set(key, b"1" if token is None else token, ttl, now)
        return True

    async def forget(self, key: str) -> None:
        """See ``NonceStore.forget``."""
        self._delete(key)

    async def aclose(self) -> None:
        """Nothing to release; present for symmetry with networked stores."""

    def __repr__(self) -> str:
        return f"MemoryStore(max_keys={self.max_keys})"
