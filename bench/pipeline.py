"""Pipeline parallelism on the CPU over gloo: do the stages overlap? Throughput of two stages with two
micro-batches in flight (vLLM's virtual engines) against the same two stages with one (the peer: each
stage idles while the other computes), in the same run, on the same random Llama and the same requests;
the unsplit engine beside them for scale. One JSON line per configuration.

Every process computes with `--threads` torch threads (1 by default: two stages on two cores), so the
overlap, not the thread count, is what differs.

    python bench/pipeline.py
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch

from kvpilot.runtime.engine.llm import LLM
from kvpilot.runtime.engine.sampling import SamplingParams
from kvpilot.runtime.loading.embedded import embedded_model_path
from kvpilot.runtime.loading.loader import load_model

CONFIGURATIONS = [
    ("pp2-microbatches2", {"pipeline_parallel_size": 2, "pipeline_micro_batches": 2}),
    ("pp2-microbatches1", {"pipeline_parallel_size": 2, "pipeline_micro_batches": 1}),
    ("unsplit", {}),
]


def build_checkpoint(directory: str, layers: int, hidden: int) -> None:
    """A random Llama with the embedded model's tokenizer (so the engine loads it as any checkpoint)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    tokenizer = load_model(str(embedded_model_path()), torch.float32, "cpu").tokenizer
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=hidden, intermediate_size=hidden * 8 // 3, num_hidden_layers=layers,
                         num_attention_heads=hidden // 64, num_key_value_heads=hidden // 128,
                         vocab_size=len(tokenizer), max_position_embeddings=1024, tie_word_embeddings=False)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(directory)
    tokenizer.save_pretrained(directory)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--output-len", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of every process")
    args = parser.parse_args()
    os.environ["KVPILOT_CPU_THREADS"] = os.environ["OMP_NUM_THREADS"] = str(args.threads)  # workers inherit it
    torch.set_num_threads(args.threads)

    generator = torch.Generator().manual_seed(1)
    with tempfile.TemporaryDirectory() as directory:
        build_checkpoint(directory, args.layers, args.hidden)
        vocab = json.loads(Path(directory, "config.json").read_text())["vocab_size"]
        prompts = torch.randint(0, vocab, (args.requests, args.prompt_len), generator=generator).tolist()
        params = SamplingParams(temperature=0.0, max_tokens=args.output_len, min_tokens=args.output_len)
        limits = {"device": "cpu", "num_kv_blocks": args.requests * (args.prompt_len + args.output_len) // 16 + 16,
                  "max_model_len": args.prompt_len + args.output_len, "max_num_seqs": args.requests,
                  "max_num_batched_tokens": max(256, args.requests)}
        reference = None
        for name, options in CONFIGURATIONS:
            with LLM(directory, **limits, **options) as llm:
                llm.generate(prompts[:2], SamplingParams(temperature=0.0, max_tokens=2))  # warm-up
                started = time.perf_counter()
                outputs = llm.generate(prompts, params)
                seconds = time.perf_counter() - started
            tokens = [o.token_ids for o in outputs]
            reference = reference or tokens
            print(json.dumps({"bench": "pipeline_micro_batches", "config": name, "layers": args.layers,
                              "hidden": args.hidden, "requests": args.requests, "prompt_len": args.prompt_len,
                              "output_len": args.output_len, "threads_per_process": args.threads,
                              "seconds": round(seconds, 3),
                              "output_tokens_per_s": round(sum(map(len, tokens)) / seconds, 1),
                              "same_tokens_as_first": tokens == reference}), flush=True)


if __name__ == "__main__":
    main()
