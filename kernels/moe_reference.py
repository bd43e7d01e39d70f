"""Plain-torch references of the mixture-of-experts kernels (no triton): the CPU path and the ground
truth `kvpilot.kernels.fused_moe` is tested against.

Shapes:
- x: [num_tokens, hidden] (fp32/bf16/fp16).
- w13: [num_experts, 2 * inter, hidden], each expert's gate rows then its up rows (the fused
  gate_up_proj of each expert, stacked); w2: [num_experts, hidden, inter] (down_proj, stacked).
- topk_weights: [num_tokens, top_k] (fp32, or the compute dtype), topk_ids: [num_tokens, top_k] int.
- int8 / fp8 experts: w13 and w2 in that dtype with one scale per output channel, w13_scale [E, 2I]
  and w2_scale [E, H] (weight = q x scale, as kvpilot.kernels.quant_reference stores one linear).
- out: [num_tokens, hidden] in x's dtype: sum over j of topk_weights[t, j] * expert_{ids[t, j]}(x[t]),
  expert_e(x) = (silu(x w_gate_e^T) * (x w_up_e^T)) w2_e^T.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def fused_moe_ref(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
                  topk_ids: torch.Tensor, w13_scale: torch.Tensor | None = None,
                  w2_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Tokens sorted by expert, each expert once on its tokens, the weighted outputs added back; int8 /
    fp8 experts (with their per-channel scales) dequantized to x's dtype first."""
    top_k = topk_ids.shape[1]
    out = torch.zeros_like(x)
    flat = topk_ids.reshape(-1)
    order = flat.argsort(stable=True)  # positions in [tokens x top_k], grouped by expert
    counts = torch.bincount(flat, minlength=w13.shape[0]).tolist()
    start = 0
    for expert, count in enumerate(counts):
        if count == 0:
            continue
        picked = order[start : start + count]
        start += count
        tokens = picked // top_k
        gate_up, down = w13[expert], w2[expert]
        if w13_scale is not None and w2_scale is not None:  # only the experts in use are dequantized
            gate_up = dequantize_experts(gate_up, w13_scale[expert], x.dtype)
            down = dequantize_experts(down, w2_scale[expert], x.dtype)
        gate, up = F.linear(x[tokens], gate_up).chunk(2, dim=-1)
        y = F.linear(F.silu(gate) * up, down) * topk_weights.reshape(-1)[picked, None]
        out.index_add_(0, tokens, y.to(out.dtype))
    return out


def dequantize_experts(qweight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[..., N, K] int8 / fp8 with [..., N] scales -> the weights in `dtype` (quant_reference's formula)."""
    return (qweight.float() * scale.float()[..., None]).to(dtype)


def fused_moe_naive(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
                    topk_ids: torch.Tensor) -> torch.Tensor:
    """The oracle: token by token, each of its k experts in fp32, summed."""
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for t in range(x.shape[0]):
        for j in range(topk_ids.shape[1]):
            e = int(topk_ids[t, j])
            gate, up = (w13[e].float() @ x[t].float()).chunk(2)
            out[t] += float(topk_weights[t, j]) * (w2[e].float() @ (F.silu(gate) * up))
    return out.to(x.dtype)


def align_by_expert(topk_ids: torch.Tensor, num_experts: int, block_m: int
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The routed copies of the tokens grouped by expert, each expert's group padded to whole blocks
    of `block_m` rows, on the device and without a host sync (the sizes are bounds):

    - sorted_ids [capacity] int32: flat positions t * top_k + j, expert by expert; padding rows hold
      num_tokens * top_k (one past the last);
    - expert_ids [capacity / block_m] int32: the expert of each block (blocks past the end: the last
      expert, never run);
    - num_padded [1] int32: the rows in use (the kernels skip the blocks beyond)."""
    flat = topk_ids.reshape(-1).to(torch.int64)
    n, device = flat.numel(), flat.device
    counts = torch.bincount(flat, minlength=num_experts)
    padded = (counts + block_m - 1) // block_m * block_m
    ends = padded.cumsum(0)
    order = flat.argsort(stable=True)
    by_expert = flat[order]
    rank = torch.arange(n, device=device) - (counts.cumsum(0) - counts)[by_expert]  # place within its expert
    capacity = -(-(n + num_experts * (block_m - 1)) // block_m) * block_m
    sorted_ids = torch.full((capacity,), n, dtype=torch.int32, device=device)
    sorted_ids[(ends - padded)[by_expert] + rank] = order.to(torch.int32)
    block_starts = torch.arange(0, capacity, block_m, device=device)
    expert_ids = torch.searchsorted(ends, block_starts, right=True).clamp(max=num_experts - 1)
    return sorted_ids, expert_ids.to(torch.int32), ends[-1:].to(torch.int32)
