"""Weight-only quantized matmul: y = x @ W^T with W stored as int8, int4 or fp8 (see quant_reference.py).

Shapes: x [..., K] (fp32/bf16/fp16) -> y [..., N] in x's dtype; the weight is a `QuantizedWeight`:
- int8: qweight int8 [N, K], scale [N] (compute dtype); dequantised in registers, the scale applied
  to the fp32 accumulator once per output.
- int4: qweight uint8 [N, ceil(K/2)] (k even = low nibble), scale/zero [N, ceil(K/128)]; the
  nibbles of a [BLOCK_N, BLOCK_K / 2] byte tile are joined back into k order (turned into fp16 with
  Marlin's bit trick: no int->float conversion); each K tile lies inside one group,
  so at M <= 16 the scale and zero apply to the tile's dot result, (x.q - zero * sum(x)) * scale
  (BLOCK_N multiplies per tile instead of BLOCK_N x BLOCK_K), above it to the weight tile.
- fp8: qweight float8_e4m3fn [N, K], scale [N] fp32, applied like int8.

One program per (BLOCK_M x BLOCK_N output tile, K split). When K is a whole number of K tiles (every
real layer), the loop has no K mask, so the weight loads are pipelined 16-byte async copies. Skinny
M (decode) has few output tiles, so K is split across programs that write fp32 partials; the last
split of each tile to finish (an atomic count) sums them in split order (deterministic), adds the
bias and writes y: one launch, no extra sum / cast / bias kernels.
Memory traffic: the weight once (N * K * bits / 8 bytes, plus scales), x once per N tile
(cheap for skinny M), y once (plus SPLIT_K fp32 partials written and read back when split).
At M <= 64 the weight read dominates: the speed-up over a bf16 matmul is bounded by the ratio of
weight bytes (2x int8/fp8, ~3.9x int4).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvpilot.kernels import _launch
from kvpilot.kernels.quant_reference import QuantizedWeight, quantized_matmul_ref

__all__ = ["quantized_matmul", "quantized_matmul_ref"]

MODES = {"int8": 0, "int4": 1, "fp8": 2}
MAX_SPLIT_K = 16


@triton.jit
def int4_to_float(q, dtype: tl.constexpr):
    """Nibbles 0..15 (uint8) -> the same values in `dtype`, exactly. For fp16 without an int->float
    conversion (Marlin's trick): OR the nibble into the mantissa of 1024 (0x6400), whose last mantissa
    bit weighs 1, then subtract 1024. bf16 (0x4300 and 128) would work the same on a GPU, but the
    interpreter cannot bitcast to bf16 (it keeps bf16 in fp32), so it could not be proved here; bf16
    takes the plain conversion (about 5% more instructions per int4 tile on sm_90, fewer on sm_80)."""
    if dtype == tl.float16:
        return (q.to(tl.int16) | 0x6400).to(tl.float16, bitcast=True) - 1024.0
    else:
        return q.to(dtype)


@triton.jit
def _qmm_kernel(
    x_ptr, w_ptr, scale_ptr, zero_ptr, bias_ptr, out_ptr, part_ptr, counter_ptr, M, N, K, k_per_split,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_sn, stride_sg, stride_zn, stride_zg,
    stride_om, stride_on,
    MODE: tl.constexpr, GROUP_SIZE: tl.constexpr, EVEN_K: tl.constexpr, SCALE_AFTER_DOT: tl.constexpr,
    HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, FP32_DOT: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = rm < M
    n_mask = rn < N
    k_begin = pid_k * k_per_split
    k_end = tl.minimum(k_begin + k_per_split, K)
    x_rows = x_ptr + rm.to(tl.int64)[:, None] * stride_xm
    w_rows = w_ptr + rn.to(tl.int64)[:, None] * stride_wn
    dot_dtype = tl.float32 if FP32_DOT else x_ptr.dtype.element_ty
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(k_begin, k_end, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        if EVEN_K:  # whole K tiles: no K mask, so the loads become pipelined 16-byte async copies
            x = tl.load(x_rows + kk[None, :] * stride_xk, mask=m_mask[:, None], other=0.0)
        else:
            x = tl.load(x_rows + kk[None, :] * stride_xk, mask=m_mask[:, None] & (kk < k_end)[None, :], other=0.0)
        if MODE == 1:  # int4: byte j holds k = 2j (low nibble) and k = 2j + 1 (high nibble)
            kb = k0 // 2 + tl.arange(0, BLOCK_K // 2)
            if EVEN_K:
                packed = tl.load(w_rows + kb[None, :] * stride_wk, mask=n_mask[:, None], other=0)
            else:
                packed = tl.load(w_rows + kb[None, :] * stride_wk, mask=n_mask[:, None] & (2 * kb < k_end)[None, :],
                                 other=0)
            q = int4_to_float(tl.reshape(tl.join(packed & 0xF, packed >> 4), (BLOCK_N, BLOCK_K)), dot_dtype)
            group = k0 // GROUP_SIZE  # a K tile lies inside one group
            scale = tl.load(scale_ptr + rn * stride_sn + group * stride_sg, mask=n_mask, other=0.0).to(tl.float32)
            zero = tl.load(zero_ptr + rn * stride_zn + group * stride_zg, mask=n_mask, other=0.0).to(tl.float32)
            if SCALE_AFTER_DOT:  # x.(q - z)s = (x.q - z sum(x)) s: BLOCK_N scales instead of BLOCK_N x BLOCK_K
                part = tl.dot(x.to(dot_dtype), tl.trans(q), input_precision="ieee" if FP32_DOT else None)
                x_sum = tl.sum(x.to(tl.float32), 1)
                acc += (part - x_sum[:, None] * zero[None, :]) * scale[None, :]
            else:
                w = ((q.to(tl.float32) - zero[:, None]) * scale[:, None]).to(dot_dtype)
                acc += tl.dot(x.to(dot_dtype), tl.trans(w), input_precision="ieee" if FP32_DOT else None)
        else:  # int8 / fp8: one scale per output channel, applied after the loop
            if EVEN_K:
                w = tl.load(w_rows + kk[None, :] * stride_wk, mask=n_mask[:, None], other=0.0)
            else:
                w = tl.load(w_rows + kk[None, :] * stride_wk, mask=n_mask[:, None] & (kk < k_end)[None, :], other=0.0)
            acc += tl.dot(x.to(dot_dtype), tl.trans(w.to(dot_dtype)), input_precision="ieee" if FP32_DOT else None)
    if MODE != 1:
        acc *= tl.load(scale_ptr + rn * stride_sn, mask=n_mask, other=0.0).to(tl.float32)[None, :]

    out_mask = m_mask[:, None] & n_mask[None, :]
    tile_offsets = rm.to(tl.int64)[:, None] * N + rn[None, :]
    if SPLIT:
        # fused split-K epilogue: every split leaves its fp32 partial; the last one to finish (an atomic
        # count per output tile, acq_rel: the others' partials are visible to it) sums them in split order
        # (deterministic), adds the bias and writes the output
        tl.store(part_ptr + pid_k * M * N + tile_offsets, acc, mask=out_mask)
        tile = pid_m * tl.num_programs(1) + pid_n
        num_splits = tl.num_programs(2)
        if tl.atomic_add(counter_ptr + tile, 1) != num_splits - 1:
            return
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for split in range(num_splits):
            acc += tl.load(part_ptr + split * M * N + tile_offsets, mask=out_mask, other=0.0, cache_modifier=".cg")
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    out = out_ptr + rm.to(tl.int64)[:, None] * stride_om + rn[None, :] * stride_on
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=out_mask)


def _row_col_strides(t: torch.Tensor) -> tuple[int, int]:
    """Strides of a per-row [N] or per-row-and-group [N, G] tensor, as (row, group)."""
    return (t.stride(0), t.stride(1)) if t.dim() == 2 else (t.stride(0), 0)


def matmul_config(m: int, device: torch.device, dtype: torch.dtype = torch.bfloat16) -> dict[str, int]:
    """Tile sizes by the shape of M: skinny M reads each weight tile once with a 16-row x tile, and applies
    int4 scales/zeros to each tile's dot result (cheap with 16 rows; at M = 1024 it spills). fp32
    activations get small tiles (no spills; correct and slow on a GPU, a checking path)."""
    after_dot = int(m <= 16)
    if not _launch.is_gpu(device):
        return {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 32, "num_warps": 4, "num_stages": 1,
                "SCALE_AFTER_DOT": after_dot}
    if dtype == torch.float32:
        return {"BLOCK_M": 16 if m <= 16 else 32, "BLOCK_N": 32, "BLOCK_K": 32, "num_warps": 4, "num_stages": 2,
                "SCALE_AFTER_DOT": after_dot}
    if m <= 16:
        return {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 128, "num_warps": 4, "num_stages": 4,
                "SCALE_AFTER_DOT": after_dot}
    if m <= 64:
        return {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 128, "num_warps": 4, "num_stages": 4, "SCALE_AFTER_DOT": 0}
    return {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "num_warps": 8, "num_stages": 3, "SCALE_AFTER_DOT": 0}


def choose_split_k(m: int, n: int, k: int, config: dict[str, int], sms: int) -> int:
    """Split K until the grid covers the device about twice, keeping >= 4 K tiles per split."""
    tiles = _launch.cdiv(m, config["BLOCK_M"]) * _launch.cdiv(n, config["BLOCK_N"])
    k_tiles = _launch.cdiv(k, config["BLOCK_K"])
    return max(1, min(_launch.cdiv(2 * sms, tiles), k_tiles // 4, MAX_SPLIT_K))


def quantized_matmul(x: torch.Tensor, weight: QuantizedWeight, bias: torch.Tensor | None = None, *,
                     split_k: int | None = None, block_k: int | None = None, block_n: int | None = None,
                     num_warps: int | None = None, num_stages: int | None = None) -> torch.Tensor:
    """y = x @ W^T (+ bias) through the Triton kernel; `split_k`, `block_k`, `block_n`, `num_warps` and
    `num_stages` override the heuristics (tests, the benchmark's sweep)."""
    what = "quantized_matmul"
    device = _launch.check_same_device(what, x=x, qweight=weight.qweight, scale=weight.scale)
    _launch.check_runnable(_qmm_kernel, device, what)
    if x.dtype not in _launch.ATTENTION_DTYPES:
        raise ValueError(f"{what}: x dtype {x.dtype} is not one of {_launch.ATTENTION_DTYPES}")
    if weight.mode == "fp8":
        _launch.check_fp8(what, device)
    k, n = weight.in_features, weight.out_features
    if x.shape[-1] != k:
        raise ValueError(f"{what}: x has {x.shape[-1]} input features, the weight {k}")
    if bias is not None and (bias.shape != (n,) or bias.device != device):
        raise ValueError(f"{what}: bias must be [{n}] on {device}, got {tuple(bias.shape)} on {bias.device}")
    if bias is not None:
        bias = bias.contiguous()
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    out_shape = (*x.shape[:-1], n)
    if m == 0:
        return x.new_empty(out_shape)

    config = dict(matmul_config(m, device, x.dtype))
    overrides = {"BLOCK_K": block_k, "BLOCK_N": block_n, "num_warps": num_warps, "num_stages": num_stages}
    config.update({key: value for key, value in overrides.items() if value is not None})
    bk = config["BLOCK_K"]
    if weight.mode == "int4" and (bk < 32 or weight.group_size % bk):
        raise ValueError(f"{what}: int4 K tile {bk} must be >= 32 and divide the group size {weight.group_size}")
    for name, size in (("K tile", bk), ("N tile", config["BLOCK_N"])):
        if size < 16 or size & (size - 1):
            raise ValueError(f"{what}: {name} {size} must be a power of two >= 16 (tl.dot)")
    if split_k is None:
        split_k = choose_split_k(m, n, k, config, _launch.num_sms(device))
    if not 1 <= split_k <= MAX_SPLIT_K:
        raise ValueError(f"{what}: split_k {split_k} is not in 1..{MAX_SPLIT_K}")
    k_per_split = _launch.cdiv(_launch.cdiv(k, split_k), bk) * bk  # whole K tiles, so int4 tiles stay in a group
    split_k = _launch.cdiv(k, k_per_split)  # no split left without a K tile (it would count, not add)
    grid_size = (_launch.cdiv(m, config["BLOCK_M"]), _launch.cdiv(n, config["BLOCK_N"]))

    out = torch.empty(m, n, dtype=x.dtype, device=device)
    if split_k > 1:
        partials = torch.empty(split_k, m, n, dtype=torch.float32, device=device)
        counters = torch.zeros(grid_size[0] * grid_size[1], dtype=torch.int32, device=device)
    else:
        partials = counters = out  # unused
    zero = weight.zero if weight.zero is not None else weight.scale  # int8/fp8 never read it
    _qmm_kernel[(*grid_size, split_k)](
        x2, weight.qweight, weight.scale, zero, bias if bias is not None else out, out, partials, counters,
        m, n, k, k_per_split,
        x2.stride(0), x2.stride(1), *weight.qweight.stride(), *_row_col_strides(weight.scale),
        *_row_col_strides(zero), out.stride(0), out.stride(1),
        MODE=MODES[weight.mode], GROUP_SIZE=weight.group_size or 1, EVEN_K=k % bk == 0,
        SCALE_AFTER_DOT=config["SCALE_AFTER_DOT"], HAS_BIAS=bias is not None, SPLIT=split_k > 1,
        BLOCK_M=config["BLOCK_M"], BLOCK_N=config["BLOCK_N"], BLOCK_K=bk,
        FP32_DOT=_launch.fp32_dot(x.dtype, device), num_warps=config["num_warps"], num_stages=config["num_stages"],
    )
    return out.view(out_shape)
