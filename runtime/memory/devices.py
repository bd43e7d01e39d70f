"""Accelerator facts: the GPU catalog, custom sizes, pynvml detection and the CPU as a device.

Memory figures are what CUDA can allocate: the total `torch.cuda.mem_get_info()` reports (the
same figure torch prints as "GPU 0 has a total capacity of ..." and vLLM as `total_gpu_memory`).
`nvidia-smi` shows 0.35-0.85 GiB more per GPU (the driver's own reservation): no allocator can use
that, so a plan sized on it over-promises KV cache by as much.
"""

from __future__ import annotations

import os
import re
from dataclasses import KW_ONLY, dataclass, replace

from kvpilot.runtime.memory.nvml import nvml

MiB = 1 << 20
GiB = 1 << 30

# Host <-> GPU copy bandwidth, one direction, as pinned-memory copies reach it (the link the host KV tier's
# swaps and weights offload's streamed layers cross), measured, not the link's peak:
# PCIe Gen3 x16 (16 GB/s peak): 12 GB/s into a V100, https://github.com/ZaidQureshi/bam/issues/54
PCIE_GEN3_X16_BYTES_PER_S = 12 * 10**9
# PCIe Gen4 x16 (32 GB/s peak): 25.13 GB/s host -> A100-SXM4 (nvbandwidth), https://github.com/NVIDIA/nvbandwidth/issues/42;
# 24-26 GB/s host -> RTX 4090, https://github.com/NVIDIA/nvbandwidth/issues/15
PCIE_GEN4_X16_BYTES_PER_S = 25 * 10**9
# PCIe Gen5 x16 (64 GB/s peak): 52.8 GB/s H100 -> host (nvbandwidth's copy-engine D2H; its SM H2D reaches 35),
# https://github.com/NVIDIA/nvbandwidth/issues/24; 55.6 GB/s host -> device with the copy engines, which
# cudaMemcpyAsync uses, https://dev.smart-guide.co.kr/en/tutorial/nvidia-nvbandwidth-measure-gpu-interconnect-performance-tutorial/
PCIE_GEN5_X16_BYTES_PER_S = 50 * 10**9


class UnknownDevice(ValueError):
    """A GPU type that is not in the catalog, or a memory size that cannot be read."""


@dataclass(frozen=True)
class Device:
    name: str
    memory_bytes: int
    _: KW_ONLY  # the flags below are passed by name: `Device("l4", bytes, fp8=True)` reads as what it says
    fp8: bool  # native fp8 tensor cores (sm89+): fp8 weights and fp8 KV cache
    bf16: bool = True
    product_label: str | None = None  # the `nvidia.com/gpu.product` node label
    kind: str = "cuda"  # "cuda" or "cpu"
    also_labels: tuple[str, ...] = ()  # boards of a family name (`h100`) that serve alike: pods may land on any
    # Host link, pinned copies, one direction; a GPU outside the catalog: PCIe Gen4 x16, every data-centre
    # board since Ampere has at least that
    host_link_bytes_per_s: int = PCIE_GEN4_X16_BYTES_PER_S

    @property
    def product_labels(self) -> tuple[str, ...]:
        return (self.product_label, *self.also_labels) if self.product_label else ()

    @property
    def compute_dtype(self) -> str:
        if self.kind == "cpu":
            return "fp32"
        return "bf16" if self.bf16 else "fp16"


def _gib(value: float) -> int:
    return int(value * GiB)


# Totals as CUDA reports them (GiB), each with where it was published. Host links: PCIe Gen5 x16 on the
# H100s and the H200, Gen3 x16 on the T4, Gen4 x16 on the others (NVIDIA's datasheets).
GPU_CATALOG: dict[str, Device] = {
    d.name: d
    for d in (
        # No published mem_get_info figure found: nvidia-smi's 143771 MiB (140.40 GiB) less 0.70 GiB,
        # more than the H100's measured driver reservation (0.46 GiB), so it errs low.
        Device("h200-141gb", _gib(139.70), fp8=True, product_label="NVIDIA-H200",
               host_link_bytes_per_s=PCIE_GEN5_X16_BYTES_PER_S),
        # 79.19 GiB: llm-d-planner accuracy report, vLLM v0.19 on H100-80GB ("physical 79.19 GiB"),
        # https://github.com/llm-d-incubation/llm-d-planner/blob/main/accuracy/accuracy_report.md
        Device("h100-80gb", _gib(79.19), fp8=True, product_label="NVIDIA-H100-80GB-HBM3",
               host_link_bytes_per_s=PCIE_GEN5_X16_BYTES_PER_S),
        # Same 81559 MiB part as the SXM board (nvidia-smi), so the same CUDA total.
        Device("h100-pcie-80gb", _gib(79.19), fp8=True, product_label="NVIDIA-H100-PCIe",
               host_link_bytes_per_s=PCIE_GEN5_X16_BYTES_PER_S),
        # 79.15 GiB: kvpilot issue 13 (torch.cuda.mem_get_info on A100-SXM4-80GB).
        Device("a100-80gb", _gib(79.15), fp8=False, product_label="NVIDIA-A100-SXM4-80GB"),
        # 39.50 GiB: torch OOM message on one A100 40GB, https://github.com/TianheWu/CoSeR/issues/10
        Device("a100-40gb", _gib(39.50), fp8=False, product_label="NVIDIA-A100-SXM4-40GB"),
        # 44.42 GiB: torch OOM message on 8 x L40S, https://github.com/stepfun-ai/Step-Video-T2V/issues/8
        Device("l40s", _gib(44.42), fp8=True, product_label="NVIDIA-L40S"),
        # 21.99 GiB: kvpilot issue 13 (torch.cuda.mem_get_info on L4).
        Device("l4", _gib(21.99), fp8=True, product_label="NVIDIA-L4"),
        # 22.18 GiB: torch OOM message on an A10 (the A10G's 24 GB GDDR6 sibling, same 23028 MiB in
        # nvidia-smi), https://github.com/OpenBMB/MiniCPM-V/issues/640
        Device("a10g", _gib(22.18), fp8=False, product_label="NVIDIA-A10G"),
        # 14.56 GiB: torch OOM messages on Tesla T4 (14.56-14.58 reported),
        # https://github.com/Zheng-Chong/CatVTON/issues/133, https://github.com/AlphaGPU/leetgpu-challenges/issues/52
        Device("t4", _gib(14.56), fp8=False, bf16=False, product_label="Tesla-T4",
               host_link_bytes_per_s=PCIE_GEN3_X16_BYTES_PER_S),
        # 23.64 GiB: kvpilot issue 13; torch OOM message, https://github.com/ali-vilab/VGen/issues/104
        Device("rtx-4090", _gib(23.64), fp8=True, product_label="NVIDIA-GeForce-RTX-4090"),
        # 23.68 GiB: torch OOM message on an RTX 3090, https://github.com/3DTopia/OpenLRM/issues/42
        Device("rtx-3090", _gib(23.68), fp8=False, product_label="NVIDIA-GeForce-RTX-3090"),
    )
}
# A GPU outside the catalog, found by pynvml: its nvidia-smi total less this share, the largest
# reservation among the catalog's GPUs (L4: 22.49 -> 21.99 GiB, 2.2%), so the guess errs low.
NVML_UNALLOCATABLE_SHARE = 0.023
_ALIASES = {"h200": "h200-141gb", "h100-sxm": "h100-80gb",
            "h100-pcie": "h100-pcie-80gb", "4090": "rtx-4090", "3090": "rtx-3090"}
# Short names shared by catalog GPUs of different memory: guessing one would plan for the wrong size
# (and pin the pods to the wrong nodes), so they are refused with the choices.
_AMBIGUOUS = {"a100": ("a100-80gb", "a100-40gb")}
# Short names for boards of equal memory and features (the SXM and PCIe H100): the plan is the same on
# each, so the name plans once and its pods may be scheduled on any of them.
_FAMILIES = {"h100": ("h100-80gb", "h100-pcie-80gb")}

_QUANTITY = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(Ki|Mi|Gi|Ti|K|M|G|T|k)?\s*$")
_UNITS = {None: 1, "k": 10**3, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12,
          "Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "Ti": 1 << 40}


def parse_quantity(value: str | int) -> int:
    """Kubernetes quantity (`48Gi`, `80G`, `1024`) -> bytes."""
    if isinstance(value, int):
        return value
    match = _QUANTITY.match(value)
    if not match:
        raise UnknownDevice(f"memory {value!r} is not a size like 48Gi, 80G or 1073741824")
    return int(float(match.group(1)) * _UNITS[match.group(2)])


def gpu_from_catalog(name: str) -> Device:
    key = name.lower().removeprefix("nvidia-")
    key = _ALIASES.get(key, key)
    if key in _AMBIGUOUS:
        raise UnknownDevice(f"GPU type {name!r} is ambiguous: {' or '.join(_AMBIGUOUS[key])} (they differ in "
                            "memory); name one of them")
    if key in _FAMILIES:
        first, *others = (GPU_CATALOG[member] for member in _FAMILIES[key])
        return replace(first, name=key, also_labels=tuple(d.product_label for d in others if d.product_label))
    if key not in GPU_CATALOG:
        raise UnknownDevice(f"GPU type {name!r} is not in the catalog "
                            f"({', '.join(GPU_CATALOG)}); set gpu.memory for a custom GPU")
    return GPU_CATALOG[key]


def custom_gpu(memory: str | int, fp8: bool = False) -> Device:
    return Device(f"custom-{memory}", parse_quantity(memory), fp8=fp8)


def cpu_device() -> Device:
    """System RAM as the device for local runs: available memory, so other processes keep theirs."""
    available = total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024
    except OSError:
        pass
    return Device("cpu", min(available, total), fp8=False, kind="cpu")


def detect_gpu() -> tuple[Device, int] | None:
    """The local GPU (through pynvml) and how many there are, or None when there is none."""
    with nvml() as pynvml:
        count = pynvml.nvmlDeviceGetCount() if pynvml else 0
        if count == 0:
            return None
        handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        name = pynvml.nvmlDeviceGetName(handle)
        name = name.decode() if isinstance(name, bytes) else name
        memory = pynvml.nvmlDeviceGetMemoryInfo(handle).total
        major, minor = pynvml.nvmlDeviceGetCudaComputeCapability(handle)
        fp8 = (major, minor) >= (8, 9)
        label = name.replace(" ", "-")
        known = next((d for d in GPU_CATALOG.values() if d.product_label == label), None)
        if known is not None:  # the catalog's CUDA total, not nvidia-smi's
            return known, count
        cuda_total = int(memory * (1 - NVML_UNALLOCATABLE_SHARE))
        return Device(name, cuda_total, fp8=fp8, bf16=major >= 8, product_label=label), count


def local_device() -> tuple[Device, int]:
    """This machine's accelerator and count: the GPUs if pynvml finds any, else the CPU."""
    return detect_gpu() or (cpu_device(), 1)
