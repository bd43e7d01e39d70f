"""The operator package is product code: no test tooling in it (issue #12: the harness lives under tests/)."""

from __future__ import annotations

import ast
from pathlib import Path

OPERATOR = Path(__file__).resolve().parents[2] / "operator"
TEST_ONLY = {"kmock", "pytest", "pytest_asyncio", "hypothesis"}
MAX_LINES = 400


def imported_roots(path: Path) -> set[str]:
    roots = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            roots |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            roots.add(node.module.split(".")[0])
    return roots


def test_no_operator_module_imports_test_tooling():
    offenders = {path.name: sorted(imported_roots(path) & TEST_ONLY) for path in OPERATOR.glob("*.py")}
    assert {name: bad for name, bad in offenders.items() if bad} == {}


def test_operator_modules_stay_small():
    sizes = {path.name: len(path.read_text().splitlines()) for path in OPERATOR.glob("*.py")}
    assert {name: n for name, n in sizes.items() if n > MAX_LINES} == {}
