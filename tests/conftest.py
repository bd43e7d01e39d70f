"""Process-wide test set-up.

Triton's interpreter (how CI runs the Triton kernels on the CPU) must be switched on before triton
is first imported, and transformers imports triton too; so it is set here, before any suite loads.
The kernels then run through the interpreter only inside tests/kernels (`ops.interpreter()`);
every other suite keeps the fast torch reference, whatever the collection order.
Subprocesses the tests start must not inherit the variable (they would interpret every kernel).
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from kvpilot.kernels import ops

ops.use_interpreter(False)

