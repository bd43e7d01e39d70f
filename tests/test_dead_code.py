"""No dead code: vulture over the product, the tests and the benches (a name used only by a test or a
bench is still used). Names that frameworks call by reflection (pydantic fields and validators,
FastAPI routes, kopf settings, torch's `forward`) are listed in tests/dead_code_whitelist.py; add a
name there only when something outside Python's sight uses it, and say what."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCANNED = ["cli", "operator", "runtime", "kernels", "tests", "bench"]


def test_no_unused_code():
    result = subprocess.run([sys.executable, "-m", "vulture", *SCANNED, "tests/dead_code_whitelist.py",
                             "--min-confidence", "60"],
                            cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, f"unused code (remove it, or whitelist what a framework calls):\n{result.stdout}"
