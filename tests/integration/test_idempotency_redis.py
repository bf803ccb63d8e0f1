"""Exactly once across processes: two uvicorn workers share one Redis and one key.

The module doubles as the app the workers serve: ``create_app`` (a uvicorn factory) reads
the Redis URL and key prefix from the environment. The handler counts its runs in Redis,
so the count covers both processes.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import anyio
import httpx
import pytest

from asgi_armor._asgi import ASGIApp, Receive, Scope, Send, send_json
from asgi_armor.errors import ErrorMiddleware
from asgi_armor.idempotency import IdempotencyMiddleware
from tests.servers import free_port, start_uvicorn, wait_ready

pytestmark = [pytest.mark.anyio, pytest.mark.redis]

HERE = Path(__file__).resolve().parent
URL_ENV = "ARMOR_TEST_IDEM_REDIS_URL"
PREFIX_ENV = "ARMOR_TEST_IDEM_PREFIX"
RUNS_KEY = "handler-runs"
HANDLER_SECONDS = 0.5


def create_app() -> ASGIApp:
    """The worker app: ``POST /pay`` counts its runs in Redis, slowly; ``GET /ready`` is 200."""
    import redis.asyncio as aioredis

    from asgi_armor.stores.redis import RedisStore

    url = os.environ[URL_ENV]
    prefix = os.environ[PREFIX_ENV]
    store = RedisStore.from_url(url, prefix=prefix, timeout=2.0)
    counter = aioredis.Redis.from_url(url)

    async def handler(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["path"] == "/ready":
            await send_json(send, 200, b'{"ready": true}')
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body", False):
                break
        runs = await counter.incr(prefix + RUNS_KEY)
        # Long enough that the other worker's requests arrive while this one is in flight.
        await anyio.sleep(HANDLER_SECONDS)
        payload = json.dumps({"run": runs, "pid": os.getpid(), "echo": body.decode()}).encode()
        await send_json(send, 201, payload)

    return ErrorMiddleware(IdempotencyMiddleware(handler, routes=["POST /pay"], store=store))


async def test_two_workers_run_the_handler_exactly_once(
    redis_url: str, redis_prefix: str, asyncio_only: None
) -> None:
    import redis.asyncio as aioredis

    env = {URL_ENV: redis_url, PREFIX_ENV: redis_prefix}
    ports = [free_port(), free_port()]
    procs = [
        start_uvicorn("test_idempotency_redis:create_app", port, app_dir=HERE, env=env)
        for port in ports
    ]
    redis_client = aioredis.Redis.from_url(redis_url)
    responses: list[httpx.Response] = []
    headers = {"Idempotency-Key": "order-42", "Content-Type": "application/json"}
    body = b'{"amount": 4200, "currency": "EUR"}'
    try:
        with anyio.fail_after(18):
            limits = httpx.Limits(max_connections=100)
            async with httpx.AsyncClient(timeout=10, limits=limits) as client:
                await wait_ready(client, ports, procs, path="/ready", seconds=10)

                async def post(port: int) -> None:
                    response = await client.post(
                        f"http://127.0.0.1:{port}/pay", headers=headers, content=body
                    )
                    responses.append(response)

                # A burst at both workers at once: one wins the lease, the rest see it held.
                async with anyio.create_task_group() as tg:
                    for index in range(40):
                        tg.start_soon(post, ports[index % 2])
                # Retries after the first finished are replays, from either worker.
                async with anyio.create_task_group() as tg:
                    for index in range(10):
                        tg.start_soon(post, ports[index % 2])

        runs = await redis_client.get(redis_prefix + RUNS_KEY)
        assert runs == b"1"
        assert len(responses) == 50
        originals = [
            r for r in responses if r.status_code == 201 and "idempotent-replayed" not in r.headers
        ]
        assert len(originals) == 1
        assert originals[0].json()["echo"] == body.decode()
        replays = [r for r in responses if r.headers.get("idempotent-replayed") == "true"]
        in_use = [r for r in responses if r.status_code == 409]
        assert len(replays) + len(in_use) == 49
        assert len(replays) >= 10
        assert in_use, "the burst should have met the in-flight lease"
        replayed_by = {r.url.port for r in replays}
        assert replayed_by == set(ports)
        for response in replays:
            assert response.status_code == 201
            assert response.content == originals[0].content
        for response in in_use:
            data = response.json()
            assert data["error"] == "idempotency_key_in_use"
            assert response.headers["retry-after"] == "1"
            assert response.headers["x-request-id"] == data["request_id"]
    finally:
        await redis_client.aclose()
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
            if proc.stderr is not None:
                proc.stderr.close()
