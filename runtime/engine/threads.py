"""How many threads torch computes with on the CPU.

torch's default is one OpenMP thread per core, and an engine with a process of its own (`kvpilot
serve`'s default, runtime/server/engine_process.py; offline `LLM`) keeps it: the API server's process
beside it spends about 4% of a core streaming (measured serving 32 streams on 2 cores,
bench/vs_vllm.py's api_cpu_s), and vLLM's CPU engine keeps every core busy too (its engine core and
worker: 1.8 cores on 2). An engine that shares its process with the server (`--engine-in-process`)
leaves a core to the event loop instead: with every core in OpenMP's team, the team waits at each
matmul's barrier for the thread the event loop preempted, and a step gets several times slower
(measured on 2 cores: 1 thread beat 2 by 6x on the decoder's matmuls while the server was busy).
OMP_NUM_THREADS or KVPILOT_CPU_THREADS in the environment win.
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


def default_cpu_threads(shares_process: bool = False) -> int:
    """Threads for the CPU engine: KVPILOT_CPU_THREADS, else OMP_NUM_THREADS, else every core (cores - 1,
    at least 1, when the engine `shares_process` with the API server's event loop)."""
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
    return max(1, usable_cpus() - 1) if shares_process else usable_cpus()


def set_cpu_threads(shares_process: bool = False) -> int:
    """Set torch's intra-op threads for a CPU engine; returns the count."""
    threads = default_cpu_threads(shares_process)
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    logger.info("CPU engine: %d torch threads (%d usable cores)", threads, usable_cpus())
    return threads
