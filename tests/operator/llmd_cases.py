"""Shared data of the operator tests: the examples and a small model outside every catalog."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))

# A small Llama-shaped model that is in no catalog.
TINY_CONFIG = {"architectures": ["LlamaForCausalLM"], "hidden_size": 512, "num_hidden_layers": 4,
               "num_attention_heads": 8, "num_key_value_heads": 2, "intermediate_size": 1024,
               "vocab_size": 32000, "max_position_embeddings": 4096, "torch_dtype": "bfloat16"}


def load_example(name: str) -> dict[str, Any]:
    """examples/NAME.yaml as a dict."""
    return yaml.safe_load((ROOT / "examples" / f"{name}.yaml").read_text())
