"""What structured output costs and gives. The peer is kvpilot itself, unguided: the same engine, in
the same run, decoding the same 16 chat requests with no grammar. Guided modes: `json_object` and a
JSON schema (llguidance fills one token bitmask for the whole batch every step).

Speed is measured per engine step. Decode tok/s is 16 / the median seconds of the decode steps in
which all 16 requests are still running, and each guided mode is compared with the unguided run
over the same decode steps (step 1..K, K the shorter of the two full-batch stretches): the same
batch, the same context lengths, so the difference is what the grammar costs. The unguided peer runs
with ignore_eos so its batch stays full. Medians, because a step that the machine pauses (other
jobs on a shared CPU) must not count as the grammar's cost. The guided answers' quality is counted
whole: finished, parse as an object, match the schema.

Rounds interleave the modes (the order flips every round) so that a shared, busy machine slows them
alike. One JSON line per mode and round, then one summary line per guided mode: the ratio over every
compared step of every round, and each round's ratio. Goal: json_schema >= 0.90x of the peer.

    python bench/json_mode.py [--rounds 4] [--max-tokens 96]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jsonschema

from kvpilot.runtime.engine.config import default_device
from kvpilot.runtime.engine.llm import LLM
from kvpilot.runtime.engine.outputs import RequestOutput
from kvpilot.runtime.engine.sampling import SamplingParams, StructuredOutputs

GOAL_VS_UNGUIDED = 0.90
PEER = "kvpilot unguided (same engine, same run, ignore_eos)"
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
UNGUIDED = "unguided"
MODES = {UNGUIDED: None, "json_schema": StructuredOutputs(json=json.dumps(SCHEMA)),
         "json_object": StructuredOutputs(json_object=True)}


def parsed(text: str) -> object | None:
    """The answer's JSON, or None."""
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


def run(llm: LLM, prompts: list[list[int]], params: SamplingParams,
        tag: str) -> tuple[list[float], float, list[RequestOutput]]:
    """Every prompt through the engine, one step at a time: the seconds of each decode step in which
    the whole batch ran (in order), the total seconds, and each request's last output."""
    engine, ids = llm.engine, [f"{tag}-{i}" for i in range(len(prompts))]
    for request_id, prompt in zip(ids, prompts, strict=True):
        engine.add_request(request_id, prompt, params)
    full_batch_steps, final = [], {}
    started = time.perf_counter()
    while engine.has_unfinished_requests:
        step_started = time.perf_counter()
        outputs = engine.step()
        seconds = time.perf_counter() - step_started
        if len(outputs) == len(prompts) and all(len(out.token_ids) > 1 for out in outputs):
            full_batch_steps.append(seconds)
        final.update((out.request_id, out) for out in outputs if out.finished)
    return full_batch_steps, time.perf_counter() - started, [final[rid] for rid in ids]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--device", default=default_device())
    args = parser.parse_args()

    llm = LLM(device=args.device, max_model_len=1024, num_kv_blocks=512, max_num_seqs=len(QUESTIONS),
              max_num_batched_tokens=1024)
    prompts = [llm.apply_chat_template([{"role": "user", "content": q}]) for q in QUESTIONS]
    params = {mode: SamplingParams(max_tokens=args.max_tokens, temperature=0.0, structured=spec,
                                   ignore_eos=spec is None) for mode, spec in MODES.items()}
    for mode, p in params.items():  # warm-up: each grammar compiles once, as a server's cache holds it
        run(llm, prompts[:2], SamplingParams(max_tokens=4, structured=p.structured), f"warm-{mode}")
    batch = len(prompts)
    compared: dict[str, tuple[list[float], list[float]]] = {mode: ([], []) for mode in MODES if mode != UNGUIDED}
    ratios: dict[str, list[float]] = {mode: [] for mode in compared}
    for round_ in range(args.rounds):
        order = list(MODES) if round_ % 2 == 0 else list(MODES)[::-1]
        steps, lines = {}, {}
        for mode in order:
            steps[mode], total, results = run(llm, prompts, params[mode], f"{round_}-{mode}")
            tokens = sum(len(out.token_ids) for out in results)
            lines[mode] = {
                "bench": "json_mode", "device": args.device, "round": round_, "mode": mode, "peer": PEER,
                "requests": batch, "max_tokens": args.max_tokens, "output_tokens": tokens,
                "seconds": round(total, 2), "output_tok_s": round(tokens / total, 1),
                "full_batch_decode_steps": len(steps[mode])}
            if mode != UNGUIDED:  # the peer runs past EOS (ignore_eos): its answers are not judged
                values = [parsed(out.text) for out in results]
                lines[mode].update({
                    "finished": sum(out.finish_reason == "stop" for out in results),
                    "parse_as_object": sum(isinstance(v, dict) for v in values),
                    "match_schema": sum(v is not None and validates(v) for v in values)})
        for mode, (guided_steps, peer_steps) in compared.items():
            k = min(len(steps[mode]), len(steps[UNGUIDED]))
            lines[mode]["compared_decode_steps"] = k
            if k:
                guided_steps += steps[mode][:k]
                peer_steps += steps[UNGUIDED][:k]
                ratio = statistics.median(steps[UNGUIDED][:k]) / statistics.median(steps[mode][:k])
                ratios[mode].append(ratio)
                lines[mode].update({"decode_tok_s": round(batch / statistics.median(steps[mode][:k]), 1),
                                    "peer_decode_tok_s": round(batch / statistics.median(steps[UNGUIDED][:k]), 1),
                                    "vs_peer": round(ratio, 3)})
        for mode in order:
            print(json.dumps(lines[mode]), flush=True)
    for mode, (guided_steps, peer_steps) in compared.items():
        if not guided_steps:
            continue
        ratio = statistics.median(peer_steps) / statistics.median(guided_steps)
        print(json.dumps({
            "bench": "json_mode", "summary": mode, "peer": PEER, "rounds": args.rounds, "device": args.device,
            "compared_decode_steps": len(guided_steps),
            "decode_tok_s": round(batch / statistics.median(guided_steps), 1),
            "peer_decode_tok_s": round(batch / statistics.median(peer_steps), 1), "vs_peer": round(ratio, 3),
            "vs_peer_per_round": [round(r, 3) for r in ratios[mode]], "goal": GOAL_VS_UNGUIDED,
            "meets_goal": ratio >= GOAL_VS_UNGUIDED}), flush=True)

if __name__ == "__main__":
    main()
