#!/usr/bin/env bash
# One device call: the kernel tests on the GPU, then the kernel benchmark. Installs nothing but the wheels
# bench/gpu_wheels.sh saved under .whl (into a temporary folder: bench/gpu_env.sh).
#   bash bench/gpu_check.sh            # results under $OUT (default ./out): kernel_tests.log, gpu_kernels.jsonl
#   bash bench/gpu_check.sh --dry-run  # no GPU: the same steps on the CPU (tests through the Triton interpreter,
#                                      # the bench's one tiny case per section), to check the script itself
# Fits one 10-minute device call: tests ~1-2 min (Triton compiles), bench stops starting cases after 200 s.
# Exit status: 0 all passed, 1 tests or bench failed, 2 bad usage or no CUDA device.
set -uo pipefail
cd "$(dirname "$0")/.."
case "${1:-}" in
    "") dry_run=0 ;;
    --dry-run) dry_run=1 ;;
    *) echo "usage: bash bench/gpu_check.sh [--dry-run]" >&2; exit 2 ;;
esac
OUT="${OUT:-./out}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 OUT
unset TRITON_INTERPRET  # compiled kernels on the GPU; on the CPU the kernel tests' conftest sets it itself

. bench/gpu_env.sh gpu_check  # kvpilot on the path, wheels from .whl (bench/gpu_wheels.sh), llguidance there

python3 -c "
import torch, triton
print('torch', torch.__version__, 'triton', triton.__version__,
      torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA device')" || exit 2
if [ "$dry_run" -eq 1 ]; then
    device=cpu
    bench_args=(--dry-run)
    tests_limit=1800  # the interpreter on a CPU runs the kernel tests for many minutes
else
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
    if ! python3 -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then
        echo "gpu_check: torch sees no CUDA device, nothing was run (on a machine without a GPU: --dry-run)" >&2
        exit 2
    fi
    device=cuda
    bench_args=(--budget-s 90)
    tests_limit=240
fi

# the kernels' own tests: not the bench's tests (the bench runs next, for real) nor the CPU-only compile check
KVPILOT_KERNEL_DEVICE=$device timeout "$tests_limit" python3 -m pytest tests/kernels -q --maxfail=30 -p no:cacheprovider \
    --ignore=tests/kernels/test_gpu_bench_script.py --ignore=tests/kernels/test_gpu_compile.py 2>&1 \
    | tee "$OUT/kernel_tests.log"
tests_rc=${PIPESTATUS[0]}

timeout 150 python3 bench/gpu_kernels.py --out "$OUT" "${bench_args[@]}"
bench_rc=$?

echo "kernel tests rc=$tests_rc, bench rc=$bench_rc (JSON lines in $OUT/gpu_kernels.jsonl)"
[ "$tests_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ] || exit 1
