"""How many threads torch computes with on the CPU.

torch's default is one OpenMP thread per core. A server also needs a core for its event loop (HTTP,
SSE, tokenizing): with every core in OpenMP's team, the team waits at each matmul's barrier for the
thread the event loop preempted, and a step gets several times slower (measured on 2 cores: 1 thread
beat 2 by 6x on the decoder's matmuls while the machine was busy; vLLM's CPU engine also leaves a
core). So the engine keeps one core free, unless the user chose: OMP_NUM_THREADS or
KVPILOT_CPU_THREADS in the environment win.
"""

from __future__ import annotations

import logging
import os

import torch

logger = logging.getLogger("kvpilot.runtime.engine.threads")


def usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def default_cpu_threads() -> int:
    """Threads for the CPU engine: KVPILOT_CPU_THREADS, else OMP_NUM_THREADS, else cores - 1 (at least 1)."""
    for name in ("KVPILOT_CPU_THREADS", "OMP_NUM_THREADS"):
        value = os.environ.get(name, "").strip()
        if value:
            try:
                threads = int(value)
            except ValueError:
                raise ValueError(f"{name}={value!r} is not a whole number of threads") from None
            if threads < 1:
                raise ValueError(f"{name}={value!r}: give at least 1 thread")
            return threads
    return max(1, usable_cpus() - 1)


def set_cpu_threads() -> int:
    """Set torch's intra-op threads for a CPU engine; returns the count."""
    threads = default_cpu_threads()
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    logger.info("CPU engine: %d torch threads (%d usable cores)", threads, usable_cpus())
    return threads
