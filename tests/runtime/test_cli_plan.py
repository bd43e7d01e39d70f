"""`kvpilot plan`: tables for people, JSON for machines, one line and exit 2 for mistakes."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from kvpilot.cli.main import main
from kvpilot.runtime.memory.devices import local_device

ROOT = Path(__file__).resolve().parents[2]


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kvpilot.cli.main", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)


def test_plan_manifest_table():
    result = run("plan", "examples/llama-3.1-70b.yaml")
    assert result.returncode == 0, result.stderr
    for words in ("llama-3.1-70b", "tensor parallel", "KV cache", "weights", "headroom", "why:"):
        assert words in result.stdout


def test_plan_flags_json(capsys):
    assert main(["plan", "--model", "llama-3.1-70b", "--gpu", "h100-80gb", "--max-context", "32768",
                 "--concurrency", "16", "--output", "json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["tensor_parallel"] == 8 and data["quantization"] == "bf16"
    assert data["kv_capacity_sequences"] >= 16 and data["reasons"]


def test_plan_overrides_on_manifest(capsys):
    assert main(["plan", "examples/llama-3.1-70b.yaml", "--optimize", "cost", "--output", "json"]) == 0
    assert json.loads(capsys.readouterr().out)["quantization"] == "int4"


def test_cpu_plans_quantized_weights_when_asked(capsys):
    assert main(["plan", "--model", "smollm2-135m", "--gpu", "cpu", "--quantization", "int4", "--output",
                 "json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["quantization"] == "int4" and data["device_kind"] == "cpu"


def test_plan_local_machine(capsys):
    assert main(["plan", "--model", "smollm2-135m", "--gpu", "local", "--max-context", "2048",
                 "--output", "json"]) == 0
    data = json.loads(capsys.readouterr().out)
    local = local_device()[0]
    assert (data["device"], data["device_kind"]) == (local.name, local.kind)
    assert data["memory"]["headroom"] >= 0


@pytest.mark.parametrize(("args", "message"), [
    (["plan", "--model", "llama-9000", "--gpu", "h100"], "not in the catalog"),
    (["plan", "--model", "llama-3.1-8b", "--gpu", "b300"], "GPU type 'b300' is not in the catalog"),
    (["plan", "--model", "llama-3.1-405b", "--gpu", "l4", "--max-gpus", "1"], "does not fit on l4"),
    (["plan", "--model", "llama-3.1-8b", "--gpu", "h100", "--concurrency", "0"], "greater than or equal to 1"),
    (["plan", "missing.yaml"], "missing.yaml: cannot read"),
    (["plan"], "give a manifest, or --model and --gpu"),
    (["plan", "--output", "xml", "--model", "x"], "invalid choice: 'xml'"),
    (["launch"], "invalid choice: 'launch'"),
    (["plan", "--model", "smollm2-135m", "--gpu", "cpu", "--quantization", "fp8"], "fp8 needs a GPU"),
    (["serve", "--quantization", "int3"], "quantization 'int3' is not one of none, int8, int4, fp8"),
    (["serve", "--device", "cpu", "--kv-cache-dtype", "fp16"], "KV cache dtype 'fp16' differs from the compute"),
    (["serve", "--device", "cpu", "--tensor-parallel", "2", "--kv-memory", "1Gi"], "parallel > 1 give num_kv_blocks"),
    (["serve", "--device", "cpu", "--tensor-parallel", "2", "--nnodes", "2"], "needs leader_address"),
])
def test_mistakes_are_one_line_and_exit_2(args, message):
    result = run(*args)
    assert result.returncode == 2
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "Traceback" not in result.stderr


def test_malformed_yaml(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("apiVersion: kvpilot.io/v1alpha1\nkind: LLMDeployment\nspec: {model: [\n")
    result = run("plan", str(bad))
    assert result.returncode == 2 and "malformed YAML" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_engine_flags_reach_the_plan(capsys):
    assert main(["plan", "--model", "llama-3.1-8b", "--gpu", "h100-80gb", "--max-context", "8192",
                 "--gpu-memory-utilization", "0.8", "--max-num-batched-tokens", "4096", "--max-num-seqs", "64",
                 "--tensor-parallel", "2", "--output", "json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["tensor_parallel"] == 2 and data["max_batched_tokens"] == 4096 and data["max_num_seqs"] == 64
    memory = data["memory"]
    assert memory["usable"] == int(memory["total"] * 0.8)
    assert memory["margin"] > 0 and 0 <= memory["headroom"] < data["kv_bytes_per_token"] * data["block_size"]


def test_smaller_step_budget_leaves_more_kv(capsys):
    tokens = []
    for seqs in ("512", "16"):
        assert main(["plan", "--model", "qwen2.5-7b", "--gpu", "l4", "--max-context", "4096",
                     "--max-num-seqs", seqs, "--max-num-batched-tokens", "2048", "--output", "json"]) == 0
        tokens.append(json.loads(capsys.readouterr().out)["kv_capacity_tokens"])
    assert tokens[0] < tokens[1]


def test_table_shows_the_safety_margin_and_non_torch_lines():
    result = run("plan", "--model", "llama-3.1-8b", "--gpu", "h100-80gb", "--max-context", "8192",
                 "--tensor-parallel", "2")
    assert result.returncode == 0, result.stderr
    assert "safety margin" in result.stdout and "non-torch" in result.stdout and "CUDA context" in result.stdout


@pytest.mark.parametrize(("args", "message"), [
    (["--tensor-parallel", "3"], "tensor parallel 3 does not split llama-3.1-8b's 32 heads"),
    (["--gpu-memory-utilization", "1.5"], "gpuMemoryUtilization"),
    (["--max-num-seqs", "0"], "maxNumSeqs"),
])
def test_bad_engine_flags_are_one_line(args, message):
    result = run("plan", "--model", "llama-3.1-8b", "--gpu", "h100-80gb", *args)
    assert result.returncode == 2 and message in result.stderr and len(result.stderr.strip().splitlines()) == 1
