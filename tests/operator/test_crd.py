"""crd.py: the checked-in CRD is the generated one, it is structural and described, and its schema and CEL
rules admit exactly what the pydantic models admit (examples included)."""

from __future__ import annotations

import copy
from typing import Any

import celpy
import jsonschema
import kubernetes_validate
import pytest
import yaml
from llmd_cases import EXAMPLES, load_example

from kvpilot.cli.main import main
from kvpilot.operator.crd import CRD_PATH, crd, crd_yaml
from kvpilot.operator.spec import SpecError, parse_manifest

SCHEMA = crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
CEL = celpy.Environment()


def with_defaults(schema: dict[str, Any], value: Any) -> Any:
    """What the API server stores: `value` with the schema's defaults filled in, at every level."""
    if isinstance(value, dict) and "properties" in schema:
        for key, sub in schema["properties"].items():
            if key not in value and "default" in sub:
                value[key] = copy.deepcopy(sub["default"])
            if key in value:
                value[key] = with_defaults(sub, value[key])
    if isinstance(value, list) and "items" in schema:
        return [with_defaults(schema["items"], item) for item in value]
    return value


def cel_violations(schema: dict[str, Any], value: Any, path: str = "") -> list[str]:
    found = []
    for rule in schema.get("x-kubernetes-validations", []):
        program = CEL.program(CEL.compile(rule["rule"]))
        if not program.evaluate({"self": celpy.json_to_cel(value)}):
            found.append(f"{path or '<root>'}: {rule['message']}")
    if isinstance(value, dict):
        for key, sub in schema.get("properties", {}).items():
            if key in value:
                found += cel_violations(sub, value[key], f"{path}.{key}")
    if isinstance(value, list) and "items" in schema:
        for i, item in enumerate(value):
            found += cel_violations(schema["items"], item, f"{path}[{i}]")
    return found


def admission_errors(manifest: dict[str, Any]) -> list[str]:
    """What `kubectl apply` would be told: schema errors (after defaulting), then CEL rule failures."""
    obj = with_defaults(SCHEMA, copy.deepcopy(manifest))
    # Draft 4 is the JSON Schema dialect of OpenAPI v3.0 (boolean exclusiveMinimum).
    errors = [f"{'.'.join(map(str, e.path))}: {e.message}" for e in jsonschema.Draft4Validator(SCHEMA).iter_errors(obj)]
    return errors or cel_violations(SCHEMA, obj)


def manifest(spec: dict[str, Any], name: str = "llm") -> dict[str, Any]:
    return {"apiVersion": "kvpilot.io/v1alpha1", "kind": "LLMDeployment", "metadata": {"name": name}, "spec": spec}


def test_checked_in_crd_is_the_generated_one():
    assert CRD_PATH.read_text() == crd_yaml(), "crds/llmdeployment.yaml is stale: run `kvpilot crd --write`"
    assert main(["crd", "--check"]) == 0


def test_crd_passes_the_kubernetes_schema():
    kubernetes_validate.validate(yaml.safe_load(CRD_PATH.read_text()), kubernetes_validate.latest_version(),
                                 strict=True)


def test_names_subresources_and_columns():
    spec = crd()["spec"]
    assert (spec["group"], spec["names"]["shortNames"], spec["scope"]) == ("kvpilot.io", ["llmd"], "Namespaced")
    version = spec["versions"][0]
    assert version["name"] == "v1alpha1" and version["served"] and version["storage"]
    assert version["subresources"]["scale"] == {"specReplicasPath": ".spec.replicas",
                                                "statusReplicasPath": ".status.replicas",
                                                "labelSelectorPath": ".status.selector"}
    columns = [c["name"] for c in version["additionalPrinterColumns"] if not c.get("priority")]
    assert columns == ["Model", "Quant", "GPUs", "Replicas", "Ready", "KV-Util", "Age"]


def walk(schema: dict[str, Any], path: str = ""):
    yield path, schema
    for key, sub in schema.get("properties", {}).items():
        yield from walk(sub, f"{path}.{key}")
    if "items" in schema:
        yield from walk(schema["items"], f"{path}[]")
    if isinstance(schema.get("additionalProperties"), dict):
        yield from walk(schema["additionalProperties"], f"{path}{{}}")


def test_schema_is_structural_and_every_field_is_described():
    for path, node in walk(SCHEMA):
        assert "type" in node or node.get("x-kubernetes-int-or-string"), f"{path} has no type"
        assert not {"$ref", "anyOf", "allOf", "oneOf", "title"} & set(node), f"{path} is not structural"
        for key, sub in node.get("properties", {}).items():
            if f"{path}.{key}" != ".metadata":
                assert sub.get("description"), f"{path}.{key} has no description"
        if node.get("type") == "object" and "properties" not in node and "additionalProperties" not in node:
            assert node.get("x-kubernetes-preserve-unknown-fields") or path == ".metadata", path


def test_nested_defaults_reach_the_stored_object():
    stored = with_defaults(SCHEMA, manifest({"model": {"source": "llama-3.1-8b"}, "gpu": {"type": "l4"}}))
    assert stored["spec"]["kvCache"] == {"dtype": "auto", "blockSize": 16}
    assert stored["spec"]["autoscaling"]["mode"] == "operator" and stored["spec"]["gpu"]["perNode"] == 8
    assert stored["spec"]["quantization"] == "auto" and stored["spec"]["replicas"] == 1


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_every_example_passes_the_crd(path):
    assert admission_errors(load_example(path.stem)) == []


MINIMAL = {"model": {"source": "llama-3.1-8b"}, "gpu": {"type": "h100-80gb"}}


@pytest.mark.parametrize(("spec", "name", "rejected"), [
    (MINIMAL, "llm", None),
    (MINIMAL | {"gpu": {"perNode": 4}}, "llm", "gpu.type"),
    (MINIMAL | {"autoscaling": {"minReplicas": 5, "maxReplicas": 2}}, "llm", "minReplicas"),
    (MINIMAL | {"autoscaling": {"enabled": True, "mode": "hpa", "minReplicas": 0}}, "llm", "needs mode keda"),
    (MINIMAL | {"autoscaling": {"enabled": True, "mode": "operator", "minReplicas": 0}}, "llm", "needs mode keda"),
    (MINIMAL | {"autoscaling": {"enabled": False, "minReplicas": 0}}, "llm", None),
    (MINIMAL | {"autoscaling": {"enabled": True, "mode": "keda", "minReplicas": 0}}, "llm", None),
    (MINIMAL | {"serving": {"maxNumSeqs": 64, "maxBatchedTokens": 32}}, "llm", "maxBatchedTokens"),
    (MINIMAL | {"runtime": {"env": [{"name": "A", "value": "1", "valueFrom": {"fieldRef": {}}}]}}, "llm", "not both"),
    (MINIMAL | {"quantization": "int2"}, "llm", "quantization"),
    (MINIMAL | {"gpuMemoryUtilization": 0}, "llm", "gpuMemoryUtilization"),
    (MINIMAL | {"kvCache": {"blockSize": 12}}, "llm", "blockSize"),
    (MINIMAL | {"runtime": {"resources": {"limits": {"memory": "4Gi", "cpu": 2}}}}, "llm", None),
    (MINIMAL | {"runtime": {"tolerations": [{"key": "k", "operator": "Sometimes"}]}}, "llm", "operator"),
    (MINIMAL, "9lives", "start with a letter"),
])
def test_crd_and_pydantic_agree(spec, name, rejected):
    """The API server (schema + CEL) and pydantic (`kvpilot plan`/`up`) admit and refuse the same specs."""
    errors = admission_errors(manifest(spec, name))
    try:
        parse_manifest(manifest(spec, name))
        pydantic_error = None
    except SpecError as err:
        pydantic_error = str(err)
    if rejected is None:
        assert errors == [] and pydantic_error is None
    else:
        assert errors and rejected in " ".join(errors), errors
        assert pydantic_error is not None
