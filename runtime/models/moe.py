"""The mixture-of-experts MLP of Mixtral, Qwen3-MoE and Qwen2-MoE: a router picks `top_k` of
`num_experts` gated MLPs for each token, and the token's output is their outputs weighted by the
router (plus, in Qwen2-MoE, a shared expert every token takes, scaled by a sigmoid gate).

Routing follows HF transformers operation for operation: router logits in the compute dtype, softmax
in fp32, top-k, then the k weights renormalised to sum to one (Mixtral always, Qwen3-MoE when
`norm_topk_prob`; Qwen2-MoE likewise). Mixtral weighs the experts' outputs with the fp32 weights,
Qwen-MoE casts them to the compute dtype first.

Tokens are sorted by expert, each expert runs once on its tokens, and the weighted outputs are added
back to their tokens: `kvpilot.kernels.ops.fused_moe` (the Triton fused-MoE kernel on CUDA, its
torch reference on the CPU) over the experts' weights stacked into one tensor each (int8 / fp8
experts with their scales), or, for int4 experts, a loop of their quantized matmuls. Under tensor
parallelism every rank holds every expert's share of intermediate rows (vLLM's split) and the whole
router, so every rank routes alike; the partial outputs are summed by one all-reduce for the whole
block. Each expert is an ordinary pair of projections (fused gate/up, down), so weight-only
quantization and checkpoint sharding treat it as any other MLP.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from kvpilot.kernels import ops
from kvpilot.runtime.memory.facts import ModelFacts
from kvpilot.runtime.models.layers import ACTIVATIONS
from kvpilot.runtime.models.parallel import SINGLE, Parallel
from kvpilot.runtime.models.quantized import QuantizedLinear
from kvpilot.runtime.models.variant import Variant


class GatedMLP(nn.Module):
    """act(x W_gate) * (x W_up) W_down on this rank's `intermediate_size` rows, no collective."""

    def __init__(self, hidden_size: int, intermediate_size: int, variant: Variant) -> None:
        super().__init__()
        self.intermediate_size = intermediate_size
        self.gate_up_proj = nn.Linear(hidden_size, 2 * intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)
        self.act = ACTIVATIONS[variant.activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(self.act(gate) * up)


class MoEMLP(nn.Module):
    def __init__(self, facts: ModelFacts, variant: Variant, parallel: Parallel = SINGLE) -> None:
        super().__init__()
        self.parallel = parallel
        self.top_k, self.normalize = facts.num_experts_per_tok, variant.norm_topk_prob
        self.weights_in_dtype = variant.router_weights_in_dtype
        self.gate = nn.Linear(facts.hidden_size, facts.num_experts, bias=False)  # the router, whole on every rank
        share = facts.moe_intermediate_size // parallel.size
        self.experts = nn.ModuleList(GatedMLP(facts.hidden_size, share, variant) for _ in range(facts.num_experts))
        self.shared_expert: GatedMLP | None = None
        self.shared_expert_gate: nn.Linear | None = None
        if facts.shared_expert_intermediate_size:  # Qwen2-MoE: one more expert every token takes, gated
            self.shared_expert = GatedMLP(facts.hidden_size, facts.shared_expert_intermediate_size // parallel.size,
                                          variant)
            self.shared_expert_gate = nn.Linear(facts.hidden_size, 1, bias=False)  # whole on every rank
        self.fusable = variant.activation == "silu"  # the fused kernel's activation
        self._stack: tuple[torch.Tensor, ...] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, experts = route(self.gate(x), self.top_k, self.normalize)
        if self.weights_in_dtype:
            weights = weights.to(x.dtype)
        stacked = self._stacked()
        if stacked is None:
            out = self._experts(x, weights, experts)
        else:  # (w13, w2) or (w13, w2, w13_scale, w2_scale)
            out = ops.fused_moe(x, stacked[0], stacked[1], weights, experts, *stacked[2:])
        if self.shared_expert is not None:  # linear in its partial sums: one all-reduce still sums the ranks
            out = out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return self.parallel.all_reduce(out)

    def _stacked(self) -> tuple[torch.Tensor, ...] | None:
        """The experts as the fused kernel takes them: gate/up weights in one [E, 2I, H] tensor, down
        weights in one [E, H, I] (int8 / fp8 ones with their [E, 2I] and [E, H] scales). Each expert's
        own tensors become views into them, so the weights are held once and the state dict is
        unchanged. The loader makes them once the weights are in (runtime/loading/loader.py: the
        transient copy of one layer's experts falls before the KV cache is allocated); a model moved
        since gets them again. None for int4 experts (they run as a loop of quantized matmuls)."""
        first = self.experts[0].gate_up_proj
        if isinstance(first, nn.Linear):
            held = first.weight
        elif isinstance(first, QuantizedLinear) and first.weight.mode in ("int8", "fp8"):
            held = first.qweight
        else:
            return None
        if not self.fusable:
            return None
        if self._stack is None or self._stack[0].data_ptr() != held.data_ptr():  # moved since: again
            self._stack = (_stack_float(self.experts) if isinstance(first, nn.Linear)
                           else _stack_quantized(self.experts))
        return self._stack

    def _experts(self, x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        """Each (quantized) expert once, on the tokens routed to it (sorted by expert), weighted and
        added back: kvpilot.kernels.moe_reference.fused_moe_ref's loop, one module per expert."""
        out = torch.zeros_like(x)
        flat = experts.reshape(-1)
        order = flat.argsort(stable=True)  # positions in [tokens x top_k], grouped by expert
        counts = torch.bincount(flat, minlength=len(self.experts)).tolist()
        start = 0
        for expert, count in zip(self.experts, counts, strict=True):
            if count == 0:
                continue
            picked = order[start : start + count]
            start += count
            tokens = picked // self.top_k
            y = expert(x[tokens]) * weights.reshape(-1)[picked, None]
            out.index_add_(0, tokens, y.to(out.dtype))
        return out


def _stack_float(experts: nn.ModuleList) -> tuple[torch.Tensor, torch.Tensor]:
    w13 = torch.stack([expert.gate_up_proj.weight.detach() for expert in experts])
    w2 = torch.stack([expert.down_proj.weight.detach() for expert in experts])
    for i, expert in enumerate(experts):
        expert.gate_up_proj.weight = nn.Parameter(w13[i], requires_grad=False)
        expert.down_proj.weight = nn.Parameter(w2[i], requires_grad=False)
    return w13, w2


def _stack_quantized(experts: nn.ModuleList) -> tuple[torch.Tensor, ...]:
    stacked = []
    for name in ("gate_up_proj", "down_proj"):
        linears = [getattr(expert, name) for expert in experts]
        qweight = torch.stack([linear.qweight for linear in linears])
        scale = torch.stack([linear.scale for linear in linears])
        for i, linear in enumerate(linears):
            linear.qweight, linear.scale = qweight[i], scale[i]
            linear.weight = dataclasses.replace(linear.weight, qweight=qweight[i], scale=scale[i])
        stacked.append((qweight, scale))
    (w13, w13_scale), (w2, w2_scale) = stacked
    return w13, w2, w13_scale, w2_scale


def stack_experts(model: nn.Module) -> None:
    """Stack the experts of every MoE layer of a loaded model (MoEMLP._stacked)."""
    for module in model.modules():
        if isinstance(module, MoEMLP):
            module._stacked()


def route(logits: torch.Tensor, top_k: int, normalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(fp32 weights, expert ids), each [tokens, top_k]: softmax over the experts, the top k, then
    renormalised over those k when `normalize`."""
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
    weights, experts = torch.topk(probs, top_k, dim=-1)
    if normalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, experts
