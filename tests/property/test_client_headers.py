"""The client's header parsers: never an exception, and the right wait for any valid field."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from asgi_armor.client import parse_ratelimit, parse_retry_after
from asgi_armor.ratelimit.headers import ratelimit_item

names = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=12)
policies = st.tuples(names, st.integers(0, 10**6), st.integers(0, 10**6))


@given(st.lists(st.text(max_size=80), max_size=3))
def test_ratelimit_never_raises(lines: list[str]) -> None:
    wait = parse_ratelimit(lines)
    assert wait is None or wait >= 0


@given(st.lists(st.text(alphabet=' ";=,:()?@%*-.0123456789abrtxyz\\', max_size=60), max_size=3))
def test_ratelimit_never_raises_on_near_miss_syntax(lines: list[str]) -> None:
    wait = parse_ratelimit(lines)
    assert wait is None or wait >= 0


@given(st.lists(policies, min_size=1, max_size=5), st.integers(1, 3))
def test_the_servers_own_fields_give_the_longest_exhausted_wait(
    items: list[tuple[str, int, int]], lines: int
) -> None:
    members = [ratelimit_item(name, remaining, float(reset)) for name, remaining, reset in items]
    # However the members are split across field lines, they are one List.
    chunks = [", ".join(members[i::lines]) for i in range(lines)]
    expected = max(float(reset) if remaining == 0 else 0.0 for _, remaining, reset in items)
    assert parse_ratelimit([chunk for chunk in chunks if chunk]) == expected


@given(st.text(max_size=60), st.none() | st.text(max_size=60))
def test_retry_after_never_raises(value: str, date: str | None) -> None:
    wait = parse_retry_after(value, date=date, now=1_700_000_000.0)
    assert wait is None or wait >= 0
