"""Bytes of weights and KV cache under each quantization mode: the one formula for both.

The operator's plan and the runtime's allocation both call `weight_bytes` and
`kv_bytes_per_token`; a test holds them to the same numbers.

Layout of each mode (what the runtime stores, scales included):
- fp32 / bf16 / fp16: every weight in that dtype.
- fp8:  linear weights as float8_e4m3fn, one fp32 scale per output channel.
- int8: linear weights as int8, one scale (compute dtype) per output channel.
- int4: linear weights packed two per byte, groups of 128 along the input dimension, one scale
        and one zero point (compute dtype) per group.
Embeddings, lm_head, norms and biases stay in the compute dtype: quantizing them costs quality
for little memory (vLLM and AutoAWQ keep them too).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from kvpilot.runtime.memory.facts import Linear, ModelFacts
from kvpilot.runtime.memory.stages import Stage, whole_model

DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2, "fp8": 1}
INT4_GROUP_SIZE = 128


@dataclass(frozen=True)
class QuantMode:
    name: str
    weight_bits: int
    group_size: int | None  # None: one scale per output channel; else groups along the input dim
    scale_bytes: int  # 0 means the weights are stored unscaled in the compute dtype
    zero_bytes: int = 0


QUANT_MODES: dict[str, QuantMode] = {
    "fp32": QuantMode("fp32", 32, None, 0),
    "bf16": QuantMode("bf16", 16, None, 0),
    "fp16": QuantMode("fp16", 16, None, 0),
    "fp8": QuantMode("fp8", 8, None, 4),
    "int8": QuantMode("int8", 8, None, 2),
    "int4": QuantMode("int4", 4, INT4_GROUP_SIZE, 2, zero_bytes=2),
}

# The one list of each kind of name: the spec, the CLI, the engine and the loader read these.
COMPUTE_DTYPES = ("fp32", "bf16", "fp16")
WEIGHT_QUANT_MODES = ("int8", "int4", "fp8")  # quantized while loading: runtime/models/quantized.py
KV_DTYPES = (*COMPUTE_DTYPES, "fp8")
DTYPE_ALIASES = {"float32": "fp32", "float": "fp32", "bfloat16": "bf16", "float16": "fp16", "half": "fp16"}


def tp_compatible(facts: ModelFacts, tp: int) -> bool:
    """TP must split the query heads evenly, either split or replicate the KV heads evenly, and split
    the MLP's (each expert's) intermediate rows evenly."""
    if tp < 1 or facts.num_heads % tp or any(size % tp for size in facts.tp_split_sizes):
        return False
    return facts.num_kv_heads % tp == 0 or tp % facts.num_kv_heads == 0


def kv_heads_per_gpu(facts: ModelFacts, tp: int) -> int:
    """KV heads each GPU holds: split when TP <= KV heads, one replicated head per GPU beyond."""
    return max(1, facts.num_kv_heads // tp)


def kv_bytes_per_token(facts: ModelFacts, kv_dtype: str, tp: int = 1, stage: Stage | None = None) -> int:
    """K and V of every layer (of the stage's layers under pipeline parallelism), the KV heads one GPU
    holds: 2 * layers * kv_heads * head_dim * bytes."""
    layers = facts.num_layers if stage is None else len(stage.layers)
    return 2 * layers * kv_heads_per_gpu(facts, tp) * facts.head_dim * DTYPE_BYTES[kv_dtype]


def shard(lin: Linear, facts: ModelFacts, tp: int) -> tuple[int, int]:
    """(out, in) of one GPU's share of a linear layer under tensor parallelism."""
    if lin.split == "column":
        return lin.out_features // tp, lin.in_features
    if lin.split == "row":
        return lin.out_features, lin.in_features // tp
    if lin.split == "none":  # every rank holds it whole
        return lin.out_features, lin.in_features
    return kv_heads_per_gpu(facts, tp) * facts.head_dim, lin.in_features


def linear_bytes(out_features: int, in_features: int, mode: QuantMode, compute_bytes: int) -> int:
    """Bytes of one weight matrix in `mode`, scales and zero points included."""
    if mode.scale_bytes == 0:
        return out_features * in_features * mode.weight_bits // 8
    packed = out_features * math.ceil(in_features * mode.weight_bits / 8)
    groups_per_row = 1 if mode.group_size is None else math.ceil(in_features / mode.group_size)
    scale_bytes = mode.scale_bytes if mode.name == "fp8" else compute_bytes
    zero_bytes = compute_bytes if mode.zero_bytes else 0
    return packed + out_features * groups_per_row * (scale_bytes + zero_bytes)


def weight_bytes_by_part(facts: ModelFacts, quant: str, compute_dtype: str, tp: int = 1,
                         stage: Stage | None = None, pipeline_parallel: int = 1) -> dict[str, int]:
    """Per-GPU bytes of each part of the model (of one pipeline stage: its layers, and the embeddings,
    final norm and lm_head where memory/stages.py puts them) under `quant` and tensor parallelism `tp`."""
    mode = QUANT_MODES[quant]
    compute = DTYPE_BYTES[compute_dtype if mode.scale_bytes else quant]
    stage = stage or whole_model(facts.num_layers)
    parts = {"attention": 0, "mlp": 0, **({"experts": 0, "router": 0} if facts.is_moe else {})}
    for layer in stage.layers:
        for lin in facts.linears(layer):
            out_f, in_f = shard(lin, facts, tp)
            matrix = linear_bytes(out_f, in_f, mode, compute) if lin.quantized else out_f * in_f * compute
            parts[lin.part] += lin.copies * (matrix + (out_f * compute if lin.bias else 0))
    embedding = math.ceil(facts.vocab_size / tp) * facts.hidden_size * compute  # vocab-parallel
    parts["embeddings"] = embedding if stage.holds_embeddings else 0
    parts["lm_head"] = embedding if stage.holds_lm_head(facts.tie_word_embeddings, pipeline_parallel) else 0
    parts["norms"] = stage_norm_params(facts, stage) * compute
    return parts


def stage_norm_params(facts: ModelFacts, stage: Stage) -> int:
    """Norm weights of the stage's layers, and the final norm on the last stage."""
    per_layer = facts.norms_per_layer * facts.hidden_size + facts.qk_norm_size
    return len(stage.layers) * per_layer + (facts.hidden_size if stage.last else 0)


def weight_bytes(facts: ModelFacts, quant: str, compute_dtype: str, tp: int = 1) -> int:
    return sum(weight_bytes_by_part(facts, quant, compute_dtype, tp).values())
