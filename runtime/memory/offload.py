"""Weights offload, the last resort: which decoder layers keep their weights in host memory, and the plan
that does so when nothing else fits.

A plan that offloads `count` of a stage's layers keeps their weights in host memory (pinned on a GPU)
and streams each one into one of two GPU staging buffers just ahead of its use, double-buffered: the
copy of the next offloaded layer overlaps the compute of the layers before it. The offloaded layers
are spread evenly over the stage, so resident layers sit between them and hide the copies.

The runtime packs each offloaded layer's tensors contiguously with no padding, so a layer costs in host
memory exactly its weight bytes per GPU (memory/checkpoint.weights_by_part), and each staging buffer
the largest offloaded layer's bytes. Every decode step copies every offloaded layer once: the host link
bounds the step rate at link bytes/s / streamed bytes per GPU, whatever the batch.

Pure Python: the plan (operator, `kvpilot plan`) and the engine (`--offload-layers`) pick the same
layers from `offloaded_layers`.
"""

from __future__ import annotations

import dataclasses
from functools import lru_cache
from typing import TYPE_CHECKING

from kvpilot.runtime.memory.budget import engine_limits
from kvpilot.runtime.memory.checkpoint import weights_by_part
from kvpilot.runtime.memory.devices import Device, GiB
from kvpilot.runtime.memory.facts import ModelFacts
from kvpilot.runtime.memory.request import PlanError, PlanRequest
from kvpilot.runtime.memory.stages import Stage

if TYPE_CHECKING:
    from kvpilot.runtime.memory.planner import Plan

# Double buffering: one buffer is copied into while the layer in the other computes. The runtime keeps
# two even when one layer is offloaded (one code path), so the plan counts two.
STAGING_BUFFERS = 2


def offloaded_layers(num_layers: int, count: int) -> tuple[int, ...]:
    """Indices (0-based, within the stage) of the `count` layers whose weights live in host memory,
    spread evenly: the middle of each of `count` equal slices of the stage's layers."""
    if not 0 <= count <= num_layers:
        raise ValueError(f"offload_layers must be between 0 and the model's {num_layers} layers, got {count}")
    return tuple((2 * j + 1) * num_layers // (2 * count) for j in range(count))


def check_offload(device: Device, req: PlanRequest) -> None:
    """Refuse the consent where it can never be honoured (the pipeline pin is refused by PlanRequest)."""
    if req.allow_offload and device.kind == "cpu":
        raise PlanError("weights offload streams weights from host memory to a GPU; on the CPU the weights are in "
                        "host memory already: drop allow offload (serving.allowOffload)")


@lru_cache(maxsize=32)
def layer_parts(facts: ModelFacts, quant: str, compute: str, tp: int) -> tuple[dict[str, int], ...]:
    """Each decoder layer's weight bytes on one GPU, by part (its linears and norms): what an offloaded
    layer holds in host memory and streams. Do not mutate the dicts (cached)."""
    return tuple(weights_by_part(facts, quant, compute, tp, Stage(i, range(i, i + 1), first=False, last=False), 1)
                 for i in range(facts.num_layers))


def with_offload(plan: Plan, facts: ModelFacts, device: Device, req: PlanRequest, count: int) -> tuple[Plan, int]:
    """A one-stage `plan` (planner.size) with `count` layers' weights in host memory: the plan with every
    freed byte given to KV blocks, and its shortfall in bytes per GPU (0: it fits)."""
    if plan.pipeline_parallel != 1:
        raise ValueError(f"weights offload plans one pipeline stage, not {plan.pipeline_parallel}")
    layers = layer_parts(facts, plan.quantization, plan.compute_dtype, plan.tensor_parallel)
    moved = [layers[i] for i in offloaded_layers(facts.num_layers, count)]
    host = sum(sum(layer.values()) for layer in moved)
    staging = STAGING_BUFFERS * max((sum(layer.values()) for layer in moved), default=0)
    parts = dict(plan.weights_by_part)
    for layer in moved:
        for part, size in layer.items():
            parts[part] -= size
    if staging:
        parts["staging"] = staging
    weights = sum(parts.values())
    mem = plan.memory
    kv_budget = _kv_budget(plan) - weights
    blocks = max(0, kv_budget // plan.kv_block_bytes)
    limits = engine_limits(device, req.max_batched_tokens, req.max_num_seqs)
    offloaded = dataclasses.replace(
        plan, num_kv_blocks=blocks, max_num_seqs=max(1, min(limits.max_num_seqs, blocks)),
        memory=dataclasses.replace(mem, weights=weights, kv_cache=blocks * plan.kv_block_bytes),
        weights_by_part=parts, stage_weight_bytes=(weights,), offload_layers=count, host_weight_bytes=host,
        staging_bytes=staging, decode_tokens_per_s=device.host_link_bytes_per_s / host if host else 0.0)
    return offloaded, max(0, _kv_needed(plan, req) - kv_budget)


def _kv_budget(plan: Plan) -> int:
    """Usable bytes per GPU for the weights and the KV cache."""
    mem = plan.memory
    return mem.usable - mem.overhead - mem.margin - mem.activations - mem.rotary_tables


def _kv_needed(plan: Plan, req: PlanRequest) -> int:
    return plan.kv_blocks_per_sequence * req.concurrency * plan.kv_block_bytes


def _fewest_layers(plan: Plan, facts: ModelFacts, device: Device, req: PlanRequest) -> Plan | None:
    """`with_offload` at the fewest layers that fit (the bytes summed here first: NoFit asks this for every
    attempt, and fit_advice asks NoFit for every change it tries)."""
    sizes = [sum(layer.values()) for layer in layer_parts(facts, plan.quantization, plan.compute_dtype,
                                                          plan.tensor_parallel)]
    room = _kv_budget(plan) - sum(plan.weights_by_part.values()) - _kv_needed(plan, req)
    for count in range(1, facts.num_layers + 1):
        moved = [sizes[i] for i in offloaded_layers(facts.num_layers, count)]
        if sum(moved) - STAGING_BUFFERS * max(moved) >= -room:
            return with_offload(plan, facts, device, req, count)[0]
    return None


def offload_plan(facts: ModelFacts, device: Device, req: PlanRequest, attempts: list[tuple[Plan, int]]) -> Plan | None:
    """The last resort, for attempts that all missed: each one-stage attempt (a precision rung on one node's
    tensor-parallel degree) with the fewest offloaded layers that fit; of those the fastest (fewest bytes
    streamed per GPU per step), or with optimize=cost the fewest GPUs, then the fastest. None: none fits
    (or the device is the CPU)."""
    if device.kind == "cpu":
        return None
    found = [(offloaded, index) for index, (plan, _) in enumerate(attempts)
             if plan.pipeline_parallel == 1 and (offloaded := _fewest_layers(plan, facts, device, req))]

    def order(item: tuple[Plan, int]) -> tuple[int, int, int]:
        plan, index = item
        if req.optimize == "cost":
            return plan.gpus_per_replica, plan.host_weight_bytes, index
        return plan.host_weight_bytes, plan.gpus_per_replica, index

    return min(found, key=order)[0] if found else None


def describe_offload(plan: Plan) -> str:
    layers = sum(plan.stage_layers)
    return (f"offloading {plan.offload_layers} of {layers} layers' weights to host memory "
            f"({plan.host_weight_bytes / GiB:.2f} GiB per GPU)")


def offload_clause(facts: ModelFacts, device: Device, req: PlanRequest, attempts: list[tuple[Plan, int]]) -> str:
    """What NoFit adds: the offload plan that would fit, and how to consent to it."""
    if device.kind == "cpu":
        return ""
    if req.allow_offload:
        return "; offloading weights to host memory does not fit either (the KV cache, activations and " \
               "staging buffers alone exceed the GPU)"
    plan = offload_plan(facts, device, req, attempts)
    if plan is None:
        return ""
    return (f"; {describe_offload(plan)} would fit ({plan.quantization} weights + {plan.kv_dtype} KV on "
            f"{plan.tensor_parallel} x {plan.device}) at ~{plan.decode_tokens_per_s:.2f} tokens/s per sequence "
            "(set serving.allowOffload: true, or kvpilot plan --allow-offload)")


def offload_reasons(plan: Plan, req: PlanRequest) -> list[str]:
    """Why the plan offloads, and what it predicts."""
    steps = plan.decode_tokens_per_s
    link = steps * plan.host_weight_bytes
    pod = f", {plan.host_weight_bytes_per_pod / GiB:.2f} GiB per pod" if plan.tensor_parallel > 1 else ""
    order = ("the fewest GPUs, then the fastest" if req.optimize == "cost"
             else "the fastest (fewest bytes streamed per GPU per step)")
    return [
        f"weights offload (allowed): nothing fits at any precision or GPU count the request allows; "
        f"{describe_offload(plan)}"
        f"{pod}, the fewest layers that fit; they stream to the GPU every step through {STAGING_BUFFERS} staging "
        f"buffers the size of the largest one ({plan.staging_bytes / GiB:.2f} GiB in all, counted in the weights "
        f"above); of the precisions and GPU counts that fit so, optimize={req.optimize} takes {order}",
        f"predicted decode: at most {steps:.2f} tokens/s per sequence, {steps * plan.max_num_seqs:.1f} tokens/s at a "
        f"full batch of {plan.max_num_seqs}: each step copies {plan.host_weight_bytes / GiB:.2f} GiB per GPU over "
        f"a {link / 1e9:.0f} GB/s host link; an upper bound (the copies alone, compute not counted)",
    ]
