"""Output tokens per second: the kvpilot engine vs HF transformers `generate` on the same weights
(the embedded SmolLM2-135M-Instruct GGUF) and machine, on one seeded chat workload (varied prompt and
output lengths, greedy, ignore_eos). Peers in the same run:
- HF, one static left-padded batch of every request, run until the longest output is done (its
  useful throughput counts each request's own output; the padding steps are its cost);
- HF, one request at a time (measured on the first `--sequential-requests` requests: a rate).
Goal on CPU: kvpilot >= 2x both. One JSON line per result, then the ratios.

    python bench/throughput.py --num-requests 64
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from engine_workload import Request, describe, load, make_requests
from transformers import AutoModelForCausalLM

from kvpilot.runtime.engine.config import default_device
from kvpilot.runtime.engine.llm import LLM
from kvpilot.runtime.engine.sampling import SamplingParams
from kvpilot.runtime.loading.loader import LoadedModel

GOAL_RATIO = 2.0


def run_kvpilot(loaded: LoadedModel, requests: list[Request], device: str, max_num_seqs: int) -> tuple[float, list]:
    tokens = sum(len(r.prompt_token_ids) + r.output_len for r in requests)
    llm = LLM(loaded=loaded, device=device, num_kv_blocks=tokens // 16 + 2 * len(requests), max_model_len=2048,
              max_num_seqs=max_num_seqs, max_num_batched_tokens=1024)
    llm.generate([requests[0].prompt_token_ids], SamplingParams(max_tokens=4))  # warm-up
    params = [SamplingParams(temperature=0.0, max_tokens=r.output_len, ignore_eos=True) for r in requests]
    start = time.perf_counter()
    outputs = llm.generate([r.prompt_token_ids for r in requests], params)
    seconds = time.perf_counter() - start
    assert [len(o.token_ids) for o in outputs] == [r.output_len for r in requests]
    return seconds, [o.token_ids for o in outputs]


def hf_generate(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, new_tokens: int,
                pad_token_id: int) -> torch.Tensor:
    with torch.no_grad():  # min_new_tokens = max_new_tokens: HF's way to ignore EOS
        return model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=new_tokens,
                              min_new_tokens=new_tokens, do_sample=False, pad_token_id=pad_token_id)


def run_hf_static_batch(model, requests: list[Request], pad_id: int, device: str) -> float:
    longest = max(len(r.prompt_token_ids) for r in requests)
    ids = torch.full((len(requests), longest), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, r in enumerate(requests):  # left padding, as HF wants for generation
        ids[row, longest - len(r.prompt_token_ids):] = torch.tensor(r.prompt_token_ids)
        mask[row, longest - len(r.prompt_token_ids):] = 1
    start = time.perf_counter()
    hf_generate(model, ids.to(device), mask.to(device), max(r.output_len for r in requests), pad_id)
    return time.perf_counter() - start


def run_hf_sequential(model, requests: list[Request], pad_id: int, device: str) -> tuple[float, list]:
    outputs, start = [], time.perf_counter()
    for r in requests:
        ids = torch.tensor([r.prompt_token_ids], device=device)
        out = hf_generate(model, ids, torch.ones_like(ids), r.output_len, pad_id)
        outputs.append(out[0, ids.shape[1]:].tolist())
    return time.perf_counter() - start, outputs


def _agree_until_eos(ours: list[int], hf: list[int], eos: int) -> bool:
    """ignore_eos goes on past an EOS; HF's min_new_tokens bans it instead: compare up to the first EOS."""
    end = ours.index(eos) if eos in ours else len(ours)
    return ours[:end] == hf[:end]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--num-requests", type=int, default=64)
    parser.add_argument("--sequential-requests", type=int, default=8)
    parser.add_argument("--max-num-seqs", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=default_device())
    parser.add_argument("--model", help="HF directory or GGUF file (default: the embedded SmolLM2-135M-Instruct)")
    args = parser.parse_args()

    loaded = load(args.device, args.model)
    requests = make_requests(loaded.tokenizer, args.num_requests, args.seed)
    workload = describe(requests)
    useful = workload["output_tokens_total"]
    card = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    kv_s, kv_tokens = run_kvpilot(loaded, requests, args.device, args.max_num_seqs)
    # the engine set torch's threads (KVPILOT_CPU_THREADS, else cores - 1): the HF peers run with as many
    common = {"bench": "throughput", "device": card, "threads": torch.get_num_threads()}
    kv_tps = useful / kv_s
    print(json.dumps(common | {"system": "kvpilot", **workload, "seconds": round(kv_s, 2),
                               "output_tokens_per_s": round(kv_tps, 1)}), flush=True)

    dtype = loaded.model.model.embed_tokens.weight.dtype
    path = loaded.source
    hf_source = {"pretrained_model_name_or_path": path} if path.is_dir() else {
        "pretrained_model_name_or_path": path.parent, "gguf_file": path.name}
    model = AutoModelForCausalLM.from_pretrained(**hf_source, dtype=dtype).to(args.device).eval()
    pad_id = loaded.eos_token_ids[0]
    hf_generate(model, torch.tensor([[1, 2, 3]], device=args.device), torch.ones(1, 3, dtype=torch.long,
                device=args.device), 2, pad_id)  # warm-up

    static_s = run_hf_static_batch(model, requests, pad_id, args.device)
    static_tps = useful / static_s
    generated = len(requests) * max(r.output_len for r in requests)
    print(json.dumps(common | {"system": "hf_static_batch", **workload, "seconds": round(static_s, 2),
                               "output_tokens_per_s": round(static_tps, 1),
                               "generated_tokens_incl_padding_steps": generated,
                               "raw_tokens_per_s": round(generated / static_s, 1)}), flush=True)

    subset = requests[: args.sequential_requests]
    seq_s, seq_tokens = run_hf_sequential(model, subset, pad_id, args.device)
    seq_tps = sum(r.output_len for r in subset) / seq_s
    print(json.dumps(common | {"system": "hf_sequential", **describe(subset), "seconds": round(seq_s, 2),
                               "output_tokens_per_s": round(seq_tps, 1)}), flush=True)

    same = sum(_agree_until_eos(a, b, pad_id) for a, b in zip(kv_tokens, seq_tokens, strict=False))
    ratios = {"vs_hf_static_batch": round(kv_tps / static_tps, 2), "vs_hf_sequential": round(kv_tps / seq_tps, 2)}
    print(json.dumps({"bench": "throughput_ratio", "device": card, **ratios, "goal": GOAL_RATIO,
                      "meets_goal": min(ratios.values()) >= GOAL_RATIO,
                      "greedy_outputs_equal_hf_sequential_until_eos": f"{same}/{len(subset)}"}))


if __name__ == "__main__":
    main()
