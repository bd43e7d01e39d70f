"""Helpers of the kernel tests (a plain module: tests/ is not a package): the test device, a random paged
KV cache in shuffled blocks, and the per-dtype tolerance."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch

# CUDA when there is a GPU (or KVPILOT_KERNEL_DEVICE=cuda), else the CPU through Triton's interpreter
DEVICE = os.environ.get("KVPILOT_KERNEL_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")



@contextlib.contextmanager
def interpreter(enabled: bool) -> Iterator[None]:
    """Route kvpilot.kernels.ops' CPU calls to the Triton interpreter (True) or the torch reference (False)
    for a `with` block, through TRITON_INTERPRET (ops reads it at call time), then restore it."""
    previous = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1" if enabled else "0"
    try:
        yield
    finally:
        if previous is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = previous


# Per dtype: |kernel - reference| <= ATOL + RTOL * |reference| (outputs here are O(1)).
TOLERANCE = {
    torch.float32: (1e-5, 1e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2),  # bf16 keeps 8 bits of mantissa
}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    atol, rtol = TOLERANCE[dtype]
    torch.testing.assert_close(actual.float().cpu(), expected.float().cpu(), atol=atol, rtol=rtol)


@dataclass
class PagedKV:
    """A paged cache holding `context_lens` random tokens per sequence, in shuffled physical blocks."""

    k_cache: torch.Tensor
    v_cache: torch.Tensor
    block_tables: torch.Tensor
    context_lens: torch.Tensor
    k_scale: float = 1.0
    v_scale: float = 1.0


UNUSED_BLOCK = 1_000_000  # block-table padding the kernels must never follow


def make_paged_kv(context_lens: list[int], num_kv_heads: int, head_dim: int, block_size: int,
                  dtype: torch.dtype, device: torch.device, seed: int = 0,
                  kv_dtype: torch.dtype | None = None) -> PagedKV:
    gen = torch.Generator().manual_seed(seed)
    blocks_per_seq = [-(-n // block_size) for n in context_lens]
    num_blocks = sum(blocks_per_seq) + 3  # a few blocks nobody owns
    physical = torch.randperm(num_blocks, generator=gen)
    max_blocks = max(blocks_per_seq, default=0) + 1
    table = torch.full((len(context_lens), max_blocks), UNUSED_BLOCK, dtype=torch.int32)
    taken = 0
    for i, n in enumerate(blocks_per_seq):
        table[i, :n] = physical[taken : taken + n].int()
        taken += n
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k = torch.randn(shape, generator=gen)
    v = torch.randn(shape, generator=gen)
    kv = PagedKV(k.to(dtype), v.to(dtype), table, torch.tensor(context_lens, dtype=torch.int32))
    if kv_dtype == torch.float8_e4m3fn:
        kv.k_scale, kv.v_scale = 0.02, 0.03
        kv.k_cache = (k / kv.k_scale).to(kv_dtype)
        kv.v_cache = (v / kv.v_scale).to(kv_dtype)
    for name in ("k_cache", "v_cache", "block_tables", "context_lens"):
        setattr(kv, name, getattr(kv, name).to(device))
    return kv
