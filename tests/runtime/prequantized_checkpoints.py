"""Tiny pre-quantized Llama checkpoints, written the way each format's tools write them (no download).

Each builder writes config.json (with its quantization_config) and model.safetensors into a folder
and returns the float weights the checkpoint encodes (dequantized), so a test can compare what a
loader makes of the files with the checkpoint's meaning.

Layouts (the public formats):
- GPTQ (AutoGPTQ, "v1" zeros): qweight int32 [in/8, out] packs 8 input rows per int32, lowest
  nibble first; qzeros int32 [groups, out/8] packs 8 output columns, stored as zero - 1;
  scales fp16 [groups, out]; g_idx int32 [in] (row -> group). W[o, i] = scale * (q - zero).
- AWQ (AutoAWQ GEMM): qweight int32 [in, out/8] and qzeros int32 [groups, out/8] pack 8 output
  columns in the order 0, 2, 4, 6, 1, 3, 5, 7; scales fp16 [groups, out]. W = scale * (q - zero).
- compressed-tensors pack-quantized (W4A16, symmetric): weight_packed int32 [out, in/8], 8 input
  columns per int32, lowest nibble first, each q + 8; weight_scale [out, groups]; weight_shape.
- compressed-tensors float-quantized (FP8, per channel): weight float8_e4m3fn [out, in],
  weight_scale [out, 1] in the checkpoint dtype; per tensor: weight_scale [1] float32. W = weight * scale.
- compressed-tensors int-quantized (W8A8, per channel): weight int8 [out, in], weight_scale [out, 1]
  in the checkpoint dtype. W = weight * scale.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import save_file

CONFIG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 256,
          "intermediate_size": 512, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
          "vocab_size": 320, "max_position_embeddings": 512, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
          "tie_word_embeddings": False, "torch_dtype": "float16", "bos_token_id": 1, "eos_token_id": 2}
GROUP = 128
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)


def linears(config: dict = CONFIG) -> dict[str, tuple[int, int]]:
    """name -> (out, in) of every quantized linear."""
    h, i = config["hidden_size"], config["intermediate_size"]
    d = h // config["num_attention_heads"]
    kv = config["num_key_value_heads"] * d
    shapes = {"self_attn.q_proj": (h, h), "self_attn.k_proj": (kv, h), "self_attn.v_proj": (kv, h),
              "self_attn.o_proj": (h, h), "mlp.gate_proj": (i, h), "mlp.up_proj": (i, h), "mlp.down_proj": (h, i)}
    return {f"model.layers.{n}.{k}": v for n in range(config["num_hidden_layers"]) for k, v in shapes.items()}


def _float_tensors(gen: torch.Generator, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    h, v = CONFIG["hidden_size"], CONFIG["vocab_size"]
    out = {"model.embed_tokens.weight": torch.randn(v, h, generator=gen).to(dtype) * 0.05,
           "lm_head.weight": (torch.randn(v, h, generator=gen) * 0.05).to(dtype),
           "model.norm.weight": torch.ones(h, dtype=dtype)}
    for n in range(CONFIG["num_hidden_layers"]):
        out[f"model.layers.{n}.input_layernorm.weight"] = torch.ones(h, dtype=dtype)
        out[f"model.layers.{n}.post_attention_layernorm.weight"] = torch.ones(h, dtype=dtype)
    return out


def _pack_cols(q: torch.Tensor, order: tuple[int, ...] = tuple(range(8))) -> torch.Tensor:
    """[R, C] values 0..15 -> int32 [R, C / 8], column 8c + order[j] in bits 4j."""
    r, c = q.shape
    q = q.to(torch.int64).reshape(r, c // 8, 8)
    packed = sum(q[:, :, order[j]] << (4 * j) for j in range(8))
    return _int32(packed)


def _int32(values: torch.Tensor) -> torch.Tensor:
    """int64 holding unsigned 32-bit patterns -> the same bits as int32."""
    return torch.where(values >= 2**31, values - 2**32, values).to(torch.int32)


def _write(folder: Path, tensors: dict[str, torch.Tensor], quantization_config: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(CONFIG | {"quantization_config": quantization_config}))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "model.safetensors"))
    return folder


def gptq(folder: Path, seed: int = 0) -> tuple[Path, dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    tensors, meaning = _float_tensors(gen, torch.float16), {}
    for name, (out_f, in_f) in linears().items():
        groups = in_f // GROUP
        q = torch.randint(0, 16, (in_f, out_f), generator=gen)
        zero = torch.randint(4, 12, (groups, out_f), generator=gen)
        scale = (torch.rand(groups, out_f, generator=gen) * 0.01 + 0.002).to(torch.float16)
        g_idx = torch.arange(in_f, dtype=torch.int32) // GROUP
        tensors |= {f"{name}.qweight": _int32(_pack_rows_int64(q)), f"{name}.qzeros": _pack_cols(zero - 1),
                    f"{name}.scales": scale, f"{name}.g_idx": g_idx}
        meaning[name] = ((q - zero[g_idx.long()]) * scale[g_idx.long()].float()).T.contiguous()
    qc = {"quant_method": "gptq", "bits": 4, "group_size": GROUP, "sym": False, "desc_act": False}
    return _write(folder, tensors, qc), meaning


def _pack_rows_int64(q: torch.Tensor) -> torch.Tensor:
    r, c = q.shape
    q = q.to(torch.int64).reshape(r // 8, 8, c)
    return sum(q[:, j, :] << (4 * j) for j in range(8))


def awq(folder: Path, seed: int = 1) -> tuple[Path, dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    tensors, meaning = _float_tensors(gen, torch.float16), {}
    for name, (out_f, in_f) in linears().items():
        groups = in_f // GROUP
        q = torch.randint(0, 16, (in_f, out_f), generator=gen)
        zero = torch.randint(4, 12, (groups, out_f), generator=gen)
        scale = (torch.rand(groups, out_f, generator=gen) * 0.01 + 0.002).to(torch.float16)
        rows = torch.arange(in_f) // GROUP
        tensors |= {f"{name}.qweight": _pack_cols(q, AWQ_ORDER), f"{name}.qzeros": _pack_cols(zero, AWQ_ORDER),
                    f"{name}.scales": scale}
        meaning[name] = ((q - zero[rows]) * scale[rows].float()).T.contiguous()
    qc = {"quant_method": "awq", "bits": 4, "group_size": GROUP, "zero_point": True, "version": "gemm",
          "modules_to_not_convert": None}
    return _write(folder, tensors, qc), meaning


def compressed_w4a16(folder: Path, seed: int = 2) -> tuple[Path, dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    tensors, meaning = _float_tensors(gen, torch.float16), {}
    for name, (out_f, in_f) in linears().items():
        q = torch.randint(-8, 8, (out_f, in_f), generator=gen)
        scale = (torch.rand(out_f, in_f // GROUP, generator=gen) * 0.01 + 0.002).to(torch.float16)
        tensors |= {f"{name}.weight_packed": _pack_cols(q + 8), f"{name}.weight_scale": scale,
                    f"{name}.weight_shape": torch.tensor([out_f, in_f], dtype=torch.int64)}
        meaning[name] = q * scale.float().repeat_interleave(GROUP, dim=1)
    qc = {"quant_method": "compressed-tensors", "format": "pack-quantized", "ignore": ["lm_head"],
          "config_groups": {"group_0": {"targets": ["Linear"], "weights": {
              "num_bits": 4, "type": "int", "strategy": "group", "group_size": GROUP, "symmetric": True}}}}
    return _write(folder, tensors, qc), meaning


def compressed_fp8(folder: Path, seed: int = 3, ignore: tuple[str, ...] = ("lm_head",), strategy: str = "channel"
                   ) -> tuple[Path, dict[str, torch.Tensor]]:
    return _compressed_8bit(folder, seed, ignore, strategy, "float")


def compressed_w8a8(folder: Path, seed: int = 4) -> tuple[Path, dict[str, torch.Tensor]]:
    return _compressed_8bit(folder, seed, ("lm_head",), "channel", "int")


def _compressed_8bit(folder: Path, seed: int, ignore: tuple[str, ...], strategy: str, kind: str
                     ) -> tuple[Path, dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    tensors, meaning = _float_tensors(gen, torch.float16), {}
    for name, (out_f, in_f) in linears().items():
        if any(re.match(p[3:], name) if p.startswith("re:") else p in name for p in ignore):
            w = (torch.randn(out_f, in_f, generator=gen) * 0.05).to(torch.float16)
            tensors[f"{name}.weight"], meaning[name] = w, w.float()
            continue
        if kind == "float":
            w = (torch.randn(out_f, in_f, generator=gen) * 100).to(torch.float8_e4m3fn)
        else:
            w = torch.randint(-127, 128, (out_f, in_f), generator=gen).to(torch.int8)
        if strategy == "tensor":  # one fp32 scale for the matrix
            scale = torch.rand(1, generator=gen) * 0.001 + 0.0001
        else:
            scale = (torch.rand(out_f, 1, generator=gen) * 0.001 + 0.0001).to(torch.float16)
        tensors |= {f"{name}.weight": w, f"{name}.weight_scale": scale}
        meaning[name] = w.float() * scale.float()
    qc = {"quant_method": "compressed-tensors", "format": f"{kind}-quantized", "ignore": list(ignore),
          "config_groups": {"group_0": {"targets": ["Linear"], "weights": {
              "num_bits": 8, "type": kind, "strategy": strategy, "symmetric": True, "dynamic": False},
              "input_activations": {"num_bits": 8, "type": kind, "strategy": "token", "dynamic": True}}}}
    return _write(folder, tensors, qc), meaning
