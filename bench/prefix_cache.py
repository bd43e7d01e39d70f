"""Prefix caching: requests that share a ~1k-token system prompt, each with its own question, sent
one after another, after a warm-up request that shares none of their blocks (the first measured
request fills the cache, the others find the shared prefix). Time to first token with the prefix
cache on vs off (the peer: kvpilot without it, same run), and the cache's hit rate (prompt tokens
found / looked up). One JSON line per result, then the ratio.

    python bench/prefix_cache.py --num-requests 8
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time

from engine_workload import WORDS, load

from kvpilot.runtime.engine.config import default_device
from kvpilot.runtime.engine.llm import LLM
from kvpilot.runtime.engine.sampling import SamplingParams

QUESTIONS = ["What is a paged KV cache?", "Why batch requests?", "Summarize the rules above.",
             "Which rule matters most?", "Explain prefix sharing.", "How long may an answer be?",
             "What should you never do?", "List two of the rules."]


def system_prompt(tokenizer, target_tokens: int, seed: int) -> str:
    rng, words = random.Random(seed), []
    while len(tokenizer.encode(" ".join(words))) < target_tokens:
        words += [rng.choice(WORDS) for _ in range(50)]
    return "Rules of this service: " + " ".join(words)


def time_to_first_tokens(llm: LLM, prompts: list[list[int]]) -> list[float]:
    """Each request alone: seconds from arrival to the step that produced its first token."""
    engine, ttfts = llm.engine, []
    for i, prompt in enumerate(prompts):
        start = time.perf_counter()
        engine.add_request(f"q{i}", prompt, SamplingParams(temperature=0.0, max_tokens=1))
        while engine.has_unfinished_requests:
            engine.step()
        ttfts.append(time.perf_counter() - start)
    return ttfts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--num-requests", type=int, default=8)
    parser.add_argument("--system-tokens", type=int, default=1024)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=default_device())
    args = parser.parse_args()

    loaded = load(args.device)
    tok = loaded.tokenizer
    system = system_prompt(tok, args.system_tokens, args.seed)
    def chat(system: str, question: str) -> list[int]:
        return tok.apply_chat_template([{"role": "system", "content": system}, {"role": "user", "content": question}],
                                       add_generation_prompt=True, tokenize=True, return_dict=False)

    prompts = [chat(system, QUESTIONS[i % len(QUESTIONS)] + f" ({i})") for i in range(args.num_requests)]
    # the warm-up shares no block with the measured prompts: the first measured request finds the cache
    # cold and fills it, as in a real service; the rest hit it
    warm = chat(system_prompt(tok, args.system_tokens, args.seed + 1), "Warm up.")
    results = {}
    for caching in (False, True):
        llm = LLM(loaded=loaded, device=args.device, num_kv_blocks=256, max_model_len=2048,
                  max_num_batched_tokens=2048, enable_prefix_caching=caching)
        time_to_first_tokens(llm, [warm])
        ttfts = time_to_first_tokens(llm, prompts)
        stats = llm.stats()
        hit_rate = stats.prefix_cache_hits / stats.prefix_cache_queries if stats.prefix_cache_queries else 0.0
        results[caching] = statistics.mean(ttfts)
        print(json.dumps({"bench": "prefix_cache_ttft", "prefix_caching": caching, "requests": len(prompts),
                          "prompt_tokens_mean": round(statistics.mean(len(p) for p in prompts), 1),
                          "ttft_mean_ms": round(results[caching] * 1e3, 1),
                          "ttft_p50_ms": round(statistics.median(ttfts) * 1e3, 1),
                          "ttft_first_request_ms": round(ttfts[0] * 1e3, 1),
                          "hit_rate": round(hit_rate, 4)}), flush=True)
    print(json.dumps({"bench": "prefix_cache_ratio", "ttft_speedup": round(results[False] / results[True], 2)}))


if __name__ == "__main__":
    main()
