#!/usr/bin/env bash
# Refreshes constraints.txt, the lock that scripts/setup.sh installs with: every runtime and dev
# dependency at one version, for every platform (`--universal`), on Python 3.11.
# pyproject.toml keeps the ranges (for those who install kvpilot as a library); constraints.txt holds
# the versions the tests passed with; scripts/lock-pins.txt holds the hand pins (torch's release).
# Needs uv (`pip install uv`): it compiles only; setup.sh installs with pip.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v uv >/dev/null || { echo "lock.sh: needs uv on PATH (pip install uv)" >&2; exit 2; }
uv pip compile pyproject.toml --extra dev --universal --python-version 3.11 \
  --constraint scripts/lock-pins.txt --custom-compile-command "bash scripts/lock.sh" --quiet -o constraints.txt "$@"
