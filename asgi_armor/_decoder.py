"""The error-collecting decoder: one cached ``msgspec`` decode on valid input, and a slow
path that walks the document against the model to report every field error; public
through ``asgi_armor.validation`` (``decode``, ``decode_query``)."""

from __future__ import annotations

import enum
import keyword
import logging
import re
import sys
import types
from array import array
from collections.abc import (
    Callable,
    Iterable,
    Mapping,
    MutableMapping,
    MutableSequence,
    MutableSet,
    Sequence,
)
from collections.abc import Set as AbstractSet
from itertools import accumulate
from typing import (
    TYPE_CHECKING,
    Annotated,
    Any,
    Final,
    Literal,
    NewType,
    TypeVar,
    Union,
    get_args,
    get_origin,
)
from urllib.parse import parse_qsl

import msgspec

from asgi_armor.errors import ArmorError, ErrorDetail, InvalidJSON, ValidationFailed

if TYPE_CHECKING:
    from asgi_armor._asgi import Scope


from asgi_armor._fields import InvalidValue, Normalize, _plural

__all__ = ["MAX_DETAILS", "decode", "decode_query"]

logger = logging.getLogger("asgi_armor")

T = TypeVar("T")

#: At most this many details are reported for one request: enough for any honest form,
#: and a body of ten thousand unknown keys cannot turn into a ten-thousand-item answer.
MAX_DETAILS: Final = 100

_SEGMENT_MAX = 64  # user-chosen keys in a field path are cut to this many characters

# --------------------------------------------------------------------------------------
# The compiled validation tree (slow path) and normaliser plan (fast path)
# --------------------------------------------------------------------------------------

_FLOAT_MAX: Final = sys.float_info.max
_BAD: Final = object()  # a validator's "this value failed" (its errors are already recorded)
Path = tuple[str | int, ...]


def _field(path: Path) -> str | None:
    return ".".join(map(str, path)) if path else None


def _segment(key: object) -> str:
    text = key if isinstance(key, str) else repr(key)
    return text if len(text) <= _SEGMENT_MAX else text[:_SEGMENT_MAX] + "..."


def _add(errors: list[ErrorDetail], code: str, message: str, path: Path) -> None:
    if len(errors) < MAX_DETAILS:
        errors.append(ErrorDetail(code, message, _field(path)))


class _Node:
    """One type of the model: validates untyped JSON (slow path), normalises typed values."""

    __slots__ = ("annotation", "expected", "kinds", "lax_str", "normalizes", "pytypes", "scalar")

    def __init__(
        self,
        annotation: Any,
        expected: str,
        kinds: frozenset[type] | None,
        pytypes: tuple[type, ...] = (object,),
        lax_str: bool = False,
        scalar: bool = False,
    ) -> None:
        self.annotation = annotation
        # Scalar nodes hand the validated raw value to normalisers as it is; the others
        # convert it to the typed value first.
        self.scalar = scalar
        self.expected = expected
        # JSON value types this node can accept (None: any, or unknown) for union dispatch.
        self.kinds = kinds
        self.pytypes = pytypes  # what the decoded value is an instance of
        self.lax_str = lax_str  # in query mode, also accepts a string to coerce
        self.normalizes = False

    def children(self) -> Iterable[_Node]:
        return ()

    def refresh(self) -> bool:
        """Recompute ``normalizes`` from the children; True when it changed."""
        value = any(child.normalizes for child in self.children())
        changed = value != self.normalizes
        self.normalizes = value
        return changed

    def accepts(self, value: object, lax: bool) -> bool:
        kinds = self.kinds
        return (
            kinds is None or type(value) in kinds or (lax and self.lax_str and type(value) is str)
        )

    def validate(self, value: Any, path: Path, errors: list[ErrorDetail], lax: bool) -> Any:
        raise NotImplementedError

    def normalize(self, value: Any, path: Path, errors: list[ErrorDetail]) -> Any:
        return value

    def wrong_type(self, path: Path, errors: list[ErrorDetail]) -> Any:
        _add(errors, "invalid_type", f"Expected {self.expected}", path)
        return _BAD


class _AnyNode(_Node):
    __slots__ = ()

    def validate(self, value: Any, path: Path, errors: list[ErrorDetail], lax: bool) -> Any:
        return value


class _NoneNode(_Node):
    __slots__ = ()

    def validate(self, value: Any, path: Path, errors: list[ErrorDetail], lax: bool) -> Any:
        if value is None or (lax and value == "null"):
            return None
        return self.wrong_type(path, errors)


class _Range:
    """Numeric bounds from ``msgspec.Meta``, with one precomputed message."""

    __slots__ = ("ge", "gt", "le", "lt", "message", "multiple_of")

    def __init__(self, meta: Mapping[str, Any]) -> None:
        self.ge = meta.get("ge")
        self.gt = meta.get("gt")
        self.le = meta.get("le")
        self.lt = meta.get("lt")
        self.multiple_of = meta.get("multiple_of")
        parts = [
            f"{op} {bound}"
            for op, bound in ((">=", self.ge), (">", self.gt), ("<=", self.le), ("<", self.lt))
            if bound is not None
        ]
        if self.multiple_of is not None:
            parts.append(f"a multiple of {self.multiple_of}")
        self.message = "Must be " + " and ".join(parts)

    def __bool__(self) -> bool:
        return any(b is not None for b in (self.ge, self.gt, self.le, self.lt, self.multiple_of))

    def ok(self, value: float) -> bool:
        if value != value:  # NaN compares false with every bound
            return not (
                self.ge is not None
                or self.gt is not None
                or self.le is not None
                or self.lt is not None
            )
        return not (
            (self.ge is not None and value < self.ge)
            or (self.gt is not None and value <= self.gt)
            or (self.le is not None and value > self.le)
            or (self.lt is not None and value >= self.lt)
            or (self.multiple_of is not None and value % self.multiple_of != 0)
        )


class _LengthBounds:
    __slots__ = ("max_length", "min_length", "unit")

    def __init__(self, meta: Mapping[str, Any], unit: str) -> None:
        self.min_length: int | None = meta.get("min_length")
        self.max_length: int | None = meta.get("max_length")
        self.unit = unit

    def check(self, n: int, path: Path, errors: list[ErrorDetail]) -> bool:
        low, high = self.min_length, self.max_length
        if low is not None and n < low:
            _add(
                errors, "too_short", f"Must {self._have()} at least {_plural(low, self.unit)}", path
            )
            return False
        if high is not None and n > high:
            _add(
                errors, "too_long", f"Must {self._have()} at most {_plural(high, self.unit)}", path
            )
            return False
        return True

    def _have(self) -> str:
        return "be" if self.unit == "character" else "have"


class _StrNode(_Node):
    __slots__ = ("bounds", "pattern")

    def __init__(self, annotation: Any, meta: Mapping[str, Any]) -> None:
        super().__init__(annotation, "a string", frozenset({str}), (str,), scalar=True)
        self.bounds = _LengthBounds(meta, "character")
        pattern = meta.get("pattern")
        self.pattern = None if pattern is None else re.compile(pattern)

    def validate(self, value: Any, path: Path, errors: list[ErrorDetail], lax: bool) -> Any:
        if type(value) is not str:
            return self.wrong_type(path, errors)
        if not self.bounds.check(len(value), path, errors):
            return _BAD
        # msgspec's pattern semantics are re.search, not fullmatch.
        if self.pattern is not None and self.pattern.search(value) is None:
            _add(errors, "invalid_format", "Does not match the required format", path)
            return _BAD
        return value


class _NumberNode(_Node):
    __slots__ = ("base", "range")

    def __init__(self, annotation: Any, base: type, meta: Mapping[str, Any]) -> None:
        if base is int:
            super().__init__(annotation, "an integer", frozenset({int}), (int,), True, True)
        else:
            super().__init__(annotation, "a number", frozenset({int, float}), (float,), True, True)
        self.base = base
        self.range = _Range(meta)

    def validate(self, value: Any, path: Path, errors: list[ErrorDetail], lax: bool) -> Any:
        kind = type(value)
        if kind is str and lax:
            try:
                value = msgspec.convert(value, self.base, strict=False)
            except msgspec.ValidationError:
                return self.wrong_type(path, errors)
        elif kind not in self.kinds:  # type: ignore[operator]
            return self.wrong_type(path, errors)
        elif kind is int and self.base is float and not -_FLOAT_MAX <= value <= _FLOAT_MAX:
            # msgspec refuses an integer literal no float can hold.
            _add(errors, "out_of_range", "Number out of range", path)
            return _BAD
        if self.range and not self.range.ok(value):
            _add(errors, "out_of_range", self.range.message, path)
            return _BAD
        return value


class _BoolNode(_Node):
    __slots__ = ()

    def __init__(self, annotation: Any) -> None:
        super().__init__(annotation, "a boolean", frozenset({bool}), (bool,), True, True)

    def validate(self, value: Any, path: Path, errors: list[ErrorDetail], lax: bool) -> Any:
        if type(value) is bool:
            return value
        if lax and type(value) is str:
            try:
                return msgspec.convert(value, bool, strict=False)
            except msgspec.ValidationError:
                pass
        return self.wrong_type(path, errors)


class _ChoiceNode(_Node):
    """``Literal[...]`` and enums: the value must be one of a fixed set."""

    __slots__ = ("allowed",)

    def __init__(self, annotation: Any, values: Sequence[Any], *, scalar: bool) -> None:
        shown = ", ".join(repr(v) for v in values[:10]) + (", ..." if len(values) > 10 else "")
        kinds = frozenset(type(v) for v in values)
        super().__init__(annotation, f"one of {shown}", kinds, lax_str=int in kinds, scalar=scalar)
        # (type, value) pairs: True == 1 in Python, but not in JSON.
        self.allowed = frozenset((type(v), v) for v in values)

    def validate(self, value: Any, path: Path, errors: list[ErrorDetail], lax: bool) -> Any:
        kind = type(value)
        if kind in self.kinds and (kind, value) in self.allowed:  # type: ignore[operator]
            return value
        if lax and type(value) is str and int in self.kinds:  # type: ignore[operator]
            try:
                number = int(value) if len(value) <= 20 else None
            except ValueError:
                number = None
            if (int, number) in self.allowed:
                return number
        code = "invalid_format" if kind in self.kinds else "invalid_type"  # type: ignore[operator]
        _add(errors, code, f"Must be {self.expected}", path)
        return _BAD


class _OpaqueNode(_Node):
    """Types validated by ``msgspec.convert`` itself (datetime, UUID, Decimal, bytes, ...)."""

    __slots__ = ()

    def validate(self, value: Any, path: Path, errors: list[ErrorDetail], lax: bool) -> Any:
        try:
            return msgspec.convert(value, self.annotation, strict=not lax)
        except msgspec.ValidationError as exc:
            if len(errors) < MAX_DETAILS:
                errors.append(_translate(str(exc), path))
            return _BAD


class _NormalizedNode(_Node):
    __slots__ = ("funcs", "inner")

    def __init__(
        self, annotation: Any, inner: _Node, funcs: tuple[Callable[[Any], Any], ...]
    ) -> None:
        super().__init__(
            annotation, inner.expected, inner.kinds, inner.pytypes, inner.lax_str, False
        )
        self.inner = inner
        self.funcs = funcs
        self.normalizes = True

    def refresh(self) -> bool:
        return False

    def validate(self, value: Any, path: Path, errors: list[ErrorDetail], lax: bool) -> Any:
        value = self.inner.validate(value, path, errors, lax)
        if value is _BAD:
            return _BAD
        if not self.inner.scalar:
            try:
                value = msgspec.convert(value, self.inner.annotation, strict=not lax)
            except msgspec.ValidationError:
                return value  # cannot happen once the inner node passed; nothing to add
        return self._apply(value, path, errors)

    def normalize(self, value: Any, path: Path, errors: list[ErrorDetail]) -> Any:
        if self.inner.normalizes:
            value = self.inner.normalize(value, path, errors)
        result = self._apply(value, path, errors)
        # On failure the error is recorded and the whole decode fails; keep the old value
        # so that containers never hold the sentinel meanwhile.
        return value if result is _BAD else result

    def _apply(self, value: Any, path: Path, errors: list[ErrorDetail]) -> Any:
        if value is None:
            return None  # normalisers never see None (an Optional field left empty)
        for func in self.funcs:
            try:
                value = func(value)
            except ValueError as exc:
                _record(errors, exc, path)
                return _BAD
        return value


class _ArrayNode(_Node):
    """list, set, frozenset and ``tuple[X, ...]``."""

    __slots__ = ("bounds", "container", "item")

    def __init__(
        self, annotation: Any, container: type, item: _Node, meta: Mapping[str, Any]
    ) -> None:
        super().__init__(annotation, "an array", frozenset({list}), (container,))
        self.container = container
        self.item = item
        self.bounds = _LengthBounds(meta, "item")

    def children(self) -> Iterable[_Node]:
        return (self.item,)

    def validate(self, value: Any, path: Path, errors: list[ErrorDetail], lax: bool) -> Any:
        if type(value) is not list:
            return self.wrong_type(path, errors)
        ok = self.bounds.check(len(value), path, errors)
        item = self.item
        for index, element in enumerate(value):
            if item.validate(element, (*path, index), errors, lax) is _BAD:
                ok = False
            if len(errors) >= MAX_DETAILS:
                return _BAD
        return value if ok else _BAD

    def normalize(self, value: Any, path: Path, errors: list[ErrorDetail]) -> Any:
        item = self.item
        if type(value) is list:
            for index, element in enumerate(value):
                new = item.normalize(element, (*path, index), errors)
                if new is not element:
                    value[index] = new
            return value
        return type(value)(item.normalize(e, (*path, i), errors) for i, e in enumerate(value))


class _TupleNode(_Node):
    __slots__ = ("items",)

    def __init__(self, annotation: Any, items: tuple[_Node, ...]) -> None:
        super().__init__(
            annotation, f"an array of {_plural(len(items), 'item')}", frozenset({list}), (tuple,)
        )
        self.items = items

    def children(self) -> Iterable[_Node]:
        return self.items

    def validate(self, value: Any, path: Path, errors: list[ErrorDetail], lax: bool) -> Any:
        if type(value) is not list or len(value) != len(self.items):
            return self.wrong_type(path, errors)
        ok = True
        for index, (node, element) in enumerate(zip(self.items, value, strict=True)):
            if node.validate(element, (*path, index), errors, lax) is _BAD:
                ok = False
        return value if ok else _BAD

    def normalize(self, value: Any, path: Path, errors: list[ErrorDetail]) -> Any:
        return tuple(
            node.normalize(element, (*path, index), errors) if node.normalizes else element
            for index, (node, element) in enumerate(zip(self.items, value, strict=True))
        )


class _DictNode(_Node):
    __slots__ = ("bounds", "key", "value")

    def __init__(self, annotation: Any, key: _Node, value: _Node, meta: Mapping[str, Any]) -> None:
        super().__init__(annotation, "an object", frozenset({dict}), (dict,))
        self.key = key
        self.value = value
        self.bounds = _LengthBounds(meta, "item")

    def children(self) -> Iterable[_Node]:
        return (self.key, self.value)

    def validate(self, value: Any, path: Path, errors: list[ErrorDetail], lax: bool) -> Any:
        if type(value) is not dict:
            return self.wrong_type(path, errors)
        ok = self.bounds.check(len(value), path, errors)
        for key, element in value.items():
            where = (*path, _segment(key))
            # JSON keys are strings; msgspec coerces them to int/enum keys as needed.
            if self.key.validate(key, where, errors, True) is _BAD:
                ok = False
            if self.value.validate(element, where, errors, lax) is _BAD:
                ok = False
            if len(errors) >= MAX_DETAILS:
                return _BAD
        return value if ok else _BAD

    def normalize(self, value: Any, path: Path, errors: list[ErrorDetail]) -> Any:
        knode, vnode = self.key, self.value
        if not knode.normalizes:
            for key, element in value.items():
                new = vnode.normalize(element, (*path, _segment(key)), errors)
                if new is not element:
                    value[key] = new
            return value
        return {
            knode.normalize(k, (*path, _segment(k)), errors): (
                vnode.normalize(v, (*path, _segment(k)), errors) if vnode.normalizes else v
            )
            for k, v in value.items()
        }


class _StructField:
    __slots__ = ("default", "key", "name", "node", "required")

    def __init__(self, info: msgspec.structs.FieldInfo, node: _Node) -> None:
        self.name = info.name
        self.key = info.encode_name
        self.node = node
        self.required = info.required
        self.default = info.default


class _StructNode(_Node):
    __slots__ = ("fast", "fields", "forbid_unknown", "known", "norm_plan", "tag", "tag_field")

    def __init__(self, cls: type[msgspec.Struct]) -> None:
        super().__init__(cls, "an object", frozenset({dict}), (cls,))
        config = cls.__struct_config__
        self.forbid_unknown = config.forbid_unknown_fields
        self.tag_field = config.tag_field
        self.tag = config.tag
        self.fields: tuple[_StructField, ...] = ()
        self.norm_plan: tuple[_NormStep, ...] = ()
        # norm_plan compiled to straight-line code once the tree is complete (finish()).
        self.fast: _Normalizer | None = None
        self.known: frozenset[str] = frozenset()

    def set_fields(self, fields: tuple[_StructField, ...]) -> None:
        self.fields = fields
        self.known = frozenset(f.key for f in fields) | (
            {self.tag_field} if self.tag_field else set()
        )

    def children(self) -> Iterable[_Node]:
        return (f.node for f in self.fields)

    def refresh(self) -> bool:
        changed = super().refresh()
        self.norm_plan = tuple(_norm_step(f) for f in self.fields if f.node.normalizes)
        return changed

    def validate(self, value: Any, path: Path, errors: list[ErrorDetail], lax: bool) -> Any:
        if type(value) is not dict:
            return self.wrong_type(path, errors)
        ok = True
        for field in self.fields:
            key = field.key
            if key in value:
                if field.node.validate(value[key], (*path, key), errors, lax) is _BAD:
                    ok = False
            elif field.required:
                _add(errors, "required", "This field is required", (*path, key))
                ok = False
        tag_field = self.tag_field
        if tag_field is not None and tag_field in value and value[tag_field] != self.tag:
            _add(errors, "invalid_format", f"Must be {self.tag!r}", (*path, tag_field))
            ok = False
        if self.forbid_unknown:
            known = self.known
            for key in value:
                if key not in known:
                    _add(errors, "unknown_field", "Unknown field", (*path, _segment(key)))
                    ok = False
        return value if ok else _BAD

    def finish(self) -> None:
        """Compile ``norm_plan`` (final once the compiler's fixpoint is reached)."""
        self.fast = _compile_steps(self.norm_plan)

    def normalize(self, value: Any, path: Path, errors: list[ErrorDetail]) -> Any:
        fast = self.fast
        if fast is not None:
            return fast(value, path, errors)
        # The same steps as the compiled ones, for field names that are not identifiers
        # (msgspec.defstruct allows any): locals only, a path built only on failure.
        setter = _force_setattr
        for name, default, key, node, direct in self.norm_plan:
            current = getattr(value, name)
            if current is default or current is None:
                continue  # defaults are the model author's values; None is never normalised
            if direct is not None:
                try:
                    new = direct(current)
                except ValueError as exc:
                    _record(errors, exc, (*path, key))
                    continue
            else:
                new = node.normalize(current, (*path, key), errors)
            if new is not current:
                setter(value, name, new)
        return value


# (attribute, default, key, node, the lone normaliser when it applies straight to the value)
_NormStep = tuple[str, Any, str, _Node, Callable[[Any], Any] | None]
_Normalizer = Callable[[Any, Path, list[ErrorDetail]], Any]
_force_setattr = msgspec.structs.force_setattr


def _compile_steps(
    steps: tuple[_NormStep, ...], decoder: Callable[[bytes], Any] | None = None
) -> Any:
    """A Struct's normalising steps as one generated function, or None when a field name
    cannot be written as an attribute (then ``_StructNode.normalize`` loops over them).

    Without ``decoder``: ``normalize(value, path, errors)``, a node's normalize. With it:
    ``run(data)``, the whole valid path of ``decode`` for a top-level Struct: ``decoder``
    (its errors propagate), the steps, and ``ValidationFailed`` with every field error.

    Attribute reads the interpreter specialises and the normalisers called directly, with
    no per-field tuple or getattr. Only attribute names are written into the code; every
    value (defaults, keys, normalisers, nodes) is passed in the function's globals.
    """
    names = [step[0] for step in steps]
    if not all(n.isidentifier() and not keyword.iskeyword(n) and n[:2] != "__" for n in names):
        return None
    env: dict[str, Any] = {
        "_record": _record,
        "_setter": _force_setattr,
        "_decode": decoder,
        "_failed": ValidationFailed,
    }
    if decoder is None:
        lines = ["def normalize(value, path, errors):"]
        need = ""
    else:
        # The errors list is made only when a field fails.
        lines = ["def run(data):", "    value = _decode(data)", "    path, errors = (), None"]
        need = "errors = [] if errors is None else errors; "
    for index, (name, default, key, node, direct) in enumerate(steps):
        env[f"a{index}"], env[f"d{index}"], env[f"k{index}"] = name, default, key
        env[f"n{index}"], env[f"f{index}"] = node, direct
        # Defaults are the model author's values; None is never normalised.
        test = "current is not None"
        if default is not msgspec.NODEFAULT:
            test += f" and current is not d{index}"
        lines += [f"    current = value.{name}", f"    if {test}:"]
        if direct is not None:
            lines += [
                "        try:",
                f"            new = f{index}(current)",
                "        except ValueError as exc:",
                f"            {need}_record(errors, exc, (*path, k{index}))",
                "        else:",
                "            if new is not current:",
                f"                _setter(value, a{index}, new)",
            ]
        else:
            lines += [
                f"        {need}new = n{index}.normalize(current, (*path, k{index}), errors)",
                "        if new is not current:",
                f"            _setter(value, a{index}, new)",
            ]
    if decoder is not None:
        lines += ["    if errors:", "        raise _failed(details=errors)"]
    lines.append("    return value")
    exec("\n".join(lines), env)  # noqa: S102 - generated from identifiers checked above
    return env["run" if decoder is not None else "normalize"]


def _norm_step(field: _StructField) -> _NormStep:
    node = field.node
    direct = None
    if isinstance(node, _UnionNode):
        # Email | None: None is skipped above, so the other member's normaliser is direct.
        others = [m for m in node.members if not isinstance(m, _NoneNode)]
        if len(others) == 1:
            node = others[0]
    if isinstance(node, _NormalizedNode) and len(node.funcs) == 1 and not node.inner.normalizes:
        direct = node.funcs[0]
    return (field.name, field.default, field.key, field.node, direct)


def _record(errors: list[ErrorDetail], exc: ValueError, path: Path) -> None:
    if isinstance(exc, InvalidValue):
        _add(errors, exc.code, exc.message, path)
    else:
        # Its message might quote the value; report the fact, not the text.
        _add(errors, "invalid_format", "Invalid value", path)


class _UnionNode(_Node):
    __slots__ = ("members", "tagged")

    def __init__(self, annotation: Any, members: tuple[_Node, ...]) -> None:
        kinds: frozenset[type] | None = frozenset()
        for member in members:
            kinds = None if kinds is None or member.kinds is None else kinds | member.kinds
        expected = " or ".join(m.expected for m in members)
        pytypes = tuple(t for m in members for t in m.pytypes)
        super().__init__(annotation, expected, kinds, pytypes, any(m.lax_str for m in members))
        self.members = members
        tagged = {}
        for member in members:
            if isinstance(member, _StructNode) and member.tag_field is not None:
                tagged[(member.tag_field, member.tag)] = member
        self.tagged = tagged

    def children(self) -> Iterable[_Node]:
        return self.members

    def validate(self, value: Any, path: Path, errors: list[ErrorDetail], lax: bool) -> Any:
        candidates = [m for m in self.members if m.accepts(value, lax)]
        if not candidates:
            return self.wrong_type(path, errors)
        if type(value) is dict and self.tagged:
            for (tag_field, tag), tagged in self.tagged.items():
                if value.get(tag_field) == tag:
                    return tagged.validate(value, path, errors, lax)
            tag_field = next(iter(self.tagged))[0]
            tags = ", ".join(repr(t) for _, t in self.tagged)
            if tag_field not in value:
                _add(errors, "required", "This field is required", (*path, tag_field))
            else:
                _add(errors, "invalid_format", f"Must be one of {tags}", (*path, tag_field))
            return _BAD
        if len(candidates) == 1:
            return candidates[0].validate(value, path, errors, lax)
        first: list[ErrorDetail] | None = None
        for member in candidates:
            scratch: list[ErrorDetail] = []
            result = member.validate(value, path, scratch, lax)
            if result is not _BAD:
                return result
            if first is None:
                first = scratch
        for detail in first or ():
            if len(errors) < MAX_DETAILS:
                errors.append(detail)
        return _BAD

    def normalize(self, value: Any, path: Path, errors: list[ErrorDetail]) -> Any:
        for member in self.members:
            if member.normalizes and isinstance(value, member.pytypes):
                return member.normalize(value, path, errors)
        return value


_ARRAYS: Final[dict[Any, type]] = {
    list: list,
    set: set,
    frozenset: frozenset,
    Sequence: list,
    MutableSequence: list,
    AbstractSet: frozenset,
    MutableSet: set,
}
_MAPPINGS: Final = frozenset({dict, Mapping, MutableMapping})
_META_KEYS: Final = ("gt", "ge", "lt", "le", "multiple_of", "pattern", "min_length", "max_length")


class _Compiler:
    """Turns a type into a node tree; recursive Structs share one node."""

    def __init__(self) -> None:
        self.structs: dict[type, _StructNode] = {}
        self.nodes: list[_Node] = []

    def compile(self, annotation: Any) -> _Node:
        node = self._compile(annotation)
        # Fixpoint: with recursive models a Struct learns late that a descendant normalises.
        while any([n.refresh() for n in self.nodes]):  # noqa: C419 - refresh every node
            pass
        for struct in self.structs.values():
            struct.finish()
        return node

    def _add(self, node: _Node) -> _Node:
        self.nodes.append(node)
        return node

    def _compile(self, annotation: Any) -> _Node:
        meta: dict[str, Any] = {}
        funcs: list[Callable[[Any], Any]] = []
        base = annotation
        while True:
            origin = get_origin(base)
            if origin is Annotated:
                for extra in base.__metadata__:
                    if isinstance(extra, msgspec.Meta):
                        meta.update(
                            {
                                k: getattr(extra, k)
                                for k in _META_KEYS
                                if getattr(extra, k) is not None
                            }
                        )
                    elif isinstance(extra, Normalize):
                        funcs.append(extra.func)
                base = base.__origin__
            elif isinstance(base, NewType):
                base = base.__supertype__
            elif hasattr(base, "__value__") and type(base).__name__ == "TypeAliasType":
                base = base.__value__
            else:
                break
        node = self._base(base, annotation if not funcs else _strip_normalizers(annotation), meta)
        if funcs:
            node = self._add(_NormalizedNode(annotation, node, tuple(funcs)))
        return node

    def _base(self, base: Any, annotation: Any, meta: Mapping[str, Any]) -> _Node:
        origin = get_origin(base)
        args = get_args(base)
        if base is Any or base is object:
            return self._add(_AnyNode(annotation, "any value", None))
        if base is None or base is type(None):
            none = frozenset({type(None)})
            return self._add(_NoneNode(annotation, "null", none, (type(None),), True, True))
        if base is bool:
            return self._add(_BoolNode(annotation))
        if base is int or base is float:
            return self._add(_NumberNode(annotation, base, meta))
        if base is str:
            return self._add(_StrNode(annotation, meta))
        if origin is Union or origin is types.UnionType:
            members = tuple(self._compile(arg) for arg in args)
            return self._add(_UnionNode(annotation, members))
        if origin is Literal:
            return self._add(_ChoiceNode(annotation, args, scalar=True))
        if isinstance(base, type) and issubclass(base, enum.Enum):
            return self._add(_ChoiceNode(annotation, [m.value for m in base], scalar=False))
        if isinstance(base, type) and issubclass(base, msgspec.Struct):
            if base.__struct_config__.array_like:
                return self._add(_OpaqueNode(annotation, "an array", frozenset({list})))
            found = self.structs.get(base)
            if found is None:
                found = self.structs[base] = _StructNode(base)
                self.nodes.append(found)
                found.set_fields(
                    tuple(
                        _StructField(info, self._compile(info.type))
                        for info in msgspec.structs.fields(base)
                    )
                )
            return found
        container = _ARRAYS.get(base) or _ARRAYS.get(origin)
        if container is not None:
            item = self._compile(args[0]) if args else self._add(_AnyNode(Any, "any value", None))
            return self._add(_ArrayNode(annotation, container, item, meta))
        if base is tuple or origin is tuple:
            if not args or (len(args) == 2 and args[1] is Ellipsis):
                item = (
                    self._compile(args[0]) if args else self._add(_AnyNode(Any, "any value", None))
                )
                return self._add(_ArrayNode(annotation, tuple, item, meta))
            if args == ((),):
                return self._add(_TupleNode(annotation, ()))
            return self._add(_TupleNode(annotation, tuple(self._compile(a) for a in args)))
        if base in _MAPPINGS or origin in _MAPPINGS:
            key = self._compile(args[0]) if args else self._add(_AnyNode(Any, "any value", None))
            value = self._compile(args[1]) if args else self._add(_AnyNode(Any, "any value", None))
            return self._add(_DictNode(annotation, key, value, meta))
        return self._add(_OpaqueNode(annotation, _opaque_name(base), None))


def _opaque_name(base: Any) -> str:
    name = getattr(base, "__name__", None)
    return f"a valid {name}" if isinstance(name, str) else "a valid value"


def _strip_normalizers(annotation: Any) -> Any:
    """The same type without ``Normalize`` markers, for ``msgspec.convert``."""
    if get_origin(annotation) is not Annotated:
        return annotation
    kept = tuple(m for m in annotation.__metadata__ if not isinstance(m, Normalize))
    inner = _strip_normalizers(annotation.__origin__)
    return Annotated[(inner, *kept)] if kept else inner


# msgspec error text -> (code, message); the fallback for what the tree cannot see
# (array-like Structs, __post_init__ errors, custom types). msgspec's own words are kept
# only where they name types, never where they might quote the input.
_MSGSPEC_PATH = re.compile(r" - at `\$(.*)`$", re.DOTALL)
_MSGSPEC_SEGMENT = re.compile(r"\.([^.\[]+)|\[(\d+)\]|\[\.\.\.\]")
_MISSING = "Object missing required field `"
_UNKNOWN = "Object contains unknown field `"


def _translate(text: str, prefix: Path = ()) -> ErrorDetail:
    path = list(prefix)
    found = _MSGSPEC_PATH.search(text)
    if found is not None:
        text = text[: found.start()]
        for segment in _MSGSPEC_SEGMENT.finditer(found.group(1)):
            name, index = segment.group(1), segment.group(2)
            if name is not None:
                path.append(_segment(name))
            elif index is not None:
                path.append(int(index))
            else:
                break  # msgspec does not name dict keys; the path ends at the dict
    if text.startswith(_MISSING):
        path.append(_segment(text[len(_MISSING) :].rstrip("`")))
        return ErrorDetail("required", "This field is required", _field(tuple(path)))
    if text.startswith(_UNKNOWN):
        path.append(_segment(text[len(_UNKNOWN) :].rstrip("`")))
        return ErrorDetail("unknown_field", "Unknown field", _field(tuple(path)))
    where = _field(tuple(path))
    if text.startswith("Expected `") and "`, got `" in text:
        return ErrorDetail("invalid_type", text[:200], where)
    if " of length >= " in text:
        return ErrorDetail("too_short", text[:200], where)
    if " of length <= " in text:
        return ErrorDetail("too_long", text[:200], where)
    if text.startswith("Expected `") and (
        " >= " in text or " <= " in text or " > " in text or " < " in text
    ):
        return ErrorDetail("out_of_range", text[:200], where)
    if "multiple of" in text or "out of range" in text:
        return ErrorDetail(
            "out_of_range", "Number out of range" if "range" in text else text[:200], where
        )
    return ErrorDetail("invalid_format", "Invalid value", where)


# --------------------------------------------------------------------------------------
# decode / decode_query
# --------------------------------------------------------------------------------------


class _Plan:
    __slots__ = ("decode", "depth", "list_keys", "node", "run")

    def __init__(self, model: Any) -> None:
        decoder: Callable[[bytes], Any] = msgspec.json.Decoder(model).decode
        self.decode = decoder
        node = self.node = _Compiler().compile(model)
        # run: the valid path of decode (msgspec's errors propagate; ValidationFailed for
        # a normaliser's), fused into one generated function for a Struct when it can be.
        run = None
        if not node.normalizes:
            run = decoder
        elif isinstance(node, _StructNode):
            run = _compile_steps(node.norm_plan, decoder)
        self.run: Callable[[bytes], Any] = run or self._decode_and_normalize
        self.list_keys: frozenset[str] | None = None  # query-string keys that take every value
        # At least 1, so that max_json_depth < 1 always takes the counting path (which
        # rejects it); a model with no bound never skips the counting.
        bound = _static_depth(node, set())
        self.depth = sys.maxsize if bound is None else max(bound, 1)

    def _decode_and_normalize(self, data: bytes) -> Any:
        value = self.decode(data)
        errors: list[ErrorDetail] = []
        value = self.node.normalize(value, (), errors)
        if errors:
            raise ValidationFailed(details=errors)
        return value


def _static_depth(node: _Node, open_structs: set[_StructNode]) -> int | None:
    """The deepest nesting of any document the typed decoder accepts for ``node``, or None
    when there is no such bound (``Any``, opaque types, recursion, a Struct that skips
    unknown fields or is tagged: msgspec walks whatever they hold, or skips values to find
    the tag).

    Within the bound, a document that decodes is no deeper than the limit, and one that
    does not has stopped the decoder at its first mismatch, never deeper: ``decode`` then
    counts brackets only when something failed.
    """
    if isinstance(node, _StrNode | _NumberNode | _BoolNode | _NoneNode | _ChoiceNode):
        return 0
    if isinstance(node, _NormalizedNode):
        return _static_depth(node.inner, open_structs)
    if isinstance(node, _UnionNode | _ArrayNode | _TupleNode | _DictNode | _StructNode):
        if isinstance(node, _StructNode):
            # A tagged Struct may be found through a union, where msgspec skips values
            # looking for the tag: as unbounded as unknown fields.
            if not node.forbid_unknown or node.tag_field is not None or node in open_structs:
                return None
            open_structs.add(node)
        deepest = 0
        for child in node.children():
            depth = _static_depth(child, open_structs)
            if depth is None:
                return None
            deepest = max(deepest, depth)
        if isinstance(node, _StructNode):
            open_structs.discard(node)
        return deepest if isinstance(node, _UnionNode) else deepest + 1
    return None


_plans: dict[Any, _Plan] = {}
_PLAN_CACHE_MAX = 1024
_untyped: Final = msgspec.json.Decoder()


def _plan(model: Any) -> _Plan:
    try:
        return _plans[model]
    except KeyError:
        pass
    plan = _Plan(model)
    if len(_plans) >= _PLAN_CACHE_MAX:
        # Models are normally a fixed set; only code minting types per call gets here.
        _plans.clear()
    _plans[model] = plan
    return plan


_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
# Openers become +1 and closers -1 as signed bytes, so the running sum is the depth.
_BRACKET_SIGNS = bytes.maketrans(b"[{]}", b"\x01\x01\xff\xff")
_OPEN_CLOSE = b"\x01\xff"


def _check_depth(data: bytes, limit: int) -> None:
    """Reject documents nested deeper than ``limit`` before any parser recurses into them.

    Every step is linear and runs in C (no Python loop per byte, no regex that could
    backtrack on an unterminated string): under 50 ms for the worst megabyte.

    Raises:
        InvalidJSON: the nesting is deeper than ``limit``.
    """
    if limit < 1:
        raise ValueError("max_json_depth must be at least 1")
    if data.count(b"[") + data.count(b"{") <= limit:
        return  # the common case: two memchr-speed scans and done
    # JSON escapes pair up left to right, so dropping every \\ and then every \" leaves
    # exactly the quotes that open and close strings; the even pieces between quotes are
    # outside strings.
    plain = data.replace(b"\\\\", b"").replace(b'\\"', b"")
    outside = b"".join(plain.split(b'"')[::2])
    signs = outside.translate(_BRACKET_SIGNS, _NOT_BRACKETS)
    too_deep = InvalidJSON(f"JSON nesting is deeper than {limit} levels")
    if b"\x01" * (limit + 1) in signs:
        raise too_deep
    # Each pass deletes the innermost pairs (depth minus one): wide documents of many
    # small objects shrink to almost nothing before the running sum below.
    passes = 0
    while passes < 2:
        shorter = signs.replace(_OPEN_CLOSE, b"")
        if len(shorter) == len(signs):
            break
        signs = shorter
        passes += 1
        if not signs:
            break
    # An upper bound of the depth any parser reaches before it stops (it stops at the
    # first unbalanced closer, and passes only ever remove a matched pair).
    depth = passes + max(0, max(accumulate(array("b", signs)), default=0))
    if depth > limit:
        raise too_deep


_BYTE_POSITION = re.compile(r"\(byte (\d+)\)")


def _invalid_json(exc: Exception) -> InvalidJSON:
    found = _BYTE_POSITION.search(str(exc))
    if found is not None:
        return InvalidJSON(f"Request body is not valid JSON (at byte {found.group(1)})")
    return InvalidJSON()


def decode(body: bytes | str, model: type[T], *, max_json_depth: int = 32) -> T:
    """Decode a JSON body into ``model``, reporting every field error at once.

    Valid input costs one cached msgspec decode plus the normalisers the model declares.

    Args:
        body: the raw JSON (bytes, or str).
        model: a ``msgspec.Struct`` class (or any type msgspec decodes).
        max_json_depth: deepest nesting of arrays and objects accepted.

    Raises:
        InvalidJSON: malformed JSON, invalid UTF-8, or nesting deeper than ``max_json_depth``.
        ValidationFailed: well-formed JSON that does not fit ``model``; one detail per field
            (codes required, unknown_field, invalid_type, too_short, too_long, out_of_range,
            invalid_format, invalid_email), at most ``MAX_DETAILS``.
    """
    if type(body) is bytes:
        data = body
    elif isinstance(body, str):
        try:
            data = body.encode()
        except UnicodeEncodeError:
            raise InvalidJSON() from None
    elif isinstance(body, bytes | bytearray | memoryview):
        data = bytes(body)
    else:
        raise TypeError(f"decode: body must be bytes or str, not {type(body).__name__}")
    plan = _plans.get(model) or _plan(model)
    # Bracket counting costs more than the typed decode of a small body: skipped when the
    # model itself bounds the depth within the limit (see _static_depth), until a failure.
    if plan.depth > max_json_depth and (
        data.count(b"[") + data.count(b"{") > max_json_depth or max_json_depth < 1
    ):
        _check_depth(data, max_json_depth)
    try:
        return plan.run(data)  # type: ignore[no-any-return]
    except msgspec.ValidationError as exc:
        if plan.depth <= max_json_depth:
            _check_depth(data, max_json_depth)
        raise _slow_path(plan, data, exc) from None
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        if plan.depth <= max_json_depth:
            _check_depth(data, max_json_depth)
        raise _invalid_json(exc) from None


def _slow_path(plan: _Plan, data: bytes, exc: msgspec.ValidationError) -> ArmorError:
    try:
        raw = _untyped.decode(data)
    except msgspec.ValidationError as inner:
        # The document itself holds a number no Python type can take (over 4300 digits,
        # or a float beyond 1.8e308): one error for it, placed by the typed decoder when
        # that is the error it stopped at (the untyped one cannot name struct fields).
        text = str(exc) if "out of range" in str(exc) else str(inner)
        return ValidationFailed(details=[_translate(text)])
    except (msgspec.DecodeError, UnicodeDecodeError) as inner:
        return _invalid_json(inner)
    errors: list[ErrorDetail] = []
    plan.node.validate(raw, (), errors, False)
    _ensure_reported(errors, exc)
    return ValidationFailed(details=errors)


def _ensure_reported(errors: list[ErrorDetail], exc: msgspec.ValidationError) -> None:
    """Add msgspec's own error unless the walk already reported that field (or below it).

    The walk mirrors msgspec's rules; this keeps a rule it does not know (a
    ``__post_init__`` check, a custom type) from ever turning a 422 into an empty one.
    """
    first = _translate(str(exc))
    field = first.field
    if field is None:
        covered = bool(errors)
    else:
        below = field + "."
        covered = any(d.field == field or (d.field or "").startswith(below) for d in errors)
    if not covered and len(errors) < MAX_DETAILS:
        errors.append(first)


def _list_keys(plan: _Plan) -> frozenset[str]:
    """Keys of the model whose field takes a sequence: repeated query keys fill it."""
    node = plan.node
    if not isinstance(node, _StructNode):
        raise TypeError("decode_query needs a msgspec.Struct model")
    keys = set()
    for field in node.fields:
        candidates = [field.node]
        while candidates:
            current = candidates.pop()
            if isinstance(current, _NormalizedNode):
                candidates.append(current.inner)
            elif isinstance(current, _UnionNode):
                candidates.extend(current.members)
            elif isinstance(current, _ArrayNode | _TupleNode):
                keys.add(field.key)
    return frozenset(keys)


def decode_query(scope: Scope | bytes | str, model: type[T], *, max_fields: int = 100) -> T:
    """Decode a query string into ``model``, reporting every field error at once.

    Repeated keys fill sequence fields (``?tag=a&tag=b``); a repeated key for a single-value
    field is an error rather than a silent first-or-last pick (HTTP parameter pollution).
    Strings are coerced to int, float and bool as msgspec's lax mode does.

    Args:
        scope: an ASGI HTTP scope (its ``query_string`` is read), or the raw query string.
        model: a ``msgspec.Struct`` class.
        max_fields: most ``&``-separated fields accepted.

    Raises:
        ValidationFailed: the query does not fit ``model``; one detail per field, also for
            too many fields or percent-encoded bytes that are not UTF-8.
        TypeError: ``model`` is not a ``msgspec.Struct``.
    """
    if isinstance(scope, str):
        query = scope
    else:
        raw = scope if isinstance(scope, bytes | bytearray) else scope.get("query_string", b"")
        try:
            query = bytes(raw).decode()
        except UnicodeDecodeError:
            raise _query_not_utf8() from None
    plan = _plan(model)
    list_keys = plan.list_keys
    if list_keys is None:
        list_keys = plan.list_keys = _list_keys(plan)
    try:
        # str in, str out: parse_qsl's bytes mode insists on ASCII.
        pairs = parse_qsl(query, keep_blank_values=True, max_num_fields=max_fields, errors="strict")
    except UnicodeDecodeError:
        raise _query_not_utf8() from None
    except ValueError:
        detail = ErrorDetail("too_long", f"The query string has more than {max_fields} fields")
        raise ValidationFailed(details=[detail]) from None
    data: dict[str, Any] = {}
    repeated: set[str] = set()
    for key, text in pairs:
        if key in list_keys:
            data.setdefault(key, []).append(text)
        elif key in data:
            repeated.add(key)
        else:
            data[key] = text
    node = plan.node
    errors: list[ErrorDetail] = []
    if not repeated:
        try:
            value = msgspec.convert(data, model, strict=False)
        except msgspec.ValidationError as exc:
            node.validate(data, (), errors, True)
            _ensure_reported(errors, exc)
        else:
            if node.normalizes:
                value = node.normalize(value, (), errors)
            if not errors:
                return value
    else:
        for key in sorted(repeated):
            _add(errors, "invalid_type", "Expected a single value", (_segment(key),))
        # Keep going so that the answer lists every problem, not just the repeats.
        found: list[ErrorDetail] = []
        node.validate(data, (), found, True)
        fields = {_segment(key) for key in repeated}
        for detail in found:
            if detail.field not in fields and len(errors) < MAX_DETAILS:
                errors.append(detail)
    raise ValidationFailed(details=errors)


def _query_not_utf8() -> ValidationFailed:
    detail = ErrorDetail("invalid_format", "The query string is not valid UTF-8")
    return ValidationFailed(details=[detail])
