"""Property tests: decode/decode_query never fail with anything but the two client errors."""

from __future__ import annotations

import enum
import unicodedata
from typing import Annotated, Any, Literal

import msgspec
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from asgi_armor.errors import ErrorDetail, InvalidJSON, ValidationFailed
from asgi_armor.validation import (
    Email,
    Int,
    InvalidValue,
    Name,
    Text,
    _plan,
    decode,
    decode_query,
    normalize_email,
    normalize_name,
)

SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


class Level(enum.Enum):
    LOW = "low"
    HIGH = "high"


class Line(msgspec.Struct, forbid_unknown_fields=True):
    sku: Text(min_length=1, max_length=8)  # type: ignore[valid-type]
    qty: Int(ge=1, le=99)  # type: ignore[valid-type]
    price: Annotated[float, msgspec.Meta(ge=0)] = 0.0


class Person(msgspec.Struct, forbid_unknown_fields=True):
    email: Email
    name: Name
    age: Int(ge=0, le=150) | None = None  # type: ignore[valid-type]
    lines: Annotated[list[Line], msgspec.Meta(max_length=3)] = []
    level: Level = Level.LOW
    kind: Literal["a", "b"] | None = None
    tags: dict[str, int] = {}
    pair: tuple[int, str] | None = None
    nick: str | None = None
    active: bool = True
    friends: list[Email] = []


class Plain(msgspec.Struct, forbid_unknown_fields=True):
    """The same shapes without normalisers: msgspec alone decides validity."""

    sku: Text(min_length=1, max_length=8)  # type: ignore[valid-type]
    qty: Int(ge=1, le=99) | None = None  # type: ignore[valid-type]
    price: Annotated[float, msgspec.Meta(gt=0, le=1e6)] = 1.0
    lines: Annotated[list[Line], msgspec.Meta(min_length=0, max_length=2)] = []
    level: Level = Level.LOW
    kind: Literal["a", "b", 1] | None = None
    tags: dict[str, Annotated[int, msgspec.Meta(ge=0)]] = {}
    pair: tuple[int, str] | None = None
    active: bool = True
    any: Any = None


class Query(msgspec.Struct, forbid_unknown_fields=True):
    q: Text(max_length=20) = ""  # type: ignore[valid-type]
    page: Int(ge=1) = 1  # type: ignore[valid-type]
    score: float | None = None
    on: bool = False
    tag: list[str] = []
    ids: list[Int(ge=0)] = []  # type: ignore[valid-type]
    who: Email | None = None
    level: Level = Level.LOW


json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12)
    | st.sampled_from(["low", "high", "a", "b", "x@y.io", " A@B.CO ", "sku", "1"])
)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=20,
)


def shaped(keys: list[str]) -> st.SearchStrategy[dict[str, Any]]:
    """Objects using the model's own keys (and a stray one), with values of any kind."""
    return st.dictionaries(st.sampled_from([*keys, "stray"]), json_values, max_size=len(keys) + 1)


PERSON_KEYS = [
    "email",
    "name",
    "age",
    "lines",
    "level",
    "kind",
    "tags",
    "pair",
    "nick",
    "active",
    "friends",
]
PLAIN_KEYS = ["sku", "qty", "price", "lines", "level", "kind", "tags", "pair", "active", "any"]
LINE = st.fixed_dictionaries(
    {"sku": json_values, "qty": st.integers(-5, 120) | json_values},
    optional={"price": json_values, "oops": json_values},
)


def check_error(exc: ValidationFailed) -> None:
    assert exc.details
    for detail in exc.details:
        assert isinstance(detail, ErrorDetail)
        assert detail.code in {
            "required",
            "unknown_field",
            "invalid_type",
            "too_short",
            "too_long",
            "out_of_range",
            "invalid_format",
            "invalid_email",
        }
        assert detail.field is None or isinstance(detail.field, str)


@SETTINGS
@given(st.binary(max_size=200))
def test_arbitrary_bytes_only_raise_client_errors(body: bytes) -> None:
    try:
        decode(body, Person)
    except ValidationFailed as exc:
        check_error(exc)
    except InvalidJSON:
        pass


@SETTINGS
@given(st.text(max_size=200))
def test_arbitrary_text_only_raises_client_errors(body: str) -> None:
    try:
        decode(body, Person)
    except ValidationFailed as exc:
        check_error(exc)
    except InvalidJSON:
        pass


@SETTINGS
@given(shaped(PERSON_KEYS) | json_values)
def test_arbitrary_json_only_raises_validation_errors(value: Any) -> None:
    try:
        person = decode(msgspec.json.encode(value), Person)
    except ValidationFailed as exc:
        check_error(exc)
    else:
        assert isinstance(person, Person)
        assert person.email == normalize_email(person.email)
        assert person.name == normalize_name(person.name)


@SETTINGS
@given(
    shaped(PLAIN_KEYS).map(lambda d: {**d, "lines": d.get("lines", [])}) | shaped(PLAIN_KEYS),
    st.lists(LINE, max_size=3),
)
def test_slow_path_agrees_with_msgspec(value: dict[str, Any], lines: list[Any]) -> None:
    """The all-errors walk rejects exactly what msgspec rejects."""
    if "lines" in value:
        value["lines"] = lines
    try:
        msgspec.convert(value, Plain)
        accepted = True
    except msgspec.ValidationError:
        accepted = False
    errors: list[ErrorDetail] = []
    _plan(Plain).node.validate(value, (), errors, False)
    assert (not errors) == accepted, (value, errors)


@SETTINGS
@given(st.text(max_size=120) | st.binary(max_size=120).map(lambda b: b.decode("latin-1")))
def test_arbitrary_query_strings_only_raise_validation_errors(query: str) -> None:
    for form in (
        query,
        query.encode("utf-8", "surrogatepass"),
        {"query_string": query.encode("latin-1", "replace")},
    ):
        try:
            result = decode_query(form, Query)
        except ValidationFailed as exc:
            check_error(exc)
        else:
            assert isinstance(result, Query)


query_values = st.sampled_from(
    ["", "1", "-1", "0", "x", "true", "1.5", "nan", "low", "a@b.co"]
) | st.text(max_size=6)


@SETTINGS
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["q", "page", "score", "on", "tag", "ids", "who", "level", "zz"]),
            query_values,
        ),
        max_size=8,
    )
)
def test_query_slow_path_agrees_with_msgspec(pairs: list[tuple[str, str]]) -> None:
    from urllib.parse import urlencode

    try:
        result = decode_query(urlencode(pairs), Query)
    except ValidationFailed as exc:
        check_error(exc)
        return
    for key, text in pairs:
        if key in ("tag", "ids"):
            assert len(getattr(result, key)) == sum(1 for k, _ in pairs if k == key)
        elif key == "q":
            assert result.q == text


emails = st.builds(
    lambda local, labels, tld: f"{local}@{'.'.join(labels)}.{tld}",
    st.from_regex(r"[a-z0-9_+-]{1,20}(\.[a-z0-9_+-]{1,10}){0,2}", fullmatch=True),
    st.lists(
        st.from_regex(r"[a-z0-9]([a-z0-9-]{0,10}[a-z0-9])?", fullmatch=True), min_size=1, max_size=3
    ),
    st.from_regex(r"[a-z]{2,6}", fullmatch=True),
)
names = (
    st.text(
        st.characters(blacklist_categories=("Cc", "Cs", "Cf", "Zs", "Zl", "Zp", "Mn", "Mc", "Me")),
        min_size=1,
        max_size=20,
    )
    .map(lambda s: unicodedata.normalize("NFC", s))
    .filter(lambda s: 1 <= len(s) <= 100)
)
lines = st.builds(
    Line,
    sku=st.text(min_size=1, max_size=8),
    qty=st.integers(1, 99),
    price=st.floats(min_value=0, max_value=1e9, allow_nan=False),
)
people = st.builds(
    Person,
    email=emails,
    name=names,
    age=st.none() | st.integers(0, 150),
    lines=st.lists(lines, max_size=3),
    level=st.sampled_from(Level),
    kind=st.sampled_from([None, "a", "b"]),
    tags=st.dictionaries(st.text(max_size=5), st.integers(-(2**63), 2**63 - 1), max_size=3),
    pair=st.none() | st.tuples(st.integers(-(2**63), 2**63 - 1), st.text(max_size=5)),
    nick=st.none() | st.text(max_size=10),
    active=st.booleans(),
    friends=st.lists(emails, max_size=3),
)


@SETTINGS
@given(people)
def test_valid_objects_round_trip(person: Person) -> None:
    assume(len(person.email) <= 254)
    assert decode(msgspec.json.encode(person), Person) == person


@SETTINGS
@given(st.text(max_size=150))
def test_name_normalisation_is_idempotent_and_clean(raw: str) -> None:
    try:
        name = normalize_name(raw)
    except InvalidValue as exc:
        code = exc.code
    else:
        code = ""
    if code:
        assert code in {"too_short", "too_long"}
        return
    assert normalize_name(name) == name
    assert 1 <= len(name) <= 100
    assert name == name.strip()
    assert "  " not in name
    assert all(unicodedata.category(c) not in ("Cc", "Cs") for c in name)
    assert all(not c.isspace() or c == " " for c in name)


@SETTINGS
@given(st.text(max_size=80) | emails.map(lambda e: f" {e.upper()} "))
def test_email_normalisation_is_idempotent(raw: str) -> None:
    try:
        email = normalize_email(raw)
    except InvalidValue as exc:
        code = exc.code
    else:
        code = ""
    if code:
        assert code == "invalid_email"
        return
    assert normalize_email(email) == email
    assert email.isascii()
    assert email == email.lower().strip()
    assert email.count("@") == 1


def depth_of(value: Any) -> int:
    if isinstance(value, list):
        return 1 + max((depth_of(v) for v in value), default=0)
    if isinstance(value, dict):
        return 1 + max((depth_of(v) for v in value.values()), default=0)
    return 0


nested = st.recursive(
    st.none() | st.integers() | st.text(alphabet='[]{}"\\ab', max_size=6),
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(st.text(alphabet='[]{}"\\a', max_size=3), inner, max_size=3)
    ),
    max_leaves=40,
)


@SETTINGS
@given(nested, st.integers(1, 12))
def test_depth_limit_is_exact(value: Any, limit: int) -> None:
    body = msgspec.json.encode(value)
    if depth_of(value) > limit:
        with pytest.raises(InvalidJSON, match="deeper than"):
            decode(body, object, max_json_depth=limit)
    else:
        assert decode(body, object, max_json_depth=limit) == value
