"""One reconcile: read the spec, plan, render, apply, and say what the status should become.

No kopf handler logic here beyond `kopf.adopt`: the handlers (`handlers.py`) turn the outcome into a
status patch, Kubernetes Events and kopf's retry exceptions.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import kopf
from pydantic import ValidationError

from kvpilot.operator.autoscaler import Autoscaler
from kvpilot.operator.fit_advice import advice
from kvpilot.operator.hub import DEFAULT_ENDPOINT, Hub, HubError
from kvpilot.operator.kube import ApiFault, Kube
from kvpilot.operator.metrics import OperatorMetrics
from kvpilot.operator.planning import plan_deployment
from kvpilot.operator.pod import NoWeights
from kvpilot.operator.render import DEFAULT_PROMETHEUS_URL, RenderOptions, label_selector, render
from kvpilot.operator.resources import (
    CHILD_RESOURCES,
    LEADER_WORKER_SETS,
    LLMDEPLOYMENTS,
    SCALED_OBJECTS,
    SERVICE_MONITORS,
    WORKLOAD_KINDS,
)
from kvpilot.operator.spec import DEFAULT_IMAGE, LLMDeployment, describe_errors
from kvpilot.operator.status import Condition, plan_status, read_workload, status_patch
from kvpilot.runtime.memory.devices import UnknownDevice
from kvpilot.runtime.memory.facts import UnknownModel
from kvpilot.runtime.memory.planner import NoFit, Plan, PlanError
from kvpilot.runtime.memory.support import UnsupportedOption

STATUS_WRITE_ATTEMPTS = 3  # optimistic-concurrency retries of one status write
# What to do when the cluster lacks the API a child needs, and how the user gets there.
REQUIRED_APIS = {
    LEADER_WORKER_SETS.api_version: "install LeaderWorkerSet (https://lws.sigs.k8s.io), or set "
                                    "gpu.maxPerReplica to at most gpu.perNode to keep each replica on one node",
    SCALED_OBJECTS.api_version: "install KEDA (https://keda.sh), or set autoscaling.mode to hpa or operator",
}

ChildKey = tuple[str, str]  # (kind, name)


@dataclass
class OperatorContext:
    """What every handler needs, made once at start-up and carried in kopf's memo."""

    kube: Kube
    hub: Hub
    prometheus_url: str = DEFAULT_PROMETHEUS_URL
    runtime_image: str = DEFAULT_IMAGE
    metrics: OperatorMetrics = field(default_factory=OperatorMetrics)
    autoscaler: Autoscaler = field(default_factory=Autoscaler)

    def render_options(self) -> RenderOptions:
        mirror = self.hub.endpoint if self.hub.endpoint != DEFAULT_ENDPOINT else None
        return RenderOptions(service_monitors=self.kube.serves(SERVICE_MONITORS.api_version),
                             prometheus_url=self.prometheus_url, hf_endpoint=mirror,
                             runtime_image=self.runtime_image)


class NotPlanned(Exception):
    """The spec cannot be put into action now: why (a CamelCase reason), for people, and whether a later
    try may succeed without a spec change (the hub was down, an API was not installed yet)."""

    def __init__(self, reason: str, message: str, retryable: bool = False) -> None:
        super().__init__(message)
        self.reason, self.message, self.retryable = reason, message, retryable


@dataclass(frozen=True)
class Event:
    type: Literal["Normal", "Warning"]
    reason: str
    message: str


@dataclass
class ReconcileOutcome:
    status: dict[str, Any]  # status keys to write (only those that change)
    events: list[Event] = field(default_factory=list)
    failure: NotPlanned | None = None


def parse(body: Mapping[str, Any]) -> LLMDeployment:
    """The object as an LLMDeployment, or NotPlanned("InvalidSpec") naming what is wrong. Anything may
    reach the operator (a cluster without the CRD's validation, an object of an older version): a
    missing or malformed part is a message, never a traceback."""
    try:
        return LLMDeployment.model_validate({k: body[k] for k in ("apiVersion", "kind", "metadata", "spec")
                                             if k in body})
    except ValidationError as err:
        raise NotPlanned("InvalidSpec", describe_errors(err)) from None


def plan_for(deployment: LLMDeployment, op: OperatorContext) -> Plan:
    """The plan, or NotPlanned with a message that says what to change."""
    spec, namespace = deployment.spec, deployment.metadata.namespace or "default"
    facts = None
    try:
        try:
            return plan_deployment(spec)
        except UnknownModel:
            if not spec.model.source.startswith("hf://") or spec.model.architecture:
                raise
        found = op.hub.cached(spec.model.source, spec.model.revision)
        if found is None:  # read the token only when the hub must be asked
            token = (op.kube.secret_value(namespace, spec.model.token_secret, "HF_TOKEN")
                     if spec.model.token_secret else None)
            found = op.hub.model(spec.model.source, spec.model.revision, token)
        facts = found.facts
        return plan_deployment(spec, facts=facts)
    except HubError as err:
        raise NotPlanned("ModelFactsUnavailable", str(err), err.retryable) from None
    except UnknownModel as err:
        raise NotPlanned("UnknownModel", str(err)) from None
    except UnknownDevice as err:
        raise NotPlanned("UnknownGPU", str(err)) from None
    except NoFit as err:
        raise NotPlanned("DoesNotFit", f"{err}. {advice(spec, facts)}") from None
    except PlanError as err:
        raise NotPlanned("CannotPlan", str(err)) from None
    except UnsupportedOption as err:  # e.g. a pre-quantized checkpoint the pods' loader would refuse
        raise NotPlanned("Unsupported", str(err)) from None


def describe(plan: Plan) -> str:
    where = "CPU pods" if plan.device_kind == "cpu" else f"{plan.gpus_per_replica} x {plan.device}"
    nodes = f" across {plan.nodes} nodes" if plan.nodes > 1 else ""
    return (f"{plan.quantization} weights + {plan.kv_dtype} KV cache on {where}{nodes} per replica; "
            f"{plan.num_kv_blocks} KV blocks = {plan.kv_capacity_tokens} tokens "
            f"({plan.kv_capacity_sequences} sequences of {plan.max_model_len})")


def desired_children(body: Mapping[str, Any], deployment: LLMDeployment, plan: Plan,
                     options: RenderOptions) -> dict[ChildKey, dict[str, Any]]:
    try:
        children = render(deployment, plan, options)
    except NoWeights as err:
        raise NotPlanned("NoWeights", str(err)) from None
    kopf.adopt(children, owner=body)  # type: ignore[arg-type]  # owner refs: deletion cascades
    return {(c["kind"], c["metadata"]["name"]): c for c in children}


def check_apis(children: Iterable[Mapping[str, Any]], kube: Kube) -> None:
    for child in children:
        api = child["apiVersion"]
        if api in REQUIRED_APIS and not kube.serves(api):
            raise NotPlanned("MissingAPI", f"{child['kind']} ({api}) is needed but this cluster does not serve "
                             f"it: {REQUIRED_APIS[api]}", retryable=True)


def _planned_event(previous: Mapping[str, Any], planned: Condition) -> list[Event]:
    """One Event per change of the verdict, not one per retry."""
    old = next((c for c in previous.get("conditions") or [] if c.get("type") == "Planned"), {})
    if (old.get("status"), old.get("message")) == (planned.status, planned.message):
        return []
    return [Event("Normal" if planned.status == "True" else "Warning", planned.reason, planned.message)]


def reconcile(body: Mapping[str, Any], live: Mapping[ChildKey, Mapping[str, Any]],
              op: OperatorContext) -> ReconcileOutcome:
    """Bring the children to what the spec asks for. `live`: the children the watch has seen."""
    meta, previous = body["metadata"], body.get("status")
    previous = previous if isinstance(previous, Mapping) else {}
    selector, generation = label_selector(meta["name"]), meta.get("generation")
    workload = next((obj for (kind, _), obj in live.items() if kind in WORKLOAD_KINDS), None)
    try:
        deployment = parse(body)
        plan = plan_for(deployment, op)
        desired = desired_children(body, deployment, plan, op.render_options())
        check_apis(desired.values(), op.kube)
    except NotPlanned as failure:
        planned = Condition(type="Planned", status="False", reason=failure.reason, message=failure.message)
        status = status_patch(previous, workload=read_workload(workload), selector=selector, planned=planned,
                              generation=generation)
        return ReconcileOutcome(status, _planned_event(previous, planned), failure)

    changes = []
    for key, child in desired.items():
        action, obj = op.kube.apply(child, live.get(key))
        if action != "unchanged":
            changes.append(f"{action} {key[0]} {key[1]}")
            op.metrics.child_changes.labels(kind=key[0], action=action).inc()
        if key[0] in WORKLOAD_KINDS:
            workload = obj
    for key, obj in live.items():
        if key not in desired and _owned_by(obj, meta.get("uid")):
            op.kube.delete(CHILD_RESOURCES[key[0]], meta["namespace"], key[1])
            changes.append(f"deleted {key[0]} {key[1]}")
            op.metrics.child_changes.labels(kind=key[0], action="deleted").inc()

    planned = Condition(type="Planned", status="True", reason="Planned", message=describe(plan))
    status = status_patch(previous, workload=read_workload(workload), selector=selector, planned=planned,
                          plan=plan_status(plan), generation=generation)
    events = _planned_event(previous, planned)
    if changes:
        events.append(Event("Normal", "ChildrenApplied", "; ".join(changes)))
    return ReconcileOutcome(status, events)


def _owned_by(obj: Mapping[str, Any], uid: str | None) -> bool:
    refs = obj.get("metadata", {}).get("ownerReferences") or []
    return any(ref.get("kind") == "LLMDeployment" and ref.get("uid") == uid for ref in refs)


def restore_child(owner: Mapping[str, Any], child: Mapping[str, Any], deleted: bool,
                  op: OperatorContext) -> tuple[list[Event], Mapping[str, Any] | None]:
    """A child changed or went away: put it back if it drifted from the spec. Returns the Events and the
    child as the cluster now holds it (None when it is not wanted: the owner's reconcile prunes it).

    A spec the reconciler has not applied yet (its generation is not the status' observedGeneration:
    edited while the operator was down, or a moment ago) is no drift: the owner's own reconcile
    applies it, once. The owner index can lag the reconcile's own status write by a moment (a child
    deleted right after creation): a pending-looking owner is read again before it is believed."""
    if pending_spec_change(owner):
        meta = owner["metadata"]
        owner = op.kube.get(LLMDEPLOYMENTS, meta.get("namespace") or child["metadata"]["namespace"], meta["name"])
        if owner is None or pending_spec_change(owner):
            return [], None
    try:
        deployment = parse(owner)
        desired = desired_children(owner, deployment, plan_for(deployment, op), op.render_options())
    except NotPlanned:
        return [], None  # the owner's own reconcile reports it; its children stay as they are
    key = (child["kind"], child["metadata"]["name"])
    if key not in desired:
        return [], None
    action, obj = op.kube.apply(desired[key], None if deleted else child)
    if action == "unchanged":
        return [], obj
    op.metrics.drift_restored.labels(kind=key[0]).inc()
    how = "deleted" if deleted else "changed"
    return [Event("Normal", "DriftRestored", f"{key[0]} {key[1]} was {how} outside the operator: {action} "
                                             "it from the spec")], obj


def pending_spec_change(owner: Mapping[str, Any]) -> bool:
    generation = (owner.get("metadata") or {}).get("generation")
    status = owner.get("status")
    observed = status.get("observedGeneration") if isinstance(status, Mapping) else None
    return generation is not None and generation != observed


def sync_workload_status(namespace: str, name: str, workload: Mapping[str, Any], op: OperatorContext) -> None:
    """Copy a workload's replica counts and availability to its owner's status.

    Reads the owner fresh and writes with its resourceVersion (a 409 means someone wrote in between:
    read again), so the Planned condition the reconciler wrote is never replaced by an older copy.
    An owner not reconciled yet (no Planned condition) is left to the reconciler."""
    for _ in range(STATUS_WRITE_ATTEMPTS):
        owner = op.kube.get(LLMDEPLOYMENTS, namespace, name)
        previous = (owner or {}).get("status") or {}
        if not any(c.get("type") == "Planned" for c in previous.get("conditions") or []):
            return
        status = status_patch(previous, workload=read_workload(workload), selector=label_selector(name))
        if not status:
            return
        body: dict[str, Any] = {"status": status}
        if version := owner.get("metadata", {}).get("resourceVersion"):
            body["metadata"] = {"resourceVersion": version}
        try:
            op.kube.patch(LLMDEPLOYMENTS, namespace, name, body, subresource="status")
            return
        except ApiFault as err:
            if err.status != 409:
                raise
    raise ApiFault(f"status of {namespace}/{name}: still conflicting after {STATUS_WRITE_ATTEMPTS} tries",
                   409, retryable=True)
