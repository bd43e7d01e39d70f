"""What a plan is asked for (PlanRequest) and the two ways a request can fail (PlanError, NoFit).

Pure Python, apart from the planner so that the modules it calls (memory/offload.py) can raise the same
errors without importing it.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvpilot.runtime.memory.budget import KVPILOT_SAMPLER_BYTES_PER_LOGIT
from kvpilot.runtime.memory.quantization import DTYPE_BYTES, QUANT_MODES

OPTIMIZE_CHOICES = ("quality", "cost")


class PlanError(ValueError):
    """The request can never be served as asked (independent of memory)."""


class NoFit(PlanError):
    """Nothing fits: carries the best attempt and by how many bytes per GPU it misses."""

    def __init__(self, message: str, shortfall_bytes: int) -> None:
        super().__init__(message)
        self.shortfall_bytes = shortfall_bytes


@dataclass(frozen=True)
class PlanRequest:
    max_context: int | None = None  # default: the model's max positions
    concurrency: int = 1  # full-context sequences the KV cache must hold at once
    max_batched_tokens: int | None = None
    max_num_seqs: int | None = None
    quantization: str = "auto"
    kv_dtype: str = "auto"
    block_size: int = 16
    gpu_memory_utilization: float = 0.90
    optimize: str = "quality"
    gpus_per_node: int = 8
    max_gpus_per_replica: int | None = None
    tensor_parallel: int | None = None  # pinned: plan this degree only (None: search)
    pipeline_parallel: int | None = None  # pinned: plan this many stages only (None: search)
    # The sampler's peak bytes per logit; another engine's figure plans for that engine
    sampler_bytes_per_logit: int = KVPILOT_SAMPLER_BYTES_PER_LOGIT
    host_kv_bytes: int = 0  # host memory (RAM) for the host KV tier; 0: none
    # consent to the last resort: some layers' weights in host memory, streamed to the GPU (memory/offload.py)
    allow_offload: bool = False

    def __post_init__(self) -> None:
        if self.quantization != "auto" and self.quantization not in QUANT_MODES:
            raise PlanError(f"quantization {self.quantization!r} is not one of auto, {', '.join(QUANT_MODES)}")
        if self.kv_dtype != "auto" and self.kv_dtype not in DTYPE_BYTES:
            raise PlanError(f"kv dtype {self.kv_dtype!r} is not one of auto, {', '.join(DTYPE_BYTES)}")
        if self.optimize not in OPTIMIZE_CHOICES:
            raise PlanError(f"optimize {self.optimize!r} is not one of {', '.join(OPTIMIZE_CHOICES)}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise PlanError(f"gpu memory utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.host_kv_bytes < 0:
            raise PlanError(f"host KV memory must be >= 0 bytes, got {self.host_kv_bytes}")
        for name in ("concurrency", "block_size", "gpus_per_node"):
            if getattr(self, name) < 1:
                raise PlanError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_context", "max_batched_tokens", "max_num_seqs", "max_gpus_per_replica",
                     "tensor_parallel", "pipeline_parallel"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise PlanError(f"{name} must be >= 1, got {value}")
        if self.allow_offload and (self.pipeline_parallel or 1) > 1:
            raise PlanError(f"weights offload runs on one pipeline stage; pipeline parallel {self.pipeline_parallel} "
                            "is pinned: unpin it or drop allow offload")
