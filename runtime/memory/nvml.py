"""NVIDIA's management library, opened once per question: the one place that sets pynvml up."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any


@contextlib.contextmanager
def nvml() -> Iterator[Any | None]:
    """pynvml, initialised for the block, or None on a host without an NVIDIA driver or the library."""
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:  # no library, no driver (NVMLError_LibraryNotFound, ...): a CPU host
        yield None
        return
    try:
        yield pynvml
    finally:
        pynvml.nvmlShutdown()
