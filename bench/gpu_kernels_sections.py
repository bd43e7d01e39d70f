"""bench/gpu_kernels.py's sections beside decode: quantized matmul (with its config sweep), prefill,
the fused mixture-of-experts MLP and the fused rms_norm/RoPE decision. See gpu_kernels.py for what each
reports; gpu_bench_run.py for the timing and the failure rules."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from gpu_bench_run import BLOCK_SIZE, LAYERS, TOLERANCE, Run, Sizes, paged_cache, ratio, rel_err

WEIGHT_BYTES = 16_060_000_000  # Llama-3.1-8B in bf16: what one decode step must read at least
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
FUSION_PAYS = 0.05  # a fused norm/RoPE kernel is worth writing if it saves this share of a decode step
GOALS = {"int4": 2.5, "int8": 1.6}  # speed-up over bf16 wanted at M <= 16
SWEPT_M = 16  # the matmul sweep picks one config per mode for the M up to this (decode-sized)


# --- quantized matmul ----------------------------------------------------------------------------

def _quantized(weight: torch.Tensor) -> dict[str, Any]:
    from kvpilot.kernels.quant_reference import quantize_fp8, quantize_int4, quantize_int8

    return {"int8": quantize_int8(weight), "int4": quantize_int4(weight), "fp8": quantize_fp8(weight)}


def sweep_matmul(run: Run, sizes: Sizes) -> dict[str, dict[str, int]]:
    """For int4 and int8 at each M <= SWEPT_M of sizes.matmul_ms, on the first shape: every (BLOCK_N,
    num_warps, num_stages) of sizes.matmul_configs, GPU time summed over those M; the fastest is used by
    bench_matmul."""
    from kvpilot.kernels.quantized_matmul import quantized_matmul

    name, k, n = sizes.matmul_shapes[0]
    swept = [m for m in sizes.matmul_ms if m <= SWEPT_M]
    weight = torch.randn(n, k, device=run.device, dtype=torch.bfloat16) * 0.02
    chosen: dict[str, dict[str, int]] = {}
    for mode, qw in _quantized(weight).items():
        if mode == "fp8":
            continue
        xs = [torch.randn(m, k, device=run.device, dtype=torch.bfloat16) for m in swept]
        best: tuple[float, dict[str, int]] | None = None
        for block_n, warps, stages in sizes.matmul_configs:
            config = {"block_n": block_n, "num_warps": warps, "num_stages": stages}
            record: dict[str, Any] = {"bench": "matmul_sweep", "shape": name, "mode": mode, **config}
            try:
                times = [run.time_ms(lambda x=x, qw=qw, config=config: quantized_matmul(x, qw, **config)) for x in xs]
            except Exception as e:  # e.g. out of shared memory: not a candidate, not a failure
                record["unusable"] = f"{type(e).__name__}: {str(e)[:200]}"
            else:
                record["ms"] = {f"m{m}": round(t, 4) for m, t in zip(swept, times, strict=True)}
                if best is None or sum(times) < best[0]:
                    best = (sum(times), config)
            run.emit(record)
        if best is not None:
            chosen[mode] = best[1]
            run.emit({"bench": "matmul_config_chosen", "mode": mode, "for_m": swept, **best[1]})
    return chosen


def _matmul_case(run: Run, x: torch.Tensor, qw: Any, config: dict[str, int], mode: str, bf16_ms: float,
                 bf16_wall_ms: float) -> dict[str, Any]:
    from kvpilot.kernels.quantized_matmul import quantized_matmul, quantized_matmul_ref

    m, k = x.shape
    n = qw.out_features
    ms = run.time_ms(lambda: quantized_matmul(x, qw, **config))
    wall = run.wall(lambda: quantized_matmul(x, qw, **config))
    out = {"ms": round(ms, 4), **wall, "bf16_ms": round(bf16_ms, 4), "bf16_wall_ms": bf16_wall_ms,
           "speedup_vs_bf16": ratio(bf16_ms, ms), "wall_speedup_vs_bf16": ratio(bf16_wall_ms, wall["wall_ms"]),
           "weight_GBps": round((qw.nbytes + x.numel() * 2) / ms / 1e6, 1),
           "TFLOPs": round(2 * m * n * k / ms / 1e9, 1),
           **rel_err(quantized_matmul(x, qw, **config), quantized_matmul_ref(x, qw))}
    if m <= 16 and mode in GOALS:
        out["goal_met"] = bf16_ms / ms >= GOALS[mode]
    return out


def _matmul_cases(run: Run, sizes: Sizes, name: str, k: int, n: int, chosen: dict[str, dict[str, int]]) -> None:
    from kvpilot.kernels.quantized_matmul import matmul_config

    weight = torch.randn(n, k, device=run.device, dtype=torch.bfloat16) * 0.02
    quantized = _quantized(weight)
    for m in sizes.matmul_ms:
        if run.over_budget(0.95):
            run.emit({"bench": "matmul", "shape": name, "m": m, "skipped": "time budget"})
            continue
        x = torch.randn(m, k, device=run.device, dtype=torch.bfloat16)
        bf16_ms = run.time_ms(lambda x=x: x @ weight.t())
        bf16_wall = run.wall(lambda x=x: x @ weight.t())
        for mode, qw in quantized.items():  # interleaved: every mode of one M before the next M
            config = chosen.get(mode, {}) if m <= SWEPT_M else {}
            record: dict[str, Any] = {"bench": "matmul", "shape": name, "m": m, "k": k, "n": n, "mode": mode,
                                      "config": config or {"heuristic": matmul_config(m, run.device)}}
            run.guarded(record, lambda x=x, qw=qw, config=config, mode=mode, bf16=(bf16_ms, bf16_wall["wall_ms"]):
                        _matmul_case(run, x, qw, config, mode, *bf16))
            if "failed" not in record:
                run.check(record, TOLERANCE["matmul"])
            run.emit(record)


def bench_matmul(run: Run, sizes: Sizes, chosen: dict[str, dict[str, int]]) -> None:
    for name, k, n in sizes.matmul_shapes:
        _matmul_cases(run, sizes, name, k, n, chosen)
        run.free()


# --- prefill -------------------------------------------------------------------------------------

def _prefill_case(run: Run, sizes: Sizes, batch: int, q_len: int, prefix: int) -> dict[str, Any]:
    from kvpilot.kernels.paged_attention_prefill import paged_attention_prefill, paged_attention_prefill_ref

    heads, kv_heads, head_dim = sizes.heads
    scale = head_dim**-0.5
    context = prefix + q_len
    blocks = batch * math.ceil(context / BLOCK_SIZE)
    k_cache = paged_cache(blocks, kv_heads, head_dim, torch.bfloat16, run.device, 1.0)
    v_cache = paged_cache(blocks, kv_heads, head_dim, torch.bfloat16, run.device, 1.0)
    tables = torch.randperm(blocks, device=run.device).view(batch, -1).int()
    lens = torch.full((batch,), context, dtype=torch.int32, device=run.device)
    cu = torch.arange(0, batch + 1, dtype=torch.int32, device=run.device) * q_len
    query = torch.randn(batch * q_len, heads, head_dim, device=run.device, dtype=torch.bfloat16)
    args = (query, k_cache, v_cache, tables, cu, lens, scale)
    ms = run.time_ms(lambda: paged_attention_prefill(*args, max_query_len=q_len, max_context_len=context))
    wall = run.wall(lambda: paged_attention_prefill(*args, max_query_len=q_len, max_context_len=context))
    flops = 4 * batch * (q_len * prefix + q_len * (q_len + 1) // 2) * heads * head_dim
    out = paged_attention_prefill(*args, max_query_len=q_len)
    expected = paged_attention_prefill_ref(query[:q_len], k_cache, v_cache, tables[:1], cu[:2], lens[:1], scale)
    record = {"ms": round(ms, 4), **wall, "TFLOPs": round(flops / ms / 1e9, 1), **rel_err(out[:q_len], expected)}
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
            "speedup_vs_sdpa": ratio(sdpa_ms, ms), "sdpa_backend": backends[0].name,
            "sdpa_max_abs_err": rel_err(ours, sdpa().transpose(1, 2))["max_abs_err"]}


def bench_prefill(run: Run, sizes: Sizes) -> None:
    for batch, q_len, prefix in sizes.prefill_cases:
        record = {"bench": "prefill", "dtype": "bf16", "batch": batch, "q_len": q_len, "prefix": prefix}
        if run.over_budget(0.7):
            record["skipped"] = "time budget"
        else:
            run.guarded(record, lambda batch=batch, q_len=q_len, prefix=prefix: _prefill_case(run, sizes, batch,
                                                                                            q_len, prefix))
            if "failed" not in record:
                run.check(record, TOLERANCE["bf16"])
            run.free()
        run.emit(record)


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




# --- fused mixture of experts ----------------------------------------------------------------------

def _vllm_fused_experts() -> Any:
    """vLLM's fused MoE (its w13 is ours: [E, 2I, H], gate rows then up), or None when not installed."""
    try:
        from vllm.model_executor.layers.fused_moe import fused_experts
    except Exception:  # not installed, or not importable in this environment
        return None
    return fused_experts


def _int8_experts(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[E, N, K] -> int8 weights and one fp32 scale per output channel (quant_reference's int8 layout)."""
    scale = (w.float().abs().amax(-1) / 127.0).clamp(min=1e-8)
    return (w.float() / scale[..., None]).round().clamp(-127, 127).to(torch.int8), scale


def _moe_case(run: Run, tokens: int, top_k: int, w13: torch.Tensor, w2: torch.Tensor,
              float_experts: tuple[torch.Tensor, torch.Tensor]) -> dict[str, Any]:
    """Correctness against the fp32 reference (`float_experts`: w13 and w2 in fp32), speed against peers."""
    from kvpilot.kernels.moe_reference import fused_moe_ref
    from kvpilot.kernels.ops import fused_moe

    experts, hidden, inter = w13.shape[0], w2.shape[1], w2.shape[2]
    x = torch.randn(tokens, hidden, device=run.device, dtype=torch.bfloat16)
    logits = torch.randn(tokens, experts, device=run.device)
    weights, ids = logits.softmax(-1).topk(top_k, dim=-1)
    weights = weights / weights.sum(-1, keepdim=True)
    ms = run.time_ms(lambda: fused_moe(x, w13, w2, weights, ids))
    loop_ms = run.time_ms(lambda: fused_moe_ref(x, w13, w2, weights, ids))
    touched = int(ids.unique().numel())  # each expert's weights are read once per call at least
    out = {"ms": round(ms, 4), **run.wall(lambda: fused_moe(x, w13, w2, weights, ids)),
           "torch_loop_ms": round(loop_ms, 4), "speedup_vs_torch_loop": ratio(loop_ms, ms),
           "experts_touched": touched,
           "weight_GBps": round(touched * (w13[0].numel() + w2[0].numel()) * 2 / ms / 1e6, 1),
           "TFLOPs": round(2 * tokens * top_k * 3 * inter * hidden / ms / 1e9, 2),
           **rel_err(fused_moe(x, w13, w2, weights, ids), fused_moe_ref(x.float(), *float_experts, weights, ids))}
    q13, s13 = _int8_experts(w13)
    q2, s2 = _int8_experts(w2)
    int8_ms = run.time_ms(lambda: fused_moe(x, q13, q2, weights, ids, s13, s2))
    int8_err = rel_err(fused_moe(x, q13, q2, weights, ids, s13, s2),
                       fused_moe_ref(x.float(), q13, q2, weights, ids, s13, s2))
    out.update(int8_ms=round(int8_ms, 4), int8_speedup_vs_bf16=ratio(ms, int8_ms), int8_rel_err=int8_err["rel_err"])
    vllm = _vllm_fused_experts()
    if vllm is None:
        out["vllm"] = "not installed"
    else:
        vllm_ms = run.time_ms(lambda: vllm(x, w13, w2, weights, ids.to(torch.int32)))
        out.update(vllm_ms=round(vllm_ms, 4), speedup_vs_vllm=ratio(vllm_ms, ms))
    return out


def bench_moe(run: Run, sizes: Sizes) -> None:
    """Qwen3-30B-A3B's MoE layer (bf16) at several token counts: the fused kernel vs the per-expert loop of
    torch matmuls (the CPU path, HF's way) and vLLM's fused_experts when installed."""
    experts, top_k, hidden, inter = sizes.moe_shape
    w13 = torch.randn(experts, 2 * inter, hidden, device=run.device, dtype=torch.bfloat16) / hidden ** 0.5
    w2 = torch.randn(experts, hidden, inter, device=run.device, dtype=torch.bfloat16) / inter ** 0.5
    float_experts = (w13.float(), w2.float())
    for tokens in sizes.moe_tokens:
        record: dict[str, Any] = {"bench": "moe", "shape": f"E{experts} top{top_k} H{hidden} I{inter}",
                                  "tokens": tokens}
        if run.over_budget(0.95):
            record["skipped"] = "time budget"
        else:
            run.guarded(record, lambda tokens=tokens: _moe_case(run, tokens, top_k, w13, w2, float_experts))
            if "failed" not in record:
                run.check(record, TOLERANCE["bf16"])
        run.emit(record)
    run.free()
