"""The `kvpilot` command: plan, serve, up, operator, crd; the one module that sees both the runtime
and the operator.

Every user mistake ends as one line on stderr and exit status 2, never a traceback.
Subcommands import their heavy dependencies (torch, kopf) only when they run.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence

from kvpilot.runtime.memory.quantization import COMPUTE_DTYPES, KV_DTYPES, WEIGHT_QUANT_MODES
from kvpilot.runtime.usage import USER_ERRORS, Parser, UsageError, run_main


def _add_plan(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plan", help="size quantization, GPUs and KV cache for a model",
                       description="Plan an LLMDeployment manifest, or a model on a GPU type.")
    p.add_argument("manifest", nargs="?", help="LLMDeployment YAML file")
    p.add_argument("--model", help="catalog name, HF repo id or config.json path (instead of a manifest)")
    p.add_argument("--gpu", help="GPU type from the catalog, 'cpu', or 'local' for this machine")
    p.add_argument("--gpu-memory", help="memory of a custom GPU, e.g. 48Gi")
    p.add_argument("--max-context", type=int)
    p.add_argument("--concurrency", type=int)
    p.add_argument("--quantization", choices=["auto", *COMPUTE_DTYPES, *WEIGHT_QUANT_MODES])
    p.add_argument("--kv-dtype", choices=["auto", *KV_DTYPES])
    p.add_argument("--optimize", choices=["quality", "cost"])
    p.add_argument("--gpus-per-node", type=int)
    p.add_argument("--max-gpus", type=int, help="most GPUs per replica")
    p.add_argument("--tensor-parallel", type=int, help="pin the tensor-parallel degree (GPUs per stage)")
    p.add_argument("--pipeline-parallel", type=int, help="pin the pipeline-parallel degree (stages)")
    p.add_argument("--gpu-memory-utilization", type=float, help="fraction of each GPU's memory to use (default 0.90)")
    p.add_argument("--max-num-batched-tokens", type=int, help="token budget of one engine step")
    p.add_argument("--max-num-seqs", type=int, help="most sequences running at once")
    p.add_argument("--host-kv-memory", help="host memory for the host KV tier, e.g. 16Gi (kvCache.hostMemory)")
    p.add_argument("--allow-offload", action="store_true", help="when nothing fits, keep some layers' weights in host "
                   "memory and stream them to the GPU (serving.allowOffload)")
    p.add_argument("--output", choices=["table", "json"], default="table")
    p.set_defaults(run=_run_plan)


def _spec_from_flags(args: argparse.Namespace) -> dict:
    if not args.model or not (args.gpu or args.gpu_memory):
        raise UsageError("kvpilot plan: give a manifest, or --model and --gpu")
    gpu: dict = {"type": args.gpu} if args.gpu and args.gpu != "local" else {"type": "cpu"}
    if args.gpu_memory:
        gpu = {"memory": args.gpu_memory} | ({"type": args.gpu} if args.gpu else {})
    return {"model": {"source": args.model}, "gpu": gpu}


def _run_plan(args: argparse.Namespace) -> int:
    from rich.console import Console

    from kvpilot.operator.planning import local_plan, plan_deployment
    from kvpilot.operator.spec import load_manifest, parse_spec
    from kvpilot.runtime.memory.plan_view import render_plan

    if args.manifest:
        spec_dict = load_manifest(args.manifest).spec.model_dump(by_alias=True, exclude_none=True)
    else:
        spec_dict = _spec_from_flags(args)
    overrides = {"maxContextLength": args.max_context, "concurrency": args.concurrency,
                 "optimize": args.optimize, "maxBatchedTokens": args.max_num_batched_tokens,
                 "maxNumSeqs": args.max_num_seqs, "allowOffload": args.allow_offload or None}
    spec_dict.setdefault("serving", {}).update({k: v for k, v in overrides.items() if v is not None})
    if args.quantization:
        spec_dict["quantization"] = args.quantization
    if args.kv_dtype:
        spec_dict.setdefault("kvCache", {})["dtype"] = args.kv_dtype
    if args.host_kv_memory:
        spec_dict.setdefault("kvCache", {})["hostMemory"] = args.host_kv_memory
    if args.gpu_memory_utilization is not None:
        spec_dict["gpuMemoryUtilization"] = args.gpu_memory_utilization
    for flag, key in ((args.gpus_per_node, "perNode"), (args.max_gpus, "maxPerReplica"),
                      (args.tensor_parallel, "tensorParallel"), (args.pipeline_parallel, "pipelineParallel")):
        if flag is not None:
            spec_dict["gpu"][key] = flag
    spec = parse_spec(spec_dict)
    plan = local_plan(spec) if args.gpu == "local" else plan_deployment(spec)
    if args.output == "json":
        print(json.dumps(plan.to_dict(), indent=2))
    else:
        render_plan(plan, Console())
    return 0


def _add_operator(sub: argparse._SubParsersAction) -> None:
    from kvpilot.operator.main import add_command  # light: kopf loads only when the operator runs

    add_command(sub)


def _add_crd(sub: argparse._SubParsersAction) -> None:
    from kvpilot.operator.crd import add_command

    add_command(sub)


def _add_serve(sub: argparse._SubParsersAction) -> None:
    from kvpilot.runtime.server.serve import add_serve

    add_serve(sub)


def _add_up(sub: argparse._SubParsersAction) -> None:
    from kvpilot.cli.up import add_up

    add_up(sub)


SUBCOMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [
    _add_plan, _add_serve, _add_up, _add_operator, _add_crd,
]


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="kvpilot", description="Run LLMs on Kubernetes, memory first.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    for add in SUBCOMMANDS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from kvpilot.operator.spec import SpecError

    return run_main(build_parser, argv, (*USER_ERRORS, SpecError))


if __name__ == "__main__":
    sys.exit(main())
