"""Tensor and pipeline parallelism: one process per GPU, torch.distributed between them (NCCL on GPUs;
gloo on the CPU, where the tests run it).

Rank 0 is the engine: it schedules, packs each step's inputs on the host, shares them with its
stage, and samples from the logits gathered to it (sent to it by the last stage). Ranks 1..N-1 are
workers that rank 0 starts (`start_workers`): each loads its shard of its stage's weights and KV
cache, then runs every step it receives (from rank 0, or from the previous stage: models/parallel.py)
until it receives None.

How the model is sharded, and the collectives: `kvpilot.runtime.models.parallel`.
"""

from __future__ import annotations

import dataclasses
import multiprocessing as mp
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch.distributed as dist

from kvpilot.runtime.models.parallel import Parallel, free_port, join

if TYPE_CHECKING:
    from kvpilot.runtime.engine.config import EngineConfig


def device_for(config: EngineConfig, rank: int) -> str:
    return f"cuda:{rank % config.gpus_per_node}" if config.device.startswith("cuda") else "cpu"


def node_ranks(config: EngineConfig) -> range:
    """The global ranks this node runs: node r holds ranks r x g .. r x g + g - 1 (g GPUs per node)."""
    g = config.gpus_per_node
    return range(config.node_rank * g, (config.node_rank + 1) * g)


def group_address(config: EngineConfig) -> str:
    """Where the ranks meet: the leader's address across nodes; a free local port on one node."""
    return f"{config.leader_address}:{config.leader_port}" if config.nnodes > 1 else f"127.0.0.1:{free_port()}"


@dataclass
class Workers:
    """The ranks this node runs in child processes, and how their start-up failures reach the caller."""

    processes: list[mp.process.BaseProcess]
    failures: Any  # a multiprocessing queue of error messages

    def raise_failure(self) -> None:
        raise RuntimeError(f"a tensor-parallel worker failed to start: {self.failures.get(timeout=30)}")

    def stop_group(self) -> None:
        for process in self.processes:
            process.join(timeout=30)
            if process.is_alive():
                process.terminate()
        dist.destroy_process_group()


def _spawn(config: EngineConfig, ranks: range, address: str) -> Workers:
    context = mp.get_context("spawn")  # CUDA and fork do not mix
    failures = context.Queue()
    processes = [context.Process(target=_worker, args=(rank, dataclasses.asdict(config), address, failures),
                                 name=f"kvpilot-tp{rank}", daemon=True) for rank in ranks]
    for process in processes:
        process.start()
    return Workers(processes, failures)


def start_workers(config: EngineConfig) -> tuple[Parallel, Workers]:
    """On the leader: start this node's other ranks, then join the group as rank 0."""
    address = group_address(config)
    workers = _spawn(config, node_ranks(config)[1:], address)
    return join(0, config.tensor_parallel_size, address, device_for(config, 0), config.pipeline_parallel_size), workers


def run_worker_node(config: EngineConfig) -> int:
    """On a node other than the leader's: run its ranks until the leader's engine stops them."""
    workers = _spawn(config, node_ranks(config), group_address(config))
    for process in workers.processes:
        process.join()
    if not workers.failures.empty():
        raise RuntimeError(workers.failures.get())
    return max(process.exitcode or 0 for process in workers.processes)


def _worker(rank: int, options: dict[str, Any], address: str, failures: Any) -> None:
    from kvpilot.runtime.engine.config import EngineConfig
    from kvpilot.runtime.engine.llm_engine import load_configured
    from kvpilot.runtime.engine.model_runner import ModelRunner
    from kvpilot.runtime.loading.loader import weight_bytes_held

    config = EngineConfig(**options)
    config = dataclasses.replace(config, device=device_for(config, rank))
    parallel = join(rank, config.tensor_parallel_size, address, config.device, config.pipeline_parallel_size)
    try:
        loaded = load_configured(config, parallel)
    except Exception as err:  # rank 0 reports it: this process has no one to tell
        failures.put(f"rank {rank}: {type(err).__name__}: {err}")
        parallel.all_ok(False, config.device)
        dist.destroy_process_group()
        return
    if not parallel.all_ok(True, config.device):  # another rank failed: rank 0 raises
        dist.destroy_process_group()
        return
    parallel.all_gather_object(weight_bytes_held(loaded.model))  # rank 0 keeps every rank's figure
    # Rank 0's limits, completed from the model and the plan: every rank sizes its KV pool the same.
    config = dataclasses.replace(EngineConfig(**parallel.broadcast()), device=config.device)
    runner = ModelRunner(loaded.model, loaded.facts, config, None, parallel)
    while (inputs := parallel.receive_step(config.device)) is not None:
        runner.execute(inputs)
    runner.stop()
    dist.destroy_process_group()
