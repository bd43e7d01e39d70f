"""The namespace layout of DESIGN.md: operator/, runtime/, kernels/ are portions of `kvpilot`."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_top_level_portions_have_no_init():
    for folder in ("operator", "runtime", "kernels"):
        assert not (ROOT / folder / "__init__.py").exists(), f"{folder}/__init__.py shadows another module"


def test_stdlib_operator_still_imports_from_repo_root():
    code = "import operator, sys; print(operator.__file__); sys.exit(0 if hasattr(operator, 'itemgetter') else 1)"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "/operator/" not in result.stdout.replace(str(ROOT), "")
    assert not result.stdout.startswith(str(ROOT))


def test_portions_import_as_kvpilot_namespace():
    code = "import kvpilot.operator.spec, kvpilot.runtime.planner, kvpilot.kernels.reference"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_memory_model_is_pure_python():
    code = ("import sys, kvpilot.runtime.planner, kvpilot.runtime.model_facts, kvpilot.runtime.devices; "
            "bad = {'torch', 'kopf', 'kubernetes'} & set(sys.modules); sys.exit(f'imported {bad}' if bad else 0)")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
