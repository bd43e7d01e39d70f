"""GPU kernel benchmark: paged decode/prefill attention and weight-only quantized matmuls, each timed
against a torch peer in the same run, with correctness against the torch reference beside every timing.

Sections (Llama-3.1-8B shapes: 32 query / 8 KV heads, head_dim 128, hidden 4096, MLP 14336):
- copy: device-to-device copy bandwidth (bytes read + written / time), the yardstick for decode.
- decode: batch {1, 16, 64, 256} x context {1k, 4k, 16k, 64k}, bf16 and fp8 KV: ms, KV bytes read / s,
  fraction of the copy bandwidth (goal >= 0.8 at context >= 4k), vs torch gather + SDPA.
- decode_flex: a few decode shapes vs torch's flex_attention (compiled, contiguous KV, length mask).
- prefill: packed causal prefill, TFLOP/s vs scaled_dot_product_attention (flash) on the same shapes
  (a chunk after a cached prefix: SDPA with a bottom-right causal bias, on K/V already contiguous).
- matmul: int8 / int4 / fp8 weights at M = 1, 16, 64, 1024 vs bf16 torch.matmul (goal at M <= 16:
  int4 >= 2.5x, int8 >= 1.6x).
- norm_rope: the decision on fused rms_norm / RoPE kernels (issue #4, point 5: "if the profile says
  they pay"), measured instead of written: the runtime's own torch RMSNorm and rotary embedding at
  1..4096 tokens against the floor a fused kernel could reach (its bytes at the copy bandwidth).
  The saving per decode step, (torch - floor) x 32 layers, is set against the step's own floor
  (reading 16 GB of bf16 weights at the copy bandwidth); `pays` says whether it is >= 5% of that.
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
HIDDEN, INTERMEDIATE, LAYERS = 4096, 14336, 32
WEIGHT_BYTES = 16_060_000_000  # Llama-3.1-8B in bf16: what one decode step must read at least
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
FUSION_PAYS = 0.05  # a fused norm/RoPE kernel is worth writing if it saves this share of a decode step
GiB = 1 << 30


@dataclass(frozen=True)
class Sizes:
    batches: tuple[int, ...] = (1, 16, 64, 256)
    contexts: tuple[int, ...] = (1024, 4096, 16384, 65536)
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


DRY_RUN = Sizes(batches=(2,), contexts=(40,), flex_cases=(), prefill_cases=((2, 24, 0), (1, 8, 16)),
                matmul_ms=(2,), matmul_shapes=(("tiny", 256, 48),), heads=(4, 2, 64), norm_tokens=(3,), hidden=256,
                copy_bytes=1 << 20)


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
    return gbps


# --- decode --------------------------------------------------------------------------------------

def _paged_cache(num_blocks: int, kv_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device,
                 scale: float) -> torch.Tensor:
    """Random cache, filled a slice at a time so fp8 needs no full-size bf16 temporary."""
    cache = torch.empty(num_blocks, BLOCK_SIZE, kv_heads, head_dim, dtype=dtype, device=device)
    for chunk in cache.split(max(1, (256 << 20) // max(1, cache[0].numel() * 2))):
        chunk.copy_((torch.randn(chunk.shape, device=device, dtype=torch.bfloat16) / scale).to(dtype))
    return cache


@dataclass
class DecodeInputs:
    query: torch.Tensor
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    block_tables: torch.Tensor
    context_lens: torch.Tensor
    context: int
    k_scale: float
    v_scale: float

    @classmethod
    def random(cls, run: Run, sizes: Sizes, batch: int, context: int, kv_dtype: torch.dtype) -> DecodeInputs:
        heads, kv_heads, head_dim = sizes.heads
        blocks = batch * math.ceil(context / BLOCK_SIZE)
        k_scale, v_scale = (0.05, 0.04) if kv_dtype == torch.float8_e4m3fn else (1.0, 1.0)
        return cls(torch.randn(batch, heads, head_dim, device=run.device, dtype=torch.bfloat16),
                   _paged_cache(blocks, kv_heads, head_dim, kv_dtype, run.device, k_scale),
                   _paged_cache(blocks, kv_heads, head_dim, kv_dtype, run.device, v_scale),
                   torch.randperm(blocks, device=run.device).view(batch, -1).int(),
                   torch.full((batch,), context, dtype=torch.int32, device=run.device), context, k_scale, v_scale)

    def args(self, seqs: int | None = None) -> tuple:
        rows = slice(0, seqs)
        return (self.query[rows], self.k_cache, self.v_cache, self.block_tables[rows], self.context_lens[rows],
                self.query.shape[-1] ** -0.5, self.k_scale, self.v_scale)

    def contiguous_kv(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every sequence's K and V gathered out of the paged cache, [B, KVH, L, D], bf16."""
        out = []
        for cache, scale in ((self.k_cache, self.k_scale), (self.v_cache, self.v_scale)):
            kv = cache[self.block_tables.long()].flatten(1, 2)[:, : self.context]
            if kv.dtype == torch.float8_e4m3fn:
                kv = kv.to(torch.bfloat16) * scale
            out.append(kv.transpose(1, 2))
        return out[0], out[1]


def _torch_decode(x: DecodeInputs) -> torch.Tensor:
    """The torch peer: gather every sequence's blocks into a contiguous copy, then SDPA. The query heads
    of one KV head ride as that head's query positions, so no backend has to repeat K/V for GQA."""
    batch, heads, head_dim = x.query.shape
    k, v = x.contiguous_kv()
    q = x.query.view(batch, k.shape[1], heads // k.shape[1], head_dim)  # [B, KVH, group, D]
    return F.scaled_dot_product_attention(q, k, v, scale=head_dim**-0.5).reshape(batch, heads, head_dim)


def _decode_case(run: Run, sizes: Sizes, x: DecodeInputs, kv_bytes: int, copy_gbps: float) -> dict[str, Any]:
    from kvpilot.kernels.paged_attention_decode import paged_attention_decode, paged_attention_decode_ref

    ms = run.time_ms(lambda: paged_attention_decode(*x.args(), max_context_len=x.context))
    out = paged_attention_decode(*x.args(), max_context_len=x.context)
    n = sizes.check_seqs
    gbps = kv_bytes / ms / 1e6
    record = {"ms": round(ms, 4), "kv_GBps": round(gbps, 1), "copy_fraction": round(gbps / copy_gbps, 3),
              "goal_met": None if x.context < 4096 else gbps >= 0.8 * copy_gbps,
              **_err(out[:n], paged_attention_decode_ref(*x.args(n)))}
    if kv_bytes * (3 if x.k_cache.dtype == torch.float8_e4m3fn else 2) < run.kv_limit_bytes:
        torch_ms = run.time_ms(lambda: _torch_decode(x))
        record.update({"torch_ms": round(torch_ms, 4), "speedup_vs_torch": _ratio(torch_ms, ms),
                       "torch_max_abs_err": _err(out, _torch_decode(x))["max_abs_err"]})
    else:
        record["torch_ms"] = "skipped: the gathered copy does not fit"
    return record


def bench_decode(run: Run, sizes: Sizes, copy_gbps: float) -> None:
    _, kv_heads, head_dim = sizes.heads
    for kv_name, kv_dtype in (("bf16", torch.bfloat16), ("fp8", torch.float8_e4m3fn)):
        for context in sizes.contexts:
            for batch in sizes.batches:
                kv_bytes = 2 * batch * context * kv_heads * head_dim * kv_dtype.itemsize
                record = {"bench": "decode", "kv_dtype": kv_name, "batch": batch, "context": context,
                          "kv_bytes": kv_bytes}
                if kv_bytes > run.kv_limit_bytes:
                    record["skipped"] = f"KV {kv_bytes / GiB:.1f} GiB > limit {run.kv_limit_bytes / GiB:.1f}"
                elif run.over_budget(0.45):
                    record["skipped"] = "time budget"
                else:
                    x = DecodeInputs.random(run, sizes, batch, context, kv_dtype)
                    record.update(_decode_case(run, sizes, x, kv_bytes, copy_gbps))
                    del x
                    run.free()
                run.emit(record)


def _flex_case(run: Run, x: DecodeInputs) -> dict[str, Any]:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    from kvpilot.kernels.paged_attention_decode import paged_attention_decode

    flex = torch.compile(flex_attention, dynamic=False)
    batch, _, head_dim = x.query.shape
    k, v = (t.contiguous() for t in x.contiguous_kv())
    q = x.query.unsqueeze(2)
    lens = x.context_lens
    mask = create_block_mask(lambda b, h, qi, kv: kv < lens[b], batch, None, 1, x.context, device=run.device)

    def peer() -> torch.Tensor:
        return flex(q, k, v, block_mask=mask, enable_gqa=True, scale=head_dim**-0.5)

    t0 = time.perf_counter()
    flex_out = peer()
    compile_s = time.perf_counter() - t0
    ms = run.time_ms(lambda: paged_attention_decode(*x.args(), max_context_len=x.context))
    flex_ms = run.time_ms(peer)
    return {"ms": round(ms, 4), "flex_ms": round(flex_ms, 4), "speedup_vs_flex": _ratio(flex_ms, ms),
            "flex_compile_s": round(compile_s, 1),
            **_err(paged_attention_decode(*x.args(), max_context_len=x.context), flex_out.squeeze(2))}


def bench_decode_flex(run: Run, sizes: Sizes) -> None:
    """flex_attention on contiguous KV with a length mask: a dense peer, so it reads no block table."""
    for batch, context in sizes.flex_cases:
        record: dict[str, Any] = {"bench": "decode_flex", "kv_dtype": "bf16", "batch": batch, "context": context}
        if run.over_budget(0.8):
            record["skipped"] = "time budget"
        else:
            try:
                record.update(_flex_case(run, DecodeInputs.random(run, sizes, batch, context, torch.bfloat16)))
            except Exception as e:  # a peer that fails is a result to report, not a reason to stop
                record["flex_error"] = f"{type(e).__name__}: {str(e)[:300]}"
            run.free()
        run.emit(record)


# --- prefill -------------------------------------------------------------------------------------

def _prefill_case(run: Run, sizes: Sizes, batch: int, q_len: int, prefix: int) -> dict[str, Any]:
    from kvpilot.kernels.paged_attention_prefill import paged_attention_prefill, paged_attention_prefill_ref

    heads, kv_heads, head_dim = sizes.heads
    scale = head_dim**-0.5
    context = prefix + q_len
    blocks = batch * math.ceil(context / BLOCK_SIZE)
    k_cache = _paged_cache(blocks, kv_heads, head_dim, torch.bfloat16, run.device, 1.0)
    v_cache = _paged_cache(blocks, kv_heads, head_dim, torch.bfloat16, run.device, 1.0)
    tables = torch.randperm(blocks, device=run.device).view(batch, -1).int()
    lens = torch.full((batch,), context, dtype=torch.int32, device=run.device)
    cu = torch.arange(0, batch + 1, dtype=torch.int32, device=run.device) * q_len
    query = torch.randn(batch * q_len, heads, head_dim, device=run.device, dtype=torch.bfloat16)
    args = (query, k_cache, v_cache, tables, cu, lens, scale)
    ms = run.time_ms(lambda: paged_attention_prefill(*args, max_query_len=q_len))
    flops = 4 * batch * (q_len * prefix + q_len * (q_len + 1) // 2) * heads * head_dim
    out = paged_attention_prefill(*args, max_query_len=q_len)
    expected = paged_attention_prefill_ref(query[:q_len], k_cache, v_cache, tables[:1], cu[:2], lens[:1], scale)
    record = {"ms": round(ms, 4), "TFLOPs": round(flops / ms / 1e9, 1), **_err(out[:q_len], expected)}
    k = k_cache[tables.long()].flatten(1, 2)[:, :context].transpose(1, 2)  # [B, KVH, context, D]
    v = v_cache[tables.long()].flatten(1, 2)[:, :context].transpose(1, 2)
    q = query.view(batch, q_len, heads, head_dim).transpose(1, 2)
    return {**record, **_sdpa_peer(run, q, k, v, scale, ms, flops, out.view(batch, q_len, heads, head_dim))}


def _sdpa_peer(run: Run, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, ms: float, flops: int,
               ours: torch.Tensor) -> dict[str, Any]:
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.bias import causal_lower_right

    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1).contiguous(), v.repeat_interleave(group, 1).contiguous()
    backends = [SDPBackend.FLASH_ATTENTION] if run.device.type == "cuda" else [SDPBackend.MATH]
    # a chunk after a cached prefix is causal aligned to the bottom right, which flash runs without a mask
    chunked = q.shape[2] != k.shape[2]
    mask = causal_lower_right(q.shape[2], k.shape[2]) if chunked else None

    def sdpa() -> torch.Tensor:
        with sdpa_kernel(backends):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=not chunked, scale=scale)

    try:
        sdpa_ms = run.time_ms(sdpa)
    except RuntimeError as e:
        return {"sdpa_ms": f"failed: {str(e)[:200]}"}
    return {"sdpa_ms": round(sdpa_ms, 4), "sdpa_TFLOPs": round(flops / sdpa_ms / 1e9, 1),
            "speedup_vs_sdpa": _ratio(sdpa_ms, ms), "sdpa_backend": backends[0].name,
            "sdpa_max_abs_err": _err(ours, sdpa().transpose(1, 2))["max_abs_err"]}


def bench_prefill(run: Run, sizes: Sizes) -> None:
    for batch, q_len, prefix in sizes.prefill_cases:
        record = {"bench": "prefill", "dtype": "bf16", "batch": batch, "q_len": q_len, "prefix": prefix}
        if run.over_budget(0.7):
            record["skipped"] = "time budget"
        else:
            record.update(_prefill_case(run, sizes, batch, q_len, prefix))
            run.free()
        run.emit(record)


# --- quantized matmul ----------------------------------------------------------------------------

GOALS = {"int4": 2.5, "int8": 1.6}  # speed-up over bf16 wanted at M <= 16


def _matmul_cases(run: Run, sizes: Sizes, name: str, k: int, n: int) -> None:
    from kvpilot.kernels.quant_reference import quantize_fp8, quantize_int4, quantize_int8
    from kvpilot.kernels.quantized_matmul import quantized_matmul, quantized_matmul_ref

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
            record = {"bench": "matmul", "shape": name, "m": m, "k": k, "n": n, "mode": mode,
                      "ms": round(ms, 4), "bf16_ms": round(bf16_ms, 4), "speedup_vs_bf16": _ratio(bf16_ms, ms),
                      "weight_GBps": round((qw.nbytes + x.numel() * 2) / ms / 1e6, 1),
                      "TFLOPs": round(2 * m * n * k / ms / 1e9, 1),
                      **_err(quantized_matmul(x, qw), quantized_matmul_ref(x, qw))}
            if m <= 16 and mode in GOALS:
                record["goal_met"] = bf16_ms / ms >= GOALS[mode]
            run.emit(record)


def bench_matmul(run: Run, sizes: Sizes) -> None:
    for name, k, n in sizes.matmul_shapes:
        _matmul_cases(run, sizes, name, k, n)
        run.free()


# --- rms_norm and RoPE: would fused kernels pay? -------------------------------------------------

def bench_norm_rope(run: Run, sizes: Sizes, copy_gbps: float) -> None:
    """Per layer a Llama runs two RMSNorms (several elementwise kernels each in torch) and one RoPE of q and k.
    A fused kernel cannot beat its own bytes at the copy bandwidth, so (torch - that floor) bounds what
    fusing saves; it pays if 32 layers of it are >= FUSION_PAYS of a decode step's weight-read floor."""
    from kvpilot.runtime.models.layers import RMSNorm, RotaryEmbedding

    heads, kv_heads, head_dim = sizes.heads
    dtype = torch.bfloat16
    norm = RMSNorm(sizes.hidden, 1e-5).to(run.device, dtype)
    rotary = RotaryEmbedding(head_dim, 8192, 500000.0, LLAMA3_ROPE)
    rotary.build_tables(run.device)
    step_floor_ms = WEIGHT_BYTES / copy_gbps / 1e6
    for tokens in sizes.norm_tokens:
        if run.over_budget(0.9):
            run.emit({"bench": "norm_rope", "tokens": tokens, "skipped": "time budget"})
            continue
        x = torch.randn(tokens, sizes.hidden, device=run.device, dtype=dtype)
        q = torch.randn(tokens, heads, head_dim, device=run.device, dtype=dtype)
        k = torch.randn(tokens, kv_heads, head_dim, device=run.device, dtype=dtype)
        positions = torch.randint(0, 8192, (tokens,), device=run.device)
        with torch.no_grad():
            norm_ms = run.time_ms(lambda x=x: norm(x))
            rope_ms = run.time_ms(lambda q=q, k=k, positions=positions: rotary(positions, q, k))
        norm_bytes = 2 * x.numel() * x.element_size() + sizes.hidden * 2
        rope_bytes = 2 * (q.numel() + k.numel()) * q.element_size() + tokens * head_dim * 4  # + cos/sin rows
        layer_ms = 2 * norm_ms + rope_ms
        floor_ms = (2 * norm_bytes + rope_bytes) / copy_gbps / 1e6
        saving_ms = LAYERS * (layer_ms - floor_ms)
        run.emit({"bench": "norm_rope", "tokens": tokens, "rms_norm_ms": round(norm_ms, 4),
                  "rope_ms": round(rope_ms, 4), "fused_floor_ms_per_layer": round(floor_ms, 4),
                  "saving_ms_per_step": round(saving_ms, 3), "step_floor_ms": round(step_floor_ms, 3),
                  "saving_fraction": round(saving_ms / step_floor_ms, 3),
                  "pays": saving_ms >= FUSION_PAYS * step_floor_ms})
        run.free()


# --- main ----------------------------------------------------------------------------------------

SECTIONS = ("copy", "decode", "matmul", "prefill", "norm_rope", "decode_flex")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "./out"), help="folder for gpu_kernels.jsonl")
    parser.add_argument("--only", default=",".join(SECTIONS),
                        help="comma-separated sections to run (copy is always run for decode and norm_rope)")
    parser.add_argument("--budget-s", type=float, default=200.0, help="stop starting new cases after this long")
    parser.add_argument("--kv-limit-gib", type=float, default=None,
                        help="largest KV cache to allocate (default: a quarter of the GPU's memory)")
    parser.add_argument("--dry-run", action="store_true", help="one tiny case per section on the CPU (interpreter)")
    args = parser.parse_args(argv)
    unknown = set(args.only.split(",")) - set(SECTIONS)
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
    copy_gbps = bench_copy(run, sizes) if {"copy", "decode", "norm_rope"} & set(sections) else 0.0
    if "decode" in sections:
        bench_decode(run, sizes, copy_gbps)
    if "matmul" in sections:
        bench_matmul(run, sizes)
    if "prefill" in sections:
        bench_prefill(run, sizes)
    if "norm_rope" in sections:
        bench_norm_rope(run, sizes, copy_gbps)
    if "decode_flex" in sections and device.type == "cuda":
        bench_decode_flex(run, sizes)
    run.emit({"bench": "done", "wall_s": round(run.elapsed(), 1)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
