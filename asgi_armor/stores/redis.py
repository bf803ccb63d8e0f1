"""The Redis store: state shared by every app process, concurrent calls in one round trip.

Each operation is one ``EVALSHA`` of a Lua script shipped with the package (or one plain
command), so a decision over several rate-limit layers is atomic. Concurrent operations
of one process share round trips: the calls issued while a batch is in flight (or in
the same event-loop tick) go out together as one pipeline of commands, each keeping its
own reply, its own error and its own concern's failure accounting. A lone call goes out
at once. After ``NOSCRIPT`` (a Redis restart or ``SCRIPT FLUSH``) a batch loads the
scripts and resends the calls that got it, once. A batch that finds its connection
stale (Redis restarted, failed over, or a proxy closed it while idle) is sent once more
on a new connection, within the same deadline, so a restart costs no call: every
operation answers the same when run twice (docs/stores.md, "Stale connections").
Failures surface as ``StoreError``; each concern applies its own ``on_store_error``
policy. Runs on asyncio (redis.asyncio).

A store call is judged by the store's answer, not by this process's load:

- At most ``max_in_flight`` batches are in flight at once (each on a connection of the
  store's own, no more than the pool's ``max_connections``), of at most ``max_batch``
  calls. A call waiting for a batch has not been sent, so its wait is not store time.
  Waiting calls are taken round robin across concerns, so a burst of rate-limit calls
  does not queue an idempotency lease or a replay check behind it. A call that admits
  new work (``hit_buckets``, ``lease_acquire``, ``remember``) and waits longer than
  ``queue_timeout`` raises ``Overloaded`` (503 ``overloaded``): local overload, never the
  store-failure policy, never counted by a breaker. Calls that finish work already done
  (``lease_complete``, ``lease_release``, ``lease_extend``, ``forget``) always wait, and
  go first within their concern.
- A batch fails after ``timeout`` seconds of *store time* from when it was sent: time the
  event loop was free to read the answer. Seconds the loop spent late on its timers (a
  burst of requests keeps it busy) are not counted, so a backlog here never reads as a
  slow Redis. A slow batch fails its own calls only.
- Each concern has its own circuit breaker (``breakers["rate_limit"]``,
  ``["idempotency"]``, ``["replay"]``). A call is admitted by its concern's breaker when
  its batch is formed, and its outcome is recorded there only: an error reply fails that
  call alone, and a batch that fails as a whole (connection lost, no answer in time) is a
  failure of each call it carried that had no answer yet, each counted by its own
  concern, as if each had made its own round trip. A concern that had no call in the
  batch counts nothing. A command over 64 KiB travels alone, so one request's oversized
  write cannot fail the calls of others. A dead Redis still costs microseconds per call
  once a concern's breaker is open, not a connect timeout.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import itertools
import logging
import math
import os
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
_ARGS_CACHE = 256  # distinct (cost, rule set) commands kept encoded
_TICK = 0.02  # seconds between two looks at the event loop's lag while calls are sent
_MAX_CONNECTIONS = 64  # the pool's connections (from_url)
_MAX_IN_FLIGHT = 4  # batches in flight by default
_MAX_BATCH = 128  # calls per batch by default
_ALONE = 65536  # bytes: a command this big is sent in a batch of its own
_SCHEMES = ("redis", "rediss", "unix", "valkey", "valkeys")
_DECODES = (
    "the Redis client decodes responses (decode_responses=True); "
    "RedisStore needs one that returns bytes"
)

#: The concerns that keep separate failure accounting (one breaker each).
Concern = Literal["rate_limit", "idempotency", "replay"]
CONCERNS: tuple[Concern, ...] = ("rate_limit", "idempotency", "replay")

try:
    from redis.exceptions import AskError as _AskError
    from redis.exceptions import BusyLoadingError as _BusyLoadingError
    from redis.exceptions import ConnectionError as _ConnectionError
    from redis.exceptions import NoScriptError as _NoScriptError
    from redis.exceptions import ReadOnlyError as _ReadOnlyError
    from redis.exceptions import RedisError as _RedisError
    from redis.exceptions import ResponseError as _ResponseError
    from redis.exceptions import TryAgainError as _TryAgainError
except ImportError:  # pragma: no cover - the redis extra is missing; from_url says so

    class _RedisError(Exception):  # type: ignore[no-redef]
        """Stands in for redis.exceptions.RedisError when redis is not installed."""

    class _ConnectionError(_RedisError):  # type: ignore[no-redef]
        """Stands in for redis.exceptions.ConnectionError when redis is not installed."""

    class _BusyLoadingError(_ConnectionError):  # type: ignore[no-redef]
        """Stands in for redis.exceptions.BusyLoadingError when redis is not installed."""

    class _ResponseError(_RedisError):  # type: ignore[no-redef]
        """Stands in for redis.exceptions.ResponseError when redis is not installed."""

    class _NoScriptError(_ResponseError):  # type: ignore[no-redef]
        """Stands in for redis.exceptions.NoScriptError when redis is not installed."""

    class _ReadOnlyError(_ResponseError):  # type: ignore[no-redef]
        """Stands in for redis.exceptions.ReadOnlyError when redis is not installed."""

    class _AskError(_ResponseError):  # type: ignore[no-redef]
        """Stands in for redis.exceptions.AskError when redis is not installed."""

    class _TryAgainError(_ResponseError):  # type: ignore[no-redef]
        """Stands in for redis.exceptions.TryAgainError when redis is not installed."""


#: What a connection that went stale while idle raises at its first use: the socket
#: closed or reset. A timeout, or an answer of Redis's (LOADING is one), is not that.
_LOST = (_ConnectionError, OSError, EOFError)
_NOT_LOST = (TimeoutError, _BusyLoadingError)
#: A cluster node's answer that the key is elsewhere (MOVED, ASK) or in migration
#: (TRYAGAIN): the node is healthy, no breaker counts it, its connection stays.
_REDIRECTS = (_AskError, _TryAgainError)
#: Error replies after which a connection carries the next batch: the command did not
#: run here, and Redis keeps the connection open.
_KEEPS_LINK = (_NoScriptError, *_REDIRECTS)

_READ_SIZE = 65536  # bytes asked of a connection's stream per read
_MORE: Any = object()  # hiredis: no whole reply buffered yet


def _hiredis_reader() -> Any:
    """A hiredis reply reader giving redis-py's error classes (NOSCRIPT, MOVED, LOADING)."""
    import hiredis
    from redis._parsers import BaseParser
    from redis.exceptions import InvalidResponse

    return hiredis.Reader(
        protocolError=InvalidResponse, replyError=BaseParser.parse_error, notEnoughData=_MORE
    )


def _parses_with_hiredis(pool: Any) -> bool:
    """Whether ``pool``'s connections parse with hiredis (the default when installed)."""
    try:
        from redis._parsers import _AsyncHiredisParser
        from redis.asyncio.connection import DefaultParser
        from redis.utils import HIREDIS_AVAILABLE
    except ImportError:  # pragma: no cover - a redis-py without these: its own path
        return False
    parser = pool.connection_kwargs.get("parser_class", DefaultParser)
    return (
        HIREDIS_AVAILABLE and isinstance(parser, type) and issubclass(parser, _AsyncHiredisParser)
    )


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


def _bulk(value: bytes) -> bytes:
    return b"$%d\r\n%s\r\n" % (len(value), value)


def _command(*args: bytes) -> bytes:
    """One command in the Redis protocol (RESP), ready to be written."""
    return b"*%d\r\n%s" % (len(args), b"".join(map(_bulk, args)))


def _key(key: str) -> bytes:
    # Never an exception for a key: a part a client controls may not be valid UTF-8.
    return key.encode("utf-8", "surrogateescape")


class _Script:
    """A Lua script shipped with the package, called by ``EVALSHA`` inside a batch."""

    __slots__ = ("load", "sha")

    def __init__(self, name: str) -> None:
        source = _script(name).encode("utf-8")
        self.sha = hashlib.sha1(source, usedforsecurity=False).hexdigest().encode("ascii")
        self.load = _command(b"SCRIPT", b"LOAD", source)

    def _head(self, keys: int, count: int) -> bytes:
        # EVALSHA, the script's hash and the number of keys: what precedes the keys.
        return b"*%d\r\n$7\r\nEVALSHA\r\n$40\r\n%s\r\n%s" % (
            3 + keys + count,
            self.sha,
            _bulk(b"%d" % keys),
        )

    def call(self, keys: Sequence[bytes], argv: bytes, count: int) -> bytes:
        """``EVALSHA`` with ``keys`` and ``count`` arguments already encoded in ``argv``."""
        return self._head(len(keys), count) + b"".join(map(_bulk, keys)) + argv

    def template(self, prefix: bytes, keys: int, argv: bytes, count: int) -> bytes:
        """``call`` as a ``%`` template taking a ``(length, key)`` pair per key, each key
        written after ``prefix`` (the lengths given include it)."""
        head = self._head(keys, count)
        key = b"$%%d\r\n%s%%b\r\n" % prefix.replace(b"%", b"%%")
        return head.replace(b"%", b"%%") + key * keys + argv.replace(b"%", b"%%")


class _Call:
    """One store operation waiting in a batch: its command, its concern, its caller.

    ``repeat``: the command may be sent again after its connection was lost, because a
    second run answers as the first (see ``_resend``).
    """

    __slots__ = (
        "admits",
        "command",
        "concern",
        "epoch",
        "future",
        "queued",
        "repeat",
        "script",
        "start",
    )

    def __init__(
        self,
        concern: Concern,
        admits: bool,
        command: bytes,
        script: _Script | None,
        future: asyncio.Future[Any],
        repeat: bool = True,
    ) -> None:
        self.concern = concern
        self.admits = admits
        self.command = command
        self.script = script
        self.future = future
        self.repeat = repeat
        self.queued = 0.0
        self.epoch = 0
        self.start = 0.0


class _Link:
    """One connection of the store's own, carrying one batch at a time.

    redis-py makes the connection (AUTH, SELECT, TLS, a Sentinel's current master) and
    writes each batch. With hiredis (the ``redis`` extra), the replies are read straight
    off the connection's stream and parsed by a reader of the link's own, one C call per
    reply; redis-py's own path costs a coroutine and several checks per reply, which was
    a fifth of the CPU of a batched decision. Without hiredis, or with another
    ``parser_class`` chosen, redis-py reads them.

    ``answered``: the link answered a batch since it last connected, so a connection
    lost at its next use went stale while idle (Redis restarted, or a proxy closed it),
    and its batch may be sent again. ``asking``: every command it carries follows an
    ``ASKING`` (a cluster node asked for keys of a slot it is importing).
    """

    __slots__ = ("__weakref__", "_fast", "answered", "asking", "connection", "reader")

    def __init__(self, store: RedisStore) -> None:
        pool: Any = store.client.connection_pool
        self.connection: Any = pool.make_connection()
        self.answered = False
        self.asking = store._asking
        self.reader: Any = None
        self._fast = store._hiredis
        # redis-py keeps it as a weak method, called on every (re)connect.
        self.connection.register_connect_callback(self._connected)

    def _connected(self, connection: Any) -> None:
        # A new socket: not a stale one, and its replies start a new parse.
        self.answered = False
        if self._fast:
            self.reader = _hiredis_reader()

    async def drop(self, *, wait: bool = False) -> None:
        """Close the connection: the next batch connects anew, and is not stale."""
        self.answered = False
        await self.connection.disconnect(nowait=not wait)

    async def replies(self, count: int, replies: list[Any]) -> bool:
        """Read ``count`` replies into ``replies``, an error reply in its place; whether
        an error reply came other than those a link survives (``_KEEPS_LINK``).
        ``LOADING`` (a ConnectionError of redis-py's) raises, and so does ``READONLY``:
        the primary this connection reached is a replica now (a failover), nothing was
        written, and the calls are sent again on a connection made anew, as redis-py's
        Sentinel connection does."""
        reader = self.reader
        if reader is None:
            return await self._replies_by_redis_py(count, replies)
        stream = self.connection._reader
        if stream is None:  # closed under us (the store closing)
            raise _ConnectionError("Connection closed.")
        errors = False
        while count:
            reply = reader.gets()
            if reply is _MORE:
                data = await stream.read(_READ_SIZE)
                if not data:
                    raise _ConnectionError("Connection closed by server.")
                reader.feed(data)
                continue
            if isinstance(reply, Exception):
                if isinstance(reply, _ConnectionError):
                    raise reply  # as redis-py's parser: the connection is unusable
                if isinstance(reply, _ReadOnlyError):
                    raise _ConnectionError("the primary is a replica now") from reply
                errors = errors or not isinstance(reply, _KEEPS_LINK)
            replies.append(reply)
            count -= 1
        return errors

    async def call_replies(self, count: int, replies: list[Any]) -> bool:
        """``replies`` for ``count`` calls: one reply each, after the ``+OK`` of its
        ``ASKING`` on an asking link (dropped)."""
        if not self.asking:
            return await self.replies(count, replies)
        both: list[Any] = []
        try:
            return await self.replies(2 * count, both)
        finally:
            replies.extend(both[1::2])

    async def _replies_by_redis_py(self, count: int, replies: list[Any]) -> bool:
        # No per-read timeout: the batch runs under the store deadline (``_Deadline``).
        read = functools.partial(self.connection.read_response, timeout=math.inf)
        errors = False
        for _ in range(count):
            try:
                replies.append(await read())
            except _ResponseError as exc:
                replies.append(exc)
                errors = errors or not isinstance(exc, _KEEPS_LINK)
        return errors


class _Batcher:
    """Sends the store calls of one event loop to one Redis, many per round trip.

    A call that finds a batch slot free goes out on the loop's next iteration, with every
    call issued before then (the same tick): nothing waits to fill a batch. While
    ``max_in_flight`` batches are in flight, new calls wait; the first batch to come back
    takes up to ``max_batch`` of them, round robin across concerns (FIFO within one), and
    sends them at once as one pipeline of commands on one connection. A command larger
    than ``_ALONE`` bytes (a big stored response) travels in a batch of its own, so its
    transfer never delays, or fails, the calls of other requests. A store over several
    nodes keeps one ``RedisStore``, so one batcher, per node.

    Each batch is sent by a task of its own, so a caller that goes away (a client that
    disconnects) never cuts short the round trip of the calls it shared.
    """

    __slots__ = (
        "_expiry",
        "_idle",
        "_links",
        "_next",
        "_queues",
        "_scheduled",
        "_tasks",
        "lag",
        "loop",
        "running",
        "store",
        "waiting",
    )

    def __init__(self, store: RedisStore, loop: asyncio.AbstractEventLoop) -> None:
        self.store = store
        self.loop = loop
        self.lag = _LoopLag(loop)
        # Per concern: work being finished (never shed, sent first), then new work.
        self._queues: dict[str, tuple[deque[_Call], deque[_Call]]] = {
            concern: (deque(), deque()) for concern in CONCERNS
        }
        self._next = 0
        self.waiting = 0  # calls in the queues (some may be done: cancelled or shed)
        self.running = 0  # batch tasks alive: sending, or about to take calls
        self._scheduled = 0  # of which not started yet (they take what waits by then)
        self._tasks: set[asyncio.Task[None]] = set()
        self._expiry: asyncio.TimerHandle | None = None
        # Every link made (never more than max_in_flight), and those not carrying a batch.
        self._links: list[_Link] = []
        self._idle: list[_Link] = []

    def submit(self, call: _Call) -> None:
        """Queue ``call``; start a batch task when one is free and none would take it."""
        self._queues[call.concern][call.admits].append(call)
        self.waiting += 1
        store = self.store
        if self.running < store.max_in_flight and self.waiting > self._scheduled * store.max_batch:
            self.running += 1
            self._scheduled += 1
            task = self.loop.create_task(self._batches())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        if call.admits:
            # One timer for every waiting call, armed at most once per queue_timeout.
            call.queued = now = self.loop.time()
            if self._expiry is None:
                self._expiry = self.loop.call_at(now + store.queue_timeout, self._expire)

    def _expire(self) -> None:
        """Shed the new work that has waited ``queue_timeout`` for a batch (``Overloaded``)."""
        self._expiry = None
        now = self.loop.time()
        timeout = self.store.queue_timeout
        first = math.inf
        for _, admitting in self._queues.values():
            while admitting:
                call = admitting[0]
                if not call.future.done() and call.queued + timeout > now:
                    first = min(first, call.queued + timeout)
                    break
                admitting.popleft()
                self.waiting -= 1
                if not call.future.done():
                    call.future.set_exception(Overloaded(retry_after=1.0))
        if first < math.inf:
            self._expiry = self.loop.call_at(first, self._expire)

    def _take(self) -> list[_Call]:
        """Up to ``max_batch`` waiting calls, round robin across concerns, each admitted
        by its concern's breaker (a call its breaker refuses fails at once)."""
        batch: list[_Call] = []
        limit = self.store.max_batch
        breakers = self.store.breakers
        count = len(CONCERNS)
        while self.waiting:
            popped = False
            for _ in range(count):
                concern = CONCERNS[self._next]
                self._next = (self._next + 1) % count
                queues = self._queues[concern]
                call = self._pop(queues)
                if call is None:
                    continue
                popped = True
                if len(call.command) > _ALONE and batch:
                    # A big command goes in the next batch, alone.
                    queues[call.admits].appendleft(call)
                    self.waiting += 1
                    return batch
                try:
                    call.epoch, call.start = breakers[concern]._enter()
                except CircuitOpenError as exc:
                    error = StoreError(f"redis store unavailable for {concern} (breaker open)")
                    error.__cause__ = exc
                    call.future.set_exception(error)
                    continue
                batch.append(call)
                if len(batch) >= limit or len(call.command) > _ALONE:
                    return batch
            if not popped:
                break
        return batch

    def _pop(self, queues: tuple[deque[_Call], deque[_Call]]) -> _Call | None:
        for queue in queues:
            while queue:
                call = queue.popleft()
                self.waiting -= 1
                if not call.future.done():
                    return call
        return None

    async def _batches(self) -> None:
        """Send batches while calls wait, one round trip at a time, then end."""
        self._scheduled -= 1
        try:
            while True:
                batch = self._take()
                if not batch:
                    return
                await self._send(batch)
        finally:
            self.running -= 1

    async def _send(self, batch: list[_Call]) -> None:
        """One round trip for ``batch`` (two when Redis lost its scripts or the link's
        connection was stale), under the store deadline; then every call gets its own
        reply, or the batch's failure if its reply never came."""
        store = self.store
        idle = self._idle
        if idle:
            link = idle.pop()
        else:
            link = _Link(store)
            self._links.append(link)
        replies: list[Any] = []
        failure: BaseException | None = None
        try:
            async with asyncio.timeout(None) as scope:
                deadline = _Deadline(self.lag, scope, store.timeout)
                try:
                    if await self._round_trip(link, batch, replies):
                        # Redis may close a connection after an error (a protocol
                        # error does): never hand it to the next batch.
                        await link.drop(wait=True)
                    else:
                        link.answered = True
                finally:
                    deadline.close()
        except (_RedisError, OSError, TimeoutError) as exc:
            failure = exc
            # Cut short: a reply may still be coming, so this socket never carries another.
            await link.drop()
        except BaseException as exc:
            # Cancelled (the loop is shutting down): this says nothing about the store, so
            # no breaker counts the calls left unanswered; their callers are told anyway.
            self._settle(batch, replies, exc)
            await link.drop()
            raise
        finally:
            idle.append(link)
        self._settle(batch, replies, failure)

    async def _round_trip(self, link: _Link, batch: list[_Call], replies: list[Any]) -> bool:
        """``_exchange``; on a lost connection that had answered a batch before (stale:
        Redis restarted, or the connection was closed while idle), once more on a new
        one, for the calls that got no reply. Returns whether an error reply came back."""
        reused = link.answered
        try:
            return await _exchange(link, batch, replies)
        except _LOST as exc:
            if not reused or isinstance(exc, _NOT_LOST):
                raise  # a new connection lost: Redis itself failed, the calls fail
            self.store.stale_connections += 1
            return await _resend(link, batch, replies, exc)

    def _settle(
        self, batch: list[_Call], replies: list[Any], failure: BaseException | None
    ) -> None:
        """Each call's outcome, recorded by its own concern's breaker only: its reply, its
        own error reply, or (no reply) the batch's failure."""
        breakers = self.store.breakers
        answered = len(replies)
        for index, call in enumerate(batch):
            breaker = breakers[call.concern]
            reply = replies[index] if index < answered else _PENDING
            if reply is _PENDING:
                if isinstance(failure, Exception):
                    breaker._finish(failure, call.epoch, call.start)
                    reason = type(failure).__name__
                else:
                    breaker.release(epoch=call.epoch)
                    reason = "cancelled"
                error = StoreError(f"redis store call failed: {reason}")
                error.__cause__ = failure
            elif isinstance(reply, Exception):
                # An error reply, or the lost connection of a call not sent again.
                healthy = isinstance(reply, _REDIRECTS)
                breaker._finish(None if healthy else reply, call.epoch, call.start)
                error = StoreError(f"redis store call failed: {type(reply).__name__}")
                error.__cause__ = reply
            else:
                breaker._finish(None, call.epoch, call.start)
                if not call.future.done():
                    call.future.set_result(reply)
                continue
            if not call.future.done():
                call.future.set_exception(error)


#: Stands for a reply not read (yet) in ``_exchange``'s list of replies.
_PENDING: Any = object()


async def _exchange(link: _Link, batch: list[_Call], replies: list[Any]) -> bool:
    """Write every command of ``batch`` at once and read the replies into ``replies``
    (an error reply in its place), so the calls answered before a failure keep their
    answers. After ``NOSCRIPT`` (Redis restarted, or ``SCRIPT FLUSH``), load the scripts
    and resend those calls once, in one more round trip: a ``NOSCRIPT`` reply means the
    script did not run, so a resend never runs a call twice.

    Returns whether any other error reply came back.
    """
    connection = link.connection
    if not connection.is_connected:
        # connect(), not the connect send_packed_command would make: a Sentinel's
        # connection asks for the current master in connect() only.
        await connection.connect()
    send = connection.send_packed_command
    await send(b"".join(call.command for call in batch), check_health=False)
    errors = await link.call_replies(len(batch), replies)
    lost = [index for index, reply in enumerate(replies) if isinstance(reply, _NoScriptError)]
    if not lost:
        return errors
    loads: list[bytes] = []
    for index in lost:
        script = batch[index].script
        if script is not None and script.load not in loads:
            loads.append(script.load)
        replies[index] = _PENDING
    await send(
        b"".join(loads) + b"".join(batch[index].command for index in lost), check_health=False
    )
    # A load that failed shows in its calls' replies (NOSCRIPT again: an error each).
    await link.replies(len(loads), [])
    resent: list[Any] = []
    try:
        await link.call_replies(len(lost), resent)
    finally:
        for index, reply in zip(lost, resent, strict=False):
            replies[index] = reply
    return any(
        isinstance(reply, _ResponseError) and not isinstance(reply, _KEEPS_LINK)
        for reply in replies
    )


async def _resend(link: _Link, batch: list[_Call], replies: list[Any], lost: Exception) -> bool:
    """Send again, on ``link`` connected anew, the calls of ``batch`` that got no reply
    (or ``NOSCRIPT``: not run) before it was ``lost``; merge their replies into
    ``replies``. A call that may not run twice (``repeat`` false) and may have run keeps
    ``lost`` as its reply: it fails, as it would have without the second attempt.

    Returns whether an error reply came back.
    """
    again: list[int] = []
    for index, call in enumerate(batch):
        reply = replies[index] if index < len(replies) else _PENDING
        if reply is _PENDING or isinstance(reply, _NoScriptError):
            if call.repeat or reply is not _PENDING:
                again.append(index)
            else:
                reply = lost
        if index < len(replies):
            replies[index] = reply
        else:
            replies.append(reply)
    if not again:
        return False
    await link.drop()  # redis-py may have already; a new socket for sure
    resent: list[Any] = []
    try:
        return await _exchange(link, [batch[index] for index in again], resent)
    finally:
        for index, reply in zip(again, resent, strict=False):
            replies[index] = reply
        for index in again[len(resent) :]:
            replies[index] = _PENDING


_ASKING = _command(b"ASKING")
_HIT_BUCKETS = _Script("hit_buckets")
_LEASE_ACQUIRE = _Script("lease_acquire")
_LEASE_COMPLETE = _Script("lease_complete")
_LEASE_RELEASE = _Script("lease_release")
_LEASE_EXTEND = _Script("lease_extend")
_REMEMBER = _Script("remember")


class RedisStore:
    """Store backed by Redis, for several processes or hosts.

    Concurrent calls share round trips: see the module docstring and docs/stores.md.

    Args:
        client: a ``redis.asyncio.Redis`` that returns bytes (``decode_responses=False``).
        prefix: put before every key (default ``"armor:"``).
        timeout: seconds of store time one batch may take from when it is sent before
            its calls count as failed (time this process was too busy to read the
            answer is not counted).
        breakers: a breaker per concern (``"rate_limit"``, ``"idempotency"``,
            ``"replay"``); missing ones open after 3 consecutive failures and try again
            after 1 s, so a returning Redis is used within about a second.
        max_in_flight: most batches (round trips) in flight at once, each on its own
            connection (default: 4, at most the pool's connections).
        max_batch: most calls sent in one batch (default 128).
        queue_timeout: seconds a call admitting new work may wait for a batch before
            ``Overloaded`` is raised.

    Attributes:
        stale_connections: connections found stale at their first use (each one's
            batch sent again on a new connection): one per connection after a restart.

    Raises:
        ConfigError: naming ``store``: the client decodes responses, an unknown concern
            in ``breakers``, a timeout that is not positive, ``max_in_flight`` outside
            1..the pool's ``max_connections``, or ``max_batch`` below 1.
    """

    def __init__(
        self,
        client: aioredis.Redis,
        *,
        prefix: str = "armor:",
        timeout: float = 0.5,
        breakers: Mapping[str, CircuitBreaker] | None = None,
        max_in_flight: int | None = None,
        max_batch: int = _MAX_BATCH,
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
        connections = getattr(pool, "max_connections", _MAX_CONNECTIONS)
        if max_in_flight is None:
            max_in_flight = min(connections, _MAX_IN_FLIGHT)
        if not 1 <= max_in_flight <= connections:
            # More batches than connections would wait for a connection inside the store
            # deadline: this process's queue would read as a slow Redis.
            raise ConfigError(
                f"store: max_in_flight must be 1..{connections} (the pool's max_connections)"
            )
        if max_batch < 1:
            raise ConfigError("store: max_batch must be at least 1")
        if not timeout > 0 or not queue_timeout > 0:
            raise ConfigError("store: timeout and queue_timeout must be more than 0 seconds")
        self.client = client
        self.prefix = prefix
        self.timeout = timeout
        self.queue_timeout = queue_timeout
        self.max_in_flight = max_in_flight
        self.max_batch = max_batch
        self.breakers: dict[str, CircuitBreaker] = {
            concern: (breakers or {}).get(concern)
            or CircuitBreaker(fail_max=3, reset_timeout=1.0, name=f"redis-store:{concern}")
            for concern in CONCERNS
        }
        self._batcher: _Batcher | None = None
        self._wrong_loop_logged = False
        self._prefix = _key(prefix)
        self._templates: dict[tuple[int, tuple[BucketSpec, ...]], bytes] = {}
        self.stale_connections = 0
        self._hiredis = _parses_with_hiredis(pool)
        # Replay-cache tokens: unique per call across processes, no syscall per call.
        self._token_prefix = os.urandom(9).hex().encode("ascii") + b":"
        self._tokens = itertools.count()
        # Set by RedisClusterStore on the stores it follows an ASK redirection with:
        # every command goes after an ASKING, on links of their own.
        self._asking = False

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        prefix: str = "armor:",
        timeout: float = 0.5,
        breakers: Mapping[str, CircuitBreaker] | None = None,
        max_in_flight: int | None = None,
        max_batch: int = _MAX_BATCH,
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
        # as Redis time. The store's deadline (store time only) cuts every batch.
        client_options.setdefault("socket_timeout", None)
        client_options.setdefault("socket_connect_timeout", None)
        # Never more batches in flight than connections, so one never waits for one.
        max_connections = client_options.pop("max_connections", _MAX_CONNECTIONS)
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
            max_batch=max_batch,
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

    def _call(
        self,
        command: bytes,
        script: _Script | None = None,
        *,
        concern: Concern = "idempotency",
        admits: bool = False,
        repeat: bool = True,
    ) -> asyncio.Future[Any]:
        """Send ``command`` in the next batch: the future of its own reply (a future, not
        a coroutine, so each call awaits one frame less).

        ``admits``: the call admits new work, so its wait for a batch is bounded
        (``Overloaded``). The defaults (a lease operation on work already admitted, which
        waits its turn) are the safe ones for an operation that does not say.
        ``repeat``: a second run answers as the first, so the command may be sent again
        when its connection is found stale.
        """
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            raise self._not_on_asyncio() from None
        batcher = self._batcher
        if batcher is None or batcher.loop is not loop:
            batcher = self._batcher = _Batcher(self, loop)
        future: asyncio.Future[Any] = loop.create_future()
        if self._asking:
            command = _ASKING + command
        batcher.submit(_Call(concern, admits, command, script, future, repeat))
        return future

    async def hit_buckets(
        self, keys: Sequence[str], specs: Sequence[BucketSpec], cost: int
    ) -> tuple[bool, float, list[float]]:
        """See ``RateLimitStore.hit_buckets``: one EVALSHA for every layer.

        A take sent again after a lost connection may take twice (never admits more); a
        give-back (negative ``cost``) is never sent again: it could give back twice.
        """
        # The command depends only on the rules and the cost, but for the keys: the rest
        # is encoded once, as a template the keys are written into.
        cache_key = (cost, specs if type(specs) is tuple else tuple(specs))
        template = self._templates.get(cache_key)
        if template is None:
            numbers: list[float | int] = [cost]
            for interval, tolerance in specs:
                numbers.append(interval)
                numbers.append(tolerance)
            argv = b"".join(_bulk(repr(number).encode("ascii")) for number in numbers)
            template = _HIT_BUCKETS.template(self._prefix, len(specs), argv, len(numbers))
            # A give-back's specs carry its own request's bucket times: never seen again.
            if cost >= 0:
                if len(self._templates) >= _ARGS_CACHE:
                    self._templates.clear()
                self._templates[cache_key] = template
        extra = len(self._prefix)
        values: list[int | bytes] = []
        for key in keys:
            encoded = key.encode("utf-8", "surrogateescape")  # as _key, without the call
            values.append(len(encoded) + extra)
            values.append(encoded)
        reply = await self._call(
            template % tuple(values),
            _HIT_BUCKETS,
            concern="rate_limit",
            admits=True,
            repeat=cost >= 0,
        )
        return reply[0] == 1, float(reply[1]), [float(tat) for tat in reply[2:]]

    async def lease_acquire(self, key: str, lease: bytes, ttl: float) -> bytes | None:
        """See ``IdempotencyStore.lease_acquire``."""
        command = _LEASE_ACQUIRE.call(
            [self._prefix + _key(key)], _bulk(lease) + _bulk(b"%d" % _ms(ttl)), 2
        )
        current: bytes | None = await self._call(command, _LEASE_ACQUIRE, admits=True)
        return current

    async def lease_complete(self, key: str, lease: bytes, value: bytes, ttl: float) -> bool:
        """See ``IdempotencyStore.lease_complete``."""
        command = _LEASE_COMPLETE.call(
            [self._prefix + _key(key)], _bulk(lease) + _bulk(value) + _bulk(b"%d" % _ms(ttl)), 3
        )
        return bool(await self._call(command, _LEASE_COMPLETE))

    async def lease_release(self, key: str, lease: bytes) -> bool:
        """See ``IdempotencyStore.lease_release``."""
        command = _LEASE_RELEASE.call([self._prefix + _key(key)], _bulk(lease), 1)
        return bool(await self._call(command, _LEASE_RELEASE))

    async def lease_extend(self, key: str, lease: bytes, ttl: float) -> bool:
        """See ``IdempotencyStore.lease_extend``."""
        command = _LEASE_EXTEND.call(
            [self._prefix + _key(key)], _bulk(lease) + _bulk(b"%d" % _ms(ttl)), 2
        )
        return bool(await self._call(command, _LEASE_EXTEND))

    async def remember(self, key: str, ttl: float, token: bytes | None = None) -> bool:
        """See ``NonceStore.remember``: one script call holding a token of this call's
        own when none is given, so the call sent again answers as the first."""
        if token is None:
            token = self._token_prefix + b"%x" % next(self._tokens)
        command = _REMEMBER.call(
            [self._prefix + _key(key)], _bulk(token) + _bulk(b"%d" % _ms(ttl)), 2
        )
        return bool(await self._call(command, _REMEMBER, concern="replay", admits=True))

    async def forget(self, key: str) -> None:
        """See ``NonceStore.forget``: one ``DEL``."""
        await self._call(_command(b"DEL", self._prefix + _key(key)), concern="replay")

    async def aclose(self) -> None:
        """Close the store's connections and the client's pool."""
        batcher, self._batcher = self._batcher, None
        if batcher is not None:
            for link in batcher._links:
                await link.connection.disconnect()
        await self.client.aclose()

    def __repr__(self) -> str:
        return f"RedisStore(prefix={self.prefix!r}, timeout={self.timeout})"
