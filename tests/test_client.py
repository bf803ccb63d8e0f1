"""asgi_armor.client: retries, keys, pacing, breakers and signing, on a fake clock.

The inner transport is ``httpx.MockTransport`` (httpx's own test transport) driven by a
script of answers and errors; ``sleep`` advances the fake clock instead of waiting. Every
behaviour runs through both transports (``flavour``) on asyncio and trio.
"""

from __future__ import annotations

import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from email.utils import formatdate
from typing import Any

import anyio
import httpx
import pytest

from asgi_armor.breaker import BreakerState
from asgi_armor.client import (
    ArmorTransport,
    CircuitOpenError,
    SyncArmorTransport,
    parse_ratelimit,
    parse_retry_after,
)
from asgi_armor.errors import ConfigError
from asgi_armor.signing import HexHmac, StandardWebhooks, Stripe, verify
from tests.conftest import FakeClock

pytestmark = pytest.mark.anyio

URL = "http://api.test/things"
WALL = 1_700_000_000.0

Outcome = httpx.Response | type[Exception] | Callable[[httpx.Request], httpx.Response]


@dataclass
class Seen:
    """One request as the inner transport received it."""

    method: str
    url: str
    headers: httpx.Headers
    body: bytes
    at: float


@dataclass
class Script:
    """The inner transport's behaviour: one outcome per request, in order."""

    clock: FakeClock
    outcomes: list[Outcome] = field(default_factory=list)
    seen: list[Seen] = field(default_factory=list)

    def __call__(self, request: httpx.Request) -> httpx.Response:
        body = request.read()
        self.seen.append(
            Seen(request.method, str(request.url), request.headers.copy(), body, self.clock())
        )
        if not self.outcomes:
            return httpx.Response(200, json={"ok": True})
        outcome = self.outcomes.pop(0)
        if isinstance(outcome, type):
            raise outcome("scripted failure")  # type: ignore[call-arg]
        if isinstance(outcome, httpx.Response):
            return outcome
        return outcome(request)


@dataclass
class Harness:
    """A transport of one flavour over a script, with a fake clock and a recording sleep."""

    flavour: str
    clock: FakeClock
    script: Script
    transport: ArmorTransport | SyncArmorTransport
    waits: list[float]

    async def request(self, method: str, url: str = URL, **kwargs: Any) -> httpx.Response:
        if isinstance(self.transport, ArmorTransport):
            async with httpx.AsyncClient(transport=self.transport) as client:
                response = await client.request(method, url, **kwargs)
                await response.aread()
                return response
        with httpx.Client(transport=self.transport) as client:
            response = client.request(method, url, **kwargs)
            response.read()
            return response

    def stream_body(self, chunks: list[bytes]) -> Any:
        """A one-shot streaming body of the flavour's kind (a generator)."""
        if self.flavour == "async":

            async def agen() -> AsyncIterator[bytes]:
                for chunk in chunks:
                    yield chunk

            return agen()

        def gen() -> Iterator[bytes]:
            yield from chunks

        return gen()


@pytest.fixture(params=["async", "sync"])
def flavour(request: pytest.FixtureRequest) -> str:
    return request.param  # type: ignore[no-any-return]


@pytest.fixture
def make(flavour: str, clock: FakeClock) -> Callable[..., Harness]:
    def build(*outcomes: Outcome, **options: Any) -> Harness:
        script = Script(clock, list(outcomes))
        waits: list[float] = []

        def sleep(seconds: float) -> None:
            waits.append(seconds)
            clock.advance(seconds)

        async def asleep(seconds: float) -> None:
            sleep(seconds)

        options.setdefault("random", lambda: 0.5)
        options.setdefault("wall_clock", lambda: WALL + clock())
        transport: ArmorTransport | SyncArmorTransport
        if flavour == "async":
            transport = ArmorTransport(
                httpx.MockTransport(script), clock=clock, sleep=asleep, **options
            )
        else:
            transport = SyncArmorTransport(
                httpx.MockTransport(script), clock=clock, sleep=sleep, **options
            )
        return Harness(flavour, clock, script, transport, waits)

    return build


def answer(status: int, headers: dict[str, str] | None = None) -> httpx.Response:
    return httpx.Response(status, headers=headers, json={"status": status})


# -- packaging -----------------------------------------------------------------------


def run_python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )


def test_importing_asgi_armor_does_not_import_httpx() -> None:
    result = run_python("import sys, asgi_armor; print('httpx' in sys.modules)")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"


def test_without_httpx_the_import_error_says_what_to_install() -> None:
    result = run_python(
        "import sys; sys.modules['httpx'] = None\n"
        "try:\n"
        "    from asgi_armor.client import ArmorTransport\n"
        "except ImportError as exc:\n"
        "    print(exc)\n"
    )
    assert result.returncode == 0, result.stderr
    assert "pip install 'asgi-armor[client]'" in result.stdout


# -- retries -------------------------------------------------------------------------


@pytest.mark.parametrize("status", [429, 502, 503, 504])
async def test_retryable_answers_are_retried(make: Callable[..., Harness], status: int) -> None:
    h = make(answer(status), answer(status))
    response = await h.request("GET")
    assert response.status_code == 200
    assert len(h.script.seen) == 3
    # random() = 0.5: half of backoff * 2**n, n = 0, 1.
    assert h.waits == [0.25, 0.5]


@pytest.mark.parametrize("status", [400, 404, 409, 422, 500, 501])
async def test_other_answers_are_returned_as_they_are(
    make: Callable[..., Harness], status: int
) -> None:
    h = make(answer(status))
    response = await h.request("GET")
    assert response.status_code == status
    assert len(h.script.seen) == 1
    assert h.waits == []


async def test_after_the_last_retry_the_last_answer_is_returned(
    make: Callable[..., Harness],
) -> None:
    h = make(*[answer(503, {"x-attempt": str(n)}) for n in range(5)], retries=2)
    response = await h.request("GET")
    assert response.status_code == 503
    assert response.headers["x-attempt"] == "2"
    assert len(h.script.seen) == 3


async def test_retries_zero_sends_once(make: Callable[..., Harness]) -> None:
    h = make(answer(503), retries=0)
    assert (await h.request("GET")).status_code == 503
    assert len(h.script.seen) == 1


async def test_full_jitter_stays_within_the_exponential_ceiling(
    make: Callable[..., Harness],
) -> None:
    draws = iter([0.0, 0.999, 0.5, 0.999, 0.25, 0.999])
    h = make(
        *[answer(503)] * 6,
        retries=6,
        backoff=1.0,
        max_wait=10.0,
        random=lambda: next(draws),
        fail_max=None,
    )
    await h.request("GET")
    ceilings = [1.0, 2.0, 4.0, 8.0, 10.0, 10.0]  # backoff * 2**n, capped by max_wait
    expected = [d * c for d, c in zip([0.0, 0.999, 0.5, 0.999, 0.25, 0.999], ceilings, strict=True)]
    assert h.waits == pytest.approx(expected)
    assert all(0 <= w < c for w, c in zip(h.waits, ceilings, strict=True))


async def test_retry_after_seconds_is_a_floor(make: Callable[..., Harness]) -> None:
    h = make(answer(429, {"Retry-After": "7"}), answer(503, {"Retry-After": "3"}))
    start = h.clock()
    assert (await h.request("GET")).status_code == 200
    assert h.waits == [7.0, 3.0]
    # Never sooner: the retries reached the server at least Retry-After later.
    assert h.script.seen[1].at - h.script.seen[0].at >= 7
    assert h.script.seen[2].at - h.script.seen[1].at >= 3
    assert h.clock() - start == 10


async def test_jitter_longer_than_retry_after_wins(make: Callable[..., Harness]) -> None:
    h = make(answer(503, {"Retry-After": "1"}), backoff=8.0, random=lambda: 0.5)
    await h.request("GET")
    assert h.waits == [4.0]


async def test_retry_after_http_date_is_read_against_the_server_date(
    make: Callable[..., Harness],
) -> None:
    # The server's clock is an hour behind ours: only the difference of its two dates counts.
    server_now = WALL - 3600
    headers = {
        "Date": formatdate(server_now, usegmt=True),
        "Retry-After": formatdate(server_now + 12, usegmt=True),
    }
    h = make(answer(503, headers))
    await h.request("GET")
    assert h.waits == [12.0]


async def test_retry_after_beyond_max_wait_returns_the_answer_at_once(
    make: Callable[..., Harness],
) -> None:
    h = make(answer(429, {"Retry-After": "120"}), max_wait=30.0)
    response = await h.request("GET")
    assert response.status_code == 429
    assert response.headers["retry-after"] == "120"
    assert h.waits == []
    assert len(h.script.seen) == 1


async def test_budget_stops_the_retries(make: Callable[..., Harness]) -> None:
    h = make(*[answer(503, {"Retry-After": "3"})] * 5, budget=7.0, retries=10)
    response = await h.request("GET")
    assert response.status_code == 503
    # 0 + 3 + 3 = 6 s spent; one more 3 s wait would end at 9 s, past the 7 s budget.
    assert h.waits == [3.0, 3.0]
    assert len(h.script.seen) == 3


@pytest.mark.parametrize("error", [httpx.ReadError, httpx.RemoteProtocolError, httpx.ReadTimeout])
async def test_connection_errors_are_retried_for_idempotent_methods(
    make: Callable[..., Harness], error: type[Exception]
) -> None:
    h = make(error, error)
    assert (await h.request("PUT", json={"a": 1})).status_code == 200
    assert [s.body for s in h.script.seen] == [b'{"a":1}'] * 3


async def test_the_last_connection_error_is_raised(make: Callable[..., Harness]) -> None:
    h = make(httpx.ReadError, httpx.ReadError, httpx.ReadError, retries=2)
    with pytest.raises(httpx.ReadError):
        await h.request("GET")
    assert len(h.script.seen) == 3


async def test_unknown_errors_are_not_retried(make: Callable[..., Harness]) -> None:
    h = make(httpx.UnsupportedProtocol)
    with pytest.raises(httpx.UnsupportedProtocol):
        await h.request("GET")
    assert len(h.script.seen) == 1


# -- unsafe methods and idempotency keys ---------------------------------------------


@pytest.mark.parametrize(
    "error", [httpx.ReadError, httpx.WriteError, httpx.RemoteProtocolError, httpx.ReadTimeout]
)
async def test_post_without_key_is_not_repeated_after_it_may_have_arrived(
    make: Callable[..., Harness], error: type[Exception]
) -> None:
    h = make(error)
    with pytest.raises(error):
        await h.request("POST", json={"amount": 1})
    assert len(h.script.seen) == 1


@pytest.mark.parametrize("status", [429, 503])
async def test_post_without_key_is_not_repeated_after_an_answer(
    make: Callable[..., Harness], status: int
) -> None:
    h = make(answer(status))
    assert (await h.request("PATCH", json={})).status_code == status
    assert len(h.script.seen) == 1


@pytest.mark.parametrize("error", [httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout])
async def test_post_without_key_is_retried_when_it_never_left(
    make: Callable[..., Harness], error: type[Exception]
) -> None:
    h = make(error)
    assert (await h.request("POST", json={"amount": 1})).status_code == 200
    assert len(h.script.seen) == 2
    assert "idempotency-key" not in h.script.seen[1].headers


async def test_generated_key_is_a_uuid4_and_the_same_on_every_retry(
    make: Callable[..., Harness],
) -> None:
    h = make(httpx.RemoteProtocolError, answer(503), httpx.ReadError, idempotency_keys=True)
    response = await h.request("POST", json={"amount": 1})
    assert response.status_code == 200
    keys = {s.headers["idempotency-key"] for s in h.script.seen}
    assert len(h.script.seen) == 4
    assert len(keys) == 1
    key = keys.pop()
    assert uuid.UUID(key).version == 4
    # The caller can see which key its request was sent with.
    assert response.request.headers["idempotency-key"] == key


async def test_each_request_gets_its_own_key(make: Callable[..., Harness]) -> None:
    h = make(idempotency_keys=True)
    await h.request("POST", json={})
    await h.request("PATCH", json={})
    assert (
        h.script.seen[0].headers["idempotency-key"] != h.script.seen[1].headers["idempotency-key"]
    )


async def test_a_key_the_caller_set_is_kept(make: Callable[..., Harness]) -> None:
    h = make(httpx.ReadError, idempotency_keys=True)
    await h.request("POST", json={}, headers={"Idempotency-Key": "order-42"})
    assert [s.headers.get_list("idempotency-key") for s in h.script.seen] == [["order-42"]] * 2


async def test_a_caller_key_makes_a_post_retryable_without_idempotency_keys(
    make: Callable[..., Harness],
) -> None:
    h = make(httpx.RemoteProtocolError, answer(502))
    response = await h.request("POST", json={}, headers={"Idempotency-Key": "k1"})
    assert response.status_code == 200
    assert len(h.script.seen) == 3


@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE", "HEAD", "OPTIONS"])
async def test_keys_are_added_to_post_and_patch_only(
    make: Callable[..., Harness], method: str
) -> None:
    h = make(idempotency_keys=True)
    await h.request(method)
    assert "idempotency-key" not in h.script.seen[0].headers


async def test_the_key_header_name_is_configurable(make: Callable[..., Harness]) -> None:
    h = make(httpx.ReadError, idempotency_keys=True, idempotency_header="X-Request-Key")
    await h.request("POST", json={})
    assert len(h.script.seen) == 2
    assert h.script.seen[0].headers["x-request-key"] == h.script.seen[1].headers["x-request-key"]


async def test_409_in_progress_is_retried_with_the_key(make: Callable[..., Harness]) -> None:
    h = make(answer(409, {"Retry-After": "2"}), idempotency_keys=True)
    assert (await h.request("POST", json={})).status_code == 200
    assert h.waits == [2.0]


async def test_409_without_retry_after_or_key_is_a_real_conflict(
    make: Callable[..., Harness],
) -> None:
    h = make(answer(409), answer(409, {"Retry-After": "2"}))
    assert (await h.request("POST", json={}, headers={"Idempotency-Key": "k"})).status_code == 409
    assert (await h.request("PUT", json={})).status_code == 409
    assert len(h.script.seen) == 2


async def test_a_streaming_body_is_sent_once(make: Callable[..., Harness]) -> None:
    h = make(httpx.ReadError)
    with pytest.raises(httpx.ReadError):
        await h.request("PUT", content=h.stream_body([b"a", b"b"]))
    assert len(h.script.seen) == 1


async def test_retried_answers_are_closed(make: Callable[..., Harness]) -> None:
    closed: list[int] = []

    class Tracked(httpx.SyncByteStream, httpx.AsyncByteStream):
        def __iter__(self) -> Iterator[bytes]:
            yield b"busy"

        async def __aiter__(self) -> AsyncIterator[bytes]:
            yield b"busy"

        def close(self) -> None:
            closed.append(1)

        async def aclose(self) -> None:
            closed.append(1)

    h = make(httpx.Response(503, stream=Tracked()))
    assert (await h.request("GET")).status_code == 200
    assert closed == [1]


# -- pacing from RateLimit -----------------------------------------------------------


async def test_exhausted_quota_delays_the_next_request(make: Callable[..., Harness]) -> None:
    h = make(answer(200, {"RateLimit": '"ip";r=0;t=3'}))
    await h.request("GET")
    await h.request("GET")
    assert h.waits == [3.0]
    assert h.script.seen[1].at - h.script.seen[0].at == 3


async def test_remaining_quota_means_no_wait(make: Callable[..., Harness]) -> None:
    h = make(answer(200, {"RateLimit": '"ip";r=1;t=3'}))
    await h.request("GET")
    await h.request("GET")
    assert h.waits == []


async def test_the_longest_exhausted_policy_wins(make: Callable[..., Harness]) -> None:
    h = make(answer(200, {"RateLimit": '"a";r=0;t=2, "b";r=5;t=9, "c";r=0;t=4'}))
    await h.request("GET")
    await h.request("GET")
    assert h.waits == [4.0]


async def test_pacing_is_per_origin(make: Callable[..., Harness]) -> None:
    h = make(answer(200, {"RateLimit": '"ip";r=0;t=3'}))
    await h.request("GET", "http://a.test/")
    await h.request("GET", "http://b.test/")
    await h.request("GET", "http://a.test:80/other")
    assert h.waits == [3.0]


async def test_a_pacing_wait_beyond_max_wait_is_left_to_the_server(
    make: Callable[..., Harness],
) -> None:
    h = make(answer(200, {"RateLimit": '"day";r=0;t=86400'}), max_wait=30.0)
    await h.request("GET")
    await h.request("GET")
    assert h.waits == []
    assert len(h.script.seen) == 2


async def test_pacing_can_be_switched_off(make: Callable[..., Harness]) -> None:
    h = make(answer(200, {"RateLimit": '"ip";r=0;t=3'}), pace=False)
    await h.request("GET")
    await h.request("GET")
    assert h.waits == []


async def test_a_429s_retry_after_and_ratelimit_make_one_wait(
    make: Callable[..., Harness],
) -> None:
    h = make(answer(429, {"RateLimit": '"ip";r=0;t=5', "Retry-After": "5"}))
    assert (await h.request("GET")).status_code == 200
    assert h.waits == [5.0]


@pytest.mark.parametrize(
    "value",
    [
        "r=0;t=3",  # an early draft's Dictionary: not a List of items
        '"ip";r=0;t=3,',
        '"ip";r=0;t=-3',
        '"ip";r=0;t=3.5',
        '"ip";r=zero;t=3',
        '"ip";R=0;t=3',
        '"ip";r=0;t=3 garbage',
        '"ip;r=0;t=3',
        "\u00e9;r=0;t=3",
        ";;;",
        "",
        '"ip";r=0;t=99999999999999999999',
        '"ip";r=?0;t=3',
    ],
)
async def test_malformed_ratelimit_is_ignored(make: Callable[..., Harness], value: str) -> None:
    h = make(httpx.Response(200, headers=[(b"RateLimit", value.encode())]))
    assert (await h.request("GET")).status_code == 200
    await h.request("GET")
    assert h.waits == []


# -- header parsing ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("lines", "expected"),
    [
        ([], None),
        (['"ip";r=0;t=4'], 4.0),
        (['"ip";r=993;t=4'], 0.0),
        (['"ip";r=0;t=0'], 0.0),
        (['"a";r=0;t=2, "b";r=0;t=7'], 7.0),
        (['"a";r=0;t=2', '"b";r=0;t=7'], 7.0),  # two field lines are one List
        (["token;r=0;t=3"], 3.0),
        (['"ip";t=3;r=0;q=100;w=60'], 3.0),
        (['"ip";r=0;t=3;x="a\\"b";y=:aGk=:;z=?1;d=@1700000000;e=%"caf%c3%a9";f=1.5'], 3.0),
        (['("a" "b");r=0;t=6, "c";r=1;t=1'], 6.0),
        (['"ip";r=0'], None),  # no t: skipped, nothing usable
        (['"ip";r=0;t=3.0'], None),  # t must be an integer
        (['"ok";r=0;t=2, "bad";r=x'], 2.0),  # r=x is a token: that member is skipped
        (['"ip";r=0;t=3, '], None),
        (['"ip" r=0'], None),
        (['"ip";r=0;t=3;e=%"%ff"'], None),  # a display string that is not UTF-8
        (['"ip";r=0;t=1234567890123456'], None),  # more than 15 digits
    ],
)
def test_parse_ratelimit(lines: list[str], expected: float | None) -> None:
    assert parse_ratelimit(lines) == expected


@pytest.mark.parametrize(
    ("value", "date", "expected"),
    [
        (None, None, None),
        ("0", None, 0.0),
        ("120", None, 120.0),
        (" 5 ", None, 5.0),
        ("1.5", None, None),
        ("9" * 40, None, float("inf")),
        ("-3", None, None),
        ("soon", None, None),
        (formatdate(WALL + 30, usegmt=True), None, 30.0),
        (formatdate(WALL - 30, usegmt=True), None, 0.0),
        (formatdate(WALL + 30, usegmt=True), formatdate(WALL + 20, usegmt=True), 10.0),
        (formatdate(WALL + 30, usegmt=True), "not a date", 30.0),
        ("Sun, 06 Nov 1994 08:49:37", None, 0.0),  # no zone: GMT, long past
    ],
)
def test_parse_retry_after(value: str | None, date: str | None, expected: float | None) -> None:
    assert parse_retry_after(value, date=date, now=WALL) == expected


# -- breakers ------------------------------------------------------------------------


async def test_open_breaker_fails_at_once_without_touching_the_network(
    make: Callable[..., Harness],
) -> None:
    h = make(*[answer(500)] * 5, fail_max=5, reset_timeout=30.0)
    for _ in range(5):
        assert (await h.request("GET")).status_code == 500
    with pytest.raises(CircuitOpenError) as caught:
        await h.request("GET")
    assert caught.value.retry_after == 30.0
    assert caught.value.name == "http://api.test"
    assert len(h.script.seen) == 5
    breaker = h.transport.breaker(URL)
    assert breaker is not None
    assert breaker.state is BreakerState.OPEN

    h.clock.advance(30.0)
    assert (await h.request("GET")).status_code == 200  # the trial
    assert breaker.state is BreakerState.CLOSED
    assert len(h.script.seen) == 6


async def test_connection_errors_count_against_the_breaker(make: Callable[..., Harness]) -> None:
    h = make(*[httpx.ConnectError] * 3, fail_max=3, retries=0)
    for _ in range(3):
        with pytest.raises(httpx.ConnectError):
            await h.request("GET")
    with pytest.raises(CircuitOpenError):
        await h.request("GET")
    assert len(h.script.seen) == 3


async def test_4xx_and_local_errors_do_not_count(make: Callable[..., Harness]) -> None:
    h = make(
        answer(404),
        answer(429),
        httpx.PoolTimeout,
        httpx.UnsupportedProtocol,
        fail_max=1,
        retries=0,
    )
    await h.request("GET")
    await h.request("GET")
    with pytest.raises(httpx.PoolTimeout):
        await h.request("GET")
    with pytest.raises(httpx.UnsupportedProtocol):
        await h.request("GET")
    assert (await h.request("GET")).status_code == 200


async def test_breakers_are_per_origin(make: Callable[..., Harness]) -> None:
    h = make(answer(500), fail_max=1)
    await h.request("GET", "http://down.test/")
    with pytest.raises(CircuitOpenError):
        await h.request("GET", "http://down.test/")
    assert (await h.request("GET", "http://up.test/")).status_code == 200


async def test_a_breaker_opening_mid_retries_returns_the_last_answer(
    make: Callable[..., Harness],
) -> None:
    h = make(answer(503), answer(503, {"x-last": "yes"}), fail_max=2, retries=5)
    response = await h.request("GET")
    assert response.status_code == 503
    assert response.headers["x-last"] == "yes"
    assert len(h.script.seen) == 2
    with pytest.raises(CircuitOpenError):
        await h.request("GET")


async def test_no_breaker_when_fail_max_is_none(make: Callable[..., Harness]) -> None:
    h = make(*[answer(500)] * 10, fail_max=None)
    for _ in range(10):
        assert (await h.request("GET")).status_code == 500
    assert h.transport.breaker(URL) is None


async def test_a_cancelled_trial_gives_its_slot_back(clock: FakeClock) -> None:
    started = anyio.Event()
    hang = True

    async def handler(request: httpx.Request) -> httpx.Response:
        if hang:
            started.set()
            await anyio.sleep_forever()
        return httpx.Response(500 if clock() < 1030 else 200)

    async def no_sleep(seconds: float) -> None:
        clock.advance(seconds)

    transport = ArmorTransport(
        httpx.MockTransport(handler), clock=clock, sleep=no_sleep, fail_max=1, retries=0
    )
    async with httpx.AsyncClient(transport=transport) as client:
        hang = False
        assert (await client.get(URL)).status_code == 500
        clock.advance(30)
        hang = True
        async with anyio.create_task_group() as tg:
            tg.start_soon(client.get, URL)
            await started.wait()
            tg.cancel_scope.cancel()
        hang = False
        # Without the slot back, the half-open breaker would refuse this trial.
        assert (await client.get(URL)).status_code == 200


# -- signing -------------------------------------------------------------------------


async def test_hex_hmac_signs_the_body(make: Callable[..., Harness]) -> None:
    h = make(sign=(HexHmac(), "s3cret"))
    await h.request("POST", content=b'{"event": "paid"}')
    seen = h.script.seen[0]
    verify(seen.headers, seen.body, "s3cret")


async def test_standard_webhooks_retries_keep_the_id_and_refresh_the_timestamp(
    make: Callable[..., Harness],
) -> None:
    scheme = StandardWebhooks()
    h = make(
        answer(503),
        httpx.ConnectError,
        sign=(scheme, "whsec_c2VjcmV0"),
        backoff=4.0,
        idempotency_keys=True,
    )
    await h.request("POST", content=b'{"event": "paid"}')
    ids = [s.headers["webhook-id"] for s in h.script.seen]
    stamps = [int(s.headers["webhook-timestamp"]) for s in h.script.seen]
    assert len(ids) == 3
    assert len(set(ids)) == 1
    assert stamps == sorted(stamps)
    assert len(set(stamps)) == 3
    for seen in h.script.seen:
        message = verify(seen.headers, seen.body, "whsec_c2VjcmV0", scheme, now=WALL + seen.at)
        assert message.msg_id == ids[0]


async def test_stripe_signature_has_a_fresh_timestamp_per_attempt(
    make: Callable[..., Harness],
) -> None:
    h = make(answer(502), sign=(Stripe(), "whsec_x"), backoff=4.0, idempotency_keys=True)
    await h.request("POST", content=b"{}")
    headers = [s.headers["stripe-signature"] for s in h.script.seen]
    assert len(set(headers)) == 2
    for seen in h.script.seen:
        verify(seen.headers, seen.body, "whsec_x", Stripe(), now=WALL + seen.at)


async def test_a_signed_streaming_body_is_read_once_and_replayed(
    make: Callable[..., Harness],
) -> None:
    h = make(httpx.ConnectError, sign=(HexHmac(), "s3cret"))
    await h.request("POST", content=h.stream_body([b'{"a":', b" 1}"]))
    assert [s.body for s in h.script.seen] == [b'{"a": 1}'] * 2
    for seen in h.script.seen:
        verify(seen.headers, seen.body, "s3cret")


# -- configuration -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "named"),
    [
        ({"retries": -1}, "retries"),
        ({"retries": True}, "retries"),
        ({"backoff": float("nan")}, "backoff"),
        ({"max_wait": -1}, "max_wait"),
        ({"budget": -1}, "budget"),
        ({"retry_statuses": [200]}, "retry_statuses"),
        ({"idempotency_header": "bad header"}, "idempotency_header"),
        ({"fail_max": 0}, "fail_max"),
        ({"reset_timeout": -1}, "reset_timeout"),
        ({"sign": ("hex-hmac", "s")}, "sign"),
        ({"sign": (HexHmac(), "")}, "sign"),
    ],
)
@pytest.mark.parametrize("cls", [ArmorTransport, SyncArmorTransport])
def test_bad_options_are_config_errors_naming_the_option(
    cls: type[ArmorTransport | SyncArmorTransport], options: dict[str, Any], named: str
) -> None:
    with pytest.raises(ConfigError, match=named):
        cls(**options)
