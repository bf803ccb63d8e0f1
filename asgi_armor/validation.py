"""Input validation and limits: ``InputLimits``, ``decode``/``decode_query``, ``Email``, ``Name``.

``InputLimits`` refuses oversized or mistyped requests before the app does any work and
counts the body bytes that really arrive, so a lying or chunked client is cut off at the
cap. ``decode`` is one cached ``msgspec`` decode on valid input; only when that fails does
a slow path walk the document against the model to report *every* field error at once.
Normalising types (``Email``, ``Name``, ``Text(strip=True)``) carry a ``Normalize`` marker
in their ``Annotated`` metadata, which msgspec ignores and ``decode`` applies afterwards.

The three concerns live in private modules along their seams: ``_fields`` (the types and
normalisers), ``_decoder`` (the error-collecting decoder), ``_input_limits`` (the request
limits); this module is their public face.
"""

from __future__ import annotations

from asgi_armor._decoder import MAX_DETAILS, decode, decode_query
from asgi_armor._decoder import _plan as _plan  # the plan cache, for the tests
from asgi_armor._decoder import _plans as _plans
from asgi_armor._fields import (
    Email,
    Float,
    Int,
    InvalidValue,
    Name,
    Normalize,
    Text,
    normalize_email,
    normalize_name,
)
from asgi_armor._input_limits import InputLimits

__all__ = [
    "MAX_DETAILS",
    "Email",
    "Float",
    "InputLimits",
    "Int",
    "InvalidValue",
    "Name",
    "Normalize",
    "Text",
    "decode",
    "decode_query",
    "normalize_email",
    "normalize_name",
]
