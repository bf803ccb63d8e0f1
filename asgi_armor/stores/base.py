"""The small protocols each concern needs from a store, and the shared key rules.

One backend object (``MemoryStore``, ``RedisStore``) serves every concern. A new backend
implements exactly these methods; each is one atomic operation (one command on a
networked store, which may send concurrent operations in one round trip). A backend that
cannot answer raises ``StoreError``; what happens then is the concern's
``on_store_error`` policy, never the store's.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Literal, Protocol, runtime_checkable

__all__ = [
    "BucketSpec",
    "IdempotencyStore",
    "NonceStore",
    "OnStoreError",
    "RateLimitStore",
    "Store",
    "StoreError",
    "make_key",
]

OnStoreError = Literal["allow", "deny"]

#: Longest key part kept verbatim; longer (user-supplied) parts are hashed.
MAX_KEY_PART = 64


class StoreError(Exception):
    """The store could not answer (down, timing out, or its breaker is open)."""


def make_key(*parts: str) -> str:
    """Join key parts with ``:``; a part over 64 bytes is replaced by its SHA-256.

    Keeps every key short (the store adds its ``armor:`` prefix) whatever a client sends.
    """
    out = []
    for part in parts:
        raw = part.encode("utf-8", "surrogateescape")
        out.append(part if len(raw) <= MAX_KEY_PART else "h" + hashlib.sha256(raw).hexdigest()[:40])
    return ":".join(out)


#: A bucket's parameters: (emission interval seconds, tolerance seconds).
#: See ``asgi_armor.ratelimit.bucket`` for the math.
BucketSpec = tuple[float, float]


@runtime_checkable
class RateLimitStore(Protocol):
    """Token buckets, decided together."""

    async def hit_buckets(
        self, keys: Sequence[str], specs: Sequence[BucketSpec], cost: int
    ) -> tuple[bool, float, list[float]]:
        """Take ``cost`` tokens from every bucket, or from none if any lacks them.

        Returns ``(allowed, now, tats)``: ``now`` in the store's clock, and each bucket's
        "full at" time after the decision (unchanged where nothing was taken).

        A negative ``cost`` gives back what an earlier call took (a failures-only rule's
        token after a success; the cluster store's partial takes): ``specs[i]`` is then
        ``(seconds that call added to bucket i, its full-at time before that call)``, and
        each bucket gets back at most that, less what time has refilled since
        (``ratelimit.bucket.give_back``). Always allowed.
        """
        ...


@runtime_checkable
class IdempotencyStore(Protocol):
    """A lease per key: taken atomically, then completed with a value or released."""

    async def lease_acquire(self, key: str, lease: bytes, ttl: float) -> bytes | None:
        """Store ``lease`` under ``key`` for ``ttl`` seconds if the key is free.

        Returns None when the lease was taken, else the value already there. The key
        already holding this very ``lease`` (the call run twice: its first reply was lost)
        answers None too.
        """
        ...

    async def lease_complete(self, key: str, lease: bytes, value: bytes, ttl: float) -> bool:
        """Replace our ``lease`` with ``value`` for ``ttl`` seconds; False if the lease was lost.

        The key already holding ``value`` (the call run twice) answers True.
        """
        ...

    async def lease_release(self, key: str, lease: bytes) -> bool:
        """Delete ``key`` if it still holds our ``lease``.

        True once the key is free of it (deleted now, or already free: released before,
        the call run twice, or lapsed); False if it holds anything else.
        """
        ...

    async def lease_extend(self, key: str, lease: bytes, ttl: float) -> bool:
        """Keep our ``lease`` on ``key`` for ``ttl`` more seconds.

        True if the key held our lease (its expiry starts again) or was free (the lease is
        taken again: it lapsed while the store could not be reached); False if the key
        holds anything else. Run twice, it answers True twice.
        """
        ...


@runtime_checkable
class NonceStore(Protocol):
    """Remembers message ids to reject replays."""

    async def remember(self, key: str, ttl: float, token: bytes | None = None) -> bool:
        """Remember ``key`` for ``ttl`` seconds. True if it was new, False if already known.

        ``token`` names this call: the key already holding the same token is the call run
        twice (its first reply was lost), and answers True again. A networked store
        makes one per call when none is given, so a call it sends again is safe.
        """
        ...

    async def forget(self, key: str) -> None:
        """Forget ``key`` (the message it stands for was not handled after all). Run
        twice, the second run finds nothing to forget."""
        ...


@runtime_checkable
class Store(RateLimitStore, IdempotencyStore, NonceStore, Protocol):
    """Everything asgi_armor needs from one backend."""

    async def aclose(self) -> None:
        """Release connections."""
        ...
