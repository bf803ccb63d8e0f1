"""The module map's leaves (docs/architecture.md, "Module map"): each imports only what
sits below it, so the error hierarchy, the ASGI helpers and the GCRA core are usable (and
reasoned about) without the layers above them.

Each module is imported in a fresh interpreter whose ``asgi_armor`` package is registered
bare (its ``__init__``, the public façade that loads everything, does not run), and the
``asgi_armor`` modules that came with it are compared with what the map allows.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import asgi_armor

PACKAGE = Path(asgi_armor.__file__).parent

_PROBE = """
import importlib, json, sys, types
root = types.ModuleType("asgi_armor")
root.__path__ = [sys.argv[1]]
sys.modules["asgi_armor"] = root
importlib.import_module(sys.argv[2])
print(json.dumps(sorted(m for m in sys.modules if m.startswith("asgi_armor."))))
"""

LEAVES = {
    "asgi_armor._types": set(),
    "asgi_armor.errors": {"asgi_armor._types"},
    "asgi_armor._asgi": {"asgi_armor._types", "asgi_armor.errors"},
    "asgi_armor._checks": {"asgi_armor._types", "asgi_armor.errors"},
    "asgi_armor.routes": {"asgi_armor._types", "asgi_armor.errors", "asgi_armor._asgi"},
    "asgi_armor.ratelimit.bucket": {"asgi_armor.ratelimit"},
    # The sink every layer may import: no layer, and no exporter library until built.
    "asgi_armor.metrics": {
        "asgi_armor._types",
        "asgi_armor.errors",
        "asgi_armor._asgi",
        "asgi_armor.routes",
    },
}


def _loaded(module: str) -> set[str]:
    out = subprocess.run(
        [sys.executable, "-c", _PROBE, str(PACKAGE), module],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return set(json.loads(out)) - {module}


@pytest.mark.parametrize(("module", "allowed"), sorted(LEAVES.items()))
def test_leaf_imports_only_what_sits_below_it(module: str, allowed: set[str]) -> None:
    assert _loaded(module) - allowed == set()


def test_the_stores_use_the_gcra_core_without_the_rate_limit_layers() -> None:
    # Before the rate-limit package loaded its names on first use, importing MemoryStore
    # ran asgi_armor.ratelimit's __init__, and with it the limiter and the middleware,
    # which import the stores back.
    loaded = _loaded("asgi_armor.stores.memory")
    assert "asgi_armor.ratelimit.bucket" in loaded
    assert {m for m in loaded if m.startswith("asgi_armor.ratelimit.")} == {
        "asgi_armor.ratelimit.bucket"
    }
