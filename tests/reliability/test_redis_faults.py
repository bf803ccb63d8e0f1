"""Redis fault injection: the demo stack on a private redis-server that is killed, paused
(SIGSTOP) and restarted, in-process and under a real uvicorn.

docs/stores.md promises: rate limits fail open (no 500, no connect timeout per request:
each concern's breaker opens after 3 failures), idempotency and the webhook replay cache fail
closed (503 service_unavailable, the handler never runs), store calls are cut at 0.5 s,
a returning Redis is used again within about a second (scripts reloaded after NOSCRIPT),
a restart costs no request and no breaker failure (each stale pooled connection's batch is
sent once more on a new connection), and nothing leaks (connections on the server, tasks
on the loop).

The measured numbers are printed (``pytest -s``) for the report.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import httpx
import pytest
from reliability_helpers import (
    demo_stack,
    pause,
    percentile,
    redis_clients,
    restart,
    resume,
    running_server,
    wait_until,
)

from asgi_armor.config import Duration, IdempotencyEntry
from asgi_armor.demo import create_demo
from asgi_armor.signing import HexHmac, sign
from asgi_armor.stores.redis import CONCERNS
from tests.envelope import assert_envelope

pytestmark = [pytest.mark.anyio]

SECRET = "demo-webhook-secret"
PAY = {"amount": 1000, "currency": "EUR"}
JSON = {"Content-Type": "application/json"}
# Generous for a shared 2-core machine; the measured values are far below (see report).
FAST = 0.1
STORE_TIMEOUT = 0.5
# Each concern's breaker admits a trial 1 s after it opened: a returning Redis is used
# within that, plus the probes' own time.
RECOVERY = 1.0 + 0.5


def _webhook(body: bytes) -> dict[str, str]:
    return {**sign(body, SECRET, scheme=HexHmac(header="X-Signature")), **JSON}


class Probe:
    """One request of each kind the outage matters for, timed."""

    def __init__(self, client: httpx.AsyncClient) -> None:
        self.client = client
        self.serial = 0

    async def timed(self, method: str, url: str, **kwargs: Any) -> tuple[httpx.Response, float]:
        start = time.perf_counter()
        response = await self.client.request(method, url, **kwargs)
        return response, time.perf_counter() - start

    async def limited(self) -> list[tuple[httpx.Response, float]]:
        """Rate-limited routes (fail open)."""
        self.serial += 1
        return [
            await self.timed("POST", "/api/expensive-operation"),
            await self.timed(
                "POST", "/api/users", json={"email": "a@b.co", "name": "Ada"}, headers=JSON
            ),
            await self.timed("POST", f"/api/projects/p{self.serial % 3}/builds"),
            await self.timed("GET", "/api/users/1"),
        ]

    async def payment(self, key: str) -> tuple[httpx.Response, float]:
        return await self.timed(
            "POST", "/api/payments", json=PAY, headers={"Idempotency-Key": key, **JSON}
        )

    async def webhook(self, event: str) -> tuple[httpx.Response, float]:
        body = json.dumps({"id": event, "type": "payment.succeeded"}).encode()
        return await self.timed(
            "POST", "/api/webhooks/payment", content=body, headers=_webhook(body)
        )


def _check_fail_open(results: list[tuple[httpx.Response, float]], healthy: bool = False) -> None:
    # With Redis up the 10/minute route may say 429; with Redis down nothing limits.
    accepted = (200, 201, 202, 429) if healthy else (200, 201, 202)
    for response, _ in results:
        assert response.status_code < 500, response.text
        assert response.status_code in accepted, response.text
        assert "x-request-id" in response.headers


def _states(store: Any) -> dict[str, str]:
    return {concern: breaker.state.value for concern, breaker in store.breakers.items()}


def _failures(store: Any) -> dict[str, int]:
    return {concern: breaker.stats.failures for concern, breaker in store.breakers.items()}


def _check_503(response: httpx.Response) -> None:
    assert_envelope(response, 503, "service_unavailable")
    assert response.headers["retry-after"] == "1"


async def _recover(probe: Probe, key_prefix: str, budget: float = 3.0) -> float:
    """Seconds until an idempotent payment is served again (201)."""
    start = time.perf_counter()
    attempt = 0
    while time.perf_counter() - start < budget:
        attempt += 1
        response, _ = await probe.payment(f"{key_prefix}-{attempt}")
        if response.status_code == 201:
            return time.perf_counter() - start
        assert response.status_code == 503, response.text
        await asyncio.sleep(0.05)
    pytest.fail(f"not recovered within {budget}s")


async def _recover_limits(probe: Probe, budget: float = 3.0) -> float:
    """Seconds until the rate limits are decided by the store again (headers back)."""
    start = time.perf_counter()
    while time.perf_counter() - start < budget:
        results = await probe.limited()
        _check_fail_open(results, healthy=True)
        if all("ratelimit-policy" in response.headers for response, _ in results):
            return time.perf_counter() - start
        await asyncio.sleep(0.05)
    pytest.fail(f"rate limits not decided by the store again within {budget}s")


async def test_redis_killed_fails_open_and_closed_then_recovers(
    private_redis: Any, asyncio_only: None
) -> None:
    stack = demo_stack(private_redis.url)
    store: Any = stack.app.store
    transport = httpx.ASGITransport(app=stack.app, client=("10.1.1.1", 1234))
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        probe = Probe(client)
        _check_fail_open(await probe.limited())
        assert (await probe.payment("before"))[0].status_code == 201
        assert (await probe.webhook("evt_before"))[0].status_code == 200
        runs_before = dict(stack.counter.calls)

        private_redis.stop()
        limited: list[tuple[httpx.Response, float]] = []
        payments: list[tuple[httpx.Response, float]] = []
        hooks: list[tuple[httpx.Response, float]] = []
        for round_ in range(25):
            limited += await probe.limited()
            payments.append(await probe.payment(f"down-{round_}"))
            refund, elapsed = await probe.timed(
                "POST",
                "/api/refunds",
                json={"payment_id": "pay_1", "amount": 5},
                headers={"Idempotency-Key": f"down-{round_}", **JSON},
            )
            payments.append((refund, elapsed))
            hooks.append(await probe.webhook(f"evt_down_{round_}"))
        _check_fail_open(limited)
        for response, _ in payments + hooks:
            _check_503(response)
        # The refused requests never reached a handler.
        assert stack.counter.calls["/api/payments"] == runs_before["/api/payments"]
        assert stack.counter.calls.get("/api/refunds", 0) == 0
        assert stack.counter.calls["/api/webhooks/payment"] == 1
        assert _states(store) == dict.fromkeys(CONCERNS, "open")
        latencies = [elapsed for _, elapsed in limited + payments + hooks]
        print(
            f"\n[redis killed] {len(latencies)} requests: "
            f"p50 {percentile(latencies, 0.5) * 1e3:.2f} ms, "
            f"p99 {percentile(latencies, 0.99) * 1e3:.2f} ms, "
            f"max {max(latencies) * 1e3:.2f} ms"
        )
        assert percentile(latencies, 0.99) < FAST
        # Three store errors open a concern's breaker; the rest never touch the network.
        for concern, breaker in store.breakers.items():
            assert breaker.stats.failures <= 4, (concern, breaker.stats)
        failed_while_down = _failures(store)

        restart(private_redis)  # an empty Redis: NOSCRIPT for every script
        recovery = await _recover(probe, "back")
        print(f"[redis killed] recovered {recovery:.3f} s after the restart")
        assert recovery < RECOVERY
        # Every script reloaded: the limiter decides again (headers back), leases work, the
        # replay cache works (a replay is refused, a new id accepted).
        response, _ = await probe.timed("POST", "/api/expensive-operation")
        assert response.status_code in (200, 429)
        assert "ratelimit-policy" in response.headers
        assert (await probe.payment("down-0"))[0].status_code == 201
        replayed = await probe.payment("down-0")
        assert replayed[0].headers["idempotent-replayed"] == "true"
        assert (await probe.webhook("evt_after"))[0].status_code == 200
        again = (await probe.webhook("evt_after"))[0]
        assert again.status_code == 401
        assert again.json()["details"][0]["code"] == "replayed"
        assert _states(store) == dict.fromkeys(CONCERNS, "closed")
        # The returning Redis failed no call: each breaker's first trial succeeded.
        assert _failures(store) == failed_while_down
        connections = len(redis_clients(private_redis))
        print(f"[redis killed] connections on the restarted server: {connections}")
        assert connections <= 2
    await stack.app.aclose()
    assert wait_until(lambda: not redis_clients(private_redis), 5)


async def test_redis_restart_under_a_warm_pool_costs_no_request(
    private_redis: Any, asyncio_only: None
) -> None:
    """Redis restarted while every pooled connection is warm (the store's four batch
    slots all used): the next requests of each concern are all served, by the store (the
    rate-limit headers are there, nothing failed open), and no breaker counts a failure.
    Each stale connection's batch was sent once more on a new connection."""
    stack = demo_stack(private_redis.url)
    store: Any = stack.app.store
    transport = httpx.ASGITransport(app=stack.app, client=("10.1.1.5", 1234))
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        probe = Probe(client)
        assert (await probe.payment("warm"))[0].status_code == 201
        assert (await probe.webhook("evt_warm"))[0].status_code == 200
        # Every batch slot in use at once: four pooled connections, each answered a batch.
        await asyncio.gather(*(store.remember(f"warm:{i}", 60) for i in range(600)))
        assert len(redis_clients(private_redis)) == store.max_in_flight == 4
        runs_before = dict(stack.counter.calls)

        restart(private_redis)  # an empty Redis: the pooled sockets are closed by it
        rounds = 20
        answers = await asyncio.gather(
            *(probe.payment(f"after-{i}") for i in range(rounds)),
            *(probe.webhook(f"evt_after_{i}") for i in range(rounds)),
            *(probe.timed("GET", "/api/users/1") for _ in range(rounds)),
        )
        statuses = [response.status_code for response, _ in answers]
        assert statuses == [201] * rounds + [200] * (2 * rounds), [
            response.text for response, _ in answers if response.status_code >= 300
        ]
        # Decided by the store: the ip rule's headers on every request, none failed open.
        assert all("ratelimit-policy" in response.headers for response, _ in answers)
        assert _failures(store) == dict.fromkeys(CONCERNS, 0)
        assert _states(store) == dict.fromkeys(CONCERNS, "closed")
        assert 1 <= store.stale_connections <= 4
        calls = stack.counter.calls
        assert calls["/api/payments"] - runs_before["/api/payments"] == rounds
        assert calls["/api/webhooks/payment"] - runs_before["/api/webhooks/payment"] == rounds

        # Each ran once: a retry is the recorded payment, a re-sent webhook a replay.
        replayed = await probe.payment("after-0")
        assert replayed[0].headers["idempotent-replayed"] == "true"
        again = (await probe.webhook("evt_after_0"))[0]
        assert again.status_code == 401
        assert again.json()["details"][0]["code"] == "replayed"
        # Every connection left is new since the restart: nothing stale remains.
        await asyncio.gather(*(store.remember(f"warm-again:{i}", 60) for i in range(600)))
        stale = store.stale_connections
        restart(private_redis)
        assert (await probe.payment("second-restart"))[0].status_code == 201
        assert store.stale_connections == stale + 1
        assert _failures(store) == dict.fromkeys(CONCERNS, 0)
    await stack.app.aclose()


async def test_redis_paused_calls_time_out_then_breaker_cuts_them_off(
    private_redis: Any, asyncio_only: None
) -> None:
    stack = demo_stack(private_redis.url)
    store: Any = stack.app.store
    transport = httpx.ASGITransport(app=stack.app, client=("10.1.1.2", 1234))
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        probe = Probe(client)
        _check_fail_open(await probe.limited())
        pause(private_redis)
        try:
            sequence: list[float] = []
            statuses = []
            for _ in range(12):
                response, elapsed = await probe.timed("POST", "/api/expensive-operation")
                statuses.append(response.status_code)
                sequence.append(elapsed)
            limits_cut_off = store.breakers["rate_limit"].state.value
            payment, paid_in = await probe.payment("paused")
            hook, hooked_in = await probe.webhook("evt_paused")
        finally:
            resume(private_redis)
        print(f"\n[redis paused] per-request latency (ms): {[round(s * 1e3, 1) for s in sequence]}")
        assert statuses == [200] * 12
        slow = [s for s in sequence if s > FAST]
        # Each of the first calls waits at most the store timeout; three failures open
        # the breaker, and from then on a call costs nothing.
        assert 1 <= len(slow) <= 3
        assert max(sequence) < STORE_TIMEOUT + 0.25
        assert all(s < FAST for s in sequence[3:])
        _check_503(payment)
        _check_503(hook)
        # Each concern keeps its own failure count: the rate limit's open breaker does not
        # cut off idempotency or the replay cache, whose first call waits its own timeout.
        assert paid_in < STORE_TIMEOUT + 0.25
        assert hooked_in < STORE_TIMEOUT + 0.25
        assert stack.counter.calls.get("/api/webhooks/payment", 0) == 0
        assert limits_cut_off == "open"

        recovery = await _recover(probe, "thawed")
        print(f"[redis paused] recovered {recovery:.3f} s after SIGCONT")
        assert recovery < RECOVERY
        assert (await probe.payment("paused"))[0].status_code == 201
        # The timed-out calls' connections were dropped, not returned to the pool with a
        # reply still pending (that would hand one caller another's answer).
        assert wait_until(lambda: len(redis_clients(private_redis)) <= 2, 3)
    await stack.app.aclose()


async def test_paused_redis_never_runs_a_payment_twice(
    private_redis: Any, asyncio_only: None
) -> None:
    """A lease command that timed out here may still run in Redis after SIGCONT.

    Then the key is held until ``lock_ttl``: retries get 409 (never a second run), and
    the key works again once the lease expires.
    """
    lock_ttl = 1.5
    idem = [
        IdempotencyEntry(
            route="POST /api/payments", ttl=Duration(86400.0), lock_ttl=Duration(lock_ttl)
        ),
    ]
    # Without the rate-limit layer in front, the lease commands themselves are what the
    # warm connections carry into the frozen server.
    stack = demo_stack(private_redis.url, idempotency=idem, rate_limit=[])
    transport = httpx.ASGITransport(app=stack.app, client=("10.1.1.3", 1234))
    keys = [f"order-{i}" for i in range(12)]
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        probe = Probe(client)
        # Warm the pool: several established connections, so paused commands are sent.
        await asyncio.gather(*(probe.payment(f"warm-{i}") for i in range(12)))
        warm_runs = stack.counter.calls["/api/payments"]
        pause(private_redis)
        try:
            first = await asyncio.gather(*(probe.payment(key) for key in keys))
        finally:
            resume(private_redis)
        for response, elapsed in first:
            _check_503(response)
            assert elapsed < 2 * STORE_TIMEOUT + 0.5
        await _recover(probe, "thaw")
        statuses: dict[str, list[int]] = {key: [] for key in keys}
        deadline = time.monotonic() + lock_ttl + 3
        pending = set(keys)
        while pending and time.monotonic() < deadline:
            for key in sorted(pending):
                response, _ = await probe.payment(key)
                statuses[key].append(response.status_code)
                assert response.status_code in (201, 409), response.text
                if response.status_code == 201:
                    pending.discard(key)
            await asyncio.sleep(0.1)
        assert not pending, statuses
        late_leases = sum(1 for codes in statuses.values() if 409 in codes)
        print(f"\n[redis paused] leases that ran late in Redis (409 until lock_ttl): {late_leases}")
        replays = await asyncio.gather(*(probe.payment(key) for key in keys))
        assert all(r.headers.get("idempotent-replayed") == "true" for r, _ in replays)
        # One run per key and one for the recovery probe that first got a 201: never two.
        assert stack.counter.calls["/api/payments"] - warm_runs == len(keys) + 1
    await stack.app.aclose()


async def test_script_flush_is_survived(private_redis: Any, asyncio_only: None) -> None:
    stack = demo_stack(private_redis.url)
    transport = httpx.ASGITransport(app=stack.app, client=("10.1.1.4", 1234))
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        probe = Probe(client)
        _check_fail_open(await probe.limited())
        assert (await probe.payment("a"))[0].status_code == 201
        import redis

        admin = redis.Redis(host="127.0.0.1", port=private_redis.port)
        try:
            admin.script_flush()
        finally:
            admin.close()
        response, _ = await probe.timed("POST", "/api/expensive-operation")
        assert response.status_code == 200
        assert response.headers["x-ratelimit-remaining"] == "8"
        assert (await probe.payment("b"))[0].status_code == 201
        assert (await probe.payment("a"))[0].headers["idempotent-replayed"] == "true"
    await stack.app.aclose()


def test_redis_outage_under_uvicorn(private_redis: Any) -> None:
    """``create_demo(store=...)`` under a real uvicorn: concurrent traffic through an outage.

    Under 40 concurrent clients, latency is dominated by queueing in one process (client
    and server share it), so the outage is compared with the same load on a healthy Redis;
    a sequential client then shows the per-request cost of a dead Redis.
    """
    app, _ = create_demo(store=private_redis.url)
    store: Any = app.store  # type: ignore[attr-defined]
    with running_server(app) as served:

        async def burst(probe: Probe, tag: str, healthy: bool) -> list[float]:
            latencies: list[float] = []

            async def one(index: int) -> None:
                results = await probe.limited()
                _check_fail_open(results, healthy)
                latencies.extend(elapsed for _, elapsed in results)
                response, elapsed = await probe.payment(f"{tag}-{index}")
                assert response.status_code in (201, 503), response.text
                latencies.append(elapsed)

            await asyncio.gather(*(one(index) for index in range(40)))
            return latencies

        async def scenario() -> dict[str, Any]:
            out: dict[str, Any] = {}
            limits = httpx.Limits(max_connections=32)
            async with httpx.AsyncClient(base_url=served.url, timeout=10, limits=limits) as client:
                probe = Probe(client)
                healthy = await burst(probe, "u-up", healthy=True)
                out["p99_up"] = percentile(healthy, 0.99)

                private_redis.stop()
                down = await burst(probe, "u-down", healthy=False)
                for index in range(40):
                    response, _ = await probe.payment(f"u-down-{index}")
                    _check_503(response)
                hook, _ = await probe.webhook("evt_uvicorn")
                _check_503(hook)
                sequential = []
                for _ in range(10):
                    sequential += [elapsed for _, elapsed in await probe.limited()]
                out["requests"] = len(down) + 41 + len(sequential)
                out["p50"] = percentile(down, 0.5)
                out["p99"] = percentile(down, 0.99)
                out["seq_p90"] = percentile(sequential, 0.9)
                out["seq_max"] = max(sequential)
                out["failed_while_down"] = _failures(store)

                restart(private_redis)
                out["recovery"] = await _recover(probe, "u-back")
                assert (await probe.payment("u-down-0"))[0].status_code == 201
                # Each concern's breaker closes on that concern's own next successful call.
                out["limits_back"] = await _recover_limits(probe)
                assert (await probe.webhook("evt_uvicorn_back"))[0].status_code == 200
                out["states"] = _states(store)
                out["failures"] = _failures(store)
            return out

        result = asyncio.run(scenario())
        print(
            f"\n[uvicorn, redis killed] {result['requests']} requests; 40 concurrent clients:"
            f" p50 {result['p50'] * 1e3:.1f} ms, p99 {result['p99'] * 1e3:.1f} ms"
            f" (same load, Redis up: p99 {result['p99_up'] * 1e3:.1f} ms);"
            f" one client: p90 {result['seq_p90'] * 1e3:.1f} ms,"
            f" max {result['seq_max'] * 1e3:.1f} ms;"
            f" recovered in {result['recovery']:.3f} s"
        )
        assert result["p99"] < 2 * result["p99_up"] + 0.25
        # A dead Redis costs one client microseconds a request once the breakers are open.
        # Of 40 requests, the slowest is one scheduler hiccup away on a loaded machine
        # (152 ms seen once, every other request under 10 ms), so it is held to the bound
        # that matters: no request waited out a store timeout.
        assert result["seq_p90"] < FAST
        assert result["seq_max"] < STORE_TIMEOUT
        assert result["recovery"] < RECOVERY
        assert result["states"] == dict.fromkeys(CONCERNS, "closed")
        # The returning Redis failed no call, stale pooled connections included.
        assert result["failures"] == result["failed_while_down"]
        # Nothing left running on the server's loop once the clients are gone.
        assert wait_until(lambda: not served.tasks(), 3), served.tasks()
        connections = len(redis_clients(private_redis))
        print(f"[uvicorn, redis killed] connections on the restarted server: {connections}")
        assert connections <= 4
        served.call(store.aclose)
    assert wait_until(lambda: not redis_clients(private_redis), 5)
