"""What to change when a spec does not fit: the cap that bit and the nearest changes that would fit.

Each suggestion is the spec with one field changed, planned again through the same memory model
(`planning.plan_deployment`), so every number it quotes is one the operator would really run with:
more GPUs per replica, a larger GPU, lower precision, a shorter context, fewer sequences at once.
"""

from __future__ import annotations

from collections.abc import Callable

from kvpilot.operator.planning import model_facts, plan_deployment, target_device
from kvpilot.operator.spec import LLMDeploymentSpec
from kvpilot.runtime.memory.devices import GPU_CATALOG, GiB
from kvpilot.runtime.memory.facts import ModelFacts
from kvpilot.runtime.memory.planner import MAX_NODES_PER_REPLICA, Plan, PlanError

# Weight precisions from widest to narrowest: "lower precision" means later in this list.
PRECISION_ORDER = ("fp32", "bf16", "fp16", "fp8", "int8", "int4")
SHORTEST_CONTEXT = 256  # below this a suggestion to shorten the context helps no one


def _fits(spec: LLMDeploymentSpec, facts: ModelFacts | None) -> Plan | None:
    try:
        return plan_deployment(spec, facts=facts)
    except PlanError:  # NoFit, or a variation the GPU cannot run (fp8 on an A100)
        return None


def _with(spec: LLMDeploymentSpec, part: str, **changes: object) -> LLMDeploymentSpec:
    return spec.model_copy(update={part: getattr(spec, part).model_copy(update=changes)})


def _summary(plan: Plan) -> str:
    where = "the CPU" if plan.device_kind == "cpu" else f"{plan.gpus_per_replica} x {plan.device}"
    offload = (f", {plan.offload_layers} layers' weights in host memory (decode at most "
               f"{plan.decode_tokens_per_s:.2f} tokens/s per sequence)" if plan.offload_layers else "")
    return (f"{plan.quantization} weights + {plan.kv_dtype} KV on {where}, "
            f"{plan.memory.weights / GiB:.1f} GiB weights per GPU, KV cache for {plan.kv_capacity_sequences} x "
            f"{plan.max_model_len} tokens{offload}")


def caps(spec: LLMDeploymentSpec) -> list[str]:
    """The limits the spec sets on the search, as the fields a user would edit."""
    gpu = spec.gpu
    found = [f"gpu.type: {gpu.type}" + (f" ({gpu.memory})" if gpu.memory else "")]
    if gpu.max_per_replica is not None:
        found.append(f"gpu.maxPerReplica: {gpu.max_per_replica}")
    elif gpu.type != "cpu":
        found.append(f"at most {gpu.per_node * MAX_NODES_PER_REPLICA} GPUs per replica "
                     f"({MAX_NODES_PER_REPLICA} nodes of gpu.perNode: {gpu.per_node})")
    if spec.quantization != "auto":
        found.append(f"quantization: {spec.quantization}")
    if spec.kv_cache.dtype != "auto":
        found.append(f"kvCache.dtype: {spec.kv_cache.dtype}")
    context = spec.serving.max_context_length
    found.append(f"serving.concurrency: {spec.serving.concurrency}"
                 + (f" x serving.maxContextLength: {context}" if context else " at the model's full context"))
    return found


def _more_gpus(spec: LLMDeploymentSpec, facts: ModelFacts | None) -> str | None:
    limit = spec.gpu.max_per_replica
    if limit is None or spec.gpu.type == "cpu":
        return None
    count = limit * 2
    while count <= spec.gpu.per_node * MAX_NODES_PER_REPLICA:
        if plan := _fits(_with(spec, "gpu", max_per_replica=count), facts):
            return f"gpu.maxPerReplica: {count} ({_summary(plan)})"
        count *= 2
    return None


def _larger_gpu(spec: LLMDeploymentSpec, facts: ModelFacts | None, current: int) -> str | None:
    for device in sorted(GPU_CATALOG.values(), key=lambda d: d.memory_bytes):
        if device.memory_bytes > current and (plan := _fits(_with(spec, "gpu", type=device.name, memory=None),
                                                             facts)):
            return f"gpu.type: {device.name} ({_summary(plan)})"
    return None


def _lower_precision(spec: LLMDeploymentSpec, facts: ModelFacts | None) -> str | None:
    if spec.quantization == "auto":
        return None  # the planner already tried every precision the GPU runs
    for quant in PRECISION_ORDER[PRECISION_ORDER.index(spec.quantization) + 1:]:
        if plan := _fits(spec.model_copy(update={"quantization": quant}), facts):
            return f"quantization: {quant} ({_summary(plan)})"
    return None


def _largest(fits: Callable[[int], Plan | None], low: int, high: int) -> tuple[int, Plan] | None:
    """The largest n in [low, high) for which `fits(n)` plans (fitting shrinks as n grows)."""
    best = None
    while low < high:
        middle = (low + high) // 2
        if plan := fits(middle):
            best, low = (middle, plan), middle + 1
        else:
            high = middle
    return best


def _shorter_context(spec: LLMDeploymentSpec, facts: ModelFacts | None, context: int) -> str | None:
    found = _largest(lambda n: _fits(_with(spec, "serving", max_context_length=n, max_batched_tokens=None), facts),
                     SHORTEST_CONTEXT, context)
    if found is None:
        return None
    length = found[0] // SHORTEST_CONTEXT * SHORTEST_CONTEXT or found[0]  # a round number that still fits
    plan = _fits(_with(spec, "serving", max_context_length=length, max_batched_tokens=None), facts) or found[1]
    return f"serving.maxContextLength: {length} ({_summary(plan)})"


def _fewer_sequences(spec: LLMDeploymentSpec, facts: ModelFacts | None) -> str | None:
    found = _largest(lambda n: _fits(_with(spec, "serving", concurrency=n, max_num_seqs=None), facts),
                     1, spec.serving.concurrency)
    return None if found is None else f"serving.concurrency: {found[0]} ({_summary(found[1])})"


def advice(spec: LLMDeploymentSpec, facts: ModelFacts | None) -> str:
    """`caps` and the changes that fit, for a spec that does not fit, as one message."""
    memory = target_device(spec).memory_bytes
    context = spec.serving.max_context_length or (facts or model_facts(spec)).max_position_embeddings
    suggestions = [s for s in (
        _more_gpus(spec, facts),
        _larger_gpu(spec, facts, memory) if spec.gpu.type != "cpu" else None,
        _lower_precision(spec, facts),
        _shorter_context(spec, facts, context) if context > SHORTEST_CONTEXT else None,
        _fewer_sequences(spec, facts) if spec.serving.concurrency > 1 else None,
    ) if s]
    text = f"limits: {'; '.join(caps(spec))}"
    if suggestions:
        return f"{text}. Changes that fit, each alone: {'; '.join(suggestions)}"
    return f"{text}. No single change of GPU count, GPU type, precision, context or concurrency fits"
