"""The GCRA core (asgi_armor/ratelimit/bucket.py) at its edges: lengths, the epsilon
boundary, past and over-full states. The everyday behaviour is pinned by the limiter tests
and the property models; these are the cases they cannot reach."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from asgi_armor.ratelimit.bucket import (
    EPSILON,
    decide,
    decide_one,
    remaining,
    reset_after,
    retry_after,
    status,
)


@pytest.mark.parametrize(("tats", "specs"), [(1, 2), (2, 1), (3, 2), (0, 1)])
def test_one_spec_per_tat_or_a_clear_error(tats: int, specs: int) -> None:
    with pytest.raises(ValueError, match=f"^decide: {tats} tats for {specs} specs$"):
        decide([None] * tats, 10.0, [(1.0, 1.0)] * specs, 1)


@pytest.mark.parametrize("buckets", [1, 2])
def test_a_request_landing_exactly_on_the_slack_is_allowed(buckets: int) -> None:
    """``tolerance + EPSILON`` is still inside the bucket, one hair past it is not: the
    slack that lets ten 6-second tokens fit a 60-second tolerance despite rounding."""
    at_the_edge = [(0.5, 1.0 - EPSILON)] * buckets
    allowed, tats = decide([None] * buckets, 10.0, at_the_edge, 2)
    assert (allowed, tats) == (True, [11.0] * buckets)
    past_it = [(0.5, 1.0 - EPSILON - 1e-9)] * buckets
    assert decide([None] * buckets, 10.0, past_it, 2) == (False, [10.0] * buckets)


@pytest.mark.parametrize("buckets", [1, 2])
def test_a_past_or_missing_tat_is_a_full_bucket(buckets: int) -> None:
    specs = [(1.0, 3.0)] * buckets
    for tat in (None, 4.0, 10.0):
        assert decide([tat] * buckets, 10.0, specs, 3) == (True, [13.0] * buckets)
    assert remaining(4.0, 10.0, 1.0, 3.0) == 3
    assert reset_after(4.0, 10.0) == 0.0
    assert retry_after(4.0, 10.0, 1.0, 3.0) == 0.0


def test_remaining_is_never_negative_in_the_slack() -> None:
    """After a request allowed by the epsilon, the bucket may hold a hair less than
    nothing: that is 0 tokens left, not -1."""
    now, interval, tolerance = 10.0, 0.01, 0.05
    assert remaining(now + tolerance + EPSILON / 2, now, interval, tolerance) == 0
    assert remaining(now + tolerance, now, interval, tolerance) == 0
    assert remaining(now + tolerance - interval, now, interval, tolerance) == 1


def test_give_back_returns_at_most_what_the_take_added() -> None:
    from asgi_armor.ratelimit.bucket import give_back

    # A take at 100 moved an empty-debt bucket from 100 to 110 (a 10 s step).
    assert give_back(110.0, 100.0, 10.0, 100.0) == 100.0  # all back: full again
    assert give_back(130.0, 100.0, 10.0, 120.0) == 120.0  # others' debt stays
    assert give_back(110.0, 104.0, 10.0, 100.0) == 104.0  # 4 s refilled since: 6 back
    assert give_back(130.0, 104.0, 10.0, 100.0) == 124.0
    assert give_back(None, 50.0, 10.0, 40.0) == 50.0  # forgotten: full, nothing owed
    assert give_back(45.0, 50.0, 10.0, 35.0) == 50.0
    assert give_back(120.0, 100.0, 10.0, 90.0) == 120.0  # refilled past the step: nothing


finite = st.floats(min_value=0.0, max_value=1e9, allow_nan=False)
positive = st.floats(min_value=1e-6, max_value=1e6, allow_nan=False)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.tuples(st.none() | finite, positive, positive), min_size=1, max_size=5),
    finite,
    st.integers(min_value=0, max_value=5),
)
def test_every_path_takes_the_same_step_to_the_bit(
    buckets: list[tuple[float | None, float, float]], now: float, cost: int
) -> None:
    """decide over several buckets writes decide_one's step out (for speed): the two must
    agree exactly, as the Lua script must agree with both."""
    tats = [tat for tat, _, _ in buckets]
    specs = [(interval, interval * depth) for _, interval, depth in buckets]
    steps = [decide_one(tat, now, *spec, cost) for tat, spec in zip(tats, specs, strict=True)]
    allowed = all(ok for ok, _ in steps)
    expected = [tat for _, tat in steps] if allowed else [max(now, t or now) for t in tats]
    assert decide(tats, now, specs, cost) == (allowed, expected)
    # Bit for bit, not just ==: -0.0 and 0.0 would compare equal.
    assert [t.hex() for t in decide(tats, now, specs, cost)[1]] == [t.hex() for t in expected]


def test_decide_one_reports_the_current_tat_when_denied() -> None:
    assert decide_one(None, 10.0, 1.0, 2.0, 1) == (True, 11.0)
    assert decide_one(12.0, 10.0, 1.0, 2.0, 1) == (False, 12.0)
    assert decide_one(4.0, 10.0, 1.0, 2.0, 0) == (True, 10.0)


@pytest.mark.parametrize("tat", [4.0, 10.0, 10.5, 12.999999, 13.0])
def test_status_is_remaining_and_reset_after(tat: float) -> None:
    assert status(tat, 10.0, 1.0, 3.0) == (remaining(tat, 10.0, 1.0, 3.0), reset_after(tat, 10.0))
