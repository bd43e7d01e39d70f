#!/usr/bin/env bash
# One device call: the kernel tests on the GPU, then the kernel benchmark. Installs nothing.
#   bash bench/gpu_check.sh            # results under $OUT (default ./out): kernel_tests.log, gpu_kernels.jsonl
# Fits one 10-minute device call: tests ~1-2 min (Triton compiles), bench stops starting cases after 200 s.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-./out}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 OUT
unset TRITON_INTERPRET  # compiled kernels on the GPU, not the interpreter

# kvpilot may not be installed on a bare GPU machine: expose the repo's portions as the namespace package
if ! python3 -c "import kvpilot.kernels.ops" 2>/dev/null; then
    shim="$(mktemp -d)/kvpilot"
    mkdir -p "$shim"
    for part in kernels runtime operator; do ln -s "$PWD/$part" "$shim/$part"; done
    export PYTHONPATH="$(dirname "$shim")${PYTHONPATH:+:$PYTHONPATH}"
fi

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"

KVPILOT_KERNEL_DEVICE=cuda timeout 300 python3 -m pytest tests/kernels -q --maxfail=30 -p no:cacheprovider 2>&1 \
    | tee "$OUT/kernel_tests.log"
tests_rc=${PIPESTATUS[0]}

timeout 270 python3 bench/gpu_kernels.py --out "$OUT" --budget-s 200
bench_rc=$?

echo "kernel tests rc=$tests_rc, bench rc=$bench_rc (JSON lines in $OUT/gpu_kernels.jsonl)"
[ "$tests_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ]
