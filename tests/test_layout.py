"""The layout of docs/architecture.md: the top-level portions of `kvpilot` and the one-way arrows
between them and between the runtime's rooms. A new import against an arrow fails here."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PORTIONS = ("cli", "operator", "runtime", "kernels")

# What each room may import of kvpilot (besides itself). Anything else is an arrow the wrong way.
ALLOWED: dict[str, set[str]] = {
    "kernels": set(),
    "runtime.memory": set(),
    "runtime.models": {"runtime.memory", "kernels"},
    "runtime.loading": {"runtime.memory", "runtime.models", "kernels"},
    "runtime.engine": {"runtime.memory", "runtime.models", "runtime.loading", "kernels"},
    "runtime.server": {"runtime.memory", "runtime.engine", "runtime.loading", "runtime.usage", "runtime.contract"},
    "runtime.contract": set(),
    "runtime.usage": {"runtime.memory"},
    "runtime.__main__": {"runtime.server", "runtime.usage"},
    "operator": {"runtime.memory", "runtime.contract"},
    "cli": {"operator", "runtime.memory", "runtime.server", "runtime.engine", "runtime.loading", "runtime.usage"},
}
# Packages only the tests may use.
TEST_ONLY = ("kmock", "pytest", "hypothesis", "schemathesis")


def room_of(module: str) -> str:
    """`runtime.engine.scheduler` -> `runtime.engine`; `operator.kube` -> `operator`."""
    parts = module.split(".")
    return ".".join(parts[:2]) if parts[0] == "runtime" else parts[0]


def product_modules() -> dict[str, Path]:
    modules = {}
    for portion in PORTIONS:
        for path in (ROOT / portion).rglob("*.py"):
            relative = path.relative_to(ROOT).with_suffix("")
            modules[".".join(relative.parts).removesuffix(".__init__")] = path
    return modules


def imports_of(path: Path) -> set[str]:
    """Every module `path` imports, at its top or inside functions."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


MODULES = product_modules()


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_follow_the_arrows(module):
    room = room_of(module)
    allowed = ALLOWED[room] | {room}
    wrong = sorted(name for name in imports_of(MODULES[module])
                   if name.startswith("kvpilot.") and room_of(name.removeprefix("kvpilot.")) not in allowed)
    assert not wrong, f"{module} (room {room}) imports {wrong}; {room} may import only {sorted(allowed)}"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_product_never_imports_test_tools(module):
    wrong = sorted(name for name in imports_of(MODULES[module]) if name.split(".")[0] in TEST_ONLY)
    assert not wrong, f"{module} imports test-only packages {wrong}"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_modules_read_in_one_sitting(module):
    lines = len(MODULES[module].read_text().splitlines())
    assert lines <= 400, f"{module} has {lines} lines: split it (docs/architecture.md: one concept per file)"


def test_every_room_is_listed():
    assert {room_of(module) for module in MODULES} <= set(ALLOWED)


def test_top_level_portions_have_no_init():
    for folder in PORTIONS:
        assert not (ROOT / folder / "__init__.py").exists(), f"{folder}/__init__.py shadows another module"


def test_stdlib_operator_still_imports_from_repo_root():
    code = "import operator, sys; print(operator.__file__); sys.exit(0 if hasattr(operator, 'itemgetter') else 1)"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "/operator/" not in result.stdout.replace(str(ROOT), "")
    assert not result.stdout.startswith(str(ROOT))


def test_portions_import_as_kvpilot_namespace():
    code = "import kvpilot.cli.main, kvpilot.operator.spec, kvpilot.runtime.memory.planner, kvpilot.kernels.reference"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_memory_model_is_pure_python():
    code = ("import sys, kvpilot.runtime.memory.planner, kvpilot.runtime.memory.facts, "
            "kvpilot.runtime.memory.devices, kvpilot.runtime.memory.plan_view; "
            "bad = {'torch', 'kopf', 'kubernetes'} & set(sys.modules); sys.exit(f'imported {bad}' if bad else 0)")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
