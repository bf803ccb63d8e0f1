"""Every ```python block in the README and docs/ runs as written, and every ```toml block
is a config that builds a stack, so examples cannot rot.

Blocks are run in order per page, each page in a fresh namespace (a page may build on its
earlier blocks). Illustrative fragments that are not meant to run use ```py instead.
Nothing here skips under ``make test``: a page without examples must be listed below, and
a missing mkdocs fails (``ARMOR_REQUIRE_DOCS=1``).
"""

from __future__ import annotations

import os
import re
import sys
import tomllib
import types
from pathlib import Path

import pytest

from asgi_armor import ArmorConfig, armor
from asgi_armor.stores.memory import MemoryStore

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"^```python\n(.*?)^```", re.DOTALL | re.MULTILINE)
TOML_BLOCK = re.compile(r"^```toml\n(.*?)^```", re.DOTALL | re.MULTILINE)
#: Pages with no python example, on purpose. A page that loses its examples, or a new
#: page without any, fails test_python_examples_are_where_expected until listed here.
NO_PYTHON = {
    "architecture.md": "the design document: layers, request flow, module map",
    "benchmarks.md": "numbers and how they were measured",
    "comparison.md": "a comparison table",
    "config.md": "the TOML reference (its example is checked by test_toml_examples_build)",
    "demo.md": "HTTP requests against the demo (curl)",
    "index.md": "the overview; its code is in quickstart.md",
    "mutation.md": "results of make mutate",
}
PYTHON_PAGES = [page for page in PAGES if BLOCK.search(page.read_text(encoding="utf-8"))]
TOML_EXAMPLES = [
    (page, index, source)
    for page in PAGES
    for index, source in enumerate(TOML_BLOCK.findall(page.read_text(encoding="utf-8")))
]


def test_pages_exist() -> None:
    names = {page.name for page in PAGES}
    for capability in (
        "errors", "validation", "ratelimit", "idempotency", "breaker", "timeouts",
        "degradation", "signing", "shedding",
    ):  # fmt: skip
        assert f"{capability}.md" in names


def test_python_examples_are_where_expected() -> None:
    without = {page.name for page in PAGES} - {page.name for page in PYTHON_PAGES}
    assert without == set(NO_PYTHON)


@pytest.mark.parametrize("page", PYTHON_PAGES, ids=lambda p: p.name)
def test_python_blocks_run(page: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    blocks = BLOCK.findall(page.read_text(encoding="utf-8"))
    monkeypatch.chdir(tmp_path)
    # A real module, so msgspec and typing can resolve the annotations of classes defined there.
    module = types.ModuleType(f"docs_{page.stem}")
    monkeypatch.setitem(sys.modules, module.__name__, module)
    for index, source in enumerate(blocks):
        try:
            exec(compile(source, f"{page.name}[block {index}]", "exec"), module.__dict__)
        except Exception as exc:
            pytest.fail(f"{page.name} block {index} failed: {type(exc).__name__}: {exc}\n{source}")


def test_toml_examples_are_found() -> None:
    assert {(page.name, index) for page, index, _ in TOML_EXAMPLES} == {
        ("config.md", 0),
        ("deployment.md", 0),
        ("deployment.md", 1),
        ("deployment.md", 2),
        ("deployment.md", 3),
        ("frameworks.md", 0),
        ("idempotency.md", 0),
        ("observability.md", 0),
        ("quickstart.md", 0),
    }


@pytest.mark.parametrize(
    ("page", "index", "source"),
    TOML_EXAMPLES,
    ids=[f"{page.name}-{index}" for page, index, _ in TOML_EXAMPLES],
)
def test_toml_examples_build(
    page: Path, index: int, source: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each example loads (no unknown key, no bad value) and builds its whole stack."""
    config = ArmorConfig.from_dict(tomllib.loads(source), source=f"{page.name}[toml {index}]")
    for entry in config.signature:
        for name in [entry.secret_env, *entry.secrets_env]:
            if name:
                monkeypatch.setenv(name, "example-secret")

    async def app(scope: object, receive: object, send: object) -> None:
        """Never called: the stack is only built."""

    armored = armor(app, config, identify=lambda scope: None, store=MemoryStore())
    expected = {
        "RateLimitMiddleware": config.rate_limit,
        "IdempotencyMiddleware": config.idempotency,
        "TimeoutMiddleware": config.timeout,
        "SignatureMiddleware": config.signature,
        "InputLimits": config.limits,
        "ConcurrencyLimit": config.shedding,
        "RequestMetrics": config.metrics,
    }
    built = {type(layer).__name__ for layer in armored.layers}
    assert built == {"ErrorMiddleware"} | {name for name, given in expected.items() if given}


def test_site_builds_strict(tmp_path: Path) -> None:
    """``make docs``: every page in the nav exists and every link resolves."""
    import shutil
    import subprocess

    mkdocs = shutil.which("mkdocs", path=str(Path(sys.executable).parent))
    if mkdocs is None:
        if os.environ.get("ARMOR_REQUIRE_DOCS") == "1":
            pytest.fail("ARMOR_REQUIRE_DOCS=1 but mkdocs is not installed (the docs extra)")
        pytest.skip("mkdocs is not installed (the docs extra)")
    result = subprocess.run(
        [mkdocs, "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
        check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "site" / "config" / "index.html").read_text().count("max_body_bytes") >= 1
