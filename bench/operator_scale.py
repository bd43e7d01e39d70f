"""Convergence time of the real operator with 200 LLMDeployments applied at once (kmock's emulator).

Converged: every LLMDeployment has `Planned=True` in its status and its Deployment, Service and
PodDisruptionBudget exist (plus the ScaledObject of the KEDA example). The specs cycle through
examples/ (CPU, single-GPU, 8-GPU, KEDA-scaled).

Peer in the same run: the same with 20 objects, so the per-object cost shows whether the operator
scales linearly (ratio ~1) or degrades with the number of objects. Prints one JSON line.

    python bench/operator_scale.py [--objects 200] [--peer-objects 20]
"""

from __future__ import annotations

import sys
from pathlib import Path

# This file shares its name with the standard library's `operator`: keep its folder off the import path.
if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    del sys.path[0]
# The API emulator is a test double: it lives under tests/.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import argparse
import asyncio
import json
import time
from typing import Any

import yaml
from eventually import eventually
from kube_emulator import Emulated, emulated_operator

from kvpilot.operator.resources import CHILD_RESOURCES, LLMDEPLOYMENTS

EXAMPLES = sorted((Path(__file__).resolve().parents[1] / "examples").glob("*.yaml"))
TIMEOUT_SECONDS = 600.0
POLL_SECONDS = 0.1  # the probe reads 4 x N objects; polling faster would steal the operator's CPU


def manifests(n: int) -> list[dict[str, Any]]:
    specs = [yaml.safe_load(path.read_text())["spec"] for path in EXAMPLES]
    return [{"apiVersion": "kvpilot.io/v1alpha1", "kind": "LLMDeployment", "metadata": {"name": f"llm-{i:04d}"},
             "spec": specs[i % len(specs)]} for i in range(n)]


def converged(cluster: Emulated, wanted: list[dict[str, Any]]) -> bool:
    objects = cluster.emulator.objects
    present = {(key[0].plural, key[2]) for key, obj in objects.items() if not obj.deleted}
    for manifest in wanted:
        name = manifest["metadata"]["name"]
        kinds = ["Deployment", "Service", "PodDisruptionBudget"]
        if manifest["spec"].get("autoscaling", {}).get("mode") == "keda":
            kinds.append("ScaledObject")
        if not all((CHILD_RESOURCES[kind].plural, name) in present for kind in kinds):
            return False
        status = (cluster.get(LLMDEPLOYMENTS.kind, name) or {}).get("status") or {}
        if not any(c["type"] == "Planned" and c["status"] == "True" for c in status.get("conditions", [])):
            return False
    return True


async def run(n: int) -> dict[str, float]:
    async with emulated_operator(keep_history=False) as cluster:
        wanted = manifests(n)
        start = time.perf_counter()
        await asyncio.gather(*(cluster.create(m) for m in wanted))
        await eventually(lambda: converged(cluster, wanted), TIMEOUT_SECONDS, f"{n} LLMDeployments converge",
                         poll=POLL_SECONDS)
        seconds = time.perf_counter() - start
        return {"seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--objects", type=int, default=200)
    parser.add_argument("--peer-objects", type=int, default=20)
    args = parser.parse_args()
    peer = asyncio.run(run(args.peer_objects))
    main_run = asyncio.run(run(args.objects))
    per_object, peer_per_object = main_run["seconds"] / args.objects, peer["seconds"] / args.peer_objects
    print(json.dumps({
        "bench": "operator_converge", "objects": args.objects, "seconds": round(main_run["seconds"], 3),
        "ms_per_object": round(per_object * 1e3, 2),
        "peer_objects": args.peer_objects, "peer_seconds": round(peer["seconds"], 3),
        "peer_ms_per_object": round(peer_per_object * 1e3, 2),
        "per_object_ratio": round(per_object / peer_per_object, 2),
    }))


if __name__ == "__main__":
    main()
