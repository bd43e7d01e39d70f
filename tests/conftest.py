"""Process-wide test set-up.

Triton's interpreter (how CI runs the Triton kernels on the CPU) must be switched on before triton
is first imported (and transformers imports triton too), and each kernel is decorated for it when
its module is imported; so here, before any suite loads, triton and the kernel modules are imported
with TRITON_INTERPRET=1, then the environment is put back. kvpilot.kernels.ops reads the variable
at call time: the kernel tests set it around each test (tests/kernels/conftest.py), every other
suite keeps the fast torch reference whatever the collection order, and subprocesses the tests
start do not inherit it.

Engines the tests build run their decoder eagerly (KVPILOT_ENFORCE_EAGER=1, inherited by the servers
the tests start): compiling would cost each of them 10-90 s. tests/runtime/test_compiled_decoder.py
builds compiled engines explicitly. They compute with one torch thread (KVPILOT_CPU_THREADS=1): pytest
and the servers they start share the machine's cores with them.
"""

import importlib
import os

import torch

os.environ.setdefault("KVPILOT_ENFORCE_EAGER", "1")
os.environ.setdefault("KVPILOT_CPU_THREADS", "1")

if not torch.cuda.is_available():
    _previous = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        for _name in ("fused_moe", "paged_attention_decode", "paged_attention_prefill", "quantized_matmul",
                      "write_kv_cache"):
            importlib.import_module(f"kvpilot.kernels.{_name}")
    finally:
        if _previous is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = _previous
