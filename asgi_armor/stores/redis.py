"""The Redis store: state shared by every app process, one round trip per operation.

Each operation is one ``EVALSHA`` of a Lua script shipped with the package (or one plain
command), so a decision over several rate-limit layers is atomic and costs one round trip.
Scripts are registered once; redis-py reloads them on ``NOSCRIPT`` (after a Redis restart
or ``SCRIPT FLUSH``). Failures surface as ``StoreError``; each concern applies its own
``on_store_error`` policy. Runs on asyncio (redis.asyncio).

A store call is judged by the store's answer, not by this process's load:

- At most ``max_in_flight`` calls are sent at once (no more than the pool's connections).
  A call waiting for its turn has not been sent, so its wait is not store time. Waiting
  calls take turns across concerns, so a burst of rate-limit calls does not queue an
  idempotency lease or a replay check behind it. A call that admits new work
  (``hit_buckets``, ``lease_acquire``, ``remember``) and waits longer than
  ``queue_timeout`` raises ``Overloaded`` (503 ``overloaded``): local overload, never the
  store-failure policy, never counted by a breaker. Calls that finish work already done
  (``lease_complete``, ``lease_release``, ``forget``) always wait their turn.
- A sent call fails after ``timeout`` seconds of *store time*: time the event loop was free
  to read the answer. Seconds the loop spent late on its timers (a burst of requests keeps
  it busy) are not counted, so a backlog here never reads as a slow Redis.
- Each concern has its own circuit breaker (``breakers["rate_limit"]``,
  ``["idempotency"]``, ``["replay"]``): a failing rate-limit call does not cut off
  idempotency or the webhook replay cache. A dead Redis still costs microseconds per call
  once a concern's breaker is open, not a connect timeout.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections import deque
from collections.abc import Mapping, Sequence
from importlib.resources import files
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import urlsplit, urlunsplit

from asgi_armor.breaker import CircuitBreaker
from asgi_armor.errors import CircuitOpenError, ConfigError, Overloaded
from asgi_armor.stores.base import BucketSpec, StoreError

if TYPE_CHECKING:
    import redis.asyncio as aioredis

__all__ = ["CONCERNS", "Concern", "RedisStore", "check_url", "redacted"]

logger = logging.getLogger("asgi_armor")

_LUA = files("asgi_armor.stores") / "lua"
_ARGS_CACHE = 256  # distinct (cost, rule set) argument lists kept encoded
_TICK = 0.02  # seconds between two looks at the event loop's lag while calls are sent
_MAX_IN_FLIGHT = 64
_SCHEMES = ("redis", "rediss", "unix", "valkey", "valkeys")
_DECODES = (
    "the Redis client decodes responses (decode_responses=True); "
    "RedisStore needs one that returns bytes"
)

#: The concerns that keep separate failure accounting (one breaker each).
Concern = Literal["rate_limit", "idempotency", "replay"]
CONCERNS: tuple[Concern, ...] = ("rate_limit", "idempotency", "replay")

try:
    from redis.exceptions import RedisError as _RedisError
except ImportError:  # pragma: no cover - the redis extra is missing; from_url says so

    class _RedisError(Exception):  # type: ignore[no-redef]
        """Stands in for redis.exceptions.RedisError when redis is not installed."""


def _script(name: str) -> str:
    return (_LUA / f"{name}.lua").read_text(encoding="utf-8")


def _ms(seconds: float) -> int:
    return max(1, math.ceil(seconds * 1000))


def redacted(url: str) -> str:
    """``url`` with its password (if any) replaced by ``***``, for messages and logs."""
    try:
        parts = urlsplit(url)
        if parts.password is None:
            return url
        netloc = parts.netloc.rpartition("@")[2]
        user = parts.username or ""
        return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc}"))
    except ValueError:
        return "<unparseable URL>"


def check_url(url: str) -> None:
    """Check a Redis URL without connecting: scheme, port and database number.

    redis-py reads ``redis://host/notadb`` as database 0 and fails on a bad port only at
    the first call; both are refused here, at start-up.

    Raises:
        ConfigError: naming ``store``, with the password (if any) left out.
    """
    shown = redacted(url)
    try:
        if "+" in url.partition("://")[0]:
            from asgi_armor.stores._urls import parse_hosts_url, single_node_url

            # redis+cluster:// or redis+sentinel://: the form here, the options as below.
            hosts = parse_hosts_url(url)
            url = single_node_url(hosts, *hosts.hosts[0])
        parts = urlsplit(url)
        if parts.scheme not in _SCHEMES:
            raise ValueError(
                "the scheme must be redis://, rediss://, unix:// (valkey://, valkeys://), "
                "redis+cluster:// or redis+sentinel://"
            )
        if parts.scheme != "unix":
            port = parts.port  # ValueError for a port that is not a number in 0..65535
            if port == 0:
                raise ValueError("the port must be 1..65535, not 0")
            db = parts.path.strip("/")
            if db and not (db.isdigit() and db.isascii()):
                raise ValueError(f"the path must be a database number, not {db!r}")
        elif not parts.path:
            raise ValueError("a unix:// URL needs the socket's path")
        from redis.asyncio.connection import parse_url

        from asgi_armor.stores._urls import canonical

        # The query arguments redis-py understands (socket_timeout=...), checked too.
        if parse_url(canonical(url)).get("decode_responses"):
            raise ValueError(_DECODES)
    except ValueError as exc:
        raise ConfigError(f"store: {shown!r} is not a usable Redis URL: {exc}") from None


class _LoopLag:
    """Seconds this event loop ran its timers late, summed while store calls are sent.

    A timer due at ``t`` that runs at ``t + late`` means the loop was busy for ``late``
    seconds: a reply that arrived meanwhile could not be read. Ticks only while calls are
    in flight, so an idle store costs no wake-ups.
    """

    __slots__ = ("_due", "_handle", "in_flight", "late", "loop")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.late = 0.0
        self.in_flight = 0
        self._due = 0.0
        self._handle: asyncio.TimerHandle | None = None

    def enter(self, now: float) -> float:
        """Count one more call in flight; the lateness so far."""
        self.in_flight += 1
        if self._handle is None:
            self._due = now + _TICK
            self._handle = self.loop.call_at(self._due, self._tick)
        return self.late_at(now)

    def exit(self) -> None:
        self.in_flight -= 1

    def late_at(self, now: float) -> float:
        # A tick overdue right now is lateness too: the loop has not got round to it.
        over = now - self._due
        return self.late + over if over > 0 and self._handle is not None else self.late

    def _tick(self) -> None:
        now = self.loop.time()
        over = now - self._due
        if over > 0:
            self.late += over
        if self.in_flight:
            self._due = now + _TICK
            self._handle = self.loop.call_at(self._due, self._tick)
        else:
            self._handle = None


class _Deadline:
    """Cancels the call in ``scope`` once it has had ``timeout`` seconds of store time."""

    __slots__ = ("_handle", "_lag", "_late", "_scope", "_start", "_timeout")

    def __init__(self, lag: _LoopLag, scope: asyncio.Timeout, timeout: float) -> None:
        now = lag.loop.time()
        self._lag = lag
        self._scope = scope
        self._timeout = timeout
        self._start = now
        self._late = lag.enter(now)
        self._handle: asyncio.TimerHandle | None = lag.loop.call_at(now + timeout, self._check)

    def _check(self) -> None:
        loop = self._lag.loop
        now = loop.time()
        spent = now - self._start - (self._lag.late_at(now) - self._late)
        if spent < self._timeout:
            self._handle = loop.call_at(now + self._timeout - spent, self._check)
        else:
            self._handle = None
            # Expires on the next loop iteration, so a reply read on this one still wins.
            self._scope.reschedule(now)

    def close(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
        self._lag.exit()


class _Turns:
    """At most ``size`` calls sent at once; waiting calls take turns across concerns.

    FIFO within a concern, round robin between concerns that have calls waiting. A slot
    freed while calls wait is handed to the next one directly, so ``free > 0`` means no
    call is waiting.
    """

    __slots__ = ("_next", "_queues", "free")

    def __init__(self, size: int) -> None:
        self.free = size
        self._queues: dict[str, deque[asyncio.Future[None]]] = {c: deque() for c in CONCERNS}
        self._next = 0

    async def acquire(self, concern: str) -> None:
        if self.free > 0:
            self.free -= 1
            return
        turn: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queues[concern].append(turn)
        try:
            await turn
        except asyncio.CancelledError:
            if turn.done() and not turn.cancelled():
                self.release()  # handed a slot just as we were cancelled: pass it on
            # A cancelled turn stays queued until release() skips it: no O(n) removal.
            raise

    def release(self) -> None:
        for step in range(len(CONCERNS)):
            index = (self._next + step) % len(CONCERNS)
            queue = self._queues[CONCERNS[index]]
            while queue:
                turn = queue.popleft()
                if not turn.done():
                    turn.set_result(None)
                    self._next = index + 1
                    return
        self.free += 1


class RedisStore:
    """Store backed by Redis, for several processes or hosts.

    Args:
        client: a ``redis.asyncio.Redis`` that returns bytes (``decode_responses=False``).
        prefix: put before every key (default ``"armor:"``).
        timeout: seconds of store time one call may take before it counts as failed
            (time this process was too busy to read the answer is not counted).
        breakers: a breaker per concern (``"rate_limit"``, ``"idempotency"``,
            ``"replay"``); missing ones open after 3 consecutive failures and try again
            after 1 s, so a returning Redis is used within about a second.
        max_in_flight: most calls sent at once (default: the pool's connections, at
            most 64).
        queue_timeout: seconds a call admitting new work may wait for its turn before
            ``Overloaded`` is raised.

    Raises:
        ConfigError: naming ``store``: the client decodes responses, an unknown concern
            in ``breakers``, a timeout that is not positive, or ``max_in_flight`` outside
            1..the pool's ``max_connections``.
    """

    def __init__(
        self,
        client: aioredis.Redis,
        *,
        prefix: str = "armor:",
        timeout: float = 0.5,
        breakers: Mapping[str, CircuitBreaker] | None = None,
        max_in_flight: int | None = None,
        queue_timeout: float = 2.0,
    ) -> None:
        pool = client.connection_pool
        if pool.connection_kwargs.get("decode_responses"):
            # Scripts return stored bytes (leases, responses); decoded they are str.
            raise ConfigError(f"store: {_DECODES}")
        unknown = set(breakers or ()) - set(CONCERNS)
        if unknown:
            raise ConfigError(
                f"store: unknown breaker concern(s) {sorted(unknown)}; "
                f"expected {', '.join(CONCERNS)}"
            )
        connections = getattr(pool, "max_connections", _MAX_IN_FLIGHT)
        if max_in_flight is None:
            max_in_flight = min(connections, _MAX_IN_FLIGHT)
        if not 1 <= max_in_flight <= connections:
            # More calls than connections would wait for a connection inside the store
            # deadline: this process's queue would read as a slow Redis.
            raise ConfigError(
                f"store: max_in_flight must be 1..{connections} (the pool's max_connections)"
            )
        if not timeout > 0 or not queue_timeout > 0:
            raise ConfigError("store: timeout and queue_timeout must be more than 0 seconds")
        self.client = client
        self.prefix = prefix
        self.timeout = timeout
        self.queue_timeout = queue_timeout
        self.max_in_flight = max_in_flight
        self.breakers: dict[str, CircuitBreaker] = {
            concern: (breakers or {}).get(concern)
            or CircuitBreaker(fail_max=3, reset_timeout=1.0, name=f"redis-store:{concern}")
            for concern in CONCERNS
        }
        self._turns = _Turns(max_in_flight)
        self._lag: _LoopLag | None = None
        self._wrong_loop_logged = False
        self._hit_buckets = client.register_script(_script("hit_buckets"))
        self._args: dict[tuple[int, tuple[BucketSpec, ...]], list[str]] = {}
        self._lease_acquire = client.register_script(_script("lease_acquire"))
        self._lease_complete = client.register_script(_script("lease_complete"))
        self._lease_release = client.register_script(_script("lease_release"))
        self._lease_extend = client.register_script(_script("lease_extend"))

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        prefix: str = "armor:",
        timeout: float = 0.5,
        breakers: Mapping[str, CircuitBreaker] | None = None,
        max_in_flight: int | None = None,
        queue_timeout: float = 2.0,
        **client_options: Any,
    ) -> RedisStore:
        """Connect lazily to ``url`` (``redis://host:port/db``, ``rediss://``, ``unix://``).

        ``client_options`` go to the connection pool (``max_connections`` defaults to 64).

        Raises:
            ConfigError: naming ``store``: the URL is malformed (checked here, before any
                connection), or see ``RedisStore``.
            ImportError: the ``redis`` extra is not installed.
        """
        from asgi_armor.stores._urls import canonical

        url = canonical(url)  # valkey:// and valkeys:// are redis:// and rediss://
        import redis.asyncio as aioredis

        check_url(url)
        # No socket timeouts of redis-py's own: they would count this process's backlog
        # as Redis time. The store's deadline (store time only) cuts every call.
        client_options.setdefault("socket_timeout", None)
        client_options.setdefault("socket_connect_timeout", None)
        # Never more calls in flight than connections, so a call never waits for one.
        max_connections = client_options.pop("max_connections", _MAX_IN_FLIGHT)
        pool = aioredis.BlockingConnectionPool.from_url(
            url, max_connections=max_connections, timeout=None, **client_options
        )
        client = aioredis.Redis.from_pool(pool)
        return cls(
            client,
            prefix=prefix,
            timeout=timeout,
            breakers=breakers,
            max_in_flight=max_in_flight,
            queue_timeout=queue_timeout,
        )

    def check_runtime(self) -> None:
        """Fail unless the running event loop is one this store can use (asyncio).

        ``Armored`` calls it at ASGI lifespan start-up.

        Raises:
            ConfigError: naming ``store``, when not running on asyncio (e.g. on trio).
        """
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            raise ConfigError(
                "store: RedisStore runs on asyncio only (redis.asyncio) and this app is not "
                'running on asyncio; serve it on asyncio or use store = "memory"'
            ) from None

    def _not_on_asyncio(self) -> StoreError:
        if not self._wrong_loop_logged:
            self._wrong_loop_logged = True
            logger.error(
                "RedisStore runs on asyncio only (redis.asyncio) and this app is not running "
                "on asyncio: every store call fails (serve it on asyncio or use a MemoryStore)"
            )
        return StoreError("redis store unavailable: not running on asyncio")

    async def _run(
        self,
        call: Any,
        *args: Any,
        concern: Concern = "idempotency",
        admits: bool = False,
        **kwargs: Any,
    ) -> Any:
        """Send ``call`` in its turn, under ``concern``'s breaker and the store deadline.

        ``admits``: the call admits new work, so its wait for a turn is bounded
        (``Overloaded``). The defaults (a lease operation on work already admitted, which
        waits its turn) are the safe ones for an operation that does not say.
        """
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            raise self._not_on_asyncio() from None
        turns = self._turns
        if admits and not turns.free:
            try:
                async with asyncio.timeout(self.queue_timeout):
                    await turns.acquire(concern)
            except TimeoutError:
                raise Overloaded(retry_after=1.0) from None
        else:
            await turns.acquire(concern)
        try:
            lag = self._lag
            if lag is None or lag.loop is not loop:
                lag = self._lag = _LoopLag(loop)
            async with self.breakers[concern]:
                async with asyncio.timeout(None) as scope:
                    deadline = _Deadline(lag, scope, self.timeout)
                    try:
                        return await call(*args, **kwargs)
                    finally:
                        deadline.close()
        except CircuitOpenError as exc:
            raise StoreError(f"redis store unavailable for {concern} (breaker open)") from exc
        except (_RedisError, OSError, TimeoutError) as exc:
            raise StoreError(f"redis store call failed: {type(exc).__name__}") from exc
        finally:
            turns.release()

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
        reply = await self._run(
            self._hit_buckets,
            keys=[prefix + key for key in keys],
            args=args,
            concern="rate_limit",
            admits=True,
        )
        return reply[0] == 1, float(reply[1]), [float(tat) for tat in reply[2:]]

    async def lease_acquire(self, key: str, lease: bytes, ttl: float) -> bytes | None:
        """See ``IdempotencyStore.lease_acquire``."""
        current: bytes | None = await self._run(
            self._lease_acquire, keys=[self.prefix + key], args=[lease, _ms(ttl)], admits=True
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

    async def lease_extend(self, key: str, lease: bytes, ttl: float) -> bool:
        """See ``IdempotencyStore.lease_extend``."""
        done = await self._run(self._lease_extend, keys=[self.prefix + key], args=[lease, _ms(ttl)])
        return bool(done)

    async def remember(self, key: str, ttl: float) -> bool:
        """See ``NonceStore.remember``: one ``SET NX PX``."""
        created = await self._run(
            self.client.set,
            self.prefix + key,
            b"1",
            nx=True,
            px=_ms(ttl),
            concern="replay",
            admits=True,
        )
        return bool(created)

    async def forget(self, key: str) -> None:
        """See ``NonceStore.forget``: one ``DEL``."""
        await self._run(self.client.delete, self.prefix + key, concern="replay")

    async def aclose(self) -> None:
        """Close the connection pool."""
        await self.client.aclose()

    def __repr__(self) -> str:
        return f"RedisStore(prefix={self.prefix!r}, timeout={self.timeout})"
