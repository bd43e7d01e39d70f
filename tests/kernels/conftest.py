"""Kernel tests run the real Triton kernels against the torch references.

Device: CUDA when there is a GPU (or KVPILOT_KERNEL_DEVICE=cuda), else the CPU through Triton's
interpreter. The interpreter needs TRITON_INTERPRET=1 before triton's first import in the process
(triton reads it when it is imported and when each kernel is decorated): tests/conftest.py imports
triton and every kernel module with the variable set, then puts the environment back, so the other
suites in the same pytest process (the CPU engine) keep the fast torch reference; the
`_kernels_on_device` fixture sets the variable only around each kernel test (kvpilot.kernels.ops
reads it at call time).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
import torch
from kernel_testing import DEVICE, PagedKV, assert_close, interpreter, make_paged_kv


@pytest.fixture(autouse=True)
def _kernels_on_device() -> Iterator[None]:
    with interpreter(DEVICE == "cpu"):
        yield


@pytest.fixture
def device() -> torch.device:
    return torch.device(DEVICE)


@pytest.fixture
def paged_kv(device: torch.device) -> Callable[..., PagedKV]:
    def build(context_lens: list[int], num_kv_heads: int, head_dim: int, block_size: int,
              dtype: torch.dtype, **kwargs: object) -> PagedKV:
        return make_paged_kv(context_lens, num_kv_heads, head_dim, block_size, dtype, device, **kwargs)
    return build


@pytest.fixture
def close() -> Callable[[torch.Tensor, torch.Tensor, torch.dtype], None]:
    return assert_close
