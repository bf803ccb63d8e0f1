"""The public API: the documented names exist, and every module's ``__all__`` is exact."""

from __future__ import annotations

import importlib
import pkgutil

import pytest

import asgi_armor

CONTRACT = [
    "armor",
    "ArmorConfig",
    "ErrorResponse",
    "ErrorDetail",
    "ArmorError",
    "ErrorMiddleware",
    "ValidationFailed",
    "RateLimited",
    "CircuitOpenError",
    "RequestTimeout",
    "InvalidSignature",
    "decode",
    "decode_query",
    "Email",
    "Name",
    "InputLimits",
    "Rate",
    "RateLimiter",
    "Decision",
    "Rule",
    "RateLimitMiddleware",
    "MemoryStore",
    "RedisStore",
    "IdempotencyMiddleware",
    "CircuitBreaker",
    "with_timeout",
    "TimeoutMiddleware",
    "gather_partial",
    "Partial",
    "sign",
    "verify",
    "SignatureMiddleware",
    "HexHmac",
    "StandardWebhooks",
    "Stripe",
    "GitHub",
    "ConcurrencyLimit",
    "protect",
]

OPTIONAL = {
    "asgi_armor.client": "httpx",
    "asgi_armor.contrib.fastapi": "fastapi",
    "asgi_armor.contrib.quart": "quart",
    "asgi_armor.contrib.litestar": "litestar",
}


def isort_style(name: str) -> tuple[int, str]:
    """Ruff's RUF022 order: CONSTANTS, then Classes, then functions."""
    if name.isupper() or (name.upper() == name and not name.startswith("__")):
        return 0, name
    return (1 if name[:1].isupper() else 2), name


def modules() -> list[str]:
    names = ["asgi_armor"]
    for info in pkgutil.walk_packages(asgi_armor.__path__, "asgi_armor."):
        names.append(info.name)
    return names


def test_design_contract_names_are_exported() -> None:
    missing = [name for name in CONTRACT if name not in asgi_armor.__all__]
    assert missing == []
    for name in asgi_armor.__all__:
        assert hasattr(asgi_armor, name), name


@pytest.mark.parametrize("name", modules())
def test_all_is_sorted_and_complete(name: str) -> None:
    if name in OPTIONAL:
        pytest.importorskip(OPTIONAL[name])
    module = importlib.import_module(name)
    exported = getattr(module, "__all__", None)
    assert exported is not None, f"{name} has no __all__"
    assert list(exported) == sorted(exported, key=isort_style), f"{name}.__all__ is not sorted"
    for attribute in exported:
        assert hasattr(module, attribute), f"{name}.__all__ names missing {attribute}"


@pytest.mark.parametrize("name", asgi_armor.__all__)
def test_public_names_are_documented(name: str) -> None:
    value = getattr(asgi_armor, name)
    if isinstance(value, str) or not callable(value):
        return
    assert (value.__doc__ or "").strip(), f"{name} has no docstring"
