"""bf16 against fp32 on the CPU: what a user gives up and gains with `--dtype bf16`.

Same weights (the embedded SmolLM2), the 32 chat questions of bench/quantization.py, greedy. The
fp32 engine is the peer, run in the same process first:
- quality: how many prompts keep fp32's first token, how many keep all `--output-len` tokens, and
  the mean log-probability bf16 gives fp32's first choice (top-20; outside it: the 20th's);
- speed: output tokens/s of the whole batch, offline (no HTTP), both dtypes with the same threads.
One JSON line per dtype.

    python bench/dtype_quality.py
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from quantization import QUESTIONS, TOP

from kvpilot.runtime.engine.llm import LLM
from kvpilot.runtime.engine.sampling import SamplingParams
from kvpilot.runtime.loading.loader import load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output-len", type=int, default=16)
    args = parser.parse_args()
    limits = {"device": "cpu", "num_kv_blocks": 512, "max_model_len": 1024, "max_num_seqs": len(QUESTIONS),
              "max_num_batched_tokens": 2048}
    peer: dict = {}
    for dtype_name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        llm = LLM(loaded=load_model(None, dtype, "cpu"), dtype=dtype_name, **limits)
        prompts = [llm.apply_chat_template([{"role": "user", "content": q}]) for q in QUESTIONS]
        first = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=1, logprobs=TOP))
        started = time.perf_counter()
        outputs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True))
        tok_s = sum(len(o.token_ids) for o in outputs) / (time.perf_counter() - started)
        firsts, sequences = [o.token_ids[0] for o in first], [list(o.token_ids) for o in outputs]
        same = sum(a == b for a, b in zip(sequences, peer.get("sequences", sequences), strict=True))
        if not peer:
            peer = {"firsts": firsts, "sequences": sequences, "tok_s": tok_s}
        logprobs = [dict(o.logprobs[0].top).get(want, o.logprobs[0].top[-1][1])
                    for o, want in zip(first, peer["firsts"], strict=True)]
        print(json.dumps({
            "bench": "dtype_quality", "dtype": dtype_name, "peer": "kvpilot fp32, same run", "prompts": len(prompts),
            "first_tokens_kept": f"{sum(a == b for a, b in zip(firsts, peer['firsts'], strict=True))}/{len(prompts)}",
            f"all_{args.output_len}_tokens_kept": f"{same}/{len(prompts)}",
            "fp32_choice_logprob_mean": round(sum(logprobs) / len(prompts), 4),
            "output_tok_s": round(tok_s, 1), "output_tok_s_vs_fp32": round(tok_s / peer["tok_s"], 2),
            "torch_threads": torch.get_num_threads()}), flush=True)


if __name__ == "__main__":
    main()
