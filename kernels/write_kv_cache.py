"""Reshape-and-cache: scatter the new tokens' K and V into their slots of the paged cache.

Shapes: key/value [num_tokens, KVH, D]; k_cache/v_cache [num_blocks, block_size, KVH, D];
slot_mapping [num_tokens] int64 (slot = block * block_size + offset, -1 = padding, skipped).
Caches in the key's dtype are written as is; float8_e4m3fn caches get value / scale (an IEEE
round-to-nearest division, as torch divides: Triton's plain `/` is an approximate division that
lands one fp8 step off near a rounding midpoint), saturated to +-448 and rounded to nearest even;
NaN stays NaN. A slot past the cache's capacity (num_blocks * block_size) is skipped like -1: the
kernel never writes out of bounds (the launcher cannot check without a device sync; the torch
reference raises on it).

One program per (token, tile of BLOCK_H KV heads) moves a [BLOCK_H, D] tile of K and one of V.
Memory traffic: 2 * num_tokens * KVH * D * (input bytes + cache bytes), plus the slot mapping.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvpilot.kernels import _launch
from kvpilot.kernels.reference import write_kv_cache_ref

__all__ = ["write_kv_cache", "write_kv_cache_ref"]

TILE_ELEMENTS = 4096  # heads x head_dim moved by one program


@triton.jit
def round_to_fp8e4m3(x):
    """fp32 -> the nearest float8_e4m3fn value (ties to even, saturating at +-448), still in fp32.

    Done by hand so the final cast is exact: the interpreter's own fp32->fp8 cast rounds ties up,
    loses the carry into the exponent (31.6 -> 16) and flushes subnormals, while the GPU rounds
    correctly; after this both agree with torch bit for bit."""
    x = tl.minimum(tl.maximum(x, -448.0), 448.0)  # NaN becomes one of the bounds here: see to_fp8e4m3
    bits = x.to(tl.int32, bitcast=True)
    bits = (bits + 0x7FFFF + ((bits >> 20) & 1)) & -1048576  # keep 3 of fp32's 23 mantissa bits, RNE
    normal = bits.to(tl.float32, bitcast=True)
    magnitude = tl.abs(x)
    subnormal = (magnitude * 512.0 + 8388608.0) - 8388608.0  # round to a multiple of 2^-9, RNE
    subnormal = tl.where(x < 0, -subnormal, subnormal) * 0.001953125
    return tl.where(magnitude < 0.015625, subnormal, normal)  # below 2^-6 e4m3 is subnormal


@triton.jit
def to_fp8e4m3(x):
    """fp32 -> float8_e4m3fn as torch casts (rounded, saturated), NaN kept as NaN (0x7F): the clamp in
    round_to_fp8e4m3 would turn it into a bound, and the interpreter's cast of NaN gives a number."""
    bits = round_to_fp8e4m3(x).to(tl.float8e4nv).to(tl.int8, bitcast=True)
    return tl.where(x != x, 0x7F, bits).to(tl.int8).to(tl.float8e4nv, bitcast=True)


@triton.jit
def _write_kv_kernel(
    key_ptr, value_ptr, k_cache_ptr, v_cache_ptr, slot_mapping_ptr, k_scale, v_scale,
    num_kv_heads, num_slots, stride_kt, stride_kh, stride_vt, stride_vh,
    stride_kcb, stride_kct, stride_kch, stride_vcb, stride_vct, stride_vch,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    FP8: tl.constexpr,
):
    token = tl.program_id(0)
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    if (slot < 0) | (slot >= num_slots):  # padding, or a slot the cache does not have
        return
    block = slot // BLOCK_SIZE
    offset = slot % BLOCK_SIZE
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    dims = tl.arange(0, BLOCK_D)
    mask = (heads < num_kv_heads)[:, None] & (dims < HEAD_DIM)[None, :]
    k = tl.load(key_ptr + token * stride_kt + heads[:, None] * stride_kh + dims[None, :], mask=mask)
    v = tl.load(value_ptr + token * stride_vt + heads[:, None] * stride_vh + dims[None, :], mask=mask)
    if FP8:
        k = to_fp8e4m3(tl.math.div_rn(k.to(tl.float32), k_scale))
        v = to_fp8e4m3(tl.math.div_rn(v.to(tl.float32), v_scale))
    k_dst = k_cache_ptr + block * stride_kcb + offset * stride_kct + heads[:, None] * stride_kch + dims[None, :]
    v_dst = v_cache_ptr + block * stride_vcb + offset * stride_vct + heads[:, None] * stride_vch + dims[None, :]
    tl.store(k_dst, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(v_dst, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def write_kv_cache(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                   slot_mapping: torch.Tensor, k_scale: float = 1.0, v_scale: float = 1.0) -> None:
    """Write key/value into their slots of k_cache/v_cache, in place, through the Triton kernel."""
    what = "write_kv_cache"
    device = _launch.check_same_device(what, key=key, value=value, k_cache=k_cache, v_cache=v_cache,
                                       slot_mapping=slot_mapping)
    _launch.check_runnable(_write_kv_kernel, device, what)
    if key.dim() != 3 or value.shape != key.shape:
        raise ValueError(f"{what}: key and value must both be [num_tokens, num_kv_heads, head_dim], got "
                         f"{tuple(key.shape)} and {tuple(value.shape)}")
    if value.dtype != key.dtype:
        raise ValueError(f"{what}: key dtype {key.dtype} != value dtype {value.dtype}")
    if k_cache.dim() == 4 and k_cache.shape[2] != key.shape[1]:
        raise ValueError(f"{what}: key has {key.shape[1]} KV heads, the cache {k_cache.shape[2]}")
    _launch.check_kv_cache(what, key, k_cache, v_cache)
    _launch.check_index_tensor(what, "slot_mapping", slot_mapping, 1, (torch.int64, torch.int32))
    if slot_mapping.shape[0] != key.shape[0]:
        raise ValueError(f"{what}: {key.shape[0]} tokens but slot_mapping has {slot_mapping.shape[0]} entries")
    fp8 = k_cache.dtype == _launch.FP8
    if fp8 and (k_scale <= 0 or v_scale <= 0):
        raise ValueError(f"{what}: fp8 scales must be positive, got k_scale={k_scale} v_scale={v_scale}")
    _launch.check_last_dim_contiguous(what, key=key, value=value, k_cache=k_cache, v_cache=v_cache)
    num_tokens, num_kv_heads, head_dim = key.shape
    if num_tokens == 0:
        return
    block_d = _launch.next_pow2(head_dim)
    block_h = min(_launch.next_pow2(num_kv_heads), max(1, TILE_ELEMENTS // block_d))
    _write_kv_kernel[(num_tokens, _launch.cdiv(num_kv_heads, block_h))](
        key, value, k_cache, v_cache, slot_mapping, float(k_scale), float(v_scale),
        num_kv_heads, k_cache.shape[0] * k_cache.shape[1],
        key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        *k_cache.stride()[:3], *v_cache.stride()[:3],
        HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_H=block_h, BLOCK_SIZE=k_cache.shape[1], FP8=fp8,
        num_warps=4,
    )
