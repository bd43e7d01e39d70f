"""kvpilot.kernels.ops: which implementation runs, when triton is imported, and the three attention ops
working together as the engine uses them (write, prefill, decode) against dense causal attention."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from collections.abc import Callable

import pytest
import torch
from kernel_testing import DEVICE, assert_close, interpreter, make_paged_kv

from kvpilot.kernels import ops
from kvpilot.kernels.quant_reference import quantize_int4


def test_backend_follows_the_environment_at_call_time(monkeypatch):
    assert ops.backend("cuda") == "triton"
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert ops.backend("cpu") == "interpreter"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert ops.backend("cpu") == "reference"  # read at call time, not import time
    monkeypatch.delenv("TRITON_INTERPRET")
    assert ops.backend("cpu") == "reference"
    assert not hasattr(ops, "use_interpreter")  # no process-wide switch in the product


def _args(name: str, device: torch.device) -> tuple:
    torch.manual_seed(0)
    kv = make_paged_kv([5, 20], 2, 64, 8, torch.float32, device)
    if name == "paged_attention_decode":
        return (torch.randn(2, 4, 64, device=device), kv.k_cache, kv.v_cache, kv.block_tables, kv.context_lens, 0.1)
    if name == "paged_attention_prefill":
        cu = torch.tensor([0, 3, 7], dtype=torch.int32, device=device)
        return (torch.randn(7, 4, 64, device=device), kv.k_cache, kv.v_cache, kv.block_tables, cu,
                kv.context_lens, 0.1)
    if name == "write_kv_cache":
        key = torch.randn(3, 2, 64, device=device)
        return (key, key + 1, kv.k_cache, kv.v_cache, torch.tensor([0, 9, -1], device=device))
    return (torch.randn(2, 256, device=device), quantize_int4(torch.randn(16, 256)).to(device))


OPS = ["paged_attention_decode", "paged_attention_prefill", "write_kv_cache", "quantized_matmul"]


def _count_calls(monkeypatch, name: str) -> list[int]:
    module = importlib.import_module(f"kvpilot.kernels.{name}")
    launcher: Callable = getattr(module, name)
    calls = [0]

    def counted(*args, **kwargs):
        calls[0] += 1
        return launcher(*args, **kwargs)

    monkeypatch.setattr(module, name, counted)
    return calls


@pytest.mark.parametrize("name", OPS)
def test_ops_run_the_triton_kernel_on_the_test_device(monkeypatch, device, name):
    """On CPU under the kernel tests' interpreter switch (or on CUDA), ops launches the Triton kernel."""
    calls = _count_calls(monkeypatch, name)
    args = _args(name, device)
    monkeypatch.setenv("TRITON_INTERPRET", "1" if DEVICE == "cpu" else "0")
    triton_out = getattr(ops, name)(*args)
    assert calls[0] == 1
    if name == "write_kv_cache":
        return
    with interpreter(False):
        reference_out = getattr(ops, name)(*(a.to("cpu") if hasattr(a, "to") else a for a in args))
    assert calls[0] == 1
    if name == "quantized_matmul":  # 256-term fp32 dot products summed in another order: ~1e-5 apart
        torch.testing.assert_close(triton_out, reference_out, rtol=1e-4, atol=1e-4)
    else:
        assert_close(triton_out, reference_out, torch.float32)


@pytest.mark.parametrize("name", OPS)
def test_ops_run_the_reference_on_cpu_without_the_interpreter(monkeypatch, name):
    calls = _count_calls(monkeypatch, name)
    with interpreter(False):
        getattr(ops, name)(*_args(name, torch.device("cpu")))
    assert calls[0] == 0


def test_triton_is_imported_lazily():
    """A CPU user without TRITON_INTERPRET never imports triton; forcing the interpreter after the fact
    says what is missing instead of failing inside triton."""
    code = """
import os, sys, torch
from kvpilot.kernels import ops
from kvpilot.kernels.quant_reference import quantize_int8
cache = torch.zeros(4, 8, 2, 16)
tables = torch.tensor([[0, 1]], dtype=torch.int32)
lens = torch.tensor([9], dtype=torch.int32)
ops.write_kv_cache(torch.ones(1, 2, 16), torch.ones(1, 2, 16), cache, cache, torch.tensor([8]))
ops.paged_attention_decode(torch.ones(1, 4, 16), cache, cache, tables, lens, 0.25)
ops.paged_attention_prefill(torch.ones(2, 4, 16), cache, cache, tables, torch.tensor([0, 2], dtype=torch.int32),
                            lens, 0.25)
ops.quantized_matmul(torch.ones(1, 32), quantize_int8(torch.ones(8, 32)))
assert "triton" not in sys.modules, "triton imported by the reference path"
import triton  # as a GPU library (e.g. transformers) would, before anyone asks for the interpreter
os.environ["TRITON_INTERPRET"] = "1"  # too late: triton was imported without it
try:
    ops.paged_attention_decode(torch.ones(1, 4, 16), cache, cache, tables, lens, 0.25)
except RuntimeError as e:
    assert "TRITON_INTERPRET=1" in str(e), e
else:
    raise AssertionError("ran the compiled kernel on CPU tensors")
"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]


def _dense_causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """q/k/v [L, heads, D] of one whole sequence -> [L, H, D], plain causal softmax attention in fp32."""
    group = q.shape[1] // k.shape[1]
    k, v = k.float().repeat_interleave(group, 1), v.float().repeat_interleave(group, 1)
    scores = torch.einsum("qhd,khd->hqk", q.float(), k) * scale
    scores = scores.masked_fill(torch.ones_like(scores[0], dtype=torch.bool).triu(1), float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)


@pytest.mark.parametrize("backend", ["kernels", "reference"])
def test_write_prefill_chunks_then_decode_equals_dense_attention(device, backend):
    """Two sequences: a prompt in two prefill chunks, then decode steps, each step writing its K/V first,
    through ops alone; every output equals dense causal attention over the whole sequence."""
    if backend == "reference":
        device = torch.device("cpu")
    gen = torch.Generator().manual_seed(11)
    heads, kv_heads, head_dim, block_size, scale = 8, 2, 64, 8, 0.125
    total = [23, 15]  # tokens per sequence: prompt then decode
    chunks = [(0, 9), (9, 19)]  # prompt chunks of sequence 0; sequence 1 prefills 0..10 in the first
    q = [torch.randn(n, heads, head_dim, generator=gen) for n in total]
    k = [torch.randn(n, kv_heads, head_dim, generator=gen) for n in total]
    v = [torch.randn(n, kv_heads, head_dim, generator=gen) for n in total]
    k_cache = torch.zeros(12, block_size, kv_heads, head_dim, device=device)
    v_cache = torch.zeros_like(k_cache)
    tables = torch.tensor([[7, 2, 9, 4], [1, 11, 5, 0]], dtype=torch.int32, device=device)
    dense = [_dense_causal(q[i], k[i], v[i], scale) for i in range(2)]

    def slots(i: int, start: int, stop: int) -> torch.Tensor:
        pos = torch.arange(start, stop)
        return (tables[i].cpu().long()[pos // block_size] * block_size + pos % block_size).to(device)

    def step(spans: list[tuple[int, int]]) -> list[torch.Tensor]:
        for i, (a, b) in enumerate(spans):
            ops.write_kv_cache(k[i][a:b].to(device), v[i][a:b].to(device), k_cache, v_cache, slots(i, a, b))
        lens = torch.tensor([b for _, b in spans], dtype=torch.int32, device=device)
        if all(b - a == 1 for a, b in spans):
            query = torch.stack([q[i][a] for i, (a, _) in enumerate(spans)]).to(device)
            return list(ops.paged_attention_decode(query, k_cache, v_cache, tables, lens, scale).unsqueeze(1))
        cu = torch.tensor([0, *torch.tensor([b - a for a, b in spans]).cumsum(0).tolist()], dtype=torch.int32)
        query = torch.cat([q[i][a:b] for i, (a, b) in enumerate(spans)]).to(device)
        out = ops.paged_attention_prefill(query, k_cache, v_cache, tables, cu.to(device), lens, scale)
        return list(out.split([b - a for a, b in spans]))

    with interpreter(DEVICE == "cpu" and backend == "kernels"):
        schedule = [[chunks[0], (0, 10)], [chunks[1], (10, 11)]]
        schedule += [[(t, t + 1), (t - 8, t - 7)] for t in range(19, 23)]
        for spans in schedule:
            for i, ((a, b), out) in enumerate(zip(spans, step(spans), strict=True)):
                assert_close(out, dense[i][a:b], torch.float32)
