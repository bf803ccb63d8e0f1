"""``Rate``: how many requests per how long, parsed once from ``"10/minute"``-style text."""

from __future__ import annotations

import functools
import math
import re

import msgspec

from asgi_armor import _checks
from asgi_armor.errors import ConfigError
from asgi_armor.ratelimit import bucket

__all__ = ["Rate"]

_UNITS: dict[str, float] = {}
for _seconds, _names in (
    (1.0, ("s", "sec", "secs", "second", "seconds")),
    (60.0, ("m", "min", "mins", "minute", "minutes")),
    (3600.0, ("h", "hr", "hrs", "hour", "hours")),
    (86400.0, ("d", "day", "days")),
    (604800.0, ("w", "wk", "week", "weeks")),
):
    for _name in _names:
        _UNITS[_name] = _seconds

#: The canonical unit names, used by ``str(rate)``.
_CANONICAL = {1.0: "second", 60.0: "minute", 3600.0: "hour", 86400.0: "day", 604800.0: "week"}

_RATE = re.compile(
    r"""\s*(?P<limit>\d+)\s*
        (?:/|\bper\b)\s*
        (?P<count>\d+(?:\.\d+)?)?\s*
        (?P<unit>[a-z]+)\s*
        (?:,?\s*\bburst\b\s*=?\s*(?P<burst>\d+))?\s*""",
    re.IGNORECASE | re.VERBOSE,
)

_EXAMPLES = "e.g. '10/minute', '100/5s', '20 per hour' or '10/minute burst 20'"


class Rate(msgspec.Struct, frozen=True, omit_defaults=True, cache_hash=True):
    """``limit`` requests per ``period`` seconds, at most ``burst`` at once.

    A token bucket holding ``burst`` tokens (``limit`` by default), refilled at
    ``limit`` tokens per ``period``. Build one with ``Rate.parse("10/minute")`` or
    ``Rate(10, 60)``.

    Args:
        limit: requests allowed per period (at least 1).
        period: the period in seconds (positive).
        burst: the bucket depth, when it differs from ``limit``.

    Raises:
        ValueError: a non-positive limit, period or burst.
    """

    limit: int
    period: float
    burst: int | None = None

    def __post_init__(self) -> None:
        _checks.count(self.limit, "rate limit", error=ValueError)
        _checks.seconds(self.period, "rate period", error=ValueError)
        if self.burst is not None:
            _checks.count(self.burst, "rate burst", error=ValueError)

    @classmethod
    def parse(cls, text: str | Rate) -> Rate:
        """Parse ``"10/minute"``, ``"5/hour"``, ``"1000/min"``, ``"20 per hour"``, ``"100/5s"``,
        ``"100/5 seconds"``, ``"1/day"``, optionally followed by ``"burst 20"``.

        A ``Rate`` is returned as it is. Units: second, minute, hour, day, week and their
        usual abbreviations (s, sec, m, min, h, hr, d, w).

        Raises:
            ConfigError: ``text`` is not a rate (the message quotes it).
        """
        if isinstance(text, Rate):
            return text
        if not isinstance(text, str):
            raise ConfigError(f"{text!r} is not a rate ({_EXAMPLES})")
        return _parse(text)

    @property
    def capacity(self) -> int:
        """The bucket depth: the most requests allowed at once."""
        return self.limit if self.burst is None else self.burst

    @property
    def spec(self) -> tuple[float, float]:
        """``(interval, tolerance)`` in seconds, for the bucket math and the stores."""
        return bucket.spec(self.limit, self.period, self.burst)

    @property
    def window(self) -> int:
        """The period in whole seconds (rounded up), as the ``w`` of ``RateLimit-Policy``."""
        return max(1, math.ceil(self.period))

    def __str__(self) -> str:
        unit = _CANONICAL.get(self.period)
        text = f"{self.limit}/{unit}" if unit is not None else f"{self.limit}/{self.period:g}s"
        return text if self.burst is None else f"{text} burst {self.burst}"


@functools.lru_cache(maxsize=256)
def _parse(text: str) -> Rate:
    found = _RATE.fullmatch(text)
    if found is None:
        raise ConfigError(f"{text!r} is not a rate ({_EXAMPLES})")
    unit = found.group("unit").lower()
    seconds = _UNITS.get(unit)
    if seconds is None:
        raise ConfigError(
            f"{text!r} is not a rate: unknown unit {found.group('unit')!r} "
            "(use second, minute, hour, day or week)"
        )
    count = found.group("count")
    period = seconds * (float(count) if count is not None else 1.0)
    limit = int(found.group("limit"))
    burst = found.group("burst")
    try:
        return Rate(limit, period, None if burst is None else int(burst))
    except ValueError as exc:
        raise ConfigError(f"{text!r} is not a rate: {exc}") from None
