"""A process's place in the tensor-parallel group and the collectives the sharded layers use.

The model is sharded Megatron-style (models/llama.py): q/k/v and gate/up split by output (heads,
intermediate rows), o and down split by input and summed with one all-reduce each, embeddings and
lm_head split by vocabulary. KV heads split across ranks, or are replicated when there are fewer KV
heads than ranks: the layout `kvpilot.runtime.memory.quantization` counts. The processes themselves
are started by `kvpilot.runtime.engine.workers`.
"""

from __future__ import annotations

import datetime
import socket
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

# Workers load their shard while rank 0 loads its own; a worker that has not joined by then has failed.
JOIN_TIMEOUT = datetime.timedelta(minutes=10)


@dataclass(frozen=True)
class Parallel:
    """This process's place in the tensor-parallel group; size 1 makes every collective a no-op."""

    rank: int = 0
    size: int = 1

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.size > 1:
            dist.all_reduce(x)
        return x

    def gather_last_dim(self, x: torch.Tensor) -> torch.Tensor:
        """Every rank's `x` side by side along the last dimension (rank order)."""
        if self.size == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=-1)

    def broadcast(self, obj: Any = None) -> Any:
        """Rank 0's `obj` on every rank (host objects: lists and numbers, pickled)."""
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def all_ok(self, ok: bool, device: str) -> bool:
        """Whether every rank says ok (each rank must call it)."""
        flag = torch.tensor([int(ok)], device=device)
        if self.size > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag.item())

    def split(self, total: int) -> tuple[int, int]:
        """[start, end) of this rank's share of `total` rows cut in `size` equal pieces."""
        share = total // self.size
        return self.rank * share, (self.rank + 1) * share


SINGLE = Parallel()


def join(rank: int, size: int, address: str, device: str) -> Parallel:
    if device.startswith("cuda"):
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.startswith("cuda") else "gloo", init_method=f"tcp://{address}",
                            rank=rank, world_size=size, timeout=JOIN_TIMEOUT)
    return Parallel(rank, size)


def free_port() -> int:
    """A TCP port nothing listens on now (the OS picks it; the caller binds it soon after)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
