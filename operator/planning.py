"""LLMDeployment spec -> memory plan: the glue between the user's contract and the memory model."""

from __future__ import annotations

from dataclasses import replace

from kubernetes.utils import parse_quantity

from kvpilot.operator.spec import LLMDeploymentSpec
from kvpilot.runtime.memory.devices import Device, GiB, UnknownDevice, gpu_from_catalog, local_device
from kvpilot.runtime.memory.facts import ModelFacts, resolve_model
from kvpilot.runtime.memory.planner import Plan, PlanError, PlanRequest, plan

# Memory a CPU pod plans with when its spec sets no memory limit.
DEFAULT_CPU_POD_MEMORY = 16 * GiB


def model_facts(spec: LLMDeploymentSpec) -> ModelFacts:
    arch = spec.model.architecture
    if arch is None:
        return resolve_model(spec.model.source)
    return ModelFacts(
        name=spec.model.name.split("/")[-1],
        num_layers=arch.num_layers,
        hidden_size=arch.hidden_size,
        num_heads=arch.num_heads,
        num_kv_heads=arch.num_kv_heads or arch.num_heads,
        head_dim=arch.head_dim or arch.hidden_size // arch.num_heads,
        intermediate_size=arch.intermediate_size,
        vocab_size=arch.vocab_size,
        max_position_embeddings=arch.max_position_embeddings,
        tie_word_embeddings=arch.tie_word_embeddings,
        qkv_bias=arch.qkv_bias,
    )


def target_device(spec: LLMDeploymentSpec) -> Device:
    """The device the spec asks for: a catalog GPU, a custom GPU, or CPU pods."""
    gpu = spec.gpu
    if gpu.type == "cpu":
        limits = spec.runtime.resources.limits if spec.runtime.resources else {}
        memory = quantity_bytes(limits["memory"], "runtime.resources.limits.memory") if "memory" in limits \
            else DEFAULT_CPU_POD_MEMORY
        return Device("cpu", memory, fp8=False, kind="cpu")
    if gpu.memory:
        base = gpu_from_catalog(gpu.type) if gpu.type else None
        memory = quantity_bytes(gpu.memory, "gpu.memory")
        if base is None:
            return Device(f"custom-{gpu.memory}", memory, fp8=gpu.fp8)
        return replace(base, memory_bytes=memory)
    return gpu_from_catalog(gpu.type or "")


def quantity_bytes(value: str | int, field: str) -> int:
    """A Kubernetes quantity (48Gi, 80G, 1073741824) in bytes, read as the API server reads it."""
    try:
        return int(parse_quantity(value))
    except ValueError:
        raise UnknownDevice(f"{field}: {value!r} is not a size like 48Gi, 80G or 1073741824") from None


def host_kv_bytes(spec: LLMDeploymentSpec) -> int:
    """kvCache.hostMemory in bytes (0: no host KV tier); refused when the pod's memory request cannot hold it."""
    if spec.kv_cache.host_memory is None:
        return 0
    host = quantity_bytes(spec.kv_cache.host_memory, "kvCache.hostMemory")
    requests = spec.runtime.resources.requests if spec.runtime.resources else {}
    if "memory" in requests:
        request = quantity_bytes(requests["memory"], "runtime.resources.requests.memory")
        if host > request:
            raise PlanError(f"kvCache.hostMemory {spec.kv_cache.host_memory} ({host} bytes) exceeds the pod's memory "
                            f"request runtime.resources.requests.memory {requests['memory']} ({request} bytes): "
                            "raise the request or lower hostMemory")
    return host


def plan_request(spec: LLMDeploymentSpec, gpus_per_node: int | None = None) -> PlanRequest:
    return PlanRequest(
        host_kv_bytes=host_kv_bytes(spec),
        max_context=spec.serving.max_context_length,
        concurrency=spec.serving.concurrency,
        max_batched_tokens=spec.serving.max_batched_tokens,
        max_num_seqs=spec.serving.max_num_seqs,
        quantization=spec.quantization,
        kv_dtype=spec.kv_cache.dtype,
        block_size=spec.kv_cache.block_size,
        gpu_memory_utilization=spec.gpu_memory_utilization,
        optimize=spec.serving.optimize,
        allow_offload=spec.serving.allow_offload,
        gpus_per_node=gpus_per_node or spec.gpu.per_node,
        max_gpus_per_replica=spec.gpu.max_per_replica,
        tensor_parallel=spec.gpu.tensor_parallel,
        pipeline_parallel=spec.gpu.pipeline_parallel,
    )


def plan_deployment(spec: LLMDeploymentSpec, device: Device | None = None,
                    gpus_per_node: int | None = None, facts: ModelFacts | None = None) -> Plan:
    """Plan the spec for its own GPU type, or for `device` (`kvpilot up` passes the local one).

    `facts` overrides what the spec and the catalog say (the operator passes facts it fetched from
    the hub for models outside the catalog)."""
    if device is not None and device.kind == "cpu":
        gpus_per_node = 1
    return plan(facts or model_facts(spec), device or target_device(spec), plan_request(spec, gpus_per_node))


def local_plan(spec: LLMDeploymentSpec) -> Plan:
    """Plan for this machine: its GPUs if pynvml finds any, else its CPU and RAM."""
    device, count = local_device()
    return plan_deployment(spec, device, gpus_per_node=count)
