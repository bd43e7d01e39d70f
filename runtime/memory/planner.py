"""The memory model's decision: quantization, KV dtype, tensor parallelism and the KV block budget.

`plan(facts, device, request)` finds the least lossy, fewest-GPU configuration whose KV cache
holds `max_context x concurrency` tokens, and sizes the KV pool to every byte left under
`gpu_memory_utilization`. The search order (documented in the README):

- the precision ladder is (weights, KV) = (compute, compute), (compute, fp8), (fp8, compute),
  (fp8, fp8), (int8, compute), (int8, fp8), (int4, compute), (int4, fp8); fp8 rungs only on GPUs
  with fp8; an explicit quantization or KV dtype pins its half of the rung;
- tensor-parallel degrees are powers of two that split the query heads and split or replicate
  the KV heads, up to one node (`gpus_per_node`) or `max_gpus_per_replica` if smaller;
- when nothing fits on one node (and the maximum, if set, allows more GPUs than a node has), the
  largest such degree inside each stage and pipeline parallelism 2, 3, ... across nodes, up to
  MAX_NODES_PER_REPLICA nodes: tensor parallelism never spans nodes unless pinned (a stage holds
  its share of the layers and their KV, and the all-reduces stay on the node's NVLink);
- `optimize="quality"` walks the ladder outside and the GPU counts inside (more GPUs before lower
  precision); `optimize="cost"` the reverse (lower precision before more GPUs).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from kvpilot.runtime.memory.budget import (
    EngineLimits,
    activation_bytes,
    engine_limits,
    non_torch_bytes,
    safety_margin_bytes,
)
from kvpilot.runtime.memory.checkpoint import weights_by_part
from kvpilot.runtime.memory.devices import Device, GiB
from kvpilot.runtime.memory.facts import ModelFacts
from kvpilot.runtime.memory.host_tier import host_kv_blocks, host_tier_runs
from kvpilot.runtime.memory.kv_groups import KVGroups, kv_block_bytes, model_kv_groups
from kvpilot.runtime.memory.offload import check_offload, offload_clause, offload_plan
from kvpilot.runtime.memory.plan_reasons import describe, with_reasons
from kvpilot.runtime.memory.quantization import DTYPE_BYTES, kv_bytes_per_token, tp_compatible
from kvpilot.runtime.memory.request import NoFit, PlanError, PlanRequest
from kvpilot.runtime.memory.rotary import rotary_table_bytes
from kvpilot.runtime.memory.stages import Stage, pipeline_stages

# A CPU run spends no more than this on KV beyond what the request needs: allocating (and
# zeroing) most of the host's RAM would starve it; vLLM's CPU backend defaults to 4 GiB too.
CPU_KV_CACHE_BYTES = 4 * GiB
MAX_NODES_PER_REPLICA = 4
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
    rotary_tables: int = 0  # the rotary cos/sin tables the runtime builds (memory/rotary.py): not weights

    @property
    def headroom(self) -> int:
        """Usable bytes no part claims: under one KV block, since the KV cache takes the rest."""
        spent = self.weights + self.kv_cache + self.activations + self.overhead + self.margin + self.rotary_tables
        return self.usable - spent


@dataclass(frozen=True)
class Plan:
    """Per-GPU figures are those of the fullest pipeline stage: the one whose memory bounds the KV blocks."""

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
    kv_bytes_per_token: int  # per GPU, every layer of its stage
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
    pipeline_parallel: int = 1  # stages, each of tensor_parallel GPUs (gpus_per_replica = TP x PP)
    stage_layers: tuple[int, ...] = ()  # decoder layers per stage (memory/stages.py)
    stage_weight_bytes: tuple[int, ...] = ()  # weights per GPU of each stage
    # Weights offload (memory/offload.py): layers whose weights live in host memory, 0: none; their bytes
    # per GPU; the two GPU staging buffers they stream through (counted in memory.weights); decode tokens/s
    # per sequence the host link allows at most
    offload_layers: int = 0
    host_weight_bytes: int = 0
    staging_bytes: int = 0
    decode_tokens_per_s: float = 0.0

    @property
    def host_weight_bytes_per_pod(self) -> int:
        return self.host_weight_bytes * (self.gpus_per_replica // self.nodes)

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
                   "tensor-parallel": self.tensor_parallel, "pipeline-parallel": self.pipeline_parallel,
                   "num-kv-blocks": self.num_kv_blocks, "block-size": self.block_size,
                   "max-model-len": self.max_model_len, "max-num-seqs": self.max_num_seqs,
                   "max-num-batched-tokens": self.max_batched_tokens}
        if self.num_host_kv_blocks:
            options["host-kv-memory"] = self.host_kv_bytes
        if self.offload_layers:
            options["offload-layers"] = self.offload_layers
        return options

    def to_dict(self) -> dict:
        data = asdict(self)
        data["memory"]["headroom"] = self.memory.headroom
        data["kv_capacity_tokens"] = self.kv_capacity_tokens
        data["kv_capacity_sequences"] = self.kv_capacity_sequences
        data["host_kv_bytes"] = self.host_kv_bytes
        data["host_kv_tokens"] = self.host_kv_tokens
        data["host_weight_bytes_per_pod"] = self.host_weight_bytes_per_pod
        return data


@dataclass(frozen=True)
class _StageBudget:
    """One stage's figures on one of its GPUs."""

    parts: dict[str, int]
    activations: int
    block_bytes: int
    kv_budget: int  # usable bytes left for KV blocks

    @property
    def blocks(self) -> int:
        return max(0, self.kv_budget // self.block_bytes)


def _stage_budget(facts: ModelFacts, device: Device, req: PlanRequest, quant: str, kv_dtype: str, tp: int,
                  stage: Stage, pp: int, groups: KVGroups, limits: EngineLimits, fixed: int) -> _StageBudget:
    compute = device.compute_dtype
    parts = weights_by_part(facts, quant, compute, tp, stage, pp)
    activations = activation_bytes(facts, tp, limits, DTYPE_BYTES[compute], req.sampler_bytes_per_logit,
                                   stage if pp > 1 else None)
    block_bytes = kv_block_bytes(facts, kv_dtype, req.block_size, groups.for_layers(stage.layers), tp)
    return _StageBudget(parts, activations, block_bytes, fixed - sum(parts.values()) - activations)


def size(facts: ModelFacts, device: Device, req: PlanRequest, quant: str, kv_dtype: str, tp: int,
         gpus_per_node: int, pp: int = 1) -> tuple[Plan, int]:
    """One configuration sized to the byte: (plan, shortfall bytes per GPU; 0 when it fits). Every stage
    allocates the same KV block ids (the scheduler's), so the stage with the fewest blocks sets them."""
    compute = device.compute_dtype
    max_model_len = req.max_context or facts.max_position_embeddings
    limits = engine_limits(device, req.max_batched_tokens, req.max_num_seqs)
    usable = int(device.memory_bytes * req.gpu_memory_utilization)
    overhead = non_torch_bytes(device, tp, pp)
    margin = safety_margin_bytes(device, usable)
    rotary = rotary_table_bytes(facts, max_model_len)
    groups = model_kv_groups(facts, max_model_len)
    stages = pipeline_stages(facts.num_layers, pp)
    budgets = [_stage_budget(facts, device, req, quant, kv_dtype, tp, stage, pp, groups, limits,
                             usable - overhead - margin - rotary) for stage in stages]
    fullest = min(range(pp), key=lambda i: budgets[i].blocks)
    stage, budget = stages[fullest], budgets[fullest]
    per_sequence = groups.blocks_per_sequence(max_model_len, req.block_size)
    blocks_needed = per_sequence * req.concurrency
    blocks = budget.blocks
    if device.kind == "cpu":
        blocks = min(blocks, max(blocks_needed, CPU_KV_CACHE_BYTES // budget.block_bytes))
    shortfall = 0 if blocks >= blocks_needed else max(blocks_needed * b.block_bytes - b.kv_budget for b in budgets)
    world = tp * pp
    plan = Plan(
        model=facts.name, device=device.name, device_kind=device.kind, quantization=quant,
        kv_dtype=kv_dtype, compute_dtype=compute, tensor_parallel=tp,
        nodes=math.ceil(world / gpus_per_node), gpus_per_replica=world if device.kind == "cuda" else 0,
        block_size=req.block_size, num_kv_blocks=blocks, kv_bytes_per_token=kv_bytes_per_token(facts, kv_dtype, tp,
                                                                                                   stage),
        kv_block_bytes=budget.block_bytes, kv_blocks_per_sequence=per_sequence, kv_groups=groups.num_groups,
        sliding_windows=groups.sliding_windows, max_model_len=max_model_len,
        max_num_seqs=max(1, min(limits.max_num_seqs, blocks)),
        max_batched_tokens=limits.max_batched_tokens,
        memory=MemoryBreakdown(device.memory_bytes, usable, sum(budget.parts.values()),
                               blocks * budget.block_bytes, budget.activations, overhead, margin, rotary),
        weights_by_part=budget.parts,
        checkpoint=facts.checkpoint.label if facts.checkpoint else None,
        num_host_kv_blocks=(host_kv_blocks(req.host_kv_bytes, budget.block_bytes)
                            if host_tier_runs(tp, pp, groups.is_hybrid) else 0),
        pipeline_parallel=pp, stage_layers=tuple(len(s.layers) for s in stages),
        stage_weight_bytes=tuple(sum(b.parts.values()) for b in budgets),
    )
    return plan, shortfall


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


Shape = tuple[int, int]  # (tensor parallel, pipeline parallel)


def _pinned_degree(facts: ModelFacts, device: Device, req: PlanRequest) -> int:
    """The tensor-parallel degree the request pins, refused in one line when it cannot run."""
    tp = req.tensor_parallel
    if device.kind == "cpu" and tp != 1:
        raise PlanError(f"tensor parallel {tp} needs GPUs; the CPU runs tensor parallel 1")
    if not tp_compatible(facts, tp):
        raise PlanError(f"tensor parallel {tp} does not split {facts.name}'s {facts.num_heads} heads / "
                        f"{facts.num_kv_heads} KV heads evenly: use one of "
                        f"{', '.join(map(str, _tp_degrees(facts, device, 64)))}")
    return tp


def _check_pinned_stages(facts: ModelFacts, device: Device, req: PlanRequest) -> int:
    pp = req.pipeline_parallel
    if device.kind == "cpu" and pp != 1:
        raise PlanError(f"pipeline parallel {pp} needs GPUs; the CPU runs pipeline parallel 1")
    if pp > facts.num_layers:
        raise PlanError(f"pipeline parallel {pp} exceeds {facts.name}'s {facts.num_layers} layers")
    return pp


def _shapes(facts: ModelFacts, device: Device, req: PlanRequest) -> tuple[list[Shape], list[Shape]]:
    """(the shapes one node can run, the multi-node shapes to try when none of those fits)."""
    node = min(req.gpus_per_node, req.max_gpus_per_replica or req.gpus_per_node)
    limit = req.max_gpus_per_replica or req.gpus_per_node * MAX_NODES_PER_REPLICA
    tps = [_pinned_degree(facts, device, req)] if req.tensor_parallel else _tp_degrees(facts, device, node)
    if req.pipeline_parallel:
        pp = _check_pinned_stages(facts, device, req)
        shapes = [(tp, pp) for tp in tps if tp * pp <= limit]
        if tps and not shapes:
            raise PlanError(f"tensor parallel {tps[0]} x pipeline parallel {pp} exceeds the most GPUs per replica "
                            f"({limit})")
        return shapes, []
    if req.tensor_parallel:
        if req.max_gpus_per_replica and tps[0] > req.max_gpus_per_replica:
            raise PlanError(f"tensor parallel {tps[0]} exceeds the most GPUs per replica ({req.max_gpus_per_replica})")
        return [(tps[0], 1)], []
    first = [(tp, 1) for tp in tps]
    if device.kind != "cuda" or not tps or limit <= req.gpus_per_node:
        return first, []
    stage_tp = tps[-1]
    wider = [(stage_tp, pp) for pp in range(2, min(limit // stage_tp, facts.num_layers) + 1)
             if math.ceil(stage_tp * pp / req.gpus_per_node) <= MAX_NODES_PER_REPLICA]
    if req.max_gpus_per_replica:  # allowed outright: one search, GPU counts in order
        return first + wider, []
    return first, wider


def _search(facts: ModelFacts, device: Device, req: PlanRequest, shapes: list[Shape]):
    ladder = _precision_ladder(device, req, facts)
    if req.optimize == "quality":
        order = [(q, kv, shape) for q, kv in ladder for shape in shapes]
    else:
        order = [(q, kv, shape) for shape in shapes for q, kv in ladder]
    attempts = []
    for quant, kv, (tp, pp) in order:
        plan, shortfall = size(facts, device, req, quant, kv, tp, req.gpus_per_node, pp)
        attempts.append((plan, shortfall))
        if shortfall == 0:
            return plan, attempts
    return None, attempts


def plan(facts: ModelFacts, device: Device, req: PlanRequest) -> Plan:
    """The configuration to serve `facts` on `device` as `req` asks, or NoFit/PlanError."""
    if req.max_context and req.max_context > facts.max_position_embeddings:
        raise PlanError(f"max context {req.max_context} exceeds {facts.name}'s "
                        f"{facts.max_position_embeddings} positions")
    check_offload(device, req)
    first, wider = _shapes(facts, device, req)
    chosen, attempts = _search(facts, device, req, first)
    widened = False
    if chosen is None and wider:
        chosen, more = _search(facts, device, req, wider)
        attempts += more
        widened = chosen is not None
    if not attempts:
        raise PlanError(f"no tensor-parallel degree up to {req.max_gpus_per_replica or req.gpus_per_node} GPUs "
                        f"splits {facts.name}'s {facts.num_heads} heads / {facts.num_kv_heads} KV heads")
    if chosen is None and req.allow_offload:  # the last resort, consented to
        chosen = offload_plan(facts, device, req, attempts)
    if chosen is None:
        best, shortfall = min(attempts, key=lambda a: a[1])
        raise NoFit(f"{facts.name} does not fit on {device.name}: the best attempt, {describe(best)}, "
                    f"misses by {shortfall / GiB:.2f} GiB per GPU for {req.concurrency} x "
                    f"{best.max_model_len} tokens of KV cache{offload_clause(facts, device, req, attempts)}",
                    shortfall)
    return with_reasons(facts, chosen, attempts, req, widened)
