"""The chart as a package: helm lint, metadata, CRDs, documented and schema-checked values."""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from chart_tools import CHART, ROOT, Helm, scenario_files

SCENARIOS = scenario_files()
SCHEMA: dict[str, Any] = json.loads((CHART / "values.schema.json").read_text())
EXPECTED_SCENARIOS = {"default", "all-optional", "namespaced", "ha"}


def test_ci_scenarios_exist() -> None:
    names = {path.name.removesuffix("-values.yaml") for path in SCENARIOS}
    assert names >= EXPECTED_SCENARIOS, f"missing ci scenarios: {EXPECTED_SCENARIOS - names}"


def test_lint_strict_with_defaults(helm: Helm) -> None:
    result = helm.run("lint", "--strict", str(CHART))
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda p: p.name)
def test_lint_strict_with_scenario(helm: Helm, scenario: Path) -> None:
    result = helm.run("lint", "--strict", str(CHART), "--values", str(scenario))
    assert result.returncode == 0, result.stdout + result.stderr


def test_chart_versions_follow_the_package() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    package = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert chart["apiVersion"] == "v2"
    assert chart["version"] == package, "Chart.yaml version must equal the version in pyproject.toml"
    assert chart["appVersion"] == package, "Chart.yaml appVersion must equal the version in pyproject.toml"


def test_chart_crd_is_the_generated_crd() -> None:
    source, copy = ROOT / "crds" / "llmdeployment.yaml", CHART / "crds" / "llmdeployment.yaml"
    assert source.is_file(), f"{source.relative_to(ROOT)} is missing: generate it (kvpilot crd)"
    assert copy.is_file(), f"{copy.relative_to(ROOT)} is missing: cp crds/llmdeployment.yaml {copy.relative_to(ROOT)}"
    assert copy.read_bytes() == source.read_bytes(), (
        f"{copy.relative_to(ROOT)} differs from crds/llmdeployment.yaml: cp crds/llmdeployment.yaml "
        f"{copy.relative_to(ROOT)}")


def test_chart_crds_define_what_the_templates_use() -> None:
    crds = [doc for path in sorted((CHART / "crds").glob("*.yaml"))
            for doc in yaml.safe_load_all(path.read_text()) if doc]
    names = {crd["metadata"]["name"] for crd in crds}
    assert {"clusterkopfpeerings.kopf.dev", "kopfpeerings.kopf.dev"} <= names


# --- values.yaml: every value documented, every value in the schema -------------------------

_KEY = re.compile(r"^(?P<indent>\s*)(?P<key>[A-Za-z_][\w.-]*):(\s|$)")


def _schema_node(path: list[str]) -> dict[str, Any] | None:
    """The schema of a dotted values path, or None where the path is inside a free-form object."""
    node: dict[str, Any] = SCHEMA
    for key in path:
        props = node.get("properties")
        if props is None or key not in props:
            return None
        node = props[key]
    return node


def _documented_keys() -> list[tuple[list[str], str | None]]:
    """(path, first line of the comment block just above it) for every key the schema defines."""
    found: list[tuple[list[str], str | None]] = []
    stack: list[tuple[int, str]] = []
    comment: list[str] = []
    for line in (CHART / "values.yaml").read_text().splitlines():
        stripped = line.strip()
        if stripped.startswith("#"):
            comment.append(stripped.lstrip("#").strip())
            continue
        match = _KEY.match(line)
        if not match or stripped.startswith("-"):
            comment = []
            continue
        indent = len(match["indent"])
        while stack and stack[-1][0] >= indent:
            stack.pop()
        path = [key for _, key in stack] + [match["key"]]
        stack.append((indent, match["key"]))
        if _schema_node(path) is not None:
            found.append((path, comment[0] if comment else None))
        comment = []
    return found


def test_every_value_is_documented_by_a_comment_starting_with_its_key() -> None:
    undocumented = [".".join(path) for path, first in _documented_keys()
                    if first is None or not re.match(rf"({re.escape('.'.join(path))}|{re.escape(path[-1])})\b", first)]
    assert not undocumented, f"values without a comment that starts with their key: {undocumented}"


def test_values_and_schema_cover_each_other() -> None:
    in_values = {".".join(path) for path, _ in _documented_keys()}

    def schema_paths(node: dict[str, Any], prefix: str = "") -> set[str]:
        paths: set[str] = set()
        for key, child in node.get("properties", {}).items():
            path = f"{prefix}{key}"
            paths |= {path} | schema_paths(child, f"{path}.")
        return paths

    in_schema = schema_paths(SCHEMA) - {"global"}
    assert in_schema - in_values == set(), "schema properties without a value in values.yaml"
    assert in_values - in_schema == set(), "values.yaml keys the schema does not define"


@pytest.mark.parametrize("values", [CHART / "values.yaml", *SCENARIOS], ids=lambda p: p.name)
def test_values_files_pass_the_schema(values: Path) -> None:
    jsonschema.Draft7Validator.check_schema(SCHEMA)
    merged = _merge(yaml.safe_load((CHART / "values.yaml").read_text()), yaml.safe_load(values.read_text()) or {})
    jsonschema.validate(merged, SCHEMA)


def _merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Helm's coalescing of a values file onto the defaults: maps merge, everything else replaces."""
    merged = dict(base)
    for key, value in override.items():
        both_maps = isinstance(value, dict) and isinstance(base.get(key), dict)
        merged[key] = _merge(base[key], value) if both_maps else value
    return merged


@pytest.mark.parametrize(("sets", "message"), [
    (["replicaCount=-1"], "replicaCount"),
    (["replicaCount=two"], "replicaCount"),
    (["image.digest=latest"], "digest"),
    (["image.pullPolicy=Sometimes"], "pullPolicy"),
    (["watchNamespaces={Team_A}"], "watchNamespaces"),
    (["metrics.service.type=Headless"], "type"),
    (["prometheusUrl=prometheus:9090"], "prometheusUrl"),
    (["replicas=2"], "replicas"),  # a typo of replicaCount: unknown keys are rejected
    (["serviceMonitor.interval=often"], "interval"),
])
def test_schema_rejects_bad_values_with_a_message(helm: Helm, sets: list[str], message: str) -> None:
    result = helm.template(sets=sets)
    assert result.returncode != 0, f"helm accepted {sets}"
    assert "schema" in result.stderr and message in result.stderr, result.stderr


def test_service_monitor_without_metrics_fails_with_a_message(helm: Helm) -> None:
    result = helm.template(sets=["serviceMonitor.enabled=true", "metrics.enabled=false"])
    assert result.returncode != 0
    assert "serviceMonitor.enabled: true needs metrics.enabled: true" in result.stderr


def test_notes_tell_what_to_apply_next(helm: Helm) -> None:
    result = helm.run("install", "kv", str(CHART), "--namespace", "kvpilot-system", "--dry-run=client",
                      "--set", "watchNamespaces={team-a}", "--set", "replicaCount=2")
    assert result.returncode == 0, result.stderr
    notes = result.stdout.split("NOTES:", 1)[1]
    assert "kubectl apply -n team-a -f examples/smollm2.yaml" in notes
    assert "kubectl get llmd -n team-a" in notes
    assert "kopf peering" in notes
    assert "kubectl apply --server-side --force-conflicts -f" in notes  # how to upgrade the CRDs
