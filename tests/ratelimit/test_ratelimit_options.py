"""Rule options: ``count="failures"`` (only answers >= 400 take a token, decided after the
response, one store call on the success path) and ``shadow`` (decided, counted, sent as
headers, never refused), on the memory store and on Redis."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Sequence
from typing import TYPE_CHECKING, Any

import httpx
import pytest

from asgi_armor import ArmorConfig, armor
from asgi_armor._asgi import Receive, Scope, Send, read_body
from asgi_armor.errors import ErrorMiddleware
from asgi_armor.ratelimit import RateLimitMiddleware, Rule
from asgi_armor.stores.base import BucketSpec
from asgi_armor.stores.memory import MemoryStore

if TYPE_CHECKING:
    from asgi_armor.stores.redis import RedisStore
    from tests.conftest import FakeClock

pytestmark = pytest.mark.anyio

WALL = 1_700_000_000.0
PASSWORD = b"hunter2"


async def login(scope: Scope, receive: Receive, send: Send) -> None:
    """``POST /api/login``: 200 for the right password, 401 otherwise; 200 elsewhere."""
    body = await read_body(receive, 1024)
    ok = scope["path"] != "/api/login" or json.loads(body or b"{}").get("password") == "hunter2"
    status = 200 if ok else 401
    await send({"type": "http.response.start", "status": status, "headers": []})
    await send({"type": "http.response.body", "body": b"{}"})


class CountingStore(MemoryStore):
    """A real MemoryStore that counts its decisions (``take`` is what the middleware calls)."""

    def __init__(self, clock: FakeClock) -> None:
        super().__init__(clock=clock)
        self.calls: list[tuple[int, int]] = []

    def take(
        self, keys: Sequence[str], specs: Sequence[BucketSpec], cost: int
    ) -> tuple[bool, float, list[float]]:
        self.calls.append((len(keys), cost))
        return super().take(keys, specs, cost)


def wrap(rules: list[Rule], store: Any) -> tuple[ErrorMiddleware, RateLimitMiddleware]:
    limiter = RateLimitMiddleware(login, rules=rules, store=store, wall_clock=lambda: WALL)
    return ErrorMiddleware(limiter), limiter


@pytest.fixture
async def client(clock: FakeClock) -> AsyncIterator[httpx.AsyncClient]:
    rules = [Rule("POST /api/login", "5/15minutes", count="failures", name="login")]
    asgi, _ = wrap(rules, MemoryStore(clock=clock))
    transport = httpx.ASGITransport(app=asgi, client=("203.0.113.7", 1))
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
        yield c


def rate_headers(response: httpx.Response) -> dict[str, str]:
    names = ("ratelimit", "ratelimit-policy", "x-ratelimit-remaining", "retry-after")
    return {name: response.headers[name] for name in names if name in response.headers}


async def attempt(client: httpx.AsyncClient, password: str) -> httpx.Response:
    return await client.post("/api/login", json={"username": "alice", "password": password})


async def test_five_failures_lock_the_login_and_successes_are_not_counted(
    client: httpx.AsyncClient, clock: FakeClock
) -> None:
    for _ in range(3):
        ok = await attempt(client, "hunter2")
        assert ok.status_code == 200
        # A success gives its token back: the bucket stays full.
        assert rate_headers(ok) == {
            "ratelimit": '"login";r=5;t=0',
            "ratelimit-policy": '"login";q=5;w=900',
            "x-ratelimit-remaining": "5",
        }
    for left in (4, 3, 2, 1, 0):
        wrong = await attempt(client, "guess")
        assert wrong.status_code == 401
        # The headers of a failure already report the token it cost.
        assert wrong.headers["x-ratelimit-remaining"] == str(left)
        assert wrong.headers["ratelimit"] == f'"login";r={left};t={180 * (5 - left)}'
    locked = await attempt(client, "hunter2")  # even the right password: locked
    assert locked.status_code == 429
    assert locked.json()["error"] == "rate_limited"
    assert rate_headers(locked) == {
        "ratelimit": '"login";r=0;t=900',
        "ratelimit-policy": '"login";q=5;w=900',
        "x-ratelimit-remaining": "0",
        "retry-after": "180",
    }
    clock.advance(179.9)
    assert (await attempt(client, "hunter2")).status_code == 429
    clock.advance(0.1)  # one token back after 15 minutes / 5
    assert (await attempt(client, "hunter2")).status_code == 200
    assert (await attempt(client, "guess")).status_code == 401
    assert (await attempt(client, "hunter2")).status_code == 429


async def test_a_failure_costs_no_store_call_of_its_own_and_a_success_one(
    clock: FakeClock,
) -> None:
    store = CountingStore(clock)
    rules = [
        Rule("* /api/*", "100/minute", name="ip"),
        Rule("POST /api/login", "5/15minutes", count="failures", name="login"),
    ]
    asgi, _ = wrap(rules, store)
    transport = httpx.ASGITransport(app=asgi, client=("203.0.113.7", 1))
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        wrong = await attempt(client, "guess")
        # One call decides both rules, the failures rule's token taken with the other's.
        assert store.calls == [(2, 1)]
        assert wrong.headers["ratelimit"] == '"login";r=4;t=180'
        assert wrong.headers["ratelimit-policy"] == '"ip";q=100;w=60, "login";q=5;w=900'
        store.calls.clear()
        ok = await attempt(client, "hunter2")
        assert store.calls == [(2, 1), (1, -1)]  # the give-back after the 200
        assert ok.headers["ratelimit"] == '"login";r=4;t=180'
        # The request-counted rule took one token per request, failures or not.
        assert (await client.get("/api/other")).headers["x-ratelimit-remaining"] == "97"


async def test_concurrent_attempts_never_outnumber_the_tokens(clock: FakeClock) -> None:
    """Each attempt holds its token while the app checks the password: with two left,
    twenty concurrent wrong attempts reach the app twice, not twenty times."""
    import anyio

    checked = 0
    release = anyio.Event()

    async def slow_login(scope: Scope, receive: Receive, send: Send) -> None:
        nonlocal checked
        checked += 1
        await release.wait()
        await send({"type": "http.response.start", "status": 401, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    rules = [Rule("POST /api/login", "2/15minutes", count="failures", name="login")]
    limiter = RateLimitMiddleware(slow_login, rules=rules, store=MemoryStore(clock=clock))
    transport = httpx.ASGITransport(app=ErrorMiddleware(limiter), client=("203.0.113.7", 1))
    statuses: list[int] = []
    refused_all = anyio.Event()
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:

        async def one() -> None:
            statuses.append((await attempt(client, "guess")).status_code)
            if statuses.count(429) == 18:
                refused_all.set()

        async with anyio.create_task_group() as group:
            for _ in range(20):
                group.start_soon(one)
            # The 18 refused answer while the two admitted are still in the app.
            with anyio.fail_after(5):
                await refused_all.wait()
            assert checked == 2
            release.set()
    assert checked == 2
    assert sorted(statuses) == [401, 401] + [429] * 18


async def test_shadow_sends_headers_and_counts_but_never_refuses(clock: FakeClock) -> None:
    rules = [Rule("GET /api/items", "2/minute", shadow=True)]
    asgi, limiter = wrap(rules, MemoryStore(clock=clock))
    transport = httpx.ASGITransport(app=asgi, client=("203.0.113.7", 1))
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        answers = [await client.get("/api/items") for _ in range(5)]
    assert [a.status_code for a in answers] == [200] * 5
    assert [a.headers["x-ratelimit-remaining"] for a in answers] == ["1", "0", "0", "0", "0"]
    assert answers[-1].headers["ratelimit"] == '"ip-items";r=0;t=60'
    assert "retry-after" not in answers[-1].headers
    assert limiter.shadow_refusals == {"ip-items": 3}


async def test_a_refusing_shadow_rule_holds_back_no_enforced_rule(clock: FakeClock) -> None:
    rules = [
        Rule("GET /api/items", "1/minute", shadow=True, name="new"),
        Rule("GET /api/items", "3/minute", name="old"),
    ]
    asgi, limiter = wrap(rules, MemoryStore(clock=clock))
    transport = httpx.ASGITransport(app=asgi, client=("203.0.113.7", 1))
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        answers = [await client.get("/api/items") for _ in range(4)]
    assert [a.status_code for a in answers] == [200, 200, 200, 429]
    # The enforced rule is taken even while the shadow rule would refuse.
    assert [a.headers["ratelimit"] for a in answers[:3]] == [
        '"new";r=0;t=60',
        '"new";r=0;t=60',
        '"new";r=0;t=60',
    ]
    # A refusal reports the enforced rule's wait, never the shadow rule's.
    assert answers[3].headers["retry-after"] == "20"
    assert limiter.shadow_refusals == {"new": 2}


async def test_options_from_the_config(clock: FakeClock) -> None:
    config = ArmorConfig.from_dict(
        {
            "rate_limit": [
                {"route": "POST /api/login", "rate": "2/minute", "count": "failures"},
                {"route": "GET /api/items", "rate": "1/minute", "shadow": True},
            ]
        }
    )
    armored = armor(login, config, store=MemoryStore(clock=clock))
    transport = httpx.ASGITransport(app=armored, client=("203.0.113.7", 1))
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        assert [(await attempt(client, "x")).status_code for _ in range(3)] == [401, 401, 429]
        items = [(await client.get("/api/items")).status_code for _ in range(3)]
    assert items == [200, 200, 200]


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"count": "errors"}, "rate_limit[0].count: Invalid enum value 'errors'"),
        ({"shadow": "yes"}, "rate_limit[0].shadow: Expected `bool`"),
    ],
)
def test_bad_options_name_the_entry(entry: dict[str, Any], message: str) -> None:
    from asgi_armor.errors import ConfigError

    with pytest.raises(ConfigError) as info:
        ArmorConfig.from_dict({"rate_limit": [{"route": "* /a", "rate": "1/s", **entry}]})
    assert message in str(info.value)


async def test_failures_and_shadow_on_redis(redis_store: RedisStore) -> None:
    rules = [
        Rule("POST /api/login", "3/hour", count="failures", name="login"),
        Rule("GET /api/items", "1/hour", shadow=True, name="items"),
    ]
    asgi, limiter = wrap(rules, redis_store)
    transport = httpx.ASGITransport(app=asgi, client=("203.0.113.7", 1))
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        statuses = [(await attempt(client, p)).status_code for p in ("hunter2", "x", "hunter2")]
        statuses += [(await attempt(client, "x")).status_code for _ in range(3)]
        assert statuses == [200, 401, 200, 401, 401, 429]
        items = [await client.get("/api/items") for _ in range(3)]
    assert [i.status_code for i in items] == [200, 200, 200]
    assert [i.headers["x-ratelimit-remaining"] for i in items] == ["0", "0", "0"]
    assert limiter.shadow_refusals == {"items": 2}


@pytest.fixture
async def redis_store(
    asyncio_only: None, redis_url: str, redis_prefix: str
) -> AsyncIterator[RedisStore]:
    from asgi_armor.stores.redis import RedisStore

    store = RedisStore.from_url(redis_url, prefix=redis_prefix)
    yield store
    await store.aclose()


def test_describe_shows_the_options() -> None:
    from asgi_armor.stack import describe

    config = ArmorConfig.from_dict(
        {
            "rate_limit": [
                {"route": "POST /api/login", "rate": "5/15minutes", "count": "failures"},
                {"route": "GET /api/items", "rate": "1/minute", "shadow": True},
            ]
        }
    )
    lines = describe(config).splitlines()
    assert "POST /api/login  rate limit   5/15minutes per ip, failures only" in lines
    assert "GET /api/items   rate limit   1/minute per ip, shadow" in lines
