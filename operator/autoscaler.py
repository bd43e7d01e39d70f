"""KV-cache utilisation read from the pods, and the operator's own autoscaler (`autoscaling.mode: operator`).

Every `--autoscale-seconds` a timer per LLMDeployment scrapes the KV-cache use from the /metrics of
each ready serving pod (`vllm:kv_cache_usage_perc`, or `vllm:gpu_cache_usage_perc`, its name before
vLLM renamed it, which older engines still export; a pod exporting neither is said once, in an
Event) and writes the average to `status.kvCacheUtilization` (in every mode: the status tells the
truth whoever scales). In mode `operator` it then decides the replicas
the way the HorizontalPodAutoscaler does:

- recommendation = ceil(pods measured x average / target); none while the ratio is within
  `TOLERANCE` of 1 (the current replicas stand);
- stabilisation: a scale-up goes to the lowest recommendation of the last
  `scaleUpStabilizationSeconds`, a scale-down to the highest of the last
  `scaleDownStabilizationSeconds` (so one quiet minute does not drop replicas a busy one needs);
- clamped to `minReplicas`..`maxReplicas`.

The decision is written to `spec.replicas`, as `kubectl scale` would, and the ordinary reconcile
carries it to the workload. With no pod measured (none ready, none answering) nothing is decided.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from kvpilot.operator.pod import PORT_NAME
from kvpilot.operator.spec import Autoscaling
from kvpilot.operator.status import MeasuredMemory
from kvpilot.runtime.contract import KV_USAGE_METRIC, KV_USAGE_METRIC_OLD, MEMORY_MEASURED_METRIC

# The KV-cache use under its current name first, then the name vLLM used before the rename.
KV_USAGE_METRICS = (KV_USAGE_METRIC, KV_USAGE_METRIC_OLD)
MEMORY_METRIC = MEMORY_MEASURED_METRIC
SCRAPE_TIMEOUT_SECONDS = 2.0
# As the HPA's --horizontal-pod-autoscaler-tolerance: a ratio within 10% of 1 changes nothing.
TOLERANCE = 0.1


@dataclass(frozen=True)
class PodLoad:
    kv_cache_usage: float  # 0..1
    memory: dict[str, int] = field(default_factory=dict)  # bytes held, by part


def parse_load(exposition: str) -> PodLoad | None:
    """The load figures from a runtime's /metrics text; None if it exports no KV-cache use."""
    values: dict[str, float] = {}
    memory: dict[str, int] = {}
    for family in text_string_to_metric_families(exposition):
        for sample in family.samples:
            if sample.name in KV_USAGE_METRICS:
                values[sample.name] = values.get(sample.name, 0.0) + sample.value
            elif sample.name == MEMORY_METRIC and "part" in sample.labels:
                memory[sample.labels["part"]] = int(sample.value)
    usage = next((values[name] for name in KV_USAGE_METRICS if name in values), None)
    if usage is None:
        return None
    return PodLoad(min(max(usage, 0.0), 1.0), memory)


def measured_memory(loads: list[PodLoad]) -> dict[str, int] | None:
    """status.measuredMemory: per part, the most any pod holds (None when no pod reports memory)."""
    parts: dict[str, int] = {}
    for load in loads:
        for part, value in load.memory.items():
            parts[part] = max(parts.get(part, 0), value)
    if not parts:
        return None
    known = {part: value for part, value in parts.items() if part in MeasuredMemory.model_fields}
    return MeasuredMemory(**known, pods=len(loads)).model_dump(by_alias=True, exclude_none=True)


def metrics_url(pod: Mapping[str, Any]) -> str | None:
    """Where a pod serves /metrics: its IP and the container port named `http`; None for pods that are
    not ready, are going away, or serve nothing (a LeaderWorkerSet's workers)."""
    status = pod.get("status") or {}
    ready = any(c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions") or [])
    if not ready or not status.get("podIP") or pod.get("metadata", {}).get("deletionTimestamp"):
        return None
    for container in pod.get("spec", {}).get("containers") or []:
        for port in container.get("ports") or []:
            if port.get("name") == PORT_NAME:
                return f"http://{status['podIP']}:{port['containerPort']}/metrics"
    return None


@dataclass(frozen=True)
class Scrape:
    loads: list[PodLoad]  # the pods that answered in time with a KV-cache use
    unmeasured: list[str]  # the pods that answered but export no KV-cache use (by name)


async def scrape(urls: Mapping[str, str], timeout: float = SCRAPE_TIMEOUT_SECONDS) -> Scrape:
    """Every pod's /metrics (`urls`: pod name -> URL). Pods that do not answer in time are left out, as
    the HPA leaves out pods whose metrics are missing; those that answer without a KV-cache use are
    named, since no retry will change that."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as session:
        async def one(url: str) -> tuple[bool, PodLoad | None]:
            try:
                async with session.get(url) as response:
                    if response.status != 200:
                        return False, None
                    return True, parse_load(await response.text())
            except (TimeoutError, aiohttp.ClientError, ValueError):
                return False, None

        answers = await asyncio.gather(*(one(url) for url in urls.values()))
    return Scrape(loads=[load for _, load in answers if load is not None],
                  unmeasured=sorted(pod for pod, (answered, load) in zip(urls, answers, strict=True)
                                    if answered and load is None))


def unmeasured_message(pods: list[str]) -> str:
    return (f"pod{'s' * (len(pods) != 1)} {', '.join(pods)} serve{'s' * (len(pods) == 1)} /metrics without "
            f"{' or '.join(KV_USAGE_METRICS)}: their KV-cache use is unknown and autoscaling leaves them out "
            "(is the engine kvpilot's runtime or vLLM?)")


def average_usage(loads: list[PodLoad]) -> float | None:
    return sum(load.kv_cache_usage for load in loads) / len(loads) if loads else None


def recommend(current: int, loads: list[PodLoad], target: float) -> int:
    """The HPA's rule on KV-cache use: replicas that would bring the average to the target."""
    ratio = average_usage(loads) / target  # type: ignore[operator]  # callers pass at least one load
    if abs(ratio - 1.0) <= TOLERANCE:
        return current
    return math.ceil(ratio * len(loads))


@dataclass(frozen=True)
class Decision:
    replicas: int
    usage: float
    pods: int

    def message(self, current: int, target: float) -> str:
        return (f"KV-cache use {self.usage:.2f} on {self.pods} pod{'s' * (self.pods != 1)} "
                f"(target {target:.2f}): {current} -> {self.replicas} replicas")


@dataclass
class Autoscaler:
    """Recommendations remembered per LLMDeployment for the stabilisation windows (in memory, as in the
    HPA controller: a restarted operator starts with empty windows)."""

    clock: Callable[[], float] = time.monotonic
    _history: dict[tuple[str, str], list[tuple[float, int]]] = field(default_factory=dict)
    _unmeasured: dict[tuple[str, str], frozenset[str]] = field(default_factory=dict)

    def newly_unmeasured(self, key: tuple[str, str], pods: list[str]) -> bool:
        """Whether these pods without a KV-cache metric are news (said once, not every tick)."""
        before = self._unmeasured.get(key, frozenset())
        self._unmeasured[key] = frozenset(pods)
        return bool(set(pods) - before)

    def decide(self, key: tuple[str, str], current: int, loads: list[PodLoad], scaling: Autoscaling) -> Decision:
        now = self.clock()
        recommendation = recommend(current, loads, scaling.target_kv_cache_utilization)
        keep = max(scaling.scale_up_stabilization_seconds, scaling.scale_down_stabilization_seconds)
        history = [(t, r) for t, r in self._history.get(key, []) if now - t <= keep] + [(now, recommendation)]
        self._history[key] = history
        up = min(r for t, r in history if now - t <= scaling.scale_up_stabilization_seconds)
        down = max(r for t, r in history if now - t <= scaling.scale_down_stabilization_seconds)
        replicas = min(max(current, up), down)
        replicas = min(max(replicas, scaling.min_replicas), scaling.max_replicas)
        return Decision(replicas, average_usage(loads), len(loads))  # type: ignore[arg-type]

    def reset_windows(self, key: tuple[str, str]) -> None:
        """Nothing to decide this tick (not autoscaled, no pod measured): the next decision starts afresh."""
        self._history.pop(key, None)

    def forget(self, key: tuple[str, str]) -> None:
        self._history.pop(key, None)
        self._unmeasured.pop(key, None)
