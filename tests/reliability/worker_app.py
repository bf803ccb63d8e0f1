"""The app the multi-process tests serve: the demo stack on Redis, counting handler runs.

``uvicorn --factory worker_app:create_app`` (with ``--app-dir tests/reliability``) builds
exactly what ``create_demo(store=$ARMOR_REL_REDIS_URL)`` builds, with one shim inside the
armor stack that counts, in Redis, how many requests reached the demo's handlers, per
path: the count covers every worker process.
"""

from __future__ import annotations

import os
from typing import Any

RUNS_PREFIX = "armortest:runs:"
URL_ENV = "ARMOR_REL_REDIS_URL"


def create_app() -> Any:
    """The uvicorn factory."""
    import redis.asyncio as aioredis

    from asgi_armor.config import ArmorConfig
    from asgi_armor.demo.app import BUNDLED_CONFIG, Demo, _webhook_secret, demo_identify
    from asgi_armor.stack import armor

    url = os.environ[URL_ENV]
    counter = aioredis.Redis.from_url(url)
    inner = Demo().app()

    async def counted(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            await counter.incr(RUNS_PREFIX + scope["path"])
        await inner(scope, receive, send)

    _webhook_secret()
    config = ArmorConfig.from_toml(BUNDLED_CONFIG).with_store(url)
    return armor(counted, config, identify=demo_identify)
