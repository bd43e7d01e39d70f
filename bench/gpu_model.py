"""Build a Llama-family checkpoint with random weights, for the GPU benchmarks.

The device machine cannot download a model and the embedded GGUF (98 MB) is too big to travel, so
`gpu_engine.sh` makes one there: a real HF directory (config.json, safetensors, the SmolLM2 tokenizer
from bench/assets) that the engine, the reference path and HF transformers all load. Random weights
are enough for speed and memory; token-level correctness on the GPU comes from comparing the engine
with its own reference path on this same model.

    python bench/gpu_model.py OUT_DIR [--shape llama-3.2-1b] [--device cuda] [--dtype bf16]
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

TOKENIZER = Path(__file__).parent / "assets" / "smollm2-tokenizer"
VOCAB = 49152  # the tokenizer's: every id the model emits decodes
# Shapes of real models (their config.json), with the tokenizer's vocabulary.
SHAPES = {
    "llama-3.2-1b": dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                         intermediate_size=8192, tie_word_embeddings=True, rope_theta=500000.0),
    "llama-3.1-8b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                         intermediate_size=14336, tie_word_embeddings=False, rope_theta=500000.0),
    "tiny": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2,
                 intermediate_size=512, tie_word_embeddings=True, rope_theta=10000.0),
}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def build(out: Path, shape: str, device: str, dtype: str, seed: int = 0) -> Path:
    config = LlamaConfig(vocab_size=VOCAB, max_position_embeddings=8192, bos_token_id=1, eos_token_id=2,
                         **SHAPES[shape])
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(DTYPES[dtype])
    model.save_pretrained(out)
    for file in TOKENIZER.iterdir():
        shutil.copy(file, out / file.name)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama-3.2-1b")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    args = parser.parse_args()
    build(args.out, args.shape, args.device, args.dtype)
    print(json.dumps({"bench": "gpu_model", "path": str(args.out), "shape": args.shape, "dtype": args.dtype}))


if __name__ == "__main__":
    main()
