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
import re
import secrets as _secrets
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar, TypeAlias

import anyio

from asgi_armor._asgi import (
    ASGIApp,
    Message,
    Receive,
    Scope,
    Send,
    get_header,
    read_body,
    replay_body,
    scope_state,
)
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
from asgi_armor.routes import Route, RouteMap, target
from asgi_armor.stores.base import NonceStore, OnStoreError, make_key

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
    if not tolerance > 0:
        raise ConfigError(f"{where}: tolerance must be a positive number of seconds")


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


class SignatureMiddleware:
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
            (accept the message unremembered) when the store fails.
        wall_clock: current Unix time (``time.time``); inject a fake one in tests.
        logger: where store failures are logged.

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
        wall_clock: Callable[[], float] = time.time,
        logger: logging.Logger = logger,
    ) -> None:
        _check_tolerance(tolerance, "signature tolerance")
        if max_body_bytes < 1:
            raise ConfigError("signature max_body_bytes: must be at least 1")
        if on_store_error not in ("allow", "deny"):
            raise ConfigError(
                f"signature on_store_error: {on_store_error!r} is not 'allow' or 'deny'"
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
        self.wall_clock = wall_clock
        self.logger = logger

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        found = self.routes.first(*target(scope))
        if found is None:
            await self.app(scope, receive, send)
            return
        route = found[0]
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
            nonce = await self._remember(scope, route, message) if route.replay_protection else None
        except ArmorError as exc:
            if isinstance(exc, InvalidSignature):
                exc.headers["WWW-Authenticate"] = route.scheme.challenge()
            await send_error(scope, send, exc)
            return
        scope_state(scope)["signature"] = message
        if nonce is None:
            await self.app(scope, replay_body(body, receive), send)
            return
        status = 500

        async def watch_status(reply: Message) -> None:
            nonlocal status
            if reply["type"] == "http.response.start":
                status = reply["status"]
            await send(reply)

        try:
            await self.app(scope, replay_body(body, receive), watch_status)
        finally:
            if status >= 500:
                # The app failed to handle the message: a sender retrying the same
                # signed request must get through, not be refused as a replay.
                with anyio.move_on_after(1.0, shield=True):
                    await self._forget(scope, nonce)

    async def _read(self, scope: Scope, receive: Receive) -> bytes:
        declared = get_header(scope, b"content-length")
        # Refused before reading when the client announces too much; 19+ digits is
        # beyond any sane size (and beyond int64).
        if (
            declared is not None
            and declared.isdigit()
            and (len(declared) > 18 or int(declared) > self.max_body_bytes)
        ):
            raise PayloadTooLarge(max_bytes=self.max_body_bytes)
        return await read_body(receive, self.max_body_bytes)

    async def _remember(
        self, scope: Scope, route: _Compiled, message: VerifiedMessage
    ) -> str | None:
        """Record the message as seen; its nonce key, or None when the store failed open."""
        key = make_key("nonce", route.pattern, message.replay_id)
        try:
            new = await self.store.remember(key, 2 * route.tolerance)
        except Overloaded:
            raise  # this process is overloaded, not the store: shed, never the policy
        except Exception as exc:
            self.logger.warning(
                "replay cache unavailable for %r (%s) [request_id=%s]: %s",
                route.pattern,
                self.on_store_error,
                ensure_request_id(scope),
                type(exc).__name__,
            )
            if self.on_store_error == "deny":
                # Same answer as the idempotency layer's: the store's breaker lets a trial
                # call through after about a second, so that is when a retry may succeed.
                raise ServiceUnavailable(retry_after=1.0) from None
            return None
        if not new:
            raise InvalidSignature("replayed")
        return key

    async def _forget(self, scope: Scope, key: str) -> None:
        try:
            await self.store.forget(key)
        except Exception as exc:
            self.logger.warning(
                "replay cache could not forget a failed message; a retry is refused until it "
                "expires [request_id=%s]: %s",
                ensure_request_id(scope),
                type(exc).__name__,
            )

    def __repr__(self) -> str:
        patterns = [route.pattern for _, route in self.routes.entries]
        return f"SignatureMiddleware(routes={patterns!r})"
