#!/usr/bin/env bash
# The second device call, after bench/gpu_check.sh: the engine on the GPU (bf16), each against its peer in
# the same run. Installs nothing; needs the package installed (scripts/setup.sh pulls torch for the CPU,
# so on a GPU machine use its CUDA torch: `pip install -e . --no-deps`).
#   bash bench/gpu_engine.sh     # JSON lines under $OUT (default ./out): quantization.jsonl, throughput.jsonl
# quantization.py: int8 / int4 / fp8 weights and the fp8 KV cache vs the bf16 model (bytes, kept tokens,
#                  tokens/s: the Triton quantized matmuls and fp8 attention at work);
# throughput.py:   continuous batching vs HF generate on the same GPU.
# Exit status: 0 all ran, 1 a bench failed, 2 no CUDA device.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-./out}"
mkdir -p "$OUT"
unset TRITON_INTERPRET
if ! python3 -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then
    echo "gpu_engine: torch sees no CUDA device, nothing was run" >&2
    exit 2
fi
cd bench
timeout 240 python3 quantization.py --device cuda --output-len 64 | tee "$OUT/quantization.jsonl"
quant_rc=${PIPESTATUS[0]}
timeout 300 python3 throughput.py --device cuda --num-requests 256 --max-num-seqs 128 | tee "$OUT/throughput.jsonl"
throughput_rc=${PIPESTATUS[0]}
echo "quantization rc=$quant_rc, throughput rc=$throughput_rc"
[ "$quant_rc" -eq 0 ] && [ "$throughput_rc" -eq 0 ] || exit 1
