"""What bench/gpu_kernels.py's sections share: the sizes, the run (timing, output, failures) and helpers.

Timing, two views of each call:
- `ms`: triton's do_bench, the GPU time alone (median, L2 flushed between runs);
- `wall_ms`: back-to-back calls timed by the host clock, synchronised once at the end: what a caller
  without CUDA graphs sees, the launcher's Python and Triton's launch included. `host_us` is the
  host's own time per call (no synchronisation), the floor of `wall_ms` when kernels are short.
A case whose output differs from its reference by more than its tolerance, or that raises, is a
failure: it is reported in its JSON line and the script exits 1.
"""

from __future__ import annotations

import json
import math
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

HEADS, KV_HEADS, HEAD_DIM, BLOCK_SIZE = 32, 8, 128, 16
HIDDEN, INTERMEDIATE, LAYERS = 4096, 14336, 32
GiB = 1 << 30
# largest relative error (max |ours - reference| / max |reference|) a case may show
TOLERANCE = {"bf16": 2e-2, "fp8": 3e-2, "matmul": 2e-2}


@dataclass(frozen=True)
class Sizes:
    batches: tuple[int, ...] = (1, 4, 16, 64, 256)
    contexts: tuple[int, ...] = (1024, 4096, 16384, 65536)
    sweep_cases: tuple[tuple[int, int], ...] = ((1, 16384), (16, 4096), (64, 2048))  # (batch, context)
    decode_configs: tuple[tuple[int, int, int], ...] = tuple(  # (BLOCK_N, num_warps, num_stages)
        (n, w, s) for n in (32, 64) for w in (4, 8) for s in (2, 3, 5))
    matmul_configs: tuple[tuple[int, int, int], ...] = tuple(  # (BLOCK_N, num_warps, num_stages)
        (n, w, s) for n in (32, 64, 128) for w in (4, 8) for s in (3, 4))
    flex_cases: tuple[tuple[int, int], ...] = ((16, 4096), (16, 16384))
    prefill_cases: tuple[tuple[int, int, int], ...] = ((1, 4096, 0), (4, 2048, 0), (16, 512, 0), (4, 1024, 3072))
    matmul_ms: tuple[int, ...] = (1, 16, 64, 1024)
    matmul_shapes: tuple[tuple[str, int, int], ...] = (("gate_up", HIDDEN, INTERMEDIATE),
                                                        ("down", INTERMEDIATE, HIDDEN))  # (name, K, N)
    heads: tuple[int, int, int] = (HEADS, KV_HEADS, HEAD_DIM)
    norm_tokens: tuple[int, ...] = (1, 16, 64, 256, 4096)
    hidden: int = HIDDEN
    copy_bytes: int = 2 * GiB
    check_seqs: int = 2  # sequences checked against the fp32 reference per decode case
    moe_tokens: tuple[int, ...] = (1, 16, 64, 256, 2048)
    moe_shape: tuple[int, int, int, int] = (128, 8, 2048, 768)  # Qwen3-30B-A3B: experts, top-k, hidden, rows


DRY_RUN = Sizes(batches=(2,), contexts=(40,), sweep_cases=((2, 40),), decode_configs=((16, 4, 1), (32, 4, 1)),
                matmul_configs=((16, 4, 1), (32, 4, 1)), flex_cases=(), prefill_cases=((2, 24, 0), (1, 8, 16)),
                matmul_ms=(2,), matmul_shapes=(("tiny", 256, 48),), heads=(4, 2, 64), norm_tokens=(3,), hidden=256,
                copy_bytes=1 << 20, moe_tokens=(3,), moe_shape=(4, 2, 64, 32))


@dataclass
class Run:
    device: torch.device
    out_file: Path
    budget_s: float
    kv_limit_bytes: int
    start: float = field(default_factory=time.perf_counter)
    meta: dict[str, Any] = field(default_factory=dict)
    failures: int = 0
    tolerance: float | None = None  # one tolerance for every case instead of TOLERANCE's (--tolerance)

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def over_budget(self, share: float = 1.0) -> bool:
        return self.elapsed() > self.budget_s * share

    def emit(self, record: dict[str, Any]) -> None:
        line = json.dumps({**record, **self.meta}, default=str)
        print(line, flush=True)
        with self.out_file.open("a") as f:
            f.write(line + "\n")

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def time_ms(self, fn: Callable[[], Any]) -> float:
        """Median GPU milliseconds of fn: triton's do_bench on CUDA, a wall clock on the CPU."""
        if self.device.type == "cuda":
            import triton.testing

            return float(triton.testing.do_bench(fn, warmup=10, rep=60, return_mode="median"))
        fn()  # the interpreter (dry run): one warm-up, one timed call, enough to check the script
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3

    def wall(self, fn: Callable[[], Any], reps: int = 20) -> dict[str, float]:
        """wall_ms: back-to-back calls, one sync at the end; host_us: the host's time per call alone."""
        reps = reps if self.device.type == "cuda" else 1
        fn()
        self.sync()
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        host = time.perf_counter() - t0
        self.sync()
        wall = time.perf_counter() - t0
        return {"wall_ms": round(wall / reps * 1e3, 4), "host_us": round(host / reps * 1e6, 1)}

    def check(self, record: dict[str, Any], tolerance: float) -> None:
        """Mark the record failed if its rel_err is over `tolerance` (or not a number)."""
        err = record.get("rel_err")
        tolerance = self.tolerance if self.tolerance is not None else tolerance
        record["tolerance"] = tolerance
        if not isinstance(err, float) or not math.isfinite(err) or err > tolerance:
            record["failed"] = f"rel_err {err} over tolerance {tolerance}"
            self.failures += 1

    def guarded(self, record: dict[str, Any], case: Callable[[], dict[str, Any]]) -> None:
        """Run one case into `record`; an exception is a failure reported in the record, not the end of the run."""
        try:
            record.update(case())
        except Exception as e:
            record["failed"] = f"{type(e).__name__}: {str(e)[:300]}"
            record["traceback"] = traceback.format_exc(limit=4)[-1500:]
            self.failures += 1

    def free(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.empty_cache()


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> dict[str, float]:
    diff = (actual.float() - expected.float()).abs()
    scale = expected.float().abs().max().clamp(min=1e-6)
    return {"max_abs_err": round(diff.max().item(), 6), "rel_err": round((diff.max() / scale).item(), 6)}


def ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a and b else None


def paged_cache(num_blocks: int, kv_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device,
                scale: float) -> torch.Tensor:
    """Random cache, filled a slice at a time so fp8 needs no full-size bf16 temporary."""
    cache = torch.empty(num_blocks, BLOCK_SIZE, kv_heads, head_dim, dtype=dtype, device=device)
    for chunk in cache.split(max(1, (256 << 20) // max(1, cache[0].numel() * 2))):
        chunk.copy_((torch.randn(chunk.shape, device=device, dtype=torch.bfloat16) / scale).to(dtype))
    return cache
