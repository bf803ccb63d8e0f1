"""Start-up checks of counts and durations: one rule set for every number the package takes.

A count is an ``int`` (``True`` is not a count) at or above its minimum. A number (of
seconds, a ratio) is an ``int`` or ``float``, not a bool, not NaN, finite, and above (or at)
its minimum. Messages name the entry at fault first, so a ``ConfigError`` reads like the
config line to fix.
"""

from __future__ import annotations

import math

from asgi_armor.errors import ConfigError

__all__ = ["count", "number", "seconds"]


def count(
    value: object, entry: str, *, minimum: int = 1, error: type[ValueError] = ConfigError
) -> int:
    """``value`` if it is a whole number ``>= minimum``.

    Raises:
        ConfigError: (or ``error``) it is not; the message names ``entry``.
    """
    if type(value) is bool or not isinstance(value, int) or value < minimum:
        raise error(f"{entry} must be a whole number >= {minimum}, not {value!r}")
    return value


def number(
    value: object,
    entry: str,
    *,
    minimum: float = 0.0,
    strict: bool = True,
    unit: str = "",
    error: type[ValueError] = ConfigError,
) -> float:
    """``value`` as a float if it is a finite number above ``minimum`` (at it: ``strict=False``).

    Raises:
        ConfigError: (or ``error``) it is not; the message names ``entry``.
    """
    if strict and minimum == 0:
        rule = f"{entry} must be a positive number{unit} (finite)"
    else:
        rule = f"{entry} must be a number{unit} {'>' if strict else '>='} {minimum:g} (finite)"
    if type(value) is bool or not isinstance(value, int | float):
        raise error(f"{rule}; {value!r} is not a number")
    if math.isnan(value) or math.isinf(value) or value < minimum or (strict and value == minimum):
        raise error(f"{rule}, not {value!r}")
    return float(value)


def seconds(
    value: object, entry: str, *, zero: bool = False, error: type[ValueError] = ConfigError
) -> float:
    """``value`` as a float if it is a finite number of seconds ``> 0`` (``>= 0``: ``zero``).

    Raises:
        ConfigError: (or ``error``) it is not; the message names ``entry``.
    """
    return number(value, entry, strict=not zero, unit=" of seconds", error=error)
