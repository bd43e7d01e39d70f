"""The kernel entry points the runtime calls. The engine never knows which implementation ran.

Dispatch, decided at every call from the tensors' device:
- CUDA tensors: the Triton kernels (`kernels/<name>.py`).
- CPU tensors: the plain-torch reference (`reference.py`, `quant_reference.py`), unless the
  interpreter is on, in which case the same Triton kernels run through Triton's CPU interpreter
  (how CI proves the Triton code itself).
The interpreter is on when `use_interpreter(True)` (or the `interpreter()` context manager) says so;
while that switch is unset (`None`, the default) it follows `TRITON_INTERPRET=1` in the environment,
read at call time. The switch exists because TRITON_INTERPRET has to be in the environment before
triton is first imported for the interpreter to work at all, and pytest runs every suite in one
process: the kernel tests' conftest sets the variable and then pins the switch to False, turning
the interpreter on only inside the kernel tests, so the engine tests keep the fast reference path.
Triton itself is imported lazily, on the first Triton dispatch: CPU users never pay for it.
(With TRITON_INTERPRET=1 set before triton's import, Triton interprets even CUDA launches: slow but
correct; GPU processes should not set it.)

Shapes and layouts: `kvpilot.kernels.reference` (paged KV) and `kvpilot.kernels.quant_reference`
(quantized weights). Shapes a kernel cannot take raise ValueError naming the limit.
"""

from __future__ import annotations

import contextlib
import importlib
import os
from collections.abc import Iterator
from types import ModuleType
from typing import Literal

import torch

from kvpilot.kernels import quant_reference, reference
from kvpilot.kernels.quant_reference import QuantizedWeight, dequantize, quantize_fp8, quantize_int4, quantize_int8

__all__ = [
    "QuantizedWeight", "backend", "dequantize", "interpreter", "interpreter_enabled", "paged_attention_decode",
    "paged_attention_prefill", "quantize_fp8", "quantize_int4", "quantize_int8", "quantized_matmul",
    "use_interpreter", "write_kv_cache",
]

Backend = Literal["triton", "interpreter", "reference"]
_TRUE = ("1", "true", "yes", "on")
_interpreter_switch: bool | None = None


def use_interpreter(enabled: bool | None) -> None:
    """Route CPU tensors to the Triton interpreter (True), to the torch reference (False), or follow
    TRITON_INTERPRET (None). The interpreter also needs TRITON_INTERPRET=1 set before triton's import."""
    global _interpreter_switch
    _interpreter_switch = enabled


@contextlib.contextmanager
def interpreter(enabled: bool | None = True) -> Iterator[None]:
    """`use_interpreter(enabled)` for the duration of a `with` block, then the previous setting."""
    previous = _interpreter_switch
    use_interpreter(enabled)
    try:
        yield
    finally:
        use_interpreter(previous)


def interpreter_enabled() -> bool:
    if _interpreter_switch is not None:
        return _interpreter_switch
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in _TRUE


def backend(device: torch.device | str) -> Backend:
    """Which implementation a call with tensors on `device` runs now."""
    device = torch.device(device)
    if device.type == "cuda":
        return "triton"
    return "interpreter" if interpreter_enabled() else "reference"


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
                            max_query_len: int | None = None, window: int | None = None,
                            softcap: float | None = None) -> torch.Tensor:
    """Packed query chunks [total_q, H, D], causal over cached prefix + chunk (already written).

    `max_query_len`, if given (>= every chunk length), spares the GPU path a device sync.
    `window` and `softcap`: as for paged_attention_decode."""
    kernel = _triton(query.device, "paged_attention_prefill")
    if kernel is None:
        return reference.paged_attention_prefill_ref(query, k_cache, v_cache, block_tables, cu_seqlens_q,
                                                     context_lens, scale, k_scale, v_scale, window, softcap)
    extra = _attention_options(window, softcap)
    return kernel.paged_attention_prefill(query, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens,
                                          scale, k_scale, v_scale, max_query_len=max_query_len, **extra)


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
