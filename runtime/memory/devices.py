"""Accelerator facts: the GPU catalog, custom sizes, pynvml detection and the CPU as a device.

Memory figures are the totals `nvidia-smi` reports (MiB), not the marketing GB, because the
runtime compares its plan with what the driver says is there.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from kvpilot.runtime.memory.nvml import nvml

MiB = 1 << 20
GiB = 1 << 30


class UnknownDevice(ValueError):
    """A GPU type that is not in the catalog, or a memory size that cannot be read."""


@dataclass(frozen=True)
class Device:
    name: str
    memory_bytes: int
    bandwidth_gbps: float  # HBM/GDDR bandwidth, GB/s
    fp8: bool  # native fp8 tensor cores (sm89+): fp8 weights and fp8 KV cache
    bf16: bool = True
    product_label: str | None = None  # the `nvidia.com/gpu.product` node label
    kind: str = "cuda"  # "cuda" or "cpu"

    @property
    def compute_dtype(self) -> str:
        if self.kind == "cpu":
            return "fp32"
        return "bf16" if self.bf16 else "fp16"


GPU_CATALOG: dict[str, Device] = {
    d.name: d
    for d in (
        Device("h200-141gb", 143771 * MiB, 4800, True, product_label="NVIDIA-H200"),
        Device("h100-80gb", 81559 * MiB, 3350, True, product_label="NVIDIA-H100-80GB-HBM3"),
        Device("h100-pcie-80gb", 81559 * MiB, 2000, True, product_label="NVIDIA-H100-PCIe"),
        Device("a100-80gb", 81920 * MiB, 2039, False, product_label="NVIDIA-A100-SXM4-80GB"),
        Device("a100-40gb", 40960 * MiB, 1555, False, product_label="NVIDIA-A100-SXM4-40GB"),
        Device("l40s", 46068 * MiB, 864, True, product_label="NVIDIA-L40S"),
        Device("l4", 23034 * MiB, 300, True, product_label="NVIDIA-L4"),
        Device("a10g", 23028 * MiB, 600, False, product_label="NVIDIA-A10G"),
        Device("t4", 15360 * MiB, 320, False, bf16=False, product_label="Tesla-T4"),
        Device("rtx-4090", 24564 * MiB, 1008, True, product_label="NVIDIA-GeForce-RTX-4090"),
    )
}
_ALIASES = {"h200": "h200-141gb", "h100": "h100-80gb", "h100-sxm": "h100-80gb",
            "h100-pcie": "h100-pcie-80gb", "4090": "rtx-4090"}
# Short names shared by catalog GPUs of different memory: guessing one would plan for the wrong size
# (and pin the pods to the wrong nodes), so they are refused with the choices.
_AMBIGUOUS = {"a100": ("a100-80gb", "a100-40gb")}

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
    if key not in GPU_CATALOG:
        raise UnknownDevice(f"GPU type {name!r} is not in the catalog "
                            f"({', '.join(GPU_CATALOG)}); set gpu.memory for a custom GPU")
    return GPU_CATALOG[key]


def custom_gpu(memory: str | int, fp8: bool = False, bandwidth_gbps: float = 0.0) -> Device:
    return Device(f"custom-{memory}", parse_quantity(memory), bandwidth_gbps, fp8)


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
    return Device("cpu", min(available, total), 0.0, False, kind="cpu")


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
        return Device(name, memory, 0.0, fp8, bf16=major >= 8, product_label=label), count


def local_device() -> tuple[Device, int]:
    """This machine's accelerator and count: the GPUs if pynvml finds any, else the CPU."""
    return detect_gpu() or (cpu_device(), 1)
