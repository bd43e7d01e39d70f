"""Pre-quantized checkpoints: quantization_config is read from config.json, and the memory model
counts the bytes the checkpoint really stores (checked against tiny checkpoints written here)."""

from __future__ import annotations

import dataclasses
import json

import pytest
from prequantized_checkpoints import awq, compressed_fp8, compressed_w4a16, compressed_w8a8, gptq, linears
from safetensors import safe_open

from kvpilot.cli.main import main
from kvpilot.runtime.memory.checkpoint import (
    checkpoint_weight_bytes_by_part,
    read_quantization,
    stored_linear_bytes,
)
from kvpilot.runtime.memory.devices import gpu_from_catalog
from kvpilot.runtime.memory.facts import from_catalog, load_hf_config
from kvpilot.runtime.memory.planner import PlanError, PlanRequest, plan
from kvpilot.runtime.memory.quantization import weight_bytes
from kvpilot.runtime.memory.support import UnsupportedOption

BUILDERS = {"gptq": gptq, "awq": awq, "compressed-w4a16": compressed_w4a16, "compressed-fp8": compressed_fp8,
            "compressed-fp8-per-tensor": lambda folder: compressed_fp8(folder, strategy="tensor"),
            "compressed-w8a8": compressed_w8a8}


def file_bytes(folder, prefix: str = "") -> int:
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        return sum(f.get_tensor(k).numel() * f.get_tensor(k).element_size() for k in f.keys() if k.startswith(prefix))  # noqa: SIM118


@pytest.mark.parametrize("fmt", BUILDERS)
def test_each_linear_is_counted_as_stored(tmp_path, fmt):
    folder, _ = BUILDERS[fmt](tmp_path / fmt)
    checkpoint = load_hf_config(folder).checkpoint
    for name, (out_f, in_f) in linears().items():
        assert stored_linear_bytes(out_f, in_f, checkpoint.scheme) == file_bytes(folder, name + "."), name


@pytest.mark.parametrize("fmt", BUILDERS)
def test_the_whole_checkpoint_is_counted_as_stored(tmp_path, fmt):
    folder, _ = BUILDERS[fmt](tmp_path / fmt)
    facts = load_hf_config(folder)
    parts = checkpoint_weight_bytes_by_part(facts, facts.checkpoint, "fp16", held=False)
    assert sum(parts.values()) == file_bytes(folder)
    assert sum(checkpoint_weight_bytes_by_part(facts, facts.checkpoint, "fp16").values()) >= file_bytes(folder)


def test_ignored_modules_stay_in_the_compute_dtype(tmp_path):
    folder, _ = compressed_fp8(tmp_path, ignore=("lm_head", "re:.*mlp.down_proj"))
    facts = load_hf_config(folder)
    assert not facts.checkpoint.quantizes("model.layers.1.mlp.down_proj")
    assert facts.checkpoint.quantizes("model.layers.1.mlp.up_proj") and not facts.checkpoint.quantizes("lm_head")
    assert sum(checkpoint_weight_bytes_by_part(facts, facts.checkpoint, "fp16", held=False).values()) == \
        file_bytes(folder)


@pytest.mark.parametrize(("config", "label", "mode"), [
    ({"quant_method": "gptq", "bits": 4, "group_size": 128}, "gptq int4", "int4"),
    ({"quant_method": "gptq", "bits": 8, "group_size": -1}, "gptq int8", "int8"),
    ({"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True}, "awq int4", "int4"),
    ({"quant_method": "fbgemm_fp8", "modules_to_not_convert": ["lm_head"]}, "fbgemm_fp8 float8", "fp8"),
    ({"quant_method": "fp8"}, "fp8 float8", "fp8"),
])
def test_formats_map_to_the_runtime_layouts(config, label, mode):
    found = read_quantization({"quantization_config": config})
    assert (found.label, found.runtime_mode) == (label, mode)


@pytest.mark.parametrize(("config", "message"), [
    ({"quant_method": "bitsandbytes", "load_in_4bit": True}, "'bitsandbytes' is not one this runtime runs"),
    ({"quant_method": "gptq", "bits": 3}, "int weights of 3 bits"),
    ({"quant_method": "compressed-tensors", "config_groups": {}}, "no config_groups"),
    ({"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": True}, "act-order"),
    ({"quant_method": "fp8", "weight_block_size": [128, 128]}, "block-wise fp8 scales"),
    ({"quant_method": "gptq", "bits": 8, "group_size": 128}, "int8 weights load with one scale per output channel"),
    ({"quant_method": "awq", "bits": 4, "group_size": 33}, "int4 groups of 33 columns"),
])
def test_unreadable_configs_are_refused_in_one_line(config, message):
    with pytest.raises(UnsupportedOption, match=message):  # UnsupportedCheckpoint is one
        read_quantization({"quantization_config": config})


def test_a_70b_int4_checkpoint_plans_with_its_own_bytes_and_only_int4():
    catalog = from_catalog("llama-3.1-70b")
    checkpoint = read_quantization({"quantization_config": {
        "quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True}})
    facts = dataclasses.replace(catalog, checkpoint=checkpoint)
    h100 = gpu_from_catalog("h100-80gb")
    p = plan(facts, h100, PlanRequest(max_context=8192))
    assert (p.quantization, p.tensor_parallel, p.checkpoint) == ("int4", 1, "awq int4")
    assert p.memory.weights == sum(checkpoint_weight_bytes_by_part(facts, checkpoint, "bf16").values())
    assert abs(p.memory.weights - weight_bytes(catalog, "int4", "bf16")) < 0.01 * p.memory.weights
    with pytest.raises(PlanError, match="pre-quantized awq int4 checkpoint: quantization must be auto or int4"):
        plan(facts, h100, PlanRequest(quantization="bf16"))


def test_kvpilot_plan_reads_a_local_pre_quantized_config(tmp_path, capsys):
    folder, _ = gptq(tmp_path / "tiny-gptq")
    assert main(["plan", "--model", str(folder), "--gpu", "l4", "--max-context", "512", "--output", "json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert (data["quantization"], data["checkpoint"]) == ("int4", "gptq int4")


def test_kvpilot_plan_refuses_an_act_order_checkpoint_in_one_line(tmp_path):
    import subprocess
    import sys

    folder, _ = gptq(tmp_path / "act-order")
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"]["desc_act"] = True
    (folder / "config.json").write_text(json.dumps(config))
    result = subprocess.run([sys.executable, "-m", "kvpilot.cli.main", "plan", "--model", str(folder), "--gpu", "l4"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "act-order" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_the_operator_sets_unsupported_for_a_checkpoint_the_pods_would_refuse(tmp_path):
    from kvpilot.operator.reconcile import NotPlanned, plan_for
    from kvpilot.operator.spec import parse_manifest

    folder, _ = gptq(tmp_path / "act-order")
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"]["desc_act"] = True
    (folder / "config.json").write_text(json.dumps(config))
    manifest = {"apiVersion": "kvpilot.io/v1alpha1", "kind": "LLMDeployment", "metadata": {"name": "tiny"},
                "spec": {"model": {"source": f"file://{folder}"}, "gpu": {"type": "l4"}}}
    with pytest.raises(NotPlanned, match="act-order") as err:
        plan_for(parse_manifest(manifest), op=None)  # a local config.json: neither the hub nor Kubernetes is asked
    assert err.value.reason == "Unsupported"
