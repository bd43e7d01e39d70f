"""How well the paged KV cache spends its memory, on the throughput benchmark's workload.

- slot efficiency: after every engine step, the fraction of the slots in blocks held by running
  sequences that hold a computed token; averaged over steps (goal >= 0.95; vLLM reports < 4% waste);
- sequences held at once in a pool of `--pool-tokens` tokens, against a formula (not a measured
  server): one that reserves contiguous KV for `--max-model-len` tokens per sequence holds
  pool / max_model_len of them (goal >= 3x).
  Also against reserving each request's own prompt + max_tokens, the best a contiguous cache can do.
One JSON line per result.

    python bench/kv_efficiency.py --num-requests 64
"""

from __future__ import annotations

import argparse
import json

from engine_workload import describe, load, make_requests

from kvpilot.runtime.engine.config import default_device
from kvpilot.runtime.engine.llm import LLM
from kvpilot.runtime.engine.sampling import SamplingParams

GOAL_SLOT_EFFICIENCY = 0.95
GOAL_SEQUENCES_RATIO = 3.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--num-requests", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--max-model-len", type=int, default=1024)
    parser.add_argument("--pool-tokens", type=int, default=4096, help="KV pool size: 4 sequences of 1024")
    parser.add_argument("--device", default=default_device())
    args = parser.parse_args()

    loaded = load(args.device)
    requests = make_requests(loaded.tokenizer, args.num_requests, args.seed)
    llm = LLM(loaded=loaded, device=args.device, block_size=args.block_size, max_model_len=args.max_model_len,
              num_kv_blocks=args.pool_tokens // args.block_size, max_num_seqs=args.num_requests,
              max_num_batched_tokens=1024)
    engine = llm.engine
    for i, r in enumerate(requests):
        engine.add_request(f"r{i}", r.prompt_token_ids,
                           SamplingParams(temperature=0.0, max_tokens=r.output_len, ignore_eos=True))
    fractions, running, steps = [], [], 0
    while engine.has_unfinished_requests:
        engine.step()
        steps += 1
        stats = engine.stats()
        if stats.kv_slots_allocated:
            fractions.append(stats.kv_slots_used / stats.kv_slots_allocated)
            running.append(stats.num_running)
    efficiency = sum(fractions) / len(fractions)
    print(json.dumps({"bench": "kv_slot_efficiency", **describe(requests), "block_size": args.block_size,
                      "steps": steps, "mean_used_over_allocated": round(efficiency, 4),
                      "min_used_over_allocated": round(min(fractions), 4), "goal": GOAL_SLOT_EFFICIENCY,
                      "meets_goal": efficiency >= GOAL_SLOT_EFFICIENCY}), flush=True)

    contiguous = args.pool_tokens // args.max_model_len
    per_request = args.pool_tokens / (sum(len(r.prompt_token_ids) + r.output_len for r in requests) / len(requests))
    peak = max(running)
    print(json.dumps({"bench": "kv_sequences_held", "pool_tokens": args.pool_tokens,
                      "paged_peak_running": peak, "paged_mean_running": round(sum(running) / len(running), 1),
                      "preemptions": engine.stats().num_preemptions,
                      "contiguous_max_model_len": contiguous, "max_model_len": args.max_model_len,
                      "ratio_vs_max_model_len": round(peak / contiguous, 2),
                      "contiguous_prompt_plus_max_tokens": round(per_request, 1),
                      "ratio_vs_prompt_plus_max_tokens": round(peak / per_request, 2),
                      "goal": GOAL_SEQUENCES_RATIO, "meets_goal": peak / contiguous >= GOAL_SEQUENCES_RATIO}))


if __name__ == "__main__":
    main()
