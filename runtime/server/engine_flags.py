"""The engine's flags (`kvpilot serve`, `kvpilot up`, the pods' arguments from `Plan.engine_options`) and
the EngineConfig they ask for. Apart from the server so that a process without uvicorn/fastapi (the GPU
benchmarks in the device's image) builds its engine from a plan through the same mapping."""

from __future__ import annotations

import argparse

from kvpilot.runtime.memory.devices import parse_quantity
from kvpilot.runtime.usage import UsageError


def add_engine_flags(p: argparse.ArgumentParser) -> None:
    """What to load and how to size the engine: the options a plan sets (`Plan.engine_options`)."""
    p.add_argument("--model", help="HF directory (config.json + safetensors) or .gguf file")
    p.add_argument("--served-model-name", help="name the API answers to (default: the model's)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--dtype", default="auto", help="compute dtype: auto, fp32, bf16, fp16")
    p.add_argument("--quantization", help="weights of the decoder projections: int8, int4 or fp8; "
                   "default: the compute dtype")
    p.add_argument("--kv-cache-dtype", default="auto", help="auto (the compute dtype) or fp8 (half the bytes)")
    p.add_argument("--tensor-parallel", type=int, default=1, help="GPUs (ranks) each pipeline stage is split over")
    p.add_argument("--pipeline-parallel", type=int, default=1, help="stages the layers are split over")
    p.add_argument("--nnodes", type=int, default=1,
                   help="nodes the ranks span (tensor-parallel x pipeline-parallel / nnodes GPUs each)")
    p.add_argument("--node-rank", type=int, default=0,
                   help="this node's place (it runs ranks node-rank x GPUs per node onwards, so its pipeline "
                        "stages follow); 0 serves HTTP, the others only run their ranks")
    p.add_argument("--leader-address", help="host of node 0, where the ranks meet (nnodes > 1)")
    p.add_argument("--leader-port", type=int, default=29500)
    kv = p.add_mutually_exclusive_group()
    kv.add_argument("--num-kv-blocks", type=int, help="KV blocks to allocate (the operator's plan passes it)")
    kv.add_argument("--kv-memory", help="bytes of KV cache instead, e.g. 2Gi")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--max-model-len", type=int)
    p.add_argument("--max-num-seqs", type=int)
    p.add_argument("--max-num-batched-tokens", type=int)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.90)
    p.add_argument("--no-prefix-caching", action="store_true")
    p.add_argument("--host-kv-memory", default="0",
                   help="host memory (RAM) for the host KV tier, e.g. 16Gi: evicted prefix blocks and preempted "
                        "sequences wait there instead of being recomputed (default 0: no tier)")
    p.add_argument("--offload-layers", type=int, default=0,
                   help="decoder layers whose weights stay in host memory and are streamed to the GPU ahead of "
                        "use, double-buffered (the last resort when the weights do not fit; default 0)")
    p.add_argument("--preemption-mode", default="auto", choices=("auto", "swap", "recompute"),
                   help="with a host KV tier: swap preempted sequences to it, recompute them, or auto (a cost "
                        "model: bytes over the host link vs prefill time)")
    p.add_argument("--enforce-eager", action="store_true",
                   help="never torch.compile the CPU decoder (compiling takes a minute or two at start-up and "
                        "makes steps faster; also $KVPILOT_ENFORCE_EAGER=1)")


def engine_config(args: argparse.Namespace, command: str = "kvpilot serve"):
    """The EngineConfig `kvpilot serve` flags ask for; UsageError naming the bad option."""
    from kvpilot.runtime.engine.config import EngineConfig

    try:
        return EngineConfig(model=args.model, device=args.device, dtype=args.dtype,
                              quantization=args.quantization, kv_cache_dtype=args.kv_cache_dtype,
                              tensor_parallel_size=args.tensor_parallel,
                              pipeline_parallel_size=args.pipeline_parallel, nnodes=args.nnodes,
                              node_rank=args.node_rank, leader_address=args.leader_address,
                              leader_port=args.leader_port, block_size=args.block_size,
                              num_kv_blocks=args.num_kv_blocks,
                              kv_memory=parse_quantity(args.kv_memory) if args.kv_memory else 0,
                              max_model_len=args.max_model_len,
                              max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                              gpu_memory_utilization=args.gpu_memory_utilization,
                              enable_prefix_caching=not args.no_prefix_caching,
                              host_kv_memory=parse_quantity(args.host_kv_memory),
                              preemption_mode=args.preemption_mode, offload_layers=args.offload_layers,
                              **({"enforce_eager": True} if args.enforce_eager else {}))
    except ValueError as err:  # EngineConfig names the bad option and what is allowed
        raise UsageError(f"{command}: {err}") from None
