"""The tests and the benchmarks share their support code through ``sollol_locality.testing``
only: no test imports ``benchmarks``, and no benchmark reads the test suite or edits
``sys.path``. Checked on the source (AST and text), function-level imports included."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TESTS = sorted((ROOT / "tests").rglob("*.py"))
BENCHMARKS = sorted((ROOT / "benchmarks").rglob("*.py"))
TEST_MODULES = {"tests", "helpers", "conftest"} | {p.stem for p in TESTS}


def imported(tree: ast.AST) -> list[str]:
    """Every module an ``import`` or ``from ... import`` names, at any depth, and every string
    given to ``importlib.import_module`` / ``__import__``."""
    names: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.append(node.module)
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            func = node.func
            called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if called in ("import_module", "__import__") and isinstance(node.args[0].value, str):
                names.append(node.args[0].value)
    return names


def top(name: str) -> str:
    return name.split(".")[0]


def test_the_files_are_found() -> None:
    assert len(TESTS) > 10 and len(BENCHMARKS) >= 3


@pytest.mark.parametrize("path", TESTS, ids=lambda p: p.name)
def test_no_test_imports_the_benchmarks(path: Path) -> None:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    assert [n for n in imported(tree) if top(n) == "benchmarks"] == []


@pytest.mark.parametrize("path", BENCHMARKS, ids=lambda p: p.name)
def test_no_benchmark_reads_the_tests_or_edits_sys_path(path: Path) -> None:
    text = path.read_text(encoding="utf-8")
    tree = ast.parse(text)
    assert [n for n in imported(tree) if top(n) in TEST_MODULES] == []
    assert "tests/" not in text and "spec_from_file_location" not in text
    strings = {n.value for n in ast.walk(tree)
               if isinstance(n, ast.Constant) and isinstance(n.value, str)}
    assert "tests" not in strings  # e.g. REPO / "tests"
    touched = [ast.unparse(n) for n in ast.walk(tree)
               if isinstance(n, ast.Attribute) and n.attr == "path"
               and isinstance(n.value, ast.Name) and n.value.id == "sys"]
    from_sys = [a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)
                and n.module == "sys" for a in n.names]
    assert touched == [] and "path" not in from_sys
