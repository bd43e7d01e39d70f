"""What JSON mode costs and gives, against free generation of the same requests in the same run:
output tokens/s with and without `json_object`, and how many answers parse as a JSON object
(finished ones must; free generation is the peer, parsed after stripping a Markdown code fence).
One JSON line per mode.

    python bench/json_mode.py
"""

from __future__ import annotations

import argparse
import json
import time

from kvpilot.runtime.engine.config import default_device
from kvpilot.runtime.engine.llm import LLM
from kvpilot.runtime.engine.sampling import SamplingParams

QUESTIONS = [
    "Describe a cat as JSON with keys name and age.", "Give me a JSON object of three fruits.",
    "What is the capital of France? Reply in JSON.", "List two colours as JSON.",
    "A JSON object for a book: title, author, year.", "Return a JSON object with your favourite number.",
    "Describe the weather today as JSON.", "A JSON object for a city with name and population.",
    "Give a JSON object mapping three animals to their sounds.", "A JSON profile of a fictional person.",
    "Return JSON with keys 'question' and 'answer' for 2+2.", "A JSON object describing a car.",
    "Summarise the water cycle as JSON with a 'steps' list.", "A JSON recipe with name and ingredients.",
    "Return a JSON object with a greeting in three languages.", "Describe a planet as a JSON object.",
]


def parses_as_object(text: str) -> bool:
    text = text.strip().removeprefix("```json").removeprefix("```").split("```")[0]
    try:
        return isinstance(json.loads(text), dict)
    except ValueError:
        return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--device", default=default_device())
    args = parser.parse_args()

    llm = LLM(device=args.device, max_model_len=1024, num_kv_blocks=512, max_num_seqs=len(QUESTIONS),
              max_num_batched_tokens=1024)
    prompts = [llm.apply_chat_template([{"role": "user", "content": q}]) for q in QUESTIONS]
    llm.generate(prompts[:1], SamplingParams(max_tokens=2, json_object=True))  # builds the token-text table
    for mode in ("free", "json_object"):
        params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, json_object=mode == "json_object")
        started = time.perf_counter()
        outputs = llm.generate(prompts, params)
        seconds = time.perf_counter() - started
        tokens = sum(len(o.token_ids) for o in outputs)
        print(json.dumps({
            "bench": "json_mode", "device": args.device, "mode": mode, "requests": len(prompts),
            "output_tokens": tokens, "seconds": round(seconds, 2), "output_tok_s": round(tokens / seconds, 1),
            "finished": sum(o.finish_reason == "stop" for o in outputs),
            "parse_as_object": sum(parses_as_object(o.text) for o in outputs)}), flush=True)


if __name__ == "__main__":
    main()
