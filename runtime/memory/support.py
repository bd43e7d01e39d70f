"""What the runtime runs, and the error for what it does not.

The planner, the operator and the loader read the same facts here, so a model the pods would
refuse is refused at plan time too, in the same words. `check_hf_config` is the one gate: every
field of a HF `config.json` is either honoured by the model code (runtime/models/), known to leave
inference unchanged (bookkeeping), or refused with one line naming the field, its value and what is
supported. Pure Python: the operator imports it without torch.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


class UnsupportedOption(ValueError):
    """An option this runtime does not run yet: refused at start-up, never silently ignored."""


# --- architectures --------------------------------------------------------------------------------
# HF architecture -> the config fields its model file (runtime/models/) reads, beyond COMMON_FIELDS.
COMMON_FIELDS = frozenset({
    "architectures", "model_type", "hidden_size", "intermediate_size", "num_hidden_layers",
    "num_attention_heads", "num_key_value_heads", "head_dim", "vocab_size", "max_position_embeddings",
    "rms_norm_eps", "tie_word_embeddings", "rope_theta", "rope_scaling", "rope_parameters",
})
_LLAMA = frozenset({"hidden_act", "attention_bias", "mlp_bias", "sliding_window", "use_sliding_window",
                    "max_window_layers", "layer_types"})
ARCHITECTURES: dict[str, frozenset[str]] = {
    "LlamaForCausalLM": _LLAMA,
    "MistralForCausalLM": _LLAMA,
    "Qwen2ForCausalLM": _LLAMA,
    "Qwen3ForCausalLM": _LLAMA,
    "GraniteForCausalLM": _LLAMA | {"embedding_multiplier", "attention_multiplier", "residual_multiplier",
                                    "logits_scaling"},
    "Olmo2ForCausalLM": _LLAMA,
    "Phi3ForCausalLM": _LLAMA | {"original_max_position_embeddings", "partial_rotary_factor"},
    "SmolLM3ForCausalLM": _LLAMA | {"no_rope_layers", "no_rope_layer_interval"},
    "Gemma2ForCausalLM": _LLAMA | {"hidden_activation", "query_pre_attn_scalar", "attn_logit_softcapping",
                                   "final_logit_softcapping", "cache_implementation",
                                   "use_bidirectional_attention"},
    "MixtralForCausalLM": _LLAMA | {"num_local_experts", "num_experts_per_tok"},
    "Qwen3MoeForCausalLM": _LLAMA | {"num_experts", "num_local_experts", "num_experts_per_tok", "moe_intermediate_size",
                                     "decoder_sparse_step", "mlp_only_layers", "norm_topk_prob"},
    "Qwen2MoeForCausalLM": _LLAMA | {"num_experts", "num_experts_per_tok", "moe_intermediate_size", "qkv_bias",
                                     "shared_expert_intermediate_size", "decoder_sparse_step", "mlp_only_layers",
                                     "norm_topk_prob"},
    "Gemma3ForCausalLM": _LLAMA | {"hidden_activation", "query_pre_attn_scalar", "attn_logit_softcapping",
                                   "final_logit_softcapping", "cache_implementation", "rope_local_base_freq",
                                   "sliding_window_pattern", "_sliding_window_pattern",
                                   "use_bidirectional_attention"},
}
WINDOWED_ARCHITECTURES = ("MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "Phi3ForCausalLM",
                          "SmolLM3ForCausalLM", "Gemma2ForCausalLM", "Gemma3ForCausalLM", "MixtralForCausalLM",
                          "Qwen3MoeForCausalLM", "Qwen2MoeForCausalLM")
# Fields that never change the forward pass of inference: ids, dropout, training and export settings,
# generation defaults (the request's sampling parameters decide those here).
BOOKKEEPING = frozenset({
    "transformers_version", "_name_or_path", "name_or_path", "dtype", "torch_dtype", "use_cache", "return_dict",
    "output_hidden_states", "output_attentions", "torchscript", "use_bfloat16", "tf_legacy_loss",
    "chunk_size_feed_forward", "is_encoder_decoder", "is_decoder", "id2label", "label2id", "problem_type",
    "finetuning_task", "task_specific_params", "prefix", "tokenizer_class", "auto_map", "keys_to_ignore_at_inference",
    "initializer_range", "initializer_factor", "pad_token_id", "bos_token_id", "eos_token_id", "sep_token_id",
    "decoder_start_token_id", "attention_dropout", "resid_pdrop", "embd_pdrop", "hidden_dropout", "mlp_dropout",
    "pretraining_tp",  # a training-time split of the same matmuls: identical results
    "max_length", "min_length", "do_sample", "early_stopping", "num_beams", "num_beam_groups", "diversity_penalty",
    "temperature", "top_k", "top_p", "typical_p", "repetition_penalty", "length_penalty", "no_repeat_ngram_size",
    "encoder_no_repeat_ngram_size", "bad_words_ids", "num_return_sequences", "output_scores",
    "return_dict_in_generate", "forced_bos_token_id", "forced_eos_token_id", "remove_invalid_values",
    "exponential_decay_length_penalty", "suppress_tokens", "begin_suppress_tokens", "tie_encoder_decoder",
    "add_cross_attention", "cross_attention_hidden_size", "_attn_implementation_autoset", "pruned_heads",
    "_sliding_window_pattern", "sliding_window_pattern",  # checked against layer_types below
    # mixture-of-experts training: the load-balancing loss, and Mixtral's jitter (applied in training mode only)
    "output_router_logits", "router_aux_loss_coef", "router_jitter_noise",
})

# --- activations, rope, attention -----------------------------------------------------------------
ACTIVATIONS = ("silu", "gelu", "gelu_pytorch_tanh", "gelu_new", "gelu_fast", "relu")
# rope_type -> the keys of its parameters that the runtime reads (besides rope_type / type / rope_theta)
ROPE_TYPES: dict[str, frozenset[str]] = {
    "default": frozenset(),
    "linear": frozenset({"factor"}),
    "llama3": frozenset({"factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"}),
    "yarn": frozenset({"factor", "original_max_position_embeddings", "attention_factor", "beta_fast", "beta_slow",
                       "mscale", "mscale_all_dim", "truncate"}),
    "longrope": frozenset({"short_factor", "long_factor", "factor", "original_max_position_embeddings",
                           "attention_factor"}),
    # HF re-derives dynamic NTK's frequencies from each step's length; up to the original length it is
    # exactly the default rope, so it runs there and is refused beyond it.
    "dynamic": frozenset({"factor", "original_max_position_embeddings"}),
}
ROPE_COMMON_KEYS = frozenset({"rope_type", "type", "rope_theta", "partial_rotary_factor"})
LAYER_TYPES = ("full_attention", "sliding_attention")

# --- quantization formats ----------------------------------------------------------------------------
# Checkpoint quantization formats the loader reads (`quantization_config.quant_method`; the layouts each
# may use are checked by check_checkpoint_quantization below, through checkpoint.read_quantization).
QUANTIZATION_FORMATS = ("compressed-tensors", "gptq", "awq", "fp8", "fbgemm_fp8")


def check_hf_config(config: Mapping[str, Any], max_model_len: int | None = None) -> None:
    """Refuse, in one line, a HF config (v4 or v5 layout) this runtime cannot run exactly.

    `max_model_len`: the context the engine will serve (None: the model's own maximum); a few options
    (dynamic NTK rope) run exactly only up to a length."""
    arch = (config.get("architectures") or ["<none>"])[0]
    if arch not in ARCHITECTURES:
        raise UnsupportedOption(f"architecture {arch!r} is not supported: supported architectures are "
                                f"{', '.join(ARCHITECTURES)}")
    honoured = COMMON_FIELDS | ARCHITECTURES[arch] | BOOKKEEPING
    for name, value in config.items():
        if name in ("quantization_config", "compression_config"):
            _check_quantization(value)
        # transformers' own notes (_name_or_path, ...) and tokenizer ids (unk_token_id, ...) never change the maths
        elif name not in honoured and not name.startswith("_") and not name.endswith(("_token_id", "_token_ids")):
            raise UnsupportedOption(f"config field {name}={_show(value)} ({arch}) is not honoured by this runtime: "
                                    "remove it if it does not change the model, or use another model")
    act = config.get("hidden_activation") or config.get("hidden_act") or "silu"
    if act not in ACTIVATIONS:
        raise UnsupportedOption(f"config field hidden_act={act!r} is not supported: supported activations are "
                                f"{', '.join(ACTIVATIONS)}")
    if config.get("use_bidirectional_attention"):
        raise UnsupportedOption("config field use_bidirectional_attention=true is not supported: the runtime "
                                "serves causal decoders only")
    for name in ("layer_types", "no_rope_layers"):
        if config.get(name) is not None and len(config[name]) != int(config.get("num_hidden_layers", 0)):
            raise UnsupportedOption(f"config field {name} has {len(config[name])} entries for "
                                    f"{config.get('num_hidden_layers')} layers")
    for layer_type in config.get("layer_types") or ():
        if layer_type not in LAYER_TYPES:
            raise UnsupportedOption(f"config field layer_types holds {layer_type!r}: supported layer types are "
                                    f"{', '.join(LAYER_TYPES)}")
    for where, rope in rope_settings(config).items():
        _check_rope(rope, where, config, max_model_len)


def _check_quantization(value: Any) -> None:
    method = value.get("quant_method") if isinstance(value, Mapping) else value
    if method not in QUANTIZATION_FORMATS:
        supported = ", ".join(QUANTIZATION_FORMATS) or "none (give a full-precision checkpoint and --quantization)"
        raise UnsupportedOption(f"config field quantization_config.quant_method={_show(method)} is not supported: "
                                f"supported checkpoint quantization formats: {supported}")


def rope_settings(config: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """The rope parameters of each layer type ("all" when every layer shares them), v4 and v5 layouts
    merged: {"rope_type", "rope_theta", ...}."""
    params = config.get("rope_parameters") or {}
    if params and all(isinstance(v, Mapping) for v in params.values()):  # v5 Gemma 3: one dict per layer type
        return {str(kind): _rope_with_defaults(dict(p), config) for kind, p in params.items()}
    merged = {**(config.get("rope_scaling") or {}), **params}
    settings = {"all": _rope_with_defaults(merged, config)}
    if "rope_local_base_freq" in config:  # v4 Gemma 3: local layers have their own base and no scaling
        settings = {"full_attention": settings["all"],
                    "sliding_attention": {"rope_type": "default", "rope_theta": float(config["rope_local_base_freq"])}}
    return settings


def _rope_with_defaults(rope: dict[str, Any], config: Mapping[str, Any]) -> dict[str, Any]:
    rope = dict(rope)
    rope["rope_type"] = str(rope.get("rope_type") or rope.pop("type", None) or "default")
    rope.pop("type", None)
    rope.setdefault("rope_theta", float(config.get("rope_theta", 10000.0)))
    if "partial_rotary_factor" in config:
        rope.setdefault("partial_rotary_factor", float(config["partial_rotary_factor"]))
    if rope["rope_type"] in ("longrope", "yarn", "dynamic") and "original_max_position_embeddings" in config:
        rope.setdefault("original_max_position_embeddings", int(config["original_max_position_embeddings"]))
    if rope["rope_type"] == "longrope" and rope.get("factor") is None and rope.get("original_max_position_embeddings"):
        # as transformers: the model's context over the original one (it sets longrope's attention factor)
        rope["factor"] = int(config.get("max_position_embeddings", 0)) / int(rope["original_max_position_embeddings"])
    return rope


def _check_rope(rope: dict[str, Any], where: str, config: Mapping[str, Any], max_model_len: int | None) -> None:
    kind = rope["rope_type"]
    label = "rope_scaling" if where == "all" else f"rope_parameters.{where}"
    if kind not in ROPE_TYPES:
        raise UnsupportedOption(f"config field {label}.rope_type={kind!r} is not supported: supported rope types "
                                f"are {', '.join(ROPE_TYPES)}")
    for key, value in rope.items():
        if key not in ROPE_TYPES[kind] | ROPE_COMMON_KEYS:
            raise UnsupportedOption(f"config field {label}.{key}={_show(value)} is not honoured for rope type "
                                    f"{kind!r}: it reads {', '.join(sorted(ROPE_TYPES[kind])) or 'no parameters'}")
    missing = {"linear": ("factor",), "llama3": tuple(ROPE_TYPES["llama3"]),
               "yarn": ("factor", "original_max_position_embeddings"),
               "longrope": ("short_factor", "long_factor", "original_max_position_embeddings"),
               "dynamic": ("factor",)}.get(kind, ())
    for key in missing:
        if rope.get(key) is None:
            raise UnsupportedOption(f"config field {label} of rope type {kind!r} lacks {key}")
    if kind == "dynamic":
        original = int(rope.get("original_max_position_embeddings") or config.get("max_position_embeddings", 0))
        length = max_model_len or int(config.get("max_position_embeddings", 0))
        if length > original:
            raise UnsupportedOption(f"config field {label}.rope_type='dynamic' changes its frequencies past "
                                    f"{original} tokens, which this runtime does not run: set max_model_len to "
                                    f"at most {original} (asked: {length})")


def layer_windows(config: Mapping[str, Any]) -> tuple[int | None, ...]:
    """Each layer's sliding attention window in tokens (a query sees itself and the window - 1 keys
    before it), None for a layer attending to its whole context. The memory model can bound a
    windowed layer's KV by its window."""
    layers = int(config.get("num_hidden_layers", 0))
    window = config.get("sliding_window")
    arch = (config.get("architectures") or [""])[0]
    # transformers' Llama, Granite and OLMo 2 have no sliding attention: a window in their config is inert
    if not window or config.get("use_sliding_window") is False or arch not in WINDOWED_ARCHITECTURES:
        return (None,) * layers
    types = config.get("layer_types")
    if types is None:  # derived as transformers derives them for configs written before layer_types
        pattern = config.get("sliding_window_pattern") or config.get("_sliding_window_pattern")
        if pattern:  # Gemma 3: every pattern-th layer is global
            types = ["full_attention" if (i + 1) % int(pattern) == 0 else "sliding_attention" for i in range(layers)]
        elif arch == "Gemma2ForCausalLM":
            types = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)]
        elif arch in ("Qwen2ForCausalLM", "Qwen3ForCausalLM"):  # the layers from max_window_layers on
            first = int(config.get("max_window_layers", 28))
            types = ["sliding_attention" if i >= first else "full_attention" for i in range(layers)]
        elif arch == "Qwen2MoeForCausalLM":  # every other layer below max_window_layers
            last = int(config.get("max_window_layers", 28))
            types = ["sliding_attention" if (i + 1) % 2 and i < last else "full_attention" for i in range(layers)]
        elif arch == "SmolLM3ForCausalLM":  # the layers without rope
            types = ["full_attention" if rope else "sliding_attention" for rope in smollm3_rope_layers(config)]
        else:  # Mistral, Phi-3, Mixtral, Qwen3-MoE: every layer slides
            types = ["sliding_attention"] * layers
    return tuple(int(window) if t == "sliding_attention" else None for t in types)


def smollm3_rope_layers(config: Mapping[str, Any]) -> list[bool]:
    """SmolLM3's layers with rope: `no_rope_layers` (1 = rope), else every `no_rope_layer_interval`-th
    layer (4 by default, as transformers) has none."""
    if config.get("no_rope_layers") is not None:
        return [bool(x) for x in config["no_rope_layers"]]
    interval = int(config.get("no_rope_layer_interval") or 4)
    return [(i + 1) % interval != 0 for i in range(int(config.get("num_hidden_layers", 0)))]


def num_experts(config: Mapping[str, Any]) -> int:
    """Routed experts per MoE layer (Mixtral: num_local_experts; Qwen-MoE: num_experts, which
    transformers 5 writes as num_local_experts); 0 for a dense model."""
    return int(config.get("num_local_experts") or config.get("num_experts") or 0)


def dense_mlp_layers(config: Mapping[str, Any], layers: int) -> list[bool]:
    """Which layers of an MoE model keep a dense MLP, as transformers' Qwen-MoE decides: the layers in
    mlp_only_layers, and all but every decoder_sparse_step-th one. Mixtral: none."""
    only = set(config.get("mlp_only_layers") or ())
    step = int(config.get("decoder_sparse_step") or 1)
    return [i in only or (i + 1) % step != 0 for i in range(layers)]


def _show(value: Any) -> str:
    text = repr(value) if not isinstance(value, (dict, list)) else str(value)
    return text if len(text) <= 60 else text[:57] + "..."


# --- Pre-quantized checkpoints (the memory model's part; owned with runtime/memory/checkpoint.py) --------
# The runtime's quantized layouts (kernels/quant_reference.py) are: int8 with one scale per output
# channel and no zero point; int4 with one scale and zero point per contiguous group of an even
# number of input columns; fp8 (e4m3) with one fp32 scale per output channel. A checkpoint loads
# into them exactly or not at all: these are the ones that do.
CHECKPOINT_FORMATS = QUANTIZATION_FORMATS


def check_checkpoint_quantization(checkpoint) -> None:
    """Refuse, in one line, a pre-quantized checkpoint whose layout the runtime cannot hold exactly
    (`checkpoint` is a kvpilot.runtime.memory.checkpoint.CheckpointQuantization)."""
    scheme, what = checkpoint.scheme, checkpoint.label
    if checkpoint.method not in CHECKPOINT_FORMATS:
        raise UnsupportedOption(f"{what}: {checkpoint.method} checkpoints are not supported "
                                f"(supported: {', '.join(CHECKPOINT_FORMATS)})")
    if checkpoint.act_order:
        raise UnsupportedOption(f"{what}: act-order (desc_act) checkpoints permute their groups, which the "
                                "runtime's int4 layout cannot hold: use a checkpoint quantized with desc_act false")
    if scheme.block is not None:
        raise UnsupportedOption(f"{what}: block-wise fp8 scales {list(scheme.block)} are not supported "
                                "(per-tensor and per-channel fp8 are)")
    grouped = bool(scheme.group_size)
    stored_zeros = bool(scheme.zero_bytes) and checkpoint.method == "compressed-tensors"  # GPTQ stores them always
    if scheme.kind == "int" and scheme.bits == 8 and (grouped or stored_zeros):
        raise UnsupportedOption(f"{what}: int8 weights load with one scale per output channel and no zero "
                                "point; this checkpoint has groups or zero points")
    if scheme.kind == "int" and scheme.bits == 4 and scheme.group_size and scheme.group_size % 2:
        raise UnsupportedOption(f"{what}: int4 groups of {scheme.group_size} columns are not supported "
                                "(an even group size is)")
