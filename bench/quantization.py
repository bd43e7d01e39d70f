"""What weight quantization and the fp8 KV cache buy and cost, each against the unquantized model
(the peer) in the same run, on short chat questions (with real questions the model's next token is
decided, as in use; on random word salad every variant's argmax is a coin toss):

- bytes: weights (and KV pool) held, measured on the loaded model, beside the memory model's figure;
- quality: how many of the prompts' first greedy tokens stay those of the unquantized model, and the
  mean log-probability this variant gives the unquantized model's choice (top-20; outside it: counted
  at the 20th's), beside the peer's own;
- speed: output tokens/s of one batch (on the CPU the references dequantize per matmul: int8/int4 save
  memory there, not time; the Triton kernels are what `bench/gpu_kernels.py` times on a GPU).
One JSON line per variant.

    python bench/quantization.py
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from kvpilot.runtime.engine.config import default_device
from kvpilot.runtime.engine.kv_cache import DTYPE_NAMES
from kvpilot.runtime.engine.llm import LLM
from kvpilot.runtime.engine.sampling import SamplingParams
from kvpilot.runtime.loading.loader import load_model
from kvpilot.runtime.memory.quantization import weight_bytes
from kvpilot.runtime.server.memory_report import weight_bytes_held

QUESTIONS = [
    "What is the capital of France?", "Write a haiku about autumn leaves.", "What is 17 times 23?",
    "Explain what a hash table is in two sentences.", "List three prime numbers greater than 50.",
    "Translate 'good morning' into Spanish.", "Why is the sky blue?", "Give me one tip for learning to cook.",
    "Who wrote Romeo and Juliet?", "What does a CPU do?", "Name the largest planet in the solar system.",
    "How many legs does a spider have?", "What is the boiling point of water at sea level?",
    "Summarise the water cycle in one sentence.", "What is photosynthesis?", "Suggest a name for a grey cat.",
    "What language is spoken in Brazil?", "Convert 5 kilometres to miles.", "What is the opposite of 'ancient'?",
    "Write a Python function that adds two numbers.", "What causes the seasons on Earth?",
    "Recommend a book for a long flight.", "What is the square root of 144?", "Describe a rainbow to a child.",
    "What is the chemical symbol for gold?", "How do vaccines work, briefly?", "What year did World War II end?",
    "Give a synonym for 'happy'.", "What is the tallest mountain on Earth?", "Explain recursion in one line.",
    "What is the freezing point of water in Fahrenheit?", "Why do leaves change colour in autumn?",
]
TOP = 20
VARIANTS = [(None, "auto"), ("int8", "auto"), ("int4", "auto"), ("fp8", "auto"), (None, "fp8"), ("int4", "fp8")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output-len", type=int, default=16)
    parser.add_argument("--device", default=default_device())
    parser.add_argument("--model", help="HF directory or GGUF file (default: the embedded SmolLM2-135M-Instruct)")
    args = parser.parse_args()

    dtype = torch.float32 if args.device == "cpu" else torch.bfloat16
    compute = DTYPE_NAMES[dtype]
    limits = {"device": args.device, "num_kv_blocks": 512, "max_model_len": 1024, "max_num_seqs": len(QUESTIONS),
              "max_num_batched_tokens": 1024}
    baseline: dict[str, list] = {}
    for quantization, kv in VARIANTS:
        started = time.perf_counter()
        loaded = load_model(args.model, dtype, args.device, quantization=quantization)
        load_seconds = time.perf_counter() - started
        llm = LLM(loaded=loaded, quantization=quantization, kv_cache_dtype=kv, **limits)
        prompts = [llm.apply_chat_template([{"role": "user", "content": q}]) for q in QUESTIONS]
        first = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=1, logprobs=TOP))
        started = time.perf_counter()
        outputs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True))
        seconds = time.perf_counter() - started
        firsts = [o.token_ids[0] for o in first]
        if not baseline:
            baseline = {"firsts": firsts, "logprobs": [o.logprobs[0].logprob for o in first],
                        "weights": weight_bytes_held(loaded.model), "kv": llm.engine.runner.kv_cache.nbytes,
                        "tok_s": 0.0}
        kept = sum(a == b for a, b in zip(firsts, baseline["firsts"], strict=True))
        logprobs = [dict(o.logprobs[0].top).get(want, o.logprobs[0].top[-1][1])
                    for o, want in zip(first, baseline["firsts"], strict=True)]
        tok_s = sum(len(o.token_ids) for o in outputs) / seconds
        baseline["tok_s"] = baseline["tok_s"] or tok_s
        weights = weight_bytes_held(loaded.model)
        kv_bytes = llm.engine.runner.kv_cache.nbytes
        print(json.dumps({
            "bench": "quantization", "device": args.device, "weights": quantization or compute,
            "kv_cache": llm.engine.config.kv_cache_dtype, "prompts": len(prompts),
            "weight_bytes": weights, "weight_bytes_planned": weight_bytes(loaded.facts, quantization or compute,
                                                                          compute),
            "weight_bytes_vs_peer": round(weights / baseline["weights"], 3),
            "kv_bytes": kv_bytes, "kv_bytes_vs_peer": round(kv_bytes / baseline["kv"], 3),
            "first_tokens_kept": f"{kept}/{len(prompts)}",
            "peer_choice_logprob_mean": round(sum(logprobs) / len(prompts), 4),
            "peer_choice_logprob_mean_in_peer": round(sum(baseline["logprobs"]) / len(prompts), 4),
            "output_tok_s": round(tok_s, 1), "output_tok_s_vs_peer": round(tok_s / baseline["tok_s"], 2),
            "load_seconds": round(load_seconds, 1)}), flush=True)


if __name__ == "__main__":
    main()
