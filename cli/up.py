"""`kvpilot up manifest.yaml`: the manifest a cluster would get, planned for this machine (its GPU,
else its CPU and RAM) and served in-process, with the same options a pod of that plan gets."""

from __future__ import annotations

import argparse

from kvpilot.operator.planning import local_plan
from kvpilot.operator.spec import load_manifest
from kvpilot.runtime.server.engine_flags import add_engine_flags, engine_config
from kvpilot.runtime.server.serve import add_server_flags, serve_engine
from kvpilot.runtime.usage import Parser, UsageError

EMBEDDED_SOURCES = ("hf://HuggingFaceTB/SmolLM2-135M-Instruct", "smollm2-135m", "smollm2-135m-instruct")


def add_up(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("up", help="run an LLMDeployment manifest on this machine",
                       description="Plan an LLMDeployment for this machine (its GPU, else CPU and RAM) and serve it.")
    p.add_argument("manifest", help="LLMDeployment YAML file")
    add_server_flags(p)
    p.set_defaults(run=run_up)


def resolve_source(source: str) -> str | None:
    """A manifest's model source as a local path for the engine (None: the embedded model)."""
    if source in EMBEDDED_SOURCES or source.lower() in EMBEDDED_SOURCES:
        return None
    if source.startswith("file://"):
        return source.removeprefix("file://")
    if source.startswith("hf://"):
        from huggingface_hub import snapshot_download

        repo = source.removeprefix("hf://")
        try:
            return snapshot_download(repo, local_files_only=True)
        except Exception:
            raise UsageError(f"model {source} is not on this machine: download it first (`hf download {repo}`) "
                             "or point spec.model.source at a file:// path") from None
    if source.startswith("pvc://"):
        raise UsageError(f"model {source} lives on a Kubernetes volume: `kvpilot up` needs a file:// path")
    return source


def run_up(args: argparse.Namespace) -> int:
    deployment = load_manifest(args.manifest)
    spec = deployment.spec
    plan = local_plan(spec)
    flags = ["--device", "cpu" if plan.device_kind == "cpu" else "cuda",
             "--gpu-memory-utilization", str(spec.gpu_memory_utilization)]
    for flag, value in plan.engine_options().items():
        flags += [f"--{flag}", str(value)]
    engine_flags = Parser(prog="kvpilot up")
    add_engine_flags(engine_flags)
    options = engine_flags.parse_args(flags)
    options.model = resolve_source(spec.model.source)
    config = engine_config(options, "kvpilot up: the plan for this machine cannot run here")
    name = spec.model.served_name or deployment.metadata.name
    return serve_engine(config, name, args)
