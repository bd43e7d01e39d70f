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

from kvpilot.runtime.memory.support import UnsupportedOption, check_hf_config, layer_windows

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
    split: str  # "column" (out split), "row" (in split) or "kv" (out split, replicated past kv heads)
    bias: bool = False


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
    # A pre-quantized checkpoint's quantization_config (checkpoint.read_quantization); None: float weights
    checkpoint: CheckpointQuantization | None = field(default=None, compare=False)
    # Each layer's sliding attention window (support.layer_windows); () when no layer has one
    layer_windows: tuple[int | None, ...] = ()

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

    @property
    def layer_linears(self) -> tuple[Linear, ...]:
        """The projections of one decoder layer (attention, then the SwiGLU MLP)."""
        q_out, kv_out = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        h, i = self.hidden_size, self.intermediate_size
        return (
            Linear("q_proj", q_out, h, "column", self.qkv_bias),
            Linear("k_proj", kv_out, h, "kv", self.qkv_bias),
            Linear("v_proj", kv_out, h, "kv", self.qkv_bias),
            Linear("o_proj", h, q_out, "row"),
            Linear("gate_proj", i, h, "column"),
            Linear("up_proj", i, h, "column"),
            Linear("down_proj", h, i, "row"),
        )

    @property
    def params_by_part(self) -> dict[str, int]:
        attention = mlp = 0
        for lin in self.layer_linears:
            n = lin.out_features * lin.in_features + (lin.out_features if lin.bias else 0)
            if lin.name.endswith(("gate_proj", "up_proj", "down_proj")):
                mlp += n
            else:
                attention += n
        embeddings = self.vocab_size * self.hidden_size
        return {
            "embeddings": embeddings,
            "attention": attention * self.num_layers,
            "mlp": mlp * self.num_layers,
            "norms": (self.norms_per_layer * self.num_layers + 1) * self.hidden_size,
            "lm_head": 0 if self.tie_word_embeddings else embeddings,
        }

    @property
    def num_params(self) -> int:
        return sum(self.params_by_part.values())


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
            qkv_bias=bool(config.get("attention_bias", arch.startswith("Qwen2"))),
            norms_per_layer=4 if arch.startswith("Gemma2") else 2,
            rope_theta=float(config.get("rope_theta", 10000.0)),
            rope_scaling=config.get("rope_scaling"),
            rms_norm_eps=float(config.get("rms_norm_eps", 1e-5)),
            checkpoint=read_quantization(config),
            layer_windows=windows if any(windows := layer_windows(config)) else (),
        )
    except KeyError as err:
        raise UnknownModel(f"config of {name} lacks the field {err.args[0]!r}") from None


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
