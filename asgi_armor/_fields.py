"""The normalising annotated types (``Email``, ``Name``, ``Text``, ``Int``, ``Float``) and
their normalisers; public through ``asgi_armor.validation``."""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable
from typing import Annotated, Any, TypeAlias

import msgspec

from asgi_armor.errors import ConfigError

__all__ = [
    "Email",
    "Float",
    "Int",
    "InvalidValue",
    "Name",
    "Normalize",
    "Text",
    "normalize_email",
    "normalize_name",
]

# --------------------------------------------------------------------------------------
# Normalising annotated types
# --------------------------------------------------------------------------------------


class InvalidValue(ValueError):
    """Raised by a normaliser: the value is not acceptable.

    Args:
        code: the detail code (``invalid_email``, ``too_long``, ...).
        message: the human message; never include the offending value.
    """

    def __init__(self, code: str, message: str) -> None:
        self.code = code
        self.message = message
        super().__init__(message)


class Normalize:
    """``Annotated`` marker: ``func(value)`` runs after decoding and returns the normal form.

    ``func`` raises ``InvalidValue`` (or any ``ValueError``, reported as
    ``invalid_format``) to reject the value; it is never called with ``None``. msgspec
    ignores the marker; ``decode`` and ``decode_query`` apply it, on the fast path and in
    the all-errors slow path alike.
    ``msgspec.Meta`` constraints next to it check the raw value, before ``func`` runs.

    Args:
        func: the normaliser.
    """

    __slots__ = ("func",)

    def __init__(self, func: Callable[[Any], Any]) -> None:
        if not callable(func):
            raise ConfigError(f"Normalize: {func!r} is not callable")
        self.func = func

    def __repr__(self) -> str:
        return f"Normalize({getattr(self.func, '__qualname__', self.func)!r})"


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


_EMAIL_MAX = 254  # RFC 5321 path limit (256) minus the angle brackets
_ATEXT = r"[a-zA-Z0-9!#$%&'*+/=?^_`{|}~-]"  # RFC 5322 atext
# Alphanumeric runs joined by hyphens: no label starts or ends with one. Possessive
# quantifiers throughout, so no input makes the match backtrack. ASCII letters of either
# case: the address is lower-cased once it matched (matching first means no isascii()
# check is needed: str.lower() turns a few non-ASCII letters, KELVIN SIGN, into ASCII).
_LABEL = r"[a-zA-Z0-9]++(?:-++[a-zA-Z0-9]++)*+"
_EMAIL = re.compile(
    rf"{_ATEXT}++(?:\.{_ATEXT}++)*+"  # local part: no leading, trailing or double dots
    rf"@(?:{_LABEL}\.)++"  # at least one dot
    rf"(?:[a-zA-Z]{{2,63}}+|[xX][nN]--{_LABEL})",  # alphabetic or punycode top-level domain
)
_EMAIL_INVALID = "Email format is invalid"
# A matching address this short has a local part of at most 64 characters (its domain
# has at least 4: "a.bc") and no domain label over 63 (that takes 1 + 1 + 64 + 3), so
# the per-part length checks run only for longer ones.
_EMAIL_PARTS_FIT = 68


def normalize_email(value: str) -> str:
    """Strip and lower-case an email address, then check its structure.

    ASCII only (an internationalised domain must be given in its ``xn--`` form): exactly
    one ``@``; a local part of 1..64 RFC 5322 atext characters with no leading, trailing or
    double dots; domain labels of 1..63 letters, digits and inner hyphens; at least one dot;
    an alphabetic or punycode top-level domain; at most 254 characters in all.

    Raises:
        InvalidValue: ``invalid_email``.
    """
    email = value.strip()
    if len(email) > _EMAIL_MAX:
        raise InvalidValue("invalid_email", f"Email must be at most {_EMAIL_MAX} characters")
    if _EMAIL.fullmatch(email) is None:
        raise InvalidValue("invalid_email", _EMAIL_INVALID)
    if len(email) > _EMAIL_PARTS_FIT:
        at = email.find("@")
        # Only a domain longer than 63 characters can hold a label that is.
        if at > 64 or (len(email) - at > 64 and max(map(len, email[at + 1 :].split("."))) > 63):
            raise InvalidValue("invalid_email", _EMAIL_INVALID)
    return email.lower()


_NAME_MAX = 100
# Invisible characters that reorder or hide text (Trojan Source, CVE-2021-42574) and lone
# surrogates (which cannot be encoded back to UTF-8) are dropped along with the C0/C1
# controls; the controls that are whitespace (tab, newline, NEL...) become spaces instead,
# so "Ann\tLee" stays two words.
_NAME_DROP: dict[int, int | None] = dict.fromkeys(
    (
        *range(0x20),
        *range(0x7F, 0xA0),
        0x200B,
        0x200E,
        0x200F,
        *range(0x202A, 0x202F),
        0x2060,
        *range(0x2066, 0x206A),
        0xFEFF,
        *range(0xD800, 0xE000),
    )
)
_NAME_DROP.update({cp: 0x20 for cp in range(0xA0) if chr(cp).isspace()})


def normalize_name(value: str) -> str:
    """Clean a person's name: controls removed, whitespace collapsed, NFC, 1..100 characters.

    C0 and C1 control characters (U+0000-001F, U+007F-009F), bidi overrides and
    zero-width characters are removed (whitespace controls such as tab and newline become a
    space), every run of Unicode whitespace becomes one space, the ends are stripped, and
    the result is put in Unicode NFC form.

    Raises:
        InvalidValue: ``too_short`` (empty after cleaning) or ``too_long``.
    """
    name = value
    # Fast path: a clean name is non-empty, printable (so its only whitespace is U+0020),
    # single-spaced and already trimmed.
    if not (
        name and name.isprintable() and "  " not in name and name[0] != " " and name[-1] != " "
    ):
        name = " ".join(name.translate(_NAME_DROP).split())
        if not name:
            raise InvalidValue("too_short", "Must be at least 1 character")
    if not name.isascii():
        name = unicodedata.normalize("NFC", name)  # never empties a non-empty name
    if len(name) > _NAME_MAX:
        raise InvalidValue("too_long", f"Must be at most {_NAME_MAX} characters")
    return name


Email: TypeAlias = Annotated[
    str,
    msgspec.Meta(
        description="An email address (stripped and lower-cased)",
        extra_json_schema={"format": "email", "maxLength": _EMAIL_MAX},
    ),
    Normalize(normalize_email),
]
"""An email address: stripped, lower-cased, structure checked, at most 254 characters."""

Name: TypeAlias = Annotated[
    str,
    msgspec.Meta(
        description="A person's name (controls removed, whitespace collapsed)",
        extra_json_schema={"minLength": 1, "maxLength": _NAME_MAX},
    ),
    Normalize(normalize_name),
]
"""A person's name: control characters removed, whitespace collapsed, 1..100 characters."""


def Text(
    *,
    min_length: int | None = None,
    max_length: int | None = None,
    pattern: str | None = None,
    strip: bool = False,
) -> Any:
    """A bounded string type in one line: ``title: Text(min_length=1, max_length=200)``.

    Args:
        min_length: fewest characters (``too_short`` below it).
        max_length: most characters (``too_long`` above it).
        pattern: a regex the value must contain a match of (``invalid_format``).
        strip: strip surrounding whitespace first; the bounds then apply to the stripped
            value (a normaliser instead of ``msgspec.Meta``).

    Raises:
        ConfigError: a bound is negative, the bounds cross, or the pattern does not compile.
    """
    _check_bounds("Text", min_length, max_length)
    regex = _compile_pattern("Text", pattern)
    if not strip:
        return Annotated[str, _meta(min_length=min_length, max_length=max_length, pattern=pattern)]

    def strip_and_check(value: str) -> str:
        value = value.strip()
        if min_length is not None and len(value) < min_length:
            raise InvalidValue("too_short", f"Must be at least {_plural(min_length, 'character')}")
        if max_length is not None and len(value) > max_length:
            raise InvalidValue("too_long", f"Must be at most {_plural(max_length, 'character')}")
        if regex is not None and regex.search(value) is None:
            raise InvalidValue("invalid_format", "Does not match the required format")
        return value

    schema: dict[str, Any] = {}
    if min_length is not None:
        schema["minLength"] = min_length
    if max_length is not None:
        schema["maxLength"] = max_length
    if pattern is not None:
        schema["pattern"] = pattern
    return Annotated[str, msgspec.Meta(extra_json_schema=schema), Normalize(strip_and_check)]


def Int(
    *,
    ge: int | None = None,
    gt: int | None = None,
    le: int | None = None,
    lt: int | None = None,
    multiple_of: int | None = None,
) -> Any:
    """A bounded integer type in one line: ``age: Int(ge=0, le=150)`` (``out_of_range``).

    Raises:
        ConfigError: a bound is not an int.
    """
    for label, bound in (
        ("ge", ge),
        ("gt", gt),
        ("le", le),
        ("lt", lt),
        ("multiple_of", multiple_of),
    ):
        if bound is not None and not _is_int(bound):
            raise ConfigError(f"Int: {label}={bound!r} is not an integer")
    return Annotated[int, _meta(ge=ge, gt=gt, le=le, lt=lt, multiple_of=multiple_of)]


def Float(
    *,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
) -> Any:
    """A bounded number type in one line: ``price: Float(gt=0)`` (``out_of_range``).

    Raises:
        ConfigError: a bound is not a number.
    """
    for label, bound in (("ge", ge), ("gt", gt), ("le", le), ("lt", lt)):
        if bound is not None and not (_is_int(bound) or isinstance(bound, float)):
            raise ConfigError(f"Float: {label}={bound!r} is not a number")
    return Annotated[float, _meta(ge=ge, gt=gt, le=le, lt=lt)]


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# msgspec's stubs overload Meta per constraint family; the helpers pass optional bounds.
_meta: Any = msgspec.Meta


def _check_bounds(what: str, low: int | None, high: int | None) -> None:
    for label, bound in (("min_length", low), ("max_length", high)):
        if bound is not None and not (_is_int(bound) and bound >= 0):
            raise ConfigError(f"{what}: {label}={bound!r} is not a non-negative integer")
    if low is not None and high is not None and low > high:
        raise ConfigError(f"{what}: min_length={low} is greater than max_length={high}")


def _compile_pattern(what: str, pattern: str | None) -> re.Pattern[str] | None:
    if pattern is None:
        return None
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise ConfigError(f"{what}: pattern={pattern!r} does not compile: {exc}") from None
