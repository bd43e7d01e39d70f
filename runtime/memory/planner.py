"""The memory model's decision: quantization, KV dtype, tensor parallelism and the KV block budget.

`plan(facts, device, request)` finds the least lossy, fewest-GPU configuration whose KV cache
holds `max_context x concurrency` tokens, and sizes the KV pool to every byte left under
`gpu_memory_utilization`. The search order (documented in the README):

- the precision ladder is (weights, KV) = (compute, compute), (compute, fp8), (fp8, compute),
  (fp8, fp8), (int8, compute), (int8, fp8), (int4, compute), (int4, fp8); fp8 rungs only on GPUs
  with fp8; an explicit quantization or KV dtype pins its half of the rung;
- tensor-parallel degrees are powers of two that split the query heads and split or replicate
  the KV heads, up to one node (`gpus_per_node`) or `max_gpus_per_replica`; when nothing fits on
  one node and no maximum is set, up to MAX_NODES_PER_REPLICA nodes;
- `optimize="quality"` walks the ladder outside and the GPU counts inside (more GPUs before lower
  precision); `optimize="cost"` the reverse (lower precision before more GPUs).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from kvpilot.runtime.memory.budget import (
    KVPILOT_SAMPLER_BYTES_PER_LOGIT,
    activation_bytes,
    engine_limits,
    non_torch_bytes,
    safety_margin_bytes,
)
from kvpilot.runtime.memory.checkpoint import checkpoint_weight_bytes_by_part
from kvpilot.runtime.memory.devices import Device, GiB
from kvpilot.runtime.memory.facts import ModelFacts
from kvpilot.runtime.memory.host_tier import describe_host_tier, host_kv_blocks
from kvpilot.runtime.memory.kv_groups import KVGroups, kv_block_bytes, model_kv_groups
from kvpilot.runtime.memory.quantization import (
    DTYPE_BYTES,
    QUANT_MODES,
    kv_bytes_per_token,
    tp_compatible,
    weight_bytes_by_part,
)

# A CPU run spends no more than this on KV beyond what the request needs: allocating (and
# zeroing) most of the host's RAM would starve it; vLLM's CPU backend defaults to 4 GiB too.
CPU_KV_CACHE_BYTES = 4 * GiB
MAX_NODES_PER_REPLICA = 4
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
    # The sampler's peak bytes per logit; another engine's figure plans for that engine
    sampler_bytes_per_logit: int = KVPILOT_SAMPLER_BYTES_PER_LOGIT
    host_kv_bytes: int = 0  # host memory (RAM) for the host KV tier; 0: none

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
                     "tensor_parallel"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise PlanError(f"{name} must be >= 1, got {value}")


@dataclass(frozen=True)
class MemoryBreakdown:
    """Bytes on one GPU (or the host, for a CPU run)."""

    total: int
    usable: int  # gpu_memory_utilization x total
    weights: int
    kv_cache: int
    activations: int
    overhead: int  # non-torch memory inside the usable part (NCCL's buffers)
    margin: int = 0  # left free on purpose (budget.safety_margin_bytes)

    @property
    def headroom(self) -> int:
        """Usable bytes no part claims: under one KV block, since the KV cache takes the rest."""
        return self.usable - self.weights - self.kv_cache - self.activations - self.overhead - self.margin


@dataclass(frozen=True)
class Plan:
    model: str
    device: str
    device_kind: str
    quantization: str
    kv_dtype: str
    compute_dtype: str
    tensor_parallel: int
    nodes: int
    gpus_per_replica: int
    block_size: int
    num_kv_blocks: int
    kv_bytes_per_token: int  # per GPU, every layer
    kv_block_bytes: int  # per GPU: one block of the pool (memory/kv_groups.py)
    kv_blocks_per_sequence: int  # the most blocks a sequence of max_model_len tokens holds
    max_model_len: int
    max_num_seqs: int
    max_batched_tokens: int
    memory: MemoryBreakdown
    weights_by_part: dict[str, int]
    reasons: list[str] = field(default_factory=list)
    checkpoint: str | None = None  # a pre-quantized checkpoint's format (e.g. "gptq int4"); None: float
    kv_groups: int = 1  # block tables per sequence: one per group of layers sharing a sliding window
    sliding_windows: tuple[int, ...] = ()  # the windows shorter than max_model_len, in tokens
    num_host_kv_blocks: int = 0  # the host KV tier's blocks, in host memory (engine/host_kv.py)

    @property
    def host_kv_bytes(self) -> int:
        return self.num_host_kv_blocks * self.kv_block_bytes

    @property
    def host_kv_tokens(self) -> int:
        return self.num_host_kv_blocks // self.kv_groups * self.block_size

    @property
    def kv_capacity_tokens(self) -> int:
        """Tokens the KV cache holds for every layer (sliding-window layers free theirs past the window)."""
        return self.num_kv_blocks // self.kv_groups * self.block_size

    @property
    def kv_capacity_sequences(self) -> int:
        """Sequences at full `max_model_len` the KV cache holds at once."""
        return self.num_kv_blocks // self.kv_blocks_per_sequence

    def engine_options(self) -> dict[str, str | int]:
        """The plan as the runtime's `serve` options (flag -> value): pods get them as arguments and
        `kvpilot up` parses the same ones, so the two can never differ."""
        options = {"dtype": self.compute_dtype, "quantization": self.quantization, "kv-cache-dtype": self.kv_dtype,
                   "tensor-parallel": self.tensor_parallel, "num-kv-blocks": self.num_kv_blocks,
                   "block-size": self.block_size, "max-model-len": self.max_model_len,
                   "max-num-seqs": self.max_num_seqs, "max-num-batched-tokens": self.max_batched_tokens}
        if self.num_host_kv_blocks:
            options["host-kv-memory"] = self.host_kv_bytes
        return options

    def to_dict(self) -> dict:
        data = asdict(self)
        data["memory"]["headroom"] = self.memory.headroom
        data["kv_capacity_tokens"] = self.kv_capacity_tokens
        data["kv_capacity_sequences"] = self.kv_capacity_sequences
        data["host_kv_bytes"] = self.host_kv_bytes
        data["host_kv_tokens"] = self.host_kv_tokens
        return data


def size(facts: ModelFacts, device: Device, req: PlanRequest, quant: str, kv_dtype: str, tp: int,
         gpus_per_node: int) -> tuple[Plan, int]:
    """One configuration sized to the byte: (plan, shortfall bytes per GPU; 0 when it fits)."""
    compute = device.compute_dtype
    max_model_len = req.max_context or facts.max_position_embeddings
    limits = engine_limits(device, req.max_batched_tokens, req.max_num_seqs)
    usable = int(device.memory_bytes * req.gpu_memory_utilization)
    parts = _weights_by_part(facts, quant, compute, tp)
    weights = sum(parts.values())
    activations = activation_bytes(facts, tp, limits, DTYPE_BYTES[compute], req.sampler_bytes_per_logit)
    overhead = non_torch_bytes(device, tp)
    margin = safety_margin_bytes(device, usable)
    per_token = kv_bytes_per_token(facts, kv_dtype, tp)
    groups = model_kv_groups(facts, max_model_len)
    block_bytes = kv_block_bytes(facts, kv_dtype, req.block_size, groups, tp)
    per_sequence = groups.blocks_per_sequence(max_model_len, req.block_size)
    blocks_needed = per_sequence * req.concurrency
    budget = usable - weights - activations - overhead - margin
    blocks = max(0, budget // block_bytes)
    if device.kind == "cpu":
        blocks = min(blocks, max(blocks_needed, CPU_KV_CACHE_BYTES // block_bytes))
    shortfall = 0 if blocks >= blocks_needed else blocks_needed * block_bytes - budget
    plan = Plan(
        model=facts.name, device=device.name, device_kind=device.kind, quantization=quant,
        kv_dtype=kv_dtype, compute_dtype=compute, tensor_parallel=tp,
        nodes=math.ceil(tp / gpus_per_node), gpus_per_replica=tp if device.kind == "cuda" else 0,
        block_size=req.block_size, num_kv_blocks=blocks, kv_bytes_per_token=per_token,
        kv_block_bytes=block_bytes, kv_blocks_per_sequence=per_sequence, kv_groups=groups.num_groups,
        sliding_windows=groups.sliding_windows, max_model_len=max_model_len,
        max_num_seqs=max(1, min(limits.max_num_seqs, blocks)),
        max_batched_tokens=limits.max_batched_tokens,
        memory=MemoryBreakdown(device.memory_bytes, usable, weights, blocks * block_bytes,
                               activations, overhead, margin),
        weights_by_part=parts,
        checkpoint=facts.checkpoint.label if facts.checkpoint else None,
        num_host_kv_blocks=host_kv_blocks(req.host_kv_bytes, block_bytes) if _host_tier_runs(tp, groups) else 0,
    )
    return plan, shortfall


def _host_tier_runs(tp: int, groups: KVGroups) -> bool:
    """The engine keeps a host KV tier with one KV group and tensor parallel 1 (engine/config.py)."""
    return tp == 1 and not groups.is_hybrid


def _weights_by_part(facts: ModelFacts, quant: str, compute: str, tp: int) -> dict[str, int]:
    """A pre-quantized checkpoint's own bytes; else the runtime's layout of `quant`."""
    if facts.checkpoint is not None and quant == facts.checkpoint.runtime_mode:
        return checkpoint_weight_bytes_by_part(facts, facts.checkpoint, compute, tp)
    return weight_bytes_by_part(facts, quant, compute, tp)


# Weight-only int8 / int4 run on the CPU too (dequantized per matmul by the torch reference): slower than
# fp32, but a model fits in a quarter of the memory. Never chosen by `auto` there; asked for, allowed.
CPU_WEIGHT_QUANT = ("int8", "int4")


def _precision_ladder(device: Device, req: PlanRequest, facts: ModelFacts) -> list[tuple[str, str]]:
    compute = device.compute_dtype
    if facts.checkpoint is not None:  # the weights are what the checkpoint stores: only the KV dtype is free
        mode = facts.checkpoint.runtime_mode
        if req.quantization not in ("auto", mode):
            raise PlanError(f"{facts.name} is a pre-quantized {facts.checkpoint.label} checkpoint: quantization "
                            f"must be auto or {mode}, not {req.quantization}")
        req = PlanRequest(**{**req.__dict__, "quantization": mode})
    if device.kind == "cpu":
        quants = [compute, "bf16"]
    else:
        quants = [compute] + (["fp8"] if device.fp8 else []) + ["int8", "int4"]
    kvs = [compute] + (["fp8"] if device.fp8 else [])
    if req.quantization != "auto":
        _check_supported(device, req.quantization, "quantization")
        quants = [req.quantization]
    if req.kv_dtype != "auto":
        _check_supported(device, req.kv_dtype, "KV cache dtype")
        kvs = [req.kv_dtype]
    return [(q, kv) for q in quants for kv in kvs]


def _check_supported(device: Device, dtype: str, what: str) -> None:
    if dtype == "fp8" and not device.fp8:
        raise PlanError(f"{what} fp8 needs a GPU with fp8 support (Ada or Hopper: L4, L40S, "
                        f"RTX-4090, H100, H200); {device.name} has none: use int8 or int4")
    if dtype == "bf16" and not device.bf16:
        raise PlanError(f"{what} bf16 needs an Ampere or newer GPU; {device.name} has none: use fp16")
    if device.kind == "cpu" and dtype not in ("fp32", "bf16", *CPU_WEIGHT_QUANT):
        raise PlanError(f"{what} {dtype} is not supported on the CPU: use fp32 or bf16 (or int8 / int4 weights)")


def _tp_degrees(facts: ModelFacts, device: Device, limit: int) -> list[int]:
    if device.kind == "cpu":
        return [1]
    degrees = [1 << k for k in range(limit.bit_length()) if (1 << k) <= limit]
    return [tp for tp in degrees if tp_compatible(facts, tp)]


def _pinned_degree(facts: ModelFacts, device: Device, req: PlanRequest) -> list[int]:
    """The one degree the request pins, refused in one line when it cannot run."""
    tp = req.tensor_parallel
    if device.kind == "cpu" and tp != 1:
        raise PlanError(f"tensor parallel {tp} needs GPUs; the CPU runs tensor parallel 1")
    if not tp_compatible(facts, tp):
        raise PlanError(f"tensor parallel {tp} does not split {facts.name}'s {facts.num_heads} heads / "
                        f"{facts.num_kv_heads} KV heads evenly: use one of "
                        f"{', '.join(map(str, _tp_degrees(facts, device, 64)))}")
    if req.max_gpus_per_replica and tp > req.max_gpus_per_replica:
        raise PlanError(f"tensor parallel {tp} exceeds the most GPUs per replica ({req.max_gpus_per_replica})")
    return [tp]


def _search(facts: ModelFacts, device: Device, req: PlanRequest, tps: list[int]):
    ladder = _precision_ladder(device, req, facts)
    if req.optimize == "quality":
        order = [(q, kv, tp) for q, kv in ladder for tp in tps]
    else:
        order = [(q, kv, tp) for tp in tps for q, kv in ladder]
    attempts = []
    for quant, kv, tp in order:
        plan, shortfall = size(facts, device, req, quant, kv, tp, req.gpus_per_node)
        attempts.append((plan, shortfall))
        if shortfall == 0:
            return plan, attempts
    return None, attempts


def _describe(plan: Plan) -> str:
    gpus = "the CPU" if plan.device_kind == "cpu" else f"{plan.tensor_parallel} x {plan.device}"
    return f"{plan.quantization} weights + {plan.kv_dtype} KV on {gpus}"


def plan(facts: ModelFacts, device: Device, req: PlanRequest) -> Plan:
    """The configuration to serve `facts` on `device` as `req` asks, or NoFit/PlanError."""
    if req.max_context and req.max_context > facts.max_position_embeddings:
        raise PlanError(f"max context {req.max_context} exceeds {facts.name}'s "
                        f"{facts.max_position_embeddings} positions")
    first_limit = req.max_gpus_per_replica or req.gpus_per_node
    first = _pinned_degree(facts, device, req) if req.tensor_parallel else _tp_degrees(facts, device, first_limit)
    chosen, attempts = _search(facts, device, req, first)
    widened = False
    if (chosen is None and req.max_gpus_per_replica is None and device.kind == "cuda"
            and not req.tensor_parallel):
        limit = req.gpus_per_node * MAX_NODES_PER_REPLICA
        wider = [tp for tp in _tp_degrees(facts, device, limit) if tp not in first]
        chosen, more = _search(facts, device, req, wider)
        attempts += more
        widened = chosen is not None
    if not attempts:
        raise PlanError(f"no tensor-parallel degree up to {first_limit} GPUs splits {facts.name}'s "
                        f"{facts.num_heads} heads / {facts.num_kv_heads} KV heads")
    if chosen is None:
        best, shortfall = min(attempts, key=lambda a: a[1])
        raise NoFit(f"{facts.name} does not fit on {device.name}: the best attempt, {_describe(best)}, "
                    f"misses by {shortfall / GiB:.2f} GiB per GPU for {req.concurrency} x "
                    f"{best.max_model_len} tokens of KV cache", shortfall)
    return _with_reasons(facts, chosen, attempts, req, widened)


def _experts_reason(facts: ModelFacts, chosen: Plan) -> str:
    tp, width = chosen.tensor_parallel, facts.moe_intermediate_size
    split = (f"tensor parallel {tp} splits each expert's {width} intermediate rows into {width // tp} per GPU "
             "(as vLLM does)" if tp > 1 else f"each expert {width} intermediate rows wide")
    shared = " plus one shared expert" if facts.shared_expert_intermediate_size else ""
    held = chosen.weights_by_part["experts"] / GiB
    return (f"experts: {facts.num_experts} per MoE layer{shared}, all held ({held:.2f} GiB per GPU), "
            f"{facts.num_experts_per_tok} routed per token (activations hold top-"
            f"{facts.num_experts_per_tok} copies of each token); {split}")


def _with_reasons(facts: ModelFacts, chosen: Plan, attempts: list, req: PlanRequest, widened: bool) -> Plan:
    reasons = [f"weights: {chosen.memory.weights / GiB:.2f} GiB per GPU in {chosen.quantization}; "
               f"usable memory {chosen.memory.usable / GiB:.2f} GiB "
               f"({req.gpu_memory_utilization:.0%} of {chosen.memory.total / GiB:.2f} GiB)"]
    if facts.is_moe:
        reasons.append(_experts_reason(facts, chosen))
    mem = chosen.memory
    reasons.append(f"kept out of the KV cache: activations {mem.activations / GiB:.2f} GiB (a step of "
                   f"{chosen.max_batched_tokens} tokens), non-torch {mem.overhead / GiB:.2f} GiB at TP "
                   f"{chosen.tensor_parallel}, safety margin {mem.margin / GiB:.2f} GiB")
    for attempt, shortfall in attempts:
        if attempt is chosen:
            break
        reasons.append(f"rejected {_describe(attempt)}: KV cache short by {shortfall / GiB:.2f} GiB per GPU")
    order = ("more GPUs before lower precision" if req.optimize == "quality"
             else "lower precision before more GPUs")
    reasons.append(f"chose {_describe(chosen)}: optimize={req.optimize} tries {order}")
    if widened:
        reasons.append(f"one node of {req.gpus_per_node} GPUs cannot hold the model: "
                       f"spanning {chosen.nodes} nodes")
    every_layer = " for every layer" if chosen.kv_groups > 1 else ""
    reasons.append(f"KV cache: {chosen.num_kv_blocks} blocks x {chosen.block_size} tokens = "
                   f"{chosen.kv_capacity_tokens} tokens{every_layer} = {chosen.kv_capacity_sequences} sequences "
                   f"of {chosen.max_model_len} tokens (asked for {req.concurrency})")
    if req.host_kv_bytes:
        reasons.append(describe_host_tier(chosen.num_host_kv_blocks, chosen.kv_block_bytes, chosen.block_size)
                       if chosen.num_host_kv_blocks else
                       f"host KV tier off: it runs with tensor parallel 1 and one KV group (this plan: tensor "
                       f"parallel {chosen.tensor_parallel}, {chosen.kv_groups} group(s))")
    if chosen.sliding_windows:
        unbounded = chosen.kv_groups * math.ceil(chosen.max_model_len / chosen.block_size)
        reasons.append(f"sliding-window layers hold at most {' / '.join(map(str, chosen.sliding_windows))} tokens "
                       f"per sequence: one of {chosen.max_model_len} tokens takes {chosen.kv_blocks_per_sequence} "
                       f"blocks ({chosen.kv_groups} block tables), not {unbounded}")
    return Plan(**{**chosen.__dict__, "reasons": reasons})
