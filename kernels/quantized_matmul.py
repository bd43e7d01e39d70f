"""Weight-only quantized matmul: y = x @ W^T with W stored as int8, int4 or fp8 (see quant_reference.py).

Shapes: x [..., K] (fp32/bf16/fp16) -> y [..., N] in x's dtype; the weight is a `QuantizedWeight`:
- int8: qweight int8 [N, K], scale [N] (compute dtype); dequantised in registers, the scale applied
  to the fp32 accumulator once per output.
- int4: qweight uint8 [N, ceil(K/2)] (k even = low nibble), scale/zero [N, ceil(K/128)]; the
  nibbles of a [BLOCK_N, BLOCK_K / 2] byte tile are joined back into k order, and each K tile lies
  inside one group, so it is dequantised as (q - zero) * scale with one scale and zero per row.
- fp8: qweight float8_e4m3fn [N, K], scale [N] fp32, applied like int8.

One program per (BLOCK_M x BLOCK_N output tile, K split). Skinny M (decode) has few output tiles,
so K is split across programs that write fp32 partials, summed afterwards (deterministic, no atomics).
Memory traffic: the weight once (N * K * bits / 8 bytes, plus scales), x once per N tile
(cheap for skinny M), y once (or SPLIT_K fp32 partials). At M <= 64 the weight read dominates: the
speed-up over a bf16 matmul is bounded by the ratio of weight bytes (2x int8/fp8, ~3.9x int4).
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
def _qmm_kernel(
    x_ptr, w_ptr, scale_ptr, zero_ptr, out_ptr, M, N, K, k_per_split,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_sn, stride_sg, stride_zn, stride_zg,
    stride_os, stride_om, stride_on,
    MODE: tl.constexpr, GROUP_SIZE: tl.constexpr,
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
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(k_begin, k_end, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        k_mask = kk < k_end
        x = tl.load(x_rows + kk[None, :] * stride_xk, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        if MODE == 1:  # int4: byte j holds k = 2j (low nibble) and k = 2j + 1 (high nibble)
            kb = k0 // 2 + tl.arange(0, BLOCK_K // 2)
            packed = tl.load(w_rows + kb[None, :] * stride_wk, mask=n_mask[:, None] & (2 * kb < k_end)[None, :],
                             other=0)
            q = tl.reshape(tl.join(packed & 0xF, packed >> 4), (BLOCK_N, BLOCK_K))  # back in k order
            group = k0 // GROUP_SIZE
            scale = tl.load(scale_ptr + rn * stride_sn + group * stride_sg, mask=n_mask, other=0.0).to(tl.float32)
            zero = tl.load(zero_ptr + rn * stride_zn + group * stride_zg, mask=n_mask, other=0.0).to(tl.float32)
            w = (q.to(tl.float32) - zero[:, None]) * scale[:, None]
        else:  # int8 / fp8: one scale per output channel, applied after the loop
            w = tl.load(w_rows + kk[None, :] * stride_wk, mask=n_mask[:, None] & k_mask[None, :], other=0.0)
        if FP32_DOT:
            acc += tl.dot(x.to(tl.float32), tl.trans(w.to(tl.float32)), input_precision="ieee")
        else:
            acc += tl.dot(x, tl.trans(w.to(x.dtype)))
    if MODE != 1:
        acc *= tl.load(scale_ptr + rn * stride_sn, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    out = out_ptr + pid_k * stride_os + rm.to(tl.int64)[:, None] * stride_om + rn[None, :] * stride_on
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


def _row_col_strides(t: torch.Tensor) -> tuple[int, int]:
    """Strides of a per-row [N] or per-row-and-group [N, G] tensor, as (row, group)."""
    return (t.stride(0), t.stride(1)) if t.dim() == 2 else (t.stride(0), 0)


def matmul_config(m: int, device: torch.device) -> dict[str, int]:
    """Tile sizes by the shape of M: skinny M reads each weight tile once with a 16-row x tile."""
    if device.type != "cuda":
        return {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 32, "num_warps": 4, "num_stages": 1}
    if m <= 16:
        return {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 128, "num_warps": 4, "num_stages": 4}
    if m <= 64:
        return {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 128, "num_warps": 4, "num_stages": 4}
    return {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "num_warps": 8, "num_stages": 3}


def choose_split_k(m: int, n: int, k: int, config: dict[str, int], sms: int) -> int:
    """Split K until the grid covers the device about twice, keeping >= 4 K tiles per split."""
    tiles = _launch.cdiv(m, config["BLOCK_M"]) * _launch.cdiv(n, config["BLOCK_N"])
    k_tiles = _launch.cdiv(k, config["BLOCK_K"])
    return max(1, min(_launch.cdiv(2 * sms, tiles), k_tiles // 4, MAX_SPLIT_K))


def quantized_matmul(x: torch.Tensor, weight: QuantizedWeight, bias: torch.Tensor | None = None, *,
                     split_k: int | None = None, block_k: int | None = None) -> torch.Tensor:
    """y = x @ W^T (+ bias) through the Triton kernel; `split_k` / `block_k` override the heuristics."""
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
    if bias is not None and bias.shape != (n,):
        raise ValueError(f"{what}: bias must be [{n}], got {tuple(bias.shape)}")
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    out_shape = (*x.shape[:-1], n)
    if m == 0:
        return x.new_empty(out_shape)

    config = dict(matmul_config(m, device))
    if block_k is not None:
        config["BLOCK_K"] = block_k
    bk = config["BLOCK_K"]
    if weight.mode == "int4" and (bk < 32 or weight.group_size % bk):
        raise ValueError(f"{what}: int4 K tile {bk} must be >= 32 and divide the group size {weight.group_size}")
    if bk < 16 or bk & (bk - 1):
        raise ValueError(f"{what}: K tile {bk} must be a power of two >= 16 (tl.dot)")
    if split_k is None:
        split_k = choose_split_k(m, n, k, config, _launch.num_sms(device))
    if not 1 <= split_k <= MAX_SPLIT_K:
        raise ValueError(f"{what}: split_k {split_k} is not in 1..{MAX_SPLIT_K}")
    k_per_split = _launch.cdiv(_launch.cdiv(k, split_k), bk) * bk  # whole K tiles, so int4 tiles stay in a group

    if split_k > 1:
        out = torch.empty(split_k, m, n, dtype=torch.float32, device=device)
    else:
        out = torch.empty(1, m, n, dtype=x.dtype, device=device)
    zero = weight.zero if weight.zero is not None else weight.scale  # int8/fp8 never read it
    grid = (_launch.cdiv(m, config["BLOCK_M"]), _launch.cdiv(n, config["BLOCK_N"]), split_k)
    _qmm_kernel[grid](
        x2, weight.qweight, weight.scale, zero, out, m, n, k, k_per_split,
        x2.stride(0), x2.stride(1), *weight.qweight.stride(), *_row_col_strides(weight.scale),
        *_row_col_strides(zero), *out.stride(),
        MODE=MODES[weight.mode], GROUP_SIZE=weight.group_size or 1,
        BLOCK_M=config["BLOCK_M"], BLOCK_N=config["BLOCK_N"], BLOCK_K=bk,
        FP32_DOT=_launch.fp32_dot(x.dtype, device), num_warps=config["num_warps"], num_stages=config["num_stages"],
    )
    y = out.sum(0).to(x.dtype) if split_k > 1 else out[0]
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y.view(out_shape)
