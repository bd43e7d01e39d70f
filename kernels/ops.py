"""The kernel entry points the runtime calls. The engine never knows which implementation ran.

Dispatch, decided at every call from the tensors' device:
- CUDA tensors: the Triton kernels (`kernels/<name>.py`).
- CPU tensors: the plain-torch reference (`reference.py`, `quant_reference.py`), unless
  `TRITON_INTERPRET=1` is in the environment at call time, in which case the same Triton kernels run
  through Triton's CPU interpreter (how CI proves the Triton code itself). The interpreter also
  needs the variable set before triton is first imported (Triton decides at import and decoration
  time); a test harness that wants both paths in one process sets it around the imports and around
  the calls it wants interpreted (tests/kernels/conftest.py does).
Triton itself is imported lazily, on the first Triton dispatch: CPU users never pay for it.
(With TRITON_INTERPRET=1 set before triton's import, Triton interprets even CUDA launches: slow but
correct; GPU processes should not set it.)

Shapes and layouts: `kvpilot.kernels.reference` (paged KV), `kvpilot.kernels.quant_reference`
(quantized weights) and `kvpilot.kernels.moe_reference` (mixture of experts). Shapes a kernel
cannot take raise ValueError naming the limit.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType
from typing import Literal

import torch

from kvpilot.kernels import moe_reference, quant_reference, reference
from kvpilot.kernels.quant_reference import QuantizedWeight, dequantize, quantize_fp8, quantize_int4, quantize_int8
from kvpilot.kernels.support import check_kv_dtype_supported, check_weight_quantization_supported

__all__ = [
    "QuantizedWeight", "backend", "check_kv_dtype_supported", "check_weight_quantization_supported", "dequantize",
    "fused_moe", "paged_attention_decode", "paged_attention_prefill",
    "quantize_fp8", "quantize_int4", "quantize_int8", "quantized_matmul", "write_kv_cache",
]

Backend = Literal["triton", "interpreter", "reference"]
_TRUE = ("1", "true", "yes", "on")


def _interpreter_requested() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in _TRUE


def backend(device: torch.device | str) -> Backend:
    """Which implementation a call with tensors on `device` runs now."""
    device = torch.device(device)
    if device.type == "cuda":
        return "triton"
    return "interpreter" if _interpreter_requested() else "reference"


def _triton(device: torch.device, module: str) -> ModuleType | None:
    """The kernel module when Triton should run for `device`, else None (imports triton on first use)."""
    if backend(device) == "reference":
        return None
    return importlib.import_module(f"kvpilot.kernels.{module}")


def write_kv_cache(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                   slot_mapping: torch.Tensor, k_scale: float = 1.0, v_scale: float = 1.0) -> None:
    """Scatter key/value [num_tokens, KVH, D] into the cache slots `slot_mapping` names (-1: skip), in place."""
    kernel = _triton(key.device, "write_kv_cache")
    if kernel is None:
        reference.write_kv_cache_ref(key, value, k_cache, v_cache, slot_mapping, k_scale, v_scale)
    else:
        kernel.write_kv_cache(key, value, k_cache, v_cache, slot_mapping, k_scale, v_scale)


def paged_attention_decode(query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, context_lens: torch.Tensor, scale: float,
                           k_scale: float = 1.0, v_scale: float = 1.0, *,
                           max_context_len: int | None = None, window: int | None = None,
                           softcap: float | None = None) -> torch.Tensor:
    """query [num_seqs, H, D] (one token per sequence) -> [num_seqs, H, D] over each sequence's cache.

    `max_context_len`, if given (>= every context length), spares the GPU path a device sync.
    `window`: sliding-window attention over the last `window` tokens; `softcap`: Gemma 2's score
    capping (see reference.py)."""
    kernel = _triton(query.device, "paged_attention_decode")
    if kernel is None:
        return reference.paged_attention_decode_ref(query, k_cache, v_cache, block_tables, context_lens,
                                                    scale, k_scale, v_scale, window, softcap)
    extra = _attention_options(window, softcap)
    return kernel.paged_attention_decode(query, k_cache, v_cache, block_tables, context_lens, scale,
                                         k_scale, v_scale, max_context_len=max_context_len, **extra)


def paged_attention_prefill(query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            block_tables: torch.Tensor, cu_seqlens_q: torch.Tensor,
                            context_lens: torch.Tensor, scale: float,
                            k_scale: float = 1.0, v_scale: float = 1.0, *,
                            max_query_len: int | None = None, max_context_len: int | None = None,
                            window: int | None = None, softcap: float | None = None) -> torch.Tensor:
    """Packed query chunks [total_q, H, D], causal over cached prefix + chunk (already written).

    `max_query_len` and `max_context_len`, if given (>= every chunk / context length), each spare the
    GPU path a device sync (the context length is checked against the block table's capacity).
    `window` and `softcap`: as for paged_attention_decode."""
    kernel = _triton(query.device, "paged_attention_prefill")
    if kernel is None:
        return reference.paged_attention_prefill_ref(query, k_cache, v_cache, block_tables, cu_seqlens_q,
                                                     context_lens, scale, k_scale, v_scale, window, softcap)
    extra = _attention_options(window, softcap)
    return kernel.paged_attention_prefill(query, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens,
                                          scale, k_scale, v_scale, max_query_len=max_query_len,
                                          max_context_len=max_context_len, **extra)


def _attention_options(window: int | None, softcap: float | None) -> dict[str, float | int]:
    """Only the options a call sets, so plain attention calls the Triton launchers exactly as before."""
    if window is not None and window < 1:
        raise ValueError(f"attention window must be >= 1 token, got {window}")
    return {**({"window": window} if window is not None else {}), **({"softcap": softcap} if softcap else {})}


def quantized_matmul(x: torch.Tensor, weight: QuantizedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ W^T (+ bias): x [..., in_features] (fp32/bf16/fp16) -> [..., out_features] in x's dtype,
    W an int8 / int4 / fp8 `QuantizedWeight` (make one with quantize_int8 / quantize_int4 / quantize_fp8)."""
    kernel = _triton(x.device, "quantized_matmul")
    if kernel is None:
        return quant_reference.quantized_matmul_ref(x, weight, bias)
    return kernel.quantized_matmul(x, weight, bias)


def fused_moe(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
              topk_ids: torch.Tensor, w13_scale: torch.Tensor | None = None,
              w2_scale: torch.Tensor | None = None) -> torch.Tensor:
    """The mixture-of-experts MLP: x [T, H] through the experts topk_ids [T, k] picked, weighed by
    topk_weights [T, k] and summed -> [T, H]; w13 [E, 2I, H] (gate rows, then up), w2 [E, H, I], in x's
    dtype or int8 / fp8 with per-channel scales w13_scale [E, 2I], w2_scale [E, H]."""
    kernel = _triton(x.device, "fused_moe")
    if kernel is None:
        return moe_reference.fused_moe_ref(x, w13, w2, topk_weights, topk_ids, w13_scale, w2_scale)
    return kernel.fused_moe(x, w13, w2, topk_weights, topk_ids, w13_scale, w2_scale)
