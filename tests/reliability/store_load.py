"""Tools for the multi-process store tests: worker processes on a store, bursts, a mixed load.

Every wait is bounded; the workers are stopped when the block exits.
"""

from __future__ import annotations

import contextlib
import random
import subprocess
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import anyio
import httpx
from reliability_helpers import HERE
from store_app import PREFIX_ENV, RUNS_ENV, RUNS_PREFIX, STORE_ENV

from tests.servers import free_port, start_uvicorn, wait_ready


@contextlib.asynccontextmanager
async def workers(
    store_url: str, runs_url: str, prefix: str, count: int = 2
) -> AsyncIterator[tuple[list[int], httpx.AsyncClient]]:
    """``count`` uvicorn processes serving ``store_app`` on ``store_url``; their ports and
    a client (200 connections, 15 s timeout)."""
    ports = [free_port() for _ in range(count)]
    env = {STORE_ENV: store_url, RUNS_ENV: runs_url, PREFIX_ENV: prefix}
    # Keep-alive longer than any load: a connection the server closes as idle just when
    # the client reuses it is a transport race of its own, not what these tests measure.
    options = ["--no-proxy-headers", "--timeout-keep-alive", "120"]
    procs = [
        start_uvicorn("store_app:create_app", port, app_dir=HERE, env=env, extra_args=options)
        for port in ports
    ]
    try:
        limits = httpx.Limits(max_connections=200, max_keepalive_connections=200)
        async with httpx.AsyncClient(timeout=15, limits=limits) as client:
            await wait_ready(client, ports, procs, path="/healthz", seconds=20)
            yield ports, client
    finally:
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


async def burst(
    client: httpx.AsyncClient,
    ports: list[int],
    count: int,
    method: str,
    path: str,
    **kwargs: Any,
) -> list[httpx.Response]:
    """``count`` concurrent requests, alternating between the workers."""
    out: list[httpx.Response] = []

    async def one(index: int) -> None:
        url = f"http://127.0.0.1:{ports[index % len(ports)]}{path}"
        out.append(await client.request(method, url, **kwargs))

    async with anyio.create_task_group() as tg:
        for index in range(count):
            tg.start_soon(one, index)
    return out


def tally(responses: list[httpx.Response]) -> dict[int, int]:
    return dict(Counter(response.status_code for response in responses))


async def runs(runs_url: str, key: str) -> int:
    """How many times the payment handler ran for ``key`` (all workers)."""
    import redis.asyncio as aioredis

    counter = aioredis.Redis.from_url(runs_url)
    try:
        return int(await counter.get(f"{RUNS_PREFIX}pay:{key}") or 0)
    finally:
        await counter.aclose()


@dataclass
class Load:
    """What a mixed load saw: every answer with its time (seconds since the start)."""

    started: float = field(default_factory=time.monotonic)
    answers: list[tuple[float, str, int, bool]] = field(default_factory=list)
    paid: dict[str, list[int]] = field(default_factory=dict)  # key -> statuses, in order
    payment_ids: dict[str, str] = field(default_factory=dict)  # key -> its 201's payment
    errors: list[str] = field(default_factory=list)

    def at(self) -> float:
        return time.monotonic() - self.started

    def rate(self, start: float, end: float) -> float:
        """Answers per second between ``start`` and ``end``."""
        count = sum(1 for t, *_ in self.answers if start <= t < end)
        return count / (end - start) if end > start else 0.0

    def statuses(self, kind: str | None = None) -> dict[int, int]:
        return dict(Counter(s for _, k, s, _ in self.answers if kind is None or k == kind))


async def mixed_load(
    client: httpx.AsyncClient,
    ports: list[int],
    seconds: float,
    *,
    tasks: int = 12,
    during: Callable[[Load], Awaitable[None]] | None = None,
) -> Load:
    """``tasks`` loops sending pings, quota requests and payments for ``seconds``.

    A payment that is not answered 201 (503 while its slot's primary is lost, 409 while
    another attempt holds the key) is sent again, until it is; ``during`` runs alongside
    (it kills a node). Transport errors are recorded, never raised.
    """
    load = Load()
    deadline = load.started + seconds

    async def pay(port: int) -> None:
        key = f"pay-{uuid.uuid4().hex[:12]}"
        statuses = load.paid.setdefault(key, [])
        while time.monotonic() < deadline + 10:
            response = await client.post(
                f"http://127.0.0.1:{port}/api/pay",
                json={"amount": 100},
                headers={"Idempotency-Key": key},
            )
            statuses.append(response.status_code)
            load.answers.append((load.at(), "pay", response.status_code, False))
            if response.status_code == 201:
                load.payment_ids[key] = response.json()["payment_id"]
                return
            await anyio.sleep(0.2)

    async def loop(index: int) -> None:
        chooser = random.Random(index)
        while time.monotonic() < deadline:
            port = ports[chooser.randrange(len(ports))]
            kind = chooser.choices(["ping", "quota", "pay"], weights=[5, 3, 2])[0]
            try:
                if kind == "pay":
                    await pay(port)
                    continue
                if kind == "ping":
                    response = await client.get(f"http://127.0.0.1:{port}/api/ping")
                else:
                    response = await client.post(f"http://127.0.0.1:{port}/api/quota")
            except httpx.TransportError as exc:
                load.errors.append(f"{kind}: {type(exc).__name__}: {exc}")
                continue
            decided = "ratelimit-policy" in response.headers
            load.answers.append((load.at(), kind, response.status_code, decided))

    async with anyio.create_task_group() as tg:
        for index in range(tasks):
            tg.start_soon(loop, index)
        if during is not None:
            tg.start_soon(during, load)
    return load
