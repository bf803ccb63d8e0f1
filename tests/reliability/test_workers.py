"""Several uvicorn worker processes on one (private) Redis: exact limits, exactly-once effects.

Two uvicorn processes (``worker_app:create_app``, the demo stack on Redis) receive bursts
split between them. Rate limits allow exactly their quota across both processes, and
every idempotency key runs its handler exactly once: handler runs are counted in Redis,
so the count covers both processes.
"""

from __future__ import annotations

import subprocess
from collections import defaultdict
from typing import Any

import anyio
import httpx
import pytest
from reliability_helpers import HERE
from worker_app import RUNS_PREFIX, URL_ENV

from tests.servers import free_port, start_uvicorn, wait_ready

pytestmark = [pytest.mark.anyio]


async def test_two_workers_limit_exactly_and_run_each_payment_once(
    private_redis: Any, asyncio_only: None
) -> None:
    import redis.asyncio as aioredis

    ports = [free_port(), free_port()]
    procs = [
        start_uvicorn(
            "worker_app:create_app",
            port,
            app_dir=HERE,
            env={URL_ENV: private_redis.url},
            extra_args=["--no-proxy-headers"],
        )
        for port in ports
    ]
    redis_client = aioredis.Redis.from_url(private_redis.url)
    try:
        with anyio.fail_after(40):
            limits = httpx.Limits(max_connections=200)
            async with httpx.AsyncClient(timeout=15, limits=limits) as client:
                await wait_ready(client, ports, procs, path="/healthz", seconds=15)

                async def burst(
                    count: int, method: str, path: str, **kwargs: Any
                ) -> list[httpx.Response]:
                    out: list[httpx.Response] = []

                    async def one(index: int) -> None:
                        url = f"http://127.0.0.1:{ports[index % 2]}{path}"
                        out.append(await client.request(method, url, **kwargs))

                    async with anyio.create_task_group() as tg:
                        for index in range(count):
                            tg.start_soon(one, index)
                    return out

                def tally(responses: list[httpx.Response]) -> dict[int, int]:
                    counts: dict[int, int] = defaultdict(int)
                    for response in responses:
                        counts[response.status_code] += 1
                    return dict(counts)

                expensive = tally(await burst(40, "POST", "/api/expensive-operation"))
                email = tally(
                    await burst(
                        16,
                        "POST",
                        "/api/send-email",
                        headers={"Authorization": "Bearer alice-token"},
                    )
                )
                builds = tally(await burst(50, "POST", "/api/projects/apollo/builds"))

                keys = [f"order-{index}" for index in range(10)]
                body = {"amount": 4200, "currency": "EUR"}
                payments: dict[str, list[httpx.Response]] = {key: [] for key in keys}

                async def pay(index: int) -> None:
                    key = keys[index % len(keys)]
                    url = f"http://127.0.0.1:{ports[index % 2]}/api/payments"
                    payments[key].append(
                        await client.post(url, json=body, headers={"Idempotency-Key": key})
                    )

                async with anyio.create_task_group() as tg:
                    for index in range(80):
                        tg.start_soon(pay, index)
                # A retry of every key, at both workers, after the burst: replays.
                async with anyio.create_task_group() as tg:
                    for index in range(2 * len(keys)):
                        tg.start_soon(pay, index)

        runs = {
            path: int(await redis_client.get(RUNS_PREFIX + path) or 0)
            for path in (
                "/api/expensive-operation",
                "/api/send-email",
                "/api/projects/apollo/builds",
                "/api/payments",
            )
        }
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

    print(
        f"\n[2 workers] expensive 10/min: {expensive}; email 5/h: {email}; "
        f"builds 20/h: {builds}; handler runs: {runs}"
    )
    assert expensive == {200: 10, 429: 30}
    assert email == {202: 5, 429: 11}
    assert builds == {202: 20, 429: 30}
    assert runs["/api/expensive-operation"] == 10
    assert runs["/api/send-email"] == 5
    assert runs["/api/projects/apollo/builds"] == 20
    # Exactly once per key across both processes, and every retry saw the same payment.
    assert runs["/api/payments"] == len(keys)
    duplicates = 0
    for key, responses in payments.items():
        assert len(responses) == 10
        assert {r.status_code for r in responses} <= {201, 409}, key
        created = [r for r in responses if r.status_code == 201]
        originals = [r for r in created if "idempotent-replayed" not in r.headers]
        duplicates += len(originals) - 1
        assert len(originals) == 1, key
        payment_ids = {r.json()["payment_id"] for r in created}
        assert len(payment_ids) == 1, key
        assert all(r.content == originals[0].content for r in created)
        assert sum(1 for r in created if r.headers.get("idempotent-replayed") == "true") >= 2
    assert duplicates == 0
