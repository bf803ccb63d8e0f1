"""The app the Cluster and Sentinel multi-process tests serve, on the store they name.

``uvicorn --factory store_app:create_app`` (with ``--app-dir tests/reliability``):

- ``POST /api/limited/{item}``: four rate-limit layers decided together (per address,
  per ``X-Tenant`` header, global, per path item), each on its own key value;
- ``POST /api/quota``: one global layer of ``QUOTA`` per day (a limit to stay within
  across a failover);
- ``POST /api/pay``: idempotent (``Idempotency-Key`` required); the handler waits
  ``PAY_SECONDS`` and counts its runs per key;
- ``GET /api/ping``: a per-address layer with a limit no test reaches.

Handler runs are counted in a plain Redis (``$ARMOR_RUNS_URL``) apart from the store, so
the count survives the store's failover and covers every worker process.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from typing import Any

import msgspec

STORE_ENV = "ARMOR_STORE_URL"
PREFIX_ENV = "ARMOR_STORE_PREFIX"
RUNS_ENV = "ARMOR_RUNS_URL"
RUNS_PREFIX = "armortest:runs:"

#: The layers of ``POST /api/limited/{item}``, by name: (rate, key).
LAYERS = {
    "ip": ("1000/day", "ip"),
    "tenant": ("500/day", "header:x-tenant"),
    "global": ("50/day", "global"),
    "item": ("300/day", "path:item"),
}
QUOTA = 200
PAY_SECONDS = 0.2

_encode = msgspec.json.Encoder().encode


def config(store: str, prefix: str) -> Any:
    """The armor config of the app, on ``store``."""
    from asgi_armor.config import ArmorConfig

    layers = [
        {"name": name, "route": "POST /api/limited/{item}", "rate": rate, "key": key}
        for name, (rate, key) in LAYERS.items()
    ]
    layers.append(
        {"name": "quota", "route": "POST /api/quota", "rate": f"{QUOTA}/day", "key": "global"}
    )
    layers.append({"name": "ping", "route": "GET /api/ping", "rate": "1000000/day", "key": "ip"})
    return ArmorConfig.from_dict(
        {
            "store": store,
            "store_prefix": prefix,
            "rate_limit": layers,
            "idempotency": [{"route": "POST /api/pay", "ttl": "1h", "lock_ttl": "30s"}],
        }
    )


def create_app() -> Any:
    """The uvicorn factory."""
    import redis.asyncio as aioredis

    from asgi_armor.stack import armor

    counter = aioredis.Redis.from_url(os.environ[RUNS_ENV])

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        path: str = scope["path"]
        status, body = 200, b'{"ok":true}'
        if path == "/api/pay":
            headers = dict(scope["headers"])
            key = headers.get(b"idempotency-key", b"").decode()
            await asyncio.sleep(PAY_SECONDS)
            await counter.incr(f"{RUNS_PREFIX}pay:{key}")
            status, body = 201, _encode({"payment_id": uuid.uuid4().hex})
        elif path not in ("/healthz", "/api/ping", "/api/quota") and not path.startswith(
            "/api/limited/"
        ):
            status, body = 404, b'{"error":"not_found"}'
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [(b"content-type", b"application/json")],
            }
        )
        await send({"type": "http.response.body", "body": body})

    return armor(app, config(os.environ[STORE_ENV], os.environ.get(PREFIX_ENV, "armor:")))
