"""How one decoder family differs from Llama: the switches the Llama-family model file reads.

Every field comes from the HF config that `kvpilot.runtime.memory.support.check_hf_config` accepted;
the defaults are Llama's, so `Variant()` is plain Llama and a GGUF or catalog model needs no config.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from kvpilot.runtime.memory.support import layer_windows, rope_settings, smollm3_rope_layers

GEMMA = ("Gemma2ForCausalLM", "Gemma3ForCausalLM")


@dataclass(frozen=True)
class Variant:
    architecture: str = "LlamaForCausalLM"
    activation: str = "silu"
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: str | None = None  # "head": RMSNorm over each head (Qwen3, Gemma 3); "full": over the projection (OLMo 2)
    gemma_norm: bool = False  # RMSNorm scaled by (1 + weight) in fp32
    norm_layout: str = "pre"  # "pre" (Llama), "sandwich" (Gemma 2/3: pre and post), "post" (OLMo 2)
    embedding_scale: float | None = None  # Gemma: sqrt(hidden), Granite: embedding_multiplier
    embedding_scale_in_dtype: bool = False  # Gemma rounds sqrt(hidden) to the compute dtype first
    attention_scale: float | None = None  # None: head_dim ** -0.5
    residual_multiplier: float = 1.0  # Granite
    logits_divisor: float = 1.0  # Granite's logits_scaling
    attn_softcap: float | None = None  # Gemma 2: scores = cap * tanh(scores / cap)
    final_softcap: float | None = None
    windows: tuple[int | None, ...] = ()  # per layer; () = every layer attends to its whole context
    layer_ropes: tuple[str, ...] = ()  # per layer: the key of `ropes` it uses; () = "all"
    ropes: dict[str, dict[str, Any]] = field(default_factory=dict, compare=False)
    rope_layers: tuple[bool, ...] = ()  # SmolLM3: False where a layer has no rotary embedding
    partial_rotary_factor: float = 1.0
    norm_topk_prob: bool = True  # MoE: renormalise the top-k router weights (Mixtral always; Qwen3-MoE if set)
    router_weights_in_dtype: bool = False  # MoE: weigh the experts in the compute dtype (Qwen3-MoE), not fp32

    def window(self, layer: int) -> int | None:
        return self.windows[layer] if self.windows else None

    def rope_key(self, layer: int) -> str:
        return self.layer_ropes[layer] if self.layer_ropes else "all"

    def uses_rope(self, layer: int) -> bool:
        return self.rope_layers[layer] if self.rope_layers else True


def variant_from_config(config: dict[str, Any]) -> Variant:
    """The switches of a HF config already accepted by `check_hf_config`."""
    arch = (config.get("architectures") or ["LlamaForCausalLM"])[0]
    hidden, heads = int(config["hidden_size"]), int(config["num_attention_heads"])
    head_dim = int(config.get("head_dim") or hidden // heads)
    layers = int(config["num_hidden_layers"])
    ropes = rope_settings(config)
    windows = layer_windows(config)
    options: dict[str, Any] = {
        "architecture": arch,
        "activation": config.get("hidden_activation") or config.get("hidden_act") or "silu",
        "windows": windows if any(windows) else (),
        "ropes": ropes,
    }
    bias = bool(config.get("attention_bias", False))
    # Qwen2 hard-codes a bias on q/k/v only (Qwen2-MoE's qkv_bias, true unless set, says the same); the
    # others put attention_bias on o_proj too (Phi-3 has none)
    qwen2 = arch in ("Qwen2ForCausalLM", "Qwen2MoeForCausalLM")
    options["qkv_bias"] = bool(config.get("qkv_bias", True)) if qwen2 else bias
    options["o_bias"] = bias and not qwen2
    options["mlp_bias"] = bool(config.get("mlp_bias", False))
    if len(ropes) > 1:  # Gemma 3: local and global layers rotate with their own base
        types = config.get("layer_types") or ["sliding_attention" if w else "full_attention" for w in windows]
        options["layer_ropes"] = tuple(types)
    rope = next(iter(ropes.values()))
    options["partial_rotary_factor"] = float(rope.get("partial_rotary_factor", 1.0))
    if arch == "Qwen3ForCausalLM":
        options["qk_norm"] = "head"
    elif arch == "Qwen3MoeForCausalLM":  # transformers' Qwen3MoeConfig defaults norm_topk_prob to false
        options.update(qk_norm="head", norm_topk_prob=bool(config.get("norm_topk_prob", False)),
                       router_weights_in_dtype=True)
    elif arch == "Qwen2MoeForCausalLM":
        options.update(norm_topk_prob=bool(config.get("norm_topk_prob", False)), router_weights_in_dtype=True)
    elif arch == "Olmo2ForCausalLM":
        options.update(qk_norm="full", norm_layout="post")
    elif arch == "GraniteForCausalLM":
        options.update(embedding_scale=float(config.get("embedding_multiplier", 1.0)),
                       attention_scale=float(config.get("attention_multiplier", head_dim ** -0.5)),
                       residual_multiplier=float(config.get("residual_multiplier", 1.0)),
                       logits_divisor=float(config.get("logits_scaling", 1.0)))
    elif arch == "SmolLM3ForCausalLM":
        options["rope_layers"] = tuple(smollm3_rope_layers(config))
    elif arch in GEMMA:
        options.update(gemma_norm=True, norm_layout="sandwich", embedding_scale=math.sqrt(hidden),
                       embedding_scale_in_dtype=True,
                       attention_scale=float(config.get("query_pre_attn_scalar") or head_dim) ** -0.5,
                       attn_softcap=config.get("attn_logit_softcapping"),
                       final_softcap=config.get("final_logit_softcapping"),
                       qk_norm="head" if arch == "Gemma3ForCausalLM" else None)
    if len(options.get("rope_layers", ())) not in (0, layers):
        raise ValueError("no_rope_layers does not name every layer")
    return Variant(**options)
