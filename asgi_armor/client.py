"""The client side: httpx transports that retry safely, pace themselves and break per origin.

``ArmorTransport`` (for ``httpx.AsyncClient``) and ``SyncArmorTransport`` (for
``httpx.Client``) wrap another transport and make the client behave the way an armored
server expects (see docs/client.md):

* connection errors and 429, 502, 503, 504 answers are retried with exponential backoff and
  full jitter (AWS Architecture Blog, "Exponential Backoff And Jitter"), never sooner than
  ``Retry-After`` (RFC 9110 §10.2.3), within ``retries`` and a total time ``budget``;
* a request that may have reached the server is repeated only when repeating it is safe:
  an idempotent method (RFC 9110 §9.2.2) or an ``Idempotency-Key``
  (draft-ietf-httpapi-idempotency-key-header), which ``idempotency_keys=True`` adds to
  POST and PATCH; every retry carries the same key;
* each origin is paced from the IETF ``RateLimit`` field (draft-ietf-httpapi-ratelimit-headers,
  an RFC 9651 List): after ``r=0;t=N`` the next request to that origin waits ``N`` seconds;
* each origin has a ``CircuitBreaker``: 5xx answers and connection errors are failures,
  and while it is open requests fail at once with ``CircuitOpenError``;
* bodies can be signed with any signing scheme, for webhook senders.

The decisions live in one synchronous, I/O-free policy shared by both transports; the two
``handle_*request`` loops only do the I/O and the sleeping. httpx is an optional extra.
"""

from __future__ import annotations

import datetime
import email.utils
import math
import random as _random
import re
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import TypeAlias

import anyio

try:
    import httpx
except ImportError as exc:  # pragma: no cover - exercised in a subprocess by the tests
    raise ImportError("asgi_armor.client needs httpx: pip install 'asgi-armor[client]'") from exc

from asgi_armor import signing
from asgi_armor.breaker import BreakerState, CircuitBreaker
from asgi_armor.errors import CircuitOpenError, ConfigError
from asgi_armor.ratelimit.headers import PARAM_REMAINING, PARAM_RESET, RATELIMIT, RETRY_AFTER

__all__ = [
    "IDEMPOTENT_METHODS",
    "RETRY_STATUSES",
    "ArmorTransport",
    "CircuitOpenError",
    "Signer",
    "SyncArmorTransport",
    "parse_ratelimit",
    "parse_retry_after",
]

#: Methods whose repetition has the same effect as one request (RFC 9110 §9.2.2).
IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})
#: Answers retried by default: too many requests, and the gateway/overload family.
RETRY_STATUSES = frozenset({429, 502, 503, 504})

#: ``(scheme, secret)``: how request bodies are signed.
Signer: TypeAlias = tuple[signing.Scheme, str | bytes]

# Raised before a byte of the request left: repeating the request is safe for any method.
_NOT_SENT: tuple[type[Exception], ...] = (
    httpx.ConnectError,
    httpx.ConnectTimeout,
    httpx.PoolTimeout,
)
# Raised after the request may have reached the server (a dropped connection before the
# answer, a stale keep-alive connection, a server too slow to answer): repeating it is
# safe only for an idempotent method or a request carrying an idempotency key.
_MAYBE_SENT: tuple[type[Exception], ...] = (
    httpx.ReadError,
    httpx.WriteError,
    httpx.RemoteProtocolError,
    httpx.ReadTimeout,
    httpx.WriteTimeout,
)
# Errors that say the origin is unwell, for its breaker. A pool timeout is this client's
# own saturation and a local protocol error is this client's mistake: neither is counted.
_ORIGIN_FAILURES: tuple[type[Exception], ...] = (
    httpx.NetworkError,
    httpx.ConnectTimeout,
    httpx.ReadTimeout,
    httpx.WriteTimeout,
    httpx.RemoteProtocolError,
)
# Origins remembered (breaker and pacing); the least recently used are forgotten beyond.
_MAX_ORIGINS = 1024
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_DIGITS = re.compile(r"[0-9]+")


# -- header parsing ------------------------------------------------------------------


def parse_retry_after(value: str | None, *, date: str | None = None, now: float) -> float | None:
    """Seconds to wait from a ``Retry-After`` value (RFC 9110 §10.2.3), or None if unusable.

    Args:
        value: the header value: delay-seconds or an HTTP-date.
        date: the response's ``Date`` header; an HTTP-date is measured against it when
            present (the server's own clock, so clock skew cancels out).
        now: the current Unix time, used when there is no usable ``Date``.
    """
    if value is None:
        return None
    value = value.strip()
    if _DIGITS.fullmatch(value):
        # Beyond 15 digits it is longer than any max_wait: "never", not "unreadable".
        return float(int(value)) if len(value) <= 15 else math.inf
    when = _http_date(value)
    if when is None:
        return None
    reference = _http_date(date) if date is not None else None
    return max(0.0, when - (now if reference is None else reference))


def _http_date(value: str) -> float | None:
    try:
        parsed = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if parsed.tzinfo is None:
        # RFC 9110 §5.6.7: HTTP-dates are UTC; obsolete forms without a zone mean GMT too.
        return parsed.replace(tzinfo=datetime.UTC).timestamp()
    return parsed.timestamp()


def parse_ratelimit(values: Iterable[str]) -> float | None:
    """Seconds until the next request may go, from ``RateLimit`` field lines; None if unusable.

    The field is an RFC 9651 List with one member per policy, e.g. ``"ip";r=0;t=4``: a
    member whose remaining quota ``r`` is 0 asks for a wait of ``t`` seconds; with several
    exhausted policies the longest wait wins, and a field with none asks for no wait (0).
    A field that is not a valid List is ignored as a whole (RFC 9651 §4.2), a member
    without integer ``r`` and ``t`` >= 0 is skipped.

    Args:
        values: the field lines, in order (they are combined as RFC 9110 §5.3 says).
    """
    lines = list(values)
    if not lines:
        return None
    try:
        members = _SFParser(",".join(lines)).parse_list()
    except ValueError:
        return None
    wait: float | None = None
    for params in members:
        remaining = params.get(PARAM_REMAINING)
        reset = params.get(PARAM_RESET)
        if type(remaining) is not int or type(reset) is not int or remaining < 0 or reset < 0:
            continue
        wait = max(wait or 0.0, float(reset) if remaining == 0 else 0.0)
    return wait


_SF_KEY_FIRST = frozenset("abcdefghijklmnopqrstuvwxyz*")
_SF_KEY = frozenset("abcdefghijklmnopqrstuvwxyz0123456789_-.*")
_SF_TOKEN = frozenset(
    "!#$%&'*+-.^_`|~:/0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
)
_SF_ALPHA = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
_SF_BASE64 = re.compile(r"[A-Za-z0-9+/]*={0,2}")
_SF_LOWER_HEX = frozenset("0123456789abcdef")
_SF_DIGITS = frozenset("0123456789")

_Params: TypeAlias = dict[str, object]


class _SFParser:
    """RFC 9651 §4.2 List parsing; only the members' parameters are kept.

    Every bare-item type is parsed (so a member of any shape is skipped correctly); any
    syntax error raises ValueError, and the caller ignores the whole field.
    """

    __slots__ = ("i", "s")

    def __init__(self, text: str) -> None:
        self.s = text
        self.i = 0

    def _peek(self) -> str:
        return self.s[self.i] if self.i < len(self.s) else ""

    def _skip(self, chars: str) -> None:
        while self.i < len(self.s) and self.s[self.i] in chars:
            self.i += 1

    def parse_list(self) -> list[_Params]:
        self._skip(" ")
        members: list[_Params] = []
        while self.i < len(self.s):
            members.append(self._member())
            self._skip(" \t")
            if self.i >= len(self.s):
                return members
            if self.s[self.i] != ",":
                raise ValueError("expected ','")
            self.i += 1
            self._skip(" \t")
            if self.i >= len(self.s):
                raise ValueError("trailing ','")
        return members

    def _member(self) -> _Params:
        if self._peek() == "(":
            self.i += 1
            while True:
                self._skip(" ")
                if self._peek() == ")":
                    self.i += 1
                    return self._params()
                self._bare_item()
                self._params()
                if self._peek() not in (" ", ")"):
                    raise ValueError("bad inner list")
        self._bare_item()
        return self._params()

    def _params(self) -> _Params:
        params: _Params = {}
        while self._peek() == ";":
            self.i += 1
            self._skip(" ")
            key = self._key()
            value: object = True
            if self._peek() == "=":
                self.i += 1
                value = self._bare_item()
            params[key] = value
        return params

    def _key(self) -> str:
        start = self.i
        if self._peek() not in _SF_KEY_FIRST:
            raise ValueError("bad key")
        self.i += 1
        while self._peek() in _SF_KEY:
            self.i += 1
        return self.s[start : self.i]

    def _bare_item(self) -> object:
        char = self._peek()
        if not char:
            raise ValueError("missing item")
        if char in _SF_DIGITS or char == "-":
            return self._number()
        if char == '"':
            return self._string()
        if char in _SF_ALPHA or char == "*":
            start = self.i
            while self._peek() in _SF_TOKEN:
                self.i += 1
            return self.s[start : self.i]
        if char == ":":
            end = self.s.find(":", self.i + 1)
            if end < 0 or not _SF_BASE64.fullmatch(self.s, self.i + 1, end):
                raise ValueError("bad byte sequence")
            self.i = end + 1
            return b""
        if char == "?":
            value = self.s[self.i + 1 : self.i + 2]
            if value not in ("0", "1"):
                raise ValueError("bad boolean")
            self.i += 2
            return value == "1"
        if char == "@":
            self.i += 1
            date = self._number()
            if type(date) is not int:
                raise ValueError("bad date")
            return date
        if char == "%":
            return self._display_string()
        raise ValueError("bad item")

    def _number(self) -> int | float:
        sign = 1
        if self._peek() == "-":
            sign = -1
            self.i += 1
        start = self.i
        dot = -1
        while self._peek() in _SF_DIGITS or (self._peek() == "." and dot < 0):
            if self._peek() == ".":
                dot = self.i
            self.i += 1
        digits = self.s[start : self.i]
        if not digits or digits[0] not in _SF_DIGITS:
            raise ValueError("bad number")
        if dot < 0:
            if len(digits) > 15:
                raise ValueError("integer too long")
            return sign * int(digits)
        whole, frac = digits.split(".")
        if len(whole) > 12 or not 1 <= len(frac) <= 3:
            raise ValueError("bad decimal")
        return sign * float(digits)

    def _string(self) -> str:
        self.i += 1
        out: list[str] = []
        while self.i < len(self.s):
            char = self.s[self.i]
            self.i += 1
            if char == "\\":
                escaped = self._peek()
                if escaped not in ('"', "\\"):
                    raise ValueError("bad escape")
                out.append(escaped)
                self.i += 1
            elif char == '"':
                return "".join(out)
            elif not " " <= char <= "~":
                raise ValueError("bad string character")
            else:
                out.append(char)
        raise ValueError("unterminated string")

    def _display_string(self) -> str:
        if self.s[self.i : self.i + 2] != '%"':
            raise ValueError("bad display string")
        self.i += 2
        raw = bytearray()
        while self.i < len(self.s):
            char = self.s[self.i]
            self.i += 1
            if char == "%":
                pair = self.s[self.i : self.i + 2]
                if len(pair) != 2 or not set(pair) <= _SF_LOWER_HEX:
                    raise ValueError("bad percent escape")
                raw.append(int(pair, 16))
                self.i += 2
            elif char == '"':
                return raw.decode("utf-8")  # a UnicodeDecodeError is a ValueError
            elif not " " <= char <= "~":
                raise ValueError("bad display string character")
            else:
                raw.append(ord(char))
        raise ValueError("unterminated display string")


# -- the policy (pure, shared by both transports) ------------------------------------


@dataclass(slots=True)
class _Origin:
    breaker: CircuitBreaker | None
    not_before: float = 0.0


@dataclass(slots=True)
class _Call:
    """One request across its attempts."""

    origin: _Origin
    replayable: bool
    repeatable: bool  # may be sent again even if it reached the server
    keyed: bool
    deadline: float
    msg_id: str | None
    retries_done: int = 0
    epoch: int = -1
    admitted: bool = False


def _number(value: object, entry: str, *, minimum: float, allow_inf: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
        raise ConfigError(f"{entry}: {value!r} is not a number")
    if value < minimum or (math.isinf(value) and not allow_inf):
        raise ConfigError(f"{entry}: {value!r} must be finite and >= {minimum:g}")
    return float(value)


def _integer(value: object, entry: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"{entry}: {value!r} must be an integer >= 0")
    return value


def _status(value: object, entry: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 400 <= value <= 599:
        raise ConfigError(f"{entry}: {value!r} is not a 4xx or 5xx status")
    return value


class _Policy:
    """Every decision of the transports, synchronous and free of I/O (so tests drive it).

    State (breakers, pacing) is per origin and guarded by a lock that is never held across
    I/O or a sleep, so one transport may serve several threads or tasks.
    """

    def __init__(
        self,
        *,
        who: str,
        retries: int,
        backoff: float,
        max_wait: float,
        budget: float | None,
        retry_statuses: Iterable[int],
        idempotency_keys: bool,
        idempotency_header: str,
        pace: bool,
        fail_max: int | None,
        reset_timeout: float,
        sign: Signer | None,
        clock: Callable[[], float],
        random: Callable[[], float],
        wall_clock: Callable[[], float],
    ) -> None:
        self.retries = _integer(retries, f"{who} retries")
        self.backoff = _number(backoff, f"{who} backoff", minimum=0)
        self.max_wait = _number(max_wait, f"{who} max_wait", minimum=0)
        self.budget = (
            math.inf
            if budget is None
            else _number(budget, f"{who} budget", minimum=0, allow_inf=True)
        )
        self.retry_statuses = frozenset(_status(s, f"{who} retry_statuses") for s in retry_statuses)
        header: object = idempotency_header
        if not isinstance(header, str) or not _TOKEN.fullmatch(header):
            raise ConfigError(
                f"{who} idempotency_header: {idempotency_header!r} is not a valid header name"
            )
        self.idempotency_keys = bool(idempotency_keys)
        self.idempotency_header = idempotency_header
        self.pace = bool(pace)
        if fail_max is not None:
            # Built once here so a bad value fails at construction, naming the parameter.
            try:
                CircuitBreaker(fail_max, reset_timeout)
            except ConfigError as error:
                raise ConfigError(f"{who} breaker: {error}") from None
        self.fail_max = fail_max
        self.reset_timeout = reset_timeout
        if sign is not None:
            given: object = sign
            if (
                not isinstance(given, tuple)
                or len(given) != 2
                or not isinstance(given[0], signing.Scheme)
            ):
                raise ConfigError(f"{who} sign: expected a (scheme, secret) pair")
            try:
                sign[0].key(sign[1])
            except ConfigError as error:
                raise ConfigError(f"{who} sign: {error}") from None
        self.signer = sign
        self.clock = clock
        self.random = random
        self.wall_clock = wall_clock
        self._origins: OrderedDict[str, _Origin] = OrderedDict()
        self._lock = threading.Lock()

    # -- origins

    def _origin(self, name: str) -> _Origin:
        origin = self._origins.get(name)
        if origin is None:
            breaker = None
            if self.fail_max is not None:
                breaker = CircuitBreaker(
                    self.fail_max, self.reset_timeout, name=name, clock=self.clock
                )
            origin = self._origins[name] = _Origin(breaker)
            if len(self._origins) > _MAX_ORIGINS:
                self._origins.popitem(last=False)
        else:
            self._origins.move_to_end(name)
        return origin

    def breaker(self, url: httpx.URL | str) -> CircuitBreaker | None:
        with self._lock:
            return self._origin(_origin_name(httpx.URL(url))).breaker

    # -- one request

    def begin(self, request: httpx.Request) -> _Call:
        """Start a request: its origin, its idempotency key, whether it may be repeated."""
        method = request.method.upper()
        header = self.idempotency_header
        if self.idempotency_keys and method in ("POST", "PATCH") and header not in request.headers:
            # Set on the caller's request, so the key it was sent with is visible afterwards.
            request.headers[header] = str(uuid.uuid4())
        keyed = header in request.headers
        # A body httpx holds in memory can be sent again; a stream (a generator, a file)
        # may be half consumed after a failed attempt, so such a request is sent once.
        replayable = isinstance(request.stream, httpx.ByteStream)
        with self._lock:
            origin = self._origin(_origin_name(request.url))
        return _Call(
            origin=origin,
            replayable=replayable,
            repeatable=replayable and (method in IDEMPOTENT_METHODS or keyed),
            keyed=keyed,
            deadline=self.clock() + self.budget,
            # One message id for every attempt, so the receiver can tell a retry of the
            # same message (Standard Webhooks' webhook-id); each attempt still gets a
            # fresh timestamp, within the receiver's tolerance however late the retry.
            msg_id="msg_" + uuid.uuid4().hex if self.signer is not None else None,
        )

    def pacing_wait(self, call: _Call) -> float:
        """Seconds to wait before the next attempt because the origin's quota is spent.

        A wait longer than ``max_wait`` or past the budget is not waited: the request goes,
        and the server's answer (a 429 with ``Retry-After``) is what the caller gets.
        """
        if not self.pace:
            return 0.0
        now = self.clock()
        with self._lock:
            wait = call.origin.not_before - now
        if wait <= 0 or wait > self.max_wait or now + wait > call.deadline:
            return 0.0
        return wait

    def admit(self, call: _Call) -> None:
        """Take a breaker slot for one attempt.

        Raises:
            CircuitOpenError: the origin's breaker is open (nothing is sent).
        """
        breaker = call.origin.breaker
        call.admitted = False
        if breaker is None:
            return
        with self._lock:
            call.epoch = breaker.acquire(self.clock())
        call.admitted = True

    def signed_headers(self, call: _Call, body: bytes) -> dict[str, str]:
        """The signature headers for this attempt (a fresh timestamp, the call's id)."""
        if self.signer is None:
            return {}
        scheme, secret = self.signer
        return signing.sign(
            body, secret, scheme, timestamp=int(self.wall_clock()), msg_id=call.msg_id
        )

    def answered(self, call: _Call, response: httpx.Response) -> float | None:
        """Record an answer; the seconds to wait before retrying, or None to return it."""
        now = self.clock()
        status = response.status_code
        with self._lock:
            self._record(call, now, failed=status >= 500)
            if self.pace:
                wait = parse_ratelimit(response.headers.get_list(RATELIMIT))
                if wait:
                    origin = call.origin
                    origin.not_before = max(origin.not_before, now + wait)
        if status not in self.retry_statuses and (status != 409 or not call.keyed):
            return None
        retry_after = parse_retry_after(
            response.headers.get(RETRY_AFTER),
            date=response.headers.get("date"),
            now=self.wall_clock(),
        )
        if status in self.retry_statuses:
            allowed = call.repeatable
        else:
            # A 409 with Retry-After on a keyed request: the first request with this key
            # is still being processed (draft-ietf-httpapi-idempotency-key-header §2.7),
            # and its outcome is what a retry will get. Any other 409 is a real conflict.
            allowed = call.replayable and retry_after is not None
        if not allowed:
            return None
        return self._retry_delay(call, now, retry_after or 0.0)

    def failed(self, call: _Call, error: BaseException) -> float | None:
        """Record an error; the seconds to wait before retrying, or None to raise it."""
        now = self.clock()
        with self._lock:
            if not isinstance(error, Exception):
                # Cancellation says nothing about the origin: give the slot back.
                self._release(call)
                return None
            if isinstance(error, _ORIGIN_FAILURES):
                self._record(call, now, failed=True)
            else:
                self._release(call)
        if isinstance(error, _NOT_SENT):
            allowed = call.replayable
        elif isinstance(error, _MAYBE_SENT):
            allowed = call.repeatable
        else:
            return None
        if not allowed:
            return None
        return self._retry_delay(call, now, 0.0)

    def _record(self, call: _Call, now: float, *, failed: bool) -> None:
        breaker = call.origin.breaker
        if breaker is None or not call.admitted:
            return
        call.admitted = False
        if failed:
            breaker.record_failure(now, epoch=call.epoch)
        else:
            breaker.record_success(now, epoch=call.epoch)

    def _release(self, call: _Call) -> None:
        breaker = call.origin.breaker
        if breaker is not None and call.admitted:
            call.admitted = False
            breaker.release(epoch=call.epoch)

    def _retry_delay(self, call: _Call, now: float, floor: float) -> float | None:
        if call.retries_done >= self.retries or floor > self.max_wait:
            return None
        breaker = call.origin.breaker
        with self._lock:
            if breaker is not None and breaker.state_at(now) is BreakerState.OPEN:
                # The last answer is more useful to the caller than a CircuitOpenError.
                return None
            paced = call.origin.not_before - now if self.pace else 0.0
        # Full jitter: uniform in [0, min(max_wait, backoff * 2**n)).
        ceiling = min(self.max_wait, self.backoff * 2.0 ** min(call.retries_done, 64))
        delay = max(self.random() * ceiling, floor, paced)
        if delay > self.max_wait or now + delay > call.deadline:
            return None
        call.retries_done += 1
        return delay


def _origin_name(url: httpx.URL) -> str:
    return f"{url.scheme}://{url.netloc.decode('ascii')}"


# -- the transports ------------------------------------------------------------------


class ArmorTransport(httpx.AsyncBaseTransport):
    """An ``httpx.AsyncBaseTransport`` that retries safely, paces and breaks per origin.

    ``httpx.AsyncClient(transport=ArmorTransport())``. Requests to an origin whose breaker
    is open raise ``CircuitOpenError`` at once; after the retries the last answer is
    returned, or the last connection error raised.
    Args:
        transport: the transport that does the I/O (default ``httpx.AsyncHTTPTransport()``).
        retries: how many times a request may be repeated (0: never).
        backoff: base of the exponential backoff in seconds: retry ``n`` (from 0) waits a
            uniformly random time in ``[0, min(max_wait, backoff * 2**n))`` (full jitter).
        max_wait: the longest single wait; a ``Retry-After`` (or a pacing wait) beyond it
            is not waited: the answer is returned as it is.
        budget: seconds from the start of a request after which no wait or new attempt
            begins (None: no budget); each attempt is bounded by the client's timeouts.
        retry_statuses: statuses retried (default 429, 502, 503, 504).
        idempotency_keys: add ``Idempotency-Key: <uuid4>`` to POST and PATCH requests
            without one, so they can be retried safely.
        idempotency_header: the key's header name (the server's must match).
        pace: wait out an exhausted ``RateLimit`` quota before the next request to an origin.
        fail_max: consecutive failures (5xx, connection errors) that open an origin's
            breaker; None: no breaker.
        reset_timeout: seconds an open breaker refuses requests before one trial.
        sign: ``(scheme, secret)`` to sign each attempt's body (``asgi_armor.signing``).
        clock: monotonic seconds (inject a fake one in tests).
        sleep: how to wait (inject a fake one in tests).
        random: uniform floats in [0, 1), for the jitter.
        wall_clock: Unix time, for signature timestamps and HTTP-date ``Retry-After``.

    Raises:
        ConfigError: a parameter is out of range; the message names it.
    """

    def __init__(
        self,
        transport: httpx.AsyncBaseTransport | None = None,
        *,
        retries: int = 3,
        backoff: float = 0.5,
        max_wait: float = 30.0,
        budget: float | None = 60.0,
        retry_statuses: Iterable[int] = RETRY_STATUSES,
        idempotency_keys: bool = False,
        idempotency_header: str = "Idempotency-Key",
        pace: bool = True,
        fail_max: int | None = 5,
        reset_timeout: float = 30.0,
        sign: Signer | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[object]] = anyio.sleep,
        random: Callable[[], float] = _random.random,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self._policy = _Policy(
            who="ArmorTransport",
            retries=retries,
            backoff=backoff,
            max_wait=max_wait,
            budget=budget,
            retry_statuses=retry_statuses,
            idempotency_keys=idempotency_keys,
            idempotency_header=idempotency_header,
            pace=pace,
            fail_max=fail_max,
            reset_timeout=reset_timeout,
            sign=sign,
            clock=clock,
            random=random,
            wall_clock=wall_clock,
        )
        self._transport = httpx.AsyncHTTPTransport() if transport is None else transport
        self._sleep = sleep

    def breaker(self, url: httpx.URL | str) -> CircuitBreaker | None:
        """The breaker of ``url``'s origin (None when ``fail_max`` is None)."""
        return self._policy.breaker(url)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        """Send ``request`` through the inner transport, retrying as configured.

        Raises:
            CircuitOpenError: the origin's breaker is open; nothing was sent.
            httpx.TransportError: the last connection error, when it is not retried.
        """
        policy = self._policy
        # Signing needs the whole body; reading a stream also makes it replayable.
        body = await request.aread() if policy.signer is not None else b""
        call = policy.begin(request)
        while True:
            wait = policy.pacing_wait(call)
            if wait > 0:
                await self._sleep(wait)
            policy.admit(call)
            request.headers.update(policy.signed_headers(call, body))
            try:
                response = await self._transport.handle_async_request(request)
            except BaseException as error:
                delay = policy.failed(call, error)
                if delay is None:
                    raise
            else:
                delay = policy.answered(call, response)
                if delay is None:
                    return response
                await response.aclose()
            await self._sleep(delay)

    async def aclose(self) -> None:
        """Close the inner transport."""
        await self._transport.aclose()


class SyncArmorTransport(httpx.BaseTransport):
    """An ``httpx.BaseTransport`` that retries safely, paces and breaks per origin.

    The twin of ``ArmorTransport`` for ``httpx.Client(transport=SyncArmorTransport())``:
    the same policy, with blocking I/O and ``time.sleep``; safe to share between threads.

    Args:
        transport: the transport that does the I/O (default ``httpx.HTTPTransport()``).
        sleep: a blocking wait (default ``time.sleep``; inject a fake one in tests).
        retries, backoff, max_wait, budget, retry_statuses, idempotency_keys,
        idempotency_header, pace, fail_max, reset_timeout, sign, clock, random,
        wall_clock: as for ``ArmorTransport``.

    Raises:
        ConfigError: a parameter is out of range; the message names it.
    """

    def __init__(
        self,
        transport: httpx.BaseTransport | None = None,
        *,
        retries: int = 3,
        backoff: float = 0.5,
        max_wait: float = 30.0,
        budget: float | None = 60.0,
        retry_statuses: Iterable[int] = RETRY_STATUSES,
        idempotency_keys: bool = False,
        idempotency_header: str = "Idempotency-Key",
        pace: bool = True,
        fail_max: int | None = 5,
        reset_timeout: float = 30.0,
        sign: Signer | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], object] = time.sleep,
        random: Callable[[], float] = _random.random,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self._policy = _Policy(
            who="SyncArmorTransport",
            retries=retries,
            backoff=backoff,
            max_wait=max_wait,
            budget=budget,
            retry_statuses=retry_statuses,
            idempotency_keys=idempotency_keys,
            idempotency_header=idempotency_header,
            pace=pace,
            fail_max=fail_max,
            reset_timeout=reset_timeout,
            sign=sign,
            clock=clock,
            random=random,
            wall_clock=wall_clock,
        )
        self._transport = httpx.HTTPTransport() if transport is None else transport
        self._sleep = sleep

    def breaker(self, url: httpx.URL | str) -> CircuitBreaker | None:
        """The breaker of ``url``'s origin (None when ``fail_max`` is None)."""
        return self._policy.breaker(url)

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        """Send ``request`` through the inner transport, retrying as configured.

        Raises:
            CircuitOpenError: the origin's breaker is open; nothing was sent.
            httpx.TransportError: the last connection error, when it is not retried.
        """
        policy = self._policy
        # Signing needs the whole body; reading a stream also makes it replayable.
        body = request.read() if policy.signer is not None else b""
        call = policy.begin(request)
        while True:
            wait = policy.pacing_wait(call)
            if wait > 0:
                self._sleep(wait)
            policy.admit(call)
            request.headers.update(policy.signed_headers(call, body))
            try:
                response = self._transport.handle_request(request)
            except BaseException as error:
                delay = policy.failed(call, error)
                if delay is None:
                    raise
            else:
                delay = policy.answered(call, response)
                if delay is None:
                    return response
                response.close()
            self._sleep(delay)

    def close(self) -> None:
        """Close the inner transport."""
        self._transport.close()
