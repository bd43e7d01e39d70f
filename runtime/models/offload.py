"""Weights offload: some decoder layers' weights live in host memory and are streamed to the device,
double-buffered, just ahead of their use.

`offload_weights(model, count)` moves the chosen layers' tensors (memory/offload.py picks which) into a
host store: one flat byte buffer per layer, its tensors' storages packed by element size, largest
first, so every offset stays aligned with no padding (pinned memory on CUDA). Two device staging
buffers hold the largest offloaded layer each; every offloaded layer's tensors become fixed views into
staging buffer (its rank among the offloaded layers % 2), so the layer itself runs unchanged.

`LlamaModel.forward` calls the streamer around each layer: `wait(i)` before layer i runs (its copy is
in), `release(i)` once it has run: the copy of the next offloaded layer of the same buffer (two ranks
later; cyclic, so the next forward's first layers are prefetched) goes into the buffer it frees. With an
odd count the last layer and the first share buffer 0, so the first one's copy for the next forward
overlaps only what runs between them. On CUDA the copies run on
a side stream from pinned memory, with events both ways: a copy waits for the compute that last read
its buffer, a layer waits for its copy. On the CPU a copy is a plain `copy_`.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from kvpilot.runtime.memory.offload import offloaded_layers
from kvpilot.runtime.models.cpu_linear import unpack_cpu_linears
from kvpilot.runtime.models.layers import RotaryEmbedding
from kvpilot.runtime.models.moe import MoEMLP
from kvpilot.runtime.models.quantized import QuantizedLinear


@dataclasses.dataclass
class HostLayer:
    """One offloaded layer: its bytes in host memory and the staging buffer its tensors view."""

    layer: int  # index within the stage
    host: torch.Tensor  # uint8 [nbytes], its own allocation
    buffer: int  # 0 or 1


class WeightStreamer:
    """Copies each offloaded layer from the host store into its staging buffer ahead of its use."""

    def __init__(self, layers: list[HostLayer], staging: list[torch.Tensor]) -> None:
        self.layers, self.staging = layers, staging
        self.rank = {host.layer: rank for rank, host in enumerate(layers)}
        self.next = [_next_of_buffer(rank, len(layers)) for rank in range(len(layers))]
        cuda = staging[0].device.type == "cuda"
        self.copy_stream = torch.cuda.Stream(staging[0].device) if cuda else None
        self.copied = [torch.cuda.Event() for _ in staging] if cuda else []
        self.released = [torch.cuda.Event() for _ in staging] if cuda else []
        self.held = [-1 for _ in staging]  # the rank whose copy each buffer was last given
        for rank in range(min(2, len(layers))):
            self._copy(rank)

    @property
    def host_bytes(self) -> int:
        return sum(host.host.numel() for host in self.layers)

    @property
    def staging_bytes(self) -> int:
        return sum(buffer.numel() for buffer in self.staging)

    def wait(self, layer: int) -> None:
        """Before stage layer `layer` runs: its weights are in its staging buffer."""
        rank = self.rank.get(layer)
        if rank is None:
            return
        buffer = self.layers[rank].buffer
        if self.held[buffer] != rank:  # a forward stopped between layers (an exception): fetch it now
            self._after_compute(buffer)
            self._copy(rank)
        if self.copy_stream is not None:
            torch.cuda.current_stream(self.staging[0].device).wait_event(self.copied[buffer])

    def release(self, layer: int) -> None:
        """Stage layer `layer` has run: its buffer takes the next offloaded layer that uses it."""
        rank = self.rank.get(layer)
        if rank is not None:
            self._after_compute(self.layers[rank].buffer)
            self._copy(self.next[rank])

    def _after_compute(self, buffer: int) -> None:
        """The next copy into `buffer` waits for the compute issued so far (which may still read it)."""
        if self.copy_stream is not None:
            self.released[buffer].record(torch.cuda.current_stream(self.staging[0].device))
            self.copy_stream.wait_event(self.released[buffer])

    def _copy(self, rank: int) -> None:
        host = self.layers[rank]
        self.held[host.buffer] = rank
        target = self.staging[host.buffer][: host.host.numel()]
        if self.copy_stream is None:
            target.copy_(host.host)
            return
        with torch.cuda.stream(self.copy_stream):
            target.copy_(host.host, non_blocking=True)
            self.copied[host.buffer].record(self.copy_stream)


def _next_of_buffer(rank: int, count: int) -> int:
    """The rank after `rank`, cyclically, that shares its staging buffer (rank % 2)."""
    same = list(range(rank % 2, count, 2))
    return same[(same.index(rank) + 1) % len(same)]


def layer_tensors(layer: nn.Module) -> list[torch.Tensor]:
    """Every tensor the layer computes with: parameters, buffers, quantized weights and MoE expert stacks;
    not the rotary tables, which all layers share and which are derived, not weights."""
    found: dict[int, torch.Tensor] = {}
    for module in layer.modules():
        if isinstance(module, RotaryEmbedding):
            continue
        tensors = [*module.parameters(recurse=False), *module.buffers(recurse=False)]
        if isinstance(module, QuantizedLinear):
            tensors += [t for t in (module.weight.qweight, module.weight.scale, module.weight.zero) if t is not None]
        if isinstance(module, MoEMLP) and module._stack is not None:
            tensors += list(module._stack)
        found.update((id(t), t) for t in tensors)
    return list(found.values())


def _storages(tensors: list[torch.Tensor]) -> list[tuple[torch.UntypedStorage, int, list[torch.Tensor]]]:
    """(storage, element size, the tensors that view it), largest element size first."""
    groups: dict[int, tuple[torch.UntypedStorage, int, list[torch.Tensor]]] = {}
    for t in tensors:
        storage = t.untyped_storage()
        groups.setdefault(storage.data_ptr(), (storage, t.element_size(), []))[2].append(t)
    return sorted(groups.values(), key=lambda group: -group[1])


def _bytes_of(storage: torch.UntypedStorage) -> torch.Tensor:
    return torch.empty(0, dtype=torch.uint8, device=storage.device).set_(storage)


@torch.no_grad()
def offload_weights(model: nn.Module, count: int) -> None:
    """Move `count` of the stage's decoder layers (memory/offload.py's choice) into a host store and
    attach the streamer that feeds them back (`model.model.streamer`; none for 0)."""
    body = model.model
    stage_layers = list(body.stage.layers)
    chosen = offloaded_layers(len(stage_layers), count)
    if not chosen:
        return
    for i in chosen:  # a oneDNN-packed weight is opaque: the host store holds plain row-major bytes
        unpack_cpu_linears(body.layers[stage_layers[i]])
    groups = {i: _storages(layer_tensors(body.layers[stage_layers[i]])) for i in chosen}
    sizes = {i: sum(storage.nbytes() for storage, _, _ in groups[i]) for i in chosen}
    device = groups[chosen[0]][0][0].device  # the first storage's
    pin = device.type == "cuda"
    staging = [torch.empty(max(sizes.values()), dtype=torch.uint8, device=device) for _ in range(2)]
    layers = []
    for rank, i in enumerate(chosen):
        host = torch.empty(sizes[i], dtype=torch.uint8, pin_memory=pin)
        buffer, offset = rank % 2, 0
        for storage, element_size, tensors in groups[i]:
            nbytes = storage.nbytes()
            host[offset : offset + nbytes].copy_(_bytes_of(storage))
            for t in tensors:
                t.set_(staging[buffer].untyped_storage(), offset // element_size + t.storage_offset(), t.shape,
                       t.stride())
            offset += nbytes
        layers.append(HostLayer(i, host, buffer))
    body.streamer = WeightStreamer(layers, staging)
    if pin:
        torch.cuda.empty_cache()  # the layers' device copies are gone: hand their memory back


def streamer_of(model: nn.Module) -> WeightStreamer | None:
    return getattr(getattr(model, "model", None), "streamer", None)
