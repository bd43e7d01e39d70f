"""The host KV tier's two numbers: how many blocks a byte budget of host memory holds, and whether a
preempted sequence is cheaper to swap to host memory and back than to recompute.

Pure Python: the plan (operator) and the engine (scheduler) read the same figures.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvpilot.runtime.memory.devices import PCIE_GEN4_X16_BYTES_PER_S, GiB

# Host <-> GPU copy bandwidth the engine's swap decision assumes: the catalog's PCIe Gen4 x16 figure
# (memory/devices.py; vLLM's offloading blog measures 20-25 GB/s per GPU for block-sized D2H/H2D copies
# too). The engine does not know its board's link; conservative for Gen5 and NVLink-C2C (GH200), which
# only make swap win more often.
HOST_LINK_BYTES_PER_S = PCIE_GEN4_X16_BYTES_PER_S
# On the CPU the "host link" is a memcpy inside one RAM: a few GB/s for one thread.
CPU_COPY_BYTES_PER_S = 4 * 10**9
# Prefill cost per token per layer. A GPU prefill of a 7-8B model (32 layers) runs ~10k tokens/s on
# an A100/H100 at batch 1 (vLLM's prefill throughput), ~3 us per token per layer. Both sides are linear
# in tokens, so swap wins when a layer's K/V per token is under link x cost / 2 = 37 KB: every model in
# bf16 over PCIe Gen4 (Llama-3-8B holds 4 KiB per token per layer); recompute wins over a slow link
# (PCIe Gen3 x4, a shared NIC) or when the host tier is full.
GPU_PREFILL_SECONDS_PER_TOKEN_LAYER = 3e-6
# kvpilot's CPU prefill of SmolLM2-135M (30 layers) in fp32 on 2 cores: ~400 tokens/s, ~80 us per token
# per layer: recompute on the CPU is always the slower choice.
CPU_PREFILL_SECONDS_PER_TOKEN_LAYER = 80e-6


@dataclass(frozen=True)
class SwapCost:
    """The cost model of swap preemption: copy out and back vs computing the tokens again."""

    link_bytes_per_s: float
    prefill_seconds_per_token_layer: float

    def swap_seconds(self, num_bytes: int) -> float:
        return 2 * num_bytes / self.link_bytes_per_s

    def recompute_seconds(self, num_tokens: int, num_layers: int) -> float:
        return num_tokens * num_layers * self.prefill_seconds_per_token_layer

    def swap_is_cheaper(self, num_bytes: int, num_tokens: int, num_layers: int) -> bool:
        return self.swap_seconds(num_bytes) < self.recompute_seconds(num_tokens, num_layers)


GPU_SWAP_COST = SwapCost(HOST_LINK_BYTES_PER_S, GPU_PREFILL_SECONDS_PER_TOKEN_LAYER)
CPU_SWAP_COST = SwapCost(CPU_COPY_BYTES_PER_S, CPU_PREFILL_SECONDS_PER_TOKEN_LAYER)


def swap_cost(device_kind: str) -> SwapCost:
    return CPU_SWAP_COST if device_kind == "cpu" else GPU_SWAP_COST


def host_tier_runs(tensor_parallel: int, pipeline_parallel: int, hybrid_windows: bool) -> bool:
    """The engine keeps a host KV tier on one GPU (no tensor or pipeline split) with one KV group, as its
    prefix cache (engine/config.py)."""
    return tensor_parallel == 1 and pipeline_parallel == 1 and not hybrid_windows


def host_kv_blocks(host_bytes: int, block_bytes: int) -> int:
    """Blocks of `block_bytes` (memory/kv_groups.kv_block_bytes) that `host_bytes` of host memory hold."""
    if host_bytes < 0:
        raise ValueError(f"host KV memory must be >= 0 bytes, got {host_bytes}")
    if block_bytes < 1:
        raise ValueError(f"a KV block has at least one byte, got {block_bytes}")
    return host_bytes // block_bytes


def describe_host_tier(num_blocks: int, block_bytes: int, block_size: int, kv_groups: int = 1) -> str:
    return (f"host KV tier: {num_blocks} blocks x {block_size} tokens = {num_blocks // kv_groups * block_size} tokens "
            f"({num_blocks * block_bytes / GiB:.2f} GiB of host memory): evicted prefix blocks and swapped "
            "sequences wait there instead of being recomputed")
