"""`kvpilot operator` as a user starts it: a process reading a kubeconfig, here pointing at the emulator."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp
import kmock
import pytest
import yaml
from eventually import eventually
from kube_emulator import Emulated, emulated_cluster
from llmd_cases import load_example
from prometheus_client.parser import text_string_to_metric_families

from kvpilot.cli.main import build_parser, main
from kvpilot.operator.main import OperatorConfig
from kvpilot.runtime.models.parallel import free_port


def kubeconfig(path: Path, server: str) -> Path:
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "emulator",
        "clusters": [{"name": "emulator", "cluster": {"server": server}}],
        "users": [{"name": "tester", "user": {"token": "unused"}}],
        "contexts": [{"name": "emulator", "context": {"cluster": "emulator", "user": "tester", "namespace": "ml"}}],
    }))
    return path


@pytest.mark.parametrize(("argv", "expected"), [
    (["operator"], OperatorConfig(peering=None)),  # by hand: standalone, it works on its own
    (["operator", "--standalone", "-n", "team-a", "--namespace", "team-b"],
     OperatorConfig(namespaces=["team-a", "team-b"], peering=None)),
    (["operator", "--peering", "kvpilot-ha", "--priority", "7", "--liveness-port", "0"],
     OperatorConfig(peering="kvpilot-ha", priority=7, liveness_port=None)),
    (["operator", "--metrics-port", "9090"], OperatorConfig(metrics_port=9090, metrics_address="0.0.0.0")),
    (["operator", "--metrics-address", "127.0.0.1", "--metrics-port", "9090", "--liveness-address", "::1",
      "--liveness-port", "8181"],
     OperatorConfig(metrics_address="127.0.0.1", metrics_port=9090, liveness_address="::1", liveness_port=8181)),
])
def test_flags(argv, expected, monkeypatch):
    seen = []
    monkeypatch.setattr("kvpilot.operator.main.run", lambda config: seen.append(config))
    args = build_parser().parse_args(argv)
    assert args.run(args) == 0 and seen == [expected]


def test_the_liveness_url_kopf_gets():
    assert OperatorConfig().liveness_url == "http://0.0.0.0:8080/healthz"
    assert OperatorConfig(liveness_address="::1", liveness_port=81).liveness_url == "http://[::1]:81/healthz"
    assert OperatorConfig(liveness_port=None).liveness_url is None


def test_standalone_and_peering_exclude_each_other(capsys):
    assert main(["operator", "--standalone", "--peering", "x"]) == 2
    assert "--peering: not allowed with argument --standalone" in capsys.readouterr().err


def samples(exposition: str) -> dict[tuple[str, frozenset], float]:
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(exposition) for s in family.samples}


@asynccontextmanager
async def operator_process(cluster: Emulated, tmp_path: Path, *flags: str) -> AsyncIterator[Path]:
    """`kvpilot operator FLAGS` as a user starts it (no peering flag), on a kubeconfig pointing at the
    cluster, until its liveness endpoint answers; yields its log (stderr, in a file: an undrained pipe
    would block the operator). SIGTERM at the end, and it must exit 0."""
    config = kubeconfig(tmp_path / "kubeconfig", str(cluster.emulator.url).rstrip("/"))
    liveness_port = free_port()
    log = tmp_path / "operator.log"
    process = await asyncio.create_subprocess_exec(
        # every namespace: kopf's observer of named namespaces needs a namespace list kmock cannot serve
        sys.executable, "-m", "kvpilot.cli.main", "operator",
        "--liveness-address", "127.0.0.1", "--liveness-port", str(liveness_port), *flags,
        env={**os.environ, "KUBECONFIG": str(config)}, stdout=asyncio.subprocess.DEVNULL, stderr=log.open("w"))
    try:
        async with aiohttp.ClientSession() as session:
            async def alive() -> bool:
                assert process.returncode is None, log.read_text()[-2000:]
                try:
                    async with session.get(f"http://127.0.0.1:{liveness_port}/healthz") as response:
                        return response.status == 200
                except aiohttp.ClientError:
                    return False

            await eventually(alive, 30, "the liveness endpoint answers")
        yield log
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), 30) == 0


@pytest.mark.asyncio
async def test_the_command_serves_liveness_metrics_and_reconciles(tmp_path: Path):
    metrics_port = free_port()
    async with emulated_cluster() as cluster, operator_process(
            cluster, tmp_path, "--log-format", "json", "--metrics-address", "127.0.0.1",
            "--metrics-port", str(metrics_port)) as log:
        manifest = load_example("smollm2")
        await cluster.create(manifest)
        await cluster.eventually(lambda: cluster.get("Deployment", "smollm2"), 30, log.name)
        await cluster.eventually(lambda: (cluster.get("LLMDeployment", "smollm2") or {}).get("status", {})
                                 .get("plan"), 30, log.name)
        assert '"message": "[ml/smollm2] Planned: fp32 weights' in log.read_text()  # json, object-prefixed
        assert "standalone: this operator acts alone" in log.read_text()
        async with aiohttp.ClientSession() as session, \
                session.get(f"http://127.0.0.1:{metrics_port}/metrics") as response:
            assert response.status == 200
            scraped = samples(await response.text())
        assert scraped[("kvpilot_operator_reconciles_total", frozenset({("result", "planned")}))] >= 1
        assert scraped[("kvpilot_operator_llmdeployments", frozenset({("planned", "true")}))] == 1
        created = {dict(labels)["kind"] for (name, labels), value in scraped.items()
                   if name == "kvpilot_operator_child_changes_total" and dict(labels)["action"] == "created"}
        assert {"Deployment", "Service"} <= created
        assert scraped[("kvpilot_operator_reconcile_duration_seconds_count", frozenset())] >= 1


def pod_lists(cluster: Emulated) -> int:
    """Autoscale ticks so far: each lists its LLMDeployment's pods."""
    return len(list(cluster.emulator[kmock.action.LIST, kmock.resource("", "v1", "pods")]))


def writes(cluster: Emulated) -> int:
    return sum(1 for r in cluster.emulator._requests if r.method.value.upper() in ("POST", "PATCH", "PUT", "DELETE"))


QUIET_RESYNC_SECONDS, QUIET_AUTOSCALE_SECONDS, QUIET_TICKS = 0.2, 0.05, 10


@pytest.mark.asyncio
async def test_a_quiet_run_of_five_llmdeployments_logs_no_line_per_tick(tmp_path: Path):
    """#17's "a 10-minute quiet run of 5 LLMDeployments holds no line per tick", with the timers
    shortened: the real process (kopf's logging as in production: every logger at INFO), once the five
    have converged, logs not one line while every timer of every object ticks ten times, nor for the
    children's status updates."""
    names = [f"quiet-{i}" for i in range(5)]
    async with emulated_cluster() as cluster, operator_process(
            cluster, tmp_path, "--resync-seconds", str(QUIET_RESYNC_SECONDS),
            "--autoscale-seconds", str(QUIET_AUTOSCALE_SECONDS)) as log:
        for name in names:
            await cluster.create(load_example("smollm2") | {"metadata": {"name": name}})
        await cluster.eventually(lambda: all((cluster.get("LLMDeployment", n) or {}).get("status", {}).get("plan")
                                             for n in names), 30, "five planned")

        async def settled() -> bool:  # no write (no apply, status patch or Event) during five ticks of each
            before, ticks = writes(cluster), pod_lists(cluster)
            await cluster.eventually(lambda: pod_lists(cluster) >= ticks + 5 * len(names), 30)
            return writes(cluster) == before

        await cluster.eventually(settled, 60, "the operator settles")
        assert all(f"[ml/{name}] Planned: fp32 weights" in log.read_text() for name in names)  # decisions: logged
        logged, start, ticks = log.stat().st_size, time.monotonic(), pod_lists(cluster)
        await cluster.eventually(lambda: pod_lists(cluster) >= ticks + QUIET_TICKS * len(names)
                                 and time.monotonic() - start >= QUIET_TICKS * QUIET_RESYNC_SECONDS,
                                 60, f"{QUIET_TICKS} ticks of each timer of each object")
        assert log.read_bytes()[logged:].decode() == ""
        # The children's own status updates (a rollout: pods becoming ready) reach the owners' status,
        # and are not a decision either: no line.
        for name in names:
            await cluster.patch("Deployment", name, {"status": {"replicas": 1, "readyReplicas": 1,
                                                                "updatedReplicas": 1}}, subresource="status")
        await cluster.eventually(lambda: all(cluster.get("LLMDeployment", n)["status"].get("readyReplicas") == 1
                                             for n in names), 30, "the rollout reaches the owners' status")
        ticks = pod_lists(cluster)
        await cluster.eventually(lambda: pod_lists(cluster) >= ticks + QUIET_TICKS * len(names), 60, "ticks")
        assert log.read_bytes()[logged:].decode() == ""
