"""The Redis store: state shared by every app process, one round trip per operation.

Each operation is one ``EVALSHA`` of a Lua script shipped with the package (or one plain
command), so a decision over several rate-limit layers is atomic and costs one round trip.
Scripts are registered once; redis-py reloads them on ``NOSCRIPT`` (after a Redis restart
or ``SCRIPT FLUSH``). Every call has its own short timeout, and a failing Redis is cut off
by a circuit breaker, so a dead Redis costs microseconds per request, not a connect timeout.
Failures surface as ``StoreError``; each concern applies its own ``on_store_error`` policy.
Runs on asyncio (redis.asyncio).
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Sequence
from importlib.resources import files
from typing import TYPE_CHECKING, Any

from asgi_armor.breaker import CircuitBreaker
from asgi_armor.errors import CircuitOpenError
from asgi_armor.stores.base import BucketSpec, StoreError

if TYPE_CHECKING:
    import redis.asyncio as aioredis

__all__ = ["RedisStore"]

_LUA = files("asgi_armor.stores") / "lua"
_ARGS_CACHE = 256  # distinct (cost, rule set) argument lists kept encoded

try:
    from redis.exceptions import RedisError as _RedisError
except ImportError:  # pragma: no cover - the redis extra is missing; from_url says so

    class _RedisError(Exception):  # type: ignore[no-redef]
        """Stands in for redis.exceptions.RedisError when redis is not installed."""


def _script(name: str) -> str:
    return (_LUA / f"{name}.lua").read_text(encoding="utf-8")


def _ms(seconds: float) -> int:
    return max(1, math.ceil(seconds * 1000))


class RedisStore:
    """Store backed by Redis, for several processes or hosts.

    Args:
        client: a ``redis.asyncio.Redis`` (``decode_responses`` must be False).
        prefix: put before every key (default ``"armor:"``).
        timeout: seconds one store call may take before it counts as failed.
        breaker: guards calls; default opens after 3 consecutive failures and tries
            again after 1 s, so a returning Redis is used within about a second.
    """

    def __init__(
        self,
        client: aioredis.Redis,
        *,
        prefix: str = "armor:",
        timeout: float = 0.5,
        breaker: CircuitBreaker | None = None,
    ) -> None:
        self.client = client
        self.prefix = prefix
        self.timeout = timeout
        self.breaker = breaker or CircuitBreaker(fail_max=3, reset_timeout=1.0, name="redis-store")
        self._hit_buckets = client.register_script(_script("hit_buckets"))
        self._args: dict[tuple[int, tuple[BucketSpec, ...]], list[str]] = {}
        self._lease_acquire = client.register_script(_script("lease_acquire"))
        self._lease_complete = client.register_script(_script("lease_complete"))
        self._lease_release = client.register_script(_script("lease_release"))

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        prefix: str = "armor:",
        timeout: float = 0.5,
        breaker: CircuitBreaker | None = None,
        **client_options: Any,
    ) -> RedisStore:
        """Connect lazily to ``url`` (``redis://host:port/db``, ``rediss://``, ``unix://``).

        ``client_options`` go to the connection pool (``max_connections`` defaults to 64).

        Raises:
            ImportError: the ``redis`` extra is not installed.
        """
        import redis.asyncio as aioredis

        client_options.setdefault("socket_timeout", timeout)
        client_options.setdefault("socket_connect_timeout", timeout)
        # A blocking pool makes a burst wait briefly for a connection instead of failing
        # (or opening thousands of sockets); the wait is bounded by the call timeout.
        pool = aioredis.BlockingConnectionPool.from_url(
            url,
            max_connections=client_options.pop("max_connections", 64),
            timeout=timeout,
            **client_options,
        )
        client = aioredis.Redis.from_pool(pool)
        return cls(client, prefix=prefix, timeout=timeout, breaker=breaker)

    async def _run(self, call: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            async with self.breaker:
                # asyncio's own timeout: this store runs on asyncio only, and an anyio
                # cancel scope with a deadline costs several times more per call.
                async with asyncio.timeout(self.timeout):
                    return await call(*args, **kwargs)
        except CircuitOpenError as exc:
            raise StoreError("redis store unavailable (breaker open)") from exc
        except (_RedisError, OSError, TimeoutError) as exc:
            raise StoreError(f"redis store call failed: {type(exc).__name__}") from exc

    async def hit_buckets(
        self, keys: Sequence[str], specs: Sequence[BucketSpec], cost: int
    ) -> tuple[bool, float, list[float]]:
        """See ``RateLimitStore.hit_buckets``: one EVALSHA for every layer."""
        # The script's arguments depend only on the rules and the cost: encode them once.
        cache_key = (cost, specs if type(specs) is tuple else tuple(specs))
        args = self._args.get(cache_key)
        if args is None:
            numbers: list[float | int] = [cost]
            for interval, tolerance in specs:
                numbers.append(interval)
                numbers.append(tolerance)
            args = [repr(number) for number in numbers]
            if len(self._args) >= _ARGS_CACHE:
                self._args.clear()
            self._args[cache_key] = args
        prefix = self.prefix
        reply = await self._run(self._hit_buckets, keys=[prefix + key for key in keys], args=args)
        return reply[0] == 1, float(reply[1]), [float(tat) for tat in reply[2:]]

    async def lease_acquire(self, key: str, lease: bytes, ttl: float) -> bytes | None:
        """See ``IdempotencyStore.lease_acquire``."""
        current: bytes | None = await self._run(
            self._lease_acquire, keys=[self.prefix + key], args=[lease, _ms(ttl)]
        )
        return current

    async def lease_complete(self, key: str, lease: bytes, value: bytes, ttl: float) -> bool:
        """See ``IdempotencyStore.lease_complete``."""
        done = await self._run(
            self._lease_complete, keys=[self.prefix + key], args=[lease, value, _ms(ttl)]
        )
        return bool(done)

    async def lease_release(self, key: str, lease: bytes) -> bool:
        """See ``IdempotencyStore.lease_release``."""
        done = await self._run(self._lease_release, keys=[self.prefix + key], args=[lease])
        return bool(done)

    async def remember(self, key: str, ttl: float) -> bool:
        """See ``NonceStore.remember``: one ``SET NX PX``."""
        created = await self._run(self.client.set, self.prefix + key, b"1", nx=True, px=_ms(ttl))
        return bool(created)

    async def forget(self, key: str) -> None:
        """See ``NonceStore.forget``: one ``DEL``."""
        await self._run(self.client.delete, self.prefix + key)

    async def aclose(self) -> None:
        """Close the connection pool."""
        await self.client.aclose()

    def __repr__(self) -> str:
        return f"RedisStore(prefix={self.prefix!r}, timeout={self.timeout})"
