"""Every ```python block in the README and docs/ runs as written, so examples cannot rot.

Blocks are run in order per page, each page in a fresh namespace (a page may build on its
earlier blocks). Illustrative fragments that are not meant to run use ```py instead.
"""

from __future__ import annotations

import os
import re
import sys
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"^```python\n(.*?)^```", re.DOTALL | re.MULTILINE)


def test_pages_exist() -> None:
    names = {page.name for page in PAGES}
    for capability in (
        "errors", "validation", "ratelimit", "idempotency", "breaker", "timeouts",
        "degradation", "signing", "shedding",
    ):  # fmt: skip
        assert f"{capability}.md" in names


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_python_blocks_run(page: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    blocks = BLOCK.findall(page.read_text(encoding="utf-8"))
    if not blocks:
        pytest.skip(f"{page.name} has no python blocks")
    monkeypatch.chdir(tmp_path)
    # A real module, so msgspec and typing can resolve the annotations of classes defined there.
    module = types.ModuleType(f"docs_{page.stem}")
    monkeypatch.setitem(sys.modules, module.__name__, module)
    for index, source in enumerate(blocks):
        try:
            exec(compile(source, f"{page.name}[block {index}]", "exec"), module.__dict__)
        except Exception as exc:
            pytest.fail(f"{page.name} block {index} failed: {type(exc).__name__}: {exc}\n{source}")


def test_site_builds_strict(tmp_path: Path) -> None:
    """``make docs``: every page in the nav exists and every link resolves."""
    import shutil
    import subprocess

    mkdocs = shutil.which("mkdocs", path=str(Path(sys.executable).parent))
    if mkdocs is None:
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
