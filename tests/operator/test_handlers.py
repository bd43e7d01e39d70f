"""The real kopf operator (handlers.py and everything under it) against kmock's Kubernetes emulator.

One operator serves the module (each test uses its own LLMDeployment names); tests that need another
cluster shape start their own. No sleeps: every wait polls the emulator with a short timeout.
"""

from __future__ import annotations

import base64
import copy
import itertools
from collections.abc import AsyncIterator
from typing import Any

import kmock
import pytest
import pytest_asyncio
from kube_emulator import Emulated, emulated_cluster, emulated_operator, running_operator
from llmd_cases import TINY_CONFIG, load_example

from kvpilot.operator.main import FINALIZER

pytestmark = pytest.mark.asyncio(loop_scope="module")

MULTI_NODE = {"model": {"source": "hf://meta-llama/Llama-3.1-405B-Instruct"}, "gpu": {"type": "h100-80gb"},
              "quantization": "bf16", "serving": {"maxContextLength": 8192}}
STATUS_500 = {"apiVersion": "v1", "kind": "Status", "code": 500, "message": "injected"}
STATUS_409 = {"apiVersion": "v1", "kind": "Status", "code": 409, "reason": "Conflict", "message": "injected"}


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def cluster(module_hub) -> AsyncIterator[Emulated]:
    async with emulated_operator(hub_endpoint=module_hub.url, service_monitors=True) as emulated:
        yield emulated


def llmd(name: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": "kvpilot.io/v1alpha1", "kind": "LLMDeployment", "metadata": {"name": name},
            "spec": copy.deepcopy(spec)}


def from_example(example: str, name: str) -> dict[str, Any]:
    return llmd(name, load_example(example)["spec"])


def condition(obj: dict[str, Any] | None, kind: str) -> dict[str, Any]:
    conditions = ((obj or {}).get("status") or {}).get("conditions") or []
    return next((c for c in conditions if c["type"] == kind), {})


async def planned(cluster: Emulated, name: str, status: str = "True") -> dict[str, Any]:
    """The LLMDeployment once its Planned condition says `status`."""
    return await cluster.eventually(
        lambda: (obj := cluster.get("LLMDeployment", name)) and condition(obj, "Planned").get("status") == status
        and obj, what=f"{name} Planned={status}")


def args_of(deployment: dict[str, Any]) -> dict[str, str]:
    args = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
    return {flag: value for flag, value in itertools.pairwise(args) if flag.startswith("--")}


async def test_apply_creates_owned_children_with_the_plan_and_fills_status(cluster: Emulated):
    await cluster.create(from_example("smollm2", "smollm2"))
    obj = await planned(cluster, "smollm2")
    await cluster.eventually(lambda: len(cluster.children("smollm2")) == 4)
    children = cluster.children("smollm2")
    assert set(children) == {"Deployment", "Service", "PodDisruptionBudget", "ServiceMonitor"}

    plan, args = obj["status"]["plan"], args_of(children["Deployment"])
    assert args["--num-kv-blocks"] == str(plan["kvBlocks"]) and args["--quantization"] == plan["quantization"]
    assert args["--kv-cache-dtype"] == plan["kvDtype"] and args["--max-model-len"] == "2048"
    for child in children.values():
        assert child["metadata"]["ownerReferences"] == [{
            "apiVersion": "kvpilot.io/v1alpha1", "kind": "LLMDeployment", "name": "smollm2",
            "uid": obj["metadata"]["uid"], "controller": True, "blockOwnerDeletion": True}]

    status = obj["status"]
    assert status["observedGeneration"] == 1 and status["phase"] == "Pending"
    assert status["selector"] == "app.kubernetes.io/name=kvpilot,app.kubernetes.io/instance=smollm2"
    assert (plan["device"], plan["gpus"], plan["perGpuBytes"]["total"]) == ("cpu", 0, 4 << 30)
    assert [c["type"] for c in status["conditions"]] == ["Planned", "Available", "Progressing", "Degraded"]
    assert FINALIZER in obj["metadata"]["finalizers"]
    await cluster.eventually(lambda: {"Planned", "ChildrenApplied"} <= {e["reason"] for e in cluster.events("smollm2")})


async def test_workload_readiness_reaches_the_owner_status(cluster: Emulated):
    await cluster.create(from_example("smollm2", "ready"))
    await planned(cluster, "ready")
    await cluster.eventually(lambda: cluster.get("Deployment", "ready"))
    await cluster.patch("Deployment", "ready", {"status": {"replicas": 1, "readyReplicas": 1, "updatedReplicas": 1}},
                        subresource="status")
    obj = await cluster.eventually(lambda: (o := cluster.get("LLMDeployment", "ready"))
                                   and o["status"].get("phase") == "Ready" and o)
    assert obj["status"]["readyReplicas"] == 1 and condition(obj, "Available")["status"] == "True"
    assert condition(obj, "Planned")["status"] == "True"  # the workload watch keeps the reconciler's verdict


async def test_spec_change_rolls_and_scaling_changes_only_replicas(cluster: Emulated):
    await cluster.create(from_example("llama-3.1-70b", "roll"))
    await planned(cluster, "roll")
    first = await cluster.eventually(lambda: cluster.get("Deployment", "roll"))
    assert first["spec"]["replicas"] == 2 and args_of(first)["--max-model-len"] == "32768"

    await cluster.patch("LLMDeployment", "roll", {"spec": {"serving": {"maxContextLength": 16384}}})
    rolled = await cluster.eventually(lambda: (d := cluster.get("Deployment", "roll"))
                                      and args_of(d)["--max-model-len"] == "16384" and d)
    obj = await cluster.eventually(lambda: (o := cluster.get("LLMDeployment", "roll"))
                                   and o["status"].get("observedGeneration") == 2 and o)
    assert obj["status"]["plan"]["maxModelLen"] == 16384

    await cluster.patch("LLMDeployment", "roll", {"spec": {"replicas": 5}}, subresource="scale")
    scaled = await cluster.eventually(lambda: (d := cluster.get("Deployment", "roll"))
                                      and d["spec"].get("replicas") == 5 and d)
    assert scaled["spec"]["template"] == rolled["spec"]["template"]  # no new pods for a scale


async def test_children_edited_or_deleted_by_hand_are_restored(cluster: Emulated):
    restored_before = cluster.metric("kvpilot_operator_drift_restored_total", kind="Service")
    await cluster.create(from_example("smollm2", "drift"))
    await planned(cluster, "drift")
    await cluster.eventually(lambda: {"Deployment", "Service"} <= set(cluster.children("drift")))
    desired = cluster.get("Deployment", "drift")

    await cluster.delete("Service", "drift")
    await cluster.eventually(lambda: cluster.get("Service", "drift"), what="the Service is recreated")

    await cluster.patch("Deployment", "drift", {"spec": {"replicas": 7, "template": {"spec": {
        "containers": [{"name": "runtime", "image": "evil:latest"}]}}}})
    restored = await cluster.eventually(lambda: (d := cluster.get("Deployment", "drift"))
                                        and d["spec"]["replicas"] == 1 and d)
    assert restored["spec"]["template"] == desired["spec"]["template"]
    # The cluster holds the restored Deployment a moment before the operator's apply call returns and
    # it counts and reports the restore: wait for the report, not for the object.
    await cluster.eventually(lambda: any(e["reason"] == "DriftRestored" and e["message"].startswith("Deployment")
                                         for e in cluster.events("drift")), what="the Deployment's DriftRestored")
    assert cluster.metric("kvpilot_operator_drift_restored_total", kind="Service") == restored_before + 1
    assert cluster.metric("kvpilot_operator_drift_restored_total", kind="Deployment") >= 1


@pytest.mark.parametrize(("name", "spec", "reason", "words"), [
    ("too-big", {"model": {"source": "llama-3.1-405b"}, "gpu": {"type": "l4", "maxPerReplica": 1}},
     "DoesNotFit", "does not fit on l4"),
    ("no-fp8", {"model": {"source": "llama-3.1-8b"}, "gpu": {"type": "a100-80gb"}, "quantization": "fp8"},
     "CannotPlan", "fp8 needs a GPU with fp8 support"),
    ("no-model", {"model": {"source": "llama-9000"}, "gpu": {"type": "h100"}},
     "UnknownModel", "is not in the catalog"),
    ("no-gpu", {"model": {"source": "llama-3.1-8b"}, "gpu": {"type": "b300"}},
     "UnknownGPU", "GPU type 'b300' is not in the catalog"),
    ("no-hub-repo", {"model": {"source": "hf://acme/missing"}, "gpu": {"type": "l4"}},
     "ModelFactsUnavailable", "has no config.json"),
    ("no-weights", {"model": {"source": "mystery", "architecture": {
        "numLayers": 4, "hiddenSize": 512, "numHeads": 8, "intermediateSize": 1024, "vocabSize": 32000}},
        "gpu": {"type": "l4"}}, "NoWeights", "says nothing about where the weights are"),
])
async def test_impossible_spec_is_a_condition_and_creates_nothing(cluster: Emulated, name, spec, reason, words):
    not_planned = cluster.metric("kvpilot_operator_reconciles_total", result="not_planned")
    await cluster.create(llmd(name, spec))
    obj = await planned(cluster, name, "False")
    assert cluster.metric("kvpilot_operator_reconciles_total", result="not_planned") > not_planned
    verdict = condition(obj, "Planned")
    assert verdict["reason"] == reason and words in verdict["message"]
    assert obj["status"]["phase"] == "Failed"
    assert cluster.children(name) == {}
    await cluster.eventually(lambda: any(e["type"] == "Warning" and e["reason"] == reason
                                         for e in cluster.events(name)), what="a Warning event")


async def test_a_spec_turned_impossible_leaves_the_children_alone(cluster: Emulated):
    await cluster.create(from_example("llama-3.1-8b", "stays"))
    await planned(cluster, "stays")
    before = await cluster.eventually(lambda: cluster.get("Deployment", "stays"))
    await cluster.patch("LLMDeployment", "stays", {"spec": {"gpu": {"type": "a100-80gb"}, "quantization": "fp8"}})
    await planned(cluster, "stays", "False")
    assert cluster.get("Deployment", "stays") == before


async def test_api_faults_are_retried_until_it_converges(cluster: Emulated):
    def applies(group: str, plural: str) -> kmock.View:  # this test's applies, counted from the first
        return cluster.emulator[kmock.resource(group, "v1", plural), kmock.name("faults")][
            lambda request: request.method.value.upper() in ("PATCH", "POST")]

    applies("apps", "deployments")[:1] << 500 << STATUS_500  # kmock stores it, then errs: the retry re-applies
    applies("", "services")[:1] << 409 << STATUS_409
    cluster.emulator.refuse("patch", "poddisruptionbudgets", "faults", 503)  # not stored at all
    cluster.emulator.refuse("patch", "llmdeployments", "faults", 500)  # kopf's own write (it retries too)
    await cluster.create(from_example("smollm2", "faults"))
    await planned(cluster, "faults")
    wanted = {"Deployment", "Service", "PodDisruptionBudget"}
    await cluster.eventually(lambda: wanted <= set(cluster.children("faults")), timeout=20)
    await cluster.eventually(lambda: "ApiError" in {e["reason"] for e in cluster.events("faults")})


async def test_fixing_an_impossible_spec_creates_the_children(cluster: Emulated):
    await cluster.create(llmd("fixed", {"model": {"source": "llama-3.1-8b"}, "gpu": {"type": "b300"}}))
    await planned(cluster, "fixed", "False")
    await cluster.patch("LLMDeployment", "fixed", {"spec": {"gpu": {"type": "h100-80gb"}}})
    await planned(cluster, "fixed")
    await cluster.eventually(lambda: {"Deployment", "Service"} <= set(cluster.children("fixed")))


async def test_delete_runs_the_handler_and_drops_the_finalizer(cluster: Emulated):
    await cluster.create(from_example("smollm2", "gone"))
    obj = await planned(cluster, "gone")
    await cluster.eventually(lambda: cluster.get("Deployment", "gone"))
    handled = cluster.metric("kvpilot_operator_llmdeployments", planned="true")
    await cluster.delete("LLMDeployment", "gone")
    await cluster.eventually(lambda: cluster.get("LLMDeployment", "gone") is None, what="the finalizer is dropped")
    assert cluster.metric("kvpilot_operator_llmdeployments", planned="true") == handled - 1
    await cluster.eventually(lambda: "Deleting" in {e["reason"] for e in cluster.events("gone")})
    # The emulator has no garbage collector: what cascades the deletion is the owner reference.
    assert cluster.get("Deployment", "gone")["metadata"]["ownerReferences"][0]["uid"] == obj["metadata"]["uid"]


async def test_children_follow_topology_and_autoscaling_changes(cluster: Emulated):
    await cluster.create(llmd("big", MULTI_NODE))
    obj = await planned(cluster, "big")
    assert (obj["status"]["plan"]["nodes"], obj["status"]["plan"]["gpus"]) == (2, 16)
    lws = await cluster.eventually(lambda: cluster.get("LeaderWorkerSet", "big"))
    assert lws["spec"]["leaderWorkerTemplate"]["size"] == 2 and cluster.get("Deployment", "big") is None

    await cluster.patch("LLMDeployment", "big", {"spec": {"autoscaling": {
        "enabled": True, "mode": "keda", "minReplicas": 0, "maxReplicas": 3}}})
    scaled = await cluster.eventually(lambda: cluster.get("ScaledObject", "big"))
    assert scaled["spec"]["scaleTargetRef"]["kind"] == "LeaderWorkerSet"

    await cluster.patch("LLMDeployment", "big", {"spec": {"quantization": "fp8", "autoscaling": {
        "mode": "hpa", "minReplicas": 1}}})
    hpa = await cluster.eventually(lambda: cluster.get("HorizontalPodAutoscaler", "big"))
    assert hpa["spec"]["scaleTargetRef"]["kind"] == "Deployment"
    await cluster.eventually(lambda: set(cluster.children("big")) == {
        "Deployment", "Service", "PodDisruptionBudget", "ServiceMonitor", "HorizontalPodAutoscaler"},
        what="the LeaderWorkerSet and ScaledObject are pruned")


async def test_model_outside_the_catalog_is_planned_from_the_hub(cluster: Emulated, module_hub):
    module_hub.serve("acme/tiny-llama", "config.json", TINY_CONFIG)
    module_hub.serve("acme/gated-llama", "config.json", TINY_CONFIG, token="hf_s3cret")
    await cluster.create({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "hf-token"},
                          "data": {"HF_TOKEN": base64.b64encode(b"hf_s3cret").decode()}})
    await cluster.create(llmd("tiny", {"model": {"source": "hf://acme/tiny-llama"}, "gpu": {"type": "l4"}}))
    await cluster.create(llmd("gated", {"model": {"source": "hf://acme/gated-llama", "tokenSecret": "hf-token"},
                                        "gpu": {"type": "l4"}}))
    for name in ("tiny", "gated"):
        obj = await planned(cluster, name)
        assert obj["status"]["plan"]["model"].endswith("-llama")
        init = (await cluster.eventually(lambda n=name: cluster.get("Deployment", n)))["spec"]["template"]["spec"][
            "initContainers"][0]
        assert init["command"][:3] == ["hf", "download", f"acme/{name if name == 'gated' else 'tiny'}-llama"]


async def test_a_model_the_runtime_cannot_run_is_unsupported_and_creates_nothing(cluster: Emulated, module_hub):
    """The hub's config.json has an activation the pods' loader refuses: the operator says so in the
    Planned condition (reason Unsupported, one line) and renders no child, so no pod crash-loops."""
    module_hub.serve("acme/swish-llama", "config.json", TINY_CONFIG | {"hidden_act": "swish_10"})
    await cluster.create(llmd("swish", {"model": {"source": "hf://acme/swish-llama"}, "gpu": {"type": "l4"}}))
    verdict = condition(await planned(cluster, "swish", "False"), "Planned")
    assert verdict["reason"] == "Unsupported" and "hidden_act='swish_10' is not supported" in verdict["message"]
    assert "\n" not in verdict["message"]
    assert cluster.children("swish") == {}
    await cluster.eventually(lambda: any(e["type"] == "Warning" and e["reason"] == "Unsupported"
                                         for e in cluster.events("swish")), what="a Warning event")


async def test_missing_leader_worker_set_is_reported_and_nothing_is_created():
    async with emulated_operator(optional_apis=False) as cluster:
        await cluster.create(llmd("big", MULTI_NODE))
        obj = await planned(cluster, "big", "False")
        verdict = condition(obj, "Planned")
        assert verdict["reason"] == "MissingAPI" and "install LeaderWorkerSet" in verdict["message"]
        assert cluster.children("big") == {}


async def test_a_restarted_operator_resumes_and_repairs():
    async with emulated_cluster() as cluster:
        async with running_operator(cluster):
            await cluster.create(from_example("smollm2", "resumed"))
            await planned(cluster, "resumed")
            await cluster.eventually(lambda: cluster.get("Service", "resumed"))
        await cluster.delete("Service", "resumed")  # while no operator runs
        assert cluster.get("Service", "resumed") is None
        async with running_operator(cluster):
            await cluster.eventually(lambda: cluster.get("Service", "resumed"), what="resume recreates it")


async def test_the_resync_timer_repairs_what_a_failed_restore_left():
    async with emulated_operator(resync_seconds=0.3) as cluster:
        await cluster.create(from_example("smollm2", "net"))
        await planned(cluster, "net")
        await cluster.eventually(lambda: cluster.get("Service", "net"))
        cluster.emulator.refuse("post", "services", "net", 503)  # the watch-driven restore fails once
        await cluster.delete("Service", "net")
        await cluster.eventually(lambda: cluster.get("Service", "net"), what="the timer recreates it")
