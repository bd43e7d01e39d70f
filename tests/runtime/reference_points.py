"""Published start-up measurements of vLLM: the KV cache a GPU really held, with the settings it ran.

Each row is one `vllm serve` start-up: its log's "GPU KV cache size: N tokens", the engine settings
that sized its activations (max_num_batched_tokens, max_num_seqs) and the source. The memory model
plans each row with the same settings and vLLM's sampler figure, and must land within
[-15%, +3%] of the measured tokens (tests/runtime/test_reference_points.py).

Sources:
- LLMD: llm-d-planner's accuracy sweep, vLLM v0.19.0 on H100-80GB, gpu_memory_utilization 0.95,
  max_num_batched_tokens 8192 (the logs say so), max_num_seqs 1024 (vLLM's default on H100 for
  `vllm serve`); the per-run logs under accuracy/results/v0.19.0/logs/.
"""

from __future__ import annotations

from dataclasses import dataclass

# vLLM's sampler peak per logit, measured: the activation peak it logs ("torch peak memory
# increase") divided by max_num_seqs x vocab is 3.7-3.9 fp32 copies for every dense model of the
# LLMD sweep (Llama-3.1-8B 1.89 GiB, Qwen2.5-7B 2.21, gemma-2-9b 3.65, Qwen2.5-72B TP2 2.29).
VLLM_SAMPLER_BYTES_PER_LOGIT = 16

_LLMD = "https://github.com/llm-d-incubation/llm-d-planner/blob/d3121e059da88662db39a926a3ead964be97359b/accuracy/results/v0.19.0/logs/"


@dataclass(frozen=True)
class ReferencePoint:
    model: str  # catalog key
    gpu: str  # catalog GPU
    tp: int
    quantization: str  # the memory model's mode that stores what the checkpoint stored
    kv_dtype: str
    measured_tokens: int  # "GPU KV cache size: N tokens"
    source: str
    gpu_memory_utilization: float = 0.95
    max_batched_tokens: int = 8192
    max_num_seqs: int = 1024
    max_context: int = 8192
    block_size: int = 16
    checkpoint: str | None = None  # a pre-quantized checkpoint's quantization_config (CHECKPOINTS key)


def _ct(kind: str, strategy: str = "channel", bits: int = 8, **weights) -> dict:
    """quantization_config as llm-compressor writes it for its FP8_DYNAMIC / W8A8 / W4A16 schemes."""
    fmt = {"float": "float-quantized", "int": "int-quantized" if bits == 8 else "pack-quantized"}[kind]
    return {"quant_method": "compressed-tensors", "format": fmt, "ignore": ["lm_head"],
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": {
                "num_bits": bits, "type": kind, "strategy": strategy, "symmetric": True, "dynamic": False,
                **weights}}}}


# The configs of the checkpoints the rows below measured, in their writers' format.
CHECKPOINTS: dict[str, dict] = {
    "fp8-dynamic": _ct("float"),
    "w8a8": _ct("int"),
    # RedHatAI's w4a16 Llama-3.1-8B is a GPTQ checkpoint (vLLM loaded it as gptq_marlin); its desc_act
    # is not known here and changes no byte (g_idx is stored either way).
    "gptq-w4a16": {"quant_method": "gptq", "bits": 4, "group_size": 128, "sym": True, "desc_act": False},
}


REFERENCE_POINTS: list[ReferencePoint] = [
    ReferencePoint("llama-3.1-8b", "h100-80gb", 1, "bf16", "bf16", 476_016,
                   _LLMD + "meta-llama-llama-3-1-8b---h100-80gb--tp1pp1dp1--8192.log"),
    ReferencePoint("llama-3.1-8b", "h100-80gb", 2, "bf16", "bf16", 1_044_688,
                   _LLMD + "meta-llama-llama-3-1-8b---h100-80gb--tp2pp1dp1--8192.log"),
    ReferencePoint("llama-3.1-8b", "h100-80gb", 4, "bf16", "bf16", 2_209_792,
                   _LLMD + "meta-llama-llama-3-1-8b---h100-80gb--tp4pp1dp1--8192.log"),
    ReferencePoint("llama-3.1-8b", "h100-80gb", 1, "bf16", "fp8", 952_032,
                   _LLMD + "meta-llama---h100-80gb--tp1pp1dp1--8192-dtbf16-kvfp8.log"),
    ReferencePoint("llama-3.1-8b", "h100-80gb", 1, "fp8", "bf16", 529_248,
                   _LLMD + "meta-llama-llama-3---h100-80gb--tp1pp1dp1--8192-qfp8.log"),
    ReferencePoint("llama-3.1-8b", "h100-80gb", 1, "fp32", "fp32", 175_296,
                   _LLMD + "meta-llama-llama-3--h100-80gb--tp1pp1dp1--8192-dtf32.log"),
    ReferencePoint("qwen2.5-7b", "h100-80gb", 1, "bf16", "bf16", 1_096_000,
                   _LLMD + "qwen-qwen2-5-7b-instruct--h100-80gb--tp1pp1dp1--8192.log"),
    ReferencePoint("qwen2.5-7b", "h100-80gb", 2, "bf16", "bf16", 2_390_592,
                   _LLMD + "qwen-qwen2-5-7b-instruct--h100-80gb--tp2pp1dp1--8192.log"),
    ReferencePoint("qwen2.5-7b", "h100-80gb", 4, "bf16", "bf16", 5_043_280,
                   _LLMD + "qwen-qwen2-5-7b-instruct--h100-80gb--tp4pp1dp1--8192.log"),
    ReferencePoint("qwen2.5-7b", "h100-80gb", 1, "bf16", "fp8", 2_192_000,
                   _LLMD + "qwen-qwen2---h100-80gb--tp1pp1dp1--8192-dtbf16-kvfp8.log"),
    # The tight fit: 72B in bf16 on two H100 leaves ~3 GiB per GPU for KV.
    ReferencePoint("qwen2.5-72b", "h100-80gb", 2, "bf16", "bf16", 19_920,
                   _LLMD + "qwen-qwen2-5-72b-instruc--h100-80gb--tp2pp1dp1--8192.log"),
    ReferencePoint("gemma-2-9b", "h100-80gb", 1, "bf16", "bf16", 168_880,
                   _LLMD + "google-gemma-2-9b-it--h100-80gb--tp1pp1dp1--8192.log"),
    # Llama-3.3-70B has Llama-3.1-70B's shapes; fp8-dynamic: fp8 linears, per-channel scales.
    ReferencePoint("llama-3.1-70b", "h100-80gb", 2, "fp8", "bf16", 244_304,
                   _LLMD + "fp8dyn-llama-3-3-70b--h100-80gb--tp2pp1dp1--8192.log", checkpoint="fp8-dynamic"),
    ReferencePoint("llama-3.1-70b", "h100-80gb", 4, "fp8", "bf16", 708_992,
                   _LLMD + "fp8dyn-llama-3-3-70b--h100-80gb--tp4pp1dp1--8192.log", checkpoint="fp8-dynamic"),
    # The other tight fit: a 70B int8 checkpoint on two H100 (it does not fit one).
    ReferencePoint("llama-3.1-70b", "h100-80gb", 2, "int8", "bf16", 244_304,
                   _LLMD + "redhatai-llama-3-3-70b-i--h100-80gb--tp2pp1dp1--8192.log", checkpoint="w8a8"),
    ReferencePoint("qwen2.5-7b", "h100-80gb", 1, "int8", "bf16", 1_210_272,
                   _LLMD + "w8a8-redhatai-qwen2-5-7b--h100-80gb--tp1pp1dp1--8192.log", checkpoint="w8a8"),
    ReferencePoint("qwen2.5-7b", "h100-80gb", 1, "fp8", "bf16", 1_210_304,
                   _LLMD + "fp8dyn-redhatai-qwen2-5---h100-80gb--tp1pp1dp1--8192.log", checkpoint="fp8-dynamic"),
    ReferencePoint("llama-3.1-8b", "h100-80gb", 1, "int4", "fp16", 554_704,
                   _LLMD + "w4a16-redhatai-lla--h100-80gb--tp1pp1dp1--8192-dtf16.log", checkpoint="gptq-w4a16"),
    # The same fp8 layout quantized at load time (--quantization fp8), no checkpoint config.
    ReferencePoint("llama-3.1-70b", "h100-80gb", 2, "fp8", "bf16", 244_304,
                   _LLMD + "fp8dyn-llama-3-3-70b--h100-80gb--tp2pp1dp1--8192.log"),
]
