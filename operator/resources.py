"""The Kubernetes kinds the operator reads and writes, each API version named once.

Pure data (no client): rendering, the reconciler, the client and the tests' emulator all read the
API versions and plurals from here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from kvpilot.operator.spec import API_GROUP, API_VERSION, KIND


@dataclass(frozen=True)
class Resource:
    api_version: str
    kind: str
    plural: str

    @property
    def group(self) -> str:
        return self.api_version.rpartition("/")[0]

    @property
    def version(self) -> str:
        return self.api_version.rpartition("/")[2]

    def path(self, namespace: str, name: str | None = None, subresource: str | None = None) -> str:
        base = "/api/v1" if self.api_version == "v1" else f"/apis/{self.api_version}"
        path = f"{base}/namespaces/{namespace}/{self.plural}"
        return "/".join(p for p in (path, name, subresource) if p)


LLMDEPLOYMENTS = Resource(f"{API_GROUP}/{API_VERSION}", KIND, "llmdeployments")
SECRETS = Resource("v1", "Secret", "secrets")
PODS = Resource("v1", "Pod", "pods")  # read only: the serving pods' addresses, for their metrics

DEPLOYMENTS = Resource("apps/v1", "Deployment", "deployments")
LEADER_WORKER_SETS = Resource("leaderworkerset.x-k8s.io/v1", "LeaderWorkerSet", "leaderworkersets")
SERVICES = Resource("v1", "Service", "services")
DISRUPTION_BUDGETS = Resource("policy/v1", "PodDisruptionBudget", "poddisruptionbudgets")
HORIZONTAL_AUTOSCALERS = Resource("autoscaling/v2", "HorizontalPodAutoscaler", "horizontalpodautoscalers")
SCALED_OBJECTS = Resource("keda.sh/v1alpha1", "ScaledObject", "scaledobjects")
SERVICE_MONITORS = Resource("monitoring.coreos.com/v1", "ServiceMonitor", "servicemonitors")

# Every kind the operator may create for an LLMDeployment (it watches and prunes exactly these).
CHILD_RESOURCES = {r.kind: r for r in (DEPLOYMENTS, LEADER_WORKER_SETS, SERVICES, DISRUPTION_BUDGETS,
                                       HORIZONTAL_AUTOSCALERS, SCALED_OBJECTS, SERVICE_MONITORS)}
WORKLOAD_KINDS = (DEPLOYMENTS.kind, LEADER_WORKER_SETS.kind)


def resource_of(obj: Mapping[str, Any]) -> Resource:
    resource = CHILD_RESOURCES.get(obj["kind"]) if obj["kind"] != LLMDEPLOYMENTS.kind else LLMDEPLOYMENTS
    if resource is None or resource.api_version != obj["apiVersion"]:
        raise ValueError(f"{obj['apiVersion']} {obj['kind']} is not a kind the operator manages")
    return resource
