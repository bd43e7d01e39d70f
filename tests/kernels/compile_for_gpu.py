"""Compile every kernel variant the launchers produce, for a GPU target, on a machine without a GPU.

The interpreter accepts code the GPU compiler rejects (tile shapes, dtype mixes in tl.dot, ...).
Triton's CUDA backend (ptxas included) compiles to a cubin without a device, so this script runs the
real launchers on CPU tensors with their CUDA configs, records each kernel launch (argument types,
constexprs, num_warps/num_stages) instead of running it, and compiles it for `--arch` (default 90,
H100/H200). Run it in a process without TRITON_INTERPRET (tests/kernels/test_gpu_compile.py does).

    python tests/kernels/compile_for_gpu.py [--arch 90]   # prints one line per variant, exit 1 on failure
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    sys.exit("run without TRITON_INTERPRET: the interpreter has no compiler to check")

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import JITFunction, mangle_type

from kvpilot.kernels import _launch
from kvpilot.kernels import paged_attention_decode as decode
from kvpilot.kernels import paged_attention_prefill as prefill
from kvpilot.kernels import quantized_matmul as qmm
from kvpilot.kernels import write_kv_cache as write
from kvpilot.kernels.quant_reference import quantize_fp8, quantize_int4, quantize_int8

CUDA = torch.device("cuda")
LAUNCH_OPTIONS = ("num_warps", "num_stages")
Launch = tuple[JITFunction, tuple[Any, ...], dict[str, Any]]


class Recorder:
    """Stands in for a @triton.jit kernel: `kernel[grid](*args, **kwargs)` records instead of launching."""

    def __init__(self, kernel: JITFunction, launches: list[Launch]) -> None:
        self.kernel, self.launches = kernel, launches

    def __getitem__(self, grid: object) -> Callable[..., None]:
        return lambda *args, **kwargs: self.launches.append((self.kernel, args, kwargs))


def compile_launch(kernel: JITFunction, args: tuple[Any, ...], kwargs: dict[str, Any], arch: int) -> str:
    """Compile one recorded launch the way Triton specialises it for contiguous tensors (integer arguments
    equal to 1 become constants, pointers and multiples of 16 are marked 16-divisible); returns a summary
    of the PTX: asynchronous copies (software pipelining), vector loads and tensor-core instructions."""
    names = kernel.arg_names
    options = {k: v for k, v in kwargs.items() if k in LAUNCH_OPTIONS}
    constexprs = {k: v for k, v in kwargs.items() if k not in LAUNCH_OPTIONS}
    constexprs.update({n: 1 for n, v in zip(names, args, strict=False) if type(v) is int and v == 1})
    values = [*args, *[constexprs.get(n) for n in names[len(args):]]]
    signature = {n: "constexpr" if n in constexprs else mangle_type(v) for n, v in zip(names, values, strict=True)}
    attrs = {(i,): [["tt.divisibility", 16]] for i, v in enumerate(args)
             if names[i] not in constexprs and (isinstance(v, torch.Tensor) or (type(v) is int and v % 16 == 0))}
    compiled = triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=GPUTarget("cuda", arch, 32),
                              options=options)
    ptx = compiled.asm["ptx"]
    return (f"cp.async {ptx.count('cp.async.c')}, ld.v4 {ptx.count('ld.global.v4')}, "
            f"wgmma {ptx.count('wgmma.mma_async')}, mma {ptx.count('mma.sync')}, shared {compiled.metadata.shared}")


def cases() -> list[tuple[str, Callable[[], None]]]:
    """Calls of the real launchers covering each kernel's constexpr variants that matter for codegen."""
    def attention(kind: str, dtype: torch.dtype, kv_dtype: torch.dtype, head_dim: int, group: int, **kw: Any):
        def run() -> None:
            cache = torch.zeros(8, 16, 2, head_dim, dtype=kv_dtype)
            tables = torch.zeros(2, 4, dtype=torch.int32)
            lens = torch.full((2,), 40, dtype=torch.int32)
            if kind == "decode":
                query = torch.zeros(2, 2 * group, head_dim, dtype=dtype)
                decode.paged_attention_decode(query, cache, cache, tables, lens, 0.1, max_context_len=40, **kw)
            else:
                query = torch.zeros(6, 2 * group, head_dim, dtype=dtype)
                cu = torch.tensor([0, 2, 6], dtype=torch.int32)
                prefill.paged_attention_prefill(query, cache, cache, tables, cu, lens, 0.1, max_query_len=4, **kw)
        return run

    def matmul(mode: str, m: int, dtype: torch.dtype, **kw: Any) -> Callable[[], None]:
        weight = {"int8": lambda w: quantize_int8(w, dtype), "int4": lambda w: quantize_int4(w, compute_dtype=dtype),
                  "fp8": quantize_fp8}[mode](torch.randn(64, 512))
        return lambda: qmm.quantized_matmul(torch.zeros(m, 512, dtype=dtype), weight, **kw)

    def cache_write(dtype: torch.dtype, kv_dtype: torch.dtype) -> Callable[[], None]:
        key = torch.zeros(3, 8, 128, dtype=dtype)
        cache = torch.zeros(4, 16, 8, 128, dtype=kv_dtype)
        return lambda: write.write_kv_cache(key, key, cache, cache, torch.arange(3), 0.5, 0.5)

    bf16, fp16, fp32, fp8 = torch.bfloat16, torch.float16, torch.float32, torch.float8_e4m3fn
    out = [(f"decode {q}/{kv} d{d} g{g} splits{s}", attention("decode", q, kv, d, g, num_splits=s))
           for q, kv, d, g, s in [(bf16, bf16, 128, 4, 1), (bf16, bf16, 128, 4, 3), (fp16, fp8, 128, 4, 2),
                                  (bf16, fp8, 80, 8, 1), (fp32, fp32, 64, 1, 2), (bf16, bf16, 256, 32, 2)]]
    out += [(f"prefill {q}/{kv} d{d} g{g}", attention("prefill", q, kv, d, g))
            for q, kv, d, g in [(bf16, bf16, 128, 4), (fp16, fp8, 128, 4), (bf16, bf16, 96, 1), (fp32, fp32, 64, 8),
                                (bf16, bf16, 256, 4)]]
    out += [(f"write {q}->{kv}", cache_write(q, kv)) for q, kv in [(bf16, bf16), (bf16, fp8), (fp32, fp8)]]
    out += [(f"matmul {mode} m{m} {dt} split{s}", matmul(mode, m, dt, split_k=s))
            for mode in ("int8", "int4", "fp8") for m, dt, s in [(1, bf16, 2), (64, fp16, 1), (1024, bf16, 1)]]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 90 (Hopper), 80 (Ampere)")
    arch = parser.parse_args(argv).arch

    # the launchers' CUDA configs, on CPU tensors that are never read
    for module, name in ((decode, "decode_config"), (prefill, "prefill_config"), (qmm, "matmul_config")):
        original = getattr(module, name)
        setattr(module, name, lambda *a, _f=original: _f(*a[:-1], CUDA))
    dot_on_gpu = _launch.fp32_dot
    _launch.fp32_dot = lambda dtype, device: dot_on_gpu(dtype, CUDA)
    _launch.num_sms = lambda device: 132
    _launch.check_runnable = lambda *a: None

    launches: list[Launch] = []
    for module, kernels in ((decode, ("_decode_kernel", "_merge_kernel")), (prefill, ("_prefill_kernel",)),
                            (write, ("_write_kv_kernel",)), (qmm, ("_qmm_kernel",))):
        for name in kernels:
            setattr(module, name, Recorder(getattr(module, name), launches))

    failures = 0
    for label, call in cases():
        launches.clear()
        call()
        for kernel, args, kwargs in list(launches):
            start = time.perf_counter()
            try:
                summary = compile_launch(kernel, args, kwargs, arch)
                print(f"ok   sm_{arch} {kernel.__name__:16} {label} ({time.perf_counter() - start:.1f}s): {summary}",
                      flush=True)
            except Exception:
                failures += 1
                print(f"FAIL sm_{arch} {kernel.__name__:16} {label}\n{traceback.format_exc(limit=3)}", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
