"""The kopf handlers, thin: read what kopf hands over, call `reconcile.py`, write status and Events.

`build_registry()` registers them on a fresh registry (no import-time side effects, one registry per
operator run, which is what the tests and the benchmark start several of):

- create / update (spec changes only) / resume / a resync timer -> `reconcile`;
- delete -> an Event; the children go with the owner (owner references), kopf drops its finalizer;
- events of every child kind (labelled managed-by kvpilot) -> `restore_child` puts drifted or
  deleted children back, and the workload's replica counts flow into the owner's status;
- a timer per LLMDeployment (`autoscale_seconds`) -> `autoscale`: the pods' KV-cache use into the
  status and, in autoscaling mode `operator`, replicas into `spec.replicas` (autoscaler.py);
- two in-memory indexes, fed by the same watches: the owners' specs (for child events) and the
  children by owner (so a reconcile compares with what exists instead of reading it again).
"""

from __future__ import annotations

import asyncio
import copy
from collections.abc import Mapping
from typing import Any

import kopf

from kvpilot.operator.autoscaler import (
    average_usage,
    measured_memory,
    metrics_url,
    scrape,
    unmeasured_message,
)
from kvpilot.operator.kube import ApiFault
from kvpilot.operator.reconcile import (
    ChildKey,
    Event,
    NotPlanned,
    OperatorContext,
    ReconcileOutcome,
    parse,
    reconcile,
    restore_child,
    sync_workload_status,
)
from kvpilot.operator.render import MANAGED_BY, desired_replicas, selector_labels
from kvpilot.operator.resources import CHILD_RESOURCES, LLMDEPLOYMENTS, PODS, WORKLOAD_KINDS

MANAGED = {"app.kubernetes.io/managed-by": MANAGED_BY}
# Backoff of a failed reconcile: 1, 2, 4 ... seconds, capped; kopf retries until it converges.
BACKOFF_FIRST_SECONDS = 1.0
BACKOFF_CAP_SECONDS = 300.0
# Index ids: handlers receive the indexes as keyword arguments of these names.
OWNERS_INDEX = "owners"
CHILDREN_INDEX = "children"
RESYNC_TIMER, AUTOSCALE_TIMER = "resync", "autoscale"
TIMER_IDS = (RESYNC_TIMER, AUTOSCALE_TIMER)
CHILD_HANDLER_IDS = tuple(f"child-{child.plural}" for child in CHILD_RESOURCES.values())


def backoff(retry: int) -> float:
    return min(BACKOFF_FIRST_SECONDS * 2 ** retry, BACKOFF_CAP_SECONDS)


def owner_name(body: Mapping[str, Any]) -> str | None:
    refs = body.get("metadata", {}).get("ownerReferences") or []
    return next((r["name"] for r in refs if r.get("kind") == LLMDEPLOYMENTS.kind and r.get("controller")), None)


def _snapshot(body: Mapping[str, Any]) -> dict[str, Any]:
    """A plain copy of what the handlers read later (kopf reuses its body views between events)."""
    return copy.deepcopy({k: body[k] for k in ("apiVersion", "kind", "metadata", "spec", "status") if k in body})


def index_owner(body: kopf.Body, name: str, namespace: str, **_: Any) -> dict[tuple[str, str], dict[str, Any]]:
    return {(namespace, name): _snapshot(body)}


def index_child(body: kopf.Body, namespace: str, **_: Any) -> dict[tuple[str, str], dict[str, Any]] | None:
    owner = owner_name(body)
    return {(namespace, owner): _snapshot(body)} if owner else None


def _post(body: Mapping[str, Any], events: list[Event], logger: kopf.Logger) -> None:
    """Each decision once: as a Kubernetes Event on the LLMDeployment and as one log line."""
    for event in events:
        kopf.event(body, type=event.type, reason=event.reason, message=event.message)  # type: ignore[arg-type]
        log = logger.info if event.type == "Normal" else logger.warning
        log(f"{event.reason}: {event.message}")


def _live(children: kopf.Index, namespace: str, name: str) -> dict[ChildKey, Mapping[str, Any]]:
    return {(c["kind"], c["metadata"]["name"]): c for c in children.get((namespace, name), [])}


def _run(body: kopf.Body, namespace: str, name: str, children: kopf.Index, patch: kopf.Patch,
         memo: kopf.Memo, retry: int, logger: kopf.Logger) -> ReconcileOutcome:
    metrics = memo.operator.metrics
    try:
        with metrics.reconcile_seconds.time():
            outcome = reconcile(body, _live(children, namespace, name), memo.operator)
    except ApiFault as err:
        metrics.reconciles.labels(result="api_error").inc()
        kopf.warn(body, reason="ApiError", message=str(err))
        raise kopf.TemporaryError(str(err), delay=backoff(retry) if err.retryable else BACKOFF_CAP_SECONDS) from err
    planned = outcome.failure is None
    metrics.reconciles.labels(result="planned" if planned else "not_planned").inc()
    metrics.seen(namespace, name, planned)
    for key, value in outcome.status.items():
        patch.status[key] = value
    _post(body, outcome.events, logger)
    return outcome


def on_reconcile(body: kopf.Body, name: str, namespace: str, retry: int, patch: kopf.Patch, memo: kopf.Memo,
                 children: kopf.Index, logger: kopf.Logger, **_: Any) -> None:
    failure = _run(body, namespace, name, children, patch, memo, retry, logger).failure
    if failure is None:
        return
    if failure.retryable:
        raise kopf.TemporaryError(failure.message, delay=backoff(retry))
    raise kopf.PermanentError(failure.message)  # until the spec changes; status says why


def on_resync(body: kopf.Body, name: str, namespace: str, patch: kopf.Patch, memo: kopf.Memo,
              children: kopf.Index, logger: kopf.Logger, **_: Any) -> None:
    # A failure is already in the status and its Event went out once; the create/update handler owns
    # the retries. Nothing is logged per tick.
    _run(body, namespace, name, children, patch, memo, 0, logger)


async def on_autoscale(body: kopf.Body, name: str, namespace: str, patch: kopf.Patch, memo: kopf.Memo,
                       logger: kopf.Logger, **_: Any) -> None:
    op: OperatorContext = memo.operator
    try:
        spec = parse(body).spec
        pods = await asyncio.to_thread(op.kube.list, PODS, namespace, selector_labels(name))
    except NotPlanned:
        return  # the reconcile reports the spec
    except ApiFault as err:
        logger.warning(f"pods not listed: {err}; the next tick tries again")
        return
    scraped = await scrape({pod["metadata"]["name"]: url for pod in pods if (url := metrics_url(pod))})
    if op.autoscaler.newly_unmeasured((namespace, name), scraped.unmeasured):
        _post(body, [Event("Warning", "NoKVCacheMetric", unmeasured_message(scraped.unmeasured))], logger)
    loads = scraped.loads
    usage = average_usage(loads)
    measured = None if usage is None else round(usage, 3)
    status = body.get("status")
    status = status if isinstance(status, Mapping) else {}
    if status.get("kvCacheUtilization") != measured:
        patch.status["kvCacheUtilization"] = measured
    memory = measured_memory(loads)
    if status.get("measuredMemory") != memory:
        patch.status["measuredMemory"] = memory
    scaling = spec.autoscaling
    if not (scaling.enabled and scaling.mode == "operator" and loads):
        op.autoscaler.reset_windows((namespace, name))
        return
    current = desired_replicas(spec)
    decision = op.autoscaler.decide((namespace, name), current, loads, scaling)
    if decision.replicas == current:
        return
    patch.spec["replicas"] = decision.replicas  # what `kubectl scale` writes; the reconcile carries it on
    direction = "up" if decision.replicas > current else "down"
    op.metrics.scale_decisions.labels(direction=direction).inc()
    _post(body, [Event("Normal", f"Scaled{direction.capitalize()}",
                       decision.message(current, scaling.target_kv_cache_utilization))], logger)


def on_delete(body: kopf.Body, name: str, namespace: str, memo: kopf.Memo, logger: kopf.Logger, **_: Any) -> None:
    memo.operator.metrics.forget(namespace, name)
    memo.operator.autoscaler.forget((namespace, name))
    kopf.info(body, reason="Deleting", message="its children are owned by it and go with it")
    logger.info("deleted; children follow by owner reference")


def on_child_event(type: str | None, body: kopf.Body, namespace: str, memo: kopf.Memo, owners: kopf.Index,
                   logger: kopf.Logger, **_: Any) -> None:
    owner_key = (namespace, owner_name(body))
    owner = next(iter(owners.get(owner_key, [])), None)
    if owner is None or owner["metadata"].get("deletionTimestamp"):
        return
    op: OperatorContext = memo.operator
    try:
        events, child = restore_child(owner, body, type == "DELETED", op)
        if child is not None and body["kind"] in WORKLOAD_KINDS:
            sync_workload_status(namespace, owner_key[1], child, op)
    except ApiFault as err:  # event handlers are not retried: the resync timer is the net
        logger.warning(f"{body['kind']} {body['metadata']['name']}: {err}; the resync retries it")
        return
    _post(owner, events, logger)


def build_registry(resync_seconds: float, autoscale_seconds: float) -> kopf.OperatorRegistry:
    registry = kopf.OperatorRegistry()
    owners = (LLMDEPLOYMENTS.group, LLMDEPLOYMENTS.version, LLMDEPLOYMENTS.plural)
    kopf.index(*owners, id=OWNERS_INDEX, registry=registry)(index_owner)
    kopf.on.create(*owners, id="create", registry=registry)(on_reconcile)
    kopf.on.update(*owners, id="update", field="spec", registry=registry)(on_reconcile)
    kopf.on.resume(*owners, id="resume", registry=registry)(on_reconcile)
    kopf.on.delete(*owners, id="delete", registry=registry)(on_delete)
    kopf.timer(*owners, id=RESYNC_TIMER, interval=resync_seconds, initial_delay=resync_seconds,
               registry=registry)(on_resync)
    kopf.timer(*owners, id=AUTOSCALE_TIMER, interval=autoscale_seconds, registry=registry)(on_autoscale)
    for child, handler_id in zip(CHILD_RESOURCES.values(), CHILD_HANDLER_IDS, strict=True):
        what = (child.group, child.version, child.plural)
        kopf.index(*what, id=CHILDREN_INDEX, labels=MANAGED, registry=registry)(index_child)
        kopf.on.event(*what, id=handler_id, labels=MANAGED, registry=registry)(on_child_event)
    return registry
