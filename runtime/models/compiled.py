"""The CPU decoder compiled with torch.compile (inductor), as vLLM's CPU engine compiles its model.

Eager PyTorch pays the dispatcher and the interpreter for each of a small model's ~50 operations per
layer and step (norms in fp32, rotary, residuals, activation). Inductor fuses them into a few C++
loops: on a 2-core Xeon, SmolLM2-135M at 32 sequences, compiled steps give 1.1-1.3x eager's tokens/s.
What it must not trace is kept behind two opaque operators, the way vLLM keeps attention out of its
graphs:

- `kvpilot::packed_linear`: the oneDNN-packed matmul (models/cpu_linear.py). Its weight is an opaque
  oneDNN tensor that inductor cannot take as an input, so the operator takes the weight's handle.
- `kvpilot::paged_attention`: the cache write and paged attention of one layer. Its batch layout (how
  many decodes, the block tables) changes every step; the operator reads it from the step being run
  (`run`), so the compiled graph sees only q, k, v and never recompiles for a new batch.

The token dimension is unbacked (one graph serves every batch size, 1 included); the graph is built
at start-up by the engine's warm-up forward (ModelRunner.compile), not on a user's request.
Compiled: a dense model on the CPU on one rank with no weights streamed. Everything else (quantized
projections, mixtures of experts, parallel ranks, offloaded layers, CUDA) runs eagerly as before.
"""

from __future__ import annotations

import itertools
import logging
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from kvpilot.runtime.models.layers import AttentionMetadata
    from kvpilot.runtime.models.llama import LlamaAttention, LlamaModel

logger = logging.getLogger("kvpilot.runtime.models.compiled")

_library = torch.library.Library("kvpilot", "FRAGMENT")
_library.define("packed_linear(Tensor x, int handle, Tensor? bias, int out_features) -> Tensor")
_library.define("paged_attention(Tensor q, Tensor k, Tensor v, int layer) -> Tensor")

# --- kvpilot::packed_linear -------------------------------------------------------------------------

_packed: weakref.WeakValueDictionary[int, torch.Tensor] = weakref.WeakValueDictionary()
_handles = itertools.count()


def register_packed_weight(weight: torch.Tensor) -> int:
    """A handle for a oneDNN-packed weight (held weakly: the PackedLinear owns it)."""
    handle = next(_handles)
    _packed[handle] = weight
    return handle


def _packed_linear(x: torch.Tensor, handle: int, bias: torch.Tensor | None, out_features: int) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, _packed[handle], bias, "none", [], "")


@torch.library.register_fake("kvpilot::packed_linear")
def _packed_linear_shape(x: torch.Tensor, handle: int, bias: torch.Tensor | None, out_features: int) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], out_features))


_library.impl("packed_linear", _packed_linear, "CPU")

# --- kvpilot::paged_attention -----------------------------------------------------------------------


@dataclass
class StepLayer:
    attention: LlamaAttention
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    meta: AttentionMetadata


_running = threading.local()  # .layers: the step this thread runs, by layer number


def run(decoder: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], attentions: list[LlamaAttention],
        positions: torch.Tensor, h: torch.Tensor, k_caches: list[torch.Tensor], v_caches: list[torch.Tensor],
        metas: list[AttentionMetadata]) -> torch.Tensor:
    """The compiled decoder's forward, its attention operators reading these layers' caches and layouts."""
    _running.layers = {attention.layer: StepLayer(attention, k, v, meta)
                       for attention, k, v, meta in zip(attentions, k_caches, v_caches, metas, strict=True)}
    try:
        for tensor in (h, positions):  # any number of tokens, 1 included: one graph
            torch._dynamo.decorators.mark_unbacked(tensor, 0)
        return decoder(positions, h)
    finally:
        _running.layers = {}


def _paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int) -> torch.Tensor:
    entry = _running.layers[layer]
    return entry.attention.attend(q, k, v, entry.k_cache, entry.v_cache, entry.meta)


@torch.library.register_fake("kvpilot::paged_attention")
def _paged_attention_shape(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int) -> torch.Tensor:
    return torch.empty_like(q)


_library.impl("paged_attention", _paged_attention, "CPU")

# --- the compiled decoder ---------------------------------------------------------------------------

INDUCTOR_OPTIONS = {"size_asserts": False, "nan_asserts": False, "epilogue_fusion": True}


def compilable(model: LlamaModel) -> str | None:
    """Why `model` runs eagerly, or None when its decoder compiles."""
    from kvpilot.runtime.models.cpu_linear import PackedLinear

    if model.parallel.size > 1 or model.parallel.stages > 1:
        return "parallel ranks"
    if model.streamer is not None:
        return "layers streamed from host memory"
    if model.norm.weight.device.type != "cpu":  # one rank, one device: the final norm's is the model's
        return "not on the CPU"
    layers = [model.layers[i] for i in model.stage.layers]
    linears = [m for layer in layers for m in layer.modules() if isinstance(m, (nn.Linear, PackedLinear))]
    if len(linears) != 4 * len(layers):  # qkv, o, gate_up and down of every layer, none quantized or expert
        return "quantized or expert projections"
    return None


def compile_decoder(model: LlamaModel) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None:
    """The model's layer stack and final norm, `(positions, hidden) -> hidden`, compiled; None (with the
    reason logged) where the model runs eagerly."""
    reason = compilable(model)
    if reason is not None:
        logger.info("decoder runs eagerly: %s", reason)
        return None
    return torch.compile(model.run_layers, dynamic=True, options=INDUCTOR_OPTIONS)
