"""GPU kernel benchmark: paged decode/prefill attention and weight-only quantized matmuls, each timed
against a torch peer in the same run, with correctness against the torch reference beside every timing.
Ready for one device call (under 5 minutes on an H100/H200, --budget-s bounds it):

- copy: device-to-device copy bandwidth (bytes read + written / time), the yardstick for decode.
- decode_sweep: decode configs (BLOCK_N x num_warps x num_stages) on a few shapes per KV dtype; the
  fastest (GPU time summed over the shapes) is printed as `decode_config_chosen` and used below.
- decode: batch {1, 4, 16, 64, 256} x context {1k, 4k, 16k, 64k}, bf16 and fp8 KV interleaved (each
  shape runs both, one after the other, so a time budget never drops only fp8): GPU ms and wall ms
  (launch overhead included), KV bytes read / s, fraction of the copy bandwidth (goal >= 0.8 at
  context >= 4k), fp8 vs bf16 on the same shape, vs torch gather + SDPA; the config used.
- decode_flex: a few decode shapes vs torch's flex_attention (compiled, contiguous KV, length mask).
- matmul_sweep: int4 / int8 configs at M = 1 and 16; the fastest is `matmul_config_chosen`.
- matmul: int8 / int4 / fp8 weights at M = 1, 16, 64, 1024 vs bf16 torch.matmul (goal at M <= 16:
  int4 >= 2.5x, int8 >= 1.6x), GPU and wall time, each with its config.
- prefill: packed causal prefill, TFLOP/s vs scaled_dot_product_attention (flash) on the same shapes.
- moe: the fused mixture-of-experts MLP (Qwen3-30B-A3B's layer: 128 experts, top-8, hidden 2048, 768
  rows) at 1-2048 tokens vs the per-expert loop of torch matmuls and vLLM's fused_experts if
  installed: GPU and wall ms, TFLOP/s, the touched experts' weight bytes read / s; int8 experts through
  the same kernel vs bf16 ones.
- norm_rope: whether fused rms_norm / RoPE kernels would pay (issue #4, point 5), measured.
Shapes: Llama-3.1-8B (32 query / 8 KV heads, head_dim 128, hidden 4096, MLP 14336). Cases that would
not fit in memory or in the time budget are reported as skipped, not dropped.

Prints one JSON line per result and appends it to $OUT/gpu_kernels.jsonl (OUT defaults to ./out).
Exit status: 0 when every case ran within its tolerance (gpu_bench_run.TOLERANCE), 1 when one failed
or raised (its line says why), 2 on bad usage or without a GPU. `--dry-run` runs one tiny case of each
section on the CPU through the Triton interpreter, to check the script itself without a GPU.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from gpu_bench_run import BLOCK_SIZE, DRY_RUN, TOLERANCE, GiB, Run, Sizes, paged_cache, ratio, rel_err
from gpu_kernels_sections import bench_matmul, bench_moe, bench_norm_rope, bench_prefill, sweep_matmul

FP8 = torch.float8_e4m3fn
KV_DTYPES = (("bf16", torch.bfloat16), ("fp8", FP8))


# --- copy bandwidth ------------------------------------------------------------------------------

def bench_copy(run: Run, sizes: Sizes) -> float:
    src = torch.empty(sizes.copy_bytes, dtype=torch.uint8, device=run.device).random_(0, 255)
    dst = torch.empty_like(src)
    ms = run.time_ms(lambda: dst.copy_(src))
    gbps = 2 * src.numel() / ms / 1e6
    run.emit({"bench": "copy", "bytes": src.numel(), "ms": round(ms, 4), "copy_GBps": round(gbps, 1)})
    return gbps


# --- decode --------------------------------------------------------------------------------------

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
        k_scale, v_scale = (0.05, 0.04) if kv_dtype == FP8 else (1.0, 1.0)
        return cls(torch.randn(batch, heads, head_dim, device=run.device, dtype=torch.bfloat16),
                   paged_cache(blocks, kv_heads, head_dim, kv_dtype, run.device, k_scale),
                   paged_cache(blocks, kv_heads, head_dim, kv_dtype, run.device, v_scale),
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
            if kv.dtype == FP8:
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


def _kv_bytes(sizes: Sizes, batch: int, context: int, kv_dtype: torch.dtype) -> int:
    return 2 * batch * context * sizes.heads[1] * sizes.heads[2] * kv_dtype.itemsize


def sweep_decode(run: Run, sizes: Sizes) -> dict[str, dict[str, int]]:
    """Per KV dtype, every (BLOCK_N, num_warps, num_stages) of sizes.decode_configs on sizes.sweep_cases;
    the fastest in GPU time summed over the cases is chosen (and printed) for the decode section."""
    from kvpilot.kernels.paged_attention_decode import paged_attention_decode

    chosen: dict[str, dict[str, int]] = {}
    for kv_name, kv_dtype in KV_DTYPES:
        inputs = [DecodeInputs.random(run, sizes, b, c, kv_dtype) for b, c in sizes.sweep_cases
                  if _kv_bytes(sizes, b, c, kv_dtype) <= run.kv_limit_bytes]
        best: tuple[float, dict[str, int]] | None = None
        for block_n, warps, stages in sizes.decode_configs:
            config = {"block_n": block_n, "num_warps": warps, "num_stages": stages}
            record: dict[str, Any] = {"bench": "decode_sweep", "kv_dtype": kv_name, **config}
            try:
                times = [run.time_ms(lambda x=x, config=config: paged_attention_decode(
                    *x.args(), max_context_len=x.context, **config)) for x in inputs]
            except Exception as e:  # e.g. out of shared memory: not a candidate, not a failure
                record["unusable"] = f"{type(e).__name__}: {str(e)[:200]}"
            else:
                record["ms"] = {f"b{x.query.shape[0]}_ctx{x.context}": round(t, 4)
                                for x, t in zip(inputs, times, strict=True)}
                if best is None or sum(times) < best[0]:
                    best = (sum(times), config)
            run.emit(record)
        del inputs
        run.free()
        if best is not None:
            chosen[kv_name] = best[1]
            run.emit({"bench": "decode_config_chosen", "kv_dtype": kv_name, "for": list(sizes.sweep_cases),
                      **best[1]})
    return chosen


def _decode_case(run: Run, sizes: Sizes, x: DecodeInputs, config: dict[str, int], kv_bytes: int,
                 copy_gbps: float) -> dict[str, Any]:
    from kvpilot.kernels.paged_attention_decode import paged_attention_decode, paged_attention_decode_ref

    def ours() -> torch.Tensor:
        return paged_attention_decode(*x.args(), max_context_len=x.context, **config)

    ms = run.time_ms(ours)
    out = ours()
    n = sizes.check_seqs
    gbps = kv_bytes / ms / 1e6
    record = {"ms": round(ms, 4), **run.wall(ours), "kv_GBps": round(gbps, 1),
              "copy_fraction": round(gbps / copy_gbps, 3) if copy_gbps else None,
              "goal_met": None if x.context < 4096 else gbps >= 0.8 * copy_gbps,
              **rel_err(out[:n], paged_attention_decode_ref(*x.args(n)))}
    if kv_bytes * (3 if x.k_cache.dtype == FP8 else 2) < run.kv_limit_bytes:
        torch_ms = run.time_ms(lambda: _torch_decode(x))
        record.update({"torch_ms": round(torch_ms, 4), "speedup_vs_torch": ratio(torch_ms, ms),
                       "torch_max_abs_err": rel_err(out, _torch_decode(x))["max_abs_err"]})
    else:
        record["torch_ms"] = "skipped: the gathered copy does not fit"
    return record


def bench_decode(run: Run, sizes: Sizes, copy_gbps: float, chosen: dict[str, dict[str, int]]) -> None:
    from kvpilot.kernels.paged_attention_decode import decode_config

    _, _, head_dim = sizes.heads
    for context in sizes.contexts:
        for batch in sizes.batches:
            bf16_ms = None
            for kv_name, kv_dtype in KV_DTYPES:  # interleaved: both KV dtypes of a shape, back to back
                kv_bytes = _kv_bytes(sizes, batch, context, kv_dtype)
                config = chosen.get(kv_name, {})
                heuristic = decode_config(head_dim, torch.bfloat16, kv_dtype, run.device)
                record: dict[str, Any] = {"bench": "decode", "kv_dtype": kv_name, "batch": batch, "context": context,
                                          "kv_bytes": kv_bytes, "config": config or {"heuristic": heuristic}}
                if kv_bytes > run.kv_limit_bytes:
                    record["skipped"] = f"KV {kv_bytes / GiB:.1f} GiB > limit {run.kv_limit_bytes / GiB:.1f}"
                elif run.over_budget(0.45):
                    record["skipped"] = "time budget"
                else:
                    shape = (batch, context, kv_dtype)
                    run.guarded(record, lambda shape=shape, config=config, kv_bytes=kv_bytes: _decode_case(
                        run, sizes, DecodeInputs.random(run, sizes, *shape), config, kv_bytes, copy_gbps))
                    if "failed" not in record:
                        run.check(record, TOLERANCE[kv_name])
                        if kv_name == "bf16":
                            bf16_ms = record["ms"]
                        else:
                            record["speedup_vs_bf16_kv"] = ratio(bf16_ms, record["ms"])
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
    return {"ms": round(ms, 4), "flex_ms": round(flex_ms, 4), "speedup_vs_flex": ratio(flex_ms, ms),
            "flex_compile_s": round(compile_s, 1),
            **rel_err(paged_attention_decode(*x.args(), max_context_len=x.context), flex_out.squeeze(2))}


def bench_decode_flex(run: Run, sizes: Sizes) -> None:
    """flex_attention on contiguous KV with a length mask: a dense peer, so it reads no block table."""
    for batch, context in sizes.flex_cases:
        record: dict[str, Any] = {"bench": "decode_flex", "kv_dtype": "bf16", "batch": batch, "context": context}
        if run.over_budget(0.8):
            record["skipped"] = "time budget"
        else:
            try:
                record.update(_flex_case(run, DecodeInputs.random(run, sizes, batch, context, torch.bfloat16)))
            except Exception as e:  # a peer that fails (torch.compile) is a result to report, not our failure
                record["flex_error"] = f"{type(e).__name__}: {str(e)[:300]}"
            run.free()
        run.emit(record)


# --- main ----------------------------------------------------------------------------------------

SECTIONS = ("copy", "decode", "matmul", "prefill", "moe", "norm_rope", "decode_flex")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "./out"), help="folder for gpu_kernels.jsonl")
    parser.add_argument("--only", default=",".join(SECTIONS),
                        help="comma-separated sections to run (copy is always run for decode and norm_rope)")
    parser.add_argument("--budget-s", type=float, default=200.0, help="stop starting new cases after this long")
    parser.add_argument("--no-sweep", action="store_true", help="use the launchers' own configs, sweep nothing")
    parser.add_argument("--tolerance", type=float, default=None,
                        help="largest relative error for every case (default: per kind, gpu_bench_run.TOLERANCE)")
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
        args.budget_s = math.inf  # every section's one tiny case runs, however slow the interpreter is
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
              meta={**meta, "torch": torch.__version__, "triton": triton.__version__}, tolerance=args.tolerance)
    sections = args.only.split(",")
    copy_gbps = bench_copy(run, sizes) if {"copy", "decode", "norm_rope"} & set(sections) else 0.0
    if "decode" in sections:
        bench_decode(run, sizes, copy_gbps, {} if args.no_sweep else sweep_decode(run, sizes))
    if "matmul" in sections:
        bench_matmul(run, sizes, {} if args.no_sweep else sweep_matmul(run, sizes))
    if "prefill" in sections:
        bench_prefill(run, sizes)
    if "moe" in sections:
        bench_moe(run, sizes)
    if "norm_rope" in sections:
        bench_norm_rope(run, sizes, copy_gbps)
    if "decode_flex" in sections and device.type == "cuda":
        bench_decode_flex(run, sizes)
    run.emit({"bench": "done", "wall_s": round(run.elapsed(), 1), "failures": run.failures})
    return 1 if run.failures else 0


if __name__ == "__main__":
    sys.exit(main())
