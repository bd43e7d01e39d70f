"""Pure helpers of create-or-patch: "does the cluster already hold this?" and the 3-way merge patch.

The cluster adds to what the operator writes (defaults, status, other controllers' fields), so
"unchanged" means the live object *contains* the desired one, not that they are equal. What the
operator wrote last time is kept on the object in an annotation, so a field it stops rendering can be
removed (`null` in a JSON merge patch) without touching fields others own.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping
from typing import Any

LAST_APPLIED = "kvpilot.io/last-applied"


def contains(desired: Any, live: Any) -> bool:
    """Every field of `desired` is in `live` with the same value (lists: same length, item by item).

    An empty map or list in `desired` matches an absent field: the API server drops empty values."""
    if isinstance(desired, Mapping):
        if not isinstance(live, Mapping):
            return False
        return all(contains(value, live[key]) if key in live else value in ({}, [])
                   for key, value in desired.items())
    if isinstance(desired, list):
        return isinstance(live, list) and len(desired) == len(live) and all(map(contains, desired, live))
    return desired == live


def merge_patch(previous: Any, desired: Any) -> Any:
    """A JSON merge patch (RFC 7396) that writes `desired` and removes what `previous` had beyond it."""
    if not isinstance(desired, Mapping):
        return copy.deepcopy(desired)
    patch: dict[str, Any] = {}
    before = previous if isinstance(previous, Mapping) else {}
    for key, value in desired.items():
        patch[key] = merge_patch(before.get(key), value)
    for key in before.keys() - desired.keys():
        patch[key] = None
    return patch


def with_last_applied(obj: Mapping[str, Any]) -> dict[str, Any]:
    """`obj` with itself recorded in the LAST_APPLIED annotation (compact, keys sorted: stable)."""
    out = copy.deepcopy(dict(obj))
    meta = out.setdefault("metadata", {})
    annotations = {k: v for k, v in (meta.get("annotations") or {}).items() if k != LAST_APPLIED}
    record = {**out, "metadata": {**meta, "annotations": annotations}}
    if not annotations:
        del record["metadata"]["annotations"]
    meta["annotations"] = {**annotations, LAST_APPLIED: json.dumps(record, sort_keys=True, separators=(",", ":"))}
    return out
