"""The memory model against published measurements: the KV tokens each plan promises never exceed
what vLLM obtained on the same GPU with the same settings by more than 3%, and fall short by no
more than 15% (reference_points.py holds the rows and their sources)."""

from __future__ import annotations

import dataclasses

import pytest
from reference_points import CHECKPOINTS, REFERENCE_POINTS, VLLM_SAMPLER_BYTES_PER_LOGIT, ReferencePoint

from kvpilot.runtime.memory.checkpoint import read_quantization
from kvpilot.runtime.memory.devices import Device, gpu_from_catalog
from kvpilot.runtime.memory.facts import from_catalog
from kvpilot.runtime.memory.planner import Plan, PlanRequest, plan

MOST_OVER, MOST_UNDER = 0.03, 0.15


def planned(row: ReferencePoint) -> Plan:
    device = gpu_from_catalog(row.gpu)
    facts = from_catalog(row.model)
    if row.checkpoint:
        quantization = read_quantization({"quantization_config": CHECKPOINTS[row.checkpoint]})
        facts = dataclasses.replace(facts, checkpoint=quantization)
    if row.kv_dtype == "fp16":  # vLLM ran --dtype float16: the compute dtype of a GPU without bf16
        device = Device(device.name, device.memory_bytes, fp8=device.fp8, bf16=False)
    request = PlanRequest(max_context=row.max_context, max_batched_tokens=row.max_batched_tokens,
                          max_num_seqs=row.max_num_seqs, quantization=row.quantization, kv_dtype=row.kv_dtype,
                          gpu_memory_utilization=row.gpu_memory_utilization, block_size=row.block_size,
                          tensor_parallel=row.tp, sampler_bytes_per_logit=VLLM_SAMPLER_BYTES_PER_LOGIT)
    return plan(facts, device, request)


def test_the_table_is_wide_enough():
    assert len(REFERENCE_POINTS) >= 10
    assert {row.tp for row in REFERENCE_POINTS} >= {1, 2, 4}
    assert all(row.source.startswith("https://") for row in REFERENCE_POINTS)


def _row_id(row: ReferencePoint) -> str:
    return f"{row.model}-{row.gpu}-tp{row.tp}-{row.checkpoint or row.quantization}-kv{row.kv_dtype}"


@pytest.mark.parametrize("row", REFERENCE_POINTS, ids=_row_id)
def test_plan_holds_what_the_gpu_held(row):
    p = planned(row)
    assert (p.tensor_parallel, p.quantization, p.kv_dtype) == (row.tp, row.quantization, row.kv_dtype)
    error = p.kv_capacity_tokens / row.measured_tokens - 1
    assert -MOST_UNDER <= error <= MOST_OVER, f"planned {p.kv_capacity_tokens} vs measured {row.measured_tokens}"


def test_tight_fits_no_longer_over_promise():
    """72B bf16 on two H100: the old catalog total, overhead and no margin promised ~30% more KV."""
    row = next(r for r in REFERENCE_POINTS if r.model == "qwen2.5-72b" and r.tp == 2)
    p = planned(row)
    assert p.kv_capacity_tokens <= row.measured_tokens
    assert p.memory.margin > 0 and p.memory.overhead > 2 * (1 << 30)  # NCCL at TP2


def test_the_margin_covers_what_gpu_memory_utilization_leaves_of_the_cuda_context():
    row = dataclasses.replace(REFERENCE_POINTS[0], gpu_memory_utilization=0.999)
    near_full, default = planned(row).memory, planned(REFERENCE_POINTS[0]).memory
    assert near_full.margin > default.margin
    assert near_full.total - near_full.usable + near_full.margin - default.margin >= 1 << 30
