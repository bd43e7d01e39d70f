"""Server-side apply as the tests' API emulator does it: field ownership per manager, pure functions.

Enough of Kubernetes' structured merge to test an operator that applies with a field manager:

- every write records which manager owns which fields, in `metadata.managedFields` (`FieldsV1`,
  the format the API server uses: `{"f:spec": {"f:replicas": {}}}`, list items as `k:{"name":"x"}`);
- an apply (`application/apply-patch+yaml`) sets the fields it names, takes them over from other
  managers when `force` is given (409 otherwise, when their values differ), and removes the fields
  its manager applied last time and no longer names, unless another manager also owns them;
- an update (a merge or JSON patch, a create) moves the fields whose values it changes to its manager.

Lists: those Kubernetes declares as maps merge item by item on their key, as the API server does:
`containers`, `initContainers`, `ephemeralContainers`, `env`, `volumes`, `imagePullSecrets` by
`name`; `volumeMounts` by `mountPath`; `ownerReferences` by `uid`; `ports` by `containerPort` (a
container's) or `port` (a Service's). Every other list (args, command, tolerations, rules...) is
atomic: replaced whole and owned whole by the last writer. Deliberate simplifications: no schema
(a list is keyed by its field name and items, not by its type), no defaulting, no `.` entries.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterable, Mapping
from typing import Any

Path = tuple[str, ...]
LIST_KEYS = {"containers": ("name",), "initContainers": ("name",), "ephemeralContainers": ("name",),
             "env": ("name",), "volumes": ("name",), "imagePullSecrets": ("name",),
             "volumeMounts": ("mountPath",), "ownerReferences": ("uid",)}
# Written by the API server, never owned by a manager.
SERVER_FIELDS = {("f:apiVersion",), ("f:kind",), ("f:status",)} | {
    ("f:metadata", f"f:{name}") for name in ("name", "namespace", "uid", "resourceVersion", "generation",
                                             "creationTimestamp", "managedFields", "deletionTimestamp")}


class Conflict(Exception):
    def __init__(self, fields: list[tuple[str, Path]]) -> None:
        super().__init__("; ".join(f"{'.'.join(s[2:] for s in path)} is owned by {manager}"
                                   for manager, path in fields))
        self.fields = fields


def list_key(field: str | None, items: list[Any]) -> tuple[str, ...] | None:
    """The keys a list's items merge on, or None for an atomic list."""
    if not items or not all(isinstance(item, Mapping) for item in items):
        return None
    if field in LIST_KEYS:
        keys = LIST_KEYS[field]
    elif field == "ports" and all("containerPort" in item for item in items):
        keys = ("containerPort",)
    elif field == "ports" and all("port" in item for item in items):
        keys = ("port",)
    else:
        return None
    return keys if all(all(k in item for k in keys) for item in items) else None


def _item_segment(item: Mapping[str, Any], keys: tuple[str, ...]) -> str:
    return "k:" + json.dumps({k: item[k] for k in keys}, sort_keys=True, separators=(",", ":"))


def field_set(obj: Any, field: str | None = None) -> set[Path]:
    """The leaf fields of `obj` as paths (map keys `f:name`, keyed list items `k:{...}`)."""
    if isinstance(obj, Mapping) and obj:
        return {(f"f:{key}", *path) for key, value in obj.items() for path in field_set(value, key)}
    if isinstance(obj, list) and (keys := list_key(field, obj)):
        return {(_item_segment(item, keys), *path) for item in obj for path in field_set(item)}
    return {()}


def owned_fields(obj: Any) -> set[Path]:
    return {path for path in field_set(obj) if path and not any(path[:len(s)] == s for s in SERVER_FIELDS)}


def _child(node: Any, segment: str) -> tuple[bool, Any]:
    if segment.startswith("f:") and isinstance(node, Mapping):
        return segment[2:] in node, node.get(segment[2:])
    if segment.startswith("k:") and isinstance(node, list):
        wanted = json.loads(segment[2:])
        found = next((item for item in node if isinstance(item, Mapping)
                      and all(item.get(k) == v for k, v in wanted.items())), None)
        return found is not None, found
    return False, None


def value_at(obj: Any, path: Path) -> tuple[bool, Any]:
    node = obj
    for segment in path:
        found, node = _child(node, segment)
        if not found:
            return False, None
    return True, node


def _detach(parent: Any, segment: str, node: Any) -> None:
    if isinstance(parent, dict):
        if parent.get(segment[2:]) is node:
            del parent[segment[2:]]
    else:
        parent[:] = [item for item in parent if item is not node]


def remove_all(obj: Any, paths: Iterable[Path]) -> None:
    """Delete the fields at `paths`, and the maps and list items they leave empty. Every path is found
    before any is deleted: deleting a list item's key field first would lose the item."""
    chains: list[tuple[Path, list[Any]]] = []
    for path in paths:
        chain = [obj]
        for segment in path:
            found, node = _child(chain[-1], segment)
            if not found:
                break
            chain.append(node)
        else:
            chains.append((path, chain))
    for path, chain in chains:
        _detach(chain[-2], path[-1], chain[-1])
    for path, chain in chains:
        for depth in range(len(path) - 2, -1, -1):  # chain[depth] holds chain[depth + 1]
            if chain[depth + 1] not in ({}, []):
                break
            _detach(chain[depth], path[depth], chain[depth + 1])


def merge(live: Any, applied: Any, field: str | None = None) -> Any:
    """`applied` laid over `live`: maps key by key, keyed lists item by item, anything else replaced."""
    if isinstance(live, Mapping) and isinstance(applied, Mapping):
        out = dict(live)
        for key, value in applied.items():
            out[key] = merge(live.get(key), value, key)
        return out
    if isinstance(live, list) and isinstance(applied, list):
        keys = list_key(field, applied)
        if keys and list_key(field, live) == keys:
            out = list(live)
            for item in applied:
                segment = _item_segment(item, keys)
                index = next((i for i, old in enumerate(out) if _item_segment(old, keys) == segment), None)
                if index is None:
                    out.append(copy.deepcopy(item))
                else:
                    out[index] = merge(out[index], item)
            return out
    return copy.deepcopy(applied)


# --- managedFields on the object ------------------------------------------------------------------


def _nest(paths: Iterable[Path]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for path in paths:
        node = tree
        for segment in path:
            node = node.setdefault(segment, {})
    return tree


def _flatten(tree: Mapping[str, Any], prefix: Path = ()) -> set[Path]:
    paths: set[Path] = set()
    for segment, sub in tree.items():
        paths |= _flatten(sub, (*prefix, segment)) if sub else {(*prefix, segment)}
    return paths


def read_managed(obj: Mapping[str, Any] | None) -> dict[tuple[str, str], set[Path]]:
    """(manager, operation) -> the fields it owns."""
    entries = ((obj or {}).get("metadata") or {}).get("managedFields") or []
    return {(e["manager"], e["operation"]): _flatten(e.get("fieldsV1") or {}) for e in entries}


def managed_entries(managed: Mapping[tuple[str, str], set[Path]], api_version: str) -> list[dict[str, Any]]:
    return [{"manager": manager, "operation": operation, "apiVersion": api_version, "fieldsType": "FieldsV1",
             "fieldsV1": _nest(paths)} for (manager, operation), paths in sorted(managed.items()) if paths]


# --- the two kinds of write -----------------------------------------------------------------------


def apply(live: Mapping[str, Any] | None, applied: Mapping[str, Any], manager: str, force: bool) -> dict[str, Any]:
    """The object after `manager` applies `applied` to `live` (None: it does not exist yet)."""
    managed = read_managed(live)
    mine = owned_fields(applied)
    conflicts = [(owner, path) for (owner, operation), paths in managed.items() if owner != manager
                 for path in sorted(mine & paths) if value_at(live, path) != value_at(applied, path)]
    if conflicts and not force:
        raise Conflict(conflicts)
    taken = {path for _, path in conflicts}
    managed = {who: paths - taken for who, paths in managed.items()}
    previous = managed.pop((manager, "Apply"), set())
    others = set().union(*managed.values()) if managed else set()
    result = copy.deepcopy(dict(live or {}))
    remove_all(result, previous - mine - others)
    result = merge(result, applied)
    managed[(manager, "Apply")] = mine
    result.setdefault("metadata", {})["managedFields"] = managed_entries(managed, applied["apiVersion"])
    return result


def record_update(live: Mapping[str, Any] | None, after: Mapping[str, Any], manager: str) -> list[dict[str, Any]]:
    """The managedFields after a non-apply write turned `live` into `after`: the fields it changed move
    to `manager`, fields that no longer exist belong to no one."""
    managed = read_managed(live)
    present = owned_fields(after)
    changed = {path for path in present if value_at(live, path) != value_at(after, path)}
    managed = {who: (paths & present) - changed for who, paths in managed.items()}
    managed[(manager, "Update")] = managed.get((manager, "Update"), set()) | changed
    return managed_entries(managed, after.get("apiVersion", ""))


def merge_patch(obj: Mapping[str, Any], patch: Mapping[str, Any]) -> dict[str, Any]:
    """RFC 7386, as the emulator applies a merge patch (lists replaced, None deletes)."""
    out = copy.deepcopy(dict(obj))
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        elif isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merge_patch(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def diff_patch(before: Mapping[str, Any], after: Mapping[str, Any]) -> dict[str, Any]:
    """The merge patch that turns `before` into `after` (what the emulator's store understands)."""
    patch: dict[str, Any] = {key: None for key in before.keys() - after.keys()}
    for key, value in after.items():
        if isinstance(value, Mapping) and isinstance(before.get(key), Mapping):
            if sub := diff_patch(before[key], value):
                patch[key] = sub
        elif before.get(key) != value or key not in before:
            patch[key] = copy.deepcopy(value)
    return patch
