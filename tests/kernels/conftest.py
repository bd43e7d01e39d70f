"""Kernel tests run the real Triton kernels against the torch references.

Device: CUDA when there is a GPU (or KVPILOT_KERNEL_DEVICE=cuda), else the CPU through Triton's
interpreter. The interpreter needs TRITON_INTERPRET=1 before triton's first import in the process,
so this conftest sets it at collection time; it then pins `ops.use_interpreter(False)` so that the
other suites in the same pytest process (the CPU engine) keep the fast torch reference, and the
`_kernels_on_device` fixture turns the interpreter on only around each kernel test.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator

import pytest
import torch
from kernel_testing import DEVICE, PagedKV, assert_close, make_paged_kv

if DEVICE == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"

from kvpilot.kernels import ops

ops.use_interpreter(False)


@pytest.fixture(autouse=True)
def _kernels_on_device() -> Iterator[None]:
    with ops.interpreter(DEVICE == "cpu"):
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
