"""The engine and the CLI name outcomes and causes through tune_sana.outcomes, never as string
literals (a misspelt literal compares unequal silently)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tune_sana.engine import stopping
from tune_sana.outcomes import Cause, Outcome

ROOT = Path(__file__).resolve().parents[1]
FILES = sorted([*(ROOT / "tune_sana" / "engine").glob("*.py"), ROOT / "tune_sana" / "cli.py"])
WORDS = {o.value for o in Outcome} | {c.value for c in Cause}
LOOKUPS = {"get", "pop", "setdefault"}  # d.get("error"): a column's name, not an outcome


def _literals(path: Path) -> list[str]:
    """Outcome and cause words used as string constants, other than as a key."""
    tree = ast.parse(path.read_text())
    keys: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Dict):
            keys.update(id(k) for k in node.keys if k is not None)
        elif isinstance(node, ast.Subscript):
            keys.add(id(node.slice))
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
              and node.func.attr in LOOKUPS and node.args):
            keys.add(id(node.args[0]))
    return [f"{path.name}:{node.lineno}: {node.value!r}" for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and node.value in WORDS and id(node) not in keys]


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_no_outcome_or_cause_literals(path: Path) -> None:
    assert _literals(path) == []


def test_stopping_has_no_diverged_constant_of_its_own() -> None:
    assert not hasattr(stopping, "DIVERGED")
