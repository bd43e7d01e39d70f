"""GPU kernel benchmark: paged decode/prefill attention and weight-only quantized matmuls, each timed
against a torch peer in the same run, with correctness against the torch reference beside every timing.

Sections (Llama-3.1-8B shapes: 32 query / 8 KV heads, head_dim 128, hidden 4096, MLP 14336):
- copy: device-to-device copy bandwidth (bytes read + written / time), the yardstick for decode.
- decode: batch {1, 16, 64, 256} x context {1k, 4k, 16k, 64k}, bf16 and fp8 KV: ms, KV bytes read / s,
  fraction of the copy bandwidth (goal >= 0.8 at context >= 4k), vs torch gather + SDPA.
- decode_flex: a few decode shapes vs torch's flex_attention (compiled, contiguous KV, length mask).
- prefill: packed causal prefill, TFLOP/s vs scaled_dot_product_attention (flash) on the same shapes.
- matmul: int8 / int4 / fp8 weights at M = 1, 16, 64, 1024 vs bf16 torch.matmul (goal at M <= 16:
  int4 >= 2.5x, int8 >= 1.6x).
Cases that would not fit in memory or in the time budget are reported as skipped, not dropped.

Prints one JSON line per result and appends it to $OUT/gpu_kernels.jsonl (OUT defaults to ./out).
`--dry-run` runs one tiny case of each section on the CPU through the Triton interpreter, to check
the script itself on a machine without a GPU.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

HEADS, KV_HEADS, HEAD_DIM, BLOCK_SIZE = 32, 8, 128, 16
HIDDEN, INTERMEDIATE = 4096, 14336
GiB = 1 << 30


@dataclass(frozen=True)
class Sizes:
    batches: tuple[int, ...] = (1, 16, 64, 256)
    contexts: tuple[int, ...] = (1024, 4096, 16384, 65536)
    flex_cases: tuple[tuple[int, int], ...] = ((16, 4096), (16, 16384))
    prefill_cases: tuple[tuple[int, int, int], ...] = ((1, 4096, 0), (4, 2048, 0), (16, 512, 0), (4, 1024, 3072))
    matmul_ms: tuple[int, ...] = (1, 16, 64, 1024)
    matmul_shapes: tuple[tuple[str, int, int], ...] = (("gate_up", HIDDEN, INTERMEDIATE), ("down", INTERMEDIATE, HIDDEN))
    heads: tuple[int, int, int] = (HEADS, KV_HEADS, HEAD_DIM)
    copy_bytes: int = 2 * GiB
    check_seqs: int = 2  # sequences checked against the fp32 reference per decode case


DRY_RUN = Sizes(batches=(2,), contexts=(40,), flex_cases=(), prefill_cases=((2, 24, 0), (1, 8, 16)),
                matmul_ms=(2,), matmul_shapes=(("tiny", 256, 48),), heads=(4, 2, 64), copy_bytes=1 << 20)


@dataclass
class Run:
    device: torch.device
    out_file: Path
    budget_s: float
    kv_limit_bytes: int
    start: float = field(default_factory=time.perf_counter)
    meta: dict[str, Any] = field(default_factory=dict)

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def over_budget(self, share: float = 1.0) -> bool:
        return self.elapsed() > self.budget_s * share

    def emit(self, record: dict[str, Any]) -> None:
        line = json.dumps({**record, **self.meta}, default=str)
        print(line, flush=True)
        with self.out_file.open("a") as f:
            f.write(line + "\n")

    def time_ms(self, fn: Callable[[], Any]) -> float:
        """Median milliseconds of fn: triton's do_bench (L2 flushed between runs) on CUDA, a wall clock on CPU."""
        if self.device.type == "cuda":
            import triton.testing

            return float(triton.testing.do_bench(fn, warmup=10, rep=60, return_mode="median"))
        fn()
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return sorted(times)[1] * 1e3

    def free(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.empty_cache()


def _err(actual: torch.Tensor, expected: torch.Tensor) -> dict[str, float]:
    diff = (actual.float() - expected.float()).abs()
    scale = expected.float().abs().max().clamp(min=1e-6)
    return {"max_abs_err": round(diff.max().item(), 6), "rel_err": round((diff.max() / scale).item(), 6)}


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a and b else None


# --- copy bandwidth ------------------------------------------------------------------------------

def bench_copy(run: Run, sizes: Sizes) -> float:
    src = torch.empty(sizes.copy_bytes, dtype=torch.uint8, device=run.device).random_(0, 255)
    dst = torch.empty_like(src)
    ms = run.time_ms(lambda: dst.copy_(src))
    gbps = 2 * src.numel() / ms / 1e6
    run.emit({"bench": "copy", "bytes": src.numel(), "ms": round(ms, 4), "copy_GBps": round(gbps, 1)})
    del src, dst
    run.free()
    return gbps


# --- decode --------------------------------------------------------------------------------------

def _paged_cache(num_blocks: int, kv_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device,
                 scale: float) -> torch.Tensor:
    """Random cache, filled a slice at a time so fp8 needs no full-size bf16 temporary."""
    cache = torch.empty(num_blocks, BLOCK_SIZE, kv_heads, head_dim, dtype=dtype, device=device)
    for chunk in cache.split(max(1, (256 << 20) // max(1, cache[0].numel() * 2))):
        chunk.copy_((torch.randn(chunk.shape, device=device, dtype=torch.bfloat16) / scale).to(dtype))
    return cache


def _decode_inputs(run: Run, sizes: Sizes, batch: int, context: int, kv_dtype: torch.dtype) -> dict[str, Any]:
    heads, kv_heads, head_dim = sizes.heads
    blocks_per_seq = math.ceil(context / BLOCK_SIZE)
    scales = (0.05, 0.04) if kv_dtype == torch.float8_e4m3fn else (1.0, 1.0)
    return {
        "query": torch.randn(batch, heads, head_dim, device=run.device, dtype=torch.bfloat16),
        "k_cache": _paged_cache(batch * blocks_per_seq, kv_heads, head_dim, kv_dtype, run.device, scales[0]),
        "v_cache": _paged_cache(batch * blocks_per_seq, kv_heads, head_dim, kv_dtype, run.device, scales[1]),
        "block_tables": torch.randperm(batch * blocks_per_seq, device=run.device).view(batch, -1).int(),
        "context_lens": torch.full((batch,), context, dtype=torch.int32, device=run.device),
        "scales": scales,
    }


def _torch_decode(x: dict[str, Any], scale: float) -> torch.Tensor:
    """The torch peer: gather every sequence's blocks into a contiguous copy, then SDPA. The query heads
    of one KV head ride as that head's query positions, so no backend has to repeat K/V for GQA."""
    batch, heads, head_dim = x["query"].shape
    k = x["k_cache"][x["block_tables"].long()].flatten(1, 2)  # [B, L, KVH, D]
    v = x["v_cache"][x["block_tables"].long()].flatten(1, 2)
    if k.dtype == torch.float8_e4m3fn:
        k = k.to(torch.bfloat16) * x["scales"][0]
        v = v.to(torch.bfloat16) * x["scales"][1]
    q = x["query"].view(batch, k.shape[2], heads // k.shape[2], head_dim)  # [B, KVH, group, D]
    out = F.scaled_dot_product_attention(q, k.transpose(1, 2), v.transpose(1, 2), scale=scale)
    return out.reshape(batch, heads, head_dim)


def bench_decode(run: Run, sizes: Sizes, copy_gbps: float) -> None:
    from kvpilot.kernels.paged_attention_decode import paged_attention_decode, paged_attention_decode_ref

    heads, kv_heads, head_dim = sizes.heads
    scale = head_dim**-0.5
    for kv_name, kv_dtype in (("bf16", torch.bfloat16), ("fp8", torch.float8_e4m3fn)):
        for context in sizes.contexts:
            for batch in sizes.batches:
                record: dict[str, Any] = {"bench": "decode", "kv_dtype": kv_name, "batch": batch, "context": context}
                kv_bytes = 2 * batch * context * kv_heads * head_dim * kv_dtype.itemsize
                record["kv_bytes"] = kv_bytes
                if kv_bytes > run.kv_limit_bytes:
                    run.emit({**record, "skipped": f"KV {kv_bytes / GiB:.1f} GiB > limit {run.kv_limit_bytes / GiB:.1f}"})
                    continue
                if run.over_budget(0.45):
                    run.emit({**record, "skipped": "time budget"})
                    continue
                x = _decode_inputs(run, sizes, batch, context, kv_dtype)
                args = (x["query"], x["k_cache"], x["v_cache"], x["block_tables"], x["context_lens"], scale,
                        *x["scales"])
                ms = run.time_ms(lambda args=args, c=context: paged_attention_decode(*args, max_context_len=c))
                out = paged_attention_decode(*args, max_context_len=context)
                n = min(batch, sizes.check_seqs)
                expected = paged_attention_decode_ref(x["query"][:n], x["k_cache"], x["v_cache"],
                                                      x["block_tables"][:n], x["context_lens"][:n], scale, *x["scales"])
                record.update({"ms": round(ms, 4), "kv_GBps": round(kv_bytes / ms / 1e6, 1),
                               "copy_fraction": round(kv_bytes / ms / 1e6 / copy_gbps, 3),
                               "goal_met": None if context < 4096 else kv_bytes / ms / 1e6 >= 0.8 * copy_gbps,
                               **_err(out[:n], expected)})
                if kv_bytes * (3 if kv_dtype == torch.float8_e4m3fn else 2) < run.kv_limit_bytes:
                    torch_ms = run.time_ms(lambda x=x: _torch_decode(x, scale))
                    record.update({"torch_ms": round(torch_ms, 4), "speedup_vs_torch": _ratio(torch_ms, ms),
                                   "torch_max_abs_err": _err(out, _torch_decode(x, scale))["max_abs_err"]})
                else:
                    record["torch_ms"] = "skipped: the gathered copy does not fit"
                run.emit(record)
                del x, args, out, expected
                run.free()


def bench_decode_flex(run: Run, sizes: Sizes) -> None:
    """flex_attention on contiguous KV with a length mask: a dense peer, so it reads no block table."""
    from kvpilot.kernels.paged_attention_decode import paged_attention_decode

    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError as e:
        run.emit({"bench": "decode_flex", "skipped": f"flex_attention unavailable: {e}"})
        return
    flex = torch.compile(flex_attention, dynamic=False)
    heads, kv_heads, head_dim = sizes.heads
    for batch, context in sizes.flex_cases:
        record: dict[str, Any] = {"bench": "decode_flex", "kv_dtype": "bf16", "batch": batch, "context": context}
        if run.over_budget(0.8):
            run.emit({**record, "skipped": "time budget"})
            continue
        x = _decode_inputs(run, sizes, batch, context, torch.bfloat16)
        args = (x["query"], x["k_cache"], x["v_cache"], x["block_tables"], x["context_lens"], head_dim**-0.5)
        ms = run.time_ms(lambda args=args, c=context: paged_attention_decode(*args, max_context_len=c))
        k = x["k_cache"][x["block_tables"].long()].flatten(1, 2).transpose(1, 2).contiguous()
        v = x["v_cache"][x["block_tables"].long()].flatten(1, 2).transpose(1, 2).contiguous()
        q = x["query"].unsqueeze(2)
        lens = x["context_lens"]
        try:
            mask = create_block_mask(lambda b, h, qi, kv: kv < lens[b], batch, None, 1, context, device=run.device)
            t0 = time.perf_counter()
            flex_out = flex(q, k, v, block_mask=mask, enable_gqa=True, scale=head_dim**-0.5)
            compile_s = time.perf_counter() - t0
            flex_ms = run.time_ms(lambda: flex(q, k, v, block_mask=mask, enable_gqa=True, scale=head_dim**-0.5))
            record.update({"ms": round(ms, 4), "flex_ms": round(flex_ms, 4), "speedup_vs_flex": _ratio(flex_ms, ms),
                           "flex_compile_s": round(compile_s, 1),
                           **_err(paged_attention_decode(*args, max_context_len=context), flex_out.squeeze(2))})
        except Exception as e:  # a peer that fails is a result to report, not a reason to stop
            record.update({"ms": round(ms, 4), "flex_error": f"{type(e).__name__}: {str(e)[:300]}"})
        run.emit(record)
        del x, k, v, q
        run.free()


# --- prefill -------------------------------------------------------------------------------------

def bench_prefill(run: Run, sizes: Sizes) -> None:
    from kvpilot.kernels.paged_attention_prefill import paged_attention_prefill, paged_attention_prefill_ref

    heads, kv_heads, head_dim = sizes.heads
    scale = head_dim**-0.5
    for batch, q_len, prefix in sizes.prefill_cases:
        record: dict[str, Any] = {"bench": "prefill", "dtype": "bf16", "batch": batch, "q_len": q_len,
                                  "prefix": prefix}
        if run.over_budget(0.7):
            run.emit({**record, "skipped": "time budget"})
            continue
        context = prefix + q_len
        blocks_per_seq = math.ceil(context / BLOCK_SIZE)
        k_cache = _paged_cache(batch * blocks_per_seq, kv_heads, head_dim, torch.bfloat16, run.device, 1.0)
        v_cache = _paged_cache(batch * blocks_per_seq, kv_heads, head_dim, torch.bfloat16, run.device, 1.0)
        tables = torch.randperm(batch * blocks_per_seq, device=run.device).view(batch, -1).int()
        lens = torch.full((batch,), context, dtype=torch.int32, device=run.device)
        cu = torch.arange(0, batch + 1, dtype=torch.int32, device=run.device) * q_len
        query = torch.randn(batch * q_len, heads, head_dim, device=run.device, dtype=torch.bfloat16)
        args = (query, k_cache, v_cache, tables, cu, lens, scale)
        ms = run.time_ms(lambda args=args, q=q_len: paged_attention_prefill(*args, max_query_len=q))
        flops = 4 * batch * (q_len * prefix + q_len * (q_len + 1) // 2) * heads * head_dim
        out = paged_attention_prefill(*args, max_query_len=q_len)
        expected = paged_attention_prefill_ref(query[:q_len], k_cache, v_cache, tables[:1], cu[:2], lens[:1], scale)
        record.update({"ms": round(ms, 4), "TFLOPs": round(flops / ms / 1e9, 1), **_err(out[:q_len], expected)})
        if prefix == 0:
            k = k_cache[tables.long()].flatten(1, 2).transpose(1, 2)  # [B, KVH, L, D]
            v = v_cache[tables.long()].flatten(1, 2).transpose(1, 2)
            q = query.view(batch, q_len, heads, head_dim).transpose(1, 2)
            record.update(_sdpa_peer(run, q, k, v, scale, ms, flops, out.view(batch, q_len, heads, head_dim)))
        else:
            record["sdpa_ms"] = "n/a: SDPA's causal mask cannot offset a chunk after a cached prefix"
        run.emit(record)
        del k_cache, v_cache, query, out
        run.free()


def _sdpa_peer(run: Run, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, ms: float, flops: int,
               ours: torch.Tensor) -> dict[str, Any]:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1).contiguous(), v.repeat_interleave(group, 1).contiguous()
    backends = [SDPBackend.FLASH_ATTENTION] if run.device.type == "cuda" else [SDPBackend.MATH]

    def sdpa() -> torch.Tensor:
        with sdpa_kernel(backends):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)

    try:
        sdpa_ms = run.time_ms(sdpa)
    except RuntimeError as e:
        return {"sdpa_ms": f"failed: {str(e)[:200]}"}
    return {"sdpa_ms": round(sdpa_ms, 4), "sdpa_TFLOPs": round(flops / sdpa_ms / 1e9, 1),
            "speedup_vs_sdpa": _ratio(sdpa_ms, ms), "sdpa_max_abs_err": _err(ours, sdpa().transpose(1, 2))["max_abs_err"],
            "sdpa_backend": backends[0].name}


# --- quantized matmul ----------------------------------------------------------------------------

def bench_matmul(run: Run, sizes: Sizes) -> None:
    from kvpilot.kernels.quant_reference import quantize_fp8, quantize_int4, quantize_int8
    from kvpilot.kernels.quantized_matmul import quantized_matmul, quantized_matmul_ref

    goals = {"int4": 2.5, "int8": 1.6}
    for name, k, n in sizes.matmul_shapes:
        weight = torch.randn(n, k, device=run.device, dtype=torch.bfloat16) * 0.02
        quantized = {"int8": quantize_int8(weight), "int4": quantize_int4(weight), "fp8": quantize_fp8(weight)}
        for m in sizes.matmul_ms:
            if run.over_budget(0.95):
                run.emit({"bench": "matmul", "shape": name, "m": m, "skipped": "time budget"})
                continue
            x = torch.randn(m, k, device=run.device, dtype=torch.bfloat16)
            bf16_ms = run.time_ms(lambda x=x: x @ weight.t())
            for mode, qw in quantized.items():
                ms = run.time_ms(lambda x=x, qw=qw: quantized_matmul(x, qw))
                bytes_read = qw.nbytes + x.numel() * 2
                record = {"bench": "matmul", "shape": name, "m": m, "k": k, "n": n, "mode": mode,
                          "ms": round(ms, 4), "bf16_ms": round(bf16_ms, 4), "speedup_vs_bf16": _ratio(bf16_ms, ms),
                          "weight_GBps": round(bytes_read / ms / 1e6, 1),
                          "TFLOPs": round(2 * m * n * k / ms / 1e9, 1),
                          **_err(quantized_matmul(x, qw), quantized_matmul_ref(x, qw))}
                if m <= 16 and mode in goals:
                    record["goal_met"] = bf16_ms / ms >= goals[mode]
                run.emit(record)
        del weight, quantized
        run.free()


# --- main ----------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "./out"), help="folder for gpu_kernels.jsonl")
    parser.add_argument("--only", default="copy,decode,matmul,prefill,decode_flex",
                        help="comma-separated sections to run (copy is always run for decode)")
    parser.add_argument("--budget-s", type=float, default=200.0, help="stop starting new cases after this long")
    parser.add_argument("--kv-limit-gib", type=float, default=None,
                        help="largest KV cache to allocate (default: a quarter of the GPU's memory)")
    parser.add_argument("--dry-run", action="store_true", help="one tiny case per section on the CPU (interpreter)")
    args = parser.parse_args(argv)
    unknown = set(args.only.split(",")) - {"copy", "decode", "matmul", "prefill", "decode_flex"}
    if unknown:
        parser.error(f"unknown sections {sorted(unknown)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"  # before the kernels import triton
        device, sizes = torch.device("cpu"), DRY_RUN
    elif not torch.cuda.is_available():
        print("no CUDA device: run with --dry-run to check the script on the CPU", file=sys.stderr)
        return 2
    else:
        device, sizes = torch.device("cuda"), Sizes()
    import triton

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        meta = {"device": torch.cuda.get_device_name(device)}
    else:
        total, meta = 8 * GiB, {"device": "cpu (triton interpreter, dry run)"}
    kv_limit = int(args.kv_limit_gib * GiB) if args.kv_limit_gib else total // 4
    run = Run(device, out_dir / "gpu_kernels.jsonl", args.budget_s, kv_limit,
              meta={**meta, "torch": torch.__version__, "triton": triton.__version__})
    sections = args.only.split(",")
    copy_gbps = bench_copy(run, sizes) if {"copy", "decode"} & set(sections) else 0.0
    if "decode" in sections:
        bench_decode(run, sizes, copy_gbps)
    if "matmul" in sections:
        bench_matmul(run, sizes)
    if "prefill" in sections:
        bench_prefill(run, sizes)
    if "decode_flex" in sections and device.type == "cuda":
        bench_decode_flex(run, sizes)
    run.emit({"bench": "done", "wall_s": round(run.elapsed(), 1)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
