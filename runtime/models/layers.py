"""The building blocks of a Llama-family decoder: RMSNorm, rotary embedding (default, linear and
Llama 3 scaling) and the paged attention batch description. Arithmetic follows HF transformers
operation for operation, so greedy tokens match it in fp32."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from kvpilot.runtime.memory.support import UnsupportedOption


@dataclass
class AttentionMetadata:
    """Where the packed tokens of one step go: decodes first (one token per sequence), then prefill
    chunks. Shapes and layouts are those of `kvpilot.kernels.reference`."""

    slot_mapping: torch.Tensor  # [num_tokens] int64
    num_decode_tokens: int
    decode_block_tables: torch.Tensor  # [num_decodes, max_blocks] int32
    decode_context_lens: torch.Tensor  # [num_decodes] int32
    prefill_block_tables: torch.Tensor  # [num_prefills, max_blocks] int32
    prefill_cu_seqlens_q: torch.Tensor  # [num_prefills + 1] int32
    prefill_context_lens: torch.Tensor  # [num_prefills] int32
    decode_max_context_len: int = 0  # known on the host: the GPU kernels need no device sync for them
    prefill_max_query_len: int = 0
    prefill_max_context_len: int = 0


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class GemmaRMSNorm(RMSNorm):
    """Gemma's RMSNorm: scales by (1 + weight), the whole computation in fp32, then casts back."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x.float()
        out = out * torch.rsqrt(out.pow(2).mean(-1, keepdim=True) + self.eps)
        return (out * (1.0 + self.weight.float())).to(x.dtype)


# the formulas of transformers.activations.ACT2FN, so fp32 results are equal, not merely close
ACTIVATIONS = {"silu": F.silu, "relu": F.relu, "gelu": F.gelu,
               "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
               "gelu_new": lambda x: 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi)
                                                                 * (x + 0.044715 * x.pow(3.0)))),
               "gelu_fast": lambda x: 0.5 * x * (1.0 + torch.tanh(x * 0.7978845608 * (1.0 + 0.044715 * x * x)))}


def _rope_type(scaling: dict[str, Any] | None) -> str:
    if not scaling:
        return "default"
    return str(scaling.get("rope_type") or scaling.get("type") or "default")


def rope_parameters(dim: int, theta: float, scaling: dict[str, Any] | None, freq_factors: torch.Tensor | None = None,
                    device: torch.device | None = None, max_positions: int = 0) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [dim / 2] in fp32 and the factor cos/sin are multiplied by, computed as
    transformers' `modeling_rope_utils` does for each rope type. `max_positions` is the context the
    engine serves: longrope picks its long factors when it exceeds the original context."""
    steps = torch.arange(0, dim, 2, dtype=torch.int64, device=device).float()
    inv_freq = 1.0 / (theta ** (steps / dim))
    if freq_factors is not None:  # GGUF stores Llama 3's scaling as precomputed per-frequency divisors
        return inv_freq / freq_factors.to(inv_freq.device).float(), 1.0
    kind = _rope_type(scaling)
    if kind in ("default", "dynamic"):  # dynamic: refused past the original length (memory/support.py)
        return inv_freq, 1.0
    assert scaling is not None
    if kind == "linear":
        return inv_freq / float(scaling["factor"]), 1.0
    if kind == "llama3":
        factor, low, high = (float(scaling[k]) for k in ("factor", "low_freq_factor", "high_freq_factor"))
        old_len = float(scaling["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old_len / high) * ~(wavelen > old_len / low)
        return torch.where(medium, smoothed, scaled), 1.0
    if kind == "yarn":
        return _yarn(dim, theta, scaling, device)
    if kind == "longrope":
        original = int(scaling["original_max_position_embeddings"])
        factor = float(scaling.get("factor") or 1.0)  # memory/support.py fills it in as transformers does
        attention = scaling.get("attention_factor")
        if attention is None:
            attention = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
        ext = scaling["long_factor"] if max_positions > original else scaling["short_factor"]
        ext = torch.tensor(ext, dtype=torch.float32, device=device)
        return 1.0 / (ext * theta ** (steps / dim)), float(attention)
    raise UnsupportedOption(f"rope scaling type {kind!r} is not supported: use a model with default, "
                            "linear, llama3, yarn, longrope or dynamic rope scaling")


def _yarn(dim: int, base: float, scaling: dict[str, Any], device: torch.device | None) -> tuple[torch.Tensor, float]:
    factor = float(scaling["factor"])
    original = float(scaling["original_max_position_embeddings"])

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention = scaling.get("attention_factor")
    if attention is None:
        m, m_all = scaling.get("mscale"), scaling.get("mscale_all_dim")
        attention = mscale(factor, m) / mscale(factor, m_all) if m and m_all else mscale(factor)
    beta_fast, beta_slow = scaling.get("beta_fast") or 32, scaling.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # as HF: no division by zero
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1).to(device)
    pos_freqs = base ** (torch.arange(0, dim, 2).to(device=device, dtype=torch.float) / dim)
    extrapolation = 1 - ramp
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv_freq, float(attention)


class RotaryEmbedding(nn.Module):
    """Rotates the two halves of each head's first `rotary_dim` channels (HF / GPT-NeoX layout) by a
    cos/sin table of every position; the rest of the head passes through (partial rotary, Phi)."""

    def __init__(self, head_dim: int, max_positions: int, theta: float, scaling: dict[str, Any] | None,
                 freq_factors: torch.Tensor | None = None, rotary_dim: int | None = None) -> None:
        super().__init__()
        self.head_dim, self.max_positions, self.theta, self.scaling = head_dim, max_positions, theta, scaling
        self.rotary_dim = rotary_dim or head_dim
        self.freq_factors = freq_factors
        # longrope past its original context: rows [0, max_positions) hold the short factors' angles, rows
        # [long_offset, 2 * max_positions) the long ones'; a sequence that may grow past `long_after`
        # tokens reads position + long_offset (transformers picks the long factors for such a sequence)
        original = int(scaling["original_max_position_embeddings"]) if _rope_type(scaling) == "longrope" else 0
        self.long_after = original if 0 < original < max_positions else None
        self.long_offset = max_positions if self.long_after else 0
        self.register_buffer("cos", torch.empty(0), persistent=False)
        self.register_buffer("sin", torch.empty(0), persistent=False)
        self.build_tables(torch.empty(0).device)  # the default device: meta while the loader builds

    def build_tables(self, device: torch.device) -> None:
        """The fp32 cos/sin of every position; rebuilt on the real device after meta-device construction."""
        if device.type == "meta":
            return
        contexts = [self.long_after, self.max_positions] if self.long_after else [self.max_positions]
        cos, sin = [], []
        for context in contexts:  # longrope: the short factors' rows, then the long ones'
            inv_freq, attention = rope_parameters(self.rotary_dim, self.theta, self.scaling, self.freq_factors,
                                                  device, context)
            freqs = torch.outer(torch.arange(self.max_positions, dtype=torch.float32, device=device), inv_freq)
            cos.append(freqs.cos() * attention)
            sin.append(freqs.sin() * attention)
        self.cos, self.sin = torch.cat(cos), torch.cat(sin)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cos = self.cos[positions].unsqueeze(1).to(q.dtype)
        sin = self.sin[positions].unsqueeze(1).to(q.dtype)
        if self.rotary_dim == self.head_dim:
            return _rotate(q, cos, sin), _rotate(k, cos, sin)
        d = self.rotary_dim
        return (torch.cat((_rotate(q[..., :d], cos, sin), q[..., d:]), dim=-1),
                torch.cat((_rotate(k[..., :d], cos, sin), k[..., d:]), dim=-1))


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
