"""What one GPU spends besides weights and KV cache: activations, non-torch memory, a safety margin.

Every figure here is a measured one, with its source, because the KV cache gets whatever is left:
a byte under-counted here is a byte the plan promises and the GPU does not have.

How the budget is laid out (the way vLLM lays it out, whose start-up logs are the reference
measurements): `gpu_memory_utilization x total` is the usable memory; the CUDA context lives in
the rest (`total - usable`); inside the usable part come the weights, the activation peak, the
non-torch memory that grows after start-up (NCCL's buffers), a safety margin, then the KV cache.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvpilot.runtime.memory.devices import Device, GiB, MiB
from kvpilot.runtime.memory.facts import ModelFacts
from kvpilot.runtime.memory.stages import Stage

# Non-torch memory that appears after the CUDA context, per GPU, by tensor-parallel degree: NCCL's
# communicator buffers dominate from TP 2 on. The largest figure measured at each degree:
# llm-d-planner's sweep of vLLM v0.19 on H100 logs "non-torch forward increase memory" of
# 0.24-0.27 GiB at TP1, 2.06-2.11 GiB at TP2, 2.13-2.21 GiB at TP4
# (https://github.com/llm-d-incubation/llm-d-planner/blob/main/accuracy/accuracy_report.md).
# TP 8 and beyond were not measured there: NCCL's buffers grow with the channel count, so the TP4
# figure plus the TP2->TP4 step.
NON_TORCH_BY_TP: dict[int, int] = {1: int(0.27 * GiB), 2: int(2.11 * GiB), 4: int(2.21 * GiB)}
NON_TORCH_TP8_AND_BEYOND = int(2.31 * GiB)
# The CUDA context, cuBLAS workspaces and loaded kernels of a torch process: they sit outside the
# usable memory (vLLM checks the same); when `1 - gpu_memory_utilization` of the GPU cannot hold
# them, the margin grows to cover the rest.
CUDA_CONTEXT_BYTES = 1 * GiB
# Room the plan leaves on purpose: allocator rounding (2 MiB segments), the fragmentation of the
# caching allocator across the forward pass, and what the measurements above vary by between runs
# (±0.05 GiB). Shown as its own line of the plan.
SAFETY_MARGIN_BYTES = 128 * MiB
# Python, torch and the tokenizer of a CPU runtime process, resident before any weight loads.
CPU_PROCESS_BYTES = 768 * MiB
# The API server's own process beside the engine's (runtime/server/engine_process.py): Python, torch,
# the tokenizer, FastAPI/uvicorn; measured 490 MB resident serving SmolLM2-135M.
SERVER_PROCESS_BYTES = 512 * MiB
# What a pod's runtime holds in host memory before any weight or KV byte: both processes.
RUNTIME_PROCESS_BYTES = CPU_PROCESS_BYTES + SERVER_PROCESS_BYTES

# The sampler's peak per logit (sequences x vocabulary): kvpilot's sampler (runtime/engine/sampler.py)
# holds the logits in fp32 (4), the log-probabilities (4), the top-k/top-p sort's values (4) and
# int64 order (8), the probabilities (4), their running sum (4) and the masked copy (4) at once.
KVPILOT_SAMPLER_BYTES_PER_LOGIT = 32
# Engine defaults: vLLM's chunked-prefill token budget for online serving on GPUs under 70 GiB,
# and its sequence limit; kvpilot's engine takes the same numbers from the plan.
DEFAULT_MAX_BATCHED_TOKENS = 2048
DEFAULT_MAX_NUM_SEQS = {"cuda": 256, "cpu": 32}


@dataclass(frozen=True)
class EngineLimits:
    """The step budget the engine runs with: the numbers activations are sized from."""

    max_batched_tokens: int
    max_num_seqs: int


def engine_limits(device: Device, max_batched_tokens: int | None, max_num_seqs: int | None) -> EngineLimits:
    """The limits the pod's engine completes from these settings (EngineConfig.for_model gives them
    back to it from the plan): every running sequence decodes one token per step, so the token
    budget is never below the sequence limit."""
    seqs = max_num_seqs or DEFAULT_MAX_NUM_SEQS[device.kind]
    tokens = max(max_batched_tokens or DEFAULT_MAX_BATCHED_TOKENS, max_num_seqs or 0)
    return EngineLimits(tokens, min(seqs, tokens))


def forward_peak_bytes(facts: ModelFacts, tp: int, tokens: int, compute_bytes: int) -> int:
    """One forward pass of `tokens` tokens: residual and normed hidden states, this GPU's share of
    q/k/v and the attention output, gate/up/product of the MLP (or of the experts, below)."""
    d = facts.head_dim
    mlp = 3 * facts.intermediate_size // tp if facts.has_dense_mlp else 0
    per_token = (2 * facts.hidden_size + (2 * facts.num_heads + 2 * facts.num_kv_heads) * d // tp
                 + max(mlp, moe_widths_per_token(facts, tp)))
    return tokens * per_token * compute_bytes


def moe_widths_per_token(facts: ModelFacts, tp: int) -> int:
    """An MoE layer's activations per token, in compute-dtype words, laid out as vLLM's fused MoE lays
    them out: the router's logits and probabilities (fp32: two words each), then top-k copies of the
    token, each with its expert's gate/up/product share and its output (summed back after), and the
    shared expert's gate/up/product."""
    if not facts.is_moe:
        return 0
    routed = facts.num_experts_per_tok * (3 * facts.moe_intermediate_size // tp + 2 * facts.hidden_size)
    return 4 * facts.num_experts + routed + 3 * facts.shared_expert_intermediate_size // tp


def activation_bytes(facts: ModelFacts, tp: int, limits: EngineLimits, compute_bytes: int,
                     sampler_bytes_per_logit: int = KVPILOT_SAMPLER_BYTES_PER_LOGIT,
                     stage: Stage | None = None) -> int:
    """The activation peak: the larger of a full-budget forward pass and sampling every running
    sequence over the whole vocabulary (the forward pass's buffers are freed before sampling;
    vLLM's measured peak is the sampler's for every model of the reference table).

    Under pipeline parallelism (`stage` one of several): the logits live on the last stage and are
    sampled on the first, so a middle stage has no sampler peak; every stage holds the hidden states
    it receives and the ones it sends on (`pipeline_handoff_bytes`)."""
    forward = forward_peak_bytes(facts, tp, limits.max_batched_tokens, compute_bytes)
    sampler = limits.max_num_seqs * facts.vocab_size * sampler_bytes_per_logit
    if stage is None or (stage.first and stage.last):
        return max(forward, sampler)
    handoff = pipeline_handoff_bytes(facts, limits, compute_bytes)
    return max(forward, sampler if stage.first or stage.last else 0) + handoff


def pipeline_handoff_bytes(facts: ModelFacts, limits: EngineLimits, compute_bytes: int) -> int:
    """A stage's hidden states of a full step in flight between stages: one buffer received, one sent."""
    return 2 * limits.max_batched_tokens * facts.hidden_size * compute_bytes


def non_torch_bytes(device: Device, tp: int, pipeline_parallel: int = 1) -> int:
    """By TP degree; a pipeline adds a communicator between neighbouring stages, counted (unmeasured)
    as at least the TP 2 figure, the smallest NCCL communicator measured."""
    if device.kind == "cpu":
        return RUNTIME_PROCESS_BYTES
    if pipeline_parallel > 1:
        tp = max(tp, 2)
    if tp > 4:
        return NON_TORCH_TP8_AND_BEYOND
    return NON_TORCH_BY_TP[next(d for d in (1, 2, 4) if tp <= d)]


def safety_margin_bytes(device: Device, usable: int) -> int:
    """The margin, grown by whatever part of the CUDA context `total - usable` cannot hold."""
    if device.kind == "cpu":
        return 0
    uncovered = max(0, CUDA_CONTEXT_BYTES - (device.memory_bytes - usable))
    return SAFETY_MARGIN_BYTES + uncovered
