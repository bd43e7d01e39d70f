"""What structured output costs and gives, against free generation of the same requests in the same
run: output tokens/s with no constraint, with `json_object`, and with a JSON schema (llguidance masks
for the whole batch every step), and how many answers finish and parse (and, for the schema, validate).
Modes are interleaved over rounds so that a busy machine slows them alike. One JSON line per mode
and round, with its speed as a fraction of free generation's in that round.

    python bench/json_mode.py [--rounds 1] [--max-tokens 96]
"""

from __future__ import annotations

import argparse
import json
import time

import jsonschema

from kvpilot.runtime.engine.config import default_device
from kvpilot.runtime.engine.llm import LLM
from kvpilot.runtime.engine.sampling import SamplingParams, StructuredOutputs

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
SCHEMA = {"type": "object", "additionalProperties": False, "required": ["title", "facts", "rating"],
          "properties": {"title": {"type": "string", "maxLength": 40},
                         "facts": {"type": "array", "items": {"type": "string", "maxLength": 60}, "maxItems": 3},
                         "rating": {"type": "integer", "minimum": 1, "maximum": 5}}}
MODES = {"free": None, "json_object": StructuredOutputs(json_object=True),
         "json_schema": StructuredOutputs(json=json.dumps(SCHEMA))}


def parsed(text: str) -> object | None:
    """The answer's JSON (free answers may wrap it in a Markdown code fence), or None."""
    text = text.strip().removeprefix("```json").removeprefix("```").split("```")[0]
    try:
        return json.loads(text)
    except ValueError:
        return None


def validates(value: object) -> bool:
    try:
        jsonschema.validate(value, SCHEMA)
    except jsonschema.ValidationError:
        return False
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--device", default=default_device())
    args = parser.parse_args()

    llm = LLM(device=args.device, max_model_len=1024, num_kv_blocks=512, max_num_seqs=len(QUESTIONS),
              max_num_batched_tokens=1024)
    prompts = [llm.apply_chat_template([{"role": "user", "content": q}]) for q in QUESTIONS]
    for spec in MODES.values():  # warm-up: the grammar tokenizer and each grammar compile once
        llm.generate(prompts[:1], SamplingParams(max_tokens=2, structured=spec))
    for round_ in range(args.rounds):
        free_tok_s = None
        for mode, spec in MODES.items():
            params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, structured=spec)
            started = time.perf_counter()
            outputs = llm.generate(prompts, params)
            seconds = time.perf_counter() - started
            tokens = sum(len(o.token_ids) for o in outputs)
            values = [parsed(o.text) for o in outputs]
            free_tok_s = free_tok_s or tokens / seconds
            print(json.dumps({
                "bench": "json_mode", "device": args.device, "round": round_, "mode": mode,
                "requests": len(prompts), "max_tokens": args.max_tokens, "output_tokens": tokens,
                "seconds": round(seconds, 2), "output_tok_s": round(tokens / seconds, 1),
                "vs_free": round(tokens / seconds / free_tok_s, 3),
                "finished": sum(o.finish_reason == "stop" for o in outputs),
                "parse_as_object": sum(isinstance(v, dict) for v in values),
                "match_schema": sum(v is not None and validates(v) for v in values)}), flush=True)

if __name__ == "__main__":
    main()
