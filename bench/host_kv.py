"""The host KV tier: a multi-turn chat workload whose conversations' prefixes together exceed the GPU
KV pool, served by the same engine with and without a host tier in the same run (the peer: "kvpilot
without host tier (same engine, same run)"). Conversations take turns round-robin, so by the time one
comes back its blocks have been evicted from the GPU pool: without the tier its whole history is
prefilled again, with the tier it is copied back. Per engine: prefix hit rate (prompt tokens found /
looked up), prefill tokens computed, time to first token. Then swap vs recompute preemption on a batch
in a pool too small for it. One JSON line per result.

    python bench/host_kv.py --conversations 6 --turns 4
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

PEER = "kvpilot without host tier (same engine, same run)"
REPLY = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)


def sentence(rng: random.Random, num_words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(num_words))


def conversations(tokenizer, num: int, turns: int, system_words: int, seed: int) -> list[list[list[int]]]:
    """Per conversation, the prompt of each turn: its own system prompt, then the turns so far (replies are
    canned, so both engines see the very same prompts)."""
    rng, out = random.Random(seed), []
    for c in range(num):
        messages = [{"role": "system", "content": f"Conversation {c}. {sentence(rng, system_words)}"}]
        prompts = []
        for _ in range(turns):
            messages.append({"role": "user", "content": sentence(rng, 12) + "?"})
            prompts.append(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                         return_dict=False))
            messages.append({"role": "assistant", "content": sentence(rng, 20) + "."})
        out.append(prompts)
    return out


def first_token(llm: LLM, request_id: str, prompt: list[int]) -> tuple[float, int]:
    """Serve one request alone: (seconds to its first token, engine steps to it)."""
    engine, start, steps, first = llm.engine, time.perf_counter(), 0, None
    engine.add_request(request_id, prompt, REPLY)
    while engine.has_unfinished_requests:
        outputs = engine.step()
        steps += 1
        if first is None and any(o.new_token_ids for o in outputs):
            first = (time.perf_counter() - start, steps)
    return first


def multi_turn(loaded, device: str, convs: list[list[list[int]]], gpu_blocks: int, host_blocks: int) -> dict:
    llm = LLM(loaded=loaded, device=device, num_kv_blocks=gpu_blocks, max_model_len=2048,
              max_num_batched_tokens=2048, host_kv_blocks=host_blocks)
    ttfts, steps = [], []
    for turn in range(len(convs[0])):
        for c, prompts in enumerate(convs):
            seconds, num_steps = first_token(llm, f"c{c}-t{turn}", prompts[turn])
            if turn:  # the first turn has no history to find anywhere
                ttfts.append(seconds)
                steps.append(num_steps)
    s = llm.stats()
    prompts = [p for conv in convs for p in conv]
    return {"bench": "host_kv_multi_turn", "engine": "kvpilot with host tier" if host_blocks else PEER,
            "device": device, "conversations": len(convs), "turns": len(convs[0]),
            "prompt_tokens_total": sum(map(len, prompts)), "prompt_tokens_max": max(map(len, prompts)),
            "gpu_kv_blocks": gpu_blocks, "gpu_kv_tokens": gpu_blocks * 16, "host_kv_blocks": host_blocks,
            "prefix_hit_rate": round(s.prefix_cache_hits / s.prefix_cache_queries, 4),
            "prefill_tokens_computed": s.prefill_tokens_total,
            "ttft_mean_ms_after_first_turn": round(statistics.mean(ttfts) * 1e3, 1),
            "ttft_p50_ms_after_first_turn": round(statistics.median(ttfts) * 1e3, 1),
            "steps_to_first_token_mean": round(statistics.mean(steps), 2),
            "host_hit_tokens": s.host.cache_hits if s.host else 0,
            "host_bytes_to_gpu": s.host.bytes_to_gpu if s.host else 0,
            "host_bytes_to_host": s.host.bytes_to_host if s.host else 0}


def preemption(loaded, device: str, prompts: list[list[int]], gpu_blocks: int, mode: str) -> dict:
    """Short prompts with long answers in a pool too small for them all: sequences are preempted mid-answer."""
    llm = LLM(loaded=loaded, device=device, num_kv_blocks=gpu_blocks, max_model_len=2048, host_kv_blocks=256,
              preemption_mode=mode, enable_prefix_caching=False)
    start = time.perf_counter()
    outputs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=64, ignore_eos=True))
    seconds = time.perf_counter() - start
    s = llm.stats()
    return {"bench": "host_kv_preemption", "preemption_mode": mode, "device": device, "requests": len(prompts),
            "gpu_kv_blocks": gpu_blocks, "preemptions": s.num_preemptions, "swapped": s.num_swap_preemptions,
            "prefill_tokens_computed": s.prefill_tokens_total, "seconds": round(seconds, 2),
            "host_bytes_moved": s.host.bytes_to_host + s.host.bytes_to_gpu,
            "tokens": [list(o.token_ids) for o in outputs]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--conversations", type=int, default=6)
    parser.add_argument("--turns", type=int, default=4)
    parser.add_argument("--system-words", type=int, default=90)
    parser.add_argument("--gpu-kv-blocks", type=int, default=32, help="the GPU pool: smaller than the conversations")
    parser.add_argument("--host-kv-blocks", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=default_device())
    args = parser.parse_args()

    loaded = load(args.device)
    convs = conversations(loaded.tokenizer, args.conversations, args.turns, args.system_words, args.seed)
    results = {}
    for host_blocks in (0, args.host_kv_blocks):
        results[host_blocks] = multi_turn(loaded, args.device, convs, args.gpu_kv_blocks, host_blocks)
        print(json.dumps(results[host_blocks]), flush=True)
    peer, tier = results[0], results[args.host_kv_blocks]
    saved = 1 - tier["prefill_tokens_computed"] / peer["prefill_tokens_computed"]
    print(json.dumps({"bench": "host_kv_multi_turn_ratio", "peer": PEER,
                      "hit_rate": [peer["prefix_hit_rate"], tier["prefix_hit_rate"]],
                      "prefill_tokens_saved": round(saved, 3),
                      "ttft_speedup": round(peer["ttft_mean_ms_after_first_turn"]
                                            / tier["ttft_mean_ms_after_first_turn"], 2)}), flush=True)

    rng = random.Random(args.seed)
    batch = [loaded.tokenizer.apply_chat_template([{"role": "user", "content": sentence(rng, 16) + "?"}],
                                                  add_generation_prompt=True, tokenize=True, return_dict=False)
             for _ in range(8)]
    runs = {mode: preemption(loaded, args.device, batch, 16, mode) for mode in ("recompute", "swap")}
    same = runs["recompute"].pop("tokens") == runs["swap"].pop("tokens")
    for run in runs.values():
        print(json.dumps({**run, "same_tokens_as_recompute": same}), flush=True)


if __name__ == "__main__":
    main()
