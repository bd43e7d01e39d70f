"""Predicted vs measured memory, per part, for /metrics and the operator's status.

Measured figures are only what the process can really see: tensor bytes of the weights, the rotary
cos/sin tables and the KV pool everywhere; on CUDA also the activation peak (allocator high-water
mark less those three) and the memory outside torch's allocator (CUDA context, NCCL) from pynvml.
On the CPU those two are not reported rather than guessed.
"""

from __future__ import annotations

import os

import torch

from kvpilot.runtime.loading.loader import host_weight_bytes, rotary_table_bytes_held, weight_bytes_held
from kvpilot.runtime.memory.nvml import nvml
from kvpilot.runtime.memory.planner import Plan
from kvpilot.runtime.server.metrics import MemoryFigures


def process_gpu_bytes(device_index: int) -> int | None:
    with nvml() as pynvml:
        if pynvml is None:
            return None
        handle = pynvml.nvmlDeviceGetHandleByIndex(device_index)
        for proc in pynvml.nvmlDeviceGetComputeRunningProcesses(handle):
            if proc.pid == os.getpid():
                return int(proc.usedGpuMemory or 0)
        return None


def memory_figures(engine, plan: Plan) -> MemoryFigures:
    """`engine` is the running LLMEngine; `plan` the memory model's plan for its config."""
    config = engine.config
    kv_planned = config.num_kv_blocks * plan.kv_block_bytes
    planned = {"weights": plan.memory.weights, "rotary_tables": plan.memory.rotary_tables, "kv_cache": kv_planned,
               "activations": plan.memory.activations, "other": plan.memory.overhead}
    weights, rotary = weight_bytes_held(engine.loaded.model), rotary_table_bytes_held(engine.loaded.model)
    kv = engine.runner.kv_cache.nbytes
    measured = {"weights": weights, "rotary_tables": rotary, "kv_cache": kv}
    host_weights = host_weight_bytes(engine.loaded.model)
    if plan.host_weight_bytes:  # offloaded layers, in host memory ("weights" holds their staging buffers)
        planned["host_weights"] = plan.host_weight_bytes
    if host_weights:
        measured["host_weights"] = host_weights
    if engine.host_tier is not None:  # host memory, whatever the device
        planned["host_kv_cache"] = config.host_kv_blocks * plan.kv_block_bytes
        measured["host_kv_cache"] = engine.host_tier.nbytes
    device = engine.device
    if device.type == "cuda":
        measured["activations"] = max(0, torch.cuda.max_memory_allocated(device) - weights - rotary - kv)
        process = process_gpu_bytes(device.index or 0)
        if process is not None:
            measured["other"] = max(0, process - torch.cuda.memory_reserved(device))
    return MemoryFigures(planned, measured)
