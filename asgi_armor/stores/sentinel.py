"""The Sentinel store: a ``RedisStore`` on the master a Redis Sentinel group names.

Every connection asks the sentinels for the current master of the service before it
connects, so after a failover (the master lost, a replica promoted) the store reaches the
new master by itself, with no restart: calls in flight on the lost master fail, a
connection to a demoted master is dropped at its first ``READONLY`` reply, and the
scripts are loaded again on the new master at its first ``NOSCRIPT``. Meanwhile each
concern's ``on_store_error`` answers, as for a single Redis that is down.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from asgi_armor.breaker import CircuitBreaker
from asgi_armor.stores._urls import parse_hosts_url, single_node_url
from asgi_armor.stores.redis import _MAX_BATCH, RedisStore, check_url

if TYPE_CHECKING:
    from redis.asyncio.sentinel import Sentinel

__all__ = ["RedisSentinelStore"]

_MAX_CONNECTIONS = 64


class RedisSentinelStore(RedisStore):
    """A ``RedisStore`` whose client follows the master of a Sentinel service.

    Build it with ``from_url``; the constructor is ``RedisStore``'s (a client from
    ``Sentinel.master_for``), and ``sentinel`` is the ``redis.asyncio.sentinel.Sentinel``
    it asks (closed with the store).
    """

    sentinel: Sentinel | None = None

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
        sentinel_kwargs: Mapping[str, Any] | None = None,
        **client_options: Any,
    ) -> RedisSentinelStore:
        """Connect lazily to the master of ``redis+sentinel://h:p[,h:p...]/<service>[/<db>]``
        (``rediss+sentinel://`` for TLS; ``valkey+sentinel://``, ``valkeys+sentinel://``).

        The URL's credentials, database and query options are the master's;
        ``sentinel_kwargs`` go to each sentinel's client (default: ``timeout`` to connect
        and to answer, TLS as the URL says).

        Raises:
            ConfigError: naming ``store``: the URL is malformed (checked here, before any
                connection), or see ``RedisStore``.
            ImportError: the ``redis`` extra is not installed.
        """
        check_url(url)
        import redis.asyncio as aioredis
        from redis.asyncio.connection import parse_url
        from redis.asyncio.sentinel import Sentinel

        parsed = parse_hosts_url(url)
        options: dict[str, Any] = dict(parse_url(single_node_url(parsed, *parsed.hosts[0])))
        for name in ("host", "port", "connection_class"):
            options.pop(name, None)
        if parsed.tls:
            options["ssl"] = True
        # As RedisStore.from_url: no socket timeouts of redis-py's own (the store's deadline
        # counts store time only), and never more calls in flight than connections.
        options.setdefault("socket_timeout", None)
        options.setdefault("socket_connect_timeout", None)
        options.setdefault("max_connections", _MAX_CONNECTIONS)
        options.update(client_options)
        asking = {"socket_timeout": timeout, "socket_connect_timeout": timeout, "ssl": parsed.tls}
        sentinel: Sentinel = Sentinel(  # type: ignore[no-untyped-call]
            list(parsed.hosts), sentinel_kwargs={**asking, **(sentinel_kwargs or {})}
        )
        client = sentinel.master_for(parsed.service, redis_class=aioredis.Redis, **options)
        store = cls(
            client,
            prefix=prefix,
            timeout=timeout,
            breakers=breakers,
            max_in_flight=max_in_flight,
            max_batch=max_batch,
            queue_timeout=queue_timeout,
        )
        store.sentinel = sentinel
        return store

    async def aclose(self) -> None:
        """Close the connections to the master and to the sentinels."""
        await super().aclose()
        if self.sentinel is not None:
            await self.sentinel.aclose()

    def __repr__(self) -> str:
        return f"RedisSentinelStore(prefix={self.prefix!r}, timeout={self.timeout})"
