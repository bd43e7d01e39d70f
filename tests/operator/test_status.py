"""status.py: workload state -> conditions and phase, as tables; only changed keys are written."""

from __future__ import annotations

import pytest

from kvpilot.operator.planning import plan_deployment
from kvpilot.operator.spec import parse_spec
from kvpilot.operator.status import (
    Condition,
    Workload,
    availability,
    merge_conditions,
    phase,
    plan_status,
    read_workload,
    status_patch,
)

PLANNED = Condition(type="Planned", status="True", reason="Planned", message="bf16 on 1 x h100")
NOT_PLANNED = Condition(type="Planned", status="False", reason="DoesNotFit", message="too big")


def deployment_obj(replicas=2, ready=0, updated=0, conditions=()) -> dict:
    return {"kind": "Deployment", "spec": {"replicas": replicas},
            "status": {"replicas": max(ready, updated), "readyReplicas": ready, "updatedReplicas": updated,
                       "conditions": list(conditions)}}


@pytest.mark.parametrize(("workload", "available", "progressing", "degraded", "expected_phase"), [
    (None, "NoWorkload", "NoWorkload", "NoWorkload", "Pending"),
    (Workload(desired=2, replicas=0, ready=0, updated=0), "NoReplicasReady", "RollingOut", "AsExpected", "Pending"),
    (Workload(desired=2, replicas=2, ready=1, updated=2), "SomeReplicasReady", "Starting", "AsExpected",
     "Progressing"),
    (Workload(desired=2, replicas=2, ready=2, updated=2), "AllReplicasReady", "Complete", "AsExpected", "Ready"),
    (Workload(desired=2, replicas=3, ready=2, updated=1), "AllReplicasReady", "RollingOut", "AsExpected",
     "Progressing"),
    (Workload(desired=0, replicas=0, ready=0, updated=0), "ScaledToZero", "Complete", "AsExpected", "ScaledToZero"),
    (Workload(desired=1, replicas=1, ready=0, updated=1, failure="stuck"), "NoReplicasReady", "Starting",
     "WorkloadFailing", "Degraded"),
])
def test_availability_and_phase(workload, available, progressing, degraded, expected_phase):
    conditions = {c.type: c for c in availability(workload)} | {"Planned": PLANNED}
    assert [conditions[t].reason for t in ("Available", "Progressing", "Degraded")] == [available, progressing,
                                                                                         degraded]
    assert phase(conditions, workload) == expected_phase
    assert phase(conditions | {"Planned": NOT_PLANNED}, workload) == "Failed"


@pytest.mark.parametrize(("conditions", "failure"), [
    ([], None),
    ([{"type": "Progressing", "status": "True", "reason": "NewReplicaSetAvailable"}], None),
    ([{"type": "Progressing", "status": "False", "reason": "ProgressDeadlineExceeded", "message": "too slow"}],
     "Deployment Progressing: too slow"),
    ([{"type": "ReplicaFailure", "status": "True", "reason": "FailedCreate", "message": "quota"}],
     "Deployment ReplicaFailure: quota"),
])
def test_read_workload_spots_stuck_rollouts(conditions, failure):
    w = read_workload(deployment_obj(replicas=3, ready=1, updated=2, conditions=conditions))
    assert (w.desired, w.ready, w.updated, w.failure) == (3, 1, 2, failure)


def test_read_workload_defaults():
    assert read_workload(None) is None
    assert read_workload({"kind": "Deployment", "spec": {}}) == Workload(desired=1, replicas=0, ready=0, updated=0)


def test_transition_time_moves_only_when_status_flips():
    old = [{"type": "Available", "status": "False", "reason": "NoReplicasReady", "lastTransitionTime": "T0"}]
    same = merge_conditions(old, [Condition(type="Available", status="False", reason="NoReplicasReady")], "T1")
    flipped = merge_conditions(old, [Condition(type="Available", status="True", reason="AllReplicasReady")], "T1")
    assert same[0]["lastTransitionTime"] == "T0" and flipped[0]["lastTransitionTime"] == "T1"


def test_status_patch_holds_only_what_changes():
    plan = plan_status(plan_deployment(parse_spec({"model": {"source": "llama-3.1-8b"}, "gpu": {"type": "h100"}})))
    first = status_patch({}, workload=None, selector="a=b", planned=PLANNED, plan=plan, generation=3, at="T0")
    assert first["plan"]["kvBlocks"] > 0 and first["observedGeneration"] == 3 and first["phase"] == "Pending"
    assert [c["type"] for c in first["conditions"]] == ["Planned", "Available", "Progressing", "Degraded"]
    again = status_patch(first, workload=None, selector="a=b", planned=PLANNED, plan=plan, generation=3, at="T1")
    assert again == {}
    ready = Workload(desired=1, replicas=1, ready=1, updated=1)
    watched = status_patch(first, workload=ready, selector="a=b", at="T2")  # the workload watch: no plan news
    assert watched["phase"] == "Ready" and watched["readyReplicas"] == 1 and "plan" not in watched
    assert watched["conditions"][0] == first["conditions"][0]  # Planned kept as the reconciler wrote it


def test_plan_status_bytes_and_gpus():
    spec = parse_spec({"model": {"source": "llama-3.1-70b"}, "gpu": {"type": "h100-80gb"},
                       "serving": {"maxContextLength": 32768, "concurrency": 16}})
    plan = plan_deployment(spec)
    summary = plan_status(plan).model_dump(by_alias=True)
    assert summary["gpus"] == plan.tensor_parallel == summary["tensorParallel"]
    assert summary["kvCapacityTokens"] == plan.num_kv_blocks * plan.block_size
    assert summary["perGpuBytes"]["weights"] == plan.memory.weights
    per_gpu = summary["perGpuBytes"]
    assert per_gpu["rotaryTables"] == plan.memory.rotary_tables > 0 and per_gpu["margin"] == plan.memory.margin > 0
    assert sum(per_gpu[part] for part in ("weights", "kvCache", "activations", "overhead", "rotaryTables",
                                          "margin")) == per_gpu["usable"] - plan.memory.headroom
