"""kvpilot.kernels.support: the start-up checks that refuse a KV dtype or weight quantization the kernels
cannot run on the device, before any cache is allocated (not at the first kernel call)."""

from __future__ import annotations

import pytest
import torch

from kvpilot.kernels import ops, support

FP8 = torch.float8_e4m3fn


@pytest.mark.parametrize("kv_dtype", [torch.float32, torch.bfloat16, torch.float16, FP8], ids=str)
def test_every_kv_dtype_runs_on_the_cpu(kv_dtype):
    ops.check_kv_dtype_supported("cpu", kv_dtype)


@pytest.mark.parametrize(("capability", "refused"), [((8, 0), True), ((8, 6), True), ((8, 9), False), ((9, 0), False)])
def test_fp8_needs_compute_capability_8_9(monkeypatch, capability, refused):
    monkeypatch.setattr(support, "_capability", lambda device: capability)
    ops.check_kv_dtype_supported("cuda", torch.bfloat16)
    ops.check_weight_quantization_supported("cuda", "int4")
    if refused:
        with pytest.raises(ValueError, match=r"compute capability >= 8\.9.*use a bf16/fp16 KV cache"):
            ops.check_kv_dtype_supported("cuda", FP8)
        with pytest.raises(ValueError, match="use int8 or int4"):
            ops.check_weight_quantization_supported("cuda:0", "fp8")
    else:
        ops.check_kv_dtype_supported("cuda", FP8)
        ops.check_weight_quantization_supported("cuda", "fp8")


def test_unknown_names_are_refused():
    with pytest.raises(ValueError, match=r"KV cache dtype torch\.int8 is not supported"):
        ops.check_kv_dtype_supported("cpu", torch.int8)
    with pytest.raises(ValueError, match="'nf4' is not one of"):
        ops.check_weight_quantization_supported("cpu", "nf4")


@pytest.mark.parametrize(("capability", "refused"), [((8, 0), True), ((9, 0), False)])
def test_the_engine_refuses_fp8_on_its_config_before_any_weight_or_kv_block(monkeypatch, capability, refused):
    """The serving path: EngineConfig, built before the model loads and the KV pool is allocated, refuses an
    fp8 KV cache (or fp8 weights) on a GPU below compute capability 8.9, in one line naming the fix."""
    from kvpilot.runtime.engine.config import EngineConfig
    from kvpilot.runtime.memory.support import UnsupportedOption

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(support, "_capability", lambda device: capability)
    for options, fix in (({"kv_cache_dtype": "fp8"}, "use a bf16/fp16 KV cache"),
                         ({"quantization": "fp8"}, "use int8")):
        if refused:
            with pytest.raises(UnsupportedOption, match=rf"compute capability >= 8\.9.*{fix}") as err:
                EngineConfig(device="cuda", dtype="bf16", **options)
            assert "\n" not in str(err.value)
        else:
            assert EngineConfig(device="cuda", dtype="bf16", **options).device == "cuda"
    assert EngineConfig(device="cuda", dtype="bf16", quantization="int4").quantization == "int4"
