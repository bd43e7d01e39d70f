"""The operator as users meet it (issue #17): malformed objects, quiet logs, spec changes made while
the operator was down, messages that say what to change. The real kopf operator on the emulator."""

from __future__ import annotations

import copy
import logging
import re
from typing import Any

import kmock
import pytest
from kube_emulator import Emulated, emulated_cluster, emulated_operator, running_operator
from llmd_cases import load_example

pytestmark = pytest.mark.asyncio

SMOLLM2 = load_example("smollm2")["spec"]


def llmd(name: str, spec: Any = None, *, with_spec: bool = True) -> dict[str, Any]:
    obj: dict[str, Any] = {"apiVersion": "kvpilot.io/v1alpha1", "kind": "LLMDeployment", "metadata": {"name": name}}
    if with_spec:
        obj["spec"] = copy.deepcopy(spec)
    return obj


def condition(obj: dict[str, Any] | None, kind: str) -> dict[str, Any]:
    conditions = ((obj or {}).get("status") or {}).get("conditions") or []
    return next((c for c in conditions if c["type"] == kind), {})


async def planned(cluster: Emulated, name: str, status: str = "True") -> dict[str, Any]:
    return await cluster.eventually(
        lambda: (obj := cluster.get("LLMDeployment", name)) and condition(obj, "Planned").get("status") == status
        and obj, what=f"{name} Planned={status}")


def tracebacks(records: list[logging.LogRecord]) -> list[str]:
    return [r.getMessage() for r in records if r.exc_info]


def writes(cluster: Emulated) -> int:
    return sum(1 for r in cluster.emulator._requests if r.method.value.upper() in ("POST", "PATCH", "PUT", "DELETE"))


def pod_lists(cluster: Emulated) -> int:
    return len(list(cluster.emulator[kmock.action.LIST, kmock.resource("", "v1", "pods")]))


@pytest.mark.parametrize(("name", "obj", "words"), [
    ("no-spec", llmd("no-spec", with_spec=False), "spec: Field required"),
    ("spec-string", llmd("spec-string", "oops"), "spec: Input should be a valid dictionary"),
    ("model-number", llmd("model-number", {"model": 3, "gpu": {"type": "l4"}}), "spec.model"),
])
async def test_a_malformed_object_is_a_condition_and_an_event_never_a_traceback(name, obj, words, caplog):
    caplog.set_level(logging.INFO)
    # Short timers: the resync and autoscale handlers see the object too, several times.
    async with emulated_operator(resync_seconds=0.05, autoscale_seconds=0.05) as cluster:
        await cluster.create(llmd(f"{name}-ok", SMOLLM2))  # its autoscale ticks show the timers run
        await cluster.create(obj)
        found = await planned(cluster, name, "False")
        verdict = condition(found, "Planned")
        assert verdict["reason"] == "InvalidSpec" and words in verdict["message"], verdict
        await cluster.eventually(lambda: any(e["reason"] == "InvalidSpec" and e["type"] == "Warning"
                                             for e in cluster.events(name)), what="an InvalidSpec Event")
        ticks = pod_lists(cluster)
        await cluster.eventually(lambda: pod_lists(cluster) >= ticks + 3, what="three more autoscale ticks")
    assert tracebacks(caplog.records) == []


async def test_a_spec_removed_while_the_operator_was_down_is_a_condition_at_resume(caplog):
    """The resume and update handlers (an operator restarted on an object it handled before) read a
    malformed object as the create handler does: an InvalidSpec condition and an Event, no traceback."""
    caplog.set_level(logging.INFO)
    async with emulated_cluster() as cluster:
        async with running_operator(cluster):
            await cluster.create(llmd("resumed", SMOLLM2))
            await cluster.create(llmd("resumed-ok", SMOLLM2))  # its autoscale ticks show the timers run
            await planned(cluster, "resumed")
        await cluster.patch("LLMDeployment", "resumed", {"spec": None})  # e.g. an old version's object
        assert "spec" not in cluster.get("LLMDeployment", "resumed")
        async with running_operator(cluster, resync_seconds=0.05, autoscale_seconds=0.05):
            verdict = condition(await planned(cluster, "resumed", "False"), "Planned")
            assert verdict["reason"] == "InvalidSpec" and "spec: Field required" in verdict["message"], verdict
            await cluster.eventually(lambda: any(e["reason"] == "InvalidSpec" for e in cluster.events("resumed")),
                                     what="an InvalidSpec Event")
            ticks = pod_lists(cluster)
            await cluster.eventually(lambda: pod_lists(cluster) >= ticks + 3, what="three more autoscale ticks")
    assert tracebacks(caplog.records) == []
    assert any("Handler 'resume'" in r.getMessage() for r in caplog.records), "the resume handler ran"


async def test_a_quiet_run_logs_no_line_per_tick(caplog):
    """Five converged LLMDeployments, many resync and autoscale ticks: not one log line, not one Event."""
    caplog.set_level(logging.DEBUG, logger="kopf.objects")
    names = [f"quiet-{i}" for i in range(5)]
    async with emulated_operator(resync_seconds=0.2, autoscale_seconds=0.05) as cluster:
        for name in names:
            await cluster.create(llmd(name, SMOLLM2))
        for name in names:
            await planned(cluster, name)

        async def settled() -> bool:  # no write during five ticks of every object
            before, ticks = writes(cluster), pod_lists(cluster)
            await cluster.eventually(lambda: pod_lists(cluster) >= ticks + 5 * len(names), 30)
            return writes(cluster) == before

        await cluster.eventually(settled, 60, "the operator settles")
        caplog.clear()
        before, ticks = writes(cluster), pod_lists(cluster)
        await cluster.eventually(lambda: pod_lists(cluster) >= ticks + 10 * len(names), 60, "ten ticks each")
        quiet = [f"{r.name} {getattr(r, 'k8s_ref', {}).get('name')}: {r.getMessage()}"
                 for r in caplog.records if r.levelno >= logging.INFO]
        assert "\n".join(quiet) == ""
        assert writes(cluster) == before  # no Event, no status write per tick either


async def test_an_ambiguous_gpu_name_is_refused_with_the_choices():
    async with emulated_operator() as cluster:
        await cluster.create(llmd("vague", {"model": {"source": "llama-3.1-8b"}, "gpu": {"type": "a100"}}))
        verdict = condition(await planned(cluster, "vague", "False"), "Planned")
        assert verdict["reason"] == "UnknownGPU"
        assert "GPU type 'a100' is ambiguous: a100-80gb or a100-40gb" in verdict["message"]
        assert cluster.children("vague") == {}


def workload_patches(cluster: Emulated, name: str) -> int:
    deployments = kmock.resource("apps", "v1", "deployments")
    return len([r for r in cluster.emulator[deployments, kmock.name(name)] if r.method.value.upper() == "PATCH"])


async def test_a_spec_change_made_while_the_operator_was_down_is_a_change_not_a_drift():
    async with emulated_cluster() as cluster:
        async with running_operator(cluster):
            await cluster.create(llmd("offline", SMOLLM2))
            await planned(cluster, "offline")
            await cluster.eventually(lambda: len(cluster.children("offline")) == 3)
        await cluster.patch("LLMDeployment", "offline", {"spec": {"serving": {"maxContextLength": 1024}}})
        before = workload_patches(cluster, "offline")
        async with running_operator(cluster):
            await cluster.eventually(lambda: (cluster.get("LLMDeployment", "offline")["status"]
                                              .get("observedGeneration")) == 2, what="generation 2 observed")
            deployment = cluster.get("Deployment", "offline")
            assert "1024" in deployment["spec"]["template"]["spec"]["containers"][0]["args"]
        reasons = [e["reason"] for e in cluster.events("offline")]
        assert "DriftRestored" not in reasons, reasons
        assert workload_patches(cluster, "offline") - before == 1  # one PATCH for one change


async def test_does_not_fit_names_the_cap_and_the_changes_that_fit():
    async with emulated_operator() as cluster:
        await cluster.create(llmd("tight", {"model": {"source": "llama-3.1-8b"}, "quantization": "bf16",
                                            "gpu": {"type": "l4", "maxPerReplica": 1},
                                            "serving": {"maxContextLength": 131072, "concurrency": 4}}))
        verdict = condition(await planned(cluster, "tight", "False"), "Planned")
    message = verdict["message"]
    assert verdict["reason"] == "DoesNotFit" and "llama-3.1-8b does not fit on l4" in message
    assert "limits: gpu.type: l4; gpu.maxPerReplica: 1; quantization: bf16; " \
           "serving.concurrency: 4 x serving.maxContextLength: 131072" in message
    assert "gpu.maxPerReplica: 4 (bf16 weights + fp8 KV on 4 x l4" in message  # more GPUs
    assert "gpu.type: h100-80gb (bf16 weights + fp8 KV on 1 x h100-80gb" in message  # a larger GPU
    assert re.search(r"serving\.maxContextLength: \d+ \(", message)  # a shorter context (the plan's number)


async def test_a_hub_outage_says_hub_unreachable_and_is_retried_until_it_answers(fake_hub, tiny_config):
    fake_hub.serve("acme/flaky", "config.json", {"error": "down"}, status=503)
    async with emulated_operator(hub_endpoint=fake_hub.url) as cluster:
        await cluster.create(llmd("flaky", {"model": {"source": "hf://acme/flaky"}, "gpu": {"type": "l4"}}))
        verdict = condition(await planned(cluster, "flaky", "False"), "Planned")
        assert verdict["reason"] == "ModelFactsUnavailable" and "hub unreachable" in verdict["message"]
        assert "unknown" not in verdict["message"].lower()
        fake_hub.serve("acme/flaky", "config.json", tiny_config)  # the hub is back
        await planned(cluster, "flaky")  # kopf's backoff retried it, with no spec change
