"""Every kernel variant the launchers produce compiles for sm_80, sm_89 and sm_90 without a GPU, and no
variant real models use spills registers (compile_for_gpu.py says which, with registers, spills, shared
memory and the main loop's instruction count per variant).

The interpreter runs code the GPU compiler would reject; Triton's CUDA backend compiles to a cubin on
any machine, so compile_for_gpu.py does that in a process without TRITON_INTERPRET. About a minute of
CPU per architecture; with a GPU the kernel tests compile for the real device instead.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).with_name("compile_for_gpu.py")
KERNELS = {"_decode_kernel", "_merge_kernel", "_prefill_kernel", "_write_kv_kernel", "_qmm_kernel",
           "_moe_gate_up_kernel", "_moe_down_kernel"}


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU machine the kernel tests compile for the device")
@pytest.mark.parametrize("arch", [80, 89, 90])
def test_every_variant_compiles_and_real_model_variants_do_not_spill(arch):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    result = subprocess.run([sys.executable, str(SCRIPT), "--arch", str(arch)], env=env, capture_output=True,
                            text=True, timeout=580)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    compiled = [line for line in result.stdout.splitlines() if line.startswith(("ok ", "slow "))]
    assert {line.split()[2] for line in compiled} == KERNELS
    int4_decode = [line for line in compiled if "matmul int4 m1 k4096" in line]
    assert int4_decode and "cp.async 0," not in int4_decode[0]  # the int4 K loop is software-pipelined
    slow = [line for line in compiled if line.startswith("slow ")]
    assert all("float32" in line or "g128" in line or "k200" in line for line in slow), slow
