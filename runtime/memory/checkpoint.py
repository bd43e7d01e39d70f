"""Pre-quantized checkpoints: what `quantization_config` in a config.json says, and the bytes it stores.

Pure Python on a config dict, so the planner, the operator (the hub's config.json) and the loader
read one answer. Formats, as their writers store them:

- compressed-tensors (llm-compressor: FP8 / W8A8 / W4A16): `config_groups[*].weights` gives
  num_bits, type (int | float), strategy (tensor | channel | group, with group_size) and symmetric;
  `format` pack-quantized packs 4-bit weights eight to an int32; scales are in the checkpoint's
  dtype (fp32 for one per tensor); asymmetric int weights store a zero point per scale (packed like
  the weights at 4 bits). `ignore` lists modules kept unquantized ("lm_head", "re:<regex>").
- GPTQ (AutoGPTQ / GPTQModel): qweight packs `bits` into int32, qzeros too (one per group and
  output column, stored even when symmetric), fp16 scales per group and column, g_idx an int32 per
  input feature. group_size -1 means one group per column. lm_head stays unquantized.
- AWQ (AutoAWQ, GEMM/GEMV): qweight and qzeros pack 4 bits into int32, fp16 scales per group;
  `modules_to_not_convert` keeps modules (by name part) unquantized.
- fp8 / fbgemm_fp8 (Meta's and Qwen's FP8 releases): fp8 weights, one fp32 scale per output
  channel (or per 128x128 block with `weight_block_size`); `modules_to_not_convert` /
  `ignored_layers` keep whole modules in bf16.

Embeddings and norms are never quantized by these formats; lm_head only when a format says so.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from kvpilot.runtime.memory.quantization import (
    DTYPE_ALIASES,
    DTYPE_BYTES,
    QUANT_MODES,
    linear_bytes,
    shard,
    stage_norm_params,
    weight_bytes_by_part,
)
from kvpilot.runtime.memory.stages import Stage, whole_model
from kvpilot.runtime.memory.support import UnsupportedOption, check_checkpoint_quantization

if TYPE_CHECKING:
    from kvpilot.runtime.memory.facts import ModelFacts


class UnsupportedCheckpoint(UnsupportedOption):
    """A quantization_config the memory model (and so the runtime) cannot read: refused in one line."""


@dataclass(frozen=True)
class StoredScheme:
    """How the checkpoint stores one quantized linear."""

    bits: int  # 4 or 8
    kind: str  # "int" or "float"
    group_size: int | None  # None: one scale per output channel; 0: one per tensor; else along the input
    scale_bytes: int
    zero_bytes: float  # per scale; 0 when symmetric and none stored
    row_index_bytes: int = 0  # GPTQ's g_idx: bytes per input feature
    fixed_bytes: int = 0  # per matrix: compressed-tensors' weight_shape (two int64)
    block: tuple[int, int] | None = None  # fp8 block scales (out, in)


@dataclass(frozen=True)
class CheckpointQuantization:
    method: str  # compressed-tensors | gptq | awq | fp8 | fbgemm_fp8
    scheme: StoredScheme
    runtime_mode: str  # the runtime layout it loads into: int4 | int8 | fp8 (quantization.QUANT_MODES)
    unquantized: tuple[str, ...] = ()  # module names, name parts or "re:" patterns kept in compute dtype
    lm_head_quantized: bool = False
    act_order: bool = False  # GPTQ desc_act: groups follow g_idx, not the column order

    @property
    def label(self) -> str:
        return f"{self.method} {self.scheme.kind}{self.scheme.bits}"

    def quantizes(self, module: str) -> bool:
        """Whether the checkpoint stores `module` (e.g. model.layers.3.mlp.down_proj) quantized."""
        if module == "lm_head" and not self.lm_head_quantized:
            return False
        for pattern in self.unquantized:
            if pattern.startswith("re:"):
                if re.match(pattern[3:], module):
                    return False
            elif pattern == module or pattern.removesuffix(".weight") == module or (
                    "." not in pattern and pattern in module.split(".")) or module.endswith("." + pattern):
                return False
        return True


def _dtype_bytes(config: dict[str, Any], default: int = 2) -> int:
    name = str(config.get("torch_dtype") or config.get("dtype") or "").removeprefix("torch.")
    return DTYPE_BYTES.get(DTYPE_ALIASES.get(name, name), default)


def _runtime_mode(bits: int, kind: str) -> str:
    if kind == "float" and bits == 8:
        return "fp8"
    if kind == "int" and bits in (4, 8):
        return f"int{bits}"
    raise UnsupportedCheckpoint(f"{kind} weights of {bits} bits are not a format this runtime runs "
                                "(it runs int4, int8 and fp8 checkpoints)")


def _compressed_tensors(qc: dict[str, Any], compute_bytes: int) -> CheckpointQuantization:
    groups = qc.get("config_groups") or {}
    weights = [g.get("weights") for g in groups.values() if g.get("weights")]
    if not weights:
        raise UnsupportedCheckpoint("compressed-tensors config has no config_groups[*].weights")
    schemes = {(w.get("num_bits"), w.get("type"), w.get("strategy"), w.get("group_size")) for w in weights}
    if len(schemes) > 1:
        raise UnsupportedCheckpoint(f"compressed-tensors with {len(schemes)} different weight schemes is not supported")
    w = weights[0]
    bits, kind, strategy = int(w.get("num_bits", 8)), w.get("type", "int"), w.get("strategy", "tensor")
    if strategy not in ("tensor", "channel", "group"):
        raise UnsupportedCheckpoint(f"compressed-tensors weight strategy {strategy!r} is not supported")
    group = {"tensor": 0, "channel": None}.get(strategy, int(w.get("group_size") or 128))
    symmetric = w.get("symmetric", True)
    packed = qc.get("format") == "pack-quantized"
    zero = 0.0 if symmetric or kind == "float" else (bits / 8 if packed else 1)
    scale = 4 if strategy == "tensor" else compute_bytes
    targets = [t for g in groups.values() for t in g.get("targets", [])]
    lm_head = any("lm_head" in t for t in targets)
    scheme = StoredScheme(bits, kind, group, scale, zero, fixed_bytes=16 if packed else 0)
    return CheckpointQuantization("compressed-tensors", scheme,
                                  _runtime_mode(bits, kind), tuple(qc.get("ignore") or ()), lm_head)


def _gptq(qc: dict[str, Any]) -> CheckpointQuantization:
    bits = int(qc.get("bits", 4))
    group = int(qc.get("group_size", 128))
    scheme = StoredScheme(bits, "int", None if group == -1 else group, 2, bits / 8, row_index_bytes=4)
    skip = tuple(qc.get("modules_to_not_convert") or ())
    return CheckpointQuantization("gptq", scheme, _runtime_mode(bits, "int"), skip, bool(qc.get("lm_head")),
                                  act_order=bool(qc.get("desc_act")))


def _awq(qc: dict[str, Any]) -> CheckpointQuantization:
    bits = int(qc.get("bits", qc.get("w_bit", 4)))
    group = int(qc.get("group_size", qc.get("q_group_size", 128)))
    zero = bits / 8 if qc.get("zero_point", True) else 0.0
    scheme = StoredScheme(bits, "int", None if group == -1 else group, 2, zero)
    skip = tuple(qc.get("modules_to_not_convert") or ())
    return CheckpointQuantization("awq", scheme, _runtime_mode(bits, "int"), skip)


def _fp8(qc: dict[str, Any], method: str) -> CheckpointQuantization:
    block = qc.get("weight_block_size")
    scheme = StoredScheme(8, "float", None, 4, 0.0, block=tuple(block) if block else None)
    skip = tuple(qc.get("modules_to_not_convert") or qc.get("ignored_layers") or ())
    return CheckpointQuantization(method, scheme, "fp8", skip)


def read_quantization(config: dict[str, Any]) -> CheckpointQuantization | None:
    """The checkpoint's quantization from a HF config.json dict; None for a plain float checkpoint.
    Refuses (UnsupportedOption) what the runtime cannot load: support.check_checkpoint_quantization."""
    found = _read(config)
    if found is not None:
        check_checkpoint_quantization(found)
    return found


def _read(config: dict[str, Any]) -> CheckpointQuantization | None:
    qc = config.get("quantization_config") or config.get("compression_config")
    if not qc:
        return None
    method = str(qc.get("quant_method", "")).lower()
    if method == "compressed-tensors":
        return _compressed_tensors(qc, _dtype_bytes(config))
    if method == "gptq":
        return _gptq(qc)
    if method == "awq":
        return _awq(qc)
    if method in ("fp8", "fbgemm_fp8"):
        return _fp8(qc, method)
    raise UnsupportedCheckpoint(f"quantization_config quant_method {method!r} is not one this runtime runs: "
                                "use a compressed-tensors (FP8, W8A8, W4A16), GPTQ, AWQ or FP8 checkpoint")


def stored_linear_bytes(out_features: int, in_features: int, scheme: StoredScheme) -> int:
    """Bytes of one quantized weight matrix as the checkpoint stores it (this GPU's share)."""
    packed = out_features * math.ceil(in_features * scheme.bits / 8)
    if scheme.block is not None:
        scales = math.ceil(out_features / scheme.block[0]) * math.ceil(in_features / scheme.block[1])
    elif scheme.group_size == 0:
        scales = 1
    else:
        scales = out_features * (1 if scheme.group_size is None else math.ceil(in_features / scheme.group_size))
    zeros = math.ceil(scales * scheme.zero_bytes)
    return packed + scales * scheme.scale_bytes + zeros + in_features * scheme.row_index_bytes + scheme.fixed_bytes


def held_linear_bytes(out_features: int, in_features: int, checkpoint: CheckpointQuantization,
                      compute_bytes: int) -> int:
    """What the GPU holds for one quantized linear: the larger of the checkpoint's bytes and the
    runtime layout it is loaded into (kvpilot's int4 keeps a compute-dtype zero point per group)."""
    stored = stored_linear_bytes(out_features, in_features, checkpoint.scheme)
    runtime = linear_bytes(out_features, in_features, QUANT_MODES[checkpoint.runtime_mode], compute_bytes)
    return max(stored, runtime)


def _module(layer: int, linear: str) -> str:
    mlp = linear.endswith(("gate_proj", "up_proj", "down_proj"))
    return f"model.layers.{layer}.{'mlp' if mlp else 'self_attn'}.{linear}"


def checkpoint_weight_bytes_by_part(facts: ModelFacts, checkpoint: CheckpointQuantization, compute_dtype: str,
                                   tp: int = 1, held: bool = True, stage: Stage | None = None,
                                   pipeline_parallel: int = 1) -> dict[str, int]:
    """Per-GPU bytes of each part of a pre-quantized checkpoint, layer by layer: quantized linears
    as the GPU holds them (held_linear_bytes; `held=False`: as the files store them), the modules it
    keeps unquantized, embeddings and norms, in the compute dtype; of one pipeline `stage` if given."""
    compute = DTYPE_BYTES[compute_dtype]
    stage = stage or whole_model(facts.num_layers)
    quantized = held_linear_bytes if held else (lambda o, i, c, _: stored_linear_bytes(o, i, c.scheme))
    parts = {"attention": 0, "mlp": 0}
    for layer in stage.layers:  # dense layers only: ModelFacts refuses pre-quantized experts
        for lin in facts.linears(layer):
            out_f, in_f = shard(lin, facts, tp)
            if checkpoint.quantizes(_module(layer, lin.name)):
                n = quantized(out_f, in_f, checkpoint, compute)
            else:
                n = out_f * in_f * compute
            n += out_f * compute if lin.bias else 0
            parts[lin.part] += n
    rows = math.ceil(facts.vocab_size / tp)  # vocab-parallel
    parts["embeddings"] = rows * facts.hidden_size * compute if stage.holds_embeddings else 0
    if not stage.holds_lm_head(facts.tie_word_embeddings, pipeline_parallel):
        parts["lm_head"] = 0
    elif checkpoint.quantizes("lm_head") and not facts.tie_word_embeddings:
        parts["lm_head"] = quantized(rows, facts.hidden_size, checkpoint, compute)
    else:
        parts["lm_head"] = rows * facts.hidden_size * compute
    parts["norms"] = stage_norm_params(facts, stage) * compute
    return parts


def weights_by_part(facts: ModelFacts, quant: str, compute: str, tp: int, stage: Stage, pp: int) -> dict[str, int]:
    """What one GPU of `stage` holds: a pre-quantized checkpoint's own bytes when it runs as stored, else
    the runtime's layout of `quant`."""
    if facts.checkpoint is not None and quant == facts.checkpoint.runtime_mode:
        return checkpoint_weight_bytes_by_part(facts, facts.checkpoint, compute, tp, stage=stage,
                                               pipeline_parallel=pp)
    return weight_bytes_by_part(facts, quant, compute, tp, stage, pp)
