"""State backends shared by rate limiting, idempotency and the webhook replay cache."""

from asgi_armor.stores.base import Store, StoreError
from asgi_armor.stores.cluster import RedisClusterStore
from asgi_armor.stores.memory import MemoryStore
from asgi_armor.stores.redis import RedisStore
from asgi_armor.stores.sentinel import RedisSentinelStore

__all__ = [
    "MemoryStore",
    "RedisClusterStore",
    "RedisSentinelStore",
    "RedisStore",
    "Store",
    "StoreError",
]
