"""Micro benchmarks: asgi_armor's primitives next to the libraries users pick today.

Every comparison runs in one process, in one group whose repeats are interleaved (see
``harness``), so the ratios hold even on a noisy shared machine. Rate limiters cycle over
1000 keys (many clients, as a server sees them) with a limit no run comes near, so every
call is an allowed hit that updates state.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import re
import statistics
import time
from collections.abc import Callable
from functools import partial
from importlib.resources import files
from itertools import cycle, islice
from typing import Any

from harness import AsyncCase, Measured, SyncCase, run_async_group, run_sync_group

__all__ = ["Row", "run_all"]

KEYS = [f"client-{i}" for i in range(1000)]
LIMIT = 1_000_000  # per minute: never reached, so every hit is allowed and writes state


class Row(dict[str, Any]):
    """One result line: ``group``, ``case``, ``impl`` (asgi_armor or a peer), ``ns``, ``spread``."""


def _rows(group: str, results: dict[str, Measured], impls: dict[str, str]) -> list[Row]:
    return [
        Row(group=group, case=name, impl=impls[name], ns=m.median, spread=m.spread)
        for name, m in results.items()
    ]


# --------------------------------------------------------------------------------------
# Rate limiting
# --------------------------------------------------------------------------------------


def ratelimit(repeats: int, target: float) -> list[Row]:
    """Token-bucket decision vs limits, pyrate-limiter and throttled-py (memory storage)."""
    import limits
    import limits.aio.storage
    import limits.aio.strategies
    import limits.storage
    import limits.strategies
    import pyrate_limiter as pyrate
    import throttled
    import throttled.asyncio as athrottled

    from asgi_armor import MemoryStore, Rate, RateLimiter
    from asgi_armor.ratelimit.bucket import decide, spec

    impls: dict[str, str] = {}
    sync_cases: list[SyncCase] = []
    async_cases: list[AsyncCase] = []

    def add_sync(name: str, impl: str, loop: Callable[[int], None]) -> None:
        impls[name] = impl
        sync_cases.append(SyncCase(name, loop))

    def add_async(name: str, impl: str, loop: Any) -> None:
        impls[name] = impl
        async_cases.append(AsyncCase(name, loop))

    # asgi_armor's pure core: the GCRA step on one float, state in a dict (what MemoryStore
    # does, without eviction bookkeeping), the clock read included.
    specs = [spec(LIMIT, 60.0)]
    tats: dict[str, float] = {}

    def armor_core(n: int) -> None:
        clock = time.monotonic
        get = tats.get
        for key in islice(cycle(KEYS), n):
            allowed, new = decide([get(key)], clock(), specs, 1)
            if allowed:
                tats[key] = new[0]

    add_sync("bucket.decide (pure core, sync)", "asgi_armor", armor_core)

    item = limits.parse(f"{LIMIT}/minute")
    for label, cls in (
        ("FixedWindow", limits.strategies.FixedWindowRateLimiter),
        ("MovingWindow", limits.strategies.MovingWindowRateLimiter),
        ("SlidingWindowCounter", limits.strategies.SlidingWindowCounterRateLimiter),
    ):
        limiter = cls(limits.storage.MemoryStorage())

        def limits_loop(n: int, hit: Any = limiter.hit) -> None:
            for key in islice(cycle(KEYS), n):
                hit(item, key)

        add_sync(f"limits {label} + MemoryStorage (sync)", "limits", limits_loop)

    class PerKeyFactory(pyrate.BucketFactory):  # type: ignore[misc]
        """pyrate-limiter keeps one bucket per Limiter; a factory gives each key its own."""

        def __init__(self, make: Callable[[], Any]) -> None:
            self.make = make
            self.buckets: dict[str, Any] = {}
            self.clock = pyrate.MonotonicClock()

        def wrap_item(self, name: str, weight: int = 1) -> Any:
            return pyrate.RateItem(name, self.clock.now(), weight=weight)

        def get(self, item: Any) -> Any:
            bucket = self.buckets.get(item.name)
            if bucket is None:
                bucket = self.buckets[item.name] = self.make()
            return bucket

    pyrate_rate = pyrate.Rate(LIMIT, pyrate.Duration.MINUTE)
    for label, make in (
        (
            "TokenBucket (StateBucket)",
            lambda: pyrate.StateBucket([pyrate_rate], algorithm=pyrate.TokenBucket()),
        ),
        ("sliding log (InMemoryBucket)", lambda: pyrate.InMemoryBucket([pyrate_rate])),
    ):
        pyrate_limiter = pyrate.Limiter(PerKeyFactory(make))

        def pyrate_loop(n: int, acquire: Any = pyrate_limiter.try_acquire) -> None:
            for key in islice(cycle(KEYS), n):
                acquire(key, blocking=False)

        add_sync(f"pyrate-limiter {label} (sync)", "pyrate-limiter", pyrate_loop)

    for using in ("token_bucket", "gcra"):
        throttle = throttled.Throttled(
            using=using, quota=throttled.per_min(LIMIT), store=throttled.MemoryStore()
        )

        def throttled_loop(n: int, limit: Any = throttle.limit) -> None:
            for key in islice(cycle(KEYS), n):
                limit(key)

        add_sync(f"throttled-py {using} + MemoryStore (sync)", "throttled-py", throttled_loop)

    # Async: the public API of each library, awaited in a loop on one event loop.
    store = MemoryStore(max_keys=10_000)
    store_specs = [spec(LIMIT, 60.0)]
    store_keys = [f"rl:p:{key}" for key in KEYS]

    async def armor_store(n: int) -> None:
        hit = store.hit_buckets
        for key in islice(cycle(store_keys), n):
            await hit([key], store_specs, 1)

    add_async("MemoryStore.hit_buckets (async)", "asgi_armor", armor_store)

    rate = Rate.parse(f"{LIMIT}/minute")
    limiter = RateLimiter(MemoryStore(max_keys=10_000))

    async def armor_limiter(n: int) -> None:
        hit = limiter.hit
        for key in islice(cycle(KEYS), n):
            await hit(key, rate)

    add_async("RateLimiter(MemoryStore()).hit (async)", "asgi_armor", armor_limiter)

    async_limiters = {}
    for label, acls in (
        ("FixedWindow", limits.aio.strategies.FixedWindowRateLimiter),
        ("MovingWindow", limits.aio.strategies.MovingWindowRateLimiter),
        ("SlidingWindowCounter", limits.aio.strategies.SlidingWindowCounterRateLimiter),
    ):
        async_limiters[label] = acls

    def make_limits_async(acls: Any) -> Any:
        holder: dict[str, Any] = {}

        async def loop(n: int) -> None:
            if "hit" not in holder:
                # The aio MemoryStorage starts its expiry task on the running loop.
                holder["hit"] = acls(limits.aio.storage.MemoryStorage()).hit
            hit = holder["hit"]
            for key in islice(cycle(KEYS), n):
                await hit(item, key)

        return loop

    for label, acls in async_limiters.items():
        add_async(f"limits {label} + aio MemoryStorage (async)", "limits", make_limits_async(acls))

    athrottle = athrottled.Throttled(
        using="token_bucket", quota=athrottled.per_min(LIMIT), store=athrottled.MemoryStore()
    )

    async def throttled_async(n: int) -> None:
        limit = athrottle.limit
        for key in islice(cycle(KEYS), n):
            await limit(key)

    add_async("throttled-py token_bucket + MemoryStore (async)", "throttled-py", throttled_async)

    rows = _rows("ratelimit", run_sync_group(sync_cases, repeats=repeats, target=target), impls)
    rows += _rows("ratelimit", run_async_group(async_cases, repeats=repeats, target=target), impls)
    return rows


# --------------------------------------------------------------------------------------
# Circuit breakers
# --------------------------------------------------------------------------------------


class Boom(Exception):
    """The failure used to open the breakers."""


def breaker(repeats: int, target: float) -> list[Row]:
    """Breaker overhead on a successful call, and the cost of an open-circuit rejection."""
    import datetime

    import aiobreaker
    import purgatory
    import pybreaker
    from purgatory.domain.model import OpenedState

    from asgi_armor import CircuitBreaker, CircuitOpenError

    def work() -> int:
        return 1

    async def awork() -> int:
        return 1

    def fail() -> None:
        raise Boom

    async def afail() -> None:
        raise Boom

    impls: dict[str, str] = {}
    sync_cases: list[SyncCase] = []
    async_cases: list[AsyncCase] = []

    def sync_loop(call: Callable[[], Any]) -> Callable[[int], None]:
        def loop(n: int) -> None:
            for _ in range(n):
                call()

        return loop

    def sync_reject_loop(
        call: Callable[[], Any], exc: type[BaseException]
    ) -> Callable[[int], None]:
        def loop(n: int) -> None:
            for _ in range(n):
                # try/except, not contextlib.suppress: the timed loop must not add a
                # context manager per call to what it measures.
                try:  # noqa: SIM105
                    call()
                except exc:
                    pass

        return loop

    def add_sync(name: str, impl: str, loop: Callable[[int], None]) -> None:
        impls[name] = impl
        sync_cases.append(SyncCase(name, loop))

    def add_async(name: str, impl: str, loop: Any) -> None:
        impls[name] = impl
        async_cases.append(AsyncCase(name, loop))

    # -- successful calls, sync ----------------------------------------------------------
    add_sync("sync: bare call (baseline)", "baseline", sync_loop(work))
    armor = CircuitBreaker(fail_max=5, reset_timeout=30)
    add_sync("sync: @breaker", "asgi_armor", sync_loop(armor(work)))

    def armor_with(n: int) -> None:
        for _ in range(n):
            with armor:
                work()

    add_sync("sync: with breaker", "asgi_armor", armor_with)
    pb = pybreaker.CircuitBreaker(fail_max=5, reset_timeout=30)
    add_sync("sync: pybreaker @breaker", "pybreaker", sync_loop(pb(work)))
    pb_call = pb.call
    add_sync("sync: pybreaker breaker.call", "pybreaker", sync_loop(lambda: pb_call(work)))
    ab = aiobreaker.CircuitBreaker(fail_max=5, timeout_duration=datetime.timedelta(seconds=30))
    ab_call = ab.call
    add_sync("sync: aiobreaker breaker.call", "aiobreaker", sync_loop(lambda: ab_call(work)))
    pcbf = purgatory.SyncCircuitBreakerFactory(default_threshold=5, default_ttl=30)
    add_sync("sync: purgatory @factory(name)", "purgatory", sync_loop(pcbf("svc")(work)))

    # -- open-circuit rejections, sync ---------------------------------------------------
    armor_open = CircuitBreaker(fail_max=1, reset_timeout=3600)
    guarded_fail = armor_open(fail)
    with contextlib.suppress(Boom):
        guarded_fail()
    add_sync(
        "sync open: @breaker rejects",
        "asgi_armor",
        sync_reject_loop(guarded_fail, CircuitOpenError),
    )
    pb_open = pybreaker.CircuitBreaker(fail_max=1, reset_timeout=3600)
    pb_fail = pb_open(fail)
    with contextlib.suppress(Boom, pybreaker.CircuitBreakerError):
        pb_fail()
    add_sync(
        "sync open: pybreaker rejects",
        "pybreaker",
        sync_reject_loop(pb_fail, pybreaker.CircuitBreakerError),
    )
    ab_open = aiobreaker.CircuitBreaker(
        fail_max=1, timeout_duration=datetime.timedelta(seconds=3600)
    )
    with contextlib.suppress(Boom, aiobreaker.CircuitBreakerError):
        ab_open.call(fail)
    add_sync(
        "sync open: aiobreaker rejects",
        "aiobreaker",
        sync_reject_loop(lambda: ab_open.call(fail), aiobreaker.CircuitBreakerError),
    )
    pcbf_open = purgatory.SyncCircuitBreakerFactory(default_threshold=1, default_ttl=3600)
    p_fail = pcbf_open("svc")(fail)
    with contextlib.suppress(Boom, OpenedState):
        p_fail()
    add_sync("sync open: purgatory rejects", "purgatory", sync_reject_loop(p_fail, OpenedState))

    # -- async ---------------------------------------------------------------------------
    def async_loop(call: Callable[[], Any]) -> Any:
        async def loop(n: int) -> None:
            for _ in range(n):
                await call()

        return loop

    def async_reject_loop(call: Callable[[], Any], exc: type[BaseException]) -> Any:
        async def loop(n: int) -> None:
            for _ in range(n):
                try:  # noqa: SIM105 - as above
                    await call()
                except exc:
                    pass

        return loop

    add_async("async: bare await (baseline)", "baseline", async_loop(awork))
    aarmor = CircuitBreaker(fail_max=5, reset_timeout=30)
    add_async("async: @breaker", "asgi_armor", async_loop(aarmor(awork)))
    add_async("async: await breaker.call(fn)", "asgi_armor", async_loop(lambda: aarmor.call(awork)))

    async def armor_async_with(n: int) -> None:
        for _ in range(n):
            async with aarmor:
                await awork()

    add_async("async: async with breaker", "asgi_armor", armor_async_with)
    aab = aiobreaker.CircuitBreaker(fail_max=5, timeout_duration=datetime.timedelta(seconds=30))
    add_async("async: aiobreaker @breaker", "aiobreaker", async_loop(aab(awork)))
    add_async(
        "async: aiobreaker breaker.call_async",
        "aiobreaker",
        async_loop(lambda: aab.call_async(awork)),
    )
    acbf = purgatory.AsyncCircuitBreakerFactory(default_threshold=5, default_ttl=30)
    add_async("async: purgatory @factory(name)", "purgatory", async_loop(acbf("svc")(awork)))

    async def purgatory_async_with(n: int) -> None:
        for _ in range(n):
            async with await acbf.get_breaker("svc"):
                await awork()

    add_async("async: purgatory async with get_breaker", "purgatory", purgatory_async_with)

    aarmor_open = CircuitBreaker(fail_max=1, reset_timeout=3600)
    aguarded_fail = aarmor_open(afail)
    aab_open = aiobreaker.CircuitBreaker(
        fail_max=1, timeout_duration=datetime.timedelta(seconds=3600)
    )
    aab_fail = aab_open(afail)
    acbf_open = purgatory.AsyncCircuitBreakerFactory(default_threshold=1, default_ttl=3600)
    ap_fail = acbf_open("svc")(afail)
    opened: dict[str, bool] = {}

    async def open_all() -> None:
        if opened:
            return
        opened["done"] = True
        for call in (aguarded_fail, aab_fail, ap_fail):
            with contextlib.suppress(Boom, CircuitOpenError, aiobreaker.CircuitBreakerError):
                await call()

    def opening(loop: Any) -> Any:
        async def run(n: int) -> None:
            await open_all()
            await loop(n)

        return run

    add_async(
        "async open: @breaker rejects",
        "asgi_armor",
        opening(async_reject_loop(aguarded_fail, CircuitOpenError)),
    )
    add_async(
        "async open: aiobreaker rejects",
        "aiobreaker",
        opening(async_reject_loop(aab_fail, aiobreaker.CircuitBreakerError)),
    )
    add_async(
        "async open: purgatory rejects",
        "purgatory",
        opening(async_reject_loop(ap_fail, OpenedState)),
    )

    rows = _rows("breaker", run_sync_group(sync_cases, repeats=repeats, target=target), impls)
    rows += _rows("breaker", run_async_group(async_cases, repeats=repeats, target=target), impls)
    return rows


# --------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------

VALID_BODY = b'{"email": "Ada.Lovelace@Example.com", "name": "Ada Lovelace", "age": 36}'


def validation(repeats: int, target: float) -> list[Row]:
    """``decode(body, CreateUserRequest)`` vs pydantic v2 on the equivalent model."""
    import msgspec
    import pydantic
    from pydantic import BaseModel, ConfigDict, EmailStr, Field, field_validator

    from asgi_armor import decode
    from asgi_armor.demo.app import CreateUserRequest

    # The seed article's model, ported to pydantic v2 (field_validator): its validators
    # verbatim. asgi_armor's Email and Name check more (RFC 5321/5322 structure, bidi and
    # zero-width characters, NFC), so this comparison favours pydantic.
    class UserPlain(BaseModel):
        """pydantic with constrained str fields and the seed article's field_validators."""

        model_config = ConfigDict(extra="forbid")
        email: str = Field(..., max_length=254)
        name: str = Field(..., min_length=1, max_length=100)
        age: int | None = Field(None, ge=0, le=150)

        @field_validator("email")
        @classmethod
        def validate_email(cls, v: str) -> str:
            if not re.match(r"^[^@]+@[^@]+\.[^@]+$", v):
                raise ValueError("Invalid email format")
            return v.lower().strip()

        @field_validator("name")
        @classmethod
        def sanitize_name(cls, v: str) -> str:
            v = re.sub(r"[\x00-\x1f\x7f-\x9f]", "", v)
            return " ".join(v.split())

    class UserEmailStr(BaseModel):
        """pydantic with EmailStr (email-validator) and the seed article's name validator."""

        model_config = ConfigDict(extra="forbid")
        email: EmailStr
        name: str = Field(..., min_length=1, max_length=100)
        age: int | None = Field(None, ge=0, le=150)

        @field_validator("name")
        @classmethod
        def sanitize_name(cls, v: str) -> str:
            v = re.sub(r"[\x00-\x1f\x7f-\x9f]", "", v)
            return " ".join(v.split())

    class UserNoValidators(BaseModel):
        """pydantic with the same constraints but no validator: the engine alone."""

        model_config = ConfigDict(extra="forbid")
        email: str = Field(..., max_length=254)
        name: str = Field(..., min_length=1, max_length=100)
        age: int | None = Field(None, ge=0, le=150)

    # Sanity: all three accept the body and agree on the result.
    ours = msgspec.to_builtins(decode(VALID_BODY, CreateUserRequest))
    for model in (UserEmailStr, UserPlain):
        theirs = model.model_validate_json(VALID_BODY).model_dump()
        theirs["email"] = theirs["email"].lower()  # EmailStr keeps the local part's case
        if theirs != ours:
            raise RuntimeError(f"{model.__name__} disagrees: {theirs} != {ours}")

    raw = msgspec.json.Decoder(CreateUserRequest).decode
    cases = [
        SyncCase(
            "decode(body, CreateUserRequest)", lambda n: _repeat(n, decode, CreateUserRequest)
        ),
        SyncCase(
            "pydantic v2 EmailStr + field_validator",
            lambda n: _repeat(n, _validate_json(UserEmailStr)),
        ),
        SyncCase(
            "pydantic v2 constrained str + field_validator (seed)",
            lambda n: _repeat(n, _validate_json(UserPlain)),
        ),
        SyncCase("msgspec decode alone (no normalising)", lambda n: _repeat(n, raw)),
        SyncCase(
            "pydantic v2 alone (same constraints, no validator)",
            lambda n: _repeat(n, _validate_json(UserNoValidators)),
        ),
    ]
    impls = {
        cases[0].name: "asgi_armor",
        cases[1].name: "pydantic",
        cases[2].name: "pydantic",
        cases[3].name: "reference",
        cases[4].name: "reference",
    }
    rows = _rows("validation", run_sync_group(cases, repeats=repeats, target=target), impls)
    for row in rows:
        row["note"] = f"pydantic {pydantic.VERSION}" if row["impl"] == "pydantic" else ""
    return rows


def _validate_json(model: Any) -> Callable[[bytes], Any]:
    return model.model_validate_json  # type: ignore[no-any-return]


def _repeat(n: int, fn: Callable[..., Any], *args: Any) -> None:
    body = VALID_BODY
    for _ in range(n):
        fn(body, *args)


# --------------------------------------------------------------------------------------
# Idempotency and signing: per-request overhead of the middleware, in-process ASGI calls
# --------------------------------------------------------------------------------------


def _scope(method: str, path: str, headers: list[tuple[bytes, bytes]]) -> dict[str, Any]:
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": headers,
        "client": ("127.0.0.1", 40000),
        "server": ("127.0.0.1", 8000),
    }


async def _bare_app(scope: Any, receive: Any, send: Any) -> None:
    """A handler that reads its body and answers 201 with a small JSON document."""
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body", False):
            break
    await send(
        {
            "type": "http.response.start",
            "status": 201,
            "headers": [(b"content-type", b"application/json"), (b"content-length", b"31")],
        }
    )
    await send({"type": "http.response.body", "body": b'{"id": "pay_1", "status": "ok"}'})


async def _sink(message: Any) -> None:
    return None


def _caller(app: Any) -> Callable[[dict[str, Any], bytes], Any]:
    async def call(scope: dict[str, Any], body: bytes) -> None:
        async def receive() -> dict[str, Any]:
            return {"type": "http.request", "body": body, "more_body": False}

        await app(scope, receive, _sink)

    return call


_PAYMENT = b'{"amount": 1000, "currency": "eur"}'
_JSON_HEADERS = [(b"content-type", b"application/json"), (b"host", b"t")]


async def _streaming_app(scope: Any, receive: Any, send: Any) -> None:
    """A handler that streams its answer: three chunks, then an empty last one."""
    while (await receive()).get("more_body", False):
        pass
    await send({"type": "http.response.start", "status": 201, "headers": []})
    for chunk in (b'{"id": "pay_1", ', b'"status": ', b'"ok"}'):
        await send({"type": "http.response.body", "body": chunk, "more_body": True})
    await send({"type": "http.response.body", "body": b"", "more_body": False})


def _run_over(
    call: Any, scopes: list[dict[str, Any]], bodies: list[bytes] | None = None, *, body: bytes
) -> Any:
    """A loop calling ``call`` once per prepared scope (each used once: fresh keys)."""
    position = {"i": 0}

    async def loop(count: int) -> None:
        start = position["i"]
        position["i"] = start + count
        for index in range(start, start + count):
            scope = dict(scopes[index])
            await call(scope, body if bodies is None else bodies[index])

    return loop


def _fresh_scopes(total: int, tag: bytes) -> list[dict[str, Any]]:
    return [
        _scope("POST", "/api/payments", [*_JSON_HEADERS, (b"idempotency-key", b"%s-%d" % (tag, i))])
        for i in range(total)
    ]


def _idempotency_cases(n: int, total: int) -> list[AsyncCase]:
    """First request (one chunk, streamed), and replay, next to the bare app (memory store)."""
    from asgi_armor import IdempotencyMiddleware, MemoryStore

    def middleware_for(app: Any) -> Any:
        return IdempotencyMiddleware(
            app, routes=["POST /api/payments"], store=MemoryStore(max_keys=1_000_000)
        )

    idem_app = middleware_for(_bare_app)
    stream_app = middleware_for(_streaming_app)
    idem = _caller(idem_app)
    replay_headers = [*_JSON_HEADERS, (b"idempotency-key", b"order-replayed")]
    fresh = _fresh_scopes(total, b"order")
    streamed = _fresh_scopes(total, b"stream")
    # Correctness first: the middleware must answer 201, not an error envelope.
    _check_status(idem_app, fresh.pop(), _PAYMENT)
    _check_status(stream_app, streamed.pop(), _PAYMENT)
    # The replay case needs its first response stored before it is timed.
    asyncio.run(idem(_scope("POST", "/api/payments", replay_headers), _PAYMENT))

    def run_same(call: Any, headers: list[tuple[bytes, bytes]]) -> Any:
        async def loop(count: int) -> None:
            for _ in range(count):
                await call(_scope("POST", "/api/payments", headers), _PAYMENT)

        return loop

    run_over = partial(_run_over, body=_PAYMENT)
    return [
        AsyncCase(
            "idempotency: bare app (baseline)", run_same(_caller(_bare_app), _JSON_HEADERS), n
        ),
        AsyncCase("idempotency: first request (lease, run, store)", run_over(idem, fresh), n),
        AsyncCase(
            "idempotency: first request, streamed in 4 chunks",
            run_over(_caller(stream_app), streamed),
            n,
        ),
        AsyncCase("idempotency: replay (stored response)", run_same(idem, replay_headers), n),
    ]


def idempotency_latency(n: int) -> list[Row]:
    """On a private Redis: time to the response's last chunk, and to the end of the call.

    What a client waits for is the last chunk; the record write sits before it (or after
    it), so this is where its order shows. Medians over ``n`` first requests, in ns.
    """
    import macro

    from asgi_armor import IdempotencyMiddleware
    from asgi_armor.stores.redis import RedisStore

    rows: list[Row] = []
    with macro.redis_server() as info:
        if info is None:
            print("  micro: no Redis, idempotency latency skipped", flush=True)
            return rows

        async def main() -> tuple[list[float], list[float]]:
            store = RedisStore.from_url(info.url, prefix=f"bench:{time.time_ns()}:")
            app = IdempotencyMiddleware(_bare_app, routes=["POST /api/payments"], store=store)
            to_last: list[float] = []
            to_end: list[float] = []
            try:
                for index, scope in enumerate(_fresh_scopes(n + 100, b"redis")):
                    last = 0.0

                    async def receive() -> dict[str, Any]:
                        return {"type": "http.request", "body": _PAYMENT, "more_body": False}

                    async def send(message: Any) -> None:
                        nonlocal last
                        if message["type"] == "http.response.body" and not message.get(
                            "more_body", False
                        ):
                            last = time.perf_counter_ns()

                    start = time.perf_counter_ns()
                    await app(scope, receive, send)
                    end = time.perf_counter_ns()
                    if index >= 100:  # warm-up: connections, scripts
                        to_last.append(last - start)
                        to_end.append(end - start)
            finally:
                await store.aclose()
            return to_last, to_end

        to_last, to_end = asyncio.run(main())
    for name, samples in (
        ("idempotency, RedisStore: first request, to the last chunk", to_last),
        ("idempotency, RedisStore: first request, to the end of the call", to_end),
    ):
        ordered = sorted(samples)
        median = statistics.median(ordered)
        spread = (ordered[int(len(ordered) * 0.9)] - ordered[int(len(ordered) * 0.1)]) / median
        rows.append(
            Row(group="idempotency_redis", case=name, impl="asgi_armor", ns=median, spread=spread)
        )
    return rows


#: Concurrent callers of the Redis group.
CONCURRENCY = (1, 8, 32, 256)


def redis_concurrency(rounds: int, decisions: int) -> list[Row]:
    """On a private Redis: cost per decision with 1, 8, 32 and 256 concurrent callers.

    Each caller awaits ``hit_buckets`` for the served request's four layers (four keys),
    one decision after another, with 1000 clients in rotation. ``ns`` is wall time per
    decision (what a caller sees, divided by the calls in flight: the inverse of the
    throughput), ``cpu_ns`` this process's CPU time per decision (what a busy server pays).
    Next to the batching store: the same store with batches of one (each call its own
    round trip, as before batching), a bare redis-py ``EVALSHA`` per call (the transport
    the store used before batching), and the batching store with redis-py's pure-Python
    reply parser instead of hiredis. Rounds alternate the cases; medians over the rounds.
    """
    import macro
    import redis.asyncio as aioredis
    from redis._parsers import _AsyncHiredisParser, _AsyncRESP3Parser
    from redis.utils import HIREDIS_AVAILABLE

    from asgi_armor.ratelimit.bucket import spec
    from asgi_armor.stores.redis import RedisStore

    rows: list[Row] = []
    specs = [spec(LIMIT, 60.0)] * 4
    keys = [[f"rl:{layer}:{client}" for layer in "abcd"] for client in KEYS]
    with macro.redis_server() as info:
        if info is None:
            print("  micro: no Redis, the Redis concurrency group skipped", flush=True)
            return rows

        async def main() -> dict[tuple[str, int], list[tuple[float, float]]]:
            prefix = f"bench:{time.time_ns()}:"
            fast = _AsyncHiredisParser if HIREDIS_AVAILABLE else _AsyncRESP3Parser
            stores: dict[str, Any] = {
                "RedisStore (batched)": RedisStore.from_url(
                    info.url, prefix=prefix, parser_class=fast
                ),
                "RedisStore, max_batch=1 (a round trip per call)": RedisStore.from_url(
                    info.url, prefix=prefix, parser_class=fast, max_batch=1, max_in_flight=64
                ),
                "RedisStore (batched), pure-Python parser": RedisStore.from_url(
                    info.url, prefix=prefix, parser_class=_AsyncRESP3Parser
                ),
            }
            if not HIREDIS_AVAILABLE:
                del stores["RedisStore (batched), pure-Python parser"]
            pool = aioredis.BlockingConnectionPool.from_url(
                info.url, max_connections=64, timeout=None, socket_timeout=None
            )
            bare = aioredis.Redis.from_pool(pool)
            script = bare.register_script(
                (files("asgi_armor.stores") / "lua" / "hit_buckets.lua").read_text()
            )
            argv = [repr(number) for number in (1, *(x for pair in specs for x in pair))]

            async def bare_hit(names: list[str], _specs: Any, _cost: int) -> Any:
                return await script(keys=[prefix + name for name in names], args=argv)

            hits: dict[str, Any] = {name: store.hit_buckets for name, store in stores.items()}
            hits["bare redis-py EVALSHA per call (the transport before batching)"] = bare_hit

            async def measure(hit: Any, callers: int) -> tuple[float, float]:
                each = max(1, decisions // callers)

                async def caller(index: int) -> None:
                    for step in range(each):
                        await hit(keys[(index * each + step) % len(keys)], specs, 1)

                start, cpu = time.perf_counter_ns(), time.process_time_ns()
                await asyncio.gather(*(caller(index) for index in range(callers)))
                done = each * callers
                return (time.perf_counter_ns() - start) / done, (
                    time.process_time_ns() - cpu
                ) / done

            samples: dict[tuple[str, int], list[tuple[float, float]]] = {}
            try:
                for hit in hits.values():  # connections, scripts, first allocations
                    await measure(hit, 32)
                for round_index in range(rounds):
                    order = list(hits.items())
                    if round_index % 2:
                        order.reverse()
                    for callers in CONCURRENCY:
                        for name, hit in order:
                            samples.setdefault((name, callers), []).append(
                                await measure(hit, callers)
                            )
            finally:
                for store in stores.values():
                    await store.aclose()
                await bare.aclose()
            return samples

        samples = asyncio.run(main())
    for (name, callers), values in samples.items():
        walls = sorted(wall for wall, _ in values)
        median = statistics.median(walls)
        rows.append(
            Row(
                group="redis_concurrency",
                case=f"{name}, {callers} concurrent",
                impl="asgi_armor" if name.startswith("RedisStore") else "baseline",
                ns=median,
                cpu_ns=statistics.median(cpu for _, cpu in values),
                spread=(walls[-1] - walls[0]) / median,
                variant=name,
                callers=callers,
            )
        )
    return rows


def middleware(repeats: int, n: int) -> list[Row]:
    """Idempotency (first request and replay) and signature verification per request."""
    from asgi_armor import HexHmac, MemoryStore, SignatureMiddleware, StandardWebhooks, sign
    from asgi_armor.signing import SignedRoute

    # Warm-up plus repeats consume n prepared inputs each; one more is kept for the checks.
    total = n * (repeats + 1) + 1
    body = b'{"amount": 1000, "currency": "eur"}'
    json_headers = [(b"content-type", b"application/json"), (b"host", b"t")]

    bare = _caller(_bare_app)
    run_over = partial(_run_over, body=body)

    # Signed webhooks: every body distinct, since a repeated body is a replay (401).
    secret = "whsec_" + "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
    padding = "x" * 900
    webhook_bodies = [
        b'{"type": "payment.succeeded", "id": "evt_%d", "pad": "%s"}' % (i, padding.encode())
        for i in range(total)
    ]
    hex_scopes = []
    sw_scopes = []
    for i, payload in enumerate(webhook_bodies):
        hex_headers = sign(payload, secret, HexHmac())
        hex_scopes.append(
            _scope(
                "POST",
                "/webhooks/payment",
                [
                    *json_headers,
                    *((k.lower().encode(), v.encode()) for k, v in hex_headers.items()),
                ],
            )
        )
        sw_headers = sign(payload, secret, StandardWebhooks(), msg_id=f"msg_{i}")
        sw_scopes.append(
            _scope(
                "POST",
                "/webhooks/payment",
                [*json_headers, *((k.lower().encode(), v.encode()) for k, v in sw_headers.items())],
            )
        )
    hex_mw = SignatureMiddleware(
        _bare_app,
        routes={"POST /webhooks/payment": SignedRoute(HexHmac(), secret)},
        store=MemoryStore(max_keys=1_000_000),
    )
    sw_mw = SignatureMiddleware(
        _bare_app,
        routes={"POST /webhooks/payment": SignedRoute(StandardWebhooks(), secret)},
        store=MemoryStore(max_keys=1_000_000),
    )
    hex_app = _caller(hex_mw)
    sw_app = _caller(sw_mw)
    cases = [
        *_idempotency_cases(n, total),
        AsyncCase(
            "signing: bare app, 1 KiB body (baseline)",
            run_over(bare, hex_scopes, webhook_bodies),
            n,
        ),
        AsyncCase(
            "signing: HexHmac + replay cache", run_over(hex_app, hex_scopes, webhook_bodies), n
        ),
        AsyncCase(
            "signing: Standard Webhooks + replay cache",
            run_over(sw_app, sw_scopes, webhook_bodies),
            n,
        ),
    ]
    impls = {case.name: "baseline" if "baseline" in case.name else "asgi_armor" for case in cases}
    # Correctness first: the middleware must answer 201, not an error envelope.
    _check_status(hex_mw, hex_scopes[-1], webhook_bodies[-1])
    _check_status(sw_mw, sw_scopes[-1], webhook_bodies[-1])
    return _rows("middleware", run_async_group(cases, repeats=repeats, target=0.0), impls)


def _check_status(app: Any, scope: dict[str, Any], body: bytes, expected: int = 201) -> None:
    statuses: list[int] = []

    async def go() -> None:
        async def receive() -> dict[str, Any]:
            return {"type": "http.request", "body": body, "more_body": False}

        async def send(message: Any) -> None:
            if message["type"] == "http.response.start":
                statuses.append(message["status"])

        await app(dict(scope), receive, send)

    asyncio.run(go())
    if statuses != [expected]:
        raise RuntimeError(f"middleware benchmark misconfigured: status {statuses}")


#: The full stack reporting every decision to a Prometheus sink (issue 19).
METRICS_CASE = "layers: + Prometheus metrics"
#: The seed's stack through ``armor()``'s pipeline.
ARMOR_CASE = "layers: + timeout: the seed's stack (armor)"


def layers(repeats: int, n: int) -> list[Row]:
    """Per-request cost of the served seed stack, built up one protection at a time,
    in-process (no server); and the same stack composed by hand from the public classes."""
    import apps

    from asgi_armor import ArmorConfig, PrometheusMetrics, armor

    body = b'{"branch": "main"}'
    headers = [
        (b"host", b"127.0.0.1:8000"),
        (b"content-type", b"application/json"),
        (b"authorization", b"Bearer alice-token"),
        (b"content-length", b"18"),
    ]
    full = apps.armor_settings("memory", "bench:")

    def built(**changes: Any) -> Any:
        config = ArmorConfig.from_dict({**full, **changes})
        return armor(apps.asgi_app, config, identify=apps.identify)

    rules = full["rate_limit"]
    variants: dict[str, Any] = {
        "layers: bare app (baseline)": apps.asgi_app,
        "layers: errors (request id, envelope)": built(limits=None, rate_limit=[], timeout=[]),
        "layers: + input limits": built(rate_limit=[], timeout=[]),
        "layers: + 1 rate-limit rule (memory)": built(rate_limit=rules[:1], timeout=[]),
        "layers: + 4 rate-limit rules": built(timeout=[]),
        ARMOR_CASE: built(),
    }
    variants[METRICS_CASE] = armor(
        apps.asgi_app,
        apps.armor_config("memory", "bench:"),
        identify=apps.identify,
        metrics=PrometheusMetrics(),
    )
    composed: Any = apps.asgi_app
    for layer in reversed(variants[ARMOR_CASE].layers):
        layer.app = composed
        composed = layer
    variants["layers: the same classes composed by hand"] = composed

    def loop(app: Any) -> Any:
        call = _caller(app)

        async def run(count: int) -> None:
            for _ in range(count):
                await call(_scope("POST", "/api/projects/p1/builds", list(headers)), body)

        return run

    for app in variants.values():
        _check_status(app, _scope("POST", "/api/projects/p1/builds", list(headers)), body, 202)
    cases = [AsyncCase(name, loop(app), n) for name, app in variants.items()]
    impls = {case.name: "baseline" if "baseline" in case.name else "asgi_armor" for case in cases}
    return _rows("layers", run_async_group(cases, repeats=repeats, target=0.0), impls)


def run_all(*, quick: bool = False) -> list[Row]:
    """Every micro benchmark; ``quick`` shortens them for a smoke test."""
    repeats, target = (3, 0.01) if quick else (9, 0.06)
    rows: list[Row] = []
    for name, bench in (
        ("rate limiting", ratelimit),
        ("circuit breakers", breaker),
        ("validation", validation),
    ):
        print(f"  micro: {name} ...", flush=True)
        rows += bench(repeats, target)
    print("  micro: idempotency and signing ...", flush=True)
    rows += middleware(repeats, 500 if quick else 4000)
    rows += idempotency_latency(300 if quick else 2000)
    print("  micro: the served stack's layers, in-process ...", flush=True)
    rows += layers(repeats, 500 if quick else 4000)
    print("  micro: Redis decisions by concurrent callers ...", flush=True)
    rows += redis_concurrency(3 if quick else 5, 1000 if quick else 4000)
    return rows


def _main() -> None:
    """``python benchmarks/micro.py GROUP [--quick]``: one group alone (``make bench`` runs all)."""
    parser = argparse.ArgumentParser(description=_main.__doc__)
    parser.add_argument(
        "group", choices=["ratelimit", "breaker", "validation", "idempotency", "layers", "redis"]
    )
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.group == "redis":
        for row in redis_concurrency(3 if args.quick else 5, 1000 if args.quick else 4000):
            print(
                f"{row['case']:<84} {row['ns'] / 1000:8.1f} us wall"
                f" {row['cpu_ns'] / 1000:7.1f} us CPU  ±{row['spread'] * 50:.0f}%"
            )
        return
    repeats, target = (3, 0.01) if args.quick else (9, 0.06)
    n = 500 if args.quick else 4000
    if args.group == "idempotency":
        cases = _idempotency_cases(n, n * (repeats + 1) + 1)
        results = run_async_group(cases, repeats=repeats, target=0.0)
        rows = _rows("middleware", results, dict.fromkeys(results, "asgi_armor"))
        rows += idempotency_latency(300 if args.quick else 2000)
    elif args.group == "layers":
        rows = layers(repeats, n)
    else:
        rows = {"ratelimit": ratelimit, "breaker": breaker, "validation": validation}[args.group](
            repeats, target
        )
    for row in rows:
        print(f"{row['case']:<66} {row['ns'] / 1000:8.2f} us  ±{row['spread'] * 50:.0f}%")


if __name__ == "__main__":
    _main()
