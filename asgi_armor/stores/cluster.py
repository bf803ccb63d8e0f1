"""The Redis Cluster store: the state of every concern spread over a cluster's primaries.

Each primary is served by a ``RedisStore`` of its own (its in-flight bound, store-time
deadline, per-concern breakers and ``NOSCRIPT`` reload, per node), and each key goes to
the primary that owns its hash slot, read from ``CLUSTER SLOTS``. A ``MOVED`` reply
(the slot has a new owner: a failover, a resharding) is followed at once, and any failure
has the slot map read again (at most every ``refresh_interval`` seconds), so the store
finds a promoted replica by itself. During a resharding, ``ASK`` is followed to the
importing node (after ``ASKING``), and a script call over several keys that Redis cannot
run mid-move (``TRYAGAIN``) is made key by key. While the cluster converges, calls on the
slots of a lost primary fail with ``StoreError`` and each concern's ``on_store_error``
answers; the other primaries' breakers count none of it.

Keys are laid out by hash tag so that the layers of one decision share a slot where
they can: a rate-limit bucket ``rl:<rule>:<value>`` is kept as ``rl:{<value>}:<rule>``,
so every layer keyed on the same value (the same address, user, tenant) is decided in one
script call. A decision over several values is one call per slot, sent concurrently: each
slot takes its tokens or none, and when any slot denies, the tokens taken in the others
are given back, so a denied request keeps nothing and none is admitted past a limit
(docs/stores.md, Redis Cluster: what a racing request may see, and the one corner where a
give-back is not exact to the microsecond). Idempotency leases and replay nonces are
single keys, one call each.
"""

from __future__ import annotations

import asyncio
import binascii
import contextlib
import hashlib
import logging
import math
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

from asgi_armor.errors import ConfigError, Overloaded
from asgi_armor.stores._urls import parse_hosts_url, single_node_url
from asgi_armor.stores.base import BucketSpec, StoreError
from asgi_armor.stores.redis import RedisStore, check_url

__all__ = ["SLOTS", "RedisClusterStore", "cluster_key", "key_slot"]

logger = logging.getLogger("asgi_armor")

#: Hash slots of a Redis Cluster.
SLOTS = 16384

Address = tuple[str, int]
T = TypeVar("T")
_Decision = tuple[bool, float, list[float]]
_WARN_EVERY = 60.0  # seconds between two warnings of the same kind

try:
    from redis.exceptions import AskError as _AskError
    from redis.exceptions import MovedError as _MovedError
    from redis.exceptions import TryAgainError as _TryAgainError
except ImportError:  # pragma: no cover - the redis extra is missing; from_url says so

    class _AskError(Exception):  # type: ignore[no-redef]
        """Stands in for redis.exceptions.AskError when redis is not installed."""

        host = ""
        port = 0

    class _MovedError(_AskError):  # type: ignore[no-redef]
        """Stands in for redis.exceptions.MovedError when redis is not installed."""

    class _TryAgainError(Exception):  # type: ignore[no-redef]
        """Stands in for redis.exceptions.TryAgainError when redis is not installed."""


def key_slot(key: str) -> int:
    """The hash slot of ``key`` (CRC16 of its hash tag, if it has one, else of the key)."""
    raw = key.encode("utf-8", "surrogateescape")
    start = raw.find(b"{")
    if start >= 0:
        end = raw.find(b"}", start + 1)
        if end > start + 1:
            raw = raw[start + 1 : end]
    return binascii.crc_hqx(raw, 0) % SLOTS


def cluster_key(key: str) -> str:
    """The key the cluster store keeps for ``key``: laid out so that related keys share a slot.

    ``rl:<rule>:<value>`` becomes ``rl:{<value>}:<rule>`` (every rule keyed on one value in
    one slot); any other key holding a ``{`` gets a hash tag of its own in front, so a
    ``{`` inside it (a route pattern's ``{param}``) never puts unrelated keys in one slot.
    Distinct keys stay distinct (a rule name never holds ``:``).
    """
    if key.startswith("rl:"):
        rule, sep, value = key[3:].partition(":")
        if sep:
            return f"rl:{{{value}}}:{rule}"
    if "{" in key:
        tag = hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()[:16]
        return f"{{{tag}}}{key}"
    return key


def _hit(
    keys: list[str], specs: list[BucketSpec], cost: int
) -> Callable[[RedisStore], Awaitable[_Decision]]:
    return lambda node: node.hit_buckets(keys, specs, cost)


class RedisClusterStore:
    """Store backed by a Redis (or Valkey) Cluster.

    Args:
        startup_nodes: ``(host, port)`` of a few nodes; the others are discovered.
        prefix: put before every key (default ``"armor:"``; no ``{`` or ``}``).
        timeout: seconds of store time one call may take (per node, as ``RedisStore``).
        max_in_flight: most calls sent at once to one node (``RedisStore``'s default).
        queue_timeout: seconds a call admitting new work may wait for its turn before
            ``Overloaded`` is raised.
        refresh_interval: least seconds between two reads of the slot map after failures.
        tls: connect with TLS (``rediss+cluster://``).
        client_options: for each node's connection pool (``password=``, ``username=``,
            ``max_connections=``, ...).

    Raises:
        ConfigError: naming ``store`` (or ``store_prefix``): no startup node, a prefix with
            a hash-tag brace, or see ``RedisStore``.
    """

    def __init__(
        self,
        startup_nodes: Sequence[Address],
        *,
        prefix: str = "armor:",
        timeout: float = 0.5,
        max_in_flight: int | None = None,
        queue_timeout: float = 2.0,
        refresh_interval: float = 0.25,
        tls: bool = False,
        **client_options: Any,
    ) -> None:
        if not startup_nodes:
            raise ConfigError("store: name at least one node of the cluster")
        if "{" in prefix or "}" in prefix:
            raise ConfigError(
                "store_prefix: must not hold '{' or '}' on Redis Cluster "
                "(a hash tag in the prefix would put every key in one slot)"
            )
        if not refresh_interval > 0:
            raise ConfigError("store: refresh_interval must be more than 0 seconds")
        self.prefix = prefix
        self.timeout = timeout
        self.max_in_flight = max_in_flight
        self.queue_timeout = queue_timeout
        self.refresh_interval = refresh_interval
        self.startup_nodes: tuple[Address, ...] = tuple(dict.fromkeys(startup_nodes))
        self._scheme = "rediss" if tls else "redis"
        self._client_options = client_options
        #: The store of each node met so far (primaries, and the nodes asked for the map).
        self.nodes: dict[Address, RedisStore] = {}
        # The stores that follow an ASK to a node (ASKING before every command).
        self._asking: dict[Address, RedisStore] = {}
        self._slots: list[Address | None] = [None] * SLOTS
        self._replicas: tuple[Address, ...] = ()
        self._refreshing: asyncio.Future[None] | None = None
        self._refreshed_at = -math.inf
        self._warned: dict[str, float] = {}
        # A node store checks its settings when made: make one now, so a bad setting
        # fails here, at start-up, not at the first call.
        self._store(self.startup_nodes[0])

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        prefix: str = "armor:",
        timeout: float = 0.5,
        max_in_flight: int | None = None,
        queue_timeout: float = 2.0,
        refresh_interval: float = 0.25,
        **client_options: Any,
    ) -> RedisClusterStore:
        """Connect lazily to the cluster ``url`` names: ``redis+cluster://h:p[,h:p...]``
        (``rediss+cluster://`` for TLS; ``valkey+cluster://``, ``valkeys+cluster://``).

        The URL's credentials and query options apply to every node.

        Raises:
            ConfigError: naming ``store``: the URL is malformed (checked here, before any
                connection), or see ``RedisClusterStore``.
            ImportError: the ``redis`` extra is not installed.
        """
        check_url(url)
        from redis.asyncio.connection import parse_url

        parsed = parse_hosts_url(url)
        options: dict[str, Any] = dict(parse_url(single_node_url(parsed, *parsed.hosts[0])))
        for name in ("host", "port", "db", "connection_class"):
            options.pop(name, None)
        return cls(
            parsed.hosts,
            prefix=prefix,
            timeout=timeout,
            max_in_flight=max_in_flight,
            queue_timeout=queue_timeout,
            refresh_interval=refresh_interval,
            tls=parsed.tls,
            **{**options, **client_options},
        )

    def check_runtime(self) -> None:
        """Fail unless the running event loop is asyncio (as ``RedisStore.check_runtime``).

        Raises:
            ConfigError: naming ``store``, when not running on asyncio (e.g. on trio).
        """
        self._store(self.startup_nodes[0]).check_runtime()

    def _store(self, address: Address, *, asking: bool = False) -> RedisStore:
        nodes = self._asking if asking else self.nodes
        node = nodes.get(address)
        if node is None:
            host, port = address
            shown = f"[{host}]" if ":" in host else host
            node = nodes[address] = RedisStore.from_url(
                f"{self._scheme}://{shown}:{port}/0",
                prefix=self.prefix,
                timeout=self.timeout,
                max_in_flight=self.max_in_flight,
                queue_timeout=self.queue_timeout,
                **self._client_options,
            )
            node._asking = asking
        return node

    def _warn(self, kind: str, message: str, *args: object) -> None:
        now = asyncio.get_running_loop().time()
        if now - self._warned.get(kind, -math.inf) >= _WARN_EVERY:
            self._warned[kind] = now
            logger.warning(message, *args)

    async def _read_slots(self) -> None:
        """Read the slot map from the first node that answers ``CLUSTER SLOTS``."""
        primaries = dict.fromkeys(address for address in self._slots if address is not None)
        candidates = dict.fromkeys([*primaries, *self.startup_nodes, *self._replicas])
        failure: BaseException | None = None
        for address in candidates:
            try:
                async with asyncio.timeout(self.timeout):
                    client: Any = self._store(address).client
                    reply = await client.execute_command("CLUSTER", "SLOTS")
            except Exception as exc:  # any node that cannot answer: ask the next one
                failure = exc
                continue
            slots: list[Address | None] = [None] * SLOTS
            replicas: list[Address] = []
            for start, end, primary, *others in reply:
                owner = self._address(primary, address)
                slots[int(start) : int(end) + 1] = [owner] * (int(end) - int(start) + 1)
                replicas.extend(self._address(other, address) for other in others)
            self._slots = slots
            self._replicas = tuple(replicas)
            return
        raise StoreError(
            f"redis cluster: no node answered for the slot map ({type(failure).__name__})"
        ) from failure

    @staticmethod
    def _address(node: Sequence[Any], asked: Address) -> Address:
        host = node[0].decode() if isinstance(node[0], bytes) else str(node[0])
        # An empty host means "the node you asked" (a node that does not know its address).
        return (host or asked[0], int(node[1]))

    def _refresh(self) -> asyncio.Future[None]:
        """The slot map read under way, or a new one (at most every ``refresh_interval``)."""
        refreshing = self._refreshing
        if refreshing is not None and not refreshing.done():
            return refreshing
        loop = asyncio.get_running_loop()
        wait = self._refreshed_at + self.refresh_interval - loop.time()

        async def read() -> None:
            if wait > 0:
                await asyncio.sleep(wait)
            try:
                await self._read_slots()
            finally:
                self._refreshed_at = loop.time()

        task = self._refreshing = loop.create_task(read())
        task.add_done_callback(self._refreshed)
        return task

    def _refreshed(self, task: asyncio.Future[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            self._warn("slots", "redis cluster: slot map not read: %s", task.exception())

    def _stale(self) -> None:
        """A call failed: the slot map may be out of date, read it again soon."""
        with contextlib.suppress(RuntimeError):  # not on asyncio: nothing can be read here
            self._refresh()

    async def _node_for(self, slot: int) -> tuple[Address, RedisStore]:
        address = self._slots[slot]
        if address is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                raise StoreError("redis store unavailable: not running on asyncio") from None
            refreshing = self._refreshing
            if refreshing is None or refreshing.done():
                if loop.time() < self._refreshed_at + self.refresh_interval:
                    # The map was just read (or failed to be): fail now rather than wait
                    # for the next read, which a call will start after the interval.
                    raise StoreError(f"redis cluster: no node known to serve slot {slot}")
                refreshing = self._refresh()
            await asyncio.shield(refreshing)
            address = self._slots[slot]
            if address is None:
                raise StoreError(f"redis cluster: no node serves slot {slot}")
        return address, self._store(address)

    async def _on(self, slot: int, call: Callable[[RedisStore], Awaitable[T]]) -> T:
        """``call`` on the node owning ``slot``; after ``MOVED``, once more on the new owner;
        after ``ASK``, once more on the node importing the slot, after ``ASKING``."""
        address, node = await self._node_for(slot)
        try:
            return await call(node)
        except StoreError as exc:
            cause = exc.__cause__
            # MOVED or ASK: the command did not run, so sending it on runs it once.
            if not isinstance(cause, _AskError):
                self._stale()
                raise
            # No host in the reply means "the host you asked".
            redirected: Address = (str(cause.host) or address[0], int(cause.port))
            moved = isinstance(cause, _MovedError)
            if moved:
                self._stale()
                self._slots[slot] = redirected
            try:
                # After ASK the map stays: the slot is being migrated, and the keys still
                # on its owner are served there.
                return await call(self._store(redirected, asking=not moved))
            except StoreError:
                self._stale()  # redirected once more (a migration undone): read it again
                raise

    async def hit_buckets(
        self, keys: Sequence[str], specs: Sequence[BucketSpec], cost: int
    ) -> tuple[bool, float, list[float]]:
        """See ``RateLimitStore.hit_buckets``: one script call per hash slot, concurrently."""
        prefix = self.prefix
        mapped = [cluster_key(key) for key in keys]
        groups: dict[int, list[int]] = {}
        for index, key in enumerate(mapped):
            groups.setdefault(key_slot(prefix + key), []).append(index)
        try:
            if len(groups) <= 1:
                return await self._on(next(iter(groups), 0), _hit(mapped, list(specs), cost))
            return await self._across(mapped, specs, cost, list(groups.items()))
        except StoreError as exc:
            if not isinstance(exc.__cause__, _TryAgainError) or len(groups) == len(mapped):
                raise
        # TRYAGAIN: a slot of this decision is being migrated, and a script of several of
        # its keys cannot run on either node until the slot has moved (its keys are
        # split between them, or new). What the other slots took was given back; each
        # key on its own follows its ASK (docs/stores.md, Redis Cluster).
        singles = [(key_slot(prefix + key), [index]) for index, key in enumerate(mapped)]
        return await self._across(mapped, specs, cost, singles)

    async def _across(
        self,
        mapped: list[str],
        specs: Sequence[BucketSpec],
        cost: int,
        groups: list[tuple[int, list[int]]],
    ) -> tuple[bool, float, list[float]]:
        """One decision over the keys ``groups`` lists (each group: a slot and the indexes
        of its keys, decided in one script call): every group's call sent concurrently,
        the tokens of the groups that allowed given back when another denied or failed."""
        parts = [
            (slot, [mapped[i] for i in indexes], [specs[i] for i in indexes], indexes)
            for slot, indexes in groups
        ]
        replies = await asyncio.gather(
            *(
                self._on(slot, _hit(part_keys, part_specs, cost))
                for slot, part_keys, part_specs, _ in parts
            ),
            return_exceptions=True,
        )
        decided: list[_Decision] = []
        failures: list[Exception] = []
        for reply in replies:
            if isinstance(reply, BaseException):
                if not isinstance(reply, Exception):
                    raise reply
                failures.append(reply)
            else:
                decided.append(reply)
        allowed = not failures and all(reply[0] for reply in decided)
        if not allowed and cost > 0:
            await self._give_back(
                [
                    (slot, part_keys, part_specs, reply)
                    for (slot, part_keys, part_specs, _), reply in zip(parts, replies, strict=True)
                    if not isinstance(reply, BaseException) and reply[0]
                ],
                cost,
            )
        if failures:
            # Local overload sheds the request; a store failure is the concern's policy.
            # TRYAGAIN (hit_buckets then decides key by key) only when every failure
            # said so: a call that failed otherwise may have run, and deciding its keys
            # again could take its tokens twice.
            shed = [exc for exc in failures if isinstance(exc, Overloaded)]
            other = [exc for exc in failures if not isinstance(exc.__cause__, _TryAgainError)]
            raise (shed or other or failures)[0]
        now = decided[0][1]
        tats = [0.0] * len(mapped)
        for (_, _, part_specs, indexes), (taken, part_now, part_tats) in zip(
            parts, decided, strict=True
        ):
            shift = now - part_now  # each node answers in its own clock
            for (interval, _), index, tat in zip(part_specs, indexes, part_tats, strict=True):
                given_back = taken and not allowed
                tats[index] = (tat - cost * interval if given_back else tat) + shift
        return allowed, now, tats

    async def _give_back(
        self, taken: list[tuple[int, list[str], list[BucketSpec], _Decision]], cost: int
    ) -> None:
        """Give back the tokens a denied decision took in the slots that allowed it."""
        if not taken:
            return
        calls = []
        for slot, part_keys, part_specs, (_, _, part_tats) in taken:
            back = [
                (cost * interval, tat - cost * interval)
                for (interval, _), tat in zip(part_specs, part_tats, strict=True)
            ]
            calls.append(self._on(slot, _hit(part_keys, back, -1)))
        # Shielded: a request that goes away still gives its tokens back.
        results = await asyncio.shield(asyncio.gather(*calls, return_exceptions=True))
        failed = [result for result in results if isinstance(result, BaseException)]
        if failed:
            self._warn(
                "give_back",
                "redis cluster: tokens of a denied request not given back (%s); "
                "they stay taken until the buckets refill",
                failed[0],
            )

    async def lease_acquire(self, key: str, lease: bytes, ttl: float) -> bytes | None:
        """See ``IdempotencyStore.lease_acquire``."""
        mapped = cluster_key(key)
        return await self._on(
            key_slot(self.prefix + mapped), lambda node: node.lease_acquire(mapped, lease, ttl)
        )

    async def lease_complete(self, key: str, lease: bytes, value: bytes, ttl: float) -> bool:
        """See ``IdempotencyStore.lease_complete``."""
        mapped = cluster_key(key)
        return await self._on(
            key_slot(self.prefix + mapped),
            lambda node: node.lease_complete(mapped, lease, value, ttl),
        )

    async def lease_release(self, key: str, lease: bytes) -> bool:
        """See ``IdempotencyStore.lease_release``."""
        mapped = cluster_key(key)
        return await self._on(
            key_slot(self.prefix + mapped), lambda node: node.lease_release(mapped, lease)
        )

    async def lease_extend(self, key: str, lease: bytes, ttl: float) -> bool:
        """See ``IdempotencyStore.lease_extend``."""
        mapped = cluster_key(key)
        return await self._on(
            key_slot(self.prefix + mapped), lambda node: node.lease_extend(mapped, lease, ttl)
        )

    async def remember(self, key: str, ttl: float, token: bytes | None = None) -> bool:
        """See ``NonceStore.remember``."""
        mapped = cluster_key(key)
        return await self._on(
            key_slot(self.prefix + mapped), lambda node: node.remember(mapped, ttl, token)
        )

    async def forget(self, key: str) -> None:
        """See ``NonceStore.forget``."""
        mapped = cluster_key(key)
        await self._on(key_slot(self.prefix + mapped), lambda node: node.forget(mapped))

    async def aclose(self) -> None:
        """Close every node's connections."""
        refreshing = self._refreshing
        if refreshing is not None and not refreshing.done():
            refreshing.cancel()
        for node in [*self.nodes.values(), *self._asking.values()]:
            await node.aclose()

    def __repr__(self) -> str:
        nodes = ",".join(f"{host}:{port}" for host, port in self.startup_nodes)
        return f"RedisClusterStore(nodes={nodes!r}, prefix={self.prefix!r}, timeout={self.timeout})"
