"""What the memory model needs to know about a decoder-only transformer.

Pure Python on purpose: the operator plans with it and never imports torch.
Sources, in the order `resolve_model` tries them: an inline architecture (the spec's
`model.architecture`), a HF `config.json` (file or directory), the built-in catalog of
published configs (`catalog/models.json`).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kvpilot.runtime.memory.rotary import rope_set_originals, rotary_dim
from kvpilot.runtime.memory.support import (
    UnsupportedOption,
    check_hf_config,
    dense_mlp_layers,
    layer_windows,
    num_experts,
)

if TYPE_CHECKING:
    from kvpilot.runtime.memory.checkpoint import CheckpointQuantization


class UnknownModel(ValueError):
    """The model could not be identified from any source."""


@dataclass(frozen=True)
class Linear:
    """One projection matrix of a layer: `out_features x in_features`, split by tensor parallelism."""

    name: str
    out_features: int
    in_features: int
    split: str  # "column" (out split), "row" (in split), "kv" (out split, replicated past kv heads), "none"
    bias: bool = False
    part: str = "attention"  # attention | mlp | experts | router: the plan's weights_by_part key
    copies: int = 1  # experts: one matrix per routed expert

    @property
    def quantized(self) -> bool:
        """Routers stay in the compute dtype (as vLLM keeps them): tiny, and they pick the experts."""
        return self.part != "router"


@dataclass(frozen=True)
class ModelFacts:
    name: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    max_position_embeddings: int
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    norms_per_layer: int = 2
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = field(default=None, compare=False)
    rms_norm_eps: float = 1e-5
    qk_norm_size: int = 0  # weights of one layer's q/k norms: 2 x head_dim per head (Qwen3, Gemma 3), q + kv (OLMo 2)
    # Mixture of experts (0 experts: a dense model). Each MoE layer routes every token to
    # num_experts_per_tok of num_experts gated MLPs of moe_intermediate_size; Qwen2-MoE adds one
    # always-on shared expert with a sigmoid gate. dense_layers: the layers of an MoE model that keep
    # a dense MLP of intermediate_size (Qwen-MoE's mlp_only_layers and decoder_sparse_step).
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    shared_expert_intermediate_size: int = 0
    dense_layers: tuple[int, ...] = ()
    # A pre-quantized checkpoint's quantization_config (checkpoint.read_quantization); None: float weights
    checkpoint: CheckpointQuantization | None = field(default=None, compare=False)
    # Each layer's sliding attention window (support.layer_windows); () when no layer has one
    layer_windows: tuple[int | None, ...] = ()
    # The rotary tables the runtime builds (memory/rotary.py): channels that rotate (0: head_dim), and per
    # rope set (Gemma 3 has two) longrope's original context, else 0
    rotary_dim: int = 0
    rope_sets: tuple[int, ...] = (0,)

    def __post_init__(self) -> None:
        for name in ("num_layers", "hidden_size", "num_heads", "num_kv_heads", "head_dim",
                     "intermediate_size", "vocab_size", "max_position_embeddings"):
            if getattr(self, name) < 1:
                raise ValueError(f"model {self.name}: {name} must be >= 1, got {getattr(self, name)}")
        if self.layer_windows and len(self.layer_windows) != self.num_layers:
            raise ValueError(f"model {self.name}: {len(self.layer_windows)} layer windows for {self.num_layers} layers")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"model {self.name}: num_heads ({self.num_heads}) must be a multiple "
                             f"of num_kv_heads ({self.num_kv_heads})")
        if self.num_experts and not 1 <= self.num_experts_per_tok <= self.num_experts:
            raise ValueError(f"model {self.name}: num_experts_per_tok must be in 1..{self.num_experts}, "
                             f"got {self.num_experts_per_tok}")
        if self.num_experts and self.moe_intermediate_size < 1:
            raise ValueError(f"model {self.name}: moe_intermediate_size must be >= 1, got {self.moe_intermediate_size}")
        if self.num_experts and self.checkpoint is not None:
            raise UnsupportedOption(f"model {self.name}: pre-quantized mixture-of-experts checkpoints are not "
                                    "supported yet: give the full-precision checkpoint and --quantization")

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    def is_moe_layer(self, layer: int) -> bool:
        return self.is_moe and layer not in self.dense_layers

    @property
    def has_dense_mlp(self) -> bool:
        return not self.is_moe or any(0 <= i < self.num_layers for i in self.dense_layers)

    @property
    def tp_split_sizes(self) -> tuple[int, ...]:
        """The MLP widths tensor parallelism splits into equal shares: the dense MLP's, each expert's."""
        sizes = (self.intermediate_size,) if self.has_dense_mlp else ()
        if self.is_moe:
            sizes += (self.moe_intermediate_size,)
        if self.shared_expert_intermediate_size:
            sizes += (self.shared_expert_intermediate_size,)
        return sizes

    @property
    def attention_linears(self) -> tuple[Linear, ...]:
        q_out, kv_out, h = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim, self.hidden_size
        return (
            Linear("q_proj", q_out, h, "column", self.qkv_bias),
            Linear("k_proj", kv_out, h, "kv", self.qkv_bias),
            Linear("v_proj", kv_out, h, "kv", self.qkv_bias),
            Linear("o_proj", h, q_out, "row"),
        )

    def mlp_linears(self, layer: int) -> tuple[Linear, ...]:
        """A dense SwiGLU MLP; or the router, every expert's (each split by TP along its intermediate
        rows, as vLLM splits them) and the shared expert with its gate."""
        h = self.hidden_size
        if not self.is_moe_layer(layer):
            return _gated_mlp("", self.intermediate_size, h, "mlp")
        e, i, shared = self.num_experts, self.moe_intermediate_size, self.shared_expert_intermediate_size
        linears = (Linear("gate", e, h, "none", part="router"), *_gated_mlp("experts.", i, h, "experts", e))
        if shared:
            linears += (*_gated_mlp("shared_expert.", shared, h, "mlp"),
                        Linear("shared_expert_gate", 1, h, "none", part="router"))
        return linears

    def linears(self, layer: int) -> tuple[Linear, ...]:
        """The projections of decoder layer `layer`: attention, then its MLP or experts."""
        return self.attention_linears + self.mlp_linears(layer)

    @property
    def params_by_part(self) -> dict[str, int]:
        parts = {"attention": 0, "mlp": 0, **({"experts": 0, "router": 0} if self.is_moe else {})}
        for layer in range(self.num_layers):
            for lin in self.linears(layer):
                bias = lin.out_features if lin.bias else 0
                parts[lin.part] += lin.copies * (lin.out_features * lin.in_features + bias)
        embeddings = self.vocab_size * self.hidden_size
        norms = (self.norms_per_layer * self.num_layers + 1) * self.hidden_size + self.num_layers * self.qk_norm_size
        return {
            **parts,
            "embeddings": embeddings,
            "norms": norms,
            "lm_head": 0 if self.tie_word_embeddings else embeddings,
        }

    @property
    def num_params(self) -> int:
        return sum(self.params_by_part.values())


def _gated_mlp(prefix: str, intermediate: int, hidden: int, part: str, copies: int = 1) -> tuple[Linear, ...]:
    return (Linear(f"{prefix}gate_proj", intermediate, hidden, "column", part=part, copies=copies),
            Linear(f"{prefix}up_proj", intermediate, hidden, "column", part=part, copies=copies),
            Linear(f"{prefix}down_proj", hidden, intermediate, "row", part=part, copies=copies))


def from_hf_config(config: dict[str, Any], name: str = "model") -> ModelFacts:
    """Model facts from a HF `config.json` dict (Llama, Mistral, Qwen2, Gemma 2 and alikes), with
    its `quantization_config` when the checkpoint is pre-quantized."""
    from kvpilot.runtime.memory.checkpoint import read_quantization  # imports this module's Linear

    if config.get("architectures"):  # a model the pods would refuse is refused here too, in their words
        try:
            check_hf_config(config)
        except UnsupportedOption as err:
            raise UnsupportedOption(f"{name}: {err}") from None
    try:
        hidden = int(config["hidden_size"])
        heads = int(config["num_attention_heads"])
        arch = (config.get("architectures") or [""])[0]
        return ModelFacts(
            name=name,
            num_layers=int(config["num_hidden_layers"]),
            hidden_size=hidden,
            num_heads=heads,
            num_kv_heads=int(config.get("num_key_value_heads") or heads),
            head_dim=int(config.get("head_dim") or hidden // heads),
            intermediate_size=int(config["intermediate_size"]),
            vocab_size=int(config["vocab_size"]),
            max_position_embeddings=int(config.get("max_position_embeddings", 4096)),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            qkv_bias=bool(config.get("qkv_bias", config.get("attention_bias", arch.startswith("Qwen2")))),
            norms_per_layer=4 if arch.startswith(("Gemma2", "Gemma3")) else 2,  # sandwich norms
            rope_theta=float(config.get("rope_theta", 10000.0)),
            rope_scaling=config.get("rope_scaling"),
            rms_norm_eps=float(config.get("rms_norm_eps", 1e-5)),
            qk_norm_size=_qk_norm_size(arch, heads, int(config.get("num_key_value_heads") or heads),
                                       int(config.get("head_dim") or hidden // heads)),
            **_moe_facts(config),
            checkpoint=read_quantization(config),
            layer_windows=windows if any(windows := layer_windows(config)) else (),
            rotary_dim=rotary_dim(int(config.get("head_dim") or hidden // heads), config),
            rope_sets=rope_set_originals(config),
        )
    except KeyError as err:
        raise UnknownModel(f"config of {name} lacks the field {err.args[0]!r}") from None


def _qk_norm_size(arch: str, heads: int, kv_heads: int, head_dim: int) -> int:
    if arch in ("Qwen3ForCausalLM", "Qwen3MoeForCausalLM", "Gemma3ForCausalLM"):
        return 2 * head_dim  # one RMSNorm over each head's channels, shared by the heads
    if arch == "Olmo2ForCausalLM":
        return (heads + kv_heads) * head_dim  # over the whole q and k projections
    return 0


def _moe_facts(config: dict[str, Any]) -> dict[str, Any]:
    """The experts of a Mixtral / Qwen-MoE config (none for a dense one)."""
    experts = num_experts(config)
    if not experts:
        return {}
    arch = (config.get("architectures") or [""])[0]
    layers = int(config["num_hidden_layers"])
    # Mixtral's experts are intermediate_size wide; Qwen-MoE names the experts' width apart
    width = config["intermediate_size"] if arch == "MixtralForCausalLM" else config["moe_intermediate_size"]
    return {"num_experts": experts, "num_experts_per_tok": int(config["num_experts_per_tok"]),
            "moe_intermediate_size": int(width),
            "shared_expert_intermediate_size": int(config.get("shared_expert_intermediate_size") or 0),
            "dense_layers": tuple(i for i, dense in enumerate(dense_mlp_layers(config, layers)) if dense)}


def load_hf_config(path: str | Path) -> ModelFacts:
    """Model facts from a `config.json` file or a directory holding one."""
    path = Path(path)
    config_file = path / "config.json" if path.is_dir() else path
    if not config_file.is_file():
        raise UnknownModel(f"no config.json at {config_file}")
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError as err:
        raise UnknownModel(f"{config_file} is not valid JSON: {err}") from None
    return from_hf_config(config, name=path.name if path.is_dir() else path.parent.name)


@cache
def _catalog() -> dict[str, dict[str, Any]]:
    return json.loads((Path(__file__).parent / "catalog" / "models.json").read_text())


def _normalize(name: str) -> str:
    """`meta-llama/Meta-Llama-3.1-8B-Instruct` -> `llama-3.1-8b`: the catalog's key form."""
    base = name.rstrip("/").split("/")[-1].lower()
    if base.endswith(".gguf"):  # SmolLM2-135M-Instruct.Q4_1.gguf: drop the quant tag too
        base = re.sub(r"[.-](q\d\w*|i?q\d\w*|f16|bf16|f32)$", "", base[: -len(".gguf")])
    noise = {"meta", "instruct", "it", "chat", "hf"}
    return "-".join(part for part in base.split("-") if part not in noise)


def catalog_names() -> list[str]:
    return sorted(_catalog())


def catalog_aliases(name: str) -> list[str]:
    """The HF repo ids of a catalog key (its instruction-tuned variant first); [] for other names."""
    entry = _catalog().get(name.lower())
    return list(entry["aliases"]) if entry else []


def from_catalog(name: str) -> ModelFacts:
    """Look a model up in the catalog by key (`llama-3.1-8b`) or by HF repo id."""
    wanted = _normalize(name)
    for key, entry in _catalog().items():
        if wanted == key or wanted in (_normalize(alias) for alias in entry["aliases"]):
            return from_hf_config(entry["config"], name=key)
    raise UnknownModel(
        f"model {name!r} is not in the catalog ({', '.join(catalog_names())}); "
        "give its architecture inline (spec.model.architecture) or a config.json"
    )


def resolve_model(source: str, architecture: dict[str, Any] | None = None) -> ModelFacts:
    """Facts for a model source: inline architecture, then a local config.json, then the catalog.

    `source` is `hf://org/name`, `pvc://claim/path`, `file:///path`, a local path or a catalog key.
    """
    name = source.split("://", 1)[-1]
    if architecture:
        return from_hf_config(architecture, name=_normalize(name) or "model")
    if source.startswith("file://") or source.startswith("/") or source.startswith("."):
        local = Path(source.removeprefix("file://"))
        if local.is_dir() or local.name == "config.json":
            return load_hf_config(local)
    return from_catalog(name)
