"""Weight-only quantized linear weights: the packed layout, pure-torch quantizers and the reference matmul.

Layouts (the ones `kvpilot.runtime.memory.quantization` documents and counts), for a weight W [N, K]
(N = out_features, K = in_features) used as y = x @ W^T:
- int8: qweight int8 [N, K]; scale [N] in the compute dtype; W ~= qweight * scale[:, None].
- int4: qweight uint8 [N, ceil(K / 2)], two values per byte along K: k even in the low nibble,
        k odd in the high nibble, each 0..15; scale and zero [N, ceil(K / 128)] in the compute
        dtype, one pair per group of 128 input columns; W ~= (q - zero) * scale (asymmetric).
- fp8:  qweight float8_e4m3fn [N, K]; scale [N] float32; W ~= qweight * scale[:, None].
Everything here is pure torch (no triton import) and runs on any device.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

QuantModeName = Literal["int8", "int4", "fp8"]
INT4_GROUP_SIZE = 128  # the same as kvpilot.runtime.memory.quantization.INT4_GROUP_SIZE (a test holds them equal)
FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
COMPUTE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_QWEIGHT_DTYPE = {"int8": torch.int8, "int4": torch.uint8, "fp8": FP8}
_TINY = 1e-8  # a row or group of zeros still gets a positive scale


@dataclass(frozen=True, eq=False)
class QuantizedWeight:
    """One linear layer's weight [out_features, in_features] in a weight-only quantized layout."""

    mode: QuantModeName
    qweight: torch.Tensor
    scale: torch.Tensor
    in_features: int
    zero: torch.Tensor | None = None
    group_size: int | None = None  # int4 only

    def __post_init__(self) -> None:
        if self.mode not in _QWEIGHT_DTYPE:
            raise ValueError(f"quantization mode {self.mode!r} is not one of {sorted(_QWEIGHT_DTYPE)}")
        want = _QWEIGHT_DTYPE[self.mode]
        if self.qweight.dtype != want or self.qweight.dim() != 2:
            raise ValueError(f"{self.mode} qweight must be a 2-D {want} tensor, got {self.qweight.dtype} "
                             f"{tuple(self.qweight.shape)}")
        n = self.qweight.shape[0]
        packed_k = -(-self.in_features // 2) if self.mode == "int4" else self.in_features
        if self.in_features < 1 or self.qweight.shape[1] != packed_k:
            raise ValueError(f"{self.mode} qweight has {self.qweight.shape[1]} columns; in_features="
                             f"{self.in_features} needs {packed_k}")
        if self.mode == "int4":
            if self.group_size is None or self.group_size < 2 or self.group_size % 2:
                raise ValueError(f"int4 group_size must be an even number >= 2, got {self.group_size}")
            groups = -(-self.in_features // self.group_size)
            for name, t in (("scale", self.scale), ("zero", self.zero)):
                if t is None or t.shape != (n, groups) or t.dtype not in COMPUTE_DTYPES:
                    got = None if t is None else (t.dtype, tuple(t.shape))
                    raise ValueError(f"int4 {name} must be [{n}, {groups}] in a compute dtype, got {got}")
            if self.zero.dtype != self.scale.dtype:
                raise ValueError(f"int4 zero dtype {self.zero.dtype} differs from scale dtype {self.scale.dtype}")
            return
        if self.zero is not None or self.group_size is not None:
            raise ValueError(f"{self.mode} has one scale per output channel: no zero, no group_size")
        want_scale = (torch.float32,) if self.mode == "fp8" else COMPUTE_DTYPES
        if self.scale.shape != (n,) or self.scale.dtype not in want_scale:
            raise ValueError(f"{self.mode} scale must be [{n}] in {want_scale}, got {self.scale.dtype} "
                             f"{tuple(self.scale.shape)}")

    @property
    def out_features(self) -> int:
        return self.qweight.shape[0]

    @property
    def nbytes(self) -> int:
        """Bytes stored, scales and zero points included (what the memory model counts)."""
        parts = (self.qweight, self.scale, self.zero)
        return sum(t.numel() * t.element_size() for t in parts if t is not None)

    def to(self, device: torch.device | str) -> QuantizedWeight:
        zero = None if self.zero is None else self.zero.to(device)
        return QuantizedWeight(self.mode, self.qweight.to(device), self.scale.to(device), self.in_features, zero,
                               self.group_size)


def _check_weight(weight: torch.Tensor) -> None:
    if weight.dim() != 2 or not weight.is_floating_point():
        raise ValueError(f"weight must be a 2-D float tensor [out, in], got {weight.dtype} {tuple(weight.shape)}")


def quantize_int8(weight: torch.Tensor, compute_dtype: torch.dtype | None = None) -> QuantizedWeight:
    """Symmetric per-output-channel int8: scale = max|row| / 127, kept in the compute dtype."""
    _check_weight(weight)
    w = weight.float()
    scale = (w.abs().amax(dim=1) / 127.0).clamp(min=_TINY).to(compute_dtype or weight.dtype)
    q = torch.round(w / scale.float().unsqueeze(1)).clamp(-127, 127).to(torch.int8)
    return QuantizedWeight("int8", q, scale, weight.shape[1])


def quantize_int4(weight: torch.Tensor, group_size: int = INT4_GROUP_SIZE,
                  compute_dtype: torch.dtype | None = None) -> QuantizedWeight:
    """Asymmetric int4 per group of `group_size` input columns: q = round(w / scale) + zero in 0..15."""
    _check_weight(weight)
    if group_size < 2 or group_size % 2:
        raise ValueError(f"int4 group_size must be an even number >= 2, got {group_size}")
    n, k = weight.shape
    groups = -(-k // group_size)
    w = weight.float()
    padded = torch.nn.functional.pad(w, (0, groups * group_size - k)).view(n, groups, group_size)
    # the padding zeros take part in min/max; that only widens the last group's range to include 0
    lo, hi = padded.amin(dim=2).clamp(max=0.0), padded.amax(dim=2).clamp(min=0.0)
    dtype = compute_dtype or weight.dtype
    scale = ((hi - lo) / 15.0).clamp(min=_TINY).to(dtype)
    zero = torch.round(-lo / scale.float()).clamp(0, 15).to(dtype)
    q = torch.round(padded / scale.float().unsqueeze(2)) + zero.float().unsqueeze(2)
    q = q.clamp(0, 15).to(torch.uint8).view(n, groups * group_size)[:, : k + k % 2]
    packed = q[:, 0::2] | (q[:, 1::2] << 4)
    return QuantizedWeight("int4", packed.contiguous(), scale, k, zero, group_size)


def quantize_fp8(weight: torch.Tensor) -> QuantizedWeight:
    """float8_e4m3fn with one fp32 scale per output channel: scale = max|row| / 448."""
    _check_weight(weight)
    w = weight.float()
    scale = (w.abs().amax(dim=1) / FP8_MAX).clamp(min=_TINY)
    q = (w / scale.unsqueeze(1)).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return QuantizedWeight("fp8", q, scale, weight.shape[1])


def unpack_int4(packed: torch.Tensor, in_features: int) -> torch.Tensor:
    """uint8 [N, ceil(K/2)] -> uint8 [N, K] of values 0..15."""
    both = torch.stack((packed & 0xF, packed >> 4), dim=2)
    return both.view(packed.shape[0], -1)[:, :in_features]


def dequantize(weight: QuantizedWeight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The [out_features, in_features] weight the quantized layout stands for, computed in fp32."""
    if weight.mode == "int4":
        q = unpack_int4(weight.qweight, weight.in_features).float()
        scale = weight.scale.float().repeat_interleave(weight.group_size, dim=1)[:, : weight.in_features]
        zero = weight.zero.float().repeat_interleave(weight.group_size, dim=1)[:, : weight.in_features]
        w = (q - zero) * scale
    else:
        w = weight.qweight.float() * weight.scale.float().unsqueeze(1)
    return w.to(dtype)


def quantized_matmul_ref(x: torch.Tensor, weight: QuantizedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ W^T (+ bias), x [..., K] -> [..., N] in x's dtype; the product is taken in fp32."""
    if x.shape[-1] != weight.in_features:
        raise ValueError(f"x has {x.shape[-1]} input features, the weight {weight.in_features}")
    y = x.float() @ dequantize(weight).t()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)
