"""kvCache.hostMemory: validated, planned into host KV blocks with the runtime's one block formula, passed
to the pod as --host-kv-memory (which the runtime turns into the same blocks), added to the pod's memory
request, and shown in the plan (`kvpilot plan`) and the status (planned and as the pods measure it)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from kvpilot.cli.main import main
from kvpilot.operator.autoscaler import measured_memory, parse_load
from kvpilot.operator.planning import plan_deployment
from kvpilot.operator.pod import GPU_RESOURCE
from kvpilot.operator.render import render
from kvpilot.operator.spec import SpecError, parse_manifest
from kvpilot.operator.status import plan_status
from kvpilot.runtime.memory.budget import RUNTIME_PROCESS_BYTES
from kvpilot.runtime.memory.devices import GiB
from kvpilot.runtime.memory.facts import resolve_model
from kvpilot.runtime.memory.planner import PlanError
from kvpilot.runtime.server.serve import add_engine_flags, engine_config
from kvpilot.runtime.usage import Parser

GPU_SPEC = {"model": {"source": "llama-3.1-8b"}, "gpu": {"type": "h100-80gb"},
            "serving": {"maxContextLength": 8192}, "kvCache": {"hostMemory": "16Gi"}}


def deployment(spec: dict[str, Any]):
    return parse_manifest({"apiVersion": "kvpilot.io/v1alpha1", "kind": "LLMDeployment",
                           "metadata": {"name": "llm", "namespace": "ml"}, "spec": spec})


def resources(spec: dict[str, Any]) -> dict[str, dict[str, str]]:
    d = deployment(spec)
    children = {obj["kind"]: obj for obj in render(d, plan_deployment(d.spec))}
    return children["Deployment"]["spec"]["template"]["spec"]["containers"][0]["resources"]


def test_the_plan_and_the_runtime_size_the_host_tier_alike():
    plan = plan_deployment(deployment(GPU_SPEC).spec)
    assert plan.num_host_kv_blocks == 16 * GiB // plan.kv_block_bytes > 0
    assert plan.host_kv_bytes <= 16 * GiB and plan.host_kv_tokens == plan.num_host_kv_blocks * plan.block_size
    assert any(r.startswith("host KV tier: ") for r in plan.reasons)
    options = plan.engine_options()
    assert options["host-kv-memory"] == plan.host_kv_bytes
    parser = Parser(prog="test")
    add_engine_flags(parser)
    args = parser.parse_args(["--device", "cpu"] + [f"--{flag}={value}" for flag, value in options.items()])
    config = engine_config(args)  # what the pod's `serve` makes of the flags
    assert config.for_model(resolve_model("llama-3.1-8b")).host_kv_blocks == plan.num_host_kv_blocks
    status = plan_status(plan).model_dump(by_alias=True)
    assert (status["hostKvBlocks"], status["hostKvBytes"]) == (plan.num_host_kv_blocks, plan.host_kv_bytes)


def test_no_host_memory_no_tier_and_no_flag():
    plan = plan_deployment(deployment({**GPU_SPEC, "kvCache": {}}).spec)
    assert plan.num_host_kv_blocks == 0 and "host-kv-memory" not in plan.engine_options()
    assert "memory" not in resources({**GPU_SPEC, "kvCache": {}})["requests"]


def test_gpu_pods_request_the_host_tier_in_memory():
    requests = resources(GPU_SPEC)["requests"]
    plan = plan_deployment(deployment(GPU_SPEC).spec)
    assert requests[GPU_RESOURCE] == "1"
    expected = RUNTIME_PROCESS_BYTES + plan.host_kv_bytes
    assert requests["memory"] in (f"{expected // (1 << 20)}Mi", str(expected))
    given = {**GPU_SPEC, "runtime": {"resources": {"requests": {"memory": "32Gi"}}}}
    assert resources(given)["requests"]["memory"] == "32Gi"  # the user's request holds the tier


def test_cpu_pods_grow_by_the_host_tier():
    spec = {"model": {"source": "smollm2-135m"}, "gpu": {"type": "cpu"}, "kvCache": {"hostMemory": "1Gi"},
            "runtime": {"resources": {"limits": {"memory": "4Gi"}}}}
    plan = plan_deployment(deployment(spec).spec)
    assert plan.host_kv_bytes == 1 * GiB // plan.kv_block_bytes * plan.kv_block_bytes
    memory = resources(spec)["limits"]["memory"]
    assert memory == resources(spec)["requests"]["memory"]
    assert plan.host_kv_bytes % (1 << 20) and memory == str(4 * GiB + plan.host_kv_bytes)


def test_host_memory_larger_than_the_pod_request_is_refused():
    spec = {**GPU_SPEC, "runtime": {"resources": {"requests": {"memory": "8Gi"}}}}
    with pytest.raises(PlanError, match=r"kvCache.hostMemory 16Gi .* exceeds the pod's memory request .* 8Gi"):
        plan_deployment(deployment(spec).spec)


def test_host_memory_must_be_a_quantity():
    with pytest.raises(SpecError, match="hostMemory"):
        deployment({**GPU_SPEC, "kvCache": {"hostMemory": "lots"}})


def test_a_tensor_parallel_plan_keeps_no_host_tier_and_says_why():
    spec = {**GPU_SPEC, "model": {"source": "llama-3.1-70b"}, "quantization": "bf16"}
    plan = plan_deployment(deployment(spec).spec)
    assert plan.tensor_parallel > 1 and plan.num_host_kv_blocks == 0
    assert any(r.startswith("host KV tier off: it runs on one GPU") for r in plan.reasons)


def test_kvpilot_plan_shows_the_host_tier(capsys):
    assert main(["plan", "--model", "llama-3.1-8b", "--gpu", "h100-80gb", "--host-kv-memory", "16Gi",
                 "--output", "json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["num_host_kv_blocks"] > 0 and 0 <= 16 * GiB - data["host_kv_bytes"] < data["kv_block_bytes"]
    assert data["host_kv_tokens"] == data["num_host_kv_blocks"] * data["block_size"]
    assert main(["plan", "--model", "llama-3.1-8b", "--gpu", "h100-80gb", "--host-kv-memory", "16Gi"]) == 0
    assert "host KV tier" in capsys.readouterr().out


def test_the_status_reads_the_host_tier_and_host_weights_the_pods_report():
    exposition = ('kvpilot:memory_measured_bytes{model_name="m",part="kv_cache"} 7\n'
                  'kvpilot:memory_measured_bytes{model_name="m",part="host_kv_cache"} 1024\n'
                  'kvpilot:memory_measured_bytes{model_name="m",part="host_weights"} 4096\n'
                  'vllm:kv_cache_usage_perc{model_name="m"} 0.5\n')
    load = parse_load(exposition)
    assert measured_memory([load]) == {"kvCache": 7, "hostKvCache": 1024, "hostWeights": 4096, "pods": 1}
