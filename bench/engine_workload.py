"""The seeded chat workload the engine benchmarks share: N requests with varied prompt lengths (chat
template included) and varied output lengths, greedy, ignore_eos (so every request generates exactly
its output length). Output lengths follow a long-tailed distribution, as real chat traffic does
(ShareGPT's replies: many short, a few long)."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import torch

from kvpilot.runtime.loading.loader import LoadedModel, load_model

VOCABULARY = ("the model serves tokens from a paged cache while the scheduler batches every running request "
              "memory blocks hold keys and values for each layer and a prompt can share its prefix with others "
              "questions about history science cooking travel music code gardens rivers mountains cities "
              "explain summarize compare describe list translate why how what when where which")
WORDS = VOCABULARY.split()


@dataclass(frozen=True)
class Request:
    prompt_token_ids: list[int]
    output_len: int


def make_requests(tokenizer: Any, num: int, seed: int, min_words: int = 4, max_words: int = 120,
                  min_output: int = 8, max_output: int = 192) -> list[Request]:
    rng = random.Random(seed)
    requests = []
    for _ in range(num):
        words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(min_words, max_words)))
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": f"Please answer: {words}?"}],
                                               add_generation_prompt=True, tokenize=True, return_dict=False)
        output_len = min(max_output, max(min_output, int(rng.lognormvariate(3.6, 0.8))))
        requests.append(Request(list(prompt), output_len))
    return requests


def load(device: str, model: str | None = None) -> LoadedModel:
    """`model` (a HF directory or GGUF file) in fp32 on the CPU, bf16 on a GPU; None: the embedded one."""
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    return load_model(model, dtype, device)


def describe(requests: list[Request]) -> dict[str, float]:
    prompts = [len(r.prompt_token_ids) for r in requests]
    outputs = [r.output_len for r in requests]
    return {"requests": len(requests), "prompt_tokens_mean": round(sum(prompts) / len(prompts), 1),
            "prompt_tokens_max": max(prompts), "output_tokens_mean": round(sum(outputs) / len(outputs), 1),
            "output_tokens_max": max(outputs), "output_tokens_total": sum(outputs)}
