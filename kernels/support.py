"""What the kernels can run on, checked once at engine start-up rather than at the first kernel call
(by then the KV cache is allocated). Pure torch: importing it never imports triton.

- KV cache dtypes: float32, bfloat16, float16, and float8_e4m3fn (per-tensor scales). fp8 loads and
  casts compile only for compute capability 8.9+ (L4/L40S, H100/H200); on the CPU the torch reference
  (or the interpreter) runs fp8 anywhere.
- Weight-only quantization: int8 and int4 everywhere; fp8 weights need 8.9+ like the fp8 cache.
- fp32 activations run on CUDA with their own small tiles (no register spills) but slowly: a checking
  path, not a serving one.
"""

from __future__ import annotations

import torch

FP8 = torch.float8_e4m3fn
FP8_MIN_CAPABILITY = (8, 9)
KV_DTYPES = (torch.float32, torch.bfloat16, torch.float16, FP8)
WEIGHT_MODES = ("int8", "int4", "fp8")


def _capability(device: torch.device) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device)


def check_kv_dtype_supported(device: torch.device | str, kv_dtype: torch.dtype) -> None:
    """Raise ValueError, naming what to change, if the attention kernels cannot use a `kv_dtype` cache on
    `device`. Call it at engine start, before allocating the cache."""
    device = torch.device(device)
    if kv_dtype not in KV_DTYPES:
        raise ValueError(f"KV cache dtype {kv_dtype} is not supported; use one of {KV_DTYPES}")
    if kv_dtype == FP8 and device.type == "cuda" and _capability(device) < FP8_MIN_CAPABILITY:
        raise ValueError(f"an fp8 ({FP8}) KV cache needs a GPU of compute capability >= 8.9 (L4, L40S, H100), "
                         f"{device} has {_capability(device)}; use a bf16/fp16 KV cache on this GPU")


def check_weight_quantization_supported(device: torch.device | str, mode: str) -> None:
    """Raise ValueError if quantized_matmul cannot run `mode` weights on `device` (call it before loading)."""
    device = torch.device(device)
    if mode not in WEIGHT_MODES:
        raise ValueError(f"weight quantization {mode!r} is not one of {WEIGHT_MODES}")
    if mode == "fp8" and device.type == "cuda" and _capability(device) < FP8_MIN_CAPABILITY:
        raise ValueError(f"fp8 weights need a GPU of compute capability >= 8.9 (L4, L40S, H100), {device} has "
                         f"{_capability(device)}; use int8 or int4 on this GPU")
