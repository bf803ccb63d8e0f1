"""Header formatting: structured-field strings, rounding, the layer reported."""

from __future__ import annotations

import pytest

from asgi_armor.ratelimit import Decision, Rate
from asgi_armor.ratelimit import headers as h


def test_wire_names() -> None:
    assert (h.LIMIT, h.REMAINING, h.RESET) == (
        "X-RateLimit-Limit",
        "X-RateLimit-Remaining",
        "X-RateLimit-Reset",
    )
    assert (h.POLICY, h.RATELIMIT, h.RETRY_AFTER) == (
        "RateLimit-Policy",
        "RateLimit",
        "Retry-After",
    )
    assert (h.PARAM_QUOTA, h.PARAM_WINDOW, h.PARAM_REMAINING, h.PARAM_RESET) == ("q", "w", "r", "t")


def test_sf_string() -> None:
    assert h.sf_string("ip") == '"ip"'
    assert h.sf_string('a"b\\c') == '"a\\"b\\\\c"'
    with pytest.raises(ValueError, match="printable ASCII"):
        h.sf_string("caf\u00e9")
    with pytest.raises(ValueError, match="printable ASCII"):
        h.sf_string("a\nb")


@pytest.mark.parametrize(
    ("seconds", "whole"),
    [
        (0.0, 0),
        (-3.0, 0),
        (0.2, 1),
        (1.0, 1),
        (1.0000000001, 1),
        (1.01, 2),
        (5.999, 6),
        (720.0, 720),
    ],
)
def test_whole_seconds(seconds: float, whole: int) -> None:
    assert h.whole_seconds(seconds) == whole


def test_items() -> None:
    rate = Rate.parse("1000/minute")
    assert h.policy_item("ip", rate) == '"ip";q=1000;w=60'
    assert h.ratelimit_item("ip", 993, 3.2) == '"ip";r=993;t=4'
    assert h.policy_item("x", Rate.parse("10/minute burst 20")) == '"x";q=10;w=60'


def _d(allowed: bool, remaining: int, reset: float, retry: float, name: str) -> Decision:
    return Decision(allowed, 10, remaining, reset, retry, name, Rate.parse("10/minute"))


def test_most_restrictive_allowed_picks_fewest_remaining_then_longest_reset() -> None:
    assert h.most_restrictive([_d(True, 5, 1, 0, "a"), _d(True, 3, 1, 0, "b")]) == 1
    assert h.most_restrictive([_d(True, 3, 9, 0, "a"), _d(True, 3, 1, 0, "b")]) == 0
    assert h.most_restrictive([_d(True, 3, 1, 0, "a"), _d(True, 3, 9, 0, "b")]) == 1


def test_most_restrictive_denied_picks_longest_retry() -> None:
    decisions = [_d(False, 0, 60, 6, "a"), _d(False, 4, 5, 0, "b"), _d(False, 0, 70, 7, "c")]
    assert h.most_restrictive(decisions) == 2


def test_decision_headers() -> None:
    decisions = [_d(True, 7, 18.0, 0, "ip"), _d(True, 2, 48.5, 0, "user")]
    assert h.decision_headers(decisions, wall=1_700_000_000.25) == {
        "X-RateLimit-Limit": "10",
        "X-RateLimit-Remaining": "2",
        "X-RateLimit-Reset": "1700000049",
        "RateLimit-Policy": '"ip";q=10;w=60, "user";q=10;w=60',
        "RateLimit": '"user";r=2;t=49',
    }
