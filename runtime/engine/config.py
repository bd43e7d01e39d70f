"""The engine's one configuration: what the user asked for, checked, then completed from the model.

`EngineConfig(...)` validates what it is given; `config.for_model(facts)` fills every field left
as None from the model's facts and the memory plan, so the engine only ever reads concrete numbers.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass, field

import torch

from kvpilot.kernels import ops
from kvpilot.runtime.memory.facts import ModelFacts
from kvpilot.runtime.memory.host_tier import host_kv_blocks
from kvpilot.runtime.memory.kv_groups import KVGroups, kv_block_bytes, model_kv_groups
from kvpilot.runtime.memory.quantization import DTYPE_ALIASES, WEIGHT_QUANT_MODES
from kvpilot.runtime.memory.support import UnsupportedOption

DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DEFAULT_BLOCK_SIZE = 16
PREEMPTION_MODES = ("auto", "swap", "recompute")
logger = logging.getLogger("kvpilot.runtime.engine.config")


def _dtype_name(value: str) -> str:
    name = DTYPE_ALIASES.get(value, value)
    if name not in DTYPES:
        raise ValueError(f"dtype {value!r} is not one of auto, {', '.join(DTYPES)}")
    return name


def env_flag(name: str) -> bool:
    """An on/off environment variable: 1, true, yes or on is on."""
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


@dataclass
class EngineConfig:
    model: str | None = None  # HF directory or GGUF file; None: the embedded SmolLM2-135M-Instruct
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "auto"  # compute dtype: auto (bf16 on CUDA, fp32 on CPU) | fp32 | bf16 | fp16
    quantization: str | None = None  # weights: None (the compute dtype) | int8 | int4 | fp8
    kv_cache_dtype: str = "auto"  # auto (the compute dtype) | the compute dtype's name | fp8
    tensor_parallel_size: int = 1  # ranks of each pipeline stage
    pipeline_parallel_size: int = 1  # stages, each a tensor-parallel group (rank = stage x TP + TP rank)
    # steps in flight through the stages at once (vLLM's virtual engines); None: one per stage
    pipeline_micro_batches: int | None = None
    nnodes: int = 1  # the ranks across nodes: world_size / nnodes GPUs on each
    node_rank: int = 0  # 0: the leader (engine and HTTP server); others only run their ranks
    leader_address: str | None = None  # where ranks meet when nnodes > 1 (the leader's host)
    leader_port: int = 29500
    block_size: int = DEFAULT_BLOCK_SIZE
    num_kv_blocks: int | None = None  # None: as many as kv_memory holds, else as the memory plan gives
    kv_memory: int = 0  # bytes of KV pool instead of num_kv_blocks (for_model divides by the block bytes); 0: unset
    max_model_len: int | None = None  # None: the model's max positions
    max_num_seqs: int | None = None  # None: the memory plan's default for the device
    max_num_batched_tokens: int | None = None  # None: the memory plan's default
    enable_prefix_caching: bool = True
    host_kv_blocks: int = 0  # blocks of the host KV tier (engine/host_kv.py); 0: no tier, or host_kv_memory's
    host_kv_memory: int = 0  # bytes of host memory for the tier instead (for_model divides by the block bytes)
    preemption_mode: str = "auto"  # with a host tier: auto (the swap cost model decides) | swap | recompute
    gpu_memory_utilization: float = 0.90
    # decoder layers whose weights stay in host memory, streamed to the device ahead of use (models/offload.py)
    offload_layers: int = 0
    seed: int = 0  # for requests that set no seed of their own
    # True: never torch.compile the decoder (models/compiled.py); default: $KVPILOT_ENFORCE_EAGER, else False
    enforce_eager: bool = field(default_factory=lambda: env_flag("KVPILOT_ENFORCE_EAGER"))

    def __post_init__(self) -> None:
        if self.device == "auto":
            self.device = default_device()
        if not (self.device == "cpu" or self.device.startswith("cuda")):
            raise ValueError(f"device {self.device!r} is not one of auto, cpu, cuda, cuda:N")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise UnsupportedOption(f"device {self.device!r} asked for, but torch sees no CUDA GPU")
        if self.dtype == "auto":
            bf16 = self.device.startswith("cuda") and torch.cuda.is_bf16_supported()
            self.dtype = "fp32" if self.device == "cpu" else ("bf16" if bf16 else "fp16")
        self.dtype = _dtype_name(self.dtype)
        self.quantization = self._weight_quantization(self.quantization)
        self.kv_cache_dtype = self._kv_cache_dtype(self.kv_cache_dtype)
        self._check_kernels()
        for name in ("tensor_parallel_size", "pipeline_parallel_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if self.pipeline_micro_batches is None:
            self.pipeline_micro_batches = self.pipeline_parallel_size
        if not isinstance(self.pipeline_micro_batches, int) or self.pipeline_micro_batches < 1:
            raise ValueError(f"pipeline_micro_batches must be an integer >= 1, got {self.pipeline_micro_batches!r}")
        if self.nnodes < 1 or self.world_size % self.nnodes:
            raise ValueError(f"nnodes ({self.nnodes}) must divide tensor_parallel_size x pipeline_parallel_size "
                             f"({self.world_size})")
        if not 0 <= self.node_rank < self.nnodes:
            raise ValueError(f"node_rank {self.node_rank} is not one of 0..{self.nnodes - 1}")
        if self.nnodes > 1 and not self.leader_address:
            raise ValueError("nnodes > 1 needs leader_address (where the ranks meet)")
        per_node = self.gpus_per_node
        if per_node > 1 and self.device.startswith("cuda") and torch.cuda.device_count() < per_node:
            raise UnsupportedOption(f"{self.world_size} ranks (tensor x pipeline parallel) over {self.nnodes} node(s) "
                                    f"needs {per_node} GPUs here (ranks run on cuda:0..{per_node - 1}); torch sees "
                                    f"{torch.cuda.device_count()}")
        for name in ("block_size", "num_kv_blocks", "max_model_len", "max_num_seqs", "max_num_batched_tokens"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        for name in ("kv_memory", "host_kv_blocks", "host_kv_memory"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
        if not isinstance(self.offload_layers, int) or self.offload_layers < 0:
            raise ValueError(f"offload_layers must be an integer >= 0, got {self.offload_layers!r}")
        if self.offload_layers and self.pipeline_parallel_size > 1:
            raise UnsupportedOption(f"offload_layers runs with pipeline parallel 1 only (tensor parallel is fine), got "
                                    f"pipeline parallel {self.pipeline_parallel_size}")
        if self.preemption_mode not in PREEMPTION_MODES:
            raise ValueError(f"preemption_mode {self.preemption_mode!r} is not one of {', '.join(PREEMPTION_MODES)}")
        if self.kv_memory and self.num_kv_blocks:
            raise ValueError("give num_kv_blocks or kv_memory, not both")
        if self.kv_memory and self.world_size > 1:
            raise UnsupportedOption("kv_memory sizes one device's pool: with tensor or pipeline parallel > 1 give "
                                    "num_kv_blocks (the plan's)")
        if (self.host_kv_blocks or self.host_kv_memory) and self.world_size > 1:
            raise UnsupportedOption("a host KV tier runs on one GPU only (tensor and pipeline parallel 1), got "
                                    f"tensor parallel {self.tensor_parallel_size} x pipeline parallel "
                                    f"{self.pipeline_parallel_size}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if (self.max_num_seqs and self.max_num_batched_tokens
                and self.max_num_batched_tokens < self.max_num_seqs):
            raise ValueError(f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be >= max_num_seqs "
                             f"({self.max_num_seqs}): every running sequence decodes one token per step")

    def _weight_quantization(self, value: str | None) -> str | None:
        if value in (None, "auto", "none") or _dtype_name_or_none(value) == self.dtype:
            return None
        if value in WEIGHT_QUANT_MODES:
            return value
        if _dtype_name_or_none(value):
            raise UnsupportedOption(f"quantization {value!r} differs from the compute dtype {self.dtype}: set "
                                    f"dtype {value} instead (weights are kept in the compute dtype unless quantized)")
        raise ValueError(f"quantization {value!r} is not one of none, {', '.join(WEIGHT_QUANT_MODES)}")

    def _kv_cache_dtype(self, value: str) -> str:
        if value == "auto" or _dtype_name_or_none(value) == self.dtype:
            return self.dtype
        if value == "fp8":
            return value
        if _dtype_name_or_none(value):
            raise UnsupportedOption(f"KV cache dtype {value!r} differs from the compute dtype {self.dtype}: use "
                                    "auto, or fp8 to halve the cache")
        raise ValueError(f"KV cache dtype {value!r} is not one of auto, {self.dtype}, fp8")

    def _check_kernels(self) -> None:
        """Refuse at start-up, before any weight is loaded or KV block allocated, what the kernels cannot
        run on this device (fp8 needs compute capability 8.9)."""
        if not self.device.startswith("cuda"):
            return
        try:
            ops.check_kv_dtype_supported(self.device, self.kv_torch_dtype)
            if self.quantization:
                ops.check_weight_quantization_supported(self.device, self.quantization)
        except ValueError as err:
            raise UnsupportedOption(str(err)) from None

    @property
    def world_size(self) -> int:
        return self.tensor_parallel_size * self.pipeline_parallel_size

    @property
    def gpus_per_node(self) -> int:
        return self.world_size // self.nnodes

    def stages_of_node(self) -> list[int]:
        """The pipeline stages this node's ranks belong to (one, when a stage fills a node)."""
        first = self.node_rank * self.gpus_per_node
        return sorted({rank // self.tensor_parallel_size for rank in range(first, first + self.gpus_per_node)})

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def kv_torch_dtype(self) -> torch.dtype:
        return torch.float8_e4m3fn if self.kv_cache_dtype == "fp8" else DTYPES[self.kv_cache_dtype]

    @property
    def is_complete(self) -> bool:
        return None not in (self.num_kv_blocks, self.max_model_len, self.max_num_seqs, self.max_num_batched_tokens)

    def for_model(self, facts: ModelFacts) -> EngineConfig:
        """A copy with every unset limit taken from the model and the memory plan for this device."""
        if self.max_model_len and self.max_model_len > facts.max_position_embeddings:
            raise ValueError(f"max_model_len {self.max_model_len} exceeds {facts.name}'s "
                             f"{facts.max_position_embeddings} positions")
        if self.offload_layers > facts.num_layers:
            raise ValueError(f"offload_layers {self.offload_layers} exceeds {facts.name}'s {facts.num_layers} layers")
        max_model_len = self.max_model_len or facts.max_position_embeddings
        num_kv_blocks, max_num_seqs, max_batched = self.num_kv_blocks, self.max_num_seqs, self.max_num_batched_tokens
        groups = model_kv_groups(facts, max_model_len)
        if self.kv_memory:
            per_block = kv_block_bytes(facts, self.kv_cache_dtype, self.block_size, groups)
            num_kv_blocks = self.kv_memory // per_block
            if not num_kv_blocks:
                raise ValueError(f"kv_memory {self.kv_memory} bytes holds no KV block of {per_block} bytes")
        if None in (num_kv_blocks, max_num_seqs, max_batched):
            plan = memory_plan(facts, dataclasses.replace(self, max_model_len=max_model_len))
            num_kv_blocks = num_kv_blocks or plan.num_kv_blocks
            max_batched = max_batched or max(plan.max_batched_tokens, max_num_seqs or 0)
            max_num_seqs = max_num_seqs or min(plan.max_num_seqs, max_batched)
        prefix_caching, host_blocks = self.enable_prefix_caching, self.host_kv_blocks
        if not host_blocks and self.host_kv_memory:
            block_bytes = kv_block_bytes(facts, self.kv_cache_dtype, self.block_size, groups, self.tensor_parallel_size)
            host_blocks = host_kv_blocks(self.host_kv_memory, block_bytes)
            if not host_blocks:
                raise ValueError(f"host_kv_memory {self.host_kv_memory} bytes holds no KV block of {block_bytes} bytes")
        if (prefix_caching or host_blocks) and groups.is_hybrid:
            logger.info("prefix caching and host KV tier off: model=%s keeps layers of different sliding windows "
                        "in separate block tables, and they hold one", facts.name)
            prefix_caching, host_blocks = False, 0
        return dataclasses.replace(self, max_model_len=max_model_len, num_kv_blocks=num_kv_blocks, kv_memory=0,
                                   max_num_seqs=max_num_seqs, max_num_batched_tokens=max_batched,
                                   enable_prefix_caching=prefix_caching, host_kv_blocks=host_blocks)

    def kv_groups(self, facts: ModelFacts) -> KVGroups:
        """How the KV pool holds `facts`' layers (call on a complete config)."""
        return model_kv_groups(facts, self.max_model_len or facts.max_position_embeddings)


def _dtype_name_or_none(value: str) -> str | None:
    name = DTYPE_ALIASES.get(value, value)
    return name if name in DTYPES else None


def memory_plan(facts: ModelFacts, config: EngineConfig, device=None):
    """The memory model's plan for this config on `device` (default: this machine's device)."""
    from kvpilot.runtime.memory.devices import cpu_device, detect_gpu
    from kvpilot.runtime.memory.offload import with_offload
    from kvpilot.runtime.memory.planner import PlanRequest, plan, size

    if device is None:
        gpu = detect_gpu() if config.device.startswith("cuda") else None
        device = gpu[0] if gpu else cpu_device()
    host_bytes = config.host_kv_memory
    if config.host_kv_blocks:
        groups = model_kv_groups(facts, config.max_model_len or facts.max_position_embeddings)
        host_bytes = config.host_kv_blocks * kv_block_bytes(facts, config.kv_cache_dtype, config.block_size, groups,
                                                            config.tensor_parallel_size)
    request = PlanRequest(max_context=config.max_model_len, host_kv_bytes=host_bytes,
                          max_batched_tokens=config.max_num_batched_tokens,
                          max_num_seqs=config.max_num_seqs,
                          quantization=config.quantization or (facts.checkpoint.runtime_mode if facts.checkpoint
                                                               else config.dtype),
                          kv_dtype=config.kv_cache_dtype,
                          block_size=config.block_size, gpu_memory_utilization=config.gpu_memory_utilization)
    if config.offload_layers and device.kind != "cpu":  # exactly those layers in host memory, their bytes to KV
        sized = size(facts, device, request, request.quantization, request.kv_dtype, config.tensor_parallel_size,
                     gpus_per_node=config.world_size)[0]
        return with_offload(sized, facts, device, request, config.offload_layers)[0]
    if config.world_size == 1:
        return plan(facts, device, request)
    # given: size that one configuration, fitting or not (the KV blocks say)
    return size(facts, device, request, request.quantization, request.kv_dtype, config.tensor_parallel_size,
                gpus_per_node=config.world_size, pp=config.pipeline_parallel_size)[0]
