"""merge.py: "does the cluster already hold it?" and the 3-way merge patch, as tables."""

from __future__ import annotations

import json

import pytest

from kvpilot.operator.merge import LAST_APPLIED, contains, merge_patch, with_last_applied


@pytest.mark.parametrize(("desired", "live", "held"), [
    ({"a": 1}, {"a": 1, "b": 2}, True),  # the server adds fields: still held
    ({"a": 1}, {"a": 2}, False),
    ({"a": {"b": 1}}, {"a": {"b": 1, "c": 0}}, True),
    ({"a": {"b": 1}}, {}, False),
    ({"a": {}}, {}, True),  # empty values are dropped by the API server
    ({"a": []}, {}, True),
    ({"a": [{"x": 1}]}, {"a": [{"x": 1, "defaulted": True}]}, True),
    ({"a": [{"x": 1}]}, {"a": [{"x": 1}, {"x": 2}]}, False),  # a list is owned whole
    ({"a": [1, 2]}, {"a": [2, 1]}, False),
    ({"a": "1"}, {"a": 1}, False),
    ({"a": {"b": 1}}, {"a": "scalar"}, False),
])
def test_contains(desired, live, held):
    assert contains(desired, live) is held


@pytest.mark.parametrize(("previous", "desired", "patch"), [
    (None, {"a": 1}, {"a": 1}),
    ({"a": 1, "b": 2}, {"a": 1}, {"a": 1, "b": None}),  # we stopped rendering b: remove it
    ({"sel": {"gpu": "h100", "pool": "a"}}, {"sel": {"pool": "a"}}, {"sel": {"pool": "a", "gpu": None}}),
    ({"l": [1, 2]}, {"l": [1]}, {"l": [1]}),  # lists are replaced whole by a merge patch
    ({"a": {"b": 1}}, {"a": 5}, {"a": 5}),
    ({"a": 5}, {"a": {"b": 1}}, {"a": {"b": 1}}),
    ({}, {}, {}),
])
def test_merge_patch(previous, desired, patch):
    assert merge_patch(previous, desired) == patch


def test_merge_patch_never_touches_fields_it_did_not_write():
    previous = {"spec": {"replicas": 2, "template": {"x": 1}}}
    desired = {"spec": {"template": {"x": 2}}}  # an HPA owns replicas now: the first patch drops ours
    assert merge_patch(previous, desired) == {"spec": {"template": {"x": 2}, "replicas": None}}
    assert merge_patch(desired, desired) == desired  # and later runs leave the HPA's value alone


def test_last_applied_records_the_object_without_itself():
    obj = {"kind": "Service", "metadata": {"name": "x", "annotations": {"keep": "me"}}, "spec": {"a": 1}}
    out = with_last_applied(obj)
    recorded = json.loads(out["metadata"]["annotations"][LAST_APPLIED])
    assert recorded == obj and out["metadata"]["annotations"]["keep"] == "me"
    assert with_last_applied(out) == out  # stable: re-recording changes nothing
    assert "annotations" not in obj["metadata"] or LAST_APPLIED not in obj["metadata"]["annotations"]
