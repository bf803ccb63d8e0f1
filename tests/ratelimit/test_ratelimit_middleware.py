"""RateLimitMiddleware through httpx: the seed's four layers, exact headers, honest
Retry-After, key fallbacks, proxies, exemptions and the store failure policy."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import httpx
import msgspec
import pytest

from asgi_armor._asgi import Message, Receive, Scope, Send, get_header
from asgi_armor.errors import ConfigError, ErrorMiddleware
from asgi_armor.ratelimit import RateLimitMiddleware, Rule
from asgi_armor.stores.base import BucketSpec, StoreError
from asgi_armor.stores.memory import MemoryStore

if TYPE_CHECKING:
    from tests.conftest import FakeClock

pytestmark = pytest.mark.anyio

WALL = 1_700_000_000.0
RATE_HEADERS = (
    "x-ratelimit-limit",
    "x-ratelimit-remaining",
    "x-ratelimit-reset",
    "ratelimit-policy",
    "ratelimit",
)
TOKENS = {"alice-token": "alice", "bob-token": "bob", "ip-token": "1.2.3.4"}


async def app(scope: Scope, receive: Receive, send: Send) -> None:
    """Answers 200 with its own header, so header merging can be checked."""
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"application/json"), (b"x-app", b"1")],
        }
    )
    await send({"type": "http.response.body", "body": b'{"ok":true}'})


def identify(scope: Scope) -> str | None:
    raw = get_header(scope, b"authorization")
    if raw is None or not raw.startswith(b"Bearer "):
        return None
    return TOKENS.get(raw[7:].decode())


def seed_rules() -> list[Rule]:
    return [
        Rule("* /api/*", "1000/minute", "ip", name="global"),
        Rule("POST /api/expensive-operation", "10/minute", "ip", name="expensive"),
        Rule("POST /api/send-email", "5/hour", "user", name="email"),
        Rule("POST /api/projects/{project_id}/builds", "20/hour", "path:project_id", name="builds"),
    ]


def wrap(clock: FakeClock, **kwargs: Any) -> ErrorMiddleware:
    kwargs.setdefault("rules", seed_rules())
    kwargs.setdefault("store", MemoryStore(clock=clock))
    kwargs.setdefault("identify", identify)
    kwargs.setdefault("exempt", ["GET /healthz"])
    return ErrorMiddleware(RateLimitMiddleware(app, wall_clock=lambda: WALL, **kwargs))


def client_for(asgi: Any, ip: str = "1.2.3.4") -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=asgi, client=(ip, 123))
    return httpx.AsyncClient(transport=transport, base_url="http://t")


@pytest.fixture
async def client(clock: FakeClock) -> AsyncIterator[httpx.AsyncClient]:
    async with client_for(wrap(clock)) as c:
        yield c


def rate_headers(response: httpx.Response) -> dict[str, str]:
    return {name: response.headers[name] for name in RATE_HEADERS if name in response.headers}


POLICY_EXPENSIVE = '"global";q=1000;w=60, "expensive";q=10;w=60'


async def test_expensive_operation_exact_limit_headers_and_envelope(
    client: httpx.AsyncClient, clock: FakeClock
) -> None:
    first = await client.post("/api/expensive-operation")
    assert first.status_code == 200
    assert first.json() == {"ok": True}
    assert first.headers["x-app"] == "1"
    assert rate_headers(first) == {
        "x-ratelimit-limit": "10",
        "x-ratelimit-remaining": "9",
        "x-ratelimit-reset": str(int(WALL) + 6),
        "ratelimit-policy": POLICY_EXPENSIVE,
        "ratelimit": '"expensive";r=9;t=6',
    }
    for _ in range(9):
        last = await client.post("/api/expensive-operation")
        assert last.status_code == 200
    assert rate_headers(last)["ratelimit"] == '"expensive";r=0;t=60'

    denied = await client.post("/api/expensive-operation")
    assert denied.status_code == 429
    body = denied.json()
    assert body == {
        "error": "rate_limited",
        "message": "Rate limit exceeded",
        "details": [],
        "request_id": denied.headers["x-request-id"],
    }
    assert body["request_id"].startswith("req_")
    assert denied.headers["retry-after"] == "6"
    assert denied.headers["content-type"] == "application/json"
    assert rate_headers(denied) == {
        "x-ratelimit-limit": "10",
        "x-ratelimit-remaining": "0",
        "x-ratelimit-reset": str(int(WALL) + 60),
        "ratelimit-policy": POLICY_EXPENSIVE,
        "ratelimit": '"expensive";r=0;t=60',
    }
    assert "x-app" not in denied.headers


async def test_retry_after_is_honest(client: httpx.AsyncClient, clock: FakeClock) -> None:
    for _ in range(10):
        await client.post("/api/expensive-operation")
    denied = await client.post("/api/expensive-operation")
    wait = int(denied.headers["retry-after"])
    clock.advance(wait - 0.5)
    assert (await client.post("/api/expensive-operation")).status_code == 429
    clock.advance(0.5)  # exactly Retry-After seconds after the 429
    assert (await client.post("/api/expensive-operation")).status_code == 200
    assert (await client.post("/api/expensive-operation")).status_code == 429


async def test_retry_after_rounds_up_fractions(client: httpx.AsyncClient, clock: FakeClock) -> None:
    for _ in range(10):
        await client.post("/api/expensive-operation")
    clock.advance(1.25)
    denied = await client.post("/api/expensive-operation")
    assert denied.headers["retry-after"] == "5"  # 4.75 s, rounded up
    clock.advance(5)
    assert (await client.post("/api/expensive-operation")).status_code == 200


async def test_denied_layer_consumes_nothing_in_the_others(client: httpx.AsyncClient) -> None:
    for _ in range(10):
        await client.post("/api/expensive-operation")
    for _ in range(5):
        assert (await client.post("/api/expensive-operation")).status_code == 429
    other = await client.get("/api/other")
    # 10 allowed expensive requests + this one: the 5 denied ones took nothing.
    assert rate_headers(other) == {
        "x-ratelimit-limit": "1000",
        "x-ratelimit-remaining": "989",
        "x-ratelimit-reset": str(int(WALL) + 1),  # 11 * 0.06 s, rounded up
        "ratelimit-policy": '"global";q=1000;w=60',
        "ratelimit": '"global";r=989;t=1',
    }


async def test_global_limit_per_ip(clock: FakeClock) -> None:
    asgi = wrap(clock, rules=[Rule("* /api/*", "1000/minute", "ip", name="global")])
    async with client_for(asgi) as client:
        for n in range(1000):
            response = await client.get(f"/api/items/{n}")
            assert response.status_code == 200
        assert response.headers["ratelimit"] == '"global";r=0;t=60'
        denied = await client.get("/api/items")
        assert denied.status_code == 429
        assert denied.headers["retry-after"] == "1"  # 0.06 s, rounded up
    async with client_for(asgi, ip="5.6.7.8") as other:
        assert (await other.get("/api/items")).status_code == 200


async def test_send_email_per_user(client: httpx.AsyncClient) -> None:
    alice = {"Authorization": "Bearer alice-token"}
    for n in range(5):
        response = await client.post("/api/send-email", headers=alice)
        assert response.status_code == 200
        assert response.headers["ratelimit"] == f'"email";r={4 - n};t={720 * (n + 1)}'
    denied = await client.post("/api/send-email", headers=alice)
    assert denied.status_code == 429
    assert denied.headers["retry-after"] == "720"
    assert denied.headers["ratelimit-policy"] == '"global";q=1000;w=60, "email";q=5;w=3600'
    bob = await client.post("/api/send-email", headers={"Authorization": "Bearer bob-token"})
    assert bob.status_code == 200


async def test_anonymous_falls_back_to_ip_without_colliding_with_users(clock: FakeClock) -> None:
    asgi = wrap(clock)
    async with client_for(asgi) as client:
        for _ in range(5):
            assert (await client.post("/api/send-email")).status_code == 200
        assert (await client.post("/api/send-email")).status_code == 429
        # A bad token is anonymous too: no bypass.
        bad = {"Authorization": "Bearer nope"}
        assert (await client.post("/api/send-email", headers=bad)).status_code == 429
        # A user whose id equals the address has a bucket of its own.
        named_like_ip = {"Authorization": "Bearer ip-token"}
        assert (await client.post("/api/send-email", headers=named_like_ip)).status_code == 200
        alice = {"Authorization": "Bearer alice-token"}
        assert (await client.post("/api/send-email", headers=alice)).status_code == 200
    async with client_for(asgi, ip="9.9.9.9") as elsewhere:
        assert (await elsewhere.post("/api/send-email")).status_code == 200


async def test_builds_per_project(clock: FakeClock) -> None:
    asgi = wrap(clock)
    async with client_for(asgi) as client:
        for _ in range(20):
            assert (await client.post("/api/projects/a/builds")).status_code == 200
        denied = await client.post("/api/projects/a/builds")
        assert denied.status_code == 429
        assert denied.headers["retry-after"] == "180"
        assert denied.headers["ratelimit"] == '"builds";r=0;t=3600'
        assert (await client.post("/api/projects/b/builds")).status_code == 200
    # The key is the project, not the caller.
    async with client_for(asgi, ip="8.8.8.8") as other:
        assert (await other.post("/api/projects/a/builds")).status_code == 429


async def test_spoofed_forwarded_for_from_untrusted_peer_is_ignored(clock: FakeClock) -> None:
    async with client_for(wrap(clock)) as client:
        for n in range(10):
            spoof = {"X-Forwarded-For": f"10.0.0.{n}", "Forwarded": f"for=10.1.0.{n}"}
            assert (await client.post("/api/expensive-operation", headers=spoof)).status_code == 200
        spoof = {"X-Forwarded-For": "10.0.0.99"}
        assert (await client.post("/api/expensive-operation", headers=spoof)).status_code == 429


async def test_forwarded_for_from_trusted_proxy_is_used(clock: FakeClock) -> None:
    asgi = wrap(clock, trusted_proxies=["1.2.3.0/24"])
    async with client_for(asgi) as client:
        for _ in range(10):
            xff = {"X-Forwarded-For": "7.7.7.7"}
            assert (await client.post("/api/expensive-operation", headers=xff)).status_code == 200
        xff = {"X-Forwarded-For": "7.7.7.7"}
        assert (await client.post("/api/expensive-operation", headers=xff)).status_code == 429
        xff = {"X-Forwarded-For": "7.7.7.8"}
        assert (await client.post("/api/expensive-operation", headers=xff)).status_code == 200


async def test_exempt_and_unmatched_routes_are_untouched(clock: FakeClock) -> None:
    asgi = wrap(clock, rules=[Rule("* *", "1/hour", "ip", name="all")], exempt=["GET /healthz"])
    async with client_for(asgi) as client:
        for _ in range(3):
            health = await client.get("/healthz")
            assert health.status_code == 200
            assert rate_headers(health) == {}
        assert (await client.get("/x")).status_code == 200
        assert (await client.get("/x")).status_code == 429
        assert (await client.get("/healthz/")).status_code == 200
    asgi = wrap(clock, rules=seed_rules())
    async with client_for(asgi) as client:
        plain = await client.get("/not-api")
        assert plain.status_code == 200
        assert rate_headers(plain) == {}


class FailingStore:
    async def hit_buckets(
        self, keys: Sequence[str], specs: Sequence[BucketSpec], cost: int
    ) -> tuple[bool, float, list[float]]:
        raise StoreError("redis down")


async def test_store_failure_allow(clock: FakeClock) -> None:
    middleware = RateLimitMiddleware(
        app, rules=seed_rules(), store=FailingStore(), identify=identify
    )
    async with client_for(ErrorMiddleware(middleware)) as client:
        for _ in range(12):
            response = await client.post("/api/expensive-operation")
            assert response.status_code == 200
            assert rate_headers(response) == {}
    assert middleware.limiter.store_errors == 12


async def test_store_failure_deny(clock: FakeClock) -> None:
    asgi = wrap(clock, store=FailingStore(), on_store_error="deny")
    async with client_for(asgi) as client:
        response = await client.post("/api/expensive-operation")
    assert response.status_code == 503
    assert response.json() == {
        "error": "service_unavailable",
        "message": "Service temporarily unavailable",
        "details": [],
        "request_id": response.headers["x-request-id"],
    }
    assert response.headers["retry-after"] == "1"


async def test_identify_that_raises_rejects_the_request(clock: FakeClock) -> None:
    def broken(scope: Scope) -> str | None:
        raise RuntimeError("token service down")

    async with client_for(wrap(clock, identify=broken)) as client:
        response = await client.post("/api/send-email")
        assert response.status_code == 500
        assert response.json()["error"] == "internal_error"
        assert "token service" not in response.text
        # Routes without a user rule do not need the hook.
        assert (await client.post("/api/expensive-operation")).status_code == 200


async def test_headers_off(clock: FakeClock) -> None:
    asgi = wrap(clock, rules=[Rule("* /api/*", "1/minute", "ip")], headers=False)
    async with client_for(asgi) as client:
        allowed = await client.get("/api/a")
        assert rate_headers(allowed) == {}
        denied = await client.get("/api/a")
        assert denied.status_code == 429
        assert rate_headers(denied) == {}
        assert denied.headers["retry-after"] == "60"


async def test_header_and_custom_keys(clock: FakeClock) -> None:
    async def tenant(scope: Scope, params: Mapping[str, str]) -> str | None:
        raw = get_header(scope, b"x-tenant")
        return None if raw is None else raw.decode()

    def org(scope: Scope, params: Mapping[str, str]) -> str | None:
        return params["org"]

    rules = [
        Rule("GET /k/*", "2/minute", "header:X-Api-Key", name="apikey"),
        Rule("GET /t", "2/minute", tenant, name="tenant"),
        Rule("GET /o/{org}", "1/minute", org, name="org"),
    ]
    async with client_for(wrap(clock, rules=rules)) as client:
        key_a = {"X-Api-Key": "a" * 500}  # long values are hashed, still one bucket
        assert [(await client.get("/k/x", headers=key_a)).status_code for _ in range(3)] == [
            200,
            200,
            429,
        ]
        assert (await client.get("/k/x", headers={"X-Api-Key": "b"})).status_code == 200
        # No key: the address; it cannot take over a key named like it.
        assert (await client.get("/k/x")).status_code == 200
        assert (await client.get("/k/x", headers={"X-Api-Key": "ip:1.2.3.4"})).status_code == 200
        assert (await client.get("/k/x")).status_code == 200
        assert (await client.get("/k/x")).status_code == 429

        codes = [(await client.get("/t", headers={"X-Tenant": "t1"})).status_code for _ in range(3)]
        assert codes == [200, 200, 429]
        assert (await client.get("/t")).status_code == 200
        assert [(await client.get("/o/acme")).status_code for _ in range(2)] == [200, 429]
        assert (await client.get("/o/other")).status_code == 200


async def test_rule_cost(clock: FakeClock) -> None:
    rules = [
        Rule("* /api/*", "10/minute", "ip", name="all"),
        Rule("POST /api/report", "10/minute", "ip", name="reports", cost=5),
    ]
    async with client_for(wrap(clock, rules=rules)) as client:
        first = await client.post("/api/report")
        assert first.headers["ratelimit"] == '"reports";r=5;t=30'
        assert (await client.post("/api/report")).status_code == 200
        denied = await client.post("/api/report")
        assert denied.status_code == 429
        assert denied.headers["retry-after"] == "30"
        cheap = await client.get("/api/cheap")
        assert cheap.headers["ratelimit"] == '"all";r=7;t=18'


async def test_lifespan_passes_and_websocket_handshakes_are_limited(clock: FakeClock) -> None:
    seen: list[str] = []

    async def inner(scope: Scope, receive: Receive, send: Send) -> None:
        seen.append(scope["type"])

    middleware = RateLimitMiddleware(inner, rules=[Rule("* *", "1/hour", "ip")])

    async def receive() -> Message:
        return {"type": "lifespan.startup"}

    sent: list[Message] = []

    async def send(message: Message) -> None:
        sent.append(message)

    for _ in range(3):
        await middleware({"type": "lifespan"}, receive, send)
    assert seen == ["lifespan"] * 3
    # A websocket handshake is a GET of its path: the rule limits connections.
    for _ in range(3):
        scope = {"type": "websocket", "path": "/", "headers": [], "client": ("192.0.2.1", 1)}
        await middleware(scope, receive, send)
    assert seen == ["lifespan"] * 3 + ["websocket"]
    assert [m["type"] for m in sent] == ["websocket.close"] * 2
    assert {m["code"] for m in sent} == {1013}


def test_config_errors() -> None:
    rule = Rule("* /api/*", "1/s", "ip", name="same")
    with pytest.raises(ConfigError, match="rule 'same': two rules have this name"):
        RateLimitMiddleware(app, rules=[rule, Rule("* /x", "2/s", "ip", name="same")])
    with pytest.raises(ConfigError, match="rule 'u': key 'user' needs an identify hook"):
        RateLimitMiddleware(app, rules=[Rule("* /x", "1/s", "user", name="u")])
    with pytest.raises(ConfigError, match="rules\\[0\\]"):
        RateLimitMiddleware(app, rules=[("* /x", "1/s")])  # type: ignore[list-item]
    with pytest.raises(ConfigError, match="route 'GET healthz'"):
        RateLimitMiddleware(app, rules=[rule], exempt=["GET healthz"])
    with pytest.raises(ConfigError, match="trusted_proxies\\[0\\]"):
        RateLimitMiddleware(app, rules=[rule], trusted_proxies=["not-an-ip"])
    with pytest.raises(ConfigError, match="on_store_error"):
        RateLimitMiddleware(app, rules=[rule], on_store_error="fail")  # type: ignore[arg-type]


def test_repr_and_defaults() -> None:
    middleware = RateLimitMiddleware(app, rules=[Rule("* /x", "1/s", "ip", name="x")])
    assert isinstance(middleware.store, MemoryStore)
    assert "name='x'" in repr(middleware)
    assert msgspec.json.encode(middleware.rules[0].rate) == b'{"limit":1,"period":1.0}'


async def test_match_cache_stays_bounded(clock: FakeClock, monkeypatch: pytest.MonkeyPatch) -> None:
    from asgi_armor.ratelimit import middleware as module

    monkeypatch.setattr(module, "_MATCH_CACHE", 4)
    inner = RateLimitMiddleware(
        app, rules=seed_rules(), store=MemoryStore(clock=clock), identify=identify
    )
    async with client_for(ErrorMiddleware(inner)) as client:
        for n in range(10):
            response = await client.post(f"/api/projects/p{n}/builds")
            assert response.headers["ratelimit"] == '"builds";r=19;t=180'
            assert len(inner._matches) <= 4
        for _ in range(19):
            await client.post("/api/projects/p0/builds")
        assert (await client.post("/api/projects/p0/builds")).status_code == 429
        long_path = "/api/projects/" + "x" * 300 + "/builds"
        assert (await client.post(long_path)).status_code == 200
        assert all(len(path) <= 256 for _, path in inner._matches)


class RecordingStore:
    def __init__(self, inner: MemoryStore) -> None:
        self.inner = inner
        self.calls: list[list[str]] = []

    async def hit_buckets(
        self, keys: Sequence[str], specs: Sequence[BucketSpec], cost: int
    ) -> tuple[bool, float, list[float]]:
        self.calls.append(list(keys))
        return await self.inner.hit_buckets(keys, specs, cost)


async def test_one_store_call_per_request_with_namespaced_keys(clock: FakeClock) -> None:
    async def async_identify(scope: Scope) -> str | None:
        return identify(scope)

    store = RecordingStore(MemoryStore(clock=clock))
    async with client_for(wrap(clock, store=store, identify=async_identify)) as client:
        await client.post("/api/send-email", headers={"Authorization": "Bearer alice-token"})
        await client.post("/api/send-email")
        await client.post("/api/projects/p-1/builds")
        await client.post("/api/expensive-operation")
        await client.get("/healthz")
        await client.get("/elsewhere")
    assert store.calls == [
        ["rl:global:1.2.3.4", "rl:email:u:alice"],
        ["rl:global:1.2.3.4", "rl:email:ip:1.2.3.4"],
        ["rl:global:1.2.3.4", "rl:builds:p-1"],
        ["rl:global:1.2.3.4", "rl:expensive:1.2.3.4"],
    ]


LOGIN = [Rule("POST /login", "3/minute", "ip", name="login")]


async def login_statuses(asgi: Any, addresses: Sequence[str]) -> list[int]:
    found = []
    for address in addresses:
        async with client_for(asgi, ip=address) as client:
            found.append((await client.post("/login")).status_code)
    return found


async def test_ipv6_clients_of_one_64_share_one_bucket(clock: FakeClock) -> None:
    # One host usually holds a whole /64: per-address buckets would give it 2**64 tries.
    asgi = wrap(clock, rules=LOGIN)
    same_64 = [f"2001:db8:1:2:{index:x}::{index + 1:x}" for index in range(20)]
    assert (await login_statuses(asgi, same_64)).count(200) == 3
    assert await login_statuses(asgi, ["2001:db8:1:3::1"]) == [200]


async def test_ipv6_prefix_is_configurable(clock: FakeClock) -> None:
    per_address = wrap(clock, rules=LOGIN, ipv6_prefix=128)
    addresses = [f"2001:db8:1:2::{index + 1:x}" for index in range(20)]
    assert await login_statuses(per_address, addresses) == [200] * 20
    per_48 = wrap(clock, rules=LOGIN, ipv6_prefix=48)
    addresses = [f"2001:db8:1:{index:x}::1" for index in range(5)]
    assert await login_statuses(per_48, addresses) == [200] * 3 + [429] * 2


async def test_ipv4_mapped_client_shares_the_ipv4_bucket(clock: FakeClock) -> None:
    # A dual-stack socket reports IPv4 clients as ::ffff:a.b.c.d; a custom client_ip
    # may return that form too.
    asgi = wrap(clock, rules=LOGIN)
    assert await login_statuses(asgi, ["1.2.3.4", "::ffff:1.2.3.4", "::FFFF:102:304"]) == [200] * 3
    assert await login_statuses(asgi, ["1.2.3.4"]) == [429]
    raw = wrap(clock, rules=LOGIN, client_ip=lambda scope: "::ffff:5.6.7.8")
    assert await login_statuses(raw, ["9.9.9.9"] * 4) == [200] * 3 + [429]
    assert await login_statuses(wrap(clock, rules=LOGIN), ["5.6.7.8"]) == [200]


async def test_ip_fallback_of_other_keys_groups_ipv6_too(clock: FakeClock) -> None:
    store = RecordingStore(MemoryStore(clock=clock))
    rules = [Rule("POST /login", "3/minute", "user", name="login")]
    asgi = wrap(clock, rules=rules, store=store)
    assert await login_statuses(asgi, ["2001:db8:1:2::1", "2001:db8:1:2::2"]) == [200, 200]
    assert store.calls[0] == store.calls[1]


@pytest.mark.parametrize("prefix", [0, 129, -1, True])
def test_bad_ipv6_prefix_names_the_setting(prefix: int) -> None:
    with pytest.raises(ConfigError, match=r"^ipv6_prefix: "):
        RateLimitMiddleware(app, rules=LOGIN, ipv6_prefix=prefix)
