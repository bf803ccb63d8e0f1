"""Rate parsing: the accepted spellings, the canonical text, and clear errors."""

from __future__ import annotations

import msgspec
import pytest

from asgi_armor.errors import ConfigError
from asgi_armor.ratelimit import Rate


@pytest.mark.parametrize(
    ("text", "limit", "period", "burst"),
    [
        ("10/minute", 10, 60, None),
        ("5/hour", 5, 3600, None),
        ("1000/min", 1000, 60, None),
        ("20 per hour", 20, 3600, None),
        ("20 PER Hour", 20, 3600, None),
        ("100/5s", 100, 5, None),
        ("100/5 seconds", 100, 5, None),
        ("1/day", 1, 86400, None),
        ("3/second", 3, 1, None),
        ("7/2h", 7, 7200, None),
        ("1/week", 1, 604800, None),
        ("10/minute burst 20", 10, 60, 20),
        ("10/minute, burst=20", 10, 60, 20),
        ("  10 / minute  ", 10, 60, None),
        ("4/0.5s", 4, 0.5, None),
    ],
)
def test_parse_good(text: str, limit: int, period: float, burst: int | None) -> None:
    rate = Rate.parse(text)
    assert rate == Rate(limit, period, burst)
    assert rate.capacity == (burst or limit)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("10/minuet", "'10/minuet' is not a rate: unknown unit 'minuet'"),
        ("ten/minute", "'ten/minute' is not a rate (e.g."),
        ("10 minute", "'10 minute' is not a rate (e.g."),
        ("", "'' is not a rate"),
        ("0/minute", "rate limit must be a whole number >= 1"),
        ("10/0s", "rate period must be a positive number"),
        ("10/minute burst 0", "rate burst must be a whole number >= 1"),
        ("-1/minute", "is not a rate"),
        ("10/minute burst", "is not a rate"),
    ],
)
def test_parse_bad(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        Rate.parse(text)
    assert message in str(info.value)
    assert isinstance(info.value, ValueError)


def test_parse_not_a_string() -> None:
    with pytest.raises(ConfigError, match="is not a rate"):
        Rate.parse(10)  # type: ignore[arg-type]


def test_parse_returns_rates_unchanged() -> None:
    rate = Rate(3, 60)
    assert Rate.parse(rate) is rate


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"limit": 0, "period": 1}, "limit"),
        ({"limit": True, "period": 1}, "limit"),
        ({"limit": 1.5, "period": 1}, "limit"),
        ({"limit": 1, "period": 0}, "period"),
        ({"limit": 1, "period": float("inf")}, "period"),
        ({"limit": 1, "period": 1, "burst": 0}, "burst"),
    ],
)
def test_constructor_validates(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Rate(**kwargs)  # type: ignore[arg-type]


def test_spec_and_window() -> None:
    assert Rate.parse("10/minute").spec == (6.0, 60.0)
    assert Rate.parse("10/minute burst 20").spec == (6.0, 120.0)
    assert Rate.parse("4/0.5s").window == 1
    assert Rate.parse("5/hour").window == 3600


@pytest.mark.parametrize(
    ("text", "canonical"),
    [
        ("1000/min", "1000/minute"),
        ("100/5 seconds", "100/5s"),
        ("20 per hour", "20/hour"),
        ("10/minute, burst=20", "10/minute burst 20"),
        ("1/7d", "1/week"),
    ],
)
def test_str_is_canonical_and_parses_back(text: str, canonical: str) -> None:
    rate = Rate.parse(text)
    assert str(rate) == canonical
    assert Rate.parse(str(rate)) == rate


def test_rate_is_a_frozen_hashable_struct() -> None:
    rate = msgspec.json.decode(b'{"limit": 5, "period": 3600}', type=Rate)
    assert rate == Rate.parse("5/hour")
    assert {rate: 1}[Rate.parse("5/hour")] == 1
    with pytest.raises(AttributeError):
        rate.limit = 6  # type: ignore[misc]
    with pytest.raises(msgspec.ValidationError, match="limit"):
        msgspec.json.decode(b'{"limit": 0, "period": 1}', type=Rate)
