"""`kvpilot operator` as a user starts it: a process reading a kubeconfig, here pointing at the emulator."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

import aiohttp
import pytest
import yaml
from eventually import eventually
from kube_emulator import emulated_cluster
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


@pytest.mark.asyncio
async def test_the_command_serves_liveness_metrics_and_reconciles(tmp_path: Path):
    async with emulated_cluster() as cluster:
        config = kubeconfig(tmp_path / "kubeconfig", str(cluster.emulator.url).rstrip("/"))
        liveness_port, metrics_port = free_port(), free_port()
        liveness = f"http://127.0.0.1:{liveness_port}/healthz"
        log = tmp_path / "operator.log"  # a file, not a pipe: an undrained pipe would block the operator
        process = await asyncio.create_subprocess_exec(
            # every namespace: kopf's observer of named namespaces needs a namespace list kmock cannot serve
            # no peering flag: what a user starting it by hand types
            sys.executable, "-m", "kvpilot.cli.main", "operator", "--log-format", "json",
            "--liveness-address", "127.0.0.1", "--liveness-port", str(liveness_port),
            "--metrics-address", "127.0.0.1", "--metrics-port", str(metrics_port),
            env={**os.environ, "KUBECONFIG": str(config)},
            stdout=asyncio.subprocess.DEVNULL, stderr=log.open("w"))
        try:
            async with aiohttp.ClientSession() as session:
                async def alive() -> bool:
                    try:
                        async with session.get(liveness) as response:
                            return response.status == 200
                    except aiohttp.ClientError:
                        return False

                async def alive_or_exited() -> bool:
                    assert process.returncode is None, log.read_text()[-2000:]
                    return await alive()

                await eventually(alive_or_exited, 30, "the liveness endpoint answers")
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
        finally:
            if process.returncode is None:
                process.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(process.wait(), 30) == 0
