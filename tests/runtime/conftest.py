"""Shared, session-scoped fixtures for the engine tests: the embedded SmolLM2 GGUF loaded once by
kvpilot and once by HF transformers (the reference), and HF's greedy continuations of the parity
prompts. Engines are cheap to make on top of the loaded model: each gets its own KV pool."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from kvpilot.runtime.engine.llm import LLM
from kvpilot.runtime.engine.sampling import SamplingParams
from kvpilot.runtime.loading.embedded import embedded_model_path
from kvpilot.runtime.loading.loader import LoadedModel, load_model

PARITY_NEW_TOKENS = 32
SYSTEM = ("You are a careful assistant. Answer briefly, in plain English, and never invent facts you are "
          "not sure about. If a question is ambiguous, say so.")
QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about autumn leaves.",
    "Explain what a hash table is in two sentences.",
    "List three prime numbers greater than 50.",
    "Translate 'good morning' into Spanish and German.",
    "Why is the sky blue?",
    "Give me a short tip for learning to cook, and explain why it helps beginners who are often "
    "overwhelmed by recipes with many steps and unfamiliar techniques.",
    "What is 17 times 23?",
]
GREEDY = SamplingParams(temperature=0.0, max_tokens=PARITY_NEW_TOKENS, ignore_eos=True)


@pytest.fixture(scope="session")
def loaded_model() -> LoadedModel:
    return load_model(None, torch.float32, "cpu")


@pytest.fixture(scope="session")
def tokenizer(loaded_model: LoadedModel) -> Any:
    return loaded_model.tokenizer


@pytest.fixture(scope="session")
def hf_model() -> Any:
    from transformers import AutoModelForCausalLM

    path = embedded_model_path()
    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def parity_prompts(tokenizer: Any) -> list[list[int]]:
    """Chat prompts of mixed lengths (52-75 tokens) whose first 40 tokens (two full blocks) are the same."""
    return [tokenizer.apply_chat_template([{"role": "system", "content": SYSTEM}, {"role": "user", "content": q}],
                                          add_generation_prompt=True, tokenize=True, return_dict=False)
            for q in QUESTIONS]


@torch.no_grad()
def hf_greedy(model: Any, prompt: list[int], new_tokens: int) -> list[int]:
    """HF's own greedy decoding with its KV cache, one request, no padding: the reference."""
    out = model(torch.tensor([prompt]), use_cache=True)
    tokens = []
    for _ in range(new_tokens):
        tokens.append(int(out.logits[0, -1].argmax()))
        out = model(torch.tensor([[tokens[-1]]]), cache=out.past_key_values, use_cache=True)
    return tokens


@pytest.fixture(scope="session")
def hf_reference(hf_model: Any, parity_prompts: list[list[int]]) -> list[list[int]]:
    return [hf_greedy(hf_model, p, PARITY_NEW_TOKENS) for p in parity_prompts]


@pytest.fixture
def greedy() -> SamplingParams:
    """The parity tests' sampling: greedy, exactly PARITY_NEW_TOKENS tokens."""
    return GREEDY


@pytest.fixture
def make_llm(loaded_model: LoadedModel):
    """An engine on the shared weights; keyword arguments are EngineConfig fields."""

    def make(**options: Any) -> LLM:
        options = {"num_kv_blocks": 64, "max_model_len": 512, "device": "cpu", **options}
        return LLM(loaded=loaded_model, **options)

    return make
