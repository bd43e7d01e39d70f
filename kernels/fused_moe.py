"""Fused mixture-of-experts MLP: out[t] = sum_j w[t, j] * expert_{ids[t, j]}(x[t]) for every token.

Shapes (kernels/moe_reference.py): x [T, H], w13 [E, 2I, H] (gate rows, then up rows), w2 [E, H, I],
topk_weights / topk_ids [T, k]; out [T, H] in x's dtype. The experts may be int8 or fp8 with one scale
per output channel (w13_scale [E, 2I], w2_scale [E, H]: kvpilot.kernels.quant_reference's layout,
stacked), applied to the fp32 accumulators.

The T x k routed copies are grouped by expert and padded to blocks of BLOCK_M rows of one expert
(`align_by_expert`, on the device). Two grouped GEMMs follow, one program per (block, N tile):
1. gate/up: the block's tokens (gathered from x by their ids) times the expert's gate and up rows,
   silu(gate) * up in the epilogue (fp32), written to the copy's row of the [T x k, I] intermediate;
2. down: those rows times the expert's w2, scaled by the copy's routing weight in fp32, written to
   the copy's row of a [T x k, H] buffer that is summed over k at the end (the weighted sum back).
Memory traffic: each expert's weights once per block of its tokens (once in all at decode sizes),
x read once per copy and N tile, the intermediate written and read once: T x k x (I + H) elements
besides x and out (what the memory model's top-k activation copies cover).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvpilot.kernels import _launch
from kvpilot.kernels.moe_reference import align_by_expert, fused_moe_ref

__all__ = ["fused_moe", "fused_moe_ref"]


@triton.jit
def _expert_block(sorted_ids_ptr, expert_ids_ptr, pid_m, pid_n, num_copies, N,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Block `pid_m`'s copy ids, which of them are copies (not padding), its expert; tile `pid_n`'s columns."""
    ids = tl.load(sorted_ids_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    return ids, ids < num_copies, tl.load(expert_ids_ptr + pid_m).to(tl.int64), rn, rn < N


@triton.jit
def _moe_gate_up_kernel(
    x_ptr, w_ptr, scale_ptr, out_ptr, sorted_ids_ptr, expert_ids_ptr, num_padded_ptr, num_copies, K, N,
    stride_xm, stride_xk, stride_we, stride_wn, stride_wk, stride_se, stride_sn, stride_om, stride_on,
    TOP_K: tl.constexpr, SCALED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, FP32_DOT: tl.constexpr,
):
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    if pid_m * BLOCK_M >= tl.load(num_padded_ptr):
        return
    ids, valid, expert, rn, n_mask = _expert_block(sorted_ids_ptr, expert_ids_ptr, pid_m, pid_n, num_copies, N,
                                                   BLOCK_M, BLOCK_N)
    tokens = (ids // TOP_K).to(tl.int64)
    x_rows = x_ptr + tokens[:, None] * stride_xm
    gate_rows = w_ptr + expert * stride_we + rn.to(tl.int64)[:, None] * stride_wn
    up_rows = gate_rows + N * stride_wn
    dot_dtype = tl.float32 if FP32_DOT else x_ptr.dtype.element_ty
    gate = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    up = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        k_mask = kk < K
        x = tl.load(x_rows + kk[None, :] * stride_xk, mask=valid[:, None] & k_mask[None, :], other=0.0).to(dot_dtype)
        w_mask = n_mask[:, None] & k_mask[None, :]
        w_gate = tl.load(gate_rows + kk[None, :] * stride_wk, mask=w_mask, other=0.0).to(dot_dtype)
        w_up = tl.load(up_rows + kk[None, :] * stride_wk, mask=w_mask, other=0.0).to(dot_dtype)
        gate += tl.dot(x, tl.trans(w_gate), input_precision="ieee" if FP32_DOT else None)
        up += tl.dot(x, tl.trans(w_up), input_precision="ieee" if FP32_DOT else None)
    if SCALED:  # int8 / fp8 experts: one scale per output channel
        scales = scale_ptr + expert * stride_se + rn * stride_sn
        gate *= tl.load(scales, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        up *= tl.load(scales + N * stride_sn, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    h = gate * tl.sigmoid(gate) * up  # silu(gate) * up
    out = out_ptr + ids.to(tl.int64)[:, None] * stride_om + rn[None, :] * stride_on
    tl.store(out, h.to(out_ptr.dtype.element_ty), mask=valid[:, None] & n_mask[None, :])


@triton.jit
def _moe_down_kernel(
    h_ptr, w_ptr, scale_ptr, out_ptr, weights_ptr, sorted_ids_ptr, expert_ids_ptr, num_padded_ptr, num_copies, K, N,
    stride_hm, stride_hk, stride_we, stride_wn, stride_wk, stride_se, stride_sn, stride_om, stride_on,
    SCALED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    FP32_DOT: tl.constexpr,
):
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    if pid_m * BLOCK_M >= tl.load(num_padded_ptr):
        return
    ids, valid, expert, rn, n_mask = _expert_block(sorted_ids_ptr, expert_ids_ptr, pid_m, pid_n, num_copies, N,
                                                   BLOCK_M, BLOCK_N)
    rows = ids.to(tl.int64)
    h_rows = h_ptr + rows[:, None] * stride_hm
    w_rows = w_ptr + expert * stride_we + rn.to(tl.int64)[:, None] * stride_wn
    dot_dtype = tl.float32 if FP32_DOT else h_ptr.dtype.element_ty
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        k_mask = kk < K
        h = tl.load(h_rows + kk[None, :] * stride_hk, mask=valid[:, None] & k_mask[None, :], other=0.0).to(dot_dtype)
        w = tl.load(w_rows + kk[None, :] * stride_wk, mask=n_mask[:, None] & k_mask[None, :], other=0.0).to(dot_dtype)
        acc += tl.dot(h, tl.trans(w), input_precision="ieee" if FP32_DOT else None)
    if SCALED:
        acc *= tl.load(scale_ptr + expert * stride_se + rn * stride_sn, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    acc *= tl.load(weights_ptr + rows, mask=valid, other=0.0).to(tl.float32)[:, None]
    out = out_ptr + rows[:, None] * stride_om + rn[None, :] * stride_on
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=valid[:, None] & n_mask[None, :])


def moe_config(copies: int, device: torch.device, dtype: torch.dtype) -> dict[str, int]:
    """Tiles by the number of routed copies: few copies (decode) take 16-row blocks, so an expert's
    padding wastes little; fp32 takes small tiles (a checking path). All powers of two >= 16."""
    if not _launch.is_gpu(device):
        return {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 32, "num_warps": 4, "num_stages": 1}
    if dtype == torch.float32:
        return {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32, "num_warps": 4, "num_stages": 2}
    if copies <= 256:
        return {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 128, "num_warps": 4, "num_stages": 3}
    return {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64, "num_warps": 4, "num_stages": 3}


def _check_weight_dtypes(what: str, x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
                         w13_scale: torch.Tensor | None, w2_scale: torch.Tensor | None) -> bool:
    """Whether the experts are int8 / fp8 with per-channel scales (else they share x's dtype)."""
    if x.dtype not in _launch.ATTENTION_DTYPES:
        raise ValueError(f"{what}: x dtype {x.dtype} is not one of {_launch.ATTENTION_DTYPES}")
    if w13.dtype not in (torch.int8, _launch.FP8):
        if w13.dtype != x.dtype or w2.dtype != x.dtype or w13_scale is not None or w2_scale is not None:
            raise ValueError(f"{what}: unscaled w13 and w2 must be x's dtype {x.dtype}, got {w13.dtype}, {w2.dtype}")
        return False
    if w2.dtype != w13.dtype or w13_scale is None or w2_scale is None:
        raise ValueError(f"{what}: {w13.dtype} experts need w2 of the same dtype and both scales")
    if w13.dim() != 3 or w2.dim() != 3 or w13_scale.shape != w13.shape[:2] or w2_scale.shape != w2.shape[:2]:
        raise ValueError(f"{what}: scales must be one per output channel, w13_scale {tuple(w13.shape[:2])} and "
                         f"w2_scale {tuple(w2.shape[:2])}, got {tuple(w13_scale.shape)} and {tuple(w2_scale.shape)}")
    if w13.dtype == _launch.FP8:
        _launch.check_fp8(what, x.device)
    return True


def _scale_strides(scale: torch.Tensor) -> tuple[int, int]:
    return (scale.stride(0), scale.stride(1)) if scale.dim() == 2 else (0, scale.stride(0))


def fused_moe(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
              topk_ids: torch.Tensor, w13_scale: torch.Tensor | None = None, w2_scale: torch.Tensor | None = None,
              *, block_m: int | None = None) -> torch.Tensor:
    """The mixture-of-experts MLP through the two grouped GEMMs; `block_m` overrides the heuristic."""
    what = "fused_moe"
    device = _launch.check_same_device(what, x=x, w13=w13, w2=w2, topk_weights=topk_weights, topk_ids=topk_ids)
    _launch.check_runnable(_moe_gate_up_kernel, device, what)
    scaled = _check_weight_dtypes(what, x, w13, w2, w13_scale, w2_scale)
    if x.dim() != 2 or w13.dim() != 3 or w2.dim() != 3:
        raise ValueError(f"{what}: x must be [tokens, hidden], w13 [experts, 2 x inter, hidden] and w2 "
                         f"[experts, hidden, inter], got {tuple(x.shape)}, {tuple(w13.shape)}, {tuple(w2.shape)}")
    tokens, hidden = x.shape
    experts, inter = w13.shape[0], w13.shape[1] // 2
    if w13.shape != (experts, 2 * inter, hidden) or w2.shape != (experts, hidden, inter):
        raise ValueError(f"{what}: w13 {tuple(w13.shape)} and w2 {tuple(w2.shape)} do not fit x's hidden size "
                         f"{hidden} and one intermediate size")
    if topk_ids.shape != topk_weights.shape or topk_ids.dim() != 2 or topk_ids.shape[0] != tokens:
        raise ValueError(f"{what}: topk_ids and topk_weights must both be [{tokens}, top_k], got "
                         f"{tuple(topk_ids.shape)} and {tuple(topk_weights.shape)}")
    _launch.check_last_dim_contiguous(what, x=x, w13=w13, w2=w2)
    top_k = topk_ids.shape[1]
    copies = tokens * top_k
    if copies == 0:
        return torch.zeros_like(x)
    config = moe_config(copies, device, x.dtype)
    bm = block_m or config["BLOCK_M"]
    if bm < 16 or bm & (bm - 1):
        raise ValueError(f"{what}: block_m {bm} must be a power of two >= 16 (tl.dot)")
    sorted_ids, expert_ids, num_padded = align_by_expert(topk_ids, experts, bm)
    weights = topk_weights.reshape(-1).contiguous()
    h = torch.empty(copies, inter, dtype=x.dtype, device=device)
    routed = torch.empty(copies, hidden, dtype=x.dtype, device=device)
    s13, s2 = (w13_scale, w2_scale) if scaled else (weights, weights)  # unread when not scaled
    tiles = dict(SCALED=scaled, BLOCK_M=bm, BLOCK_N=config["BLOCK_N"], BLOCK_K=config["BLOCK_K"],
                 FP32_DOT=_launch.fp32_dot(x.dtype, device), num_warps=config["num_warps"],
                 num_stages=config["num_stages"])
    blocks = expert_ids.numel()
    _moe_gate_up_kernel[(blocks, _launch.cdiv(inter, config["BLOCK_N"]))](
        x, w13, s13, h, sorted_ids, expert_ids, num_padded, copies, hidden, inter,
        x.stride(0), x.stride(1), *w13.stride(), *_scale_strides(s13), h.stride(0), h.stride(1), TOP_K=top_k,
        **tiles)
    _moe_down_kernel[(blocks, _launch.cdiv(hidden, config["BLOCK_N"]))](
        h, w2, s2, routed, weights, sorted_ids, expert_ids, num_padded, copies, inter, hidden,
        h.stride(0), h.stride(1), *w2.stride(), *_scale_strides(s2), routed.stride(0), routed.stride(1), **tiles)
    return routed.view(tokens, top_k, hidden).sum(dim=1)
