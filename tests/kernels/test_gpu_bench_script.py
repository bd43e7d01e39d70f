"""bench/gpu_kernels.py stays runnable without a GPU: its arguments and a --dry-run of every section."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "bench" / "gpu_kernels.py"


def test_dry_run_reports_every_section_with_its_correctness(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path)}
    env.pop("TRITON_INTERPRET", None)  # the script must set it itself
    result = subprocess.run([sys.executable, str(SCRIPT), "--dry-run"], env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [json.loads(line) for line in (tmp_path / "gpu_kernels.jsonl").read_text().splitlines()]
    assert lines == [json.loads(line) for line in result.stdout.splitlines()]
    benches = [line["bench"] for line in lines]
    assert set(benches) == {"copy", "decode_sweep", "decode_config_chosen", "decode", "matmul_sweep",
                            "matmul_config_chosen", "matmul", "prefill", "moe", "norm_rope", "done"}
    for line in lines:
        if line["bench"] in ("decode", "matmul", "prefill", "moe"):
            assert line["ms"] > 0 and line["wall_ms"] > 0 and line["rel_err"] < line["tolerance"], line
            assert "failed" not in line, line
    chosen = {line["kv_dtype"]: line for line in lines if line["bench"] == "decode_config_chosen"}
    decode = [line for line in lines if line["bench"] == "decode"]
    assert [line["kv_dtype"] for line in decode] == ["bf16", "fp8"]  # interleaved, shape by shape
    for line in decode:
        assert line["config"] == {k: chosen[line["kv_dtype"]][k] for k in ("block_n", "num_warps", "num_stages")}
    assert decode[1]["speedup_vs_bf16_kv"] is not None
    assert {line["mode"] for line in lines if line["bench"] == "matmul"} == {"int8", "int4", "fp8"}
    assert {line["mode"] for line in lines if line["bench"] == "matmul_config_chosen"} == {"int8", "int4"}
    (norm_rope,) = (line for line in lines if line["bench"] == "norm_rope")
    assert norm_rope["rms_norm_ms"] > 0 and norm_rope["rope_ms"] > 0 and isinstance(norm_rope["pays"], bool)
    assert lines[-1]["failures"] == 0


def test_a_case_over_its_tolerance_fails_the_run(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path)}
    env.pop("TRITON_INTERPRET", None)
    result = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--only", "matmul", "--no-sweep",
                             "--tolerance", "0"], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 1, result.stderr[-3000:]
    matmuls = [json.loads(line) for line in result.stdout.splitlines() if '"matmul"' in line]
    assert matmuls and all("over tolerance 0.0" in line["failed"] for line in matmuls)


def test_unknown_section_is_rejected():
    result = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--only", "decode,attention"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "unknown sections ['attention']" in result.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU the script runs the benchmarks (by hand)")
def test_engine_script_says_when_there_is_no_gpu(tmp_path):
    result = subprocess.run(["bash", str(ROOT / "bench" / "gpu_engine.sh")], env={**os.environ, "OUT": str(tmp_path)},
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "torch sees no CUDA device, nothing was run" in result.stderr


@pytest.mark.parametrize("script", ["gpu_check.sh", "gpu_engine.sh"])
def test_the_device_scripts_stop_in_one_line_when_llguidance_is_missing(tmp_path, script):
    """The device's image has no llguidance (the engine imports it): without the wheels bench/gpu_wheels.sh
    saves, each script says what to do in one line and exits 2 before spending device time."""
    blocked = tmp_path / "blocked" / "llguidance"
    blocked.mkdir(parents=True)
    (blocked / "__init__.py").write_text("raise ImportError('not in the device image')\n")
    env = {**os.environ, "OUT": str(tmp_path / "out"), "PYTHONPATH": str(blocked.parent)}
    result = subprocess.run(["bash", str(ROOT / "bench" / script), "--dry-run"], env=env, capture_output=True,
                            text=True, timeout=120, cwd=tmp_path)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert "llguidance" in lines[0] and "bench/gpu_wheels.sh" in lines[0]
