"""An LLMDeployment's children as manifests: `render(deployment, plan, options) -> list[dict]`.

Pure: the same inputs give the same objects, byte for byte, so the reconciler can compare them with
what the cluster holds and write only when something differs. Owner references are added by the
caller (`kopf.adopt`), not here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kvpilot.operator.pod import HTTP_PORT, PORT_NAME, pod_spec
from kvpilot.operator.resources import (
    DEPLOYMENTS,
    DISRUPTION_BUDGETS,
    HORIZONTAL_AUTOSCALERS,
    LEADER_WORKER_SETS,
    SCALED_OBJECTS,
    SERVICE_MONITORS,
    SERVICES,
    Resource,
)
from kvpilot.operator.spec import DEFAULT_IMAGE, LLMDeployment, LLMDeploymentSpec
from kvpilot.runtime.contract import KV_USAGE_METRIC, KV_USAGE_METRIC_OLD, METRICS_PATH
from kvpilot.runtime.memory.planner import Plan

APP_NAME = "kvpilot"
COMPONENT = "llm-runtime"
MANAGED_BY = "kvpilot-operator"
LWS_WORKER_INDEX = "leaderworkerset.sigs.k8s.io/worker-index"  # "0" marks a group's leader pod
# The runtime's metric (vLLM's name) and the name prometheus-adapter serves it under: custom-metrics
# API names cannot hold ':' (adapter rule: name: {matches: "^vllm:(.*)$", as: "${1}"}).
KV_METRIC = KV_USAGE_METRIC
ADAPTER_KV_METRIC = "kv_cache_usage_perc"
# The Service prometheus-operator creates for every Prometheus (kube-prometheus-stack's default).
DEFAULT_PROMETHEUS_URL = "http://prometheus-operated.monitoring.svc:9090"
SCRAPE_INTERVAL = "15s"  # KV-cache use moves within seconds; autoscaling windows are minutes
KEDA_POLLING_SECONDS = 15
# A rollout waits for the weights download plus the startup probe (pod.STARTUP_SECONDS) before
# Kubernetes may call it stuck.
PROGRESS_DEADLINE_SECONDS = 2 * 60 * 60
REVISION_HISTORY = 3
# Zero-downtime rollouts: the new pod is up before the old one goes (needs room for one more replica;
# without it the new pod waits in Pending while the old one keeps serving).
ROLLING_UPDATE = {"maxSurge": 1, "maxUnavailable": 0}


@dataclass(frozen=True)
class RenderOptions:
    """What the cluster offers and operator-wide settings: the inputs of rendering besides the spec."""

    service_monitors: bool = False  # the cluster serves monitoring.coreos.com/v1 (prometheus-operator)
    prometheus_url: str = DEFAULT_PROMETHEUS_URL  # for KEDA's prometheus trigger
    hf_endpoint: str | None = None  # a hub mirror for the download init container
    runtime_image: str = DEFAULT_IMAGE  # for specs that name none (the chart pins it by digest)


def selector_labels(name: str) -> dict[str, str]:
    return {"app.kubernetes.io/name": APP_NAME, "app.kubernetes.io/instance": name}


def common_labels(name: str) -> dict[str, str]:
    return {**selector_labels(name), "app.kubernetes.io/component": COMPONENT,
            "app.kubernetes.io/managed-by": MANAGED_BY}


def label_selector(name: str) -> str:
    """The pods' selector as a string, for the scale subresource (`status.selector`)."""
    return ",".join(f"{k}={v}" for k, v in selector_labels(name).items())


def desired_replicas(spec: LLMDeploymentSpec) -> int | None:
    """Replicas to write on the workload; None when an HPA or KEDA owns that field.

    In mode `operator`, `spec.replicas` (which the operator's autoscaler writes, autoscaler.py) clamped
    to the autoscaling bounds."""
    scaling = spec.autoscaling
    if not scaling.enabled:
        return spec.replicas
    if scaling.mode in ("hpa", "keda"):
        return None
    return min(max(spec.replicas, scaling.min_replicas), scaling.max_replicas)


def _metadata(deployment: LLMDeployment) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": deployment.metadata.name, "labels": common_labels(deployment.metadata.name)}
    if deployment.metadata.namespace:
        meta["namespace"] = deployment.metadata.namespace
    return meta


def _object(resource: Resource, deployment: LLMDeployment, spec: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": resource.api_version, "kind": resource.kind, "metadata": _metadata(deployment),
            "spec": spec}


def _template(deployment: LLMDeployment, pod: dict[str, Any], serves: bool = True) -> dict[str, Any]:
    metadata: dict[str, Any] = {"labels": common_labels(deployment.metadata.name)}
    if serves:  # a LeaderWorkerSet's workers serve no HTTP: nothing to scrape
        metadata["annotations"] = {"prometheus.io/scrape": "true", "prometheus.io/port": str(HTTP_PORT),
                                   "prometheus.io/path": METRICS_PATH}
    return {"metadata": metadata, "spec": pod}


def workload_resource(plan: Plan) -> Resource:
    """The kind that runs the pods: one node per replica, or a group of nodes (a LeaderWorkerSet)."""
    return LEADER_WORKER_SETS if plan.nodes > 1 else DEPLOYMENTS


def workload(deployment: LLMDeployment, plan: Plan, options: RenderOptions) -> dict[str, Any]:
    kind = workload_resource(plan).kind
    replicas = desired_replicas(deployment.spec)
    spec: dict[str, Any] = {} if replicas is None else {"replicas": replicas}
    if kind == "Deployment":
        pod = pod_spec(deployment, plan, "single", options.hf_endpoint, options.runtime_image)
        spec |= {"selector": {"matchLabels": selector_labels(deployment.metadata.name)},
                 "strategy": {"type": "RollingUpdate", "rollingUpdate": ROLLING_UPDATE},
                 "revisionHistoryLimit": REVISION_HISTORY, "progressDeadlineSeconds": PROGRESS_DEADLINE_SECONDS,
                 "template": _template(deployment, pod)}
    else:
        spec |= {"startupPolicy": "LeaderCreated", "leaderWorkerTemplate": {
            "size": plan.nodes,
            "restartPolicy": "RecreateGroupOnPodRestart",  # one lost node breaks the group's collectives
            "leaderTemplate": _template(deployment, pod_spec(deployment, plan, "leader", options.hf_endpoint,
                                                             options.runtime_image)),
            "workerTemplate": _template(deployment, pod_spec(deployment, plan, "worker", options.hf_endpoint,
                                                             options.runtime_image), serves=False),
        }}
    return _object(workload_resource(plan), deployment, spec)


def service(deployment: LLMDeployment, plan: Plan) -> dict[str, Any]:
    selector = selector_labels(deployment.metadata.name)
    if plan.nodes > 1:
        selector[LWS_WORKER_INDEX] = "0"  # only leaders serve HTTP
    port = {"name": PORT_NAME, "port": HTTP_PORT, "targetPort": PORT_NAME, "protocol": "TCP", "appProtocol": "http"}
    return _object(SERVICES, deployment, {"type": "ClusterIP", "selector": selector, "ports": [port]})


def disruption_budget(deployment: LLMDeployment) -> dict[str, Any]:
    # maxUnavailable, not minAvailable: with one replica, minAvailable 1 would block every node drain.
    return _object(DISRUPTION_BUDGETS, deployment, {
        "maxUnavailable": 1, "selector": {"matchLabels": selector_labels(deployment.metadata.name)},
        "unhealthyPodEvictionPolicy": "AlwaysAllow"})  # a crash-looping pod must not block drains


def _behavior(spec: LLMDeploymentSpec) -> dict[str, Any]:
    scaling = spec.autoscaling
    return {"scaleUp": {"stabilizationWindowSeconds": scaling.scale_up_stabilization_seconds},
            "scaleDown": {"stabilizationWindowSeconds": scaling.scale_down_stabilization_seconds}}


def _target_ref(deployment: LLMDeployment, plan: Plan) -> dict[str, str]:
    resource = workload_resource(plan)
    return {"apiVersion": resource.api_version, "kind": resource.kind, "name": deployment.metadata.name}


def horizontal_autoscaler(deployment: LLMDeployment, plan: Plan) -> dict[str, Any]:
    scaling = deployment.spec.autoscaling
    target = f"{round(scaling.target_kv_cache_utilization * 1000)}m"  # a quantity: 0.7 -> 700m
    metric = {"type": "Pods", "pods": {"metric": {"name": ADAPTER_KV_METRIC},
                                       "target": {"type": "AverageValue", "averageValue": target}}}
    return _object(HORIZONTAL_AUTOSCALERS, deployment, {
        "scaleTargetRef": _target_ref(deployment, plan), "minReplicas": max(1, scaling.min_replicas),
        "maxReplicas": scaling.max_replicas, "metrics": [metric], "behavior": _behavior(deployment.spec)})


def kv_usage_query(deployment: LLMDeployment) -> str:
    """PromQL summing the replicas' KV-cache use: KEDA divides it by the threshold to get replicas. The
    older name counts where the new one is absent (an engine that exports only it); `or` never adds the
    two, so pods that export both (ours) are counted once."""
    namespace = deployment.metadata.namespace or "default"
    labels = f'{{namespace="{namespace}",model_name="{deployment.spec.model.name}"}}'
    return f"sum({KV_METRIC}{labels}) or sum({KV_USAGE_METRIC_OLD}{labels})"


def scaled_object(deployment: LLMDeployment, plan: Plan, options: RenderOptions) -> dict[str, Any]:
    scaling = deployment.spec.autoscaling
    trigger = {"type": "prometheus", "metadata": {
        "serverAddress": options.prometheus_url, "query": kv_usage_query(deployment),
        "threshold": str(scaling.target_kv_cache_utilization)}}
    return _object(SCALED_OBJECTS, deployment, {
        "scaleTargetRef": _target_ref(deployment, plan), "minReplicaCount": scaling.min_replicas,
        "maxReplicaCount": scaling.max_replicas, "pollingInterval": KEDA_POLLING_SECONDS,
        "cooldownPeriod": scaling.scale_down_stabilization_seconds,
        "advanced": {"horizontalPodAutoscalerConfig": {"behavior": _behavior(deployment.spec)}},
        "triggers": [trigger]})


def service_monitor(deployment: LLMDeployment) -> dict[str, Any]:
    endpoint = {"port": PORT_NAME, "path": METRICS_PATH, "interval": SCRAPE_INTERVAL}
    return _object(SERVICE_MONITORS, deployment, {
        "selector": {"matchLabels": selector_labels(deployment.metadata.name)}, "endpoints": [endpoint]})


def render(deployment: LLMDeployment, plan: Plan, options: RenderOptions | None = None) -> list[dict[str, Any]]:
    """Every child the deployment should have, workload first."""
    options = options or RenderOptions()
    children = [workload(deployment, plan, options), service(deployment, plan), disruption_budget(deployment)]
    if options.service_monitors:
        children.append(service_monitor(deployment))
    scaling = deployment.spec.autoscaling
    if scaling.enabled and scaling.mode == "hpa":
        children.append(horizontal_autoscaler(deployment, plan))
    elif scaling.enabled and scaling.mode == "keda":
        children.append(scaled_object(deployment, plan, options))
    return children
