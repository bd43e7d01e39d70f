"""scripts/setup.sh chooses torch's build as the README says (#11): the CUDA build where `nvidia-smi -L`
lists a GPU, else the CPU build (from a wheel pip finds, else PyTorch's CPU index), KVPILOT_TORCH
overriding; every install is held to constraints.txt.

The script runs for real; `python` and `nvidia-smi` are stand-ins on PATH that record each call and
install nothing."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TORCH = re.search(r"^torch==(\S+)", (ROOT / "constraints.txt").read_text(), re.M).group(1)
CPU_INDEX = "--extra-index-url https://download.pytorch.org/whl/cpu"

FAKE_PYTHON = """#!/usr/bin/env bash
echo "$*" >> "$CALLS"
case "$*" in
  *--dry-run*) exit "$FIND_WHEEL_RC" ;;
  "-c "*) echo "torch $TORCH_SEEN" ;;
esac
"""
NVIDIA_SMI_GPU = "#!/usr/bin/env bash\necho 'GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-0)'\n"
NVIDIA_SMI_NONE = "#!/usr/bin/env bash\necho 'No devices were found'\nexit 6\n"


def setup(tmp_path: Path, *args: str, gpu: bool, wheel_found: bool = True,
          choice: str | None = None) -> tuple[subprocess.CompletedProcess, list[str]]:
    """Run setup.sh with the stand-ins; its result and the python command lines it ran."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, text in (("python", FAKE_PYTHON), ("nvidia-smi", NVIDIA_SMI_GPU if gpu else NVIDIA_SMI_NONE)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    calls = tmp_path / "calls"
    calls.write_text("")
    env = {k: v for k, v in os.environ.items() if k not in ("KVPILOT_TORCH", "VIRTUAL_ENV")}
    env |= {"PATH": f"{bin_dir}:{env['PATH']}", "CALLS": str(calls), "FIND_WHEEL_RC": "0" if wheel_found else "1",
            "TORCH_SEEN": TORCH}
    if choice is not None:
        env["KVPILOT_TORCH"] = choice
    done = subprocess.run(["bash", str(ROOT / "scripts" / "setup.sh"), *args], env=env, capture_output=True,
                          text=True, timeout=60)
    return done, calls.read_text().splitlines()


def torch_install(calls: list[str]) -> str:
    (line,) = [c for c in calls if "torch=" in c and "--dry-run" not in c]
    assert "-c constraints.txt" in line, line
    return line


def test_a_gpu_gets_the_cuda_build(tmp_path):
    done, calls = setup(tmp_path, gpu=True)
    assert done.returncode == 0, done.stderr
    line = torch_install(calls)
    assert line.endswith(f" torch==={TORCH}") and CPU_INDEX not in line  # ===: never a local +cpu build
    assert f"torch {TORCH}, cuda build (nvidia-smi lists a GPU" in done.stdout
    assert not [c for c in calls if "--dry-run" in c]


@pytest.mark.parametrize(("wheel_found", "index"), [(True, ""), (False, f"{CPU_INDEX} ")],
                         ids=["wheel-found", "cpu-index"])
def test_no_gpu_gets_the_cpu_build_from_a_wheel_pip_finds_else_pytorchs_index(tmp_path, wheel_found, index):
    done, calls = setup(tmp_path, gpu=False, wheel_found=wheel_found)
    assert done.returncode == 0, done.stderr
    assert torch_install(calls).endswith(f" {index}torch=={TORCH}+cpu")
    assert f"torch {TORCH}, cpu build (no NVIDIA GPU found" in done.stdout


@pytest.mark.parametrize(("gpu", "choice", "pinned"), [(True, "cpu", f"torch=={TORCH}+cpu"),
                                                       (False, "cuda", f"torch==={TORCH}")],
                         ids=["cpu-on-a-gpu-machine", "cuda-without-a-gpu"])
def test_kvpilot_torch_overrides_the_choice(tmp_path, gpu, choice, pinned):
    done, calls = setup(tmp_path, gpu=gpu, choice=choice)
    assert done.returncode == 0, done.stderr
    assert torch_install(calls).endswith(f" {pinned}")
    assert f"{choice} build (KVPILOT_TORCH" in done.stdout


def test_the_rest_is_installed_at_the_locked_versions(tmp_path):
    done, calls = setup(tmp_path, "dev", gpu=False)
    assert done.returncode == 0, done.stderr
    (project,) = [c for c in calls if " -e " in c]
    assert "-c constraints.txt" in project and project.endswith("-e .[dev]")
    done, calls = setup(tmp_path, gpu=False)
    (project,) = [c for c in calls if " -e " in c]
    assert project.endswith("-e .")


@pytest.mark.parametrize(("args", "choice", "words"), [
    (["prod"], None, "unknown argument 'prod'"),
    ([], "rocm", "KVPILOT_TORCH must be cpu or cuda, not 'rocm'"),
], ids=["argument", "choice"])
def test_a_wrong_argument_or_choice_stops_before_installing(tmp_path, args, choice, words):
    done, calls = setup(tmp_path, *args, gpu=False, choice=choice)
    assert done.returncode == 2 and words in done.stderr
    assert not [c for c in calls if "install" in c and "--dry-run" not in c]
