"""The LLMDeployment spec: defaults, validation messages that name the field, manifests."""

from pathlib import Path
from typing import get_args

import pytest

from kvpilot.operator.planning import plan_deployment, target_device
from kvpilot.operator.spec import KVDtype, Quantization, SpecError, load_manifest, parse_manifest, parse_spec
from kvpilot.runtime.memory.quantization import COMPUTE_DTYPES, KV_DTYPES, WEIGHT_QUANT_MODES

EXAMPLES = sorted((Path(__file__).resolve().parents[2] / "examples").glob("*.yaml"))
MINIMAL = {"model": {"source": "hf://meta-llama/Llama-3.1-8B-Instruct"}, "gpu": {"type": "h100-80gb"}}


def test_defaults():
    spec = parse_spec(MINIMAL)
    assert (spec.quantization, spec.kv_cache.dtype, spec.kv_cache.block_size) == ("auto", "auto", 16)
    assert spec.gpu_memory_utilization == 0.90 and spec.gpu.per_node == 8
    assert spec.serving.optimize == "quality" and spec.replicas == 1
    assert spec.autoscaling.mode == "operator" and not spec.autoscaling.enabled
    assert spec.model.name == "meta-llama/Llama-3.1-8B-Instruct"


def test_dtype_names_are_the_memory_models():
    """The CRD's enums are literal (the schema is generated from them); they name what the memory model
    and the engine know, no more and no less."""
    assert sorted(get_args(Quantization)) == sorted(["auto", *COMPUTE_DTYPES, *WEIGHT_QUANT_MODES])
    assert sorted(get_args(KVDtype)) == sorted(["auto", *KV_DTYPES])


def test_camel_case_on_the_wire():
    spec = parse_spec(MINIMAL | {"serving": {"maxContextLength": 4096}, "kvCache": {"dtype": "fp8"},
                                 "autoscaling": {"targetKVCacheUtilization": 0.5}})
    assert spec.serving.max_context_length == 4096 and spec.kv_cache.dtype == "fp8"
    assert spec.autoscaling.target_kv_cache_utilization == 0.5
    dumped = spec.model_dump(by_alias=True)
    assert "maxContextLength" in dumped["serving"] and "targetKVCacheUtilization" in dumped["autoscaling"]


@pytest.mark.parametrize(("patch", "message"), [
    ({"quantization": "int2"}, r"spec.quantization: Input should be 'auto', .*\(got 'int2'\)"),
    ({"serving": {"concurrency": 0}},
     r"spec.serving.concurrency: Input should be greater than or equal to 1 \(got 0\)"),
    ({"gpuMemoryUtilization": 1.2}, r"spec.gpuMemoryUtilization: Input should be less than or equal to 1"),
    ({"kvCache": {"blockSize": 12}}, r"spec.kvCache.blockSize"),
    ({"gpu": {}}, r"spec.gpu: set gpu.type"),
    ({"autoscaling": {"minReplicas": 5, "maxReplicas": 2}},
     r"minReplicas \(5\) must be <= autoscaling.maxReplicas \(2\)"),
    ({"replicaz": 2}, r"spec.replicaz: Extra inputs are not permitted"),
    ({"gpu": {"memory": "lots"}}, r"spec.gpu.memory: String should match pattern"),
])
def test_validation_names_field_and_rule(patch, message):
    with pytest.raises(SpecError, match=message):
        parse_spec(MINIMAL | patch)


def test_missing_model_is_named():
    with pytest.raises(SpecError, match=r"spec\.model: Field required"):
        parse_spec({"gpu": {"type": "l4"}})


def test_manifest_needs_kind_and_name():
    with pytest.raises(SpecError, match=r"metadata\.name"):
        parse_manifest({"apiVersion": "kvpilot.io/v1alpha1", "kind": "LLMDeployment", "metadata": {"name": "Bad_Name"},
                        "spec": MINIMAL})


@pytest.mark.parametrize("text", ["spec: [unclosed", "- just\n- a list\n"])
def test_malformed_yaml_is_one_clear_error(tmp_path, text):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(SpecError, match=str(path)):
        load_manifest(path)


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_every_example_loads_and_plans(path):
    deployment = load_manifest(path)
    plan = plan_deployment(deployment.spec)
    assert plan.num_kv_blocks > 0 and plan.kv_capacity_sequences >= deployment.spec.serving.concurrency


def test_examples_cover_the_issue():
    names = {p.stem for p in EXAMPLES}
    assert {"smollm2", "llama-3.1-8b", "llama-3.1-70b", "llama-3.1-405b"} <= names


def test_custom_gpu_memory_and_cpu_pods():
    custom = target_device(parse_spec(MINIMAL | {"gpu": {"memory": "48Gi", "fp8": True}}))
    assert custom.memory_bytes == 48 << 30 and custom.fp8
    overridden = target_device(parse_spec(MINIMAL | {"gpu": {"type": "l40s", "memory": "40Gi"}}))
    assert overridden.memory_bytes == 40 << 30 and overridden.product_label == "NVIDIA-L40S"
    cpu = target_device(parse_spec(MINIMAL | {"gpu": {"type": "cpu"},
                                              "runtime": {"resources": {"limits": {"memory": "8Gi"}}}}))
    assert cpu.kind == "cpu" and cpu.memory_bytes == 8 << 30


def test_inline_architecture_plans_without_catalog():
    spec = parse_spec({"model": {"source": "pvc://models/mystery", "architecture": {
        "numLayers": 4, "hiddenSize": 512, "numHeads": 8, "numKvHeads": 2, "intermediateSize": 1024,
        "vocabSize": 32000, "maxPositionEmbeddings": 4096}}, "gpu": {"type": "l4"}})
    plan = plan_deployment(spec)
    assert plan.model == "mystery" and plan.kv_bytes_per_token == 2 * 4 * 2 * 64 * 2
