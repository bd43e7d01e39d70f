"""The runtime pod: container args from the plan, GPUs, weights volume, probes, hardened security.

Pure functions of (deployment, plan, options): no kopf, no Kubernetes client.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from kvpilot.operator.planning import DEFAULT_CPU_POD_MEMORY, quantity_bytes, target_device
from kvpilot.operator.spec import DEFAULT_IMAGE, LLMDeployment, ModelSource
from kvpilot.runtime.contract import ENTRYPOINT, HEALTH_PATH, HTTP_PORT, READY_PATH
from kvpilot.runtime.memory.budget import RUNTIME_PROCESS_BYTES
from kvpilot.runtime.memory.devices import GiB, MiB
from kvpilot.runtime.memory.facts import catalog_aliases
from kvpilot.runtime.memory.planner import Plan

PORT_NAME = "http"
GPU_RESOURCE = "nvidia.com/gpu"
GPU_PRODUCT_LABEL = "nvidia.com/gpu.product"  # set on nodes by NVIDIA's GPU feature discovery
RUNTIME_UID = 1000  # the runtime image's non-root user; restricted pods must not run as 0
MODELS_DIR = "/models"
CACHE_DIR = "/cache"  # HF, Triton and torch caches: the only writable paths besides /tmp
# NCCL's shared-memory transport between the GPUs of one pod and torch's tensor sharing live in
# /dev/shm; the container default is 64 MiB, which makes NCCL fail at start-up with TP > 1.
SHM_SIZE_LIMIT = "8Gi"
# Loading weights from the local volume and compiling the Triton kernels: 70B bf16 (140 GB) at
# ~200 MB/s from a network disk is ~12 minutes; the startup probe allows 30.
STARTUP_SECONDS = 30 * 60
STARTUP_PERIOD_SECONDS = 10
READY_PERIOD_SECONDS = 5
LIVENESS_PERIOD_SECONDS = 10
LIVENESS_FAILURES = 6  # a minute of no answer: a long prefill step must not read as a dead process
# Time to finish in-flight requests after SIGTERM: a 4k-token completion at ~40 tokens/s.
DRAIN_SECONDS = 120
# Taint NVIDIA's GPU operator and most managed GPU node pools put on GPU nodes.
GPU_TOLERATION = {"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"}

Role = Literal["single", "leader", "worker"]


@dataclass(frozen=True)
class Weights:
    """Where the runtime reads the weights and how they get there."""

    model_path: str  # what --model gets
    volume: dict[str, Any] | None  # the `models` volume; None: the path is inside the image
    repo: str | None = None  # a hub repository to download into the volume first
    files: tuple[str, ...] = ()  # only these files of it (a single .gguf); empty: all
    revision: str | None = None


class NoWeights(ValueError):
    """The model source says nothing about where the weights are."""


def hub_repo(name: str) -> str:
    """The hub repository of a catalog name: its instruction-tuned variant, which is what one serves."""
    aliases = catalog_aliases(name)
    if not aliases:
        raise NoWeights(f"model.source {name!r} is no catalog name, so it says nothing about where the weights "
                        "are: use hf://org/name, pvc://claim/path or file:///path")
    tuned = [a for a in aliases if a.lower().endswith(("-instruct", "-it"))]
    return (tuned or aliases)[0]


def weights(model: ModelSource) -> Weights:
    scheme, _, path = model.source.partition("://")
    if not path:  # a catalog name or a bare hub id
        scheme, path = "hf", hub_repo(model.source) if "/" not in model.source else model.source
    if scheme == "hf":
        if path.strip("/").count("/") < 1:
            raise NoWeights(f"model.source {model.source!r}: an hf:// source is hf://org/name[/file]")
        org, name, *files = path.strip("/").split("/")
        repo = f"{org}/{name}"
        local = "/".join((MODELS_DIR, repo, *files))
        return Weights(local, {"name": "models", "emptyDir": {}}, repo, tuple(files), model.revision)
    if scheme == "pvc":
        claim, _, sub = path.partition("/")
        if not claim:
            raise NoWeights(f"model.source {model.source!r}: a pvc:// source is pvc://claim[/path]")
        volume = {"name": "models", "persistentVolumeClaim": {"claimName": claim, "readOnly": True}}
        return Weights(f"{MODELS_DIR}/{sub}".rstrip("/"), volume)
    return Weights("/" + path.lstrip("/"), None)  # file:///path: baked into the image


def runtime_args(deployment: LLMDeployment, plan: Plan, model_path: str, role: Role) -> list[str]:
    spec = deployment.spec
    args = ["serve", "--model", model_path, "--served-model-name", spec.model.name, "--port", str(HTTP_PORT)]
    for flag, value in plan.engine_options().items():
        args += [f"--{flag}", str(value)]
    if role != "single":  # LeaderWorkerSet injects these variables into every pod of a group
        args += ["--nnodes", str(plan.nodes), "--node-rank", "$(LWS_WORKER_INDEX)",
                 "--leader-address", "$(LWS_LEADER_ADDRESS)"]
    return args + list(spec.runtime.extra_args)


def container_resources(deployment: LLMDeployment, plan: Plan) -> dict[str, dict[str, str]]:
    extra = deployment.spec.runtime.resources
    requests = {k: str(v) for k, v in (extra.requests if extra else {}).items()}
    limits = {k: str(v) for k, v in (extra.limits if extra else {}).items()}
    host = plan.host_kv_bytes  # the host KV tier: pod memory beyond the device's
    if plan.device_kind == "cpu":  # the plan sized the model into this much memory
        memory = limits.get("memory", f"{DEFAULT_CPU_POD_MEMORY // GiB}Gi")
        if host:
            memory = _quantity(quantity_bytes(memory, "runtime.resources.limits.memory") + host)
        limits["memory"] = requests["memory"] = memory
    else:
        gpus = str(plan.gpus_per_replica // plan.nodes)
        requests[GPU_RESOURCE] = limits[GPU_RESOURCE] = gpus
        if host and "memory" not in requests:  # a request given holds the tier (planning.host_kv_bytes); else
            # the tier plus what the runtime processes hold in RAM before it (Python, torch, the tokenizer)
            requests["memory"] = _quantity(RUNTIME_PROCESS_BYTES + host)
        if plan.host_weight_bytes_per_pod:  # weights offload: pinned host memory on top of whatever was asked
            _grow(requests, plan.host_weight_bytes_per_pod, "requests", RUNTIME_PROCESS_BYTES)
            _grow(limits, plan.host_weight_bytes_per_pod, "limits", None)
    return {"requests": requests, "limits": limits}


def _grow(quantities: dict[str, str], by: int, kind: str, base: int | None) -> None:
    """Add `by` bytes to the memory of `quantities`; unset: `base + by`, or leave it unset when base is None."""
    if "memory" in quantities:
        quantities["memory"] = _quantity(quantity_bytes(quantities["memory"], f"runtime.resources.{kind}.memory") + by)
    elif base is not None:
        quantities["memory"] = _quantity(base + by)


def _quantity(num_bytes: int) -> str:
    for unit, size in (("Gi", GiB), ("Mi", MiB)):
        if num_bytes % size == 0:
            return f"{num_bytes // size}{unit}"
    return str(num_bytes)


def _security_context() -> dict[str, Any]:
    return {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True, "runAsNonRoot": True,
            "runAsUser": RUNTIME_UID, "runAsGroup": RUNTIME_UID, "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"}}


def _probe(path: str, period: int, failures: int) -> dict[str, Any]:
    return {"httpGet": {"path": path, "port": PORT_NAME}, "periodSeconds": period, "timeoutSeconds": 5,
            "failureThreshold": failures}


def _env(deployment: LLMDeployment, extra: dict[str, str]) -> list[dict[str, Any]]:
    user = [e.model_dump(by_alias=True, exclude_none=True) for e in deployment.spec.runtime.env]
    ours = {"HF_HOME": f"{CACHE_DIR}/huggingface", "XDG_CACHE_HOME": CACHE_DIR, "HOME": CACHE_DIR,
            "TRITON_CACHE_DIR": f"{CACHE_DIR}/triton", "TMPDIR": "/tmp", **extra}
    taken = {e["name"] for e in user}
    return [{"name": k, "value": v} for k, v in ours.items() if k not in taken] + user


def _download(deployment: LLMDeployment, w: Weights, image: str, hf_endpoint: str | None) -> dict[str, Any]:
    command = ["hf", "download", w.repo or "", *w.files, "--local-dir", f"{MODELS_DIR}/{w.repo}"]
    if w.revision:
        command += ["--revision", w.revision]
    extra = {"HF_ENDPOINT": hf_endpoint} if hf_endpoint else {}
    env = _env(deployment, extra)
    if deployment.spec.model.token_secret:
        env.append({"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {
            "name": deployment.spec.model.token_secret, "key": "HF_TOKEN"}}})
    return {"name": "download", "image": image, "command": command, "env": env,
            "securityContext": _security_context(),
            "volumeMounts": [{"name": "models", "mountPath": MODELS_DIR},
                             {"name": "cache", "mountPath": CACHE_DIR}, {"name": "tmp", "mountPath": "/tmp"}]}


def pod_spec(deployment: LLMDeployment, plan: Plan, role: Role = "single", hf_endpoint: str | None = None,
             default_image: str = DEFAULT_IMAGE) -> dict[str, Any]:
    spec = deployment.spec
    w = weights(spec.model)
    image = spec.runtime.image or default_image
    serves = role != "worker"
    container: dict[str, Any] = {
        "name": "runtime",
        "image": image,
        "command": list(ENTRYPOINT),
        "args": runtime_args(deployment, plan, w.model_path, role),
        "env": _env(deployment, {"HF_HUB_OFFLINE": "1"}),  # the weights are local: never reach the hub
        "resources": container_resources(deployment, plan),
        "securityContext": _security_context(),
        "volumeMounts": [{"name": "cache", "mountPath": CACHE_DIR}, {"name": "tmp", "mountPath": "/tmp"}],
    }
    if serves:
        container["ports"] = [{"name": PORT_NAME, "containerPort": HTTP_PORT, "protocol": "TCP"}]
        container["startupProbe"] = _probe(HEALTH_PATH, STARTUP_PERIOD_SECONDS,
                                           STARTUP_SECONDS // STARTUP_PERIOD_SECONDS)
        container["readinessProbe"] = _probe(READY_PATH, READY_PERIOD_SECONDS, 3)
        container["livenessProbe"] = _probe(HEALTH_PATH, LIVENESS_PERIOD_SECONDS, LIVENESS_FAILURES)
    volumes: list[dict[str, Any]] = [{"name": "cache", "emptyDir": {}}, {"name": "tmp", "emptyDir": {}}]
    if w.volume is not None:
        volumes.append(w.volume)
        container["volumeMounts"].append({"name": "models", "mountPath": MODELS_DIR, "readOnly": True})
    if plan.tensor_parallel * plan.pipeline_parallel > 1:
        volumes.append({"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": SHM_SIZE_LIMIT}})
        container["volumeMounts"].append({"name": "shm", "mountPath": "/dev/shm"})
    pod: dict[str, Any] = {
        "automountServiceAccountToken": False,  # the runtime never talks to the Kubernetes API
        "enableServiceLinks": False,
        "terminationGracePeriodSeconds": DRAIN_SECONDS,
        "securityContext": {"runAsNonRoot": True, "runAsUser": RUNTIME_UID, "runAsGroup": RUNTIME_UID,
                            "fsGroup": RUNTIME_UID, "seccompProfile": {"type": "RuntimeDefault"}},
        "containers": [container],
        "volumes": volumes,
    }
    if w.repo:
        pod["initContainers"] = [_download(deployment, w, image, hf_endpoint)]
    node_selector = dict(spec.runtime.node_selector)
    tolerations = [t.model_dump(by_alias=True, exclude_none=True) for t in spec.runtime.tolerations]
    if plan.device_kind != "cpu":
        # a catalog type; a custom GPU (memory only) has no label to select by; the user's selector wins
        labels = () if GPU_PRODUCT_LABEL in node_selector else target_device(spec).product_labels
        if len(labels) == 1:
            node_selector[GPU_PRODUCT_LABEL] = labels[0]
        elif labels:  # a family name (`h100`): any of its boards
            any_board = {"matchExpressions": [{"key": GPU_PRODUCT_LABEL, "operator": "In", "values": list(labels)}]}
            pod["affinity"] = {"nodeAffinity": {
                "requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [any_board]}}}
        tolerations.insert(0, GPU_TOLERATION)
    if node_selector:
        pod["nodeSelector"] = node_selector
    if tolerations:
        pod["tolerations"] = tolerations
    return pod
