#!/usr/bin/env bash
# The second device call, after bench/gpu_check.sh: the engine on the GPU (bf16), each against its peer in
# the same run, on a model built there (bench/gpu_model.py: Llama-3.2-1B's shape, random weights, the
# SmolLM2 tokenizer; nothing is downloaded). Runs in the device's own image (python3 with torch and transformers;
# kvpilot's portions are put on the path, no pydantic/fastapi/kopf/gguf needed); installs only the wheels
# bench/gpu_wheels.sh saved under .whl (llguidance), into a temporary folder (bench/gpu_env.sh).
#   bash bench/gpu_engine.sh            # JSON lines under $OUT (default ./out): model.json, throughput.jsonl,
#                                       # quantization.jsonl, gpu_memory.jsonl, gpu_offload.jsonl
#   bash bench/gpu_engine.sh --dry-run  # no GPU: the same steps on the CPU with a tiny model, to check the script
# throughput.py:   continuous batching vs HF generate (static batch and one at a time) on the same GPU;
# quantization.py: int8 / int4 / fp8 weights and the fp8 KV cache vs the bf16 model (bytes held vs planned,
#                  kept first tokens, tokens/s: the Triton quantized matmuls and fp8 attention at work).
# gpu_memory.py:   the memory model's plan for this GPU vs the allocator and NVML, per part (weights, KV cache,
#                  activations, non-torch), after the load, after the KV allocation and at the peak of a
#                  full-budget step; TP=2 when two GPUs are visible (else one "skipped" line). Exit 1 when a
#                  measured part is above its plan.
# gpu_offload.py:  half the layers' weights streamed from pinned host memory vs none: decode tokens/s at batch
#                  1 and 32, the host->device link measured, the copy-bound prediction, the same tokens.
# Budget: model build ~30 s, throughput ~3 min (160 requests, was 256), quantization ~2.5 min (48 output tokens,
# was 64), gpu_memory ~1 min (timeout 150 s; the plan fills the GPU with KV, zeroed in well under a second),
# gpu_offload ~1 min (timeout 150 s): under 9 minutes on an H100/H200.
# Exit status: 0 all ran, 1 a bench failed, 2 bad usage or no CUDA device.
set -uo pipefail
cd "$(dirname "$0")/.."
case "${1:-}" in
    "") dry_run=0 ;;
    --dry-run) dry_run=1 ;;
    *) echo "usage: bash bench/gpu_engine.sh [--dry-run]" >&2; exit 2 ;;
esac
OUT="${OUT:-./out}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"  # absolute: the steps run from bench/
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET

. bench/gpu_env.sh gpu_engine  # kvpilot on the path, wheels from .whl (bench/gpu_wheels.sh), llguidance there

model_dir="$(mktemp -d)/model"
if [ "$dry_run" -eq 1 ]; then
    device=cpu
    model_args=(--shape tiny --device cpu --dtype fp32)
    throughput_args=(--num-requests 4 --sequential-requests 2 --max-num-seqs 4)
    quant_args=(--output-len 4)
    memory_args=(--dry-run)
    offload_args=(--dry-run)
else
    if ! python3 -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then
        echo "gpu_engine: torch sees no CUDA device, nothing was run (on a machine without a GPU: --dry-run)" >&2
        exit 2
    fi
    device=cuda
    memory_args=()
    offload_args=()
    model_args=(--shape llama-3.2-1b --device cuda --dtype bf16)
    throughput_args=(--num-requests 64 --max-num-seqs 64)
    quant_args=(--output-len 24)
fi

python3 bench/gpu_model.py "$model_dir" "${model_args[@]}" | tee "$OUT/model.json" || exit 1
cd bench
timeout 120 python3 throughput.py --device "$device" --model "$model_dir" "${throughput_args[@]}" \
    | tee "$OUT/throughput.jsonl"
throughput_rc=${PIPESTATUS[0]}
timeout 120 python3 quantization.py --device "$device" --model "$model_dir" "${quant_args[@]}" \
    | tee "$OUT/quantization.jsonl"
quant_rc=${PIPESTATUS[0]}
timeout 90 python3 gpu_memory.py "$model_dir" ${memory_args[@]+"${memory_args[@]}"} | tee "$OUT/gpu_memory.jsonl"
memory_rc=${PIPESTATUS[0]}
timeout 90 python3 gpu_offload.py "$model_dir" ${offload_args[@]+"${offload_args[@]}"} | tee "$OUT/gpu_offload.jsonl"
offload_rc=${PIPESTATUS[0]}
echo "throughput rc=$throughput_rc, quantization rc=$quant_rc, gpu_memory rc=$memory_rc, gpu_offload rc=$offload_rc" \
     "(JSON lines in $OUT)"
[ "$throughput_rc" -eq 0 ] && [ "$quant_rc" -eq 0 ] && [ "$memory_rc" -eq 0 ] && [ "$offload_rc" -eq 0 ] || exit 1
