"""mkdocs hook: the configuration reference is generated from the ``ArmorConfig`` Structs."""

from __future__ import annotations

from typing import Any

import msgspec

from asgi_armor import config as armor_config

MARKER = "<!-- config-reference -->"

_SECTIONS = [
    ("top level", armor_config.ArmorConfig),
    ("[limits]", armor_config.LimitsConfig),
    ("[shedding]", armor_config.SheddingConfig),
    ("[[rate_limit]]", armor_config.RateLimitEntry),
    ("[[idempotency]]", armor_config.IdempotencyEntry),
    ("[[timeout]]", armor_config.TimeoutEntry),
    ("[[signature]]", armor_config.SignatureEntry),
    ("[metrics]", armor_config.MetricsEntry),
]


def _type_name(info: msgspec.inspect.Type) -> str:
    if isinstance(info, msgspec.inspect.UnionType):
        return " or ".join(_type_name(t) for t in info.types)
    if isinstance(info, msgspec.inspect.ListType):
        return f"list of {_type_name(info.item_type)}"
    if isinstance(info, msgspec.inspect.LiteralType):
        return " / ".join(repr(v) for v in info.values)
    if isinstance(info, msgspec.inspect.CustomType) and info.cls is armor_config.Duration:
        return "duration"
    if isinstance(info, msgspec.inspect.StructType):
        return "table"
    return type(info).__name__.removesuffix("Type").lower()


def _default(field: msgspec.inspect.Field) -> str:
    if field.required:
        return "**required**"
    value = field.default if field.default is not msgspec.NODEFAULT else field.default_factory()
    if isinstance(value, msgspec.Struct):
        return "(table of defaults)"
    return f"`{value!r}`"


def reference() -> str:
    """Markdown tables, one per section, from the Structs' fields."""
    parts = []
    for title, struct in _SECTIONS:
        info = msgspec.inspect.type_info(struct)
        assert isinstance(info, msgspec.inspect.StructType)
        doc = (struct.__doc__ or "").strip().splitlines()[0]
        rows = [f"### `{title}`", "", doc, "", "| setting | type | default |", "|---|---|---|"]
        rows += [f"| `{f.name}` | {_type_name(f.type)} | {_default(f)} |" for f in info.fields]
        parts.append("\n".join(rows))
    return "\n\n".join(parts)


def on_page_markdown(markdown: str, **_: Any) -> str:
    """Replace the marker with the generated reference."""
    return markdown.replace(MARKER, reference()) if MARKER in markdown else markdown
