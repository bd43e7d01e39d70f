"""render.py and pod.py: every child passes the real Kubernetes schemas, and the pods are what the plan says."""

from __future__ import annotations

from typing import Any

import kubernetes_validate
import pytest
from llmd_cases import EXAMPLES, load_example

from kvpilot.operator.planning import plan_deployment
from kvpilot.operator.pod import DRAIN_SECONDS, GPU_PRODUCT_LABEL, GPU_RESOURCE, HTTP_PORT, NoWeights, weights
from kvpilot.operator.render import (
    ADAPTER_KV_METRIC,
    LWS_WORKER_INDEX,
    RenderOptions,
    desired_replicas,
    label_selector,
    render,
)
from kvpilot.operator.spec import LLMDeployment, ModelSource, parse_manifest

K8S_VERSION = kubernetes_validate.latest_version()  # the newest schemas the package bundles
MULTI_NODE = {"model": {"source": "hf://meta-llama/Llama-3.1-405B-Instruct"}, "gpu": {"type": "h100-80gb"},
              "quantization": "bf16", "serving": {"maxContextLength": 8192}}
# Volume types the "restricted" Pod Security Standard allows.
RESTRICTED_VOLUMES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim",
                      "projected", "secret"}


def deployment(spec: dict[str, Any], name: str = "llm", namespace: str = "ml") -> LLMDeployment:
    return parse_manifest({"apiVersion": "kvpilot.io/v1alpha1", "kind": "LLMDeployment",
                           "metadata": {"name": name, "namespace": namespace}, "spec": spec})


def rendered(spec: dict[str, Any], options: RenderOptions | None = None) -> dict[str, dict[str, Any]]:
    d = deployment(spec)
    return {obj["kind"]: obj for obj in render(d, plan_deployment(d.spec), options)}


def from_example(path) -> tuple[LLMDeployment, list[dict[str, Any]]]:
    d = parse_manifest(load_example(path.stem))
    d.metadata.namespace = "ml"
    return d, render(d, plan_deployment(d.spec), RenderOptions(service_monitors=True))


def validate(obj: dict[str, Any]) -> None:
    try:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as err:
        pytest.fail(f"{obj['kind']} {obj['metadata'].get('name')}: {err.message} at {list(err.path)}")


def pod_templates(obj: dict[str, Any]) -> list[dict[str, Any]]:
    if obj["kind"] == "Deployment":
        return [obj["spec"]["template"]]
    group = obj["spec"]["leaderWorkerTemplate"]
    return [group["leaderTemplate"], group["workerTemplate"]]


def restricted_violations(pod: dict[str, Any]) -> list[str]:
    """The "restricted" Pod Security Standard's checks (kubernetes.io/docs/concepts/security/pod-security-standards)."""
    found = []
    psc = pod.get("securityContext", {})
    for flag in ("hostNetwork", "hostPID", "hostIPC"):
        if pod.get(flag):
            found.append(flag)
    for volume in pod.get("volumes", []):
        kinds = set(volume) - {"name"}
        if not kinds <= RESTRICTED_VOLUMES:
            found.append(f"volume {volume['name']}: {kinds}")
    for c in pod.get("initContainers", []) + pod["containers"]:
        sc = c.get("securityContext", {})
        name = c["name"]
        if sc.get("privileged"):
            found.append(f"{name}: privileged")
        if sc.get("allowPrivilegeEscalation") is not False:
            found.append(f"{name}: allowPrivilegeEscalation must be false")
        if "ALL" not in sc.get("capabilities", {}).get("drop", []):
            found.append(f"{name}: must drop ALL capabilities")
        if set(sc.get("capabilities", {}).get("add", [])) - {"NET_BIND_SERVICE"}:
            found.append(f"{name}: adds capabilities")
        if not (sc.get("runAsNonRoot") or psc.get("runAsNonRoot")):
            found.append(f"{name}: runAsNonRoot")
        if 0 in (sc.get("runAsUser"), psc.get("runAsUser")):
            found.append(f"{name}: runs as root")
        seccomp = (sc.get("seccompProfile") or psc.get("seccompProfile") or {}).get("type")
        if seccomp not in ("RuntimeDefault", "Localhost"):
            found.append(f"{name}: seccompProfile {seccomp}")
        if any(p.get("hostPort") for p in c.get("ports", [])):
            found.append(f"{name}: hostPort")
    return found


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_every_rendered_object_passes_the_kubernetes_schemas(path):
    _, children = from_example(path)
    for obj in children:
        if obj["apiVersion"].startswith(("keda.sh/", "monitoring.coreos.com/")):
            validate({"apiVersion": "v1", "kind": "ConfigMap", "metadata": obj["metadata"]})  # its metadata only
        else:
            validate(obj)


def test_leader_worker_set_pods_pass_the_pod_schema():
    """kubernetes-validate knows no LeaderWorkerSet: its two pod templates are checked as PodTemplates."""
    lws = rendered(MULTI_NODE)["LeaderWorkerSet"]
    assert lws["apiVersion"] == "leaderworkerset.x-k8s.io/v1"
    assert set(lws["spec"]) == {"replicas", "startupPolicy", "leaderWorkerTemplate"}
    assert set(lws["spec"]["leaderWorkerTemplate"]) == {"size", "restartPolicy", "leaderTemplate", "workerTemplate"}
    for template in pod_templates(lws):
        validate({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"}, "template": template})


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_pods_meet_the_restricted_pod_security_standard(path):
    for obj in from_example(path)[1]:
        if obj["kind"] in ("Deployment", "LeaderWorkerSet"):
            for template in pod_templates(obj):
                assert restricted_violations(template["spec"]) == []


def test_multi_node_pods_meet_the_restricted_standard_too():
    for template in pod_templates(rendered(MULTI_NODE)["LeaderWorkerSet"]):
        assert restricted_violations(template["spec"]) == []


def arg(args: list[str], flag: str) -> str:
    return args[args.index(flag) + 1]


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_runtime_args_come_from_the_plan(path):
    d, children = from_example(path)
    plan = plan_deployment(d.spec)
    container = children[0]["spec"]["template"]["spec"]["containers"][0]
    args = container["args"]
    assert container["command"] == ["python", "-m", "kvpilot.runtime"] and args[0] == "serve"
    expected = {"--quantization": plan.quantization, "--kv-cache-dtype": plan.kv_dtype,
                "--tensor-parallel": str(plan.tensor_parallel), "--pipeline-parallel": str(plan.pipeline_parallel),
                "--num-kv-blocks": str(plan.num_kv_blocks),
                "--block-size": str(plan.block_size), "--max-model-len": str(plan.max_model_len),
                "--max-num-seqs": str(plan.max_num_seqs), "--max-num-batched-tokens": str(plan.max_batched_tokens),
                "--served-model-name": d.spec.model.name, "--port": str(HTTP_PORT),
                "--model": weights(d.spec.model).model_path}
    assert {flag: arg(args, flag) for flag in expected} == expected


@pytest.mark.parametrize(("name", "gpus", "product", "shm"), [
    ("llama-3.1-8b", "1", "NVIDIA-H100-80GB-HBM3", False),
    ("llama-3.1-70b", "8", "NVIDIA-H100-80GB-HBM3", True),
    ("qwen2.5-7b-l4-cost", "1", "NVIDIA-L4", False),
])
def test_gpu_pods(name, gpus, product, shm):
    pod = rendered(load_example(name)["spec"])["Deployment"]["spec"]["template"]["spec"]
    resources = pod["containers"][0]["resources"]
    assert resources["requests"][GPU_RESOURCE] == resources["limits"][GPU_RESOURCE] == gpus
    assert pod["nodeSelector"][GPU_PRODUCT_LABEL] == product
    assert {"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    shm_volumes = [v for v in pod["volumes"] if v["name"] == "shm"]
    assert bool(shm_volumes) is shm
    if shm:
        assert shm_volumes[0]["emptyDir"]["medium"] == "Memory"
        assert {"name": "shm", "mountPath": "/dev/shm"} in pod["containers"][0]["volumeMounts"]


def test_cpu_pods_get_memory_from_the_spec_and_no_gpus():
    pod = rendered(load_example("smollm2")["spec"])["Deployment"]["spec"]["template"]["spec"]
    resources = pod["containers"][0]["resources"]
    assert resources == {"requests": {"memory": "4Gi"}, "limits": {"memory": "4Gi"}}
    assert "nodeSelector" not in pod and "tolerations" not in pod


def test_cpu_pods_without_a_limit_get_the_memory_the_plan_assumed():
    spec = {"model": {"source": "smollm2-135m"}, "gpu": {"type": "cpu"}}
    resources = rendered(spec)["Deployment"]["spec"]["template"]["spec"]["containers"][0]["resources"]
    assert resources["limits"]["memory"] == "16Gi"


def test_custom_gpu_has_no_product_selector_but_keeps_user_scheduling():
    spec = {"model": {"source": "llama-3.1-8b"}, "gpu": {"memory": "48Gi"},
            "runtime": {"nodeSelector": {"pool": "gpu"},
                        "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "llm"}]}}
    pod = rendered(spec)["Deployment"]["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"pool": "gpu"}
    assert {"key": "dedicated", "operator": "Equal", "value": "llm"} in pod["tolerations"]


@pytest.mark.parametrize(("source", "path", "volume", "repo", "files"), [
    ("hf://meta-llama/Llama-3.1-8B-Instruct", "/models/meta-llama/Llama-3.1-8B-Instruct", "emptyDir",
     "meta-llama/Llama-3.1-8B-Instruct", ()),
    ("hf://org/gguf-repo/model.Q4_1.gguf", "/models/org/gguf-repo/model.Q4_1.gguf", "emptyDir", "org/gguf-repo",
     ("model.Q4_1.gguf",)),
    ("llama-3.1-8b", "/models/meta-llama/Llama-3.1-8B-Instruct", "emptyDir", "meta-llama/Llama-3.1-8B-Instruct", ()),
    ("pvc://weights/llama/8b", "/models/llama/8b", "persistentVolumeClaim", None, ()),
    ("pvc://weights", "/models", "persistentVolumeClaim", None, ()),
    ("file:///opt/models/smollm2", "/opt/models/smollm2", None, None, ()),
])
def test_weights_by_source(source, path, volume, repo, files):
    w = weights(ModelSource(source=source))
    assert (w.model_path, w.repo, w.files) == (path, repo, files)
    assert (None if w.volume is None else (set(w.volume) - {"name"}).pop()) == volume


def test_hub_download_init_container_with_token_and_mirror():
    pod = rendered(load_example("llama-3.1-8b")["spec"] | {"model": {
        "source": "hf://meta-llama/Llama-3.1-8B-Instruct", "revision": "abc123", "tokenSecret": "hf-token"}},
        RenderOptions(hf_endpoint="http://mirror:8080"))["Deployment"]["spec"]["template"]["spec"]
    init = pod["initContainers"][0]
    assert init["command"] == ["hf", "download", "meta-llama/Llama-3.1-8B-Instruct", "--local-dir",
                               "/models/meta-llama/Llama-3.1-8B-Instruct", "--revision", "abc123"]
    env = {e["name"]: e for e in init["env"]}
    assert env["HF_TOKEN"]["valueFrom"] == {"secretKeyRef": {"name": "hf-token", "key": "HF_TOKEN"}}
    assert env["HF_ENDPOINT"]["value"] == "http://mirror:8080"
    runtime_env = {e["name"]: e.get("value") for e in pod["containers"][0]["env"]}
    assert runtime_env["HF_HUB_OFFLINE"] == "1" and "HF_TOKEN" not in runtime_env
    mounts = {m["name"]: m for m in pod["containers"][0]["volumeMounts"]}
    assert mounts["models"]["readOnly"] and mounts["cache"]["mountPath"] == "/cache"


def test_pvc_source_mounts_the_claim_read_only_and_downloads_nothing():
    pod = rendered({"model": {"source": "pvc://weights/llama", "architecture": {
        "numLayers": 4, "hiddenSize": 512, "numHeads": 8, "intermediateSize": 1024, "vocabSize": 32000}},
        "gpu": {"type": "l4"}})["Deployment"]["spec"]["template"]["spec"]
    assert "initContainers" not in pod
    assert {"name": "models", "persistentVolumeClaim": {"claimName": "weights", "readOnly": True}} in pod["volumes"]


def test_probes_scrape_annotations_and_drain():
    template = rendered(load_example("llama-3.1-8b")["spec"])["Deployment"]["spec"]["template"]
    container = template["spec"]["containers"][0]
    assert container["startupProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "http"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert template["metadata"]["annotations"] == {"prometheus.io/scrape": "true", "prometheus.io/port": "8000",
                                                   "prometheus.io/path": "/metrics"}
    assert template["spec"]["terminationGracePeriodSeconds"] == DRAIN_SECONDS
    assert template["spec"]["automountServiceAccountToken"] is False


def test_user_env_overrides_ours_once():
    spec = load_example("smollm2")["spec"] | {"runtime": {"env": [{"name": "HF_HOME", "value": "/data/hf"},
                                                                  {"name": "LOG_LEVEL", "value": "debug"}]}}
    env = rendered(spec)["Deployment"]["spec"]["template"]["spec"]["containers"][0]["env"]
    names = [e["name"] for e in env]
    assert names.count("HF_HOME") == 1 and {"name": "HF_HOME", "value": "/data/hf"} in env
    assert {"name": "LOG_LEVEL", "value": "debug"} in env


def test_service_and_disruption_budget():
    objs = rendered(load_example("llama-3.1-8b")["spec"])
    service, pdb = objs["Service"]["spec"], objs["PodDisruptionBudget"]["spec"]
    assert service["ports"] == [{"name": "http", "port": 8000, "targetPort": "http", "protocol": "TCP",
                                 "appProtocol": "http"}]
    selector = objs["Deployment"]["spec"]["selector"]["matchLabels"]
    assert service["selector"] == pdb["selector"]["matchLabels"] == selector
    assert pdb["maxUnavailable"] == 1
    assert label_selector("llm") == "app.kubernetes.io/name=kvpilot,app.kubernetes.io/instance=llm"


def test_multi_node_runs_a_leader_worker_set_served_by_its_leaders():
    objs = rendered(MULTI_NODE)
    assert "Deployment" not in objs
    group = objs["LeaderWorkerSet"]["spec"]["leaderWorkerTemplate"]
    assert group["size"] == 2
    leader, worker = group["leaderTemplate"]["spec"]["containers"][0], group["workerTemplate"]["spec"]["containers"][0]
    assert arg(leader["args"], "--nnodes") == "2" and arg(worker["args"], "--node-rank") == "$(LWS_WORKER_INDEX)"
    assert leader["resources"]["limits"][GPU_RESOURCE] == "8"  # one pipeline stage of TP 8 on each node
    assert "readinessProbe" in leader and "readinessProbe" not in worker and "ports" not in worker
    assert "prometheus.io/scrape" in group["leaderTemplate"]["metadata"]["annotations"]
    assert "annotations" not in group["workerTemplate"]["metadata"]
    assert objs["Service"]["spec"]["selector"][LWS_WORKER_INDEX] == "0"


@pytest.mark.parametrize(("autoscaling", "replicas", "kinds"), [
    ({}, 3, set()),
    ({"enabled": True, "minReplicas": 2, "maxReplicas": 4}, 3, set()),
    ({"enabled": True, "minReplicas": 4, "maxReplicas": 6}, 4, set()),
    ({"enabled": True, "mode": "hpa", "minReplicas": 1, "maxReplicas": 5}, None, {"HorizontalPodAutoscaler"}),
    ({"enabled": True, "mode": "keda", "minReplicas": 0, "maxReplicas": 5}, None, {"ScaledObject"}),
    ({"enabled": False, "mode": "keda"}, 3, set()),
])
def test_autoscaling_modes(autoscaling, replicas, kinds):
    spec = load_example("llama-3.1-8b")["spec"] | {"replicas": 3, "autoscaling": autoscaling}
    objs = rendered(spec)
    assert desired_replicas(deployment(spec).spec) == replicas
    assert objs["Deployment"]["spec"].get("replicas") == replicas
    assert set(objs) - {"Deployment", "Service", "PodDisruptionBudget"} == kinds


def test_hpa_targets_kv_cache_use_through_the_adapter():
    spec = load_example("llama-3.1-8b")["spec"] | {"autoscaling": {
        "enabled": True, "mode": "hpa", "minReplicas": 1, "maxReplicas": 6, "targetKVCacheUtilization": 0.65,
        "scaleDownStabilizationSeconds": 600}}
    hpa = rendered(spec)["HorizontalPodAutoscaler"]
    validate(hpa)
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "llm"}
    assert hpa["spec"]["metrics"] == [{"type": "Pods", "pods": {"metric": {"name": ADAPTER_KV_METRIC},
                                                                "target": {"type": "AverageValue",
                                                                           "averageValue": "650m"}}}]
    assert hpa["spec"]["behavior"]["scaleDown"] == {"stabilizationWindowSeconds": 600}


def test_keda_scaled_object_queries_prometheus_for_kv_cache_use():
    spec = load_example("qwen2.5-7b-l4-cost")["spec"]
    so = rendered(spec, RenderOptions(prometheus_url="http://prom:9090"))["ScaledObject"]["spec"]
    trigger = so["triggers"][0]
    assert trigger["type"] == "prometheus" and trigger["metadata"]["serverAddress"] == "http://prom:9090"
    labels = '{namespace="ml",model_name="Qwen/Qwen2.5-7B-Instruct"}'
    assert trigger["metadata"]["query"] == (f"sum(vllm:kv_cache_usage_perc{labels})"
                                            f" or sum(vllm:gpu_cache_usage_perc{labels})")
    assert trigger["metadata"]["threshold"] == "0.7"
    assert (so["minReplicaCount"], so["maxReplicaCount"]) == (1, 8)
    assert so["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "llm"}


def test_service_monitor_only_when_the_cluster_has_its_crd():
    spec = load_example("smollm2")["spec"]
    assert "ServiceMonitor" not in rendered(spec)
    monitor = rendered(spec, RenderOptions(service_monitors=True))["ServiceMonitor"]["spec"]
    assert monitor["endpoints"] == [{"port": "http", "path": "/metrics", "interval": "15s"}]


def test_rendering_is_deterministic():
    spec = load_example("llama-3.1-70b")["spec"]
    assert rendered(spec) == rendered(spec)


def test_runtime_image_from_the_spec_else_the_operators_default():
    spec = load_example("smollm2")["spec"]
    options = RenderOptions(runtime_image="registry.local/runtime@sha256:" + "0" * 64)
    container = rendered(spec, options)["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] == options.runtime_image
    own = spec | {"runtime": {"image": "registry.local/runtime:dev"}}
    assert rendered(own, options)["Deployment"]["spec"]["template"]["spec"]["containers"][0]["image"] == \
        "registry.local/runtime:dev"


@pytest.mark.parametrize(("source", "words"), [
    ("mystery-model", "is no catalog name"),
    ("hf://just-an-org", "hf://org/name"),
    ("pvc:///path", "pvc://claim"),
])
def test_sources_that_name_no_weights_are_refused(source, words):
    with pytest.raises(NoWeights, match=words):
        weights(ModelSource(source=source))


def _engine_config_of(container: dict[str, Any], env: dict[str, str]):
    """What `kvpilot serve` makes of a rendered container's arguments (kubelet's $(VAR) expanded)."""
    from kvpilot.cli.main import build_parser
    from kvpilot.runtime.server.engine_flags import engine_config

    args = [env.get(a[2:-1], a) if a.startswith("$(") else a for a in container["args"]]
    return engine_config(build_parser().parse_args(args))


@pytest.mark.parametrize("example", ["llama-3.1-70b", "llama-3.1-8b", "smollm2"])
def test_pod_arguments_make_the_planned_engine(example):
    spec = load_example(example)["spec"]
    plan = plan_deployment(deployment(spec).spec)
    config = _engine_config_of(rendered(spec)["Deployment"]["spec"]["template"]["spec"]["containers"][0], {})
    assert (config.tensor_parallel_size, config.kv_cache_dtype, config.num_kv_blocks, config.max_model_len) == (
        plan.tensor_parallel, plan.kv_dtype, plan.num_kv_blocks, plan.max_model_len)
    assert config.quantization == (None if plan.quantization == plan.compute_dtype else plan.quantization)


def test_leader_worker_set_pods_make_one_pipeline_of_a_stage_per_node():
    """LWS puts each pod's index in LWS_WORKER_INDEX (0: the leader); `--node-rank` reads it, and a node's
    ranks (node rank x GPUs per node onwards, TP innermost) are its pipeline stage's."""
    plan = plan_deployment(deployment(MULTI_NODE).spec)
    assert (plan.tensor_parallel, plan.pipeline_parallel, plan.nodes) == (8, 2, 2)
    group = rendered(MULTI_NODE)["LeaderWorkerSet"]["spec"]["leaderWorkerTemplate"]
    assert group["size"] == plan.nodes
    env = {"LWS_LEADER_ADDRESS": "llm-0.llm", "LWS_WORKER_INDEX": "1"}
    leader = _engine_config_of(group["leaderTemplate"]["spec"]["containers"][0], env | {"LWS_WORKER_INDEX": "0"})
    worker = _engine_config_of(group["workerTemplate"]["spec"]["containers"][0], env)
    assert (leader.node_rank, worker.node_rank) == (0, 1)
    assert (leader.stages_of_node(), worker.stages_of_node()) == ([0], [1])
    for config in (leader, worker):
        assert (config.nnodes, config.tensor_parallel_size, config.pipeline_parallel_size, config.gpus_per_node) == (
            plan.nodes, plan.tensor_parallel, plan.pipeline_parallel, 8)
        assert (config.num_kv_blocks, config.max_model_len, config.kv_cache_dtype) == (
            plan.num_kv_blocks, plan.max_model_len, plan.kv_dtype)
    assert leader.leader_address == worker.leader_address == "llm-0.llm"


def test_a_family_gpu_name_plans_once_and_schedules_on_any_of_its_boards():
    """`h100` is the SXM or the PCIe board (same memory, same features): the plan is the SXM's, and the
    pods may land on nodes of either product, where `h100-80gb` pins the SXM board."""
    family = {"model": {"source": "llama-3.1-8b"}, "gpu": {"type": "h100"}}
    pinned = {"model": {"source": "llama-3.1-8b"}, "gpu": {"type": "h100-80gb"}}
    blocks = [plan_deployment(deployment(spec).spec).num_kv_blocks for spec in (family, pinned)]
    assert blocks[0] == blocks[1]
    pod = rendered(family)["Deployment"]["spec"]["template"]["spec"]
    assert GPU_PRODUCT_LABEL not in pod.get("nodeSelector", {})
    term = pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    assert term == [{"matchExpressions": [{"key": GPU_PRODUCT_LABEL, "operator": "In",
                                           "values": ["NVIDIA-H100-80GB-HBM3", "NVIDIA-H100-PCIe"]}]}]
    assert "affinity" not in rendered(pinned)["Deployment"]["spec"]["template"]["spec"]
    chosen = {**family, "runtime": {"nodeSelector": {GPU_PRODUCT_LABEL: "NVIDIA-H100-PCIe"}}}
    pod = rendered(chosen)["Deployment"]["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {GPU_PRODUCT_LABEL: "NVIDIA-H100-PCIe"} and "affinity" not in pod
