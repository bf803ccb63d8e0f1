"""Request and webhook signing: HMAC schemes, ``verify``/``sign``, ``SignatureMiddleware``.

Four schemes share one small interface (``Scheme``): ``HexHmac`` (a hex HMAC of the raw
body in one header, the seed's), ``StandardWebhooks`` (standardwebhooks.com, also sent by
Svix), ``Stripe`` (``Stripe-Signature: t=...,v1=...``) and ``GitHub``
(``X-Hub-Signature-256``). Verification is one code path for all of them: the scheme
parses its headers into a ``ParsedSignature`` (any malformed, non-ASCII, duplicated or
absurdly long value is ``InvalidSignature``, never another exception), the timestamp is
checked in both directions against a tolerance, then every configured secret (rotation) is
compared with every signature entry using ``hmac.compare_digest`` on bytes, without
stopping at the first match.

Signature timestamps are Unix wall-clock seconds chosen by the sender, so this module is
the one place in asgi_armor where a decision uses ``time.time()`` (injectable as ``now`` /
``wall_clock``); everything else in the toolkit runs on monotonic clocks.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import logging
import random
import re
import secrets as _secrets
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, TypeAlias

import anyio

from asgi_armor import _checks
from asgi_armor._asgi import (
    ASGIApp,
    Message,
    Receive,
    Scope,
    Send,
    declared_length,
    read_body,
    replay_body,
    scope_state,
)
from asgi_armor._store_policy import StorePolicy
from asgi_armor.errors import (
    ArmorError,
    ConfigError,
    InvalidSignature,
    Overloaded,
    PayloadTooLarge,
    ServiceUnavailable,
    ensure_request_id,
    send_error,
)
from asgi_armor.routes import Route, RouteBound, RouteMap
from asgi_armor.stores.base import NonceStore, OnStoreError, make_key

if TYPE_CHECKING:
    from asgi_armor.metrics import Metrics

__all__ = [
    "SCHEMES",
    "GitHub",
    "HeadersInput",
    "HexHmac",
    "ParsedSignature",
    "Scheme",
    "Secrets",
    "SignatureMiddleware",
    "SignedRoute",
    "StandardWebhooks",
    "Stripe",
    "VerifiedMessage",
    "sign",
    "verify",
]

logger = logging.getLogger("asgi_armor.signing")

#: Headers as a mapping (any case) or as raw ASGI ``(name, value)`` byte pairs.
HeadersInput: TypeAlias = Mapping[str, str] | Iterable[tuple[bytes, bytes]]
#: One secret (``str`` is used as UTF-8 unless the scheme says otherwise) or several.
Secrets: TypeAlias = str | bytes | Sequence[str | bytes]

#: Longest header value looked at; real signature headers are well under 1 KiB.
MAX_HEADER_CHARS = 4096
#: Most signature entries accepted in one header (rotation needs two or three).
MAX_SIGNATURES = 16
#: Longest message id (Standard Webhooks ``webhook-id``) accepted.
MAX_MSG_ID_CHARS = 256

_HEX = re.compile(r"[0-9a-fA-F]+")
_B64 = re.compile(r"[A-Za-z0-9+/]+={0,2}")
_TIMESTAMP = re.compile(r"[0-9]{1,15}")
_MSG_ID = re.compile(r"[\x21-\x7e]+")
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_ALGORITHMS = frozenset({"sha1", "sha256", "sha384", "sha512"})
_DIGEST_SIZE = {name: hashlib.new(name).digest_size for name in _ALGORITHMS}

_MALFORMED = "malformed_signature"
_MISSING = "missing_signature"

#: Backoff between two store calls that settle a replay-cache entry the store missed
#: (seconds, doubled up to the cap, jittered).
_RETRY_FIRST = 0.05
_RETRY_MAX = 1.0
#: Seconds forgetting a failed delivery may take when it runs shielded from cancellation;
#: past it, it is retried after the response.
_FORGET_TIMEOUT = 1.0


# -- header access -------------------------------------------------------------------


class _HeaderView(Mapping[str, str]):
    """Case-insensitive access to the few headers a scheme needs, validated on lookup.

    Only the headers a scheme asks for are checked, so a non-ASCII value in an
    unrelated header does not reject the request.
    """

    __slots__ = ("_map",)

    def __init__(self, headers: HeadersInput) -> None:
        found: dict[str, list[object]] = {}
        items: Iterable[object] = headers.items() if isinstance(headers, Mapping) else headers
        for item in items:
            # ASGI allows any two-item iterable per header, lists included.
            if not isinstance(item, tuple | list) or len(item) != 2:
                continue
            name, value = item
            if isinstance(name, bytes | bytearray):
                name = bytes(name).decode("latin-1")
            elif not isinstance(name, str):
                continue
            found.setdefault(name.lower(), []).append(value)
        self._map = found

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name.lower() in self._map

    def __getitem__(self, name: str) -> str:
        value = self.lookup(name)
        if value is None:
            raise KeyError(name)
        return value

    def __iter__(self) -> Iterator[str]:
        return iter(self._map)

    def __len__(self) -> int:
        return len(self._map)

    def lookup(self, name: str) -> str | None:
        """The stripped ASCII value of ``name``; None when absent or empty.

        Raises:
            InvalidSignature: malformed_signature when the header is repeated (which
                copy would be signed is ambiguous), not ASCII, or over MAX_HEADER_CHARS.
        """
        values = self._map.get(name.lower())
        if not values:
            return None
        if len(values) > 1:
            raise InvalidSignature(_MALFORMED, field=name)
        raw = values[0]
        if isinstance(raw, bytes | bytearray):
            if len(raw) > MAX_HEADER_CHARS:
                raise InvalidSignature(_MALFORMED, field=name)
            try:
                value = bytes(raw).decode("ascii")
            except UnicodeDecodeError:
                raise InvalidSignature(_MALFORMED, field=name) from None
        elif isinstance(raw, str):
            if len(raw) > MAX_HEADER_CHARS or not raw.isascii():
                raise InvalidSignature(_MALFORMED, field=name)
            value = raw
        else:
            raise InvalidSignature(_MALFORMED, field=name)
        return value.strip(" \t") or None

    def require(self, name: str) -> str:
        """Like ``lookup``, but a missing header is missing_signature."""
        value = self.lookup(name)
        if value is None:
            raise InvalidSignature(_MISSING, field=name)
        return value


def _view(headers: HeadersInput | _HeaderView) -> _HeaderView:
    return headers if isinstance(headers, _HeaderView) else _HeaderView(headers)


def _parse_hex(value: str, algorithm: str, field: str) -> bytes:
    if len(value) != 2 * _DIGEST_SIZE[algorithm] or not _HEX.fullmatch(value):
        raise InvalidSignature(_MALFORMED, field=field)
    return bytes.fromhex(value)


def _parse_b64(value: str, algorithm: str, field: str) -> bytes:
    if len(value) > 2 * _DIGEST_SIZE[algorithm] or not _B64.fullmatch(value):
        raise InvalidSignature(_MALFORMED, field=field)
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidSignature(_MALFORMED, field=field) from None
    if len(raw) != _DIGEST_SIZE[algorithm]:
        raise InvalidSignature(_MALFORMED, field=field)
    return raw


def _parse_timestamp(value: str, field: str) -> int:
    if not _TIMESTAMP.fullmatch(value):
        raise InvalidSignature(_MALFORMED, field=field)
    return int(value)


def _check_header_name(name: str, what: str) -> None:
    if not _TOKEN.fullmatch(name):
        raise ConfigError(f"{what}: {name!r} is not a valid header name")


def _utf8(secret: str | bytes) -> bytes:
    return secret.encode("utf-8") if isinstance(secret, str) else bytes(secret)


# -- schemes -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ParsedSignature:
    """What a scheme read from the headers, before any cryptography.

    Attributes:
        signatures: every candidate signature (raw digest bytes) for the expected version.
        timestamp: the signed Unix timestamp, for schemes that have one.
        msg_id: the signed message id, for schemes that have one.
        field: the signature header it came from (named in errors).
        timestamp_field: the header (or header part) holding the timestamp.
    """

    signatures: tuple[bytes, ...]
    timestamp: int | None = None
    msg_id: str | None = None
    field: str = ""
    timestamp_field: str | None = None


@dataclass(frozen=True, slots=True)
class VerifiedMessage:
    """A verified signature: returned by ``verify``, kept in ``scope["state"]["signature"]``.

    Attributes:
        scheme: the scheme's name (``"hex-hmac"``, ``"standard-webhooks"``, ...).
        timestamp: the signed timestamp, if the scheme has one.
        msg_id: the signed message id, if the scheme has one (use it to deduplicate).
        secret_index: which of the configured secrets matched (0 = first); watch it to
            know when an old secret can be retired.
        replay_id: what identifies this exact signed message in the replay cache.
    """

    scheme: str
    timestamp: int | None
    msg_id: str | None
    secret_index: int
    replay_id: str


def _challenge(name: str, header: str) -> str:
    return f'Signature scheme="{name}", header="{header}"'


class Scheme(ABC):
    """How one signing convention puts an HMAC in headers.

    Subclasses are frozen, slotted dataclasses; their fields are options (header names).
    """

    __slots__ = ()

    #: Stable name used in config (``scheme = "stripe"``) and in ``VerifiedMessage``.
    name: ClassVar[str]
    #: The hash under the HMAC.
    algorithm: str = "sha256"

    @abstractmethod
    def extract(self, headers: HeadersInput) -> ParsedSignature:
        """Parse this scheme's headers.

        Raises:
            InvalidSignature: missing_signature or malformed_signature.
        """

    def challenge(self) -> str:
        """The ``WWW-Authenticate`` value of a 401 on this scheme's routes (RFC 9110 11.6.1).

        ``Signature`` with the scheme's name and, where it has one, its signature header:
        ``Signature scheme="stripe", header="Stripe-Signature"``.
        """
        return f'Signature scheme="{self.name}"'

    def payload_prefix(self, parsed: ParsedSignature) -> bytes:
        """What is signed before the raw body (empty when only the body is signed)."""
        return b""

    def signed_payload(self, parsed: ParsedSignature, body: bytes) -> bytes:
        """The exact bytes the HMAC covers."""
        return self.payload_prefix(parsed) + body

    def key(self, secret: str | bytes) -> bytes:
        """The HMAC key for a configured secret (``str`` as UTF-8, ``bytes`` as is).

        Raises:
            ConfigError: the secret is empty or cannot be decoded.
        """
        key = _utf8(secret)
        if not key:
            raise ConfigError("the secret is empty")
        return key

    def expected(self, parsed: ParsedSignature, body: bytes, key: bytes) -> bytes:
        """The digest a correct sender computes with ``key``."""
        # Hashed in two updates so that a large body is never copied into a new buffer.
        mac = hmac.new(key, self.payload_prefix(parsed), self.algorithm)
        mac.update(body)
        return mac.digest()

    @abstractmethod
    def sign(
        self,
        body: bytes,
        secret: str | bytes,
        *,
        timestamp: int | None = None,
        msg_id: str | None = None,
    ) -> dict[str, str]:
        """The headers a sender adds to ``body`` (a timestamp and id are made if needed)."""


@dataclass(frozen=True, slots=True)
class HexHmac(Scheme):
    """A hex HMAC of the raw body in one header (the seed's ``X-Signature``).

    Without ``timestamp_header`` nothing but the body is signed, so a captured request
    stays valid forever: the middleware's replay cache only stops repeats within its
    window. With ``timestamp_header`` the signed content is ``{timestamp}.{body}`` and the
    timestamp must be within the tolerance.

    Args:
        header: the signature header.
        algorithm: ``sha256`` (default), ``sha1``, ``sha384`` or ``sha512``.
        prefix_optional: a prefix (``sha256=``) accepted, but not required, before the hex.
        timestamp_header: a header with the signed Unix timestamp, or None.

    Raises:
        ConfigError: unknown algorithm or invalid header name.
    """

    name: ClassVar[str] = "hex-hmac"

    header: str = "X-Signature"
    algorithm: str = "sha256"
    prefix_optional: str | None = "sha256="
    timestamp_header: str | None = None

    def __post_init__(self) -> None:
        if self.algorithm not in _ALGORITHMS:
            raise ConfigError(
                f"HexHmac.algorithm: {self.algorithm!r} is not one of {sorted(_ALGORITHMS)}"
            )
        _check_header_name(self.header, "HexHmac.header")
        if self.timestamp_header is not None:
            _check_header_name(self.timestamp_header, "HexHmac.timestamp_header")

    def extract(self, headers: HeadersInput) -> ParsedSignature:
        """See ``Scheme.extract``."""
        view = _view(headers)
        value = view.require(self.header)
        prefix = self.prefix_optional
        if prefix and value[: len(prefix)].lower() == prefix.lower():
            value = value[len(prefix) :]
        signature = _parse_hex(value, self.algorithm, self.header)
        timestamp = None
        if self.timestamp_header is not None:
            timestamp = _parse_timestamp(view.require(self.timestamp_header), self.timestamp_header)
        return ParsedSignature((signature,), timestamp, None, self.header, self.timestamp_header)

    def challenge(self) -> str:
        """See ``Scheme.challenge``."""
        return _challenge(self.name, self.header)

    def payload_prefix(self, parsed: ParsedSignature) -> bytes:
        """``{timestamp}.`` when a timestamp header is configured, else nothing."""
        return b"" if parsed.timestamp is None else b"%d." % parsed.timestamp

    def sign(
        self,
        body: bytes,
        secret: str | bytes,
        *,
        timestamp: int | None = None,
        msg_id: str | None = None,
    ) -> dict[str, str]:
        """See ``Scheme.sign``: ``{header: hex}`` (plus the timestamp header if configured)."""
        parsed = ParsedSignature(())
        headers: dict[str, str] = {}
        if self.timestamp_header is not None:
            ts = int(time.time()) if timestamp is None else timestamp
            parsed = ParsedSignature((), ts)
            headers[self.timestamp_header] = str(ts)
        headers[self.header] = self.expected(parsed, body, self.key(secret)).hex()
        return headers


@dataclass(frozen=True, slots=True)
class StandardWebhooks(Scheme):
    """Standard Webhooks (https://www.standardwebhooks.com/), as sent by Svix and others.

    Headers ``webhook-id``, ``webhook-timestamp``, ``webhook-signature`` (or their
    ``svix-`` aliases); signed content ``{id}.{timestamp}.{body}``; the signature header
    holds space-separated ``v1,<base64>`` entries (other versions, like the asymmetric
    ``v1a``, are skipped). A ``str`` secret starting with ``whsec_`` is base64-decoded to
    the key bytes, as the official libraries do; any other ``str`` is used as UTF-8 and
    ``bytes`` are used as they are.

    Args:
        svix_aliases: also read ``svix-id``/``svix-timestamp``/``svix-signature`` when the
            ``webhook-`` header is absent.
    """

    name: ClassVar[str] = "standard-webhooks"
    _PREFIXES: ClassVar[tuple[str, ...]] = ("webhook-",)
    _PREFIXES_SVIX: ClassVar[tuple[str, ...]] = ("webhook-", "svix-")

    svix_aliases: bool = True

    def _pick(self, view: _HeaderView, suffix: str) -> tuple[str, str]:
        prefixes = self._PREFIXES_SVIX if self.svix_aliases else self._PREFIXES
        for prefix in prefixes:
            name = prefix + suffix
            if name in view:
                return view.require(name), name
        raise InvalidSignature(_MISSING, field="webhook-" + suffix)

    def extract(self, headers: HeadersInput) -> ParsedSignature:
        """See ``Scheme.extract``."""
        view = _view(headers)
        raw_signatures, sig_field = self._pick(view, "signature")
        msg_id, id_field = self._pick(view, "id")
        raw_timestamp, ts_field = self._pick(view, "timestamp")
        if len(msg_id) > MAX_MSG_ID_CHARS or not _MSG_ID.fullmatch(msg_id):
            raise InvalidSignature(_MALFORMED, field=id_field)
        timestamp = _parse_timestamp(raw_timestamp, ts_field)
        entries = raw_signatures.split()
        if len(entries) > MAX_SIGNATURES:
            raise InvalidSignature(_MALFORMED, field=sig_field)
        signatures = []
        for entry in entries:
            version, comma, value = entry.partition(",")
            if not comma or not version or not value:
                raise InvalidSignature(_MALFORMED, field=sig_field)
            if version == "v1":
                signatures.append(_parse_b64(value, self.algorithm, sig_field))
        if not signatures:
            raise InvalidSignature(_MALFORMED, field=sig_field)
        return ParsedSignature(tuple(signatures), timestamp, msg_id, sig_field, ts_field)

    def challenge(self) -> str:
        """See ``Scheme.challenge``."""
        return _challenge(self.name, "webhook-signature")

    def payload_prefix(self, parsed: ParsedSignature) -> bytes:
        """``{id}.{timestamp}.``"""
        return f"{parsed.msg_id}.{parsed.timestamp}.".encode("ascii")

    def key(self, secret: str | bytes) -> bytes:
        """See ``Scheme.key``; ``whsec_<base64>`` is decoded (missing padding tolerated).

        Raises:
            ConfigError: empty secret, or a ``whsec_`` secret that is not base64.
        """
        if isinstance(secret, str) and secret.startswith("whsec_"):
            encoded = secret[len("whsec_") :]
            encoded += "=" * (-len(encoded) % 4)
            try:
                key = base64.b64decode(encoded, validate=True)
            except (binascii.Error, ValueError):
                raise ConfigError("a whsec_ secret must be base64 after the prefix") from None
            if not key:
                raise ConfigError("the secret is empty")
            return key
        return Scheme.key(self, secret)

    def sign(
        self,
        body: bytes,
        secret: str | bytes,
        *,
        timestamp: int | None = None,
        msg_id: str | None = None,
    ) -> dict[str, str]:
        """See ``Scheme.sign``: ``webhook-id``, ``webhook-timestamp``, ``webhook-signature``."""
        ts = int(time.time()) if timestamp is None else timestamp
        mid = msg_id if msg_id is not None else "msg_" + _secrets.token_hex(12)
        if len(mid) > MAX_MSG_ID_CHARS or not _MSG_ID.fullmatch(mid):
            raise ValueError("msg_id must be 1..256 printable ASCII characters without spaces")
        parsed = ParsedSignature((), ts, mid)
        digest = self.expected(parsed, body, self.key(secret))
        return {
            "webhook-id": mid,
            "webhook-signature": "v1," + base64.b64encode(digest).decode("ascii"),
            "webhook-timestamp": str(ts),
        }


@dataclass(frozen=True, slots=True)
class Stripe(Scheme):
    """Stripe's ``Stripe-Signature: t=<ts>,v1=<hex>[,v1=<hex>...]``.

    Signed content ``{t}.{body}``, HMAC-SHA256 in hex. The secret (``whsec_...``) is used
    exactly as Stripe's library does: the whole string as UTF-8, prefix included. ``v0``
    and unknown entries are ignored; a header with no ``v1`` entry is malformed.

    Args:
        header: the signature header.
    """

    name: ClassVar[str] = "stripe"

    header: str = "Stripe-Signature"

    def __post_init__(self) -> None:
        _check_header_name(self.header, "Stripe.header")

    def extract(self, headers: HeadersInput) -> ParsedSignature:
        """See ``Scheme.extract``."""
        value = _view(headers).require(self.header)
        items = value.split(",")
        if len(items) > MAX_SIGNATURES + 2:
            raise InvalidSignature(_MALFORMED, field=self.header)
        timestamp: int | None = None
        signatures = []
        for item in items:
            key, eq, part = item.strip(" \t").partition("=")
            if not eq or not key:
                raise InvalidSignature(_MALFORMED, field=self.header)
            if key == "t":
                if timestamp is not None:
                    raise InvalidSignature(_MALFORMED, field=self.header)
                timestamp = _parse_timestamp(part, self.header)
            elif key == "v1":
                signatures.append(_parse_hex(part, self.algorithm, self.header))
        if timestamp is None or not signatures:
            raise InvalidSignature(_MALFORMED, field=self.header)
        return ParsedSignature(tuple(signatures), timestamp, None, self.header, self.header)

    def challenge(self) -> str:
        """See ``Scheme.challenge``."""
        return _challenge(self.name, self.header)

    def payload_prefix(self, parsed: ParsedSignature) -> bytes:
        """``{t}.``"""
        return b"%d." % (parsed.timestamp or 0)

    def sign(
        self,
        body: bytes,
        secret: str | bytes,
        *,
        timestamp: int | None = None,
        msg_id: str | None = None,
    ) -> dict[str, str]:
        """See ``Scheme.sign``: ``{"Stripe-Signature": "t=...,v1=..."}``."""
        ts = int(time.time()) if timestamp is None else timestamp
        digest = self.expected(ParsedSignature((), ts), body, self.key(secret))
        return {self.header: f"t={ts},v1={digest.hex()}"}


@dataclass(frozen=True, slots=True)
class GitHub(Scheme):
    """GitHub's ``X-Hub-Signature-256: sha256=<hex>`` of the raw body.

    GitHub signs no timestamp, so a captured delivery stays valid; the replay cache keys
    on the body, not on ``X-GitHub-Delivery`` (which is not signed and so can be changed
    by whoever replays).

    Args:
        header: the signature header.
    """

    name: ClassVar[str] = "github"

    header: str = "X-Hub-Signature-256"

    def __post_init__(self) -> None:
        _check_header_name(self.header, "GitHub.header")

    def extract(self, headers: HeadersInput) -> ParsedSignature:
        """See ``Scheme.extract``."""
        value = _view(headers).require(self.header)
        if value[:7].lower() != "sha256=":
            raise InvalidSignature(_MALFORMED, field=self.header)
        signature = _parse_hex(value[7:], self.algorithm, self.header)
        return ParsedSignature((signature,), None, None, self.header)

    def challenge(self) -> str:
        """See ``Scheme.challenge``."""
        return _challenge(self.name, self.header)

    def sign(
        self,
        body: bytes,
        secret: str | bytes,
        *,
        timestamp: int | None = None,
        msg_id: str | None = None,
    ) -> dict[str, str]:
        """See ``Scheme.sign``: ``{"X-Hub-Signature-256": "sha256=<hex>"}``."""
        digest = self.expected(ParsedSignature(()), body, self.key(secret))
        return {self.header: "sha256=" + digest.hex()}


#: Schemes by config name (``[[signature]] scheme = "stripe"``).
SCHEMES: Mapping[str, type[Scheme]] = {
    cls.name: cls for cls in (GitHub, HexHmac, StandardWebhooks, Stripe)
}


# -- verify / sign -------------------------------------------------------------------


def _keys(secrets: Secrets, scheme: Scheme, where: str) -> tuple[bytes, ...]:
    items: list[str | bytes] = (
        [secrets] if isinstance(secrets, str | bytes | bytearray) else list(secrets)
    )
    if not items:
        raise ConfigError(f"{where}: no secret configured")
    keys = []
    for index, secret in enumerate(items):
        if not isinstance(secret, str | bytes | bytearray):
            raise ConfigError(f"{where}: secret #{index} is not str or bytes")
        try:
            keys.append(scheme.key(secret))
        except ConfigError as exc:
            raise ConfigError(f"{where}: secret #{index}: {exc}") from None
    return tuple(keys)


def _check_tolerance(tolerance: float, where: str) -> None:
    _checks.seconds(tolerance, f"{where}: tolerance")


def _verify(
    view: _HeaderView,
    body: bytes,
    keys: Sequence[bytes],
    scheme: Scheme,
    tolerance: float,
    now: float,
) -> VerifiedMessage:
    parsed = scheme.extract(view)
    if parsed.timestamp is not None and abs(now - parsed.timestamp) > tolerance:
        # Checked before any HMAC work: a stale message is refused cheaply.
        raise InvalidSignature("timestamp_out_of_tolerance", field=parsed.timestamp_field)
    matched = -1
    # Every secret against every entry, no early exit: the time taken depends only on
    # how many there are, never on which one matched.
    for index, key in enumerate(keys):
        digest = scheme.expected(parsed, body, key)
        for signature in parsed.signatures:
            if hmac.compare_digest(digest, signature) and matched < 0:
                matched = index
    if matched < 0:
        raise InvalidSignature("signature_mismatch", field=parsed.field)
    if parsed.msg_id is not None:
        # The id and the timestamp are both signed: an exact replay repeats both, while
        # a sender's legitimate retry (new timestamp) still gets through.
        replay_id = f"{parsed.msg_id}:{parsed.timestamp}"
    else:
        # Secret-independent, so a message signed with the old and the new secret is
        # still one message.
        content = hashlib.sha256(scheme.payload_prefix(parsed))
        content.update(body)
        replay_id = content.hexdigest()
    return VerifiedMessage(scheme.name, parsed.timestamp, parsed.msg_id, matched, replay_id)


def verify(
    headers: HeadersInput,
    body: bytes,
    secrets: Secrets,
    scheme: Scheme | None = None,
    *,
    tolerance: float = 300,
    now: float | None = None,
    max_body_bytes: int | None = None,
) -> VerifiedMessage:
    """Check that ``body`` was signed with one of ``secrets`` under ``scheme``.

    Args:
        headers: the request headers (a mapping, any case, or raw ASGI byte pairs).
        body: the raw body, exactly as received.
        secrets: one secret or several (rotation: old and new both verify).
        scheme: default ``HexHmac()``.
        tolerance: seconds a signed timestamp may be off, in either direction.
        now: current Unix time (default ``time.time()``): signatures are about wall time.
        max_body_bytes: refuse to hash a larger body.

    Returns:
        The verified message (its timestamp, id, which secret matched).

    Raises:
        InvalidSignature: with detail code missing_signature, malformed_signature,
            timestamp_out_of_tolerance or signature_mismatch.
        PayloadTooLarge: ``body`` is over ``max_body_bytes``.
        ConfigError: no secret, an empty one, or a bad tolerance (a programming error).
    """
    scheme = HexHmac() if scheme is None else scheme
    _check_tolerance(tolerance, "verify")
    keys = _keys(secrets, scheme, "verify")
    if max_body_bytes is not None and len(body) > max_body_bytes:
        raise PayloadTooLarge(max_bytes=max_body_bytes)
    current = time.time() if now is None else now
    try:
        return _verify(_HeaderView(headers), body, keys, scheme, tolerance, current)
    except InvalidSignature as exc:
        exc.headers["WWW-Authenticate"] = scheme.challenge()
        raise


def sign(
    body: bytes,
    secret: str | bytes,
    scheme: Scheme | None = None,
    *,
    timestamp: int | None = None,
    msg_id: str | None = None,
) -> dict[str, str]:
    """The headers that sign ``body`` with ``secret`` (for clients and tests).

    Args:
        body: the exact bytes that will be sent.
        secret: the shared secret.
        scheme: default ``HexHmac()``.
        timestamp: Unix seconds to sign (default now), for schemes with a timestamp.
        msg_id: the message id (default a random one), for Standard Webhooks.

    Raises:
        ConfigError: the secret is empty or not decodable for the scheme.
        ValueError: ``msg_id`` is not 1..256 printable ASCII characters.
    """
    scheme = HexHmac() if scheme is None else scheme
    return scheme.sign(body, secret, timestamp=timestamp, msg_id=msg_id)


# -- middleware ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SignedRoute:
    """What one signed route requires.

    Args:
        scheme: the signing convention.
        secrets: one secret or several (rotation).
        tolerance: overrides the middleware's tolerance for this route.
        replay_protection: overrides the middleware's ``replay_protection`` for this route.
    """

    scheme: Scheme
    secrets: Secrets
    tolerance: float | None = None
    replay_protection: bool | None = None


@dataclass(frozen=True, slots=True)
class _Compiled:
    pattern: str
    scheme: Scheme
    keys: tuple[bytes, ...]
    tolerance: float
    replay_protection: bool


@dataclass(slots=True)
class _Intent:
    """What the store must end up holding for one message id, while it does not yet.

    ``remember``: an accepted delivery, remembered only here so far. Otherwise a delivery
    that was not handled, whose id the store may still hold: its retry must get through.
    """

    remember: bool
    expires: float  # monotonic end of the replay window
    # The request whose task brings the store in line after its response; None for a note
    # kept here only (an id the store may hold after a call whose answer was lost).
    owner: object | None


def _count_invalid(metrics: Metrics, scheme: Scheme, exc: InvalidSignature) -> None:
    """The metrics hook for a refused signature: replayed, or invalid."""
    metrics.signature(scheme.name, "replayed" if exc.code == "replayed" else "invalid")


class SignatureMiddleware(RouteBound[_Compiled]):
    """Verify request signatures on configured routes before the app sees the request.

    On a matching route the body is read (capped), verified, its message remembered in
    the store for ``2 * tolerance`` seconds (a second delivery is 401 replayed), and the
    exact raw bytes are replayed to the app, with the ``VerifiedMessage`` in
    ``scope["state"]["signature"]``. Other routes and non-HTTP scopes pass untouched.

    Args:
        app: the ASGI app to wrap.
        routes: ``{"POST /webhooks/stripe": SignedRoute(Stripe(), "whsec_...")}``, or
            ``(scheme, secrets)`` tuples in place of ``SignedRoute``; a mapping or pairs.
        store: the replay cache (any ``NonceStore``); default a new ``MemoryStore()``.
        tolerance: seconds a signed timestamp may be off, in either direction.
        max_body_bytes: larger bodies are refused with 413 before hashing.
        replay_protection: remember verified messages and refuse repeats.
        on_store_error: ``"deny"`` (503 service_unavailable, default) or ``"allow"``
            (accept the message, remembered in this process until the store takes it)
            when the store fails.
        max_pending: most message ids held in this process while the store cannot take
            them; past it a delivery the store cannot remember is refused (503) and the
            drop is logged and counted in ``pending_dropped``.
        wall_clock: current Unix time (``time.time``); inject a fake one in tests.
        logger: where store failures are logged.
        metrics: where verifications (valid, invalid, replayed) and store failures are
            counted.

    Raises:
        ConfigError: no routes, a route with no (or an empty) secret, a bad pattern,
            tolerance, body cap or store policy; the message names the route.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        routes: Mapping[str, SignedRoute | tuple[Scheme, Secrets]]
        | Iterable[tuple[str, SignedRoute | tuple[Scheme, Secrets]]],
        store: NonceStore | None = None,
        tolerance: float = 300,
        max_body_bytes: int = 1_048_576,
        replay_protection: bool = True,
        on_store_error: OnStoreError = "deny",
        max_pending: int = 10_000,
        wall_clock: Callable[[], float] = time.time,
        logger: logging.Logger = logger,
        metrics: Metrics | None = None,
    ) -> None:
        self._metrics = metrics
        _check_tolerance(tolerance, "signature tolerance")
        _checks.count(max_pending, "signature max_pending", minimum=0)
        _checks.count(max_body_bytes, "signature max_body_bytes")
        self._policy = StorePolicy(
            on_store_error,
            what="signature replay cache",
            allowing="delivery accepted, its id held here",
            denying="delivery refused (503)",
            entry="signature on_store_error",
            logger=logger,
            concern="signature",
            metrics=metrics,
        )
        entries = routes.items() if isinstance(routes, Mapping) else routes
        compiled: list[tuple[Route, _Compiled]] = []
        for pattern, spec in entries:
            where = f"signature route {pattern!r}"
            if isinstance(spec, tuple):
                if len(spec) != 2:
                    raise ConfigError(f"{where}: expected SignedRoute or (scheme, secrets)")
                spec = SignedRoute(spec[0], spec[1])
            if not isinstance(spec, SignedRoute) or not isinstance(spec.scheme, Scheme):
                raise ConfigError(f"{where}: expected SignedRoute or (scheme, secrets)")
            route_tolerance = tolerance if spec.tolerance is None else spec.tolerance
            _check_tolerance(route_tolerance, where)
            keys = _keys(spec.secrets, spec.scheme, where)
            remember = (
                replay_protection if spec.replay_protection is None else spec.replay_protection
            )
            compiled.append(
                (Route(pattern), _Compiled(pattern, spec.scheme, keys, route_tolerance, remember))
            )
        if not compiled:
            raise ConfigError("signature routes: at least one route is required")
        if store is None:
            from asgi_armor.stores.memory import MemoryStore

            store = MemoryStore()
        self.app = app
        self.routes: RouteMap[_Compiled] = RouteMap(compiled)
        self.store = store
        self.max_body_bytes = max_body_bytes
        self.replay_protection = replay_protection
        self.on_store_error: OnStoreError = on_store_error
        self.max_pending = max_pending
        self.wall_clock = wall_clock
        self.logger = logger
        # Replay-cache entries the store missed, by nonce key: process-wide, like the store.
        self._intents: dict[str, _Intent] = {}
        #: Deliveries whose id could not be held because max_pending was reached.
        self.pending_dropped = 0

    @property
    def pending(self) -> int:
        """How many message ids this process holds until the store takes them (or drops them)."""
        return len(self._intents)

    async def run(
        self, scope: Scope, receive: Receive, send: Send, app: ASGIApp, route: _Compiled
    ) -> None:
        """Verify the request's signature (and replay id) for ``route``, then run ``app``."""
        me = object()  # this request, as the owner of a replay-cache entry it must settle
        nonce: str | None = None
        try:
            try:
                body = await self._read(scope, receive)
                message = _verify(
                    _HeaderView(scope["headers"]),
                    body,
                    route.keys,
                    route.scheme,
                    route.tolerance,
                    self.wall_clock(),
                )
                if route.replay_protection:
                    nonce = make_key("nonce", route.pattern, message.replay_id)
                    await self._admit(scope, route, nonce, me)
            except ArmorError as exc:
                if isinstance(exc, InvalidSignature):
                    exc.headers["WWW-Authenticate"] = route.scheme.challenge()
                    if self._metrics is not None:
                        _count_invalid(self._metrics, route.scheme, exc)
                await send_error(scope, send, exc)
                return
            if self._metrics is not None:
                self._metrics.signature(route.scheme.name, "valid")
            scope_state(scope)["signature"] = message
            if nonce is None:
                await app(scope, replay_body(body, receive), send)
                return
            status = 500

            async def watch_status(reply: Message) -> None:
                nonlocal status
                if reply["type"] == "http.response.start":
                    status = reply["status"]
                await send(reply)

            try:
                await app(scope, replay_body(body, receive), watch_status)
            finally:
                if status >= 500:
                    # The app failed to handle the message: a sender retrying the same
                    # signed request must get through, not be refused as a replay.
                    await self._unadmit(scope, route, nonce, me)
        finally:
            # After the response, in this request's task: an entry the store missed is
            # written (or deleted) there until it lands.
            intent = None if nonce is None else self._intents.get(nonce)
            if intent is not None and intent.owner is me:
                assert nonce is not None
                await self._settle(scope, nonce, intent)

    async def _read(self, scope: Scope, receive: Receive) -> bytes:
        # Refused before reading when the client announces too much.
        declared_length(scope, self.max_body_bytes)
        return await read_body(receive, self.max_body_bytes)

    async def _admit(self, scope: Scope, route: _Compiled, key: str, me: object) -> None:
        """Record a verified delivery as seen, or raise: replayed, or the store failed."""
        intent = self._intents.get(key) if self._intents else None
        if intent is not None and intent.expires <= time.monotonic():
            intent = None  # its replay window is over; the store has dropped the id too
        if intent is not None:
            if intent.remember:
                # Accepted here already; the store has not taken it yet.
                raise InvalidSignature("replayed")
            # The retry of a delivery that was not handled, whose id the store may still
            # hold. Claimed before any await, so a concurrent copy is refused.
            intent.remember = True
        window = 2 * route.tolerance
        try:
            new = await self.store.remember(key, window)
        except Overloaded:
            # This process is overloaded, not the store (the call was never sent): shed,
            # never the policy.
            if intent is not None:
                intent.remember = False
            raise
        except Exception as exc:
            try:
                self._policy.failed(exc, ensure_request_id(scope))
            except ServiceUnavailable as unavailable:
                if intent is not None:
                    intent.remember = False
                else:
                    # The call may have run in the store although its answer was lost;
                    # noted, so the retry of this delivery reaching this process is not
                    # refused as a replay of it.
                    self._hold(scope, key, False, window, None)
                raise unavailable from None
            if intent is not None:
                if intent.owner is None:
                    intent.owner = me
            elif not self._hold(scope, key, True, window, me):
                # Past the bound: refused rather than accepted unremembered, so a replay
                # can never run twice.
                raise ServiceUnavailable(retry_after=1.0) from None
            return
        if intent is not None:
            if intent.owner is None and self._intents.get(key) is intent:
                del self._intents[key]  # a note only, and the store holds the id now
            return
        if not new:
            raise InvalidSignature("replayed")

    def _hold(
        self, scope: Scope, key: str, remember: bool, window: float, owner: object | None
    ) -> bool:
        """Hold what the store must end up with for ``key``; False past ``max_pending``."""
        now = time.monotonic()
        current = self._intents.get(key)
        if current is not None and current.expires > now:
            # Another copy of this delivery got here during our store call.
            if remember and current.remember:
                raise InvalidSignature("replayed")
            current.remember = current.remember or remember
            if current.owner is None:
                current.owner = owner
            return True
        if len(self._intents) >= self.max_pending:
            for stale in [
                k for k, i in self._intents.items() if i.owner is None and i.expires <= now
            ]:
                del self._intents[stale]
        if len(self._intents) >= self.max_pending:
            self.pending_dropped += 1
            self.logger.error(
                "replay cache: the store missed a message id and it cannot be held here "
                "(max_pending=%d reached) [request_id=%s]",
                self.max_pending,
                ensure_request_id(scope),
            )
            return False
        self._intents[key] = _Intent(remember, now + window, owner)
        return True

    async def _unadmit(self, scope: Scope, route: _Compiled, key: str, me: object) -> None:
        """Forget a delivery the app failed to handle, so its retry is not a replay."""
        intent = self._intents.get(key)
        if intent is not None:
            intent.remember = False  # its owner's task forgets it in the store
            if intent.owner is None:
                intent.owner = me
            return
        forgotten = False
        with anyio.move_on_after(_FORGET_TIMEOUT, shield=True):
            try:
                await self.store.forget(key)
                forgotten = True
            except Exception as exc:
                self.logger.warning(
                    "replay cache could not forget a failed message; retried after the "
                    "response [request_id=%s]: %s",
                    ensure_request_id(scope),
                    type(exc).__name__,
                )
        if not forgotten:
            self._hold(scope, key, False, 2 * route.tolerance, me)

    async def _settle(self, scope: Scope, key: str, intent: _Intent) -> None:
        """Bring the store to what ``intent`` says, with backoff, within the replay window.

        Runs in the request's task once its response is complete, shielded: the sender is
        not waiting. Another delivery may change the intent meanwhile; it is followed.
        """
        delay = _RETRY_FIRST
        settled = False
        try:
            with anyio.move_on_after(max(0.0, intent.expires - time.monotonic()), shield=True):
                while not settled:
                    # Jitter, so held entries do not all hit a returning store at once.
                    await anyio.sleep(delay * (0.5 + random.random() / 2))  # noqa: S311
                    wanted = intent.remember
                    try:
                        if wanted:
                            ttl = max(intent.expires - time.monotonic(), 1.0)
                            await self.store.remember(key, ttl)
                        else:
                            await self.store.forget(key)
                    except Exception:
                        delay = min(2 * delay, _RETRY_MAX)
                        continue
                    # Another delivery may have changed what is wanted during the call.
                    settled = intent.remember == wanted
                    delay = _RETRY_FIRST
        finally:
            if self._intents.get(key) is intent:
                del self._intents[key]
        if settled:
            self.logger.info(
                "replay cache caught up with a message id [request_id=%s]",
                ensure_request_id(scope),
            )
        else:
            # The replay window is over: the store would have dropped the id by now.
            self.logger.warning(
                "replay cache: the store did not answer within the replay window; the "
                "message id is no longer held [request_id=%s]",
                ensure_request_id(scope),
            )

    def __repr__(self) -> str:
        patterns = [route.pattern for _, route in self.routes.entries]
        return f"SignatureMiddleware(routes={patterns!r})"
