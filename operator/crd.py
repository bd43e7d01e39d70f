"""The LLMDeployment CustomResourceDefinition, generated from the pydantic models.

pydantic writes JSON Schema 2020-12; Kubernetes wants a *structural* OpenAPI v3 schema: every node
typed, no `$ref`, no `anyOf` of types, `nullable` instead of null branches, boolean
`exclusiveMinimum`, and no `additionalProperties: false` (the API server prunes unknown fields
instead). `structural()` does that translation; `kvpilot crd` writes the result to
`crds/llmdeployment.yaml`, and a test fails when the checked-in file differs.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from kvpilot.operator.spec import API_GROUP, API_VERSION, KIND, NAME_PATTERN, LLMDeploymentSpec
from kvpilot.operator.status import LLMDeploymentStatus

PLURAL = "llmdeployments"
SINGULAR = "llmdeployment"
SHORT_NAMES = ["llmd"]
CATEGORIES = ["kvpilot"]
CRD_PATH = Path(__file__).resolve().parents[1] / "crds" / "llmdeployment.yaml"
HEADER = "# Generated from operator/spec.py and operator/status.py by `kvpilot crd`. Do not edit.\n"
# JSON-Schema keywords Kubernetes' structural schemas have no use for (or reject).
DROPPED = {"title", "$defs", "additionalProperties", "discriminator"}
# The order keys are written in, so the generated YAML reads top-down: what a node is, then its limits,
# then its children, then its rules.
KEY_ORDER = ["type", "format", "description", "default", "enum", "minimum", "exclusiveMinimum", "maximum",
             "exclusiveMaximum", "minLength", "maxLength", "pattern", "x-kubernetes-int-or-string",
             "x-kubernetes-preserve-unknown-fields", "properties", "required", "additionalProperties", "items",
             "x-kubernetes-list-type", "x-kubernetes-list-map-keys", "x-kubernetes-validations"]
# Integer fields holding byte counts overflow int32: tell clients to use 64 bits.
INT64_FIELDS = {"total", "usable", "weights", "kvCache", "activations", "overhead", "kvCapacityTokens", "hostKvBytes",
                "hostKvCache", "hostKvTokens", "hostWeightBytes", "hostWeightBytesPerPod", "stagingBytes"}

PRINTER_COLUMNS = [
    {"name": "Model", "type": "string", "jsonPath": ".spec.model.source"},
    {"name": "Quant", "type": "string", "jsonPath": ".status.plan.quantization"},
    {"name": "GPUs", "type": "integer", "jsonPath": ".status.plan.gpus", "description": "GPUs per replica."},
    {"name": "Replicas", "type": "integer", "jsonPath": ".status.replicas"},
    {"name": "Ready", "type": "integer", "jsonPath": ".status.readyReplicas"},
    {"name": "KV-Util", "type": "number", "jsonPath": ".status.kvCacheUtilization",
     "description": "Average KV-cache use of the replicas (0..1)."},
    {"name": "Phase", "type": "string", "jsonPath": ".status.phase", "priority": 1},
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
]


def _resolve(node: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    """Inline a `$ref`; the referencing node's own keys (its field description) win."""
    if "$ref" not in node:
        return node
    target = defs[node["$ref"].rsplit("/", 1)[-1]]
    return {**target, **{k: v for k, v in node.items() if k != "$ref"}}


def _without_null(node: dict[str, Any]) -> dict[str, Any]:
    """`X | None` -> X (an absent field is how Kubernetes says "unset"); `str | int` -> int-or-string."""
    branches = [b for b in node["anyOf"] if b.get("type") != "null"]
    rest = {k: v for k, v in node.items() if k != "anyOf"}
    if rest.get("default", 0) is None:
        del rest["default"]
    if {b.get("type") for b in branches} == {"string", "integer"}:
        return {**rest, "x-kubernetes-int-or-string": True}
    if len(branches) != 1:
        raise ValueError(f"cannot express anyOf {branches} in a structural schema")
    return {**branches[0], **rest}


def structural(node: dict[str, Any], defs: dict[str, Any], name: str = "") -> dict[str, Any]:
    """One pydantic JSON-Schema node as a structural OpenAPI v3 node."""
    node = _resolve(node, defs)
    if "anyOf" in node:
        node = _resolve(_without_null({**node, "anyOf": [_resolve(b, defs) for b in node["anyOf"]]}), defs)
    if "allOf" in node and len(node["allOf"]) == 1:
        node = {**_resolve(node["allOf"][0], defs), **{k: v for k, v in node.items() if k != "allOf"}}
    out: dict[str, Any] = {k: v for k, v in node.items() if k not in DROPPED}
    if "const" in out:
        out["enum"] = [out.pop("const")]
    for bound in ("Minimum", "Maximum"):
        if f"exclusive{bound}" in out and not isinstance(out[f"exclusive{bound}"], bool):
            out[bound.lower()] = out[f"exclusive{bound}"]
            out[f"exclusive{bound}"] = True
    if out.get("type") == "integer" and name in INT64_FIELDS:
        out["format"] = "int64"
    if "properties" in node:
        out["type"] = "object"
        out["properties"] = {key: structural(value, defs, key) for key, value in node["properties"].items()}
        for key, value in out["properties"].items():
            fills_defaults = any("default" in child for child in value.get("properties", {}).values())
            if fills_defaults and not value.get("required") and key not in node.get("required", []):
                value["default"] = {}  # so the API server fills in the nested defaults too
    additional = node.get("additionalProperties")
    if isinstance(additional, dict) and additional:
        out["additionalProperties"] = structural(additional, defs)
    elif additional is True or (out.get("type") == "object" and "properties" not in node and not additional):
        out["x-kubernetes-preserve-unknown-fields"] = True
    if "items" in node:
        out["items"] = structural(node["items"], defs)
    unknown = set(out) - set(KEY_ORDER)
    if unknown:
        raise ValueError(f"schema keyword(s) {sorted(unknown)} have no place in KEY_ORDER")
    return {key: out[key] for key in KEY_ORDER if key in out}


def schema_of(model: type[BaseModel]) -> dict[str, Any]:
    raw = model.model_json_schema(by_alias=True, mode="validation")
    return structural(raw, raw.get("$defs", {}))


def crd() -> dict[str, Any]:
    spec = schema_of(LLMDeploymentSpec)
    status = schema_of(LLMDeploymentStatus)
    root = {
        "type": "object",
        "description": "A large language model served on Kubernetes, sized to its GPUs' memory by kvpilot.",
        "properties": {
            "apiVersion": {"type": "string", "description": "kvpilot.io/v1alpha1."},
            "kind": {"type": "string", "description": "LLMDeployment."},
            "metadata": {"type": "object"},
            "spec": spec,
            "status": status,
        },
        "required": ["spec"],
        "x-kubernetes-validations": [{
            "rule": f"self.metadata.name.matches('{NAME_PATTERN}')",
            "message": "metadata.name must start with a letter and hold only a-z, 0-9 and '-': "
                       "it also names the Service",
        }],
    }
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{PLURAL}.{API_GROUP}"},
        "spec": {
            "group": API_GROUP,
            "names": {"kind": KIND, "listKind": f"{KIND}List", "plural": PLURAL, "singular": SINGULAR,
                      "shortNames": SHORT_NAMES, "categories": CATEGORIES},
            "scope": "Namespaced",
            "versions": [{
                "name": API_VERSION,
                "served": True,
                "storage": True,
                "schema": {"openAPIV3Schema": root},
                "subresources": {
                    "status": {},
                    "scale": {"specReplicasPath": ".spec.replicas", "statusReplicasPath": ".status.replicas",
                              "labelSelectorPath": ".status.selector"},
                },
                "additionalPrinterColumns": PRINTER_COLUMNS,
            }],
        },
    }


def crd_yaml() -> str:
    return HEADER + yaml.safe_dump(crd(), sort_keys=False, width=100)


def add_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("crd", help="print or write the LLMDeployment CRD",
                       description="Generate the LLMDeployment CRD from the pydantic models.")
    p.add_argument("--write", nargs="?", const=str(CRD_PATH), metavar="PATH",
                   help=f"write it to PATH (default {CRD_PATH.relative_to(CRD_PATH.parents[1])}) instead of stdout")
    p.add_argument("--check", action="store_true", help="exit 1 when the checked-in CRD is out of date")
    p.set_defaults(run=run_command)


def run_command(args: argparse.Namespace) -> int:
    text = crd_yaml()
    if args.check:
        current = CRD_PATH.read_text() if CRD_PATH.exists() else ""
        if current != text:
            print(f"{CRD_PATH} is out of date: run `kvpilot crd --write`")
            return 1
        return 0
    if args.write:
        Path(args.write).write_text(text)
    else:
        print(text, end="")
    return 0
