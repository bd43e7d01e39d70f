"""LLMDeployment status: its schema (pydantic, so the CRD is generated from it) and the pure functions
that turn a plan and a workload's own status into phase, conditions and replica counts.

Two writers share it: the reconciler (plan, `Planned`, `observedGeneration`) and the workload watch
(replicas and availability as pods come and go). Both call `status_patch`, which returns only the keys
that change, so an unchanged world costs no API write.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

from kvpilot.runtime.memory.planner import Plan

ConditionType = Literal["Planned", "Available", "Progressing", "Degraded"]
Phase = Literal["Pending", "Progressing", "Ready", "ScaledToZero", "Degraded", "Failed"]
CONDITION_ORDER: tuple[ConditionType, ...] = ("Planned", "Available", "Progressing", "Degraded")
REASON_PATTERN = r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$"  # metav1.Condition's rule for reasons


class _Model(BaseModel):
    # extra="ignore": conditions read back from the cluster may carry fields other writers added.
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore")


class Condition(_Model):
    """One aspect of the deployment, as in metav1.Condition."""

    type: ConditionType = Field(description="Planned, Available, Progressing or Degraded.")
    status: Literal["True", "False", "Unknown"] = Field(description="True, False or Unknown.")
    reason: str = Field(min_length=1, max_length=1024, pattern=REASON_PATTERN,
                        description="Why, in one CamelCase word.")
    message: str = Field("", max_length=32768, description="Why, for people.")
    last_transition_time: str | None = Field(None, description="When status last changed (RFC 3339).",
                                             json_schema_extra={"format": "date-time"})


class MemoryStatus(_Model):
    """Bytes on each GPU (or the pod's memory, for CPU pods), as planned."""

    total: int = Field(ge=0, description="Memory of the device.")
    usable: int = Field(ge=0, description="gpuMemoryUtilization x total.")
    weights: int = Field(ge=0, description="Model weights (this GPU's tensor-parallel share).")
    kv_cache: int = Field(ge=0, description="The KV-cache pool.")
    activations: int = Field(ge=0, description="Peak activations of one engine step.")
    overhead: int = Field(ge=0, description="CUDA context, NCCL buffers or the CPU process.")
    rotary_tables: int = Field(0, ge=0, description="The rotary cos/sin tables the runtime builds.")
    margin: int = Field(0, ge=0, description="Left free on purpose (the safety margin).")


class MeasuredMemory(_Model):
    """Bytes the serving pods report holding (`kvpilot:memory_measured_bytes`; per part, the most any pod
    reports), to hold against the plan's perGpuBytes. Parts a device cannot measure are left out."""

    weights: int | None = Field(None, ge=0, description="Model weights, as loaded.")
    kv_cache: int | None = Field(None, ge=0, description="The KV-cache pool.")
    rotary_tables: int | None = Field(None, ge=0, description="The rotary cos/sin tables.")
    activations: int | None = Field(None, ge=0, description="Peak activations (GPU pods).")
    other: int | None = Field(None, ge=0, description="Outside torch's allocator: CUDA context, NCCL (GPU pods).")
    host_kv_cache: int | None = Field(None, ge=0, description="The host KV tier, in host memory.")
    host_weights: int | None = Field(None, ge=0, description="Offloaded layers' weights, in host memory.")
    pods: int = Field(ge=1, description="Pods the figures come from.")


class PlanStatus(_Model):
    """The memory plan the pods run with."""

    model: str = Field(description="Model name.")
    device: str = Field(description="GPU type (or cpu) planned for.")
    quantization: str = Field(description="Weight quantization.")
    kv_dtype: str = Field(description="KV-cache dtype.")
    compute_dtype: str = Field(description="Activation dtype.")
    tensor_parallel: int = Field(ge=1, description="Tensor-parallel degree (GPUs per pipeline stage on GPUs).")
    pipeline_parallel: int = Field(1, ge=1, description="Pipeline stages per replica.")
    nodes: int = Field(ge=1, description="Nodes per replica; more than one runs a LeaderWorkerSet.")
    gpus: int = Field(ge=0, description="GPUs per replica (0 for CPU pods).")
    kv_blocks: int = Field(ge=0, description="KV-cache blocks each replica allocates.")
    block_size: int = Field(ge=1, description="Tokens per KV block.")
    kv_capacity_tokens: int = Field(ge=0, description="Tokens the KV cache holds.")
    kv_capacity_sequences: int = Field(ge=0, description="Sequences of maxModelLen the KV cache holds at once.")
    max_model_len: int = Field(ge=1, description="Longest prompt + completion.")
    max_num_seqs: int = Field(ge=1, description="Most sequences running at once.")
    max_batched_tokens: int = Field(ge=1, description="Token budget of one engine step.")
    per_gpu_bytes: MemoryStatus = Field(description="Planned bytes per GPU.")
    host_kv_blocks: int = Field(0, ge=0, description="Blocks of the host KV tier (kvCache.hostMemory); 0: none.")
    host_kv_bytes: int = Field(0, ge=0, description="Host memory the host KV tier holds.")
    host_kv_tokens: int = Field(0, ge=0, description="Tokens the host KV tier holds.")
    offload_layers: int = Field(0, ge=0, description="Layers with weights in host memory (allowOffload); 0: none.")
    host_weight_bytes: int = Field(0, ge=0, description="Offloaded weights per GPU, in host memory.")
    host_weight_bytes_per_pod: int = Field(0, ge=0, description="Offloaded weights per pod, in host memory.")
    staging_bytes: int = Field(0, ge=0, description="GPU staging buffers the offloaded layers stream through "
                                                    "(in perGpuBytes.weights).")
    decode_tokens_per_s: float = Field(0, ge=0, description=(
        "With offloaded layers: predicted decode tokens/s per sequence, at most (host link / bytes per step)."))


class LLMDeploymentStatus(_Model):
    """What the operator observed and decided."""

    observed_generation: int | None = Field(None, ge=0, description="The spec generation the plan is for.")
    phase: Phase | None = Field(None, description="Pending, Progressing, Ready, ScaledToZero, Degraded or Failed.")
    conditions: list[Condition] = Field(default_factory=list, description="Planned, Available, Progressing, Degraded.",
                                        json_schema_extra={"x-kubernetes-list-type": "map",
                                                           "x-kubernetes-list-map-keys": ["type"]})
    plan: PlanStatus | None = Field(None, description="The memory plan.")
    replicas: int | None = Field(None, ge=0, description="Pods (groups, for multi-node replicas) that exist.")
    ready_replicas: int | None = Field(None, ge=0, description="Replicas ready to serve.")
    selector: str | None = Field(None, description="Label selector of the pods (for the scale subresource).")
    kv_cache_utilization: float | None = Field(None, ge=0, le=1, alias="kvCacheUtilization", description=(
        "Average KV-cache use of the replicas (0..1), as the autoscaler last read it."))
    measured_memory: MeasuredMemory | None = Field(None, description=(
        "Memory the serving pods report holding, read with the KV-cache use."))


@dataclass(frozen=True)
class Workload:
    """What the status needs from a Deployment or LeaderWorkerSet."""

    desired: int
    replicas: int
    ready: int
    updated: int
    failure: str | None = None


def now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def plan_status(plan: Plan) -> PlanStatus:
    m = plan.memory
    return PlanStatus(
        model=plan.model, device=plan.device, quantization=plan.quantization, kv_dtype=plan.kv_dtype,
        compute_dtype=plan.compute_dtype, tensor_parallel=plan.tensor_parallel,
        pipeline_parallel=plan.pipeline_parallel, nodes=plan.nodes,
        gpus=plan.gpus_per_replica, kv_blocks=plan.num_kv_blocks, block_size=plan.block_size,
        kv_capacity_tokens=plan.kv_capacity_tokens, kv_capacity_sequences=plan.kv_capacity_sequences,
        max_model_len=plan.max_model_len, max_num_seqs=plan.max_num_seqs,
        max_batched_tokens=plan.max_batched_tokens,
        per_gpu_bytes=MemoryStatus(total=m.total, usable=m.usable, weights=m.weights, kv_cache=m.kv_cache,
                                   activations=m.activations, overhead=m.overhead, rotary_tables=m.rotary_tables,
                                   margin=m.margin),
        host_kv_blocks=plan.num_host_kv_blocks, host_kv_bytes=plan.host_kv_bytes, host_kv_tokens=plan.host_kv_tokens,
        offload_layers=plan.offload_layers, host_weight_bytes=plan.host_weight_bytes,
        host_weight_bytes_per_pod=plan.host_weight_bytes_per_pod, staging_bytes=plan.staging_bytes,
        decode_tokens_per_s=round(plan.decode_tokens_per_s, 3),
    )


def read_workload(obj: Mapping[str, Any] | None) -> Workload | None:
    """A Deployment's or LeaderWorkerSet's spec and status, in the terms the status speaks."""
    if obj is None:
        return None
    spec, status = obj.get("spec") or {}, obj.get("status") or {}
    failure = None
    for cond in status.get("conditions") or []:
        kind, state, reason = cond.get("type"), cond.get("status"), cond.get("reason")
        stuck = kind == "Progressing" and state == "False" and reason == "ProgressDeadlineExceeded"
        if stuck or (kind == "ReplicaFailure" and state == "True"):
            failure = f"{obj.get('kind', 'workload')} {kind}: {cond.get('message') or reason}"
    return Workload(desired=spec.get("replicas", 1), replicas=status.get("replicas", 0),
                    ready=status.get("readyReplicas", 0), updated=status.get("updatedReplicas", 0),
                    failure=failure)


def availability(w: Workload | None) -> list[Condition]:
    """Available, Progressing and Degraded, from the workload (None: not created)."""
    if w is None:
        return [Condition(type="Available", status="False", reason="NoWorkload", message="no pods yet"),
                Condition(type="Progressing", status="False", reason="NoWorkload", message="no pods yet"),
                Condition(type="Degraded", status="False", reason="NoWorkload", message="no pods yet")]
    counts = f"{w.ready}/{w.desired} replicas ready, {w.updated} up to date"
    if w.desired == 0:
        available = Condition(type="Available", status="False", reason="ScaledToZero", message=counts)
    elif w.ready >= w.desired:
        available = Condition(type="Available", status="True", reason="AllReplicasReady", message=counts)
    elif w.ready > 0:
        available = Condition(type="Available", status="True", reason="SomeReplicasReady", message=counts)
    else:
        available = Condition(type="Available", status="False", reason="NoReplicasReady", message=counts)
    if w.updated < w.desired:
        progressing = Condition(type="Progressing", status="True", reason="RollingOut", message=counts)
    elif w.ready < w.desired:
        progressing = Condition(type="Progressing", status="True", reason="Starting", message=counts)
    else:
        progressing = Condition(type="Progressing", status="False", reason="Complete", message=counts)
    if w.failure:
        degraded = Condition(type="Degraded", status="True", reason="WorkloadFailing", message=w.failure)
    else:
        degraded = Condition(type="Degraded", status="False", reason="AsExpected", message=counts)
    return [available, progressing, degraded]


def phase(conditions: Mapping[str, Condition], w: Workload | None) -> Phase:
    if conditions["Planned"].status == "False":
        return "Failed"
    if conditions["Degraded"].status == "True":
        return "Degraded"
    if w is None:
        return "Pending"
    if w.desired == 0:
        return "ScaledToZero"
    if w.ready >= w.desired and w.updated >= w.desired:
        return "Ready"
    return "Progressing" if w.ready else "Pending"


def merge_conditions(old: list[Mapping[str, Any]], new: list[Condition], at: str) -> list[dict[str, Any]]:
    """`new` as wire dicts; a condition keeps its lastTransitionTime while its status holds."""
    previous = {c.get("type"): c for c in old}
    merged = []
    for cond in new:
        before = previous.get(cond.type, {})
        since = before.get("lastTransitionTime") if before.get("status") == cond.status else None
        merged.append(cond.model_copy(update={"last_transition_time": since or at})
                      .model_dump(by_alias=True, exclude_none=True))
    return merged


def status_patch(previous: Mapping[str, Any], *, workload: Workload | None, selector: str,
                 planned: Condition | None = None, plan: PlanStatus | None = None,
                 generation: int | None = None, at: str | None = None) -> dict[str, Any]:
    """The status keys that change. `planned`/`plan` None keep what `previous` says (the workload watch
    knows nothing new about the plan)."""
    old_conditions = list(previous.get("conditions") or [])
    by_type = {c.type: c for c in availability(workload)}
    if planned is not None:
        by_type["Planned"] = planned
    else:
        old = next((c for c in old_conditions if c.get("type") == "Planned"), None)
        by_type["Planned"] = (Condition.model_validate(old) if old else
                              Condition(type="Planned", status="Unknown", reason="NotYetPlanned"))
    conditions = [by_type[t] for t in CONDITION_ORDER]
    new: dict[str, Any] = {
        "phase": phase(by_type, workload),
        "conditions": merge_conditions(old_conditions, conditions, at or now()),
        "replicas": workload.replicas if workload else 0,
        "readyReplicas": workload.ready if workload else 0,
        "selector": selector,
    }
    if plan is not None:
        new["plan"] = plan.model_dump(by_alias=True)
    if generation is not None:
        new["observedGeneration"] = generation
    return {key: value for key, value in new.items() if previous.get(key) != value}
