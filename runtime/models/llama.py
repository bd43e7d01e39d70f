"""Llama-family decoder (Llama 2/3, Mistral, Qwen2/3, Granite, OLMo 2, Phi-3/4, SmolLM2/3, Gemma 2/3,
Mixtral, Qwen3-MoE): RMSNorm, RoPE, gated MLP or mixture of experts (models/moe.py), grouped-query
attention, tied or untied embeddings. What a family changes (biases, activation, q/k norms, norm
layout, multipliers, soft-capping, sliding windows, per-layer rope, routing) is a `Variant`
(models/variant.py). Attention and cache writes go through `kvpilot.kernels.ops`
only; q/k/v and gate/up are each one fused matmul.

Under tensor parallelism (`parallel`, see models/parallel.py) each rank holds its heads, its
intermediate rows and its vocabulary rows; `load_weights` cuts each checkpoint tensor to that share.
A pipeline stage builds its own layers only (the others are parameterless placeholders, so names keep
the checkpoint's layer numbers), the embeddings on the first stage, the final norm and lm_head on the
last; a tied lm_head on a last stage that is not the first is loaded from the embedding, as vLLM does."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from kvpilot.kernels import ops
from kvpilot.kernels.quant_reference import QuantizedWeight
from kvpilot.runtime.memory.facts import ModelFacts
from kvpilot.runtime.memory.quantization import kv_heads_per_gpu, tp_compatible
from kvpilot.runtime.memory.support import UnsupportedOption
from kvpilot.runtime.models import compiled
from kvpilot.runtime.models.layers import ACTIVATIONS, AttentionMetadata, GemmaRMSNorm, RMSNorm, RotaryEmbedding
from kvpilot.runtime.models.moe import MoEMLP
from kvpilot.runtime.models.parallel import SINGLE, Parallel, VocabParallelEmbedding
from kvpilot.runtime.models.quantized import quantized_weight_names, replace_with_quantized
from kvpilot.runtime.models.variant import Variant

if TYPE_CHECKING:
    from kvpilot.runtime.models.offload import WeightStreamer

# HF checkpoint projections that live inside one fused matrix here: (fused name, shard index)
PACKED_MODULES = {"q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
                  "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1)}
IGNORED_WEIGHTS = ("rotary_emb.inv_freq",)
# Mixtral's checkpoint names -> the HF names of every other family (its w1/w3/w2 are gate/up/down)
MIXTRAL_NAMES = {"block_sparse_moe": "mlp", "w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}


def make_norm(variant: Variant, size: int, eps: float) -> RMSNorm:
    return GemmaRMSNorm(size, eps) if variant.gemma_norm else RMSNorm(size, eps)


class LlamaAttention(nn.Module):
    def __init__(self, facts: ModelFacts, variant: Variant, layer: int, rotary: RotaryEmbedding | None,
                 parallel: Parallel = SINGLE) -> None:
        super().__init__()
        self.parallel, self.layer = parallel, layer
        self.num_heads, self.head_dim = facts.num_heads // parallel.size, facts.head_dim
        self.num_kv_heads = kv_heads_per_gpu(facts, parallel.size)
        self.q_size, self.kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.shard_sizes = (self.q_size, self.kv_size, self.kv_size)
        self.scale = variant.attention_scale if variant.attention_scale is not None else self.head_dim ** -0.5
        self.qkv_proj = nn.Linear(facts.hidden_size, self.q_size + 2 * self.kv_size,
                                  bias=facts.qkv_bias or variant.qkv_bias)
        self.o_proj = nn.Linear(self.q_size, facts.hidden_size, bias=variant.o_bias)
        self.qk_norm = variant.qk_norm
        if variant.qk_norm is not None:
            q_dim, k_dim = (self.head_dim, self.head_dim) if variant.qk_norm == "head" else (self.q_size, self.kv_size)
            self.q_norm = make_norm(variant, q_dim, facts.rms_norm_eps)
            self.k_norm = make_norm(variant, k_dim, facts.rms_norm_eps)
        self.rotary = rotary
        # only what differs from plain causal attention goes to the kernels
        self.extra: dict[str, float | int] = {}
        if variant.window(layer) is not None:
            self.extra["window"] = int(variant.window(layer))  # type: ignore[arg-type]
        if variant.attn_softcap:
            self.extra["softcap"] = float(variant.attn_softcap)

    def forward(self, positions: torch.Tensor, x: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        q, k, v = self.qkv_proj(x).split(self.shard_sizes, dim=-1)
        if self.qk_norm == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.reshape(-1, self.num_heads, self.head_dim), k.reshape(-1, self.num_kv_heads, self.head_dim)
        if self.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        if self.rotary is not None:
            q, k = self.rotary(positions, q, k)
        v = v.reshape(-1, self.num_kv_heads, self.head_dim)
        if torch.compiler.is_compiling():  # the step's caches and layout: models/compiled.py
            out = torch.ops.kvpilot.paged_attention(q, k, v, self.layer)
        else:
            out = self.attend(q, k, v, k_cache, v_cache, meta)
        return self.parallel.all_reduce(self.o_proj(out.reshape(-1, self.q_size)))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
               v_cache: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """Write k/v into the cache, then attend: decodes first, then prefill chunks."""
        ops.write_kv_cache(k, v, k_cache, v_cache, meta.slot_mapping)
        n = meta.num_decode_tokens
        if n == q.shape[0]:
            return self._decode(q, k_cache, v_cache, meta)
        if n == 0:
            return self.prefill(q, k_cache, v_cache, meta)
        return torch.cat((self._decode(q[:n], k_cache, v_cache, meta), self.prefill(q[n:], k_cache, v_cache, meta)))

    def _decode(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        return ops.paged_attention_decode(q, k_cache, v_cache, meta.decode_block_tables, meta.decode_context_lens,
                                          self.scale, max_context_len=meta.decode_max_context_len, **self.extra)

    def prefill(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 meta: AttentionMetadata) -> torch.Tensor:
        return ops.paged_attention_prefill(q, k_cache, v_cache, meta.prefill_block_tables,
                                           meta.prefill_cu_seqlens_q, meta.prefill_context_lens, self.scale,
                                           max_query_len=meta.prefill_max_query_len,
                                           max_context_len=meta.prefill_max_context_len, **self.extra)


class LlamaMLP(nn.Module):
    def __init__(self, facts: ModelFacts, variant: Variant, parallel: Parallel = SINGLE) -> None:
        super().__init__()
        self.parallel = parallel
        self.intermediate_size = facts.intermediate_size // parallel.size
        self.gate_up_proj = nn.Linear(facts.hidden_size, 2 * self.intermediate_size, bias=variant.mlp_bias)
        self.down_proj = nn.Linear(self.intermediate_size, facts.hidden_size, bias=variant.mlp_bias)
        self.act = ACTIVATIONS[variant.activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.parallel.all_reduce(self.down_proj(self.act(gate) * up))


class LlamaDecoderLayer(nn.Module):
    """Norms where the family puts them: before each block (Llama), before and after (Gemma's
    sandwich), or after only (OLMo 2)."""

    def __init__(self, facts: ModelFacts, variant: Variant, layer: int, rotary: RotaryEmbedding | None,
                 parallel: Parallel = SINGLE) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(facts, variant, layer, rotary, parallel)
        self.mlp = MoEMLP(facts, variant, parallel) if facts.is_moe_layer(layer) else LlamaMLP(facts, variant, parallel)
        self.layout, self.residual_multiplier = variant.norm_layout, variant.residual_multiplier
        size, eps = facts.hidden_size, facts.rms_norm_eps
        if self.layout != "post":
            self.input_layernorm = make_norm(variant, size, eps)
        self.post_attention_layernorm = make_norm(variant, size, eps)
        if self.layout != "pre":
            self.post_feedforward_layernorm = make_norm(variant, size, eps)
        if self.layout == "sandwich":
            self.pre_feedforward_layernorm = make_norm(variant, size, eps)

    def forward(self, positions: torch.Tensor, h: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        if self.layout == "pre":
            h = h + self._scaled(self.self_attn(positions, self.input_layernorm(h), k_cache, v_cache, meta))
            return h + self._scaled(self.mlp(self.post_attention_layernorm(h)))
        if self.layout == "post":
            h = h + self.post_attention_layernorm(self.self_attn(positions, h, k_cache, v_cache, meta))
            return h + self.post_feedforward_layernorm(self.mlp(h))
        attn = self.self_attn(positions, self.input_layernorm(h), k_cache, v_cache, meta)
        h = h + self.post_attention_layernorm(attn)
        return h + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(h)))

    def _scaled(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.residual_multiplier == 1.0 else x * self.residual_multiplier


class LlamaModel(nn.Module):
    def __init__(self, facts: ModelFacts, max_positions: int, rope_freq_factors: torch.Tensor | None,
                 parallel: Parallel = SINGLE, variant: Variant | None = None) -> None:
        super().__init__()
        variant = variant or Variant()
        self.variant = variant
        ropes = variant.ropes or {"all": {"rope_theta": facts.rope_theta, **(facts.rope_scaling or {})}}
        rotary_dim = int(facts.head_dim * variant.partial_rotary_factor)
        self.rotaries = nn.ModuleDict({
            key: RotaryEmbedding(facts.head_dim, max_positions, float(rope.get("rope_theta", facts.rope_theta)),
                                 rope, rope_freq_factors, rotary_dim)
            for key, rope in ropes.items()})
        self.rotary = next(iter(self.rotaries.values()))
        if len(self.rotaries) > 1 and any(r.long_after for r in self.rotaries.values()):
            raise UnsupportedOption("longrope on some layers with another rope on others is not supported")
        self.parallel, self.stage = parallel, parallel.stage_of(facts.num_layers)
        if parallel.is_first_stage:
            self.embed_tokens = VocabParallelEmbedding(facts.vocab_size, facts.hidden_size, parallel)
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(facts, variant, i, self.rotaries[variant.rope_key(i)] if variant.uses_rope(i) else None,
                              parallel) if i in self.stage.layers else nn.Identity()
            for i in range(facts.num_layers))
        if parallel.is_last_stage:
            self.norm = make_norm(variant, facts.hidden_size, facts.rms_norm_eps)
        self.streamer: WeightStreamer | None = None  # layers whose weights stream from host memory (offload.py)
        self.compiled: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None  # models/compiled.py

    def build_rotary_tables(self, device: torch.device) -> None:
        for rotary in self.rotaries.values():
            rotary.build_tables(device)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, k_caches: list[torch.Tensor],
                v_caches: list[torch.Tensor], meta: AttentionMetadata | list[AttentionMetadata],
                hidden: torch.Tensor | None = None) -> torch.Tensor:
        """`meta`: one for every layer of the stage, or one per layer (layers of different windows keep
        different blocks); `hidden`: the previous stage's output (None on the first stage)."""
        h = self.embed_tokens(input_ids) if hidden is None else hidden
        scale = self.variant.embedding_scale
        if hidden is None and scale is not None:  # Gemma: sqrt(hidden) rounded to the compute dtype; Granite: a float
            h = h * (torch.tensor(scale, dtype=h.dtype) if self.variant.embedding_scale_in_dtype else scale)
        layers = [self.layers[i] for i in self.stage.layers]
        metas = meta if isinstance(meta, list) else [meta] * len(layers)
        if self.compiled is not None:
            return compiled.run(self.compiled, [layer.self_attn for layer in layers], positions, h, k_caches, v_caches,
                                metas)
        for i, (layer, k_cache, v_cache, layer_meta) in enumerate(zip(layers, k_caches, v_caches, metas, strict=True)):
            if self.streamer is not None:
                self.streamer.wait(i)
            h = layer(positions, h, k_cache, v_cache, layer_meta)
            if self.streamer is not None:
                self.streamer.release(i)
        return self.norm(h) if self.parallel.is_last_stage else h

    def run_layers(self, positions: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """The layer stack and the final norm, as compiled by models/compiled.py (which runs it)."""
        for i in self.stage.layers:
            h = self.layers[i](positions, h, None, None, None)
        return self.norm(h)


class LlamaForCausalLM(nn.Module):
    def __init__(self, facts: ModelFacts, max_positions: int, rope_freq_factors: torch.Tensor | None = None,
                 parallel: Parallel = SINGLE, variant: Variant | None = None) -> None:
        super().__init__()
        variant = variant or Variant()
        check_shardable(facts, parallel.size, variant)
        self.facts, self.parallel, self.variant = facts, parallel, variant
        self.model = LlamaModel(facts, max_positions, rope_freq_factors, parallel, variant)
        self.vocab_rows = math.ceil(facts.vocab_size / parallel.size)  # vocab-parallel, as the embedding
        # a tied lm_head is the embedding itself, or a copy of it on a last stage that is not the first
        own = parallel.is_last_stage and (not facts.tie_word_embeddings or not parallel.is_first_stage)
        self.lm_head = nn.Linear(facts.hidden_size, self.vocab_rows, bias=False) if own else None

    def rope_offset(self, max_tokens: int) -> int:
        """What a sequence that may grow to `max_tokens` tokens adds to its positions: longrope's long
        factors' rows when it may pass the original context, else 0."""
        rotary = self.model.rotary
        return rotary.long_offset if rotary.long_after and max_tokens > rotary.long_after else 0

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, k_caches: list[torch.Tensor],
                v_caches: list[torch.Tensor], meta: AttentionMetadata | list[AttentionMetadata],
                hidden: torch.Tensor | None = None) -> torch.Tensor:
        """`positions`: each token's row of the rotary tables (its position, plus `rope_offset`)."""
        return self.model(input_ids, positions, k_caches, v_caches, meta, hidden)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits over the whole vocabulary (each rank's rows gathered), on every rank of the last stage."""
        if self.lm_head is not None:  # on the CPU maybe a PackedLinear (models/cpu_linear.py): call it
            own = self.lm_head(hidden)
        elif hidden.device.type == "cpu" and hidden.dtype == torch.float32:  # tied: W h^T, 10-30% faster in fp32
            own = (self.model.embed_tokens.weight @ hidden.t()).t().contiguous()  # (same bits); bf16: 27% slower
        else:
            own = F.linear(hidden, self.model.embed_tokens.weight)
        logits = self.parallel.gather_last_dim(own)[:, : self.facts.vocab_size]
        if self.variant.logits_divisor != 1.0:  # Granite
            logits = logits / self.variant.logits_divisor
        if self.variant.final_softcap:  # Gemma 2
            logits = torch.tanh(logits / self.variant.final_softcap) * self.variant.final_softcap
        return logits

    @torch.no_grad()
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]],
                     quantize: Callable[[torch.Tensor], QuantizedWeight] | None = None) -> None:
        """Copy HF-named tensors in (q/k/v and gate/up into their fused matrices); every parameter
        must be given exactly once, else the error names what is missing or unknown.

        With `quantize`, the decoder projections (left on the meta device by the loader) are
        materialised when their first shard arrives and quantized as soon as their last one is in."""
        params = dict(self.named_parameters())
        expected = {n: (3 if ".qkv_proj." in n else 2 if ".gate_up_proj." in n else 1) for n in params}
        deferred = quantized_weight_names(self) if quantize else set()
        filled: dict[str, int] = {}
        for checkpoint_name, tensor in self._unpacked(weights):
            name = self._stage_name(checkpoint_name)
            if name is None:
                continue
            target, shard = name, None
            parts = name.split(".")
            if len(parts) >= 2 and parts[-2] in PACKED_MODULES:
                fused, shard = PACKED_MODULES[parts[-2]]
                target = ".".join([*parts[:-2], fused, parts[-1]])
            if target not in params:
                raise KeyError(f"checkpoint tensor {name!r} has no place in {type(self).__name__}")
            tensor = self._local_share(parts, tensor)
            param = params[target]
            if param.is_meta:  # left unallocated by the loader until now: see models/quantized.py
                param = params[target] = _materialize(self, target, param.shape, tensor)
            if shard is None:
                _copy(param, tensor, name)
            else:
                sizes = self._shard_sizes(target)
                start = sum(sizes[:shard])
                _copy(param[start : start + sizes[shard]], tensor, name)
            filled[target] = filled.get(target, 0) + 1
            if target in deferred and filled[target] == expected[target]:
                replace_with_quantized(self, target, param, quantize)
                params[target] = param = torch.empty(param.shape, device="meta")  # the fp copy goes now
        missing = sorted(n for n, count in expected.items() if filled.get(n, 0) != count)
        if missing:
            raise KeyError(f"checkpoint lacks {len(missing)} tensors, e.g. {missing[:3]}")

    def _unpacked(self, weights: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
        """Every checkpoint in the HF names of the Llama family, so that tensor parallelism and
        quantization treat them alike: Phi-3's fused q/k/v and gate/up split, Mixtral's experts renamed
        (block_sparse_moe.experts.N.w1 -> mlp.experts.N.gate_proj)."""
        f = self.facts
        q, kv = f.num_heads * f.head_dim, f.num_kv_heads * f.head_dim
        for name, tensor in weights:
            parts = name.split(".")
            if "block_sparse_moe" in parts:
                parts = [MIXTRAL_NAMES.get(part, part) for part in parts]
                name = ".".join(parts)
            if len(parts) >= 2 and parts[-2] == "qkv_proj":
                for part, piece in zip(("q_proj", "k_proj", "v_proj"), tensor.split((q, kv, kv)), strict=True):
                    yield ".".join([*parts[:-2], part, parts[-1]]), piece
            elif len(parts) >= 2 and parts[-2] == "gate_up_proj":
                for part, piece in zip(("gate_proj", "up_proj"), tensor.chunk(2), strict=True):
                    yield ".".join([*parts[:-2], part, parts[-1]]), piece
            else:
                yield name, tensor

    def _stage_name(self, name: str) -> str | None:
        """Where a checkpoint tensor goes on this stage (None: not here, or never loaded)."""
        parts, stage = name.split("."), self.model.stage
        tied = self.facts.tie_word_embeddings
        if name.endswith(IGNORED_WEIGHTS) or (tied and name == "lm_head.weight"):
            return None
        if name.startswith("model.layers."):
            return name if int(parts[2]) in stage.layers else None
        if name == "model.embed_tokens.weight" and not stage.first:
            return "lm_head.weight" if tied and stage.last else None
        if name in ("lm_head.weight", "model.norm.weight") and not stage.last:
            return None
        return name

    def _shard_sizes(self, fused_name: str) -> tuple[int, ...]:
        if ".qkv_proj." in fused_name:
            return self.model.layers[self.model.stage.layers.start].self_attn.shard_sizes
        return (self.get_submodule(fused_name.rsplit(".", 2)[0]).intermediate_size,) * 2

    def _local_share(self, parts: list[str], tensor: torch.Tensor) -> torch.Tensor:
        """This rank's part of a full checkpoint tensor (all of it without tensor parallelism)."""
        p = self.parallel
        if p.size == 1:
            return tensor
        module, kind = parts[-2], parts[-1]
        head_dim, facts = self.facts.head_dim, self.facts
        if module == "q_proj":
            start, end = p.split(facts.num_heads)
            return tensor[start * head_dim : end * head_dim]
        if module in ("k_proj", "v_proj"):
            heads = kv_heads_per_gpu(facts, p.size)
            first = p.rank * heads if facts.num_kv_heads >= p.size else p.rank * facts.num_kv_heads // p.size
            return tensor[first * head_dim : (first + heads) * head_dim]
        if module in ("gate_proj", "up_proj"):  # a dense MLP's or an expert's intermediate rows
            start, end = p.split(tensor.shape[0])
            return tensor[start:end]
        if module in ("o_proj", "down_proj") and kind == "weight":
            start, end = p.split(tensor.shape[1])
            return tensor[:, start:end]
        if module in ("o_proj", "down_proj"):  # a bias: added once, by rank 0, before the all-reduce sums the ranks
            return tensor if p.rank == 0 else torch.zeros_like(tensor)
        if module in ("embed_tokens", "lm_head"):
            rows = self.vocab_rows
            share = tensor[p.rank * rows : (p.rank + 1) * rows]
            return F.pad(share, (0, 0, 0, rows - share.shape[0]))  # the last rank's padding rows: zeros
        return tensor  # norms: every rank holds them whole


def check_shardable(facts: ModelFacts, tp: int, variant: Variant | None = None) -> None:
    """Tensor parallelism splits heads, KV heads (or replicates them) and the MLP's rows evenly."""
    if tp == 1:
        return
    if variant is not None and variant.qk_norm == "full":
        raise UnsupportedOption(f"tensor parallelism is not supported for {variant.architecture}: its q/k norms "
                                "span every head; run it with tensor parallel size 1")
    if not tp_compatible(facts, tp):
        widths = ", ".join(map(str, facts.tp_split_sizes))
        raise UnsupportedOption(f"tensor parallel size {tp} does not divide {facts.name}: {facts.num_heads} "
                                f"heads, {facts.num_kv_heads} KV heads, intermediate size {widths}")


def _materialize(model: nn.Module, name: str, shape: torch.Size, like: torch.Tensor) -> nn.Parameter:
    module_name, _, attr = name.rpartition(".")
    param = nn.Parameter(torch.empty(shape, dtype=like.dtype, device=like.device), requires_grad=False)
    setattr(model.get_submodule(module_name), attr, param)
    return param


def _copy(param: torch.Tensor, tensor: torch.Tensor, name: str) -> None:
    if param.shape != tensor.shape:
        raise ValueError(f"checkpoint tensor {name!r} has shape {tuple(tensor.shape)}, the model expects "
                         f"{tuple(param.shape)}")
    param.copy_(tensor)
