"""Pre-quantized checkpoints into the runtime's quantized layouts, exactly (no re-quantization).

GPTQ / AWQ / compressed-tensors pack-quantized int4 -> the int4 layout (uint8 two per byte, low
nibble first; scale and zero point per group in the compute dtype; W = (q - zero) * scale);
compressed-tensors / fp8 / fbgemm_fp8 FP8 -> the fp8 layout (fp32 scale per output channel);
compressed-tensors W8A8 int8 -> the int8 layout. The formats' layouts are described in
kvpilot.runtime.memory.checkpoint (the memory model counts the same tensors).

How it hooks into loading (runtime/loading/loader.py, runtime/models/quantized.py): the weights
stream yields, for each quantized projection, a placeholder float tensor under `<module>.weight`
(so the model's fusing, sharding and bookkeeping run unchanged) and this module's `Prequantized`
hands `replace_with_quantized` the exact QuantizedWeight of each fused projection instead of
quantizing the placeholder.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from kvpilot.kernels.quant_reference import FP8, QuantizedWeight
from kvpilot.runtime.memory.checkpoint import CheckpointQuantization
from kvpilot.runtime.memory.support import UnsupportedOption

# The tensors each format stores for one quantized linear (the suffix after `<module>.`).
_PARTS = {"gptq": ("qweight", "qzeros", "scales", "g_idx"), "awq": ("qweight", "qzeros", "scales"),
          "pack": ("weight_packed", "weight_scale", "weight_shape", "weight_zero_point"),
          "dense": ("weight", "weight_scale", "input_scale")}
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
FUSED = {"q_proj": ("qkv_proj", 3), "k_proj": ("qkv_proj", 3), "v_proj": ("qkv_proj", 3),
         "gate_proj": ("gate_up_proj", 2), "up_proj": ("gate_up_proj", 2)}
ORDER = {"q_proj": 0, "k_proj": 1, "v_proj": 2, "gate_proj": 0, "up_proj": 1}


def _kind(checkpoint: CheckpointQuantization) -> str:
    if checkpoint.method in ("gptq", "awq"):
        return checkpoint.method
    return "pack" if checkpoint.scheme.bits == 4 else "dense"


def _unpack_int32(packed: torch.Tensor, dim: int, order: tuple[int, ...] = tuple(range(8))) -> torch.Tensor:
    """int32 words of eight 4-bit values -> int16 values 0..15, unpacked along `dim` (0: rows, 1: cols)."""
    words = packed.to(torch.int64) & 0xFFFFFFFF
    nibbles = torch.stack([(words >> (4 * j)) & 0xF for j in range(8)], dim=-1)  # [..., 8] by bit position
    values = torch.empty_like(nibbles)
    values[..., list(order)] = nibbles  # value of position order[j] sits at bits 4j
    if dim == 1:
        return values.reshape(packed.shape[0], -1).to(torch.int16)
    return values.permute(0, 2, 1).reshape(-1, packed.shape[1]).to(torch.int16)


def _pack_uint4(q: torch.Tensor) -> torch.Tensor:
    """[N, K] values 0..15 -> uint8 [N, ceil(K/2)], even k in the low nibble."""
    q = torch.nn.functional.pad(q, (0, q.shape[1] % 2)).to(torch.uint8)
    return (q[:, 0::2] | (q[:, 1::2] << 4)).contiguous()


def _group_size(checkpoint: CheckpointQuantization, in_features: int) -> int:
    return checkpoint.scheme.group_size or in_features


def to_runtime(checkpoint: CheckpointQuantization, parts: dict[str, torch.Tensor], out_features: int,
               in_features: int, compute_dtype: torch.dtype) -> QuantizedWeight:
    """One linear's stored tensors -> the runtime layout holding the same weight."""
    kind = _kind(checkpoint)
    if kind in ("gptq", "awq"):
        group = _group_size(checkpoint, in_features)
        if kind == "gptq":
            q = _unpack_int32(parts["qweight"], dim=0).T  # [in, out] -> [out, in]
            zero = _unpack_int32(parts["qzeros"], dim=1) + 1  # AutoGPTQ stores zero - 1
            g_idx = parts.get("g_idx")
            if g_idx is not None and not torch.equal(g_idx.long(), torch.arange(in_features) // group):
                raise UnsupportedOption("GPTQ g_idx is not in column order (act-order): not supported")
        else:
            q = _unpack_int32(parts["qweight"], dim=1, order=AWQ_ORDER).T
            zero = _unpack_int32(parts["qzeros"], dim=1, order=AWQ_ORDER)
        scale = parts["scales"].T.to(compute_dtype)
        return QuantizedWeight("int4", _pack_uint4(q), scale.contiguous(), in_features,
                               zero.T.to(compute_dtype).contiguous(), group)
    if kind == "pack":
        q = _unpack_int32(parts["weight_packed"], dim=1)[:, :in_features]
        scale = parts["weight_scale"].to(compute_dtype)
        if "weight_zero_point" in parts:  # asymmetric: zero points packed like the weights, [out/8, groups]
            zero = _unpack_int32(parts["weight_zero_point"], dim=0)[:out_features].to(compute_dtype) + 8
        else:
            zero = torch.full_like(scale, 8)  # stored q + 8
        return QuantizedWeight("int4", _pack_uint4(q), scale.contiguous(), in_features, zero.contiguous(),
                               _group_size(checkpoint, in_features))
    weight, scale = parts["weight"], parts["weight_scale"].float().reshape(-1)
    scale = scale.expand(out_features) if scale.numel() == 1 else scale
    if weight.dtype == FP8:
        return QuantizedWeight("fp8", weight, scale.contiguous(), in_features)
    if weight.dtype == torch.int8:
        return QuantizedWeight("int8", weight, scale.to(compute_dtype).contiguous(), in_features)
    raise UnsupportedOption(f"a quantized weight stored as {weight.dtype} is not supported")


def _concat(weights: list[QuantizedWeight]) -> QuantizedWeight:
    """Fuse projections along the output rows (q/k/v, gate/up), as the model fuses its matrices."""
    first = weights[0]
    zero = None if first.zero is None else torch.cat([w.zero for w in weights])
    return QuantizedWeight(first.mode, torch.cat([w.qweight for w in weights]), torch.cat([w.scale for w in weights]),
                           first.in_features, zero, first.group_size)


class Prequantized:
    """The `quantize` callable of the model's loading: hands each fused projection its exact weight."""

    def __init__(self, checkpoint: CheckpointQuantization, compute_dtype: torch.dtype, facts) -> None:
        self.checkpoint, self.compute_dtype, self.facts = checkpoint, compute_dtype, facts
        self.model = None  # bound by the loader once the model exists
        self._parts: dict[str, dict[str, torch.Tensor]] = {}

    def bind(self, model) -> None:
        """The model being loaded: its facts, its tensor-parallel rank and how it cuts a weight."""
        self.model = model

    def claims(self, name: str) -> bool:
        """Whether `name` is one of the stored tensors of a linear this checkpoint quantized."""
        module, _, suffix = name.rpartition(".")
        projection = module.rpartition(".")[2]
        return (suffix in _PARTS[_kind(self.checkpoint)] and projection in (*FUSED, "o_proj", "down_proj")
                and self.checkpoint.quantizes(module))

    def weights(self, files, dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
        """The checkpoint's tensors for the model: float ones in `dtype`; the quantized linears'
        tensors kept (as stored) for `for_weight`, then one float placeholder `<module>.weight` each,
        which drives the model's fusing, sharding and bookkeeping."""
        from safetensors import safe_open

        for file in files:
            with safe_open(file, framework="pt") as f:
                for name in f.keys():  # noqa: SIM118 - safe_open is not a dict
                    if self.claims(name):
                        module, _, suffix = name.rpartition(".")
                        self._parts.setdefault(module, {})[suffix] = f.get_tensor(name)
                    else:
                        yield name, f.get_tensor(name).to(dtype)
        for module in list(self._parts):
            out_f, in_f = self._shape(module)
            yield f"{module}.weight", torch.empty((out_f, in_f), dtype=dtype)

    def for_weight(self, weight_name: str, weight: torch.Tensor) -> QuantizedWeight | None:
        """The runtime weight of the fused projection `weight_name` (this rank's share)."""
        module = weight_name.removesuffix(".weight")
        prefix, _, fused = module.rpartition(".")
        sources = [n for n, (f, _) in FUSED.items() if f == fused] or [fused]
        names = [f"{prefix}.{source}" for source in sorted(sources, key=lambda s: ORDER.get(s, 0))]
        if not any(n in self._parts for n in names):
            return None  # kept unquantized by the checkpoint: the float weight stays
        if not all(n in self._parts for n in names):
            raise UnsupportedOption(f"{module}: the checkpoint quantizes only some of {', '.join(names)}")
        shares = []
        for name in names:
            out_f, in_f = self._shape(name)
            full = to_runtime(self.checkpoint, self._parts.pop(name), out_f, in_f, self.compute_dtype)
            shares.append(self._local(name, full))
        return _concat(shares).to(weight.device)

    def _shape(self, module: str) -> tuple[int, int]:
        layer = int(module.split(".")[2])  # model.layers.N.<block>.<linear>
        lin = next(lin for lin in self.facts.linears(layer) if lin.name == module.split(".")[-1])
        return lin.out_features, lin.in_features

    def _local(self, module: str, weight: QuantizedWeight) -> QuantizedWeight:
        """This rank's share, cut from each tensor of the layout as the model cuts a float weight."""
        if self.model.parallel.size == 1:
            return weight
        parts, size = [*module.split("."), "weight"], self.model.parallel.size
        qweight, scale, zero, in_features = weight.qweight, weight.scale, weight.zero, weight.in_features
        row_split = parts[-2] in ("o_proj", "down_proj")  # split along the input features
        if row_split and weight.mode == "int4" and weight.scale.shape[1] % size:
            raise UnsupportedOption(f"{module}: {weight.scale.shape[1]} int4 groups do not split over {size} GPUs")
        qweight = self.model._local_share(parts, qweight)
        if not row_split or weight.mode == "int4":  # per-row scales follow the rows; int4's groups the columns
            scale = self.model._local_share(parts, scale)
            zero = None if zero is None else self.model._local_share(parts, zero)
        if row_split:
            in_features //= size
        return QuantizedWeight(weight.mode, qweight.contiguous(), scale.contiguous(), in_features,
                               None if zero is None else zero.contiguous(), weight.group_size)


def checkpoint_quantization(facts, asked: str | None) -> str:
    """The runtime mode a pre-quantized checkpoint loads as; another mode asked for is refused."""
    mode = facts.checkpoint.runtime_mode
    if asked not in (None, "auto", mode):
        raise UnsupportedOption(f"{facts.name} is a pre-quantized {facts.checkpoint.label} checkpoint: it loads as "
                                f"{mode} weights, not {asked}")
    return mode
