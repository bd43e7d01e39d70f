"""What `helm template` renders for each ci scenario: valid objects, labels, RBAC, operator args."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from chart_tools import (
    CHART,
    NAMESPACE,
    RELEASE,
    ROOT,
    Helm,
    Manifest,
    of_kind,
    only,
    operator_cli,
    operator_container,
    scenario_files,
)

from kvpilot.cli.main import build_parser
from kvpilot.operator.main import OperatorConfig
from kvpilot.operator.render import ADAPTER_KV_METRIC, KV_METRIC

SCENARIOS = {path.name.removesuffix("-values.yaml"): path for path in scenario_files()}
Render = Callable[[Path], list[Manifest]]
# The chart's own minimum (Chart.yaml kubeVersion) and the newest schemas kubernetes-validate has.
KUBE_VERSIONS = ["1.29.0", kubernetes_validate.latest_version()]
# Custom resources whose CRD is not in the chart: their shape is checked by dedicated tests below.
FOREIGN_KINDS = {"ServiceMonitor"}
# Runtime pod metrics the dashboard must show (vLLM-compatible names).
DASHBOARD_METRICS = {"vllm:kv_cache_usage_perc", "vllm:num_requests_running", "vllm:num_requests_waiting",
                     "vllm:time_to_first_token_seconds_bucket", "vllm:generation_tokens_total"}


def _scenario(name: str) -> Path:
    return SCENARIOS[name]


def _chart_crd_schemas() -> dict[tuple[str, str], dict[str, Any]]:
    """(apiVersion, kind) -> openAPIV3Schema of every CRD version the chart ships."""
    schemas: dict[tuple[str, str], dict[str, Any]] = {}
    for path in (CHART / "crds").glob("*.yaml"):
        for crd in filter(None, yaml.safe_load_all(path.read_text())):
            for version in crd["spec"]["versions"]:
                key = (f"{crd['spec']['group']}/{version['name']}", crd["spec"]["names"]["kind"])
                schemas[key] = version["schema"]["openAPIV3Schema"]
    return schemas


def _args(objects: list[Manifest]) -> list[str]:
    return operator_container(objects)["args"]


def _env(objects: list[Manifest]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in operator_container(objects)["env"]}


# --- every object is valid ---------------------------------------------------------------------

@pytest.mark.parametrize("scenario", SCENARIOS.values(), ids=SCENARIOS.keys())
@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
def test_every_object_is_valid(rendered: Render, scenario: Path, kube_version: str) -> None:
    crd_schemas = _chart_crd_schemas()
    for obj in rendered(scenario):
        where = f"{obj['kind']}/{obj['metadata']['name']}"
        key = (obj["apiVersion"], obj["kind"])
        if key in crd_schemas:
            jsonschema.validate({k: v for k, v in obj.items() if k not in ("apiVersion", "kind", "metadata")},
                                crd_schemas[key])
            continue
        try:
            kubernetes_validate.validate(obj, kube_version, strict=True)
        except kubernetes_validate.SchemaNotFoundError:
            assert obj["kind"] in FOREIGN_KINDS, f"{where}: no schema for {obj['apiVersion']} {obj['kind']}"
        except kubernetes_validate.ValidationError as err:
            pytest.fail(f"{where} is invalid for Kubernetes {kube_version}: {err}")


def test_strict_validation_rejects_an_unknown_field(rendered: Render) -> None:
    deployment = only(rendered(_scenario("default")), "Deployment")
    bad = json.loads(json.dumps(deployment))
    bad["spec"]["template"]["spec"]["containers"][0]["livenesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, KUBE_VERSIONS[-1], strict=True)


@pytest.mark.parametrize("scenario", SCENARIOS.values(), ids=SCENARIOS.keys())
def test_every_object_carries_the_standard_labels(rendered: Render, scenario: Path) -> None:
    for obj in rendered(scenario):
        if obj["kind"] == "CustomResourceDefinition":
            continue
        labels = obj["metadata"].get("labels", {})
        assert labels.get("app.kubernetes.io/name") == "kvpilot", obj["metadata"]["name"]
        assert labels.get("app.kubernetes.io/instance") == RELEASE
        assert labels.get("app.kubernetes.io/version") == "0.1.0"
        assert labels.get("app.kubernetes.io/managed-by") == "Helm"
        assert labels.get("helm.sh/chart") == "kvpilot-0.1.0"
        assert len(obj["metadata"]["name"]) <= 63


def test_long_release_names_are_truncated_to_63_characters(helm: Helm) -> None:
    release = "a-very-long-release-name-that-goes-on-and-on-past-the-dns-label-limit"[:53]
    objects = helm.render(release=release)
    deployment = only(objects, "Deployment")
    assert len(deployment["metadata"]["name"]) <= 63
    assert not deployment["metadata"]["name"].endswith("-")


def test_selector_labels_select_the_pods_and_service(rendered: Render) -> None:
    objects = rendered(_scenario("default"))
    deployment, service = only(objects, "Deployment"), only(objects, "Service")
    selector = deployment["spec"]["selector"]["matchLabels"]
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert selector.items() <= pod_labels.items()
    assert service["spec"]["selector"].items() <= pod_labels.items()
    port_names = {p["name"] for p in operator_container(objects)["ports"]}
    assert {p["targetPort"] for p in service["spec"]["ports"]} <= port_names


# --- the operator's command line ---------------------------------------------------------------

def _flag(args: list[str], flag: str) -> str:
    return args[args.index(flag) + 1]


def test_default_watches_all_namespaces_standalone(rendered: Render) -> None:
    objects = rendered(_scenario("default"))
    args = _args(objects)
    assert args[0] == "operator"
    assert "--namespace" not in args, "no --namespace: the operator watches every namespace"
    assert "--standalone" in args and "--peering" not in args
    assert not of_kind(objects, "ClusterKopfPeering") and not of_kind(objects, "KopfPeering")
    assert only(objects, "Deployment")["spec"]["replicas"] == 1
    assert only(objects, "Deployment")["spec"]["strategy"] == {"type": "Recreate"}, "never two standalone operators"


def test_namespaced_passes_each_namespace(rendered: Render) -> None:
    args = _args(rendered(_scenario("namespaced")))
    assert [args[i + 1] for i, arg in enumerate(args) if arg == "--namespace"] == ["team-a", "team-b"]


def test_ha_replicas_share_a_cluster_peering(rendered: Render) -> None:
    objects = rendered(_scenario("ha"))
    args = _args(objects)
    assert only(objects, "Deployment")["spec"]["replicas"] == 2
    assert only(objects, "Deployment")["spec"]["strategy"]["type"] == "RollingUpdate"
    assert "--standalone" not in args
    assert only(objects, "ClusterKopfPeering")["metadata"]["name"] == _flag(args, "--peering")
    assert _env(objects)["POD_ID"] == {"fieldRef": {"fieldPath": "metadata.name"}}  # kopf's peer identity


def test_ha_namespaced_has_a_peering_in_each_namespace(helm: Helm) -> None:
    objects = helm.render([_scenario("namespaced")], ["replicaCount=2"])
    peering = _flag(_args(objects), "--peering")
    peerings = of_kind(objects, "KopfPeering")
    assert {(p["metadata"]["namespace"], p["metadata"]["name"]) for p in peerings} == {
        ("team-a", peering), ("team-b", peering)}
    assert not of_kind(objects, "ClusterKopfPeering")


def test_probes_hit_the_liveness_endpoint_the_operator_is_told_to_serve(helm: Helm,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    objects = helm.render(sets=["livenessPort=8181"])
    container = operator_container(objects)
    assert _flag(container["args"], "--liveness-port") == "8181"
    seen: list[OperatorConfig] = []  # the operator's own parser reads the chart's arguments
    monkeypatch.setattr("kvpilot.operator.main.run", seen.append)
    args = build_parser().parse_args(container["args"])
    assert args.run(args) == 0 and seen[0].liveness_url == "http://0.0.0.0:8181/healthz"
    health = next(p for p in container["ports"] if p["name"] == "health")
    assert health["containerPort"] == 8181
    for probe in ("livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"] == {"path": "/healthz", "port": "health"}


def test_metrics_service_reaches_the_port_the_operator_serves(helm: Helm) -> None:
    objects = helm.render(sets=["metrics.port=9191"])
    container, service = operator_container(objects), only(objects, "Service")
    assert _flag(container["args"], "--metrics-port") == "9191"
    assert next(p for p in container["ports"] if p["name"] == "metrics")["containerPort"] == 9191
    assert service["spec"]["ports"] == [{"name": "metrics", "port": 9191, "targetPort": "metrics", "protocol": "TCP"}]
    off = helm.render(sets=["metrics.enabled=false"])
    assert "--metrics-port" not in operator_container(off)["args"] and not of_kind(off, "Service")


def test_images_are_pinned_by_tag_and_by_digest_when_given(rendered: Render) -> None:
    default, pinned = rendered(_scenario("default")), rendered(_scenario("all-optional"))
    assert operator_container(default)["image"] == "ghcr.io/kvpilot/operator:0.1.0"
    assert _env(default)["KVPILOT_RUNTIME_IMAGE"] == "ghcr.io/kvpilot/runtime:0.1.0"
    digest = re.compile(r"^ghcr\.io/kvpilot/(operator|runtime):0\.1\.0@sha256:[0-9a-f]{64}$")
    assert digest.match(operator_container(pinned)["image"])
    assert digest.match(_env(pinned)["KVPILOT_RUNTIME_IMAGE"])


def test_operator_settings_reach_the_operator(rendered: Render) -> None:
    default, tuned = rendered(_scenario("default")), rendered(_scenario("all-optional"))
    assert "--prometheus-url" not in _args(default), "unset: the operator keeps its own default"
    assert _flag(_args(tuned), "--prometheus-url") == "http://kube-prometheus-stack-prometheus.monitoring.svc:9090"
    assert _env(tuned)["HF_ENDPOINT"] == "https://hf-mirror.internal.example"  # extraEnv


@pytest.mark.parametrize("scenario", SCENARIOS.values(), ids=SCENARIOS.keys())
def test_chart_args_parse_with_the_real_cli(rendered: Render, scenario: Path) -> None:
    """The arguments the chart gives `kvpilot` are ones its `operator` subcommand accepts (parsed, not run)."""
    args = operator_cli().parse_args(_args(rendered(scenario)))
    assert callable(args.run)


# --- RBAC --------------------------------------------------------------------------------------

def _rules(role: Manifest) -> dict[tuple[str, str], set[str]]:
    """(apiGroup, resource) -> verbs."""
    rules: dict[tuple[str, str], set[str]] = {}
    for rule in role["rules"]:
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                rules.setdefault((group, resource), set()).update(rule["verbs"])
    return rules


@pytest.mark.parametrize("scenario", SCENARIOS.values(), ids=SCENARIOS.keys())
def test_rbac_has_no_wildcards(rendered: Render, scenario: Path) -> None:
    for role in of_kind(rendered(scenario), "ClusterRole") + of_kind(rendered(scenario), "Role"):
        for rule in role["rules"]:
            assert "*" not in rule["apiGroups"] + rule["resources"] + rule["verbs"], rule
            assert "resourceNames" not in rule or rule["resourceNames"]


def test_cluster_wide_rbac_grants_what_the_operator_uses(rendered: Render) -> None:
    objects = rendered(_scenario("default"))
    rules = _rules(only(objects, "ClusterRole"))
    assert not of_kind(objects, "Role")
    assert rules[("kvpilot.io", "llmdeployments")] == {"get", "list", "watch", "patch"}
    assert rules[("kvpilot.io", "llmdeployments/status")] == {"get", "patch"}
    assert rules[("kvpilot.io", "llmdeployments/finalizers")] == {"update"}
    crud = {"get", "list", "watch", "create", "patch", "delete"}  # kube.py merge-patches, never PUTs
    for child in [("apps", "deployments"), ("leaderworkerset.x-k8s.io", "leaderworkersets"), ("", "services"),
                  ("policy", "poddisruptionbudgets"), ("autoscaling", "horizontalpodautoscalers"),
                  ("keda.sh", "scaledobjects"), ("monitoring.coreos.com", "servicemonitors")]:
        assert rules[child] == crud, child
    assert rules[("", "pods")] == {"get", "list", "watch"}
    assert rules[("", "events")] == {"create"}
    assert rules[("apiextensions.k8s.io", "customresourcedefinitions")] == {"get", "list", "watch"}
    assert rules[("kopf.dev", "clusterkopfpeerings")] == {"get", "list", "watch", "patch"}
    assert rules[("", "secrets")] == {"get"}, "only the token Secret an LLMDeployment names, never list/watch"
    binding = only(objects, "ClusterRoleBinding")
    assert binding["roleRef"]["name"] == only(objects, "ClusterRole")["metadata"]["name"]
    account = only(objects, "ServiceAccount")["metadata"]["name"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": account, "namespace": NAMESPACE}]


def test_rbac_matches_the_kinds_the_operator_manages(rendered: Render) -> None:
    """Every child kind in operator/kube.py is granted, and nothing else is written."""
    from kvpilot.operator.resources import CHILD_RESOURCES, LLMDEPLOYMENTS

    rules = _rules(only(rendered(_scenario("default")), "ClusterRole"))
    children = {(r.group, r.plural) for r in CHILD_RESOURCES.values()}
    for child in children:
        assert {"create", "patch", "delete", "list", "watch"} <= rules.get(child, set()), child
    writable = {key for key, verbs in rules.items() if verbs & {"create", "patch", "update", "delete"}}
    ours = {(LLMDEPLOYMENTS.group, LLMDEPLOYMENTS.plural + sub) for sub in ("", "/status", "/finalizers")}
    peering = {("kopf.dev", "clusterkopfpeerings")}
    assert writable - children - ours - peering == {("", "events")}


def test_namespaced_rbac_is_a_role_per_namespace(rendered: Render) -> None:
    objects = rendered(_scenario("namespaced"))
    cluster_rules = _rules(only(objects, "ClusterRole"))
    assert not any(group == "kvpilot.io" or resource in {"deployments", "services", "pods"}
                   for group, resource in cluster_rules), "namespaced mode must not grant cluster-wide writes"
    roles, bindings = of_kind(objects, "Role"), of_kind(objects, "RoleBinding")
    assert sorted(r["metadata"]["namespace"] for r in roles) == ["team-a", "team-b"]
    assert sorted(b["metadata"]["namespace"] for b in bindings) == ["team-a", "team-b"]
    for role in roles:
        rules = _rules(role)
        assert ("kvpilot.io", "llmdeployments") in rules and ("apps", "deployments") in rules
        assert ("kopf.dev", "kopfpeerings") in rules
    for binding in bindings:
        assert binding["subjects"][0]["namespace"] == NAMESPACE


def test_rbac_and_service_account_are_independent(helm: Helm) -> None:
    no_rbac = helm.render(sets=["rbac.create=false"])
    assert not {"ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding"} & {o["kind"] for o in no_rbac}
    assert of_kind(no_rbac, "ServiceAccount")
    no_sa = helm.render(sets=["serviceAccount.create=false", "serviceAccount.name=platform-operator"])
    assert not of_kind(no_sa, "ServiceAccount")
    assert only(no_sa, "Deployment")["spec"]["template"]["spec"]["serviceAccountName"] == "platform-operator"
    assert only(no_sa, "ClusterRoleBinding")["subjects"][0]["name"] == "platform-operator"


# --- optional parts ----------------------------------------------------------------------------

def test_service_monitor_scrapes_the_metrics_service(rendered: Render) -> None:
    objects = rendered(_scenario("all-optional"))
    monitor, service = only(objects, "ServiceMonitor"), only(objects, "Service")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["namespace"] == "monitoring"
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert {e["port"] for e in monitor["spec"]["endpoints"]} <= {p["name"] for p in service["spec"]["ports"]}
    assert not of_kind(rendered(_scenario("default")), "ServiceMonitor")


def _config_map(objects: list[Manifest], suffix: str) -> Manifest:
    return next(o for o in of_kind(objects, "ConfigMap") if o["metadata"]["name"].endswith(suffix))


def test_adapter_rule_serves_kv_cache_usage_as_a_pods_metric(rendered: Render) -> None:
    config_map = _config_map(rendered(_scenario("all-optional")), "-adapter-rules")
    assert config_map["metadata"]["namespace"] == "monitoring"
    (rule,) = yaml.safe_load(config_map["data"]["config.yaml"])["rules"]
    assert rule["seriesQuery"].startswith("vllm:kv_cache_usage_perc{")
    assert rule["resources"]["overrides"] == {"namespace": {"resource": "namespace"}, "pod": {"resource": "pod"}}
    assert rule["name"]["as"] == ADAPTER_KV_METRIC, "the metric name the operator's HPAs ask for"
    assert rule["seriesQuery"].startswith(KV_METRIC + "{")
    assert "<<.Series>>" in rule["metricsQuery"] and "<<.GroupBy>>" in rule["metricsQuery"]


def _dashboard(objects: list[Manifest]) -> dict[str, Any]:
    config_map = _config_map(objects, "-dashboard")
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    return json.loads(config_map["data"]["kvpilot.json"])


def _panel_exprs(dashboard: dict[str, Any]) -> list[str]:
    return [t["expr"] for panel in dashboard["panels"] for t in panel.get("targets", [])]


def test_dashboard_shows_kv_queue_ttft_and_tokens_per_deployment(rendered: Render) -> None:
    dashboard = _dashboard(rendered(_scenario("all-optional")))
    exprs = _panel_exprs(dashboard)
    used = {m for e in exprs for m in re.findall(r"vllm:[a-z0-9_]+", e)}
    assert used >= DASHBOARD_METRICS, f"dashboard misses {DASHBOARD_METRICS - used}"
    assert all('model_name=~"$model"' in e for e in exprs), "every panel filters by the model variable"
    assert any("by (le, namespace, model_name)" in e for e in exprs if "_bucket" in e)
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert {"datasource", "namespace", "model"} <= variables.keys()
    assert "model_name" in variables["model"]["definition"]
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))


def test_dashboard_metrics_are_ones_the_runtime_exports() -> None:
    # names live in the metrics module or, for those the operator reads too, in the pod contract
    source = "".join((ROOT / "runtime" / path).read_text() for path in ("server/metrics.py", "contract.py"))
    dashboard = json.loads((CHART / "dashboards" / "kvpilot.json").read_text())
    used = {m for e in _panel_exprs(dashboard) for m in re.findall(r"vllm:[a-z0-9_]+", e)}
    family = {re.sub(r"_(total|bucket|count|sum)$", "", m) for m in used}
    missing = sorted(m for m in family if f'"{m}"' not in source)
    assert not missing, f"the dashboard reads metrics runtime/server/metrics.py does not export: {missing}"


def test_optional_parts_are_off_by_default(rendered: Render) -> None:
    objects = rendered(_scenario("default"))
    assert not of_kind(objects, "ConfigMap") and not of_kind(objects, "ServiceMonitor")
    assert only(objects, "Service")["spec"]["ports"][0]["name"] == "metrics"
