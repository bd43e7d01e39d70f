"""The plan's words: why each choice, as `kvpilot plan` prints them and the operator's status carries them."""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING

from kvpilot.runtime.memory.devices import GiB
from kvpilot.runtime.memory.facts import ModelFacts
from kvpilot.runtime.memory.host_tier import describe_host_tier
from kvpilot.runtime.memory.offload import offload_reasons
from kvpilot.runtime.memory.quantization import kv_bytes_per_token, tp_compatible

if TYPE_CHECKING:
    from kvpilot.runtime.memory.planner import Plan, PlanRequest


def describe(plan: Plan) -> str:
    if plan.device_kind == "cpu":
        gpus = "the CPU"
    elif plan.pipeline_parallel == 1:
        gpus = f"{plan.tensor_parallel} x {plan.device}"
    else:
        gpus = f"{plan.gpus_per_replica} x {plan.device} (TP {plan.tensor_parallel} x PP {plan.pipeline_parallel})"
    offload = f", {plan.offload_layers} layers' weights in host memory" if plan.offload_layers else ""
    return f"{plan.quantization} weights + {plan.kv_dtype} KV on {gpus}{offload}"


def _pipeline_reason(facts: ModelFacts, chosen: Plan) -> str:
    tp, pp = chosen.tensor_parallel, chosen.pipeline_parallel
    split = " / ".join(map(str, chosen.stage_layers))
    words = (f"pipeline parallel {pp}: {split} layers per stage (vLLM's split), embeddings on the first stage, "
             f"final norm and lm_head on the last; tensor parallel {tp} inside each stage keeps its all-reduces "
             f"on one node's links; each GPU holds its stage's KV only ({chosen.kv_bytes_per_token:,} bytes per "
             "token per GPU")
    if tp_compatible(facts, tp * pp):
        flat = kv_bytes_per_token(facts, chosen.kv_dtype, tp * pp)
        words += (f", where tensor parallel {tp * pp} across nodes would hold {flat:,} and send every "
                  "all-reduce over the network")
    return words + ")"


def _experts_reason(facts: ModelFacts, chosen: Plan) -> str:
    tp, width = chosen.tensor_parallel, facts.moe_intermediate_size
    split = (f"tensor parallel {tp} splits each expert's {width} intermediate rows into {width // tp} per GPU "
             "(as vLLM does)" if tp > 1 else f"each expert {width} intermediate rows wide")
    shared = " plus one shared expert" if facts.shared_expert_intermediate_size else ""
    held = chosen.weights_by_part["experts"] / GiB
    return (f"experts: {facts.num_experts} per MoE layer{shared}, all held ({held:.2f} GiB per GPU), "
            f"{facts.num_experts_per_tok} routed per token (activations hold top-"
            f"{facts.num_experts_per_tok} copies of each token); {split}")


def with_reasons(facts: ModelFacts, chosen: Plan, attempts: list, req: PlanRequest, widened: bool) -> Plan:
    reasons = [f"weights: {chosen.memory.weights / GiB:.2f} GiB per GPU in {chosen.quantization}; "
               f"usable memory {chosen.memory.usable / GiB:.2f} GiB "
               f"({req.gpu_memory_utilization:.0%} of {chosen.memory.total / GiB:.2f} GiB)"]
    if facts.is_moe:
        reasons.append(_experts_reason(facts, chosen))
    mem = chosen.memory
    reasons.append(f"kept out of the KV cache: activations {mem.activations / GiB:.2f} GiB (a step of "
                   f"{chosen.max_batched_tokens} tokens), non-torch {mem.overhead / GiB:.2f} GiB at TP "
                   f"{chosen.tensor_parallel}, safety margin {mem.margin / GiB:.2f} GiB")
    for attempt, shortfall in attempts:
        if attempt is chosen:
            break
        reasons.append(f"rejected {describe(attempt)}: KV cache short by {shortfall / GiB:.2f} GiB per GPU")
    order = ("more GPUs before lower precision" if req.optimize == "quality"
             else "lower precision before more GPUs")
    if chosen.offload_layers:
        reasons += [f"chose {describe(chosen)}", *offload_reasons(chosen, req)]
    else:
        reasons.append(f"chose {describe(chosen)}: optimize={req.optimize} tries {order}")
    if widened:
        reasons.append(f"one node of {req.gpus_per_node} GPUs cannot hold the model: "
                       f"spanning {chosen.nodes} nodes")
    if chosen.pipeline_parallel > 1:
        reasons.append(_pipeline_reason(facts, chosen))
    every_layer = " for every layer" if chosen.kv_groups > 1 else ""
    reasons.append(f"KV cache: {chosen.num_kv_blocks} blocks x {chosen.block_size} tokens = "
                   f"{chosen.kv_capacity_tokens} tokens{every_layer} = {chosen.kv_capacity_sequences} sequences "
                   f"of {chosen.max_model_len} tokens (asked for {req.concurrency})")
    if req.host_kv_bytes:
        reasons.append(describe_host_tier(chosen.num_host_kv_blocks, chosen.kv_block_bytes, chosen.block_size)
                       if chosen.num_host_kv_blocks else
                       "host KV tier off: it runs on one GPU with one KV group (this plan: tensor parallel "
                       f"{chosen.tensor_parallel} x pipeline parallel {chosen.pipeline_parallel}, "
                       f"{chosen.kv_groups} group(s))")
    if chosen.sliding_windows:
        unbounded = chosen.kv_groups * math.ceil(chosen.max_model_len / chosen.block_size)
        reasons.append(f"sliding-window layers hold at most {' / '.join(map(str, chosen.sliding_windows))} tokens "
                       f"per sequence: one of {chosen.max_model_len} tokens takes {chosen.kv_blocks_per_sequence} "
                       f"blocks ({chosen.kv_groups} block tables), not {unbounded}")
    return dataclasses.replace(chosen, reasons=reasons)
