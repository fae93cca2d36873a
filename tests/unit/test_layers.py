"""The architecture holds: layers only import downwards, no import circles, modules of one job.

The layers are the import-linter contracts in pyproject.toml (drawn in docs/architecture.md).
The check runs on the real tree, and once on a copy with one upward import planted, to show it
catches one.
"""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SRC = ROOT / "src" / "edgewise"
MAX_LINES = 500
LINT = [sys.executable, "-c", "from importlinter.cli import lint_imports_command as c; c()"]


def lint(src_root: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(src_root)}
    return subprocess.run(
        [*LINT, str(ROOT / "pyproject.toml"), "--no-cache", "--no-logo"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )


def test_import_contracts_are_kept() -> None:
    res = lint(ROOT / "src")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "Contracts: 2 kept, 0 broken." in res.stdout


def test_an_upward_import_is_caught(tmp_path: Path) -> None:
    shutil.copytree(SRC, tmp_path / "edgewise", ignore=shutil.ignore_patterns("__pycache__"))
    store = tmp_path / "edgewise" / "outbox" / "store.py"
    store.write_text(store.read_text() + "\nfrom edgewise.pipeline import batch  # noqa\n")
    res = lint(tmp_path)
    assert res.returncode == 1
    assert "edgewise.outbox.store -> edgewise.pipeline.batch" in res.stdout
    assert "layers (docs/architecture.md) BROKEN" in res.stdout


def _too_long() -> list[str]:
    out = []
    for path in sorted(SRC.rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        if text.count("\n") <= MAX_LINES:
            continue
        doc = ast.get_docstring(ast.parse(text)) or ""
        if "must be one file" not in doc:
            out.append(f"{path.relative_to(ROOT)}: {text.count(chr(10))} lines")
    return out


def test_modules_of_one_job() -> None:
    """Over 500 lines only with a docstring that says why it 'must be one file'."""
    assert _too_long() == []


@pytest.mark.parametrize("pkg", sorted(p.name for p in SRC.iterdir() if p.is_dir()
                                       and (p / "__init__.py").exists()))
def test_every_package_says_what_it_holds(pkg: str) -> None:
    doc = ast.get_docstring(ast.parse((SRC / pkg / "__init__.py").read_text())) or ""
    assert len(doc.split()) >= 8, f"src/edgewise/{pkg}/__init__.py needs a docstring"
