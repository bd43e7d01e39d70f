"""The operator's own Prometheus metrics, served on `kvpilot operator --metrics-port` (the chart's metrics
Service and ServiceMonitor scrape it).

One registry per `Operator` (not prometheus_client's global one), so several operators in one process
(the tests, the benchmark) count apart.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# Reconciles take milliseconds unless the hub or the API server is slow.
RECONCILE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


@dataclass
class OperatorMetrics:
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        r = self.registry
        self.reconciles = Counter(
            "kvpilot_operator_reconciles", "Reconciles of LLMDeployments by result: planned, not_planned "
            "(the spec cannot be put into action; the status says why) or api_error.", ["result"], registry=r)
        self.reconcile_seconds = Histogram(
            "kvpilot_operator_reconcile_duration_seconds", "Time of one reconcile, API calls included.",
            buckets=RECONCILE_BUCKETS, registry=r)
        self.child_changes = Counter(
            "kvpilot_operator_child_changes", "Children the operator created, updated or deleted, by kind.",
            ["kind", "action"], registry=r)
        self.drift_restored = Counter(
            "kvpilot_operator_drift_restored", "Children changed or deleted outside the operator and put back.",
            ["kind"], registry=r)
        self.scale_decisions = Counter(
            "kvpilot_operator_scale_decisions", "Replica changes the operator's autoscaler made, by direction.",
            ["direction"], registry=r)
        self.deployments = Gauge(
            "kvpilot_operator_llmdeployments", "LLMDeployments this operator handles, by whether they are "
            "planned.", ["planned"], registry=r)
        self._planned: dict[tuple[str, str], bool] = {}

    def seen(self, namespace: str, name: str, planned: bool) -> None:
        self._planned[namespace, name] = planned
        self._count()

    def forget(self, namespace: str, name: str) -> None:
        self._planned.pop((namespace, name), None)
        self._count()

    def _count(self) -> None:
        planned = sum(self._planned.values())
        self.deployments.labels(planned="true").set(planned)
        self.deployments.labels(planned="false").set(len(self._planned) - planned)
