"""STYLE.md's line budget: every module under ``decograph/`` stays at most 450 lines."""
from __future__ import annotations

from pathlib import Path

import pytest

import decograph

LIMIT = 450
ROOT = Path(decograph.__file__).resolve().parent
MODULES = sorted(ROOT.rglob("*.py"))


def test_modules_are_found() -> None:
    assert ROOT / "ir" / "ops.py" in MODULES


@pytest.mark.parametrize("path", MODULES, ids=[str(p.relative_to(ROOT.parent)) for p in MODULES])
def test_module_line_budget(path: Path) -> None:
    n = len(path.read_text(encoding="utf-8").splitlines())
    assert n <= LIMIT, f"{path.relative_to(ROOT.parent)} has {n} lines (budget {LIMIT}): split it (see STYLE.md, Size)"
