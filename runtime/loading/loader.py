"""Load a model for the engine: a HF directory (`config.json`, `*.safetensors` with or without a
sharded index, tokenizer files with the chat template) or a GGUF file. Weights land in the compute
dtype on the device; the model facts the memory model needs come from the same config."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from kvpilot.runtime.loading.embedded import embedded_model_path
from kvpilot.runtime.loading.gguf_file import GGUFModel
from kvpilot.runtime.loading.prequantized import Prequantized, checkpoint_quantization
from kvpilot.runtime.memory.facts import ModelFacts, UnknownModel, from_hf_config
from kvpilot.runtime.memory.support import UnsupportedOption, check_hf_config
from kvpilot.runtime.models.cpu_linear import pack_cpu_linears
from kvpilot.runtime.models.layers import RotaryEmbedding
from kvpilot.runtime.models.llama import LlamaForCausalLM
from kvpilot.runtime.models.moe import stack_experts
from kvpilot.runtime.models.offload import streamer_of
from kvpilot.runtime.models.parallel import SINGLE, Parallel
from kvpilot.runtime.models.quantized import quantized_weight_names, quantizer
from kvpilot.runtime.models.variant import Variant, variant_from_config

SAFETENSORS_INDEX = "model.safetensors.index.json"


@dataclass
class LoadedModel:
    model: LlamaForCausalLM
    tokenizer: Any  # a transformers tokenizer
    facts: ModelFacts
    eos_token_ids: list[int]
    source: Path


def resolve_model_path(model: str | None) -> Path:
    """The file or directory to load: the embedded GGUF when none is given; a directory holding
    exactly one GGUF file and no config.json means that file."""
    if model is None:
        return embedded_model_path()
    path = Path(model).expanduser()
    if not path.exists():
        raise UnknownModel(f"model path {model!r} does not exist (give a HF directory or a .gguf file)")
    if path.is_dir() and not (path / "config.json").is_file():
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) != 1:
            raise UnknownModel(f"{path} has no config.json and {len(ggufs)} .gguf files: point at one of them")
        path = ggufs[0]
    return path


def normalize_hf_config(config: dict[str, Any]) -> dict[str, Any]:
    """transformers 5 writes rope settings under `rope_parameters`: fold them back into the v4 keys."""
    config = dict(config)
    rope = config.get("rope_parameters") or {}
    if "rope_theta" in rope:
        config.setdefault("rope_theta", rope["rope_theta"])
    if rope.get("rope_type", "default") != "default":
        config.setdefault("rope_scaling", rope)
    return config


def check_config(config: dict[str, Any], source: Path, max_positions: int | None) -> None:
    """`check_hf_config` (the one list of what the runtime runs), its refusal naming the model."""
    try:
        check_hf_config(config, max_positions)
    except UnsupportedOption as err:
        raise UnsupportedOption(f"{source.name}: {err}") from None


def _safetensors_files(directory: Path) -> list[Path]:
    index = directory / SAFETENSORS_INDEX
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [directory / name for name in sorted(set(weight_map.values()))]
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise UnknownModel(f"{directory} holds no *.safetensors weights")
    return files


def _safetensors_weights(files: list[Path], dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import safe_open

    for file in files:
        with safe_open(file, framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open is not a dict
                yield name, f.get_tensor(name).to(dtype)


def _hf_eos_token_ids(directory: Path, tokenizer: Any) -> list[int]:
    ids = [] if tokenizer.eos_token_id is None else [int(tokenizer.eos_token_id)]
    generation = directory / "generation_config.json"
    if generation.is_file():
        eos = json.loads(generation.read_text()).get("eos_token_id")
        ids += [int(e) for e in (eos if isinstance(eos, list) else [eos]) if e is not None]
    return sorted(set(ids))


def build_model(facts: ModelFacts, weights: Iterator[tuple[str, torch.Tensor]], num_weights: int,
                dtype: torch.dtype, device: torch.device, max_positions: int,
                rope_freq_factors: torch.Tensor | None = None, quantization: str | None = None,
                parallel: Parallel = SINGLE, variant: Variant | None = None,
                prequantized: Prequantized | None = None) -> LlamaForCausalLM:
    """Construct without initializing (meta device), then fill every parameter from `weights`;
    with `quantization` (int8 / int4 / fp8) the decoder projections are quantized as they load."""
    with torch.device("meta"):
        model = LlamaForCausalLM(facts, max_positions, rope_freq_factors, parallel, variant)
    model = model.to(dtype=dtype)
    materialize(model, device, quantized_weight_names(model) if quantization else set())
    model.model.build_rotary_tables(device)
    bar = tqdm(weights, total=num_weights, desc=f"loading {facts.name}", unit="tensor", disable=None, leave=False)
    if prequantized is not None:
        prequantized.bind(model)
    model.load_weights(((name, tensor.to(device)) for name, tensor in bar),
                       prequantized or (quantizer(quantization, dtype) if quantization else None))
    stack_experts(model)
    if device.type == "cpu":
        pack_cpu_linears(model)
    return model.eval()


def materialize(model: torch.nn.Module, device: torch.device, keep_on_meta: set[str]) -> None:
    """`model.to_empty(device)`, except the parameters named in `keep_on_meta` (weights that will be
    quantized while loading: their full-precision copies are never allocated all at once)."""
    for module_name, module in model.named_modules():
        for name, param in list(module.named_parameters(recurse=False)):
            if f"{module_name}.{name}".lstrip(".") not in keep_on_meta:
                setattr(module, name, torch.nn.Parameter(torch.empty_like(param, device=device), requires_grad=False))
        for name, buffer in list(module.named_buffers(recurse=False)):
            setattr(module, name, torch.empty_like(buffer, device=device))


def load_model(model: str | None, dtype: torch.dtype, device: str | torch.device,
               max_positions: int | None = None, quantization: str | None = None,
               parallel: Parallel = SINGLE) -> LoadedModel:
    """Model, tokenizer, facts and EOS ids from a HF directory or a GGUF file (None: the embedded one);
    `quantization`: int8 / int4 / fp8 weights for the decoder projections, None for the compute dtype."""
    from transformers import AutoTokenizer

    path, device = resolve_model_path(model), torch.device(device)
    if path.suffix == ".gguf":
        gguf = GGUFModel(path)
        gguf_config = gguf.hf_config()
        check_config(gguf_config, path, max_positions)
        facts = from_hf_config(gguf_config, name=path.stem)
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        net = build_model(facts, gguf.weights(dtype), len(gguf), dtype, device,
                          max_positions or facts.max_position_embeddings, gguf.rope_freq_factors(), quantization,
                          parallel, variant_from_config(gguf_config))
        eos = gguf.eos_token_ids() + ([] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id])
        eos = sorted(set(eos))
        return LoadedModel(net, tokenizer, facts, eos, path)
    config = normalize_hf_config(json.loads((path / "config.json").read_text()))
    check_config(config, path, max_positions)
    facts = from_hf_config(config, name=path.name)
    files = _safetensors_files(path)
    num_weights = 0
    from safetensors import safe_open

    for file in files:
        with safe_open(file, framework="pt") as f:
            num_weights += len(list(f.keys()))
    tokenizer = AutoTokenizer.from_pretrained(path)
    weights, prequantized = _safetensors_weights(files, dtype), None
    if facts.checkpoint is not None:  # pre-quantized: loaded into the runtime's layout as stored
        quantization = checkpoint_quantization(facts, quantization)
        prequantized = Prequantized(facts.checkpoint, dtype, facts)
        weights = prequantized.weights(files, dtype)
    net = build_model(facts, weights, num_weights, dtype, device, max_positions or facts.max_position_embeddings,
                      quantization=quantization, parallel=parallel, variant=variant_from_config(config),
                      prequantized=prequantized)
    return LoadedModel(net, tokenizer, facts, _hf_eos_token_ids(path, tokenizer), path)


def weight_bytes_held(module: torch.nn.Module) -> int:
    """Device bytes of the model's weights as loaded (quantized ones with their scales; tied weights once;
    offloaded layers as the two staging buffers they stream through). The state dict leaves out the
    rotary cos/sin tables, which are derived, not weights. A oneDNN-packed weight (models/cpu_linear.py)
    has no storage to share, and holds exactly its elements' bytes."""
    streamer = streamer_of(module)
    staging = {b.data_ptr() for b in streamer.staging} if streamer else set()
    tensors = {(t.data_ptr() if t.layout == torch.strided else id(t)): t for t in module.state_dict().values()
               if t.layout != torch.strided or t.untyped_storage().data_ptr() not in staging}
    return sum(t.numel() * t.element_size() for t in tensors.values()) + (streamer.staging_bytes if streamer else 0)


def host_weight_bytes(module: torch.nn.Module) -> int:
    """Bytes of the offloaded layers' weights in host memory (0 without offload)."""
    streamer = streamer_of(module)
    return streamer.host_bytes if streamer else 0


def rotary_table_bytes_held(module: torch.nn.Module) -> int:
    """Bytes of the rotary cos/sin tables the model built (the plan's memory.rotary_tables)."""
    return sum(table.numel() * table.element_size() for rotary in module.modules()
               if isinstance(rotary, RotaryEmbedding) for table in (rotary.cos, rotary.sin))
