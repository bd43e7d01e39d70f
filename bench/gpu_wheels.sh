#!/usr/bin/env bash
# The wheels bench/gpu_check.sh and bench/gpu_engine.sh need that the device's image lacks, for its Python 3.12
# (cp312, manylinux x86_64), saved under .whl/ (git-ignored). Today only llguidance: the engine imports it for
# structured output, and the image (transformers, safetensors, pytest, hypothesis, ...) does not hold it. The
# version is the one constraints.txt pins; about 3 MB, well under the 64 MiB a device call carries.
#   bash bench/gpu_wheels.sh     # here, where pip reaches the registry; then the device call carries .whl
#                                # (bench/gpu_env.sh installs them there into a temporary folder)
set -euo pipefail
cd "$(dirname "$0")/.."
NEEDED=(llguidance)
platforms=(--platform manylinux2014_x86_64)
for n in 17 24 27 28 31 34 35 39; do platforms+=(--platform "manylinux_2_${n}_x86_64"); done
rm -rf .whl
mkdir -p .whl
for name in "${NEEDED[@]}"; do
    pin="$(grep -i "^${name}==" constraints.txt)" || { echo "gpu_wheels: $name is not pinned in constraints.txt" >&2; exit 1; }
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        "${platforms[@]}" -d .whl "$pin"
done
ls -l .whl
du -ch .whl/*.whl | tail -1
