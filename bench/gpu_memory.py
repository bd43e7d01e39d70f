"""The memory model against the GPU: planned vs measured bytes per part, at three moments.

On this machine's GPU, plan the model bench/gpu_model.py built the way a pod's plan is made (local
device detection, the default gpu_memory_utilization, the engine's default limits for the device),
build the engine from exactly `Plan.engine_options()` (parsed by the same flags `kvpilot serve` and
the pods take), then measure:
- after_load: the weights and the rotary cos/sin tables the model builds (torch.cuda.memory_allocated after
  loading: the tables' own tensor bytes are their row, the rest the weights');
- after_kv: the KV pool (what the allocator gained when the engine allocated it);
- peak: one full-budget step (max_num_seqs prompts filling max_num_batched_tokens, then a decode
  step): torch.cuda.max_memory_allocated less weights and KV for the activations, and the process's
  own bytes from NVML (else torch.cuda.mem_get_info) less torch's reserved memory for non-torch.
Parts: weights, rotary_tables, kv_cache, activations, other (non-torch), and two totals: torch_allocated (the
allocator) and process (NVML) against the plan's sums. One JSON line per part and moment, then a goal
line per moment: measured within 3% of planned and never above. Exit 1 when a measured part is above
its plan (below it is reported, not failed); 0 otherwise.

TP=2 (the plan pinned to tensor_parallel=2, the engine's TP workers) runs in a second process when
torch sees two GPUs or more; rank 0's figures are measured (the workers hold the same shard sizes).

--dry-run: the same steps on the CPU with the tiny model: weights and KV from tensor bytes; what the
CPU cannot measure (activations, non-torch, totals) is null.

    python bench/gpu_memory.py MODEL_DIR             # on a GPU
    python bench/gpu_memory.py MODEL_DIR --dry-run   # CPU
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import torch

from kvpilot.runtime.engine.llm_engine import LLMEngine, load_configured
from kvpilot.runtime.engine.sampling import SamplingParams
from kvpilot.runtime.memory.devices import Device, cpu_device, detect_gpu, parse_quantity
from kvpilot.runtime.memory.facts import resolve_model
from kvpilot.runtime.memory.planner import Plan, PlanRequest, plan
from kvpilot.runtime.server.engine_flags import add_engine_flags, engine_config
from kvpilot.runtime.server.memory_report import process_gpu_bytes, rotary_table_bytes_held, weight_bytes_held

TOLERANCE = 0.03  # measured within 3% below planned
GOAL = "measured within 3% of planned, never above"
DEFAULT_UTILIZATION = PlanRequest().gpu_memory_utilization


def compare(planned: int | None, measured: int | None) -> dict:
    """One part's verdict. A part not measured has no verdict (and is never above its plan)."""
    if planned is None or measured is None:
        return {"ratio": None, "within_3pct": None, "above_plan": False}
    above = measured > planned
    return {"ratio": round(measured / planned, 4) if planned else None,
            "within_3pct": not above and measured >= (1 - TOLERANCE) * planned, "above_plan": above}


def moment_rows(tp: int, moment: str, parts: dict[str, tuple[int | None, int | None, str]]) -> list[dict]:
    """Rows for one moment from {part: (planned, measured, how measured)}, then its goal line."""
    rows = [{"bench": "gpu_memory", "tp": tp, "moment": moment, "part": part, "planned": planned,
             "measured": measured, **compare(planned, measured), "how": how}
            for part, (planned, measured, how) in parts.items()]
    measured = [r for r in rows if r["within_3pct"] is not None]
    rows.append({"bench": "gpu_memory", "tp": tp, "moment": moment, "goal": GOAL,
                 "meets_goal": bool(measured) and all(r["within_3pct"] for r in measured),
                 "above_plan": [r["part"] for r in rows if r["above_plan"]],
                 "not_measured": [r["part"] for r in rows if r["within_3pct"] is None]})
    return rows


def local_device(cpu_memory: str | None) -> tuple[Device, int]:
    """What a pod's plan sees here: the GPUs pynvml finds, else the CPU (capped at `cpu_memory` for the dry
    run, which would otherwise zero 4 GiB of KV on a shared machine)."""
    if cpu_memory is None:
        found = detect_gpu()
        if found is None:
            raise SystemExit("gpu_memory: pynvml finds no GPU (on a machine without one: --dry-run)")
        return found
    device = cpu_device()
    return replace(device, memory_bytes=min(device.memory_bytes, parse_quantity(cpu_memory))), 1


def plan_here(model: Path, device: Device, count: int, tp: int, utilization: float) -> Plan:
    request = PlanRequest(gpu_memory_utilization=utilization, tensor_parallel=tp, gpus_per_node=max(count, tp))
    return plan(resolve_model(str(model.resolve())), device, request)


def config_from_plan(p: Plan, model: Path, utilization: float):
    """The engine's config from the plan's options, through the flags a pod gets (as `kvpilot up` does)."""
    flags = ["--model", str(model), "--device", "cpu" if p.device_kind == "cpu" else "cuda",
             "--gpu-memory-utilization", str(utilization)]
    for flag, value in p.engine_options().items():
        flags += [f"--{flag}", str(value)]
    parser = argparse.ArgumentParser(prog="gpu_memory")
    add_engine_flags(parser)
    return engine_config(parser.parse_args(flags), "gpu_memory: the plan for this machine cannot run here")


def full_budget_step(engine: LLMEngine) -> dict:
    """max_num_seqs prompts that together fill max_num_batched_tokens (one prefill step), then one decode."""
    config = engine.config
    seqs = config.max_num_seqs
    prompt_len = max(1, min(config.max_num_batched_tokens // seqs, config.max_model_len - 2))
    vocab = engine.facts.vocab_size
    params = SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True)
    for i in range(seqs):
        engine.add_request(f"full-{i}", [3 + (i * 7919 + j * 104729) % (vocab - 3) for j in range(prompt_len)],
                           params)
    steps = 0
    while engine.has_unfinished_requests:
        engine.step()
        steps += 1
    return {"seqs": seqs, "prompt_tokens_each": prompt_len, "step_tokens": seqs * prompt_len, "steps": steps}


def process_bytes(device: torch.device) -> tuple[int | None, str]:
    own = process_gpu_bytes(device.index or 0)
    if own is not None:
        return own, "NVML: this process's bytes on the GPU"
    free, total = torch.cuda.mem_get_info(device)
    return total - free, "torch.cuda.mem_get_info: total - free (the whole GPU)"


def measure(p: Plan, model: Path, utilization: float, scale: float) -> tuple[list[dict], dict]:
    """Build the engine from the plan and measure it; `scale` multiplies every planned figure (1 for the real
    comparison; below 1 only to show the failure path)."""
    config = config_from_plan(p, model, utilization)
    cuda = config.device.startswith("cuda")
    dev = torch.device("cuda", 0) if cuda else torch.device("cpu")
    mem = p.memory
    planned = {part: int(value * scale) for part, value in
               {"weights": mem.weights, "rotary_tables": mem.rotary_tables, "kv_cache": mem.kv_cache,
                "activations": mem.activations, "other": mem.overhead}.items()}
    tp = p.tensor_parallel
    rows = []
    load_parts, tables_how = ["weights", "rotary_tables"], "tensor bytes of the rotary cos/sin tables"

    def totals(torch_parts: list[str], torch_measured: int | None, what: str) -> dict:
        if not cuda:
            return {"torch_allocated": (sum(planned[k] for k in torch_parts), None, "not measurable on the CPU"),
                    "other": (planned["other"], None, "not measurable on the CPU"),
                    "process": (sum(planned[k] for k in torch_parts) + planned["other"], None,
                                "not measurable on the CPU")}
        process, how = process_bytes(dev)
        other = None if process is None else max(0, process - torch.cuda.memory_reserved(dev))
        return {"torch_allocated": (sum(planned[k] for k in torch_parts), torch_measured, what),
                "other": (planned["other"], other, f"{how}, less torch.cuda.memory_reserved"),
                "process": (sum(planned[k] for k in torch_parts) + planned["other"], process, how)}

    if cuda:
        torch.cuda.init()
        torch.cuda.reset_peak_memory_stats(dev)
    base = torch.cuda.memory_allocated(dev) if cuda else 0
    if tp == 1:
        loaded = load_configured(config)
        if cuda:
            torch.cuda.synchronize(dev)
        at_load = torch.cuda.memory_allocated(dev) if cuda else None
        rotary = rotary_table_bytes_held(loaded.model)
        weights, how = ((at_load - base - rotary, "torch.cuda.memory_allocated after the load, less the tables")
                        if cuda else (weight_bytes_held(loaded.model), "tensor bytes of the loaded weights"))
        rows += moment_rows(tp, "after_load", {"weights": (planned["weights"], weights, how),
                                               "rotary_tables": (planned["rotary_tables"], rotary, tables_how),
                                               **totals(load_parts, None if at_load is None else at_load - base,
                                                        "torch.cuda.memory_allocated")})
        engine = LLMEngine(config, loaded)
    else:  # the engine loads rank 0's shard itself (and starts the workers): the weights' tensor bytes
        engine = LLMEngine(config)
        weights, rotary = weight_bytes_held(engine.loaded.model), rotary_table_bytes_held(engine.loaded.model)
        rows += moment_rows(tp, "after_load", {"weights": (planned["weights"], weights,
                                                           "tensor bytes of rank 0's shard (loaded by the engine)"),
                                               "rotary_tables": (planned["rotary_tables"], rotary, tables_how)})
        at_load = None
    try:
        if cuda:
            torch.cuda.synchronize(dev)
        at_kv = torch.cuda.memory_allocated(dev) if cuda else None
        kv_tensor = engine.runner.kv_cache.nbytes
        kv, how = ((at_kv - at_load, "torch.cuda.memory_allocated gained by the engine's start (the KV pool)")
                   if cuda and tp == 1 else (kv_tensor, "tensor bytes of the KV pool"))
        torch_kv = None if at_kv is None else at_kv - base
        rows += moment_rows(tp, "after_kv", {"weights": (planned["weights"], weights, "as after_load"),
                                             "rotary_tables": (planned["rotary_tables"], rotary, "as after_load"),
                                             "kv_cache": (planned["kv_cache"], kv, how),
                                             **totals([*load_parts, "kv_cache"], torch_kv,
                                                      "torch.cuda.memory_allocated")})
        if cuda:
            torch.cuda.reset_peak_memory_stats(dev)
        step = full_budget_step(engine)
        if cuda:
            torch.cuda.synchronize(dev)
        peak = torch.cuda.max_memory_allocated(dev) - base if cuda else None
        activations = None if peak is None else max(0, peak - torch_kv)
        parts = {"weights": (planned["weights"], weights, "as after_load"),
                 "rotary_tables": (planned["rotary_tables"], rotary, "as after_load"),
                 "kv_cache": (planned["kv_cache"], kv, "as after_kv"),
                 "activations": (planned["activations"], activations,
                                 "torch.cuda.max_memory_allocated in the step, less weights and KV" if cuda
                                 else "not measurable on the CPU"),
                 **totals([*load_parts, "kv_cache", "activations"], peak, "torch.cuda.max_memory_allocated")}
        rows += moment_rows(tp, "peak", parts)
        rows[-1]["step"] = step
    finally:
        engine.close()
    return rows, {"device": p.device, "kv_blocks": p.num_kv_blocks, **p.engine_options()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path, help="the HF directory bench/gpu_model.py wrote")
    parser.add_argument("--dry-run", action="store_true", help="the CPU and the tiny model, to check the script")
    parser.add_argument("--tp", choices=["1", "2", "all"], default="all", help="all: 1, then 2 when 2 GPUs exist")
    parser.add_argument("--gpu-memory-utilization", type=float, default=DEFAULT_UTILIZATION)
    parser.add_argument("--cpu-memory", default="2Gi", help="--dry-run: host memory the plan may use")
    parser.add_argument("--plan-scale", type=float, default=1.0,
                        help="multiply every planned figure (below 1: shows an over-plan part failing the run)")
    args = parser.parse_args()
    device, count = local_device(args.cpu_memory if args.dry_run else None)
    gpus = torch.cuda.device_count() if not args.dry_run else 0
    rc = 0
    for tp in ([1, 2] if args.tp == "all" else [int(args.tp)]):
        if tp == 2 and args.tp == "all":
            if gpus < 2:
                print(json.dumps({"bench": "gpu_memory", "tp": 2, "skipped": f"{gpus} GPU visible"}), flush=True)
                continue
            rerun = [sys.executable, __file__, *sys.argv[1:], "--tp", "2"]
            rc = max(rc, subprocess.run(rerun).returncode)  # its own process: its own allocator and NVML figures
            continue
        p = plan_here(args.model, device, count, tp, args.gpu_memory_utilization)
        rows, setup = measure(p, args.model, args.gpu_memory_utilization, args.plan_scale)
        print(json.dumps({"bench": "gpu_memory", "tp": tp, "plan": setup}), flush=True)
        for row in rows:
            print(json.dumps(row), flush=True)
        if any(row["above_plan"] for row in rows if "part" not in row):
            rc = max(rc, 1)
    return rc


if __name__ == "__main__":
    sys.exit(main())
