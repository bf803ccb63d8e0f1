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
"""

from __future__ import annotations

import hashlib
import logging
import re
import secrets
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import anyio
import msgspec

from asgi_armor._asgi import ASGIApp, Headers, Message, Receive, Scope, Send, read_body, replay_body
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
from asgi_armor.routes import Route, RouteMap, target
from asgi_armor.stores.base import IdempotencyStore, OnStoreError, StoreError, make_key

__all__ = ["IdempotencyMiddleware", "IdempotencyOptions", "parse_idempotency_key"]

logger = logging.getLogger("asgi_armor.idempotency")

#: Longest key accepted (the draft leaves it to the server; Stripe uses 255).
MAX_KEY_LENGTH = 255

#: Seconds a client is told to wait while the first request with its key still runs: a
#: short poll interval, since the first request may finish at any moment.
IN_USE_RETRY_AFTER = 1.0

#: Seconds a release may take when it runs shielded from cancellation; past it, the lease
#: simply expires after ``lock_ttl``.
_RELEASE_TIMEOUT = 5.0

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

# 4xx answers that tell the client "retry later" are not final: storing them would turn
# one transient refusal into 24 hours of the same refusal.
_RETRYABLE_4XX = frozenset({408, 409, 425, 429})

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


def _storable_headers(headers: Headers) -> list[tuple[bytes, bytes]]:
    dropped = set(_NOT_STORED)
    for name, value in headers:
        # Headers named by Connection are hop-by-hop too (RFC 9110 section 7.6.1).
        if name.lower() == b"connection":
            dropped.update(token.strip().lower() for token in value.split(b","))
    return [(bytes(name), bytes(value)) for name, value in headers if name.lower() not in dropped]


class IdempotencyMiddleware:
    """Run each (principal, method, route, key) once; replay its response to retries.

    Args:
        app: the ASGI app to wrap.
        routes: route patterns (``"POST /api/payments"``), or ``(pattern, options)`` pairs
            where options is an ``IdempotencyOptions`` or a mapping of its fields.
        store: where leases and responses live (default: a new ``MemoryStore``; use a
            ``RedisStore`` to share them between processes).
        identify: the principal hook; records of different principals never collide.
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
        clock: monotonic seconds, to notice handlers that outlive their lease.

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
        header: str = "Idempotency-Key",
        required: bool = True,
        ttl: float = 86400.0,
        lock_ttl: float = 60.0,
        max_body_bytes: int = 1_048_576,
        max_response_bytes: int = 1_048_576,
        on_store_error: OnStoreError = "deny",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if isinstance(routes, str | Route):
            raise ConfigError("idempotency routes: expected a list of routes, not one string")
        if not routes:
            raise ConfigError("idempotency routes: at least one route is required")
        if on_store_error not in ("allow", "deny"):
            raise ConfigError(
                f"idempotency on_store_error: {on_store_error!r} is not 'allow' or 'deny'"
            )
        if not header or not re.fullmatch(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+", header):
            raise ConfigError(f"idempotency header: {header!r} is not a valid header name")
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
        self.header = header
        self._header_name = header.lower().encode("ascii")
        self.on_store_error: OnStoreError = on_store_error
        self.clock = clock

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        method, path = target(scope)
        matched = self.routes.first(method, path)
        if matched is None:
            await self.app(scope, receive, send)
            return
        config = matched[0]

        values = [value for name, value in scope["headers"] if name == self._header_name]
        if not values:
            if config.required:
                await send_error(scope, send, IdempotencyKeyMissing())
                return
            await self.app(scope, receive, send)
            return
        # Several fields are ambiguous: which one would a retry repeat?
        key = parse_idempotency_key(values[0]) if len(values) == 1 else None
        if key is None:
            await send_error(scope, send, IdempotencyKeyInvalid())
            return

        # Raises when the hook fails: the request is then answered 500, never let through
        # anonymous (DESIGN section 3).
        who = await principal(scope, self.identify)

        declared = _content_length(scope)
        if declared is not None and declared > config.max_body_bytes:
            await send_error(scope, send, PayloadTooLarge(max_bytes=config.max_body_bytes))
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
        record_key = _record_key(who, method, config.pattern, key)
        lease = _encoder.encode(_InFlight(fingerprint, secrets.token_bytes(16)))

        try:
            found = await self.store.lease_acquire(record_key, lease, config.lock_ttl)
            existing = None if found is None else _decoder.decode(found)
        except Overloaded as exc:
            # This process could not ask the store in time: shed, never the failure policy.
            await send_error(scope, send, exc)
            return
        except (StoreError, msgspec.DecodeError) as exc:
            if self.on_store_error == "deny":
                logger.warning(
                    "idempotency store failed, request denied [request_id=%s]: %s",
                    ensure_request_id(scope),
                    exc,
                )
                await send_error(scope, send, ServiceUnavailable(retry_after=1.0))
                return
            logger.warning(
                "idempotency store failed, request runs without idempotency [request_id=%s]: %s",
                ensure_request_id(scope),
                exc,
            )
            await self.app(scope, receive, send)
            return

        if existing is None:
            await self._run_once(scope, receive, send, config, record_key, lease, fingerprint)
            return
        if existing.fingerprint != fingerprint:
            await send_error(scope, send, IdempotencyKeyReused())
        elif isinstance(existing, _InFlight):
            await send_error(scope, send, IdempotencyKeyInUse(IN_USE_RETRY_AFTER))
        else:
            await _replay(send, existing)

    async def _run_once(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
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

        async def capture(message: Message) -> None:
            nonlocal status, headers, size, storable, complete
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
            else:
                # http.response.pathsend, zerocopysend, ...: bytes we never see.
                storable = False
            await send(message)

        started = self.clock()
        try:
            await self.app(scope, receive, capture)
        finally:
            # Decided by the response the client received, not by how the app ended: an
            # app that raises after its complete response (a failing background task, a
            # disconnect on the last send) has done its work, and freeing the key would
            # let a retry do it again. Shielded, so a cancelled request still settles.
            final = status if complete else None
            with anyio.move_on_after(_RELEASE_TIMEOUT, shield=True):
                if final is None or not 200 <= final < 500 or final in _RETRYABLE_4XX:
                    # 5xx, no full response, or "retry later": the client may retry.
                    await self._release(scope, record_key, lease)
                elif not storable:
                    logger.warning(
                        "response over %d bytes (or not capturable) not stored; key released "
                        "[request_id=%s]",
                        config.max_response_bytes,
                        ensure_request_id(scope),
                    )
                    await self._release(scope, record_key, lease)
                else:
                    record = _Completed(fingerprint, final, _storable_headers(headers), chunks)
                    await self._keep(scope, config, record_key, lease, record, started)

    async def _keep(
        self,
        scope: Scope,
        config: _RouteConfig,
        record_key: str,
        lease: bytes,
        record: _Completed,
        started: float,
    ) -> None:
        try:
            kept = await self.store.lease_complete(
                record_key, lease, _encoder.encode(record), config.ttl
            )
        except StoreError as exc:
            # Never released here: the handler succeeded, so a retry must not run it
            # again; the in-flight lease answers 409 until it expires after lock_ttl.
            logger.warning(
                "idempotency store failed to keep a response; the key stays locked for its "
                "lock_ttl [request_id=%s]: %s",
                ensure_request_id(scope),
                exc,
            )
            return
        if not kept:
            logger.warning(
                "idempotency lease lost after %.1fs (lock_ttl=%gs); response not stored "
                "[request_id=%s]",
                self.clock() - started,
                config.lock_ttl,
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


def _record_key(who: str | None, method: str, pattern: str, key: str) -> str:
    """``idem:<digest>`` of (principal, method, route, key).

    Hashed as one unambiguous encoding: the parts are free text (a principal may hold
    ``:``) and together could pass the 256-byte key limit.
    """
    parts = _encoder.encode((who, method, pattern, key))
    return make_key("idem", hashlib.sha256(parts).hexdigest()[:40])


async def _replay(send: Send, record: _Completed) -> None:
    headers = [*record.headers, _REPLAYED_HEADER]
    await send({"type": "http.response.start", "status": record.status, "headers": headers})
    body = record.body or [b""]
    last = len(body) - 1
    for index, chunk in enumerate(body):
        await send({"type": "http.response.body", "body": chunk, "more_body": index < last})


def _content_length(scope: Scope) -> int | None:
    for name, value in scope["headers"]:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


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
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{where} {name}: {value!r} is not a number of seconds")
        if not (value > 0 and value != float("inf")):
            raise ConfigError(f"{where} {name}: {value!r} must be a positive number of seconds")
    for name in ("max_body_bytes", "max_response_bytes"):
        value = getattr(options, name)
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, int) or value < 0
        ):
            raise ConfigError(f"{where} {name}: {value!r} must be a non-negative integer")
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
