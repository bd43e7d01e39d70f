"""Server-side apply: the operator's side (kube.py: when to skip a call) and the emulator's field-manager
merge (tests/server_side_apply.py), as tables, then the two over HTTP."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio
import server_side_apply as ssa
from kube_emulator import Emulated, emulated_cluster

from kvpilot.operator.kube import APPLIED_DIGEST, FIELD_MANAGER, contains, with_digest


@pytest.mark.parametrize(("desired", "live", "held"), [
    ({"a": 1}, {"a": 1, "b": 2}, True),  # the server adds fields: still held
    ({"a": 1}, {"a": 2}, False),
    ({"a": {"b": 1}}, {"a": {"b": 1, "c": 0}}, True),
    ({"a": {"b": 1}}, {}, False),
    ({"a": {}}, {}, True),  # empty values are dropped by the API server
    ({"a": []}, {}, True),
    ({"a": [{"x": 1}]}, {"a": [{"x": 1, "defaulted": True}]}, True),
    ({"a": [{"x": 1}]}, {"a": [{"x": 1}, {"x": 2}]}, False),
    ({"a": [1, 2]}, {"a": [2, 1]}, False),
    ({"a": "1"}, {"a": 1}, False),
    ({"a": {"b": 1}}, {"a": "scalar"}, False),
])
def test_contains(desired, live, held):
    assert contains(desired, live) is held


def test_the_digest_sees_a_field_the_operator_stopped_rendering():
    before = with_digest({"kind": "Service", "metadata": {"name": "x"}, "spec": {"a": 1, "b": 2}})
    after = with_digest({"kind": "Service", "metadata": {"name": "x"}, "spec": {"a": 1}})
    assert contains({"spec": {"a": 1}}, before)  # containment alone would skip the apply
    assert not contains(after, before)
    assert with_digest(before) == before  # stable
    assert before["metadata"]["annotations"][APPLIED_DIGEST] != after["metadata"]["annotations"][APPLIED_DIGEST]


# --- the emulator's merge ---------------------------------------------------------------------------

def deployment(**spec) -> dict:
    return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "d"}, "spec": spec}


def containers(*items: dict) -> dict:
    return {"template": {"spec": {"containers": list(items)}}}


def test_fields_are_paths_and_keyed_list_items_are_keys():
    obj = {"spec": {"replicas": 2, "containers": [{"name": "a", "args": ["x"], "ports": [{"containerPort": 80}]}]}}
    assert ssa.field_set(obj) == {
        ("f:spec", "f:replicas"),
        ("f:spec", "f:containers", 'k:{"name":"a"}', "f:name"),
        ("f:spec", "f:containers", 'k:{"name":"a"}', "f:args"),  # atomic: a list of scalars
        ("f:spec", "f:containers", 'k:{"name":"a"}', "f:ports", 'k:{"containerPort":80}', "f:containerPort"),
    }


def test_an_apply_removes_what_its_manager_stopped_applying_and_keeps_others_fields():
    live = ssa.apply(None, deployment(replicas=2, paused=False), "op", force=False)
    live = ssa.apply(live, deployment(replicas=3, progressDeadlineSeconds=5), "hpa", force=True)  # takes replicas
    assert live["spec"] == {"replicas": 3, "paused": False, "progressDeadlineSeconds": 5}
    live = ssa.apply(live, deployment(), "op", force=False)  # op applies nothing now
    assert live["spec"] == {"replicas": 3, "progressDeadlineSeconds": 5}  # paused gone; hpa's fields stay
    managers = {entry["manager"]: entry for entry in live["metadata"]["managedFields"]}
    assert managers["hpa"]["fieldsV1"] == {"f:spec": {"f:replicas": {}, "f:progressDeadlineSeconds": {}}}


def test_a_conflict_is_409_unless_forced():
    live = ssa.apply(None, deployment(replicas=2), "op", force=False)
    with pytest.raises(ssa.Conflict, match=r"spec\.replicas is owned by op"):
        ssa.apply(live, deployment(replicas=3), "hpa", force=False)
    assert ssa.apply(live, deployment(replicas=2), "hpa", force=False)["spec"]["replicas"] == 2  # same value: shared


def test_keyed_lists_merge_by_key_and_lose_only_their_own_items():
    runtime = {"name": "runtime", "image": "a", "env": [{"name": "X", "value": "1"}]}
    live = ssa.apply(None, deployment(**containers(runtime)), "op", force=False)
    sidecar = deployment(**containers({"name": "proxy", "image": "p"}))
    live = ssa.apply(live, sidecar, "webhook", force=False)
    names = [c["name"] for c in live["spec"]["template"]["spec"]["containers"]]
    assert names == ["runtime", "proxy"]
    live = ssa.apply(live, deployment(**containers({"name": "runtime", "image": "b"})), "op", force=False)
    assert live["spec"]["template"]["spec"]["containers"] == [{"name": "runtime", "image": "b"},
                                                              {"name": "proxy", "image": "p"}]  # env X gone


def test_an_update_takes_the_fields_it_changes():
    live = ssa.apply(None, deployment(replicas=2, paused=False), "op", force=False)
    after = ssa.merge_patch(live, {"spec": {"replicas": 7}})
    after["metadata"]["managedFields"] = ssa.record_update(live, after, "kubectl-edit")
    owners = {(e["manager"], e["operation"]): e["fieldsV1"] for e in after["metadata"]["managedFields"]}
    assert owners[("kubectl-edit", "Update")] == {"f:spec": {"f:replicas": {}}}
    assert owners[("op", "Apply")] == {"f:spec": {"f:paused": {}}}
    restored = ssa.apply(after, deployment(replicas=2, paused=False), "op", force=True)
    assert restored["spec"]["replicas"] == 2


@pytest.mark.parametrize(("before", "after"), [
    ({"a": 1, "b": {"c": 1, "d": 2}}, {"a": 1, "b": {"c": 1}}),
    ({"a": [1, 2]}, {"a": [1]}),
    ({}, {"x": {}}),
])
def test_diff_patch_round_trips(before, after):
    assert ssa.merge_patch(before, ssa.diff_patch(before, after)) == after


# --- over HTTP -------------------------------------------------------------------------------------

@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def cluster() -> AsyncIterator[Emulated]:
    async with emulated_cluster(optional_apis=False) as emulated:
        yield emulated


def service(name: str, **spec) -> dict:
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": "ml"}, "spec": spec}


@pytest.mark.asyncio(loop_scope="module")
async def test_apply_creates_then_skips_then_removes_what_it_stopped_rendering(cluster: Emulated):
    kube = cluster.kube
    action, live = await asyncio.to_thread(kube.apply, service("a", selector={"app": "x", "gpu": "h100"}), None)
    assert action == "created"
    assert [(e["manager"], e["operation"]) for e in live["metadata"]["managedFields"]] == [(FIELD_MANAGER, "Apply")]
    requests = len(cluster.emulator._requests)
    assert (await asyncio.to_thread(kube.apply, service("a", selector={"app": "x", "gpu": "h100"}), live))[0] \
        == "unchanged"
    assert len(cluster.emulator._requests) == requests  # no call

    await cluster.patch("Service", "a", {"metadata": {"annotations": {"team": "ml"}}})  # someone else's field
    action, patched = await asyncio.to_thread(kube.apply, service("a", selector={"app": "x"}),
                                              cluster.get("Service", "a"))
    assert action == "patched"
    assert patched["spec"]["selector"] == {"app": "x"}  # the key we stopped rendering is gone
    assert patched["metadata"]["annotations"]["team"] == "ml"  # theirs stays
    sent = cluster.emulator._requests[-1]
    assert sent.headers["Content-Type"] == "application/apply-patch+yaml"
    assert (sent.params["fieldManager"], sent.params["force"]) == (FIELD_MANAGER, "true")


@pytest.mark.asyncio(loop_scope="module")
async def test_a_stale_cache_costs_one_apply_not_a_failure(cluster: Emulated):
    await asyncio.to_thread(cluster.kube.apply, service("b", selector={"app": "y"}), None)
    assert (await asyncio.to_thread(cluster.kube.apply, service("b", selector={"app": "z"}), None))[0] == "patched"
    assert cluster.get("Service", "b")["spec"]["selector"] == {"app": "z"}


@pytest.mark.asyncio(loop_scope="module")
async def test_an_apply_without_a_field_manager_is_refused(cluster: Emulated):
    async with cluster.emulator.request("PATCH", "/api/v1/namespaces/ml/services/c", json=service("c"),
                                        headers={"Content-Type": "application/apply-patch+yaml"}) as response:
        assert response.status == 422
