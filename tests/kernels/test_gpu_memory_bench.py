"""bench/gpu_memory.py (planned vs measured bytes per part): its --dry-run rows, and that a part measured above
its plan fails the run while one below it does not."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "bench"


def _gpu_memory_module():
    spec = importlib.util.spec_from_file_location("gpu_memory_bench", BENCH / "gpu_memory.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_memory") / "model"
    subprocess.run([sys.executable, str(BENCH / "gpu_model.py"), str(out), "--shape", "tiny", "--device", "cpu",
                    "--dtype", "fp32"], check=True, capture_output=True, timeout=300)
    return out


def _dry_run(model: Path, *extra: str) -> subprocess.CompletedProcess:
    # the engine's own CPU path (the torch references): this directory's fixture sets TRITON_INTERPRET for the
    # kernel tests, and an interpreted engine step takes minutes
    env = {k: v for k, v in os.environ.items() if k not in ("CUDA_VISIBLE_DEVICES", "TRITON_INTERPRET")}
    return subprocess.run([sys.executable, str(BENCH / "gpu_memory.py"), str(model), "--dry-run", *extra],
                          capture_output=True, text=True, timeout=300, cwd=BENCH, env=env)


def test_comparison_fails_only_above_the_plan():
    compare = _gpu_memory_module().compare
    assert compare(1000, 1000) == {"ratio": 1.0, "within_3pct": True, "above_plan": False}
    assert compare(1000, 970) == {"ratio": 0.97, "within_3pct": True, "above_plan": False}
    assert compare(1000, 969) == {"ratio": 0.969, "within_3pct": False, "above_plan": False}
    assert compare(1000, 1001) == {"ratio": 1.001, "within_3pct": False, "above_plan": True}
    assert compare(1000, None) == {"ratio": None, "within_3pct": None, "above_plan": False}
    assert compare(0, 5)["above_plan"] is True


def test_dry_run_rows_per_moment_and_part(tiny_model):
    result = _dry_run(tiny_model)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    setup = lines[0]
    assert setup["tp"] == 1 and setup["plan"]["device"] == "cpu" and setup["plan"]["num-kv-blocks"] > 0
    parts = {(r["moment"], r["part"]): r for r in lines if "part" in r}
    loaded = ("weights", "rotary_tables")
    assert set(parts) == {("after_load", p) for p in (*loaded, "torch_allocated", "other", "process")} | {
        ("after_kv", p) for p in (*loaded, "kv_cache", "torch_allocated", "other", "process")} | {
        ("peak", p) for p in (*loaded, "kv_cache", "activations", "torch_allocated", "other", "process")}
    for key in [("after_load", "weights"), ("after_load", "rotary_tables"), ("after_kv", "kv_cache")]:
        # tensor bytes on the CPU: exactly the plan
        assert parts[key]["measured"] == parts[key]["planned"] > 0 and parts[key]["within_3pct"], parts[key]
    for (_moment, part), row in parts.items():  # what the CPU cannot see is null, not invented
        if part not in (*loaded, "kv_cache"):
            assert row["measured"] is None and row["within_3pct"] is None and row["planned"] > 0, row
    goals = [r for r in lines if "goal" in r]
    assert [g["moment"] for g in goals] == ["after_load", "after_kv", "peak"]
    assert all(g["meets_goal"] and g["above_plan"] == [] for g in goals)
    step = goals[-1]["step"]
    assert step["step_tokens"] == setup["plan"]["max-num-batched-tokens"] and step["seqs"] == setup["plan"][
        "max-num-seqs"]
    assert lines[-1] == {"bench": "gpu_memory", "tp": 2, "skipped": "0 GPU visible"}


def test_a_part_above_its_plan_fails_the_run(tiny_model):
    result = _dry_run(tiny_model, "--plan-scale", "0.9")
    assert result.returncode == 1, result.stderr[-3000:]
    goals = [json.loads(line) for line in result.stdout.splitlines() if '"goal"' in line]
    assert goals[0]["above_plan"] == ["weights", "rotary_tables"]
    assert goals[1]["above_plan"] == ["weights", "rotary_tables", "kv_cache"]
    assert not goals[0]["meets_goal"]
