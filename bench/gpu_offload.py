"""Weights offload on the GPU: the same model with K decoder layers streamed from host memory vs none.

On the model bench/gpu_model.py built (random weights), in one run:
- link: the pinned host -> device bandwidth, one staging-sized copy (the largest offloaded layer) timed
  over repeats;
- per engine (offload 0, then K) and batch (1 and 32): decode tokens/s (prefill excluded: timed from the
  step after every request has its first token), the device and host weight bytes, and whether the
  offloaded engine's greedy tokens are the resident engine's;
- the copy-bound prediction for the offloaded engine: every decode step streams the K layers' bytes, so
  it cannot beat link bandwidth / streamed bytes per step (steps/s; x batch for tokens/s), and with the
  copies hidden behind compute it runs at the lower of that and the resident engine's rate.
One JSON line each.

--dry-run: the same steps on the CPU with fp32 weights, a short output and batches 1 and 4, to check the
script; a CPU line is not a speed claim (`speed_claim: false`).

    python bench/gpu_offload.py MODEL_DIR [--offload-layers K]   # on a GPU
    python bench/gpu_offload.py MODEL_DIR --dry-run              # CPU
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import time
from pathlib import Path

import torch

from kvpilot.runtime.engine.llm import LLM
from kvpilot.runtime.engine.sampling import SamplingParams
from kvpilot.runtime.loading.loader import host_weight_bytes, weight_bytes_held
from kvpilot.runtime.models.offload import streamer_of

PROMPT_LEN = 64
LINK_REPEATS = 10


def link_bandwidth(nbytes: int, device: torch.device) -> float:
    """Bytes/s of a host -> device copy of `nbytes` (from pinned memory on CUDA)."""
    cuda = device.type == "cuda"
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=cuda)
    target = torch.empty(nbytes, dtype=torch.uint8, device=device)
    for _ in range(2):
        target.copy_(host, non_blocking=cuda)
    sync(device)
    started = time.perf_counter()
    for _ in range(LINK_REPEATS):
        target.copy_(host, non_blocking=cuda)
    sync(device)
    return nbytes * LINK_REPEATS / (time.perf_counter() - started)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def decode(llm: LLM, prompts: list[list[int]], output_len: int) -> tuple[float, float, list[list[int]]]:
    """(decode tokens/s, decode steps/s, each request's tokens): timed once every request has its first token."""
    engine = llm.engine
    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
    ids = [f"r{i}" for i in range(len(prompts))]
    for rid, prompt in zip(ids, prompts, strict=True):
        engine.add_request(rid, prompt, params)
    started: set[str] = set()
    while len(started) < len(prompts):
        started.update(out.request_id for out in engine.step())
    sync(engine.device)
    begin, tokens, steps, final = time.perf_counter(), 0, 0, {}
    while engine.has_unfinished_requests:
        outputs = engine.step()
        steps += 1
        tokens += sum(len(out.new_token_ids) for out in outputs)
        final.update((out.request_id, out.token_ids) for out in outputs if out.finished)
    sync(engine.device)
    seconds = time.perf_counter() - begin
    return tokens / seconds, steps / seconds, [list(final[rid]) for rid in ids]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model", help="HF directory (bench/gpu_model.py's)")
    parser.add_argument("--offload-layers", type=int, help="layers streamed from host memory (default: half)")
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--dry-run", action="store_true", help="CPU, fp32, a short run: checks the script only")
    args = parser.parse_args()
    if not args.dry_run and not torch.cuda.is_available():
        raise SystemExit("gpu_offload: torch sees no CUDA device (on a machine without one: --dry-run)")
    device = "cpu" if args.dry_run else "cuda"
    output_len = 4 if args.dry_run else args.output_len
    batches = (1, 4) if args.dry_run else (1, 32)
    limits = {"device": device, "dtype": "fp32" if args.dry_run else "bf16", "num_kv_blocks": 512,
              "max_model_len": 512, "max_num_seqs": max(batches), "max_num_batched_tokens": 2048}
    rng = random.Random(0)
    prompts = [[rng.randrange(1000, 20000) for _ in range(PROMPT_LEN)] for _ in range(max(batches))]
    common = {"bench": "gpu_offload", "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
              "speed_claim": device == "cuda"}
    layers = json.loads((Path(args.model) / "config.json").read_text())["num_hidden_layers"]
    resident: dict[int, tuple[float, list[list[int]]]] = {}
    bandwidth = 0.0
    for count in (0, layers // 2 if args.offload_layers is None else args.offload_layers):
        llm = LLM(args.model, offload_layers=count, **limits)
        model = llm.engine.loaded.model
        streamer = streamer_of(model)
        llm.generate(prompts[:2], SamplingParams(temperature=0.0, max_tokens=2))  # kernels compiled, caches warm
        streamed = host_weight_bytes(model)
        if streamer is not None:
            bandwidth = link_bandwidth(streamer.staging[0].numel(), llm.engine.device)
            print(json.dumps({**common, "part": "link", "bytes": streamer.staging[0].numel(),
                              "pinned": device == "cuda", "gb_s": round(bandwidth / 1e9, 2)}), flush=True)
        for batch in batches:
            tok_s, steps_s, tokens = decode(llm, prompts[:batch], output_len)
            row = {**common, "part": "decode", "offload_layers": count, "batch": batch, "output_len": output_len,
                   "decode_tok_s": round(tok_s, 1), "decode_steps_s": round(steps_s, 2),
                   "weights_device_bytes": weight_bytes_held(model), "weights_host_bytes": streamed,
                   "streamed_bytes_per_step": streamed}
            if count == 0:
                resident[batch] = (tok_s, tokens)
            else:
                copy_bound = bandwidth / streamed
                row.update({"predicted_copy_bound_steps_s": round(copy_bound, 2),
                            "predicted_copy_bound_tok_s": round(copy_bound * batch, 1),
                            "predicted_tok_s": round(min(copy_bound * batch, resident[batch][0]), 1),
                            "measured_vs_predicted": round(tok_s / min(copy_bound * batch, resident[batch][0]), 3),
                            "vs_resident": round(tok_s / resident[batch][0], 3),
                            "same_tokens_as_resident": tokens == resident[batch][1]})
            print(json.dumps(row), flush=True)
        llm.close()
        del llm, model, streamer  # the next engine gets the whole GPU
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
