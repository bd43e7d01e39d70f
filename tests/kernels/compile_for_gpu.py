"""Compile every kernel variant the launchers produce, for GPU targets, on a machine without a GPU.

The interpreter accepts code the GPU compiler rejects (tile shapes, dtype mixes in tl.dot, ...) and says
nothing about registers. Triton's CUDA backend (ptxas included) compiles to a cubin without a device, so
this script runs the real launchers on CPU tensors with their CUDA configs for each `--arch`, records
each kernel launch (argument types, constexprs, num_warps/num_stages) instead of running it, compiles
it, and prints one line per kernel: registers, spill bytes and shared memory (from ptxas), then what the
PTX shows: asynchronous copies (software pipelining), 16-byte vector loads, tensor-core instructions,
and the machine instructions of the main loop (one K tile of the matmul, one K/V tile of attention).

It fails (exit 1) when a variant does not compile, when a variant real models use spills (head_dim
64-256, GQA 1-16, bf16/fp16 queries with a bf16/fp16/fp8 cache, on sm_80/sm_89/sm_90; fp8 not on
sm_80, where the launchers refuse it), or when a property a kernel depends on is missing from its code
(the int4 matmul's K loop pipelined, decode's K/V loads double-buffered, the fp8 cache write's division
rounded to nearest). fp32 variants are compiled and reported but may spill: fp32 on a GPU is correct
and slow (a checking path, not a serving one). Run it in a process without TRITON_INTERPRET
(tests/kernels/test_gpu_compile.py does).

    python tests/kernels/compile_for_gpu.py [--arch 80,89,90] [--full]

The default matrix (about 3 minutes on 2 CPU cores for three architectures) takes each distinct tile
shape once; `--full` crosses every head_dim {64, 80, 96, 128, 256}, GQA {1, 2, 4, 5, 8, 16} and dtype
pair (about 40 minutes).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    sys.exit("run without TRITON_INTERPRET: the interpreter has no compiler to check")

import torch
import triton
from triton import knobs
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import JITFunction, mangle_type

from kvpilot.kernels import _launch
from kvpilot.kernels import fused_moe as moe
from kvpilot.kernels import paged_attention_decode as decode
from kvpilot.kernels import paged_attention_prefill as prefill
from kvpilot.kernels import quantized_matmul as qmm
from kvpilot.kernels import write_kv_cache as write
from kvpilot.kernels.quant_reference import quantize_fp8, quantize_int4, quantize_int8

CUDA = torch.device("cuda")
NVDISASM = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "nvdisasm")
LAUNCH_OPTIONS = ("num_warps", "num_stages")
BF16, FP16, FP32, FP8 = torch.bfloat16, torch.float16, torch.float32, torch.float8_e4m3fn
Launch = tuple[JITFunction, tuple[Any, ...], dict[str, Any]]


@dataclass(frozen=True)
class Stats:
    registers: int
    spill_bytes: int
    shared: int
    cp_async: int
    ld_v4: int
    wgmma: int
    mma: int
    loop_instructions: int
    approx_div: int

    def __str__(self) -> str:
        return (f"regs {self.registers}, spills {self.spill_bytes} B, shared {self.shared} B, "
                f"cp.async {self.cp_async}, ld.v4 {self.ld_v4}, wgmma {self.wgmma}, mma {self.mma}, "
                f"main loop {self.loop_instructions} SASS instr")


@dataclass(frozen=True)
class Variant:
    label: str
    call: Callable[[], None]
    must_not_spill: bool = True  # the variants real models serve with
    expect: Callable[[Stats], str | None] = lambda stats: None  # a property of the code, or why it is missing


class Recorder:
    """Stands in for a @triton.jit kernel: `kernel[grid](*args, **kwargs)` records instead of launching."""

    def __init__(self, kernel: JITFunction, launches: list[Launch]) -> None:
        self.kernel, self.launches = kernel, launches

    def __getitem__(self, grid: object) -> Callable[..., None]:
        return lambda *args, **kwargs: self.launches.append((self.kernel, args, kwargs))


def main_loop_instructions(cubin: bytes) -> int:
    """SASS instructions between a label and the backward branch to it, for the longest such loop (the
    machine code ptxas made, disassembled by the nvdisasm Triton ships)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        sass = subprocess.run([NVDISASM, "-c", f.name], capture_output=True, text=True, check=True).stdout
    lines = sass.splitlines()
    labels = {m.group(1): i for i, line in enumerate(lines) if (m := re.match(r"(\.L_x_\d+):", line.strip()))}
    longest = 0
    for i, line in enumerate(lines):
        target = re.search(r"\bBRA `\((\.L_x_\d+)\)", line)
        if target and labels.get(target.group(1), i) < i:
            body = lines[labels[target.group(1)]:i + 1]
            longest = max(longest, sum(1 for b in body if re.match(r"\s*/\*[0-9a-f]+\*/", b)))
    return longest if longest > 2 else 0  # the one-instruction self-branch after EXIT is no loop


def ptxas_numbers(log: str) -> tuple[int, int]:
    registers = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    if registers is None or spills is None:
        raise RuntimeError(f"no register/spill report in the ptxas log:\n{log}")
    return int(registers.group(1)), int(spills.group(1)) + int(spills.group(2))


def compile_launch(kernel: JITFunction, args: tuple[Any, ...], kwargs: dict[str, Any], arch: int) -> Stats:
    """Compile one recorded launch the way Triton specialises it for contiguous tensors (integer arguments
    equal to 1 become constants, pointers and multiples of 16 are marked 16-divisible)."""
    names = kernel.arg_names
    options = {k: v for k, v in kwargs.items() if k in LAUNCH_OPTIONS}
    constexprs = {k: v for k, v in kwargs.items() if k not in LAUNCH_OPTIONS}
    constexprs.update({n: 1 for n, v in zip(names, args, strict=False) if type(v) is int and v == 1})
    values = [*args, *[constexprs.get(n) for n in names[len(args):]]]
    signature = {n: "constexpr" if n in constexprs else mangle_type(v) for n, v in zip(names, values, strict=True)}
    attrs = {(i,): [["tt.divisibility", 16]] for i, v in enumerate(args)
             if names[i] not in constexprs and (isinstance(v, torch.Tensor) or (type(v) is int and v % 16 == 0))}
    log = io.StringIO()
    with contextlib.redirect_stdout(log):  # dump_ptxas_log prints ptxas' -v report
        compiled = triton.compile(ASTSource(kernel, signature, constexprs, attrs),
                                  target=GPUTarget("cuda", arch, 32), options=options)
    ptx = compiled.asm["ptx"]
    registers, spills = ptxas_numbers(log.getvalue())
    return Stats(registers, spills, compiled.metadata.shared, ptx.count("cp.async.c"), ptx.count("ld.global.v4"),
                 ptx.count("wgmma.mma_async"), ptx.count("mma.sync"), main_loop_instructions(compiled.asm["cubin"]),
                 len(re.findall(r"div\.(?:full|approx)\.f32", ptx)))


def attention(kind: str, dtype: torch.dtype, kv_dtype: torch.dtype, head_dim: int, group: int,
              splits: int = 1) -> Callable[[], None]:
    def run() -> None:
        cache = torch.zeros(8, 16, 2, head_dim, dtype=kv_dtype)
        tables = torch.zeros(2, 4, dtype=torch.int32)
        lens = torch.full((2,), 40, dtype=torch.int32)
        if kind == "decode":
            query = torch.zeros(2, 2 * group, head_dim, dtype=dtype)
            decode.paged_attention_decode(query, cache, cache, tables, lens, 0.1, max_context_len=40,
                                          num_splits=splits)
        else:
            query = torch.zeros(6, 2 * group, head_dim, dtype=dtype)
            cu = torch.tensor([0, 2, 6], dtype=torch.int32)
            prefill.paged_attention_prefill(query, cache, cache, tables, cu, lens, 0.1, max_query_len=4)
    return run


def attention_variants(arch: int, full: bool) -> list[Variant]:
    pairs = [(BF16, BF16), (FP16, FP16), (BF16, FP8), (FP16, FP8)]
    if full:
        shapes = [(d, g) for d in (64, 80, 96, 128, 256) for g in (1, 2, 4, 5, 8, 16)]
    else:  # each decode/prefill tile shape once (BLOCK_D 64/128/256, the group's padding), both cache kinds
        shapes = [(64, 8), (128, 1), (128, 4), (96, 5), (128, 16), (256, 8)]
        pairs = [(BF16, BF16), (BF16, FP8)]
    out = []
    for q, kv in pairs:
        if kv == FP8 and arch < 89:
            continue
        for d, g in shapes:
            name = f"{str(q)[6:]}/{str(kv)[6:]} d{d} g{g}"
            out.append(Variant(f"decode {name} splits4", attention("decode", q, kv, d, g, splits=4),
                               expect=double_buffered(q, kv, d)))
            if full or (d, g) == (128, 4):
                out.append(Variant(f"decode {name} splits1", attention("decode", q, kv, d, g),
                                   expect=double_buffered(q, kv, d)))
            out.append(Variant(f"prefill {name}", attention("prefill", q, kv, d, g)))
    if not full:
        out += [Variant("decode float16/float16 d128 g4 splits4", attention("decode", FP16, FP16, 128, 4, 4),
                        expect=double_buffered(FP16, FP16, 128)),
                Variant("prefill float16/float16 d128 g4", attention("prefill", FP16, FP16, 128, 4))]
        if arch >= 89:
            out += [Variant("decode float16/float8_e4m3fn d128 g4 splits4", attention("decode", FP16, FP8, 128, 4, 4),
                            expect=double_buffered(FP16, FP8, 128)),
                    Variant("prefill float16/float8_e4m3fn d128 g4", attention("prefill", FP16, FP8, 128, 4))]
    # beyond real models: a 128-head group (tiled over head tiles) and fp32, reported, allowed to spill
    out += [Variant("decode bfloat16/bfloat16 d128 g128 splits2", attention("decode", BF16, BF16, 128, 128, 2),
                    must_not_spill=False),
            Variant("decode float32/float32 d128 g4 splits2", attention("decode", FP32, FP32, 128, 4, 2), False),
            Variant("prefill float32/float32 d128 g4", attention("prefill", FP32, FP32, 128, 4), False)]
    return out


def pipelined(stats: Stats) -> str | None:
    return None if stats.cp_async else "the K loop has no asynchronous copies (not software-pipelined)"


def double_buffered(query_dtype: torch.dtype, kv_dtype: torch.dtype, head_dim: int) -> Callable[[Stats], str | None]:
    """Decode's K/V loads overlap the previous tile's math: they are asynchronous copies into shared
    memory that holds at least two K/V tiles (the config's BLOCK_N tokens x head_dim, K and V)."""
    def check(stats: Stats) -> str | None:
        config = decode.decode_config(head_dim, query_dtype, kv_dtype, CUDA)
        tile = 2 * config["BLOCK_N"] * max(16, _launch.next_pow2(head_dim)) * kv_dtype.itemsize
        if not stats.cp_async:
            return "the decode K/V loads are not asynchronous copies (single-buffered)"
        if stats.shared < 2 * tile:
            return f"shared memory ({stats.shared} B) holds fewer than two K/V tiles of {tile} B (single-buffered)"
        return None
    return check


def rounded_division(stats: Stats) -> str | None:
    return "approximate fp32 division in the fp8 write (not bit-exact)" if stats.approx_div else None


def matmul_variants(arch: int) -> list[Variant]:
    def matmul(mode: str, m: int, dtype: torch.dtype, k: int, split_k: int | None) -> Callable[[], None]:
        quantize = {"int8": lambda w: quantize_int8(w, dtype), "int4": lambda w: quantize_int4(w, compute_dtype=dtype),
                    "fp8": quantize_fp8}[mode]
        weight = quantize(torch.randn(128, k))
        return lambda: qmm.quantized_matmul(torch.zeros(m, k, dtype=dtype), weight, split_k=split_k)

    out = []
    for mode in ("int8", "int4", "fp8"):
        if mode == "fp8" and arch < 89:
            continue
        for m, dtype, k, split in [(1, BF16, 4096, 4), (16, FP16, 4096, 1), (64, FP16, 4096, 1),
                                   (1024, BF16, 4096, 1), (3, BF16, 200, 1)]:
            check = pipelined if mode == "int4" and m <= 64 and k % 128 == 0 else (lambda stats: None)
            # K = 200 (not a whole number of K tiles, no real layer has it) takes the masked loop: reported
            out.append(Variant(f"matmul {mode} m{m} k{k} {str(dtype)[6:]} split{split}",
                               matmul(mode, m, dtype, k, split), must_not_spill=k % 128 == 0, expect=check))
        out.append(Variant(f"matmul {mode} m16 k4096 float32 split2", matmul(mode, 16, FP32, 4096, 2),
                           must_not_spill=False))
    return out


def moe_variants(arch: int) -> list[Variant]:
    """Qwen3-30B-A3B's expert shape (hidden 2048, 768 rows, top-8; 4 experts stand in for 128: the
    count changes no code) at decode (8 routed copies: 16-row blocks) and prefill (4096 copies)."""
    def fused(tokens: int, dtype: torch.dtype, weight_dtype: torch.dtype | None = None) -> Callable[[], None]:
        x = torch.zeros(tokens, 2048, dtype=dtype)
        weight_dtype = weight_dtype or dtype
        w13, w2 = torch.zeros(4, 2 * 768, 2048, dtype=weight_dtype), torch.zeros(4, 2048, 768, dtype=weight_dtype)
        scales = (torch.ones(4, 2 * 768), torch.ones(4, 2048)) if weight_dtype != dtype else ()
        ids = torch.randint(0, 4, (tokens, 8))
        return lambda: moe.fused_moe(x, w13, w2, torch.ones(tokens, 8), ids, *scales)

    cases = [(1, BF16, None), (1, FP16, None), (512, BF16, None), (4, FP32, None), (1, BF16, torch.int8),
             (512, BF16, torch.int8)] + ([(1, BF16, FP8), (512, BF16, FP8)] if arch >= 89 else [])
    return [Variant(f"moe t{tokens} top8 {str(dtype)[6:]}" + (f" {str(w)[6:]} experts" if w else ""),
                    fused(tokens, dtype, w), must_not_spill=dtype != FP32) for tokens, dtype, w in cases]


def write_variants(arch: int) -> list[Variant]:
    def cache_write(dtype: torch.dtype, kv_dtype: torch.dtype) -> Callable[[], None]:
        key = torch.zeros(3, 8, 128, dtype=dtype)
        cache = torch.zeros(4, 16, 8, 128, dtype=kv_dtype)
        return lambda: write.write_kv_cache(key, key, cache, cache, torch.arange(3), 0.3, 0.3)

    pairs = [(BF16, BF16), (FP16, FP16)] + ([(BF16, FP8), (FP16, FP8), (FP32, FP8)] if arch >= 89 else [])
    return [Variant(f"write {str(q)[6:]}->{str(kv)[6:]}", cache_write(q, kv), expect=rounded_division)
            for q, kv in pairs]


def target_gpu(arch: int) -> None:
    """Make the launchers take their CUDA paths on CPU tensors that are never read, for `arch`."""
    _launch.device_capability = lambda device: divmod(arch, 10)
    _launch.is_gpu = lambda device: True
    _launch.num_sms = lambda device: 132
    _launch.check_runnable = lambda *a: None


def run_arch(arch: int, full: bool, only: str, launches: list[Launch]) -> int:
    target_gpu(arch)
    failures = 0
    for variant in attention_variants(arch, full) + matmul_variants(arch) + moe_variants(arch) + write_variants(arch):
        if only not in variant.label:
            continue
        launches.clear()
        variant.call()
        for kernel, args, kwargs in list(launches):
            start = time.perf_counter()
            name = f"sm_{arch} {kernel.__name__:16} {variant.label}"
            try:
                stats = compile_launch(kernel, args, kwargs, arch)
            except Exception:
                failures += 1
                print(f"FAIL {name}\n{traceback.format_exc(limit=3)}", flush=True)
                continue
            problem = variant.expect(stats) if kernel.__name__ != "_merge_kernel" else None
            if stats.spill_bytes and variant.must_not_spill:
                problem = f"spills {stats.spill_bytes} bytes"
            failures += problem is not None
            status = "FAIL" if problem else ("slow" if stats.spill_bytes else "ok  ")
            print(f"{status} {name} ({time.perf_counter() - start:.1f}s): {stats}"
                  + (f" -- {problem}" if problem else ""), flush=True)
    return failures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="80,89,90", help="compute capabilities, e.g. 90 (Hopper) or 80,89,90")
    parser.add_argument("--full", action="store_true", help="every head_dim x GQA x dtype pair (slow)")
    parser.add_argument("--only", default="", help="only the variants whose label contains this, e.g. 'decode'")
    options = parser.parse_args(argv)
    knobs.nvidia.dump_ptxas_log = True
    knobs.compilation.always_compile = True  # a cache hit would skip ptxas and its report

    launches: list[Launch] = []
    for module, kernels in ((decode, ("_decode_kernel", "_merge_kernel")), (prefill, ("_prefill_kernel",)),
                            (write, ("_write_kv_kernel",)), (qmm, ("_qmm_kernel",)),
                            (moe, ("_moe_gate_up_kernel", "_moe_down_kernel"))):
        for name in kernels:
            setattr(module, name, Recorder(getattr(module, name), launches))
    failures = sum(run_arch(int(arch), options.full, options.only, launches) for arch in options.arch.split(","))
    print(f"{failures} failure(s)" if failures else "all variants compile; no real-model variant spills", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
