"""GGUF files (llama.cpp's format): model facts from the metadata, tensors dequantized to the compute
dtype under HF names, the tokenizer and chat template through transformers' GGUF support."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kvpilot.runtime.memory.support import UnsupportedOption

GGUF_ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
# llama.cpp's converter interleaves the rotary halves of q and k for these; HF's layout undoes it
PERMUTED_QK = ("llama", "mistral")
LAYER_TENSORS = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
                 "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
                 "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
                 "ffn_down": "mlp.down_proj"}
GLOBAL_TENSORS = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                  "output.weight": "lm_head.weight"}
ROPE_FREQS = "rope_freqs.weight"


class GGUFModel:
    """One GGUF file, opened once (memory-mapped): metadata now, tensors when iterated."""

    def __init__(self, path: Path) -> None:
        from gguf import GGUFReader

        self.path = path
        self.reader = GGUFReader(path)
        self.tensors = {t.name: t for t in self.reader.tensors}
        self.arch = str(self.field("general.architecture"))
        if self.arch not in GGUF_ARCHITECTURES:
            raise UnsupportedOption(f"GGUF architecture {self.arch!r} of {path.name} is not supported: "
                                    f"only {', '.join(GGUF_ARCHITECTURES)}")

    def field(self, key: str, default: Any = None) -> Any:
        field = self.reader.fields.get(key)
        return default if field is None else field.contents()

    def hf_config(self) -> dict[str, Any]:
        """The metadata as a HF `config.json` dict, for `model_facts.from_hf_config`."""
        a = self.arch
        heads = int(self.field(f"{a}.attention.head_count"))
        hidden = int(self.field(f"{a}.embedding_length"))
        vocab = self.field(f"{a}.vocab_size") or len(self.reader.fields["tokenizer.ggml.tokens"].data)
        config = {
            "architectures": [GGUF_ARCHITECTURES[a]],
            "num_hidden_layers": int(self.field(f"{a}.block_count")),
            "hidden_size": hidden,
            "intermediate_size": int(self.field(f"{a}.feed_forward_length")),
            "num_attention_heads": heads,
            "num_key_value_heads": int(self.field(f"{a}.attention.head_count_kv", heads)),
            "head_dim": int(self.field(f"{a}.attention.key_length", hidden // heads)),
            "max_position_embeddings": int(self.field(f"{a}.context_length", 4096)),
            "vocab_size": int(vocab),
            "rope_theta": float(self.field(f"{a}.rope.freq_base", 10000.0)),
            "rms_norm_eps": float(self.field(f"{a}.attention.layer_norm_rms_epsilon", 1e-5)),
            "tie_word_embeddings": "output.weight" not in self.tensors,
            "attention_bias": "blk.0.attn_q.bias" in self.tensors,
        }
        experts = self.field(f"{a}.expert_count")
        if experts:  # a GGUF mixture of experts (Mixtral's): named, so the support list refuses it in one line
            config["num_local_experts"] = int(experts)
        window = self.field(f"{a}.attention.sliding_window")
        if window:  # checked and honoured like a config.json's (memory/support.py)
            config["sliding_window"] = int(window)
        scaling = self.field(f"{a}.rope.scaling.type")
        if scaling and scaling != "none":
            if scaling != "linear":
                raise UnsupportedOption(f"GGUF rope scaling {scaling!r} of {self.path.name} is not supported")
            config["rope_scaling"] = {"rope_type": "linear", "factor": float(self.field(f"{a}.rope.scaling.factor"))}
        return config

    def eos_token_ids(self) -> list[int]:
        eos = self.field("tokenizer.ggml.eos_token_id")
        return [] if eos is None else [int(eos)]

    def rope_freq_factors(self) -> torch.Tensor | None:
        tensor = self.tensors.get(ROPE_FREQS)
        return None if tensor is None else torch.from_numpy(np.array(tensor.data, dtype=np.float32))

    def __len__(self) -> int:
        return len(self.tensors)

    def weights(self, dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
        """Every tensor dequantized to `dtype`, named and laid out as in a HF checkpoint."""
        from gguf.quants import dequantize

        config = self.hf_config()
        for name, tensor in self.tensors.items():
            hf_name = hf_tensor_name(name)
            if hf_name is None:
                continue
            shape = tuple(int(d) for d in reversed(tensor.shape))
            array = dequantize(tensor.data, tensor.tensor_type).reshape(shape).astype(np.float32, copy=False)
            weight = torch.from_numpy(array if array.flags.writeable else array.copy())
            if self.arch in PERMUTED_QK and hf_name.endswith(("q_proj.weight", "k_proj.weight")):
                is_q = hf_name.endswith("q_proj.weight")
                heads = config["num_attention_heads"] if is_q else config["num_key_value_heads"]
                weight = unpermute_rotary(weight, heads)
            yield hf_name, weight.to(dtype)


def hf_tensor_name(name: str) -> str | None:
    """`blk.3.attn_q.weight` -> `model.layers.3.self_attn.q_proj.weight`; None for tensors the model
    gets elsewhere (rope frequency factors)."""
    if name in GLOBAL_TENSORS:
        return GLOBAL_TENSORS[name]
    parts = name.split(".")
    if parts[0] == "blk" and len(parts) == 4 and parts[2] in LAYER_TENSORS:
        return f"model.layers.{parts[1]}.{LAYER_TENSORS[parts[2]]}.{parts[3]}"
    if name == ROPE_FREQS:
        return None
    raise UnsupportedOption(f"GGUF tensor {name!r} has no counterpart in the Llama-family model")


def unpermute_rotary(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Undo llama.cpp's q/k permutation: per head, interleaved rotary pairs back to two halves."""
    half = weight.shape[0] // num_heads // 2
    return weight.reshape(num_heads, half, 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)
