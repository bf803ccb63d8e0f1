"""Idempotency keys: a retried unsafe request is answered once, and replayed after that.

Semantics of draft-ietf-httpapi-idempotency-key-header, with Stripe's habits. On a
configured route the client sends ``Idempotency-Key``; the first request with a key takes
an expiring in-flight lease atomically, runs the app, and its complete response (status,
headers, every body chunk) is stored for ``ttl``. A retry with the same request is answered
from the store, byte for byte, with ``Idempotent-Replayed: true``, and the app does not run.
Records are scoped by principal, method and route, so users and endpoints never collide.

The store sees opaque bytes: this module encodes them (msgpack of a tagged Struct). A
lease is an ``_InFlight`` record carrying a random token, so only the request that took it
can complete or release it.

A response delivered is a response recorded: the record is written before the last body
chunk goes out, so a client holding a complete response can count on its replay. When
that write fails, the record is held in this process (retries reaching it are answered
from it) and written again after the response, in the request's own task, with backoff
and the lease kept meanwhile, until it lands (docs/idempotency.md, "When the store fails").
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import random
import re
import secrets
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import anyio
import msgspec

from asgi_armor import _checks
from asgi_armor._asgi import (
    ASGIApp,
    Headers,
    Message,
    Receive,
    Scope,
    Send,
    declared_length,
    read_body,
    replay_body,
)
from asgi_armor._store_policy import StorePolicy
from asgi_armor.clientip import ClientIP
from asgi_armor.errors import (
    ConfigError,
    IdempotencyKeyInUse,
    IdempotencyKeyInvalid,
    IdempotencyKeyMissing,
    IdempotencyKeyReused,
    Overloaded,
    PayloadTooLarge,
    ServiceUnavailable,
    ensure_request_id,
    send_error,
)
from asgi_armor.identity import Identify, principal
from asgi_armor.routes import Route, RouteBound, RouteMap, target
from asgi_armor.stores.base import IdempotencyStore, OnStoreError, StoreError, make_key

if TYPE_CHECKING:
    from asgi_armor.metrics import Metrics

__all__ = ["IdempotencyMiddleware", "IdempotencyOptions", "parse_idempotency_key"]

logger = logging.getLogger("asgi_armor.idempotency")

#: Longest key accepted (the draft leaves it to the server; Stripe uses 255).
MAX_KEY_LENGTH = 255

#: Seconds a client is told to wait while the first request with its key still runs: a
#: short poll interval, since the first request may finish at any moment.
IN_USE_RETRY_AFTER = 1.0

#: Seconds a release, or the write of a record before the last chunk, may take when it runs
#: shielded from cancellation; past it, a release is left to expire after ``lock_ttl``, and
#: a record is held here and written after the response.
_STORE_CALL_TIMEOUT = 5.0

#: Backoff between two writes of a held record (seconds, doubled up to the cap, jittered):
#: short, so a record lands within about a second of the store's return.
_RETRY_FIRST = 0.05
_RETRY_MAX = 1.0

_BARE_KEY = re.compile(rb"[\x20-\x7e]{1,%d}" % MAX_KEY_LENGTH)
# RFC 9651 sf-string: printable ASCII, with only \" and \\ as escapes.
_SF_STRING = re.compile(rb'"((?:[\x20\x21\x23-\x5b\x5d-\x7e]|\\["\\])*)"')
_SF_ESCAPE = re.compile(rb"\\([\"\\])")

# Not replayed: hop-by-hop headers (RFC 9110 section 7.6.1) describe one connection, Date
# describes one response, and X-Request-ID names one request (ErrorMiddleware sets it anew).
_NOT_STORED = frozenset(
    {
        b"connection",
        b"date",
        b"idempotent-replayed",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"x-request-id",
    }
)

# Answers that send the client elsewhere or tell it "retry later" are not final: a 307/308
# is followed with the same key (storing it would answer the followed request 422 and burn
# the key), and storing a 408/409/425/429 would turn one transient refusal into 24 hours of
# the same refusal.
_NOT_FINAL = frozenset({307, 308, 408, 409, 425, 429})

_REPLAYED_HEADER = (b"idempotent-replayed", b"true")


class IdempotencyOptions(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Per-route overrides of the middleware's defaults; ``None`` keeps the default.

    Args:
        required: reject requests without a key (else they run unprotected).
        ttl: seconds a completed response is kept for replay.
        lock_ttl: seconds an in-flight lease lasts (longer than the slowest handler).
        max_body_bytes: largest request body fingerprinted (bigger: 413).
        max_response_bytes: largest response body stored (bigger: passed through, unstored).
    """

    required: bool | None = None
    ttl: float | None = None
    lock_ttl: float | None = None
    max_body_bytes: int | None = None
    max_response_bytes: int | None = None


@dataclass(frozen=True, slots=True)
class _RouteConfig:
    pattern: str
    required: bool
    ttl: float
    lock_ttl: float
    max_body_bytes: int
    max_response_bytes: int


class _InFlight(msgspec.Struct, frozen=True, array_like=True, tag="idem1.lease"):
    fingerprint: bytes
    token: bytes


class _Completed(msgspec.Struct, frozen=True, array_like=True, tag="idem1.done"):
    fingerprint: bytes
    status: int
    headers: list[tuple[bytes, bytes]]
    body: list[bytes]


@dataclass(frozen=True, slots=True)
class _Held:
    """A response the client has (or is about to have) that the store does not have yet."""

    config: _RouteConfig
    lease: bytes
    record: _Completed
    value: bytes


_encoder = msgspec.msgpack.Encoder()
_decoder: msgspec.msgpack.Decoder[_InFlight | _Completed] = msgspec.msgpack.Decoder(
    _InFlight | _Completed
)


def parse_idempotency_key(raw: bytes) -> str | None:
    """The key an ``Idempotency-Key`` value names, or None if the value is not acceptable.

    The draft defines the value as an RFC 9651 sf-string (``"abc"``); the bare form
    (``abc``) that most clients send is accepted too, and both name the same key. A key is
    1 to 255 printable ASCII characters.
    """
    value = raw.strip(b" \t")
    if value[:1] == b'"':
        # Starting with a quote commits to the sf-string form: a malformed one is rejected
        # rather than guessed at.
        found = _SF_STRING.fullmatch(value)
        if found is None:
            return None
        value = _SF_ESCAPE.sub(rb"\1", found.group(1))
    if _BARE_KEY.fullmatch(value) is None:
        return None
    return value.decode("ascii")


def _fingerprint(method: str, path: str, query: bytes, body: bytes) -> bytes:
    # Of the canonical target (the request the app routes), so `//api/pay` and a
    # lower-case `post` are retries of `POST /api/pay`, not a different request.
    # Length-prefixed parts, so no choice of path, query and body can imitate another.
    digest = hashlib.sha256()
    for part in (
        method.encode("ascii", "replace"),
        path.encode("utf-8", "surrogateescape"),
        query,
        body,
    ):
        digest.update(len(part).to_bytes(8, "big"))
        digest.update(part)
    return digest.digest()


def _is_final(status: int) -> bool:
    """Whether a response with ``status`` is stored (else the key is released)."""
    return 200 <= status < 500 and status not in _NOT_FINAL


def _storable_headers(headers: Headers) -> list[tuple[bytes, bytes]]:
    dropped = set(_NOT_STORED)
    for name, value in headers:
        # Headers named by Connection are hop-by-hop too (RFC 9110 section 7.6.1).
        if name.lower() == b"connection":
            dropped.update(token.strip().lower() for token in value.split(b","))
    return [(bytes(name), bytes(value)) for name, value in headers if name.lower() not in dropped]


class IdempotencyMiddleware(RouteBound[_RouteConfig]):
    """Run each (principal, method, route, key) once; replay its response to retries.

    Args:
        app: the ASGI app to wrap.
        routes: route patterns (``"POST /api/payments"``), or ``(pattern, options)`` pairs
            where options is an ``IdempotencyOptions`` or a mapping of its fields.
        store: where leases and responses live (default: a new ``MemoryStore``; use a
            ``RedisStore`` to share them between processes).
        identify: the principal hook; records of different principals never collide.
        client_ip: names the scope of anonymous callers (no principal): a ``ClientIP``
            (default ``ClientIP()``, the TCP peer) or any ``scope -> str``; the full
            address is used, so one anonymous caller never receives another's response.
        header: the request header carrying the key.
        required: reject requests without a key (400 idempotency_key_missing).
        ttl: seconds a completed response is kept for replay.
        lock_ttl: seconds an in-flight lease lasts, so a crashed worker cannot lock a key
            forever; set it above the slowest handler's run time.
        max_body_bytes: largest request body read for the fingerprint (bigger: 413).
        max_response_bytes: largest response body stored; bigger responses are passed
            through unstored and the key released.
        on_store_error: ``"deny"`` answers 503 when the store fails (never runs the app
            unprotected); ``"allow"`` runs the app without idempotency.
        max_pending: most responses held in this process while the store cannot take
            them; past it a response is not held (logged, counted in ``pending_dropped``)
            and its key stays locked until the lease expires.
        max_pending_bytes: most bytes of such held responses.
        clock: monotonic seconds, to notice handlers that outlive their lease.
        metrics: where outcomes (executed, replayed, in_use, reused, missing, invalid) and
            store failures are counted.

    Raises:
        ConfigError: a route, option or setting is not acceptable; the message names it.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        routes: Sequence[str | Route | tuple[str | Route, IdempotencyOptions | Mapping[str, Any]]],
        store: IdempotencyStore | None = None,
        identify: Identify | None = None,
        client_ip: Callable[[Scope], str] | None = None,
        header: str = "Idempotency-Key",
        required: bool = True,
        ttl: float = 86400.0,
        lock_ttl: float = 60.0,
        max_body_bytes: int = 1_048_576,
        max_response_bytes: int = 1_048_576,
        on_store_error: OnStoreError = "deny",
        max_pending: int = 10_000,
        max_pending_bytes: int = 64 * 1_048_576,
        clock: Callable[[], float] = time.monotonic,
        metrics: Metrics | None = None,
    ) -> None:
        self._metrics = metrics
        if isinstance(routes, str | Route):
            raise ConfigError("idempotency routes: expected a list of routes, not one string")
        if not routes:
            raise ConfigError("idempotency routes: at least one route is required")
        self._policy = StorePolicy(
            on_store_error,
            what="idempotency store",
            allowing="request runs without idempotency",
            denying="request denied (503)",
            entry="idempotency on_store_error",
            logger=logger,
            concern="idempotency",
            metrics=metrics,
        )
        if not header or not re.fullmatch(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+", header):
            raise ConfigError(f"idempotency header: {header!r} is not a valid header name")
        for name, bound in (("max_pending", max_pending), ("max_pending_bytes", max_pending_bytes)):
            _checks.count(bound, f"idempotency {name}", minimum=0)
        defaults = IdempotencyOptions(
            required=required,
            ttl=ttl,
            lock_ttl=lock_ttl,
            max_body_bytes=max_body_bytes,
            max_response_bytes=max_response_bytes,
        )
        _check_options(defaults, "idempotency")
        entries: list[tuple[Route, _RouteConfig]] = []
        for entry in routes:
            if isinstance(entry, tuple):
                if len(entry) != 2:
                    raise ConfigError(f"idempotency route {entry!r}: expected (pattern, options)")
                pattern, raw_options = entry
            else:
                pattern, raw_options = entry, IdempotencyOptions()
            route = pattern if isinstance(pattern, Route) else Route(pattern)
            where = f"idempotency route {route.pattern!r}"
            options = _convert_options(raw_options, where)
            _check_options(options, where)
            entries.append((route, _resolve(route.pattern, options, defaults)))
        self.app = app
        self.routes: RouteMap[_RouteConfig] = RouteMap(entries)
        if store is None:
            # Imported here: the memory store pulls in the rate-limit math, which an app
            # using only idempotency (with Redis) never needs.
            from asgi_armor.stores.memory import MemoryStore

            store = MemoryStore(clock=clock)
        self.store: IdempotencyStore = store
        self.identify = identify
        self.client_ip = client_ip if client_ip is not None else ClientIP()
        self.header = header
        self._header_name = header.lower().encode("ascii")
        self.on_store_error: OnStoreError = on_store_error
        self.max_pending = max_pending
        self.max_pending_bytes = max_pending_bytes
        self.clock = clock
        # Responses the store has not taken yet, by record key: process-wide state, like
        # the store itself (one middleware serves one event loop).
        self._held: dict[str, _Held] = {}
        self._held_bytes = 0
        #: Responses that could not be held because max_pending(_bytes) was reached.
        self.pending_dropped = 0

    @property
    def pending(self) -> int:
        """How many responses are held here, waiting for the store to take them."""
        return len(self._held)

    async def run(
        self, scope: Scope, receive: Receive, send: Send, app: ASGIApp, config: _RouteConfig
    ) -> None:
        """Answer from the record of the request's key, or run ``app`` once and record it."""
        method, path = target(scope)

        values = [value for name, value in scope["headers"] if name == self._header_name]
        if not values:
            if config.required:
                self._count("missing")
                await send_error(scope, send, IdempotencyKeyMissing())
                return
            await app(scope, receive, send)
            return
        # Several fields are ambiguous: which one would a retry repeat?
        key = parse_idempotency_key(values[0]) if len(values) == 1 else None
        if key is None:
            self._count("invalid")
            await send_error(scope, send, IdempotencyKeyInvalid())
            return

        # Raises when the hook fails: the request is then answered 500, never let through
        # anonymous.
        who = await principal(scope, self.identify)

        try:
            declared_length(scope, config.max_body_bytes)
        except PayloadTooLarge as exc:
            await send_error(scope, send, exc)
            return
        disconnected = False

        async def watch_disconnect() -> Message:
            nonlocal disconnected
            message = await receive()
            if message["type"] == "http.disconnect":
                disconnected = True
            return message

        try:
            body = await read_body(watch_disconnect, config.max_body_bytes)
        except PayloadTooLarge as exc:
            await send_error(scope, send, exc)
            return
        if disconnected:
            # The client left mid-body: running the app on part of a body would store an
            # answer to a request nobody made.
            return
        receive = replay_body(body, receive)
        fingerprint = _fingerprint(method, path, scope.get("query_string", b""), body)
        # Anonymous callers are scoped by their address: a key is guessable, and a shared
        # namespace would hand one caller another's response, cookies included.
        owner = who if who is not None else ("ip", self.client_ip(scope))
        record_key = _record_key(owner, method, config.pattern, key)
        if self._held:
            held = self._held.get(record_key)
            if held is not None:
                # Answered from here, never from the store: while it could not be reached
                # our lease may have lapsed there, and taking it anew would run the app twice.
                if held.record.fingerprint != fingerprint:
                    self._count("reused")
                    await send_error(scope, send, IdempotencyKeyReused())
                else:
                    self._count("replayed")
                    await _replay(send, held.record)
                return
        lease = _encoder.encode(_InFlight(fingerprint, secrets.token_bytes(16)))

        try:
            found = await self.store.lease_acquire(record_key, lease, config.lock_ttl)
            # Our own lease back means the script ran twice (a client re-sent it after a
            # lost reply): the lease is ours, not another request's in flight.
            existing = None if found is None or found == lease else _decoder.decode(found)
        except Overloaded as exc:
            # This process could not ask the store in time: shed, never the failure policy.
            await send_error(scope, send, exc)
            return
        except (StoreError, msgspec.DecodeError) as exc:
            try:
                self._policy.failed(exc, ensure_request_id(scope))
            except ServiceUnavailable as unavailable:
                await send_error(scope, send, unavailable)
                return
            await app(scope, receive, send)
            return

        if existing is None:
            if self._metrics is not None:
                self._metrics.idempotency("executed")
            await self._run_once(scope, receive, send, app, config, record_key, lease, fingerprint)
            return
        if existing.fingerprint != fingerprint:
            self._count("reused")
            await send_error(scope, send, IdempotencyKeyReused())
        elif isinstance(existing, _InFlight):
            self._count("in_use")
            await send_error(scope, send, IdempotencyKeyInUse(IN_USE_RETRY_AFTER))
        else:
            self._count("replayed")
            await _replay(send, existing)

    def _count(self, result: str) -> None:
        """The metrics hook for an outcome off the hot path."""
        if self._metrics is not None:
            self._metrics.idempotency(result)

    async def _run_once(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        app: ASGIApp,
        config: _RouteConfig,
        record_key: str,
        lease: bytes,
        fingerprint: bytes,
    ) -> None:
        """Run the app under our lease, streaming its response live while recording it."""
        status: int | None = None
        headers: Headers = []
        chunks: list[bytes] = []
        size = 0
        storable = True
        complete = False
        recorded = False  # the record was written, or held here, or could not be held
        held: _Held | None = None
        started = self.clock()

        async def capture(message: Message) -> None:
            nonlocal status, headers, size, storable, complete, recorded, held
            kind = message["type"]
            if kind == "http.response.start":
                status = message["status"]
                headers = list(message.get("headers", ()))
                # Trailers would arrive after the body; a replay could not reproduce them.
                if message.get("trailers", False):
                    storable = False
            elif kind == "http.response.body":
                chunk = message.get("body", b"")
                if storable:
                    size += len(chunk)
                    if size > config.max_response_bytes:
                        storable = False
                        chunks.clear()
                    else:
                        chunks.append(bytes(chunk))
                if not message.get("more_body", False):
                    complete = True
                    if storable and status is not None and _is_final(status):
                        # Before the last chunk: once the client holds the complete
                        # response, the store (or this process) holds its record.
                        recorded = True
                        record = _Completed(fingerprint, status, _storable_headers(headers), chunks)
                        held = await self._record(scope, config, record_key, lease, record, started)
            else:
                # http.response.pathsend, zerocopysend, ...: bytes we never see.
                storable = False
            await send(message)

        try:
            await app(scope, receive, capture)
        finally:
            # Decided by the response the client received, not by how the app ended: an
            # app that raises after its complete response (a failing background task, a
            # disconnect on the last send) has done its work, and freeing the key would
            # let a retry do it again. Shielded, so a cancelled request still settles.
            if held is not None:
                await self._settle(scope, record_key, held)
            elif not recorded:
                final = status if complete else None
                with anyio.move_on_after(_STORE_CALL_TIMEOUT, shield=True):
                    if final is None or not _is_final(final):
                        # 5xx, no full response, a redirect or "retry later": the client
                        # may retry.
                        await self._release(scope, record_key, lease)
                    else:
                        logger.warning(
                            "response over %d bytes (or not capturable) not stored; key "
                            "released [request_id=%s]",
                            config.max_response_bytes,
                            ensure_request_id(scope),
                        )
                        await self._release(scope, record_key, lease)

    async def _record(
        self,
        scope: Scope,
        config: _RouteConfig,
        record_key: str,
        lease: bytes,
        record: _Completed,
        started: float,
    ) -> _Held | None:
        """Write ``record`` now; if the store fails, hold it here. The held record, if any."""
        held = _Held(config, lease, record, _encoder.encode(record))
        stored: bool | None = None
        failure: str = "timed out"
        with anyio.move_on_after(_STORE_CALL_TIMEOUT, shield=True):
            try:
                stored = await self._write(record_key, held)
            except (StoreError, Overloaded) as exc:
                # Overloaded: this process could not reach the store in time; the record
                # is held all the same.
                failure = str(exc) or type(exc).__name__
        if stored is None:
            return self._hold(scope, record_key, held, failure)
        if not stored:
            logger.warning(
                "idempotency lease lost after %.1fs (lock_ttl=%gs); response not stored "
                "[request_id=%s]",
                self.clock() - started,
                config.lock_ttl,
                ensure_request_id(scope),
            )
        return None

    async def _write(self, record_key: str, held: _Held) -> bool:
        """One attempt to put ``held`` in the store: True once it is there, False if
        another request holds the key.

        Raises:
            StoreError: the store did not answer; whether the write ran is unknown.
            Overloaded: this process could not send the call in time.
        """
        store = self.store
        config = held.config
        if await store.lease_complete(record_key, held.lease, held.value, config.ttl):
            return True
        # Not our lease any more. A free key lapsed while the store could not be reached:
        # take it back and write. A key holding a value holds our own record (an earlier
        # write ran in the store although its answer never came back) or another request's.
        if await store.lease_extend(record_key, held.lease, config.lock_ttl):
            return await store.lease_complete(record_key, held.lease, held.value, config.ttl)
        current = await store.lease_acquire(record_key, held.lease, config.lock_ttl)
        if current is None:  # freed between the two calls, and ours again
            return await store.lease_complete(record_key, held.lease, held.value, config.ttl)
        return current == held.value

    def _hold(self, scope: Scope, record_key: str, held: _Held, failure: str) -> _Held | None:
        """Keep ``held`` in this process until the store takes it, within the bounds."""
        size = len(held.value)
        if (
            record_key in self._held
            or len(self._held) >= self.max_pending
            or self._held_bytes + size > self.max_pending_bytes
        ):
            # Fail closed: the lease is kept, not released, so retries get 409 until it
            # expires; after that one retry may run the app again.
            self.pending_dropped += 1
            logger.error(
                "idempotency store failed to keep a response, and it cannot be held here "
                "(max_pending=%d, max_pending_bytes=%d reached: %d held, %d bytes); the key "
                "stays locked until its lease expires after lock_ttl=%gs [request_id=%s]: %s",
                self.max_pending,
                self.max_pending_bytes,
                len(self._held),
                self._held_bytes,
                held.config.lock_ttl,
                ensure_request_id(scope),
                failure,
            )
            return None
        self._held[record_key] = held
        self._held_bytes += size
        logger.warning(
            "idempotency store failed to keep a response; it is held in this process and "
            "written again until it lands [request_id=%s]: %s",
            ensure_request_id(scope),
            failure,
        )
        return held

    async def _settle(self, scope: Scope, record_key: str, held: _Held) -> None:
        """Write a held record again, with backoff, until it lands (bounded by its ttl).

        Runs in the request's task once the response is complete (an ASGI app has no
        task group of its own without lifespan), shielded: the client is not waiting.
        """
        config = held.config
        delay = _RETRY_FIRST
        attempts = 0
        stored: bool | None = None
        try:
            # Past the record's ttl there is nothing left to protect.
            with anyio.move_on_after(config.ttl, shield=True):
                while stored is None:
                    # Jitter, so held records do not all hit a returning store at once.
                    await anyio.sleep(delay * (0.5 + random.random() / 2))  # noqa: S311
                    attempts += 1
                    try:
                        stored = await self._write(record_key, held)
                    except (StoreError, Overloaded):
                        delay = min(2 * delay, _RETRY_MAX)
                        # Keep the lease meanwhile, so other processes answer 409.
                        with contextlib.suppress(StoreError, Overloaded):
                            await self.store.lease_extend(record_key, held.lease, config.lock_ttl)
        finally:
            if self._held.get(record_key) is held:
                del self._held[record_key]
                self._held_bytes -= len(held.value)
        if stored:
            logger.info(
                "idempotency record written after %d more attempts [request_id=%s]",
                attempts,
                ensure_request_id(scope),
            )
        elif stored is None:
            logger.error(
                "idempotency store did not take a held response within its ttl=%gs; it "
                "is no longer held [request_id=%s]",
                config.ttl,
                ensure_request_id(scope),
            )
        else:
            logger.warning(
                "idempotency lease taken by another request while the response was held; "
                "response not stored [request_id=%s]",
                ensure_request_id(scope),
            )

    async def _release(self, scope: Scope, record_key: str, lease: bytes) -> None:
        try:
            await self.store.lease_release(record_key, lease)
        except StoreError as exc:
            logger.warning(
                "idempotency store failed to release a key; it expires after its lock_ttl "
                "[request_id=%s]: %s",
                ensure_request_id(scope),
                exc,
            )

    def __repr__(self) -> str:
        patterns = [route.pattern for route, _ in self.routes.entries]
        return f"IdempotencyMiddleware(routes={patterns!r}, store={self.store!r})"


def _record_key(owner: str | tuple[str, str], method: str, pattern: str, key: str) -> str:
    """``idem:<digest>`` of (owner, method, route, key).

    The owner is the principal, or ``("ip", address)`` for an anonymous caller (an array
    in the encoding, so no principal's name can equal it). Hashed as one unambiguous
    encoding: the parts are free text (a principal may hold ``:``) and together could pass
    the 256-byte key limit.
    """
    parts = _encoder.encode((owner, method, pattern, key))
    return make_key("idem", hashlib.sha256(parts).hexdigest()[:40])


async def _replay(send: Send, record: _Completed) -> None:
    headers = [*record.headers, _REPLAYED_HEADER]
    await send({"type": "http.response.start", "status": record.status, "headers": headers})
    body = record.body or [b""]
    last = len(body) - 1
    for index, chunk in enumerate(body):
        await send({"type": "http.response.body", "body": chunk, "more_body": index < last})


def _convert_options(raw: IdempotencyOptions | Mapping[str, Any], where: str) -> IdempotencyOptions:
    if isinstance(raw, IdempotencyOptions):
        return raw
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where}: options must be IdempotencyOptions or a mapping")
    try:
        return msgspec.convert(raw, IdempotencyOptions)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def _check_options(options: IdempotencyOptions, where: str) -> None:
    for name in ("ttl", "lock_ttl"):
        value = getattr(options, name)
        if value is not None:
            _checks.seconds(value, f"{where} {name}")
    for name in ("max_body_bytes", "max_response_bytes"):
        value = getattr(options, name)
        if value is not None:
            _checks.count(value, f"{where} {name}", minimum=0)
    if options.required is not None and not isinstance(options.required, bool):
        raise ConfigError(f"{where} required: {options.required!r} is not true or false")


def _resolve(
    pattern: str, options: IdempotencyOptions, defaults: IdempotencyOptions
) -> _RouteConfig:
    def pick(name: str) -> Any:
        value = getattr(options, name)
        return getattr(defaults, name) if value is None else value

    return _RouteConfig(
        pattern=pattern,
        required=bool(pick("required")),
        ttl=float(pick("ttl")),
        lock_ttl=float(pick("lock_ttl")),
        max_body_bytes=int(pick("max_body_bytes")),
        max_response_bytes=int(pick("max_response_bytes")),
    )
