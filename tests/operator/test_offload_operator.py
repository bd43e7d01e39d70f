"""serving.allowOffload: the operator plans the offload only with consent, renders it (--offload-layers,
a memory request that holds the offloaded weights), shows it in the status, and without consent says in
the DoesNotFit condition what would fit and what to change. The pure steps, then the real kopf operator on
the emulator."""

from __future__ import annotations

from typing import Any

import pytest
from kube_emulator import emulated_operator

from kvpilot.operator.planning import plan_deployment
from kvpilot.operator.render import render
from kvpilot.operator.spec import parse_manifest
from kvpilot.operator.status import plan_status
from kvpilot.runtime.memory.budget import RUNTIME_PROCESS_BYTES
from kvpilot.runtime.memory.devices import GiB
from kvpilot.runtime.memory.planner import NoFit

OFFLOAD = {"model": {"source": "llama-3.1-70b"}, "gpu": {"type": "l4", "maxPerReplica": 1},
           "serving": {"maxContextLength": 8192, "allowOffload": True}}
NO_CONSENT = {**OFFLOAD, "serving": {"maxContextLength": 8192}}


def deployment(spec: dict[str, Any], name: str = "llm"):
    return parse_manifest({"apiVersion": "kvpilot.io/v1alpha1", "kind": "LLMDeployment",
                           "metadata": {"name": name, "namespace": "ml"}, "spec": spec})


def container(spec: dict[str, Any]) -> dict[str, Any]:
    d = deployment(spec)
    children = {obj["kind"]: obj for obj in render(d, plan_deployment(d.spec))}
    return children["Deployment"]["spec"]["template"]["spec"]["containers"][0]


def memory_bytes(quantity: str) -> int:
    for unit, scale in (("Gi", GiB), ("Mi", 1 << 20)):
        if quantity.endswith(unit):
            return int(quantity.removesuffix(unit)) * scale
    return int(quantity)


def test_the_pod_runs_the_offload_and_requests_the_host_bytes():
    plan = plan_deployment(deployment(OFFLOAD).spec)
    assert plan.offload_layers > 0
    runtime = container(OFFLOAD)
    args = runtime["args"]
    assert args[args.index("--offload-layers") + 1] == str(plan.offload_layers)
    requests = runtime["resources"]["requests"]
    assert memory_bytes(requests["memory"]) == RUNTIME_PROCESS_BYTES + plan.host_weight_bytes_per_pod
    assert "memory" not in runtime["resources"]["limits"]


def test_a_memory_request_and_limit_given_grow_by_the_host_bytes():
    given = {**OFFLOAD, "runtime": {"resources": {"requests": {"memory": "8Gi"}, "limits": {"memory": "16Gi"}}}}
    host = plan_deployment(deployment(given).spec).host_weight_bytes_per_pod
    resources = container(given)["resources"]
    assert memory_bytes(resources["requests"]["memory"]) == 8 * GiB + host
    assert memory_bytes(resources["limits"]["memory"]) == 16 * GiB + host


def test_the_host_kv_tier_and_the_offload_add_up():
    both = {**OFFLOAD, "kvCache": {"hostMemory": "4Gi"}}
    plan = plan_deployment(deployment(both).spec)
    assert plan.num_host_kv_blocks > 0 and plan.offload_layers > 0
    requests = container(both)["resources"]["requests"]
    assert memory_bytes(requests["memory"]) == RUNTIME_PROCESS_BYTES + plan.host_kv_bytes + plan.host_weight_bytes


def test_the_status_shows_the_offload():
    plan = plan_deployment(deployment(OFFLOAD).spec)
    status = plan_status(plan).model_dump(by_alias=True)
    assert (status["offloadLayers"], status["hostWeightBytes"], status["hostWeightBytesPerPod"]) == (
        plan.offload_layers, plan.host_weight_bytes, plan.host_weight_bytes)
    assert status["stagingBytes"] == plan.staging_bytes and status["perGpuBytes"]["weights"] == plan.memory.weights
    assert status["decodeTokensPerS"] == pytest.approx(plan.decode_tokens_per_s, abs=1e-3)


def test_without_consent_the_plan_names_the_field():
    with pytest.raises(NoFit, match=r"would fit .* \(set serving.allowOffload: true, or kvpilot plan --allow-offload"):
        plan_deployment(deployment(NO_CONSENT).spec)


@pytest.mark.asyncio
async def test_the_operator_renders_the_offload_and_refuses_it_without_consent():
    manifests = {name: {"apiVersion": "kvpilot.io/v1alpha1", "kind": "LLMDeployment", "metadata": {"name": name},
                        "spec": spec} for name, spec in (("streamed", OFFLOAD), ("refused", NO_CONSENT))}
    async with emulated_operator() as cluster:
        for obj in manifests.values():
            await cluster.create(obj)
        workload = await cluster.eventually(lambda: cluster.get("Deployment", "streamed"), what="a Deployment")
        streamed = await cluster.eventually(lambda: (o := cluster.get("LLMDeployment", "streamed"))
                                            and (o.get("status") or {}).get("plan") and o, what="a plan status")
        refused = await cluster.eventually(
            lambda: (o := cluster.get("LLMDeployment", "refused"))
            and any(c["type"] == "Planned" and c["status"] == "False" for c in (o.get("status") or {})
                    .get("conditions", [])) and o, what="refused Planned=False")
        refused_children = cluster.children("refused")
    runtime = workload["spec"]["template"]["spec"]["containers"][0]
    planned = streamed["status"]["plan"]
    assert planned["offloadLayers"] > 0 and planned["hostWeightBytes"] > 0
    args = runtime["args"]
    assert args[args.index("--offload-layers") + 1] == str(planned["offloadLayers"])
    requested = memory_bytes(runtime["resources"]["requests"]["memory"])
    assert requested == RUNTIME_PROCESS_BYTES + planned["hostWeightBytes"]
    condition = next(c for c in refused["status"]["conditions"] if c["type"] == "Planned")
    assert condition["reason"] == "DoesNotFit"
    assert (f"offloading {planned['offloadLayers']} of 80 layers' weights to host memory" in condition["message"]
            and "set serving.allowOffload: true" in condition["message"])
    assert refused_children == {}
