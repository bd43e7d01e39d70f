"""A process's place among the ranks: its pipeline stage, its tensor-parallel group inside the stage, and
the collectives the sharded layers use.

The model is sharded Megatron-style (models/llama.py): q/k/v and gate/up split by output (heads,
intermediate rows), o and down split by input and summed with one all-reduce each, embeddings and
lm_head split by vocabulary. KV heads split across ranks, or are replicated when there are fewer KV
heads than ranks: the layout `kvpilot.runtime.memory.quantization` counts.

Under pipeline parallelism the layers are split over stages (memory/stages.py, vLLM's split); global
rank = stage x TP + TP rank, so TP is innermost and a node holds whole stages. Rank 0 broadcasts a
step's inputs to its own stage only; each TP rank sends the step's inputs and its stage's hidden
states to the same TP rank of the next stage (they are whole on every rank after the all-reduce), and
the last stage's TP rank 0 sends the logits to rank 0, which samples. No collective spans two stages
while steps run, so stage 0 computes the next micro-batch while later stages compute earlier ones.
Sends are asynchronous (`Sends`): a stage waits for its previous sends only when it sends again.
The processes themselves are started by `kvpilot.runtime.engine.workers`.
"""

from __future__ import annotations

import datetime
import math
import pickle
import socket
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from kvpilot.runtime.memory.stages import Stage, pipeline_stages

# Workers load their shard while rank 0 loads its own; a worker that has not joined by then has failed.
JOIN_TIMEOUT = datetime.timedelta(minutes=10)


@dataclass(frozen=True)
class Parallel:
    """This process's place; size 1 makes every tensor-parallel collective a no-op, stages 1 every send."""

    rank: int = 0  # in the stage's tensor-parallel group
    size: int = 1  # tensor-parallel degree
    stage: int = 0
    stages: int = 1
    group: Any = None  # the stage's tensor-parallel process group (None: every rank's, with one stage)

    @property
    def world_size(self) -> int:
        return self.size * self.stages

    @property
    def global_rank(self) -> int:
        return self.stage * self.size + self.rank

    @property
    def is_first_stage(self) -> bool:
        return self.stage == 0

    @property
    def is_last_stage(self) -> bool:
        return self.stage == self.stages - 1

    def stage_of(self, num_layers: int) -> Stage:
        return pipeline_stages(num_layers, self.stages)[self.stage]

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.size > 1:
            dist.all_reduce(x, group=self.group)
        return x

    def share_step(self, host: Any) -> None:
        """Rank 0: a step's inputs (None: stop) to the other ranks of its stage."""
        if self.size > 1:
            dist.broadcast_object_list([host], src=0, group=self.group)

    def receive_step(self, device: str | torch.device) -> Any:
        """Any other rank: the next step's inputs, from rank 0 (first stage) or the previous stage."""
        if self.is_first_stage:
            box = [None]
            dist.broadcast_object_list(box, src=0, group=self.group)
            return box[0]
        size = torch.empty(1, dtype=torch.int64, device=device)
        dist.recv(size, src=self.global_rank - self.size)
        data = torch.empty(int(size.item()), dtype=torch.uint8, device=device)
        dist.recv(data, src=self.global_rank - self.size)
        return pickle.loads(data.cpu().numpy().tobytes())

    def send_next(self, sends: Sends, host: Any, hidden: torch.Tensor | None, device: str | torch.device) -> None:
        """A step's inputs (None: stop) and this stage's hidden states to the same TP rank of the next stage."""
        data = torch.frombuffer(bytearray(pickle.dumps(host)), dtype=torch.uint8).to(device)
        tensors = [torch.tensor([data.numel()], dtype=torch.int64, device=device), data]
        sends.send(tensors + ([] if hidden is None else [hidden.contiguous()]), self.global_rank + self.size)

    def recv_prev(self, shape: tuple[int, ...], dtype: torch.dtype, device: str | torch.device) -> torch.Tensor:
        hidden = torch.empty(shape, dtype=dtype, device=device)
        dist.recv(hidden, src=self.global_rank - self.size)
        return hidden

    def send_logits(self, sends: Sends, logits: torch.Tensor) -> None:
        """From the last stage's first rank to rank 0, which samples."""
        sends.send([logits.contiguous()], 0)

    def recv_logits(self, shape: tuple[int, ...], dtype: torch.dtype, device: str | torch.device) -> torch.Tensor:
        logits = torch.empty(shape, dtype=dtype, device=device)
        dist.recv(logits, src=(self.stages - 1) * self.size)
        return logits

    def gather_last_dim(self, x: torch.Tensor) -> torch.Tensor:
        """Every rank's `x` side by side along the last dimension (rank order)."""
        if self.size == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x.contiguous(), group=self.group)
        return torch.cat(parts, dim=-1)

    def broadcast(self, obj: Any = None) -> Any:
        """Rank 0's `obj` on every rank (host objects: lists and numbers, pickled)."""
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def all_ok(self, ok: bool, device: str) -> bool:
        """Whether every rank says ok (each rank must call it)."""
        flag = torch.tensor([int(ok)], device=device)
        if self.world_size > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag.item())

    def all_gather_object(self, obj: Any) -> list[Any]:
        """Every rank's `obj`, in global rank order (each rank must call it)."""
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def split(self, total: int) -> tuple[int, int]:
        """[start, end) of this rank's share of `total` rows cut in `size` equal pieces."""
        share = total // self.size
        return self.rank * share, (self.rank + 1) * share


SINGLE = Parallel()


class Sends:
    """Asynchronous sends in order; the tensors stay referenced until their sends complete."""

    def __init__(self) -> None:
        self.pending: list[tuple[Any, torch.Tensor]] = []

    def send(self, tensors: list[torch.Tensor], dst: int) -> None:
        self.wait()
        self.pending = [(dist.isend(t, dst), t) for t in tensors]

    def wait(self) -> None:
        for work, _ in self.pending:
            work.wait()
        self.pending = []


def join(rank: int, tp: int, address: str, device: str, stages: int = 1) -> Parallel:
    """Join as global `rank` of `tp x stages` ranks; every rank makes every stage's group, in order."""
    if device.startswith("cuda"):
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.startswith("cuda") else "gloo", init_method=f"tcp://{address}",
                            rank=rank, world_size=tp * stages, timeout=JOIN_TIMEOUT)
    groups = [dist.new_group(list(range(s * tp, (s + 1) * tp))) for s in range(stages)] if stages > 1 else [None]
    return Parallel(rank % tp, tp, rank // tp, stages, groups[rank // tp])


class VocabParallelEmbedding(nn.Module):
    """Rows [rank x V/size, (rank + 1) x V/size) of the embedding (V rounded up to a multiple of size);
    each rank looks up the ids it holds and one all-reduce sums the ranks' rows."""

    def __init__(self, vocab_size: int, hidden_size: int, parallel: Parallel = SINGLE) -> None:
        super().__init__()
        self.parallel, self.rows = parallel, math.ceil(vocab_size / parallel.size)
        self.start = parallel.rank * self.rows
        self.weight = nn.Parameter(torch.empty(self.rows, hidden_size))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.parallel.size == 1:
            return F.embedding(ids, self.weight)
        local = ids - self.start
        outside = (local < 0) | (local >= self.rows)
        h = F.embedding(local.masked_fill(outside, 0), self.weight).masked_fill(outside.unsqueeze(-1), 0.0)
        return self.parallel.all_reduce(h)


def free_port() -> int:
    """A TCP port nothing listens on now (the OS picks it; the caller binds it soon after)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
