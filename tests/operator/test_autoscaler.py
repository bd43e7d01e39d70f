"""The operator's autoscaler: the HPA's rule on KV-cache use, its stabilisation windows, the runtime's
metrics as the operator reads them, and the whole loop on the emulated cluster."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

import kmock
import pytest
from kube_emulator import Emulated, emulated_operator
from llmd_cases import load_example
from prometheus_client import CollectorRegistry, Gauge, generate_latest, start_http_server

from kvpilot.operator.autoscaler import Autoscaler, PodLoad, measured_memory, metrics_url, parse_load, recommend
from kvpilot.operator.pod import HTTP_PORT
from kvpilot.operator.render import selector_labels
from kvpilot.operator.spec import Autoscaling
from kvpilot.runtime.engine.outputs import EngineStats
from kvpilot.runtime.models.parallel import free_port
from kvpilot.runtime.server.metrics import MemoryFigures, ServerMetrics


def loads(*usages: float) -> list[PodLoad]:
    return [PodLoad(u) for u in usages]


@pytest.mark.parametrize(("current", "usages", "target", "expected"), [
    (1, (0.9,), 0.5, 2),  # ceil(1 x 0.9 / 0.5)
    (2, (0.9, 0.7), 0.5, 4),  # ceil(2 x 0.8 / 0.5) = ceil(3.2)
    (4, (0.1, 0.1, 0.2, 0.2), 0.5, 2),  # ceil(4 x 0.15 / 0.5) = ceil(1.2)
    (3, (0.52, 0.5, 0.48), 0.5, 3),  # within the 10% tolerance: no change
    (3, (0.74,), 0.7, 3),  # one pod of three answered, but within tolerance: the current count stands
    (3, (1.0,), 0.7, 2),  # one pod answered: the rule counts the pods it measured, as the HPA does
    (2, (0.0, 0.0), 0.7, 0),
])
def test_recommendation_is_the_hpa_rule(current, usages, target, expected):
    assert recommend(current, loads(*usages), target) == expected


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_scale_up_is_immediate_and_scale_down_waits_for_its_window():
    clock, key = Clock(), ("ml", "llm")
    scaler = Autoscaler(clock=clock)
    scaling = Autoscaling(enabled=True, min_replicas=1, max_replicas=8, target_kv_cache_utilization=0.5,
                          scale_down_stabilization_seconds=60)
    assert scaler.decide(key, 2, loads(0.9, 0.9), scaling).replicas == 4
    clock.now += 20
    assert scaler.decide(key, 4, loads(0.1, 0.1, 0.1, 0.1), scaling).replicas == 4  # 1 recommended; 4 seen <60 s ago
    clock.now += 30
    assert scaler.decide(key, 4, loads(0.1, 0.1, 0.1, 0.1), scaling).replicas == 4
    clock.now += 15  # the 4 is 65 s old now; the highest left in the window is 1
    assert scaler.decide(key, 4, loads(0.1, 0.1, 0.1, 0.1), scaling).replicas == 1


def test_scale_up_window_takes_the_lowest_recommendation():
    clock, key = Clock(), ("ml", "llm")
    scaler = Autoscaler(clock=clock)
    scaling = Autoscaling(enabled=True, max_replicas=8, target_kv_cache_utilization=0.5,
                          scale_up_stabilization_seconds=30, scale_down_stabilization_seconds=0)
    assert scaler.decide(key, 2, loads(0.5, 0.5), scaling).replicas == 2
    clock.now += 10
    assert scaler.decide(key, 2, loads(1.0, 1.0), scaling).replicas == 2  # a burst, not yet sustained
    clock.now += 25
    assert scaler.decide(key, 2, loads(1.0, 1.0), scaling).replicas == 4  # the 2 left the window


@pytest.mark.parametrize(("usages", "expected"), [((1.0, 1.0, 1.0), 5), ((0.0,), 2)])
def test_decisions_stay_within_min_and_max(usages, expected):
    scaling = Autoscaling(enabled=True, min_replicas=2, max_replicas=5, target_kv_cache_utilization=0.3,
                          scale_down_stabilization_seconds=0)
    assert Autoscaler().decide(("ml", "llm"), 3, loads(*usages), scaling).replicas == expected


def runtime_metrics(usage: float, waiting: int = 0) -> ServerMetrics:
    """The metrics a runtime pod exports (runtime/metrics.py), with the engine's figures set."""
    stats = EngineStats(num_running=3, num_waiting=waiting, num_kv_blocks=100,
                        num_free_kv_blocks=round(100 * (1 - usage)), kv_cache_usage=usage, num_preemptions=0,
                        prefix_cache_queries=0, prefix_cache_hits=0, prompt_tokens_total=0,
                        generation_tokens_total=0)
    held = MemoryFigures({}, {"weights": 538060032, "kv_cache": 150994944})  # CPU pods: what the runtime measures
    metrics = ServerMetrics("smollm2", lambda: metrics.stats, lambda: held, lambda: [])
    metrics.stats = stats  # type: ignore[attr-defined]  # what the collector reads at scrape time
    return metrics


def test_the_operator_reads_what_the_runtime_exports():
    exposition = generate_latest(runtime_metrics(0.625, waiting=4).registry).decode()
    assert parse_load(exposition) == PodLoad(0.625, {"weights": 538060032, "kv_cache": 150994944})
    assert parse_load("# nothing a runtime exports\nother_metric 1\n") is None


@pytest.mark.parametrize(("exposition", "usage"), [
    ('vllm:gpu_cache_usage_perc{model_name="m"} 0.4\n', 0.4),  # vLLM before the rename
    ('vllm:kv_cache_usage_perc{model_name="m"} 0.3\nvllm:gpu_cache_usage_perc{model_name="m"} 0.4\n', 0.3),
])
def test_both_names_of_the_kv_cache_metric_are_read(exposition, usage):
    assert parse_load(exposition) == PodLoad(usage)


def test_measured_memory_is_the_most_any_pod_holds():
    loads = [PodLoad(0.5, {"weights": 10, "kv_cache": 7, "activations": 3}), PodLoad(0.5, {"weights": 12}),
             PodLoad(0.5)]
    assert measured_memory(loads) == {"weights": 12, "kvCache": 7, "activations": 3, "pods": 3}
    assert measured_memory([PodLoad(0.5)]) is None and measured_memory([]) is None


def pod(name: str, port: int = HTTP_PORT, ready: bool = True, ip: str = "10.0.0.7", serves: bool = True) -> dict:
    ports = [{"name": "http", "containerPort": port}] if serves else []
    return {"metadata": {"name": name}, "spec": {"containers": [{"name": "runtime", "ports": ports}]},
            "status": {"podIP": ip, "conditions": [{"type": "Ready", "status": str(ready)}]}}


def test_only_ready_serving_pods_are_scraped():
    assert metrics_url(pod("a")) == f"http://10.0.0.7:{HTTP_PORT}/metrics"
    assert metrics_url(pod("b", ready=False)) is None
    assert metrics_url(pod("c", serves=False)) is None  # a LeaderWorkerSet worker
    assert metrics_url(pod("d", ip="")) is None
    going = pod("e")
    going["metadata"]["deletionTimestamp"] = "2026-11-27T00:00:00Z"
    assert metrics_url(going) is None


# --- the loop on the emulated cluster -----------------------------------------------------------


class RuntimePod:
    """A pod in the emulator whose address is a live /metrics endpoint with the runtime's metrics."""

    def __init__(self, owner: str, name: str, usage: float) -> None:
        self.metrics, self.port = runtime_metrics(usage), free_port()
        self.server, _ = start_http_server(self.port, addr="127.0.0.1", registry=self.metrics.registry)
        self.manifest = pod(name, self.port, ip="127.0.0.1") | {"apiVersion": "v1", "kind": "Pod"}
        self.manifest["metadata"]["labels"] = selector_labels(owner)

    def set_usage(self, usage: float) -> None:
        self.metrics.stats = EngineStats(**{**vars(self.metrics.stats), "kv_cache_usage": usage})

    def close(self) -> None:
        self.server.shutdown()


@pytest.fixture
def runtime_pods() -> Iterator[list[RuntimePod]]:
    made: list[RuntimePod] = []
    yield made
    for p in made:
        p.close()


def autoscaled(name: str, **scaling: Any) -> dict[str, Any]:
    spec = copy.deepcopy(load_example("smollm2")["spec"])
    spec["autoscaling"] = {"enabled": True, "mode": "operator", "minReplicas": 1, "maxReplicas": 4,
                           "targetKVCacheUtilization": 0.5, "scaleDownStabilizationSeconds": 0, **scaling}
    return {"apiVersion": "kvpilot.io/v1alpha1", "kind": "LLMDeployment", "metadata": {"name": name}, "spec": spec}


def replicas_of(cluster: Emulated, name: str) -> tuple[int | None, int | None]:
    owner, workload = cluster.get("LLMDeployment", name) or {}, cluster.get("Deployment", name) or {}
    return owner.get("spec", {}).get("replicas"), workload.get("spec", {}).get("replicas")


@pytest.mark.asyncio
async def test_kv_cache_use_drives_replicas_and_the_status(runtime_pods):
    async with emulated_operator(autoscale_seconds=0.2) as cluster:
        await cluster.create(autoscaled("busy"))
        fixed = autoscaled("fixed")
        fixed["spec"]["autoscaling"] = {"enabled": False}
        await cluster.create(fixed)
        await cluster.eventually(lambda: cluster.get("Deployment", "busy") and cluster.get("Deployment", "fixed"))
        runtime_pods += [RuntimePod("busy", "busy-a", 0.9), RuntimePod("fixed", "fixed-a", 0.95),
                         RuntimePod("busy", "busy-b", 0.9)]
        runtime_pods[2].manifest["status"]["conditions"][0]["status"] = "False"  # not ready: not measured
        for p in runtime_pods:
            await cluster.create(p.manifest)

        # 1 replica at 0.9 against 0.5: 2 replicas, on the LLMDeployment and on its Deployment.
        await cluster.eventually(lambda: replicas_of(cluster, "busy") == (2, 2), what="scaled up to 2")
        status = cluster.get("LLMDeployment", "busy")["status"]
        assert status["kvCacheUtilization"] == 0.9
        assert status["measuredMemory"] == {"weights": 538060032, "kvCache": 150994944, "pods": 1}
        await cluster.eventually(lambda: any(e["reason"] == "ScaledUp" and "KV-cache use 0.90 on 1 pod (target "
                                             "0.50): 1 -> 2 replicas" in e["message"] for e in cluster.events("busy")))
        assert cluster.metric("kvpilot_operator_scale_decisions_total", direction="up") == 1

        # Not autoscaled: measured and reported, never scaled.
        await cluster.eventually(lambda: (cluster.get("LLMDeployment", "fixed").get("status") or {})
                                 .get("kvCacheUtilization") == 0.95)
        assert replicas_of(cluster, "fixed") == (None, 1)  # spec.replicas untouched (the emulator applies no defaults)

        # Quiet: back to the minimum.
        runtime_pods[0].set_usage(0.05)
        await cluster.eventually(lambda: replicas_of(cluster, "busy") == (1, 1), what="scaled down to 1")
        await cluster.eventually(lambda: cluster.get("LLMDeployment", "busy")["status"].get("kvCacheUtilization")
                                 == 0.05)
        assert cluster.metric("kvpilot_operator_scale_decisions_total", direction="down") == 1


class SilentPod:
    """A ready pod whose /metrics answers without any KV-cache metric (an engine the operator cannot read)."""

    def __init__(self, owner: str, name: str) -> None:
        registry = CollectorRegistry()
        Gauge("some_engine_requests", "Something else.", registry=registry).set(3)
        self.port = free_port()
        self.server, _ = start_http_server(self.port, addr="127.0.0.1", registry=registry)
        self.manifest = pod(name, self.port, ip="127.0.0.1") | {"apiVersion": "v1", "kind": "Pod"}
        self.manifest["metadata"]["labels"] = selector_labels(owner)

    def close(self) -> None:
        self.server.shutdown()


@pytest.mark.asyncio
async def test_a_ready_pod_exporting_no_kv_cache_metric_is_said_once():
    silent = SilentPod("mute", "mute-a")
    try:
        async with emulated_operator(autoscale_seconds=0.05) as cluster:
            await cluster.create(autoscaled("mute"))
            await cluster.eventually(lambda: cluster.get("Deployment", "mute"))
            await cluster.create(silent.manifest)
            said = await cluster.eventually(lambda: [e for e in cluster.events("mute")
                                                     if e["reason"] == "NoKVCacheMetric"])
            assert said[0]["type"] == "Warning"
            assert "pod mute-a serves /metrics without vllm:kv_cache_usage_perc or vllm:gpu_cache_usage_perc" in \
                said[0]["message"]
            pods = kmock.resource("", "v1", "pods")
            ticks = len(list(cluster.emulator[kmock.action.LIST, pods]))
            await cluster.eventually(lambda: len(list(cluster.emulator[kmock.action.LIST, pods])) >= ticks + 5)
            assert len([e for e in cluster.events("mute") if e["reason"] == "NoKVCacheMetric"]) == 1  # once
            assert (cluster.get("LLMDeployment", "mute").get("status") or {}).get("kvCacheUtilization") is None
    finally:
        silent.close()
