"""State backends shared by rate limiting, idempotency and the webhook replay cache."""

from asgi_armor.stores.base import Store, StoreError
from asgi_armor.stores.memory import MemoryStore
from asgi_armor.stores.redis import RedisStore

__all__ = ["MemoryStore", "RedisStore", "Store", "StoreError"]
