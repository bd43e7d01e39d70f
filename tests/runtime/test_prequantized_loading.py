"""Pre-quantized checkpoints load into the runtime's quantized layouts as stored (no re-quantization)
and generate the tokens of the same checkpoint dequantized and run in the compute dtype."""

from __future__ import annotations

import json

import pytest
import torch
from prequantized_checkpoints import awq, compressed_fp8, compressed_w4a16, compressed_w8a8, gptq
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from kvpilot.runtime.engine.llm import LLM
from kvpilot.runtime.engine.sampling import SamplingParams
from kvpilot.runtime.loading.loader import load_model
from kvpilot.runtime.memory.checkpoint import checkpoint_weight_bytes_by_part
from kvpilot.runtime.memory.support import UnsupportedOption
from kvpilot.runtime.models.cpu_linear import PackedLinear
from kvpilot.runtime.models.quantized import QuantizedLinear, weight_quantization
from kvpilot.runtime.server.memory_report import weight_bytes_held

BUILDERS = {"gptq": (gptq, "int4"), "awq": (awq, "int4"), "compressed-w4a16": (compressed_w4a16, "int4"),
            "compressed-fp8": (compressed_fp8, "fp8"),
            "compressed-fp8-per-tensor": (lambda folder: compressed_fp8(folder, strategy="tensor"), "fp8"),
            "compressed-w8a8": (compressed_w8a8, "int8")}
LIMITS = {"num_kv_blocks": 32, "max_model_len": 256, "max_num_seqs": 4, "max_num_batched_tokens": 64,
          "device": "cpu"}
GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
PROMPTS = [[1, 17, 42, 99, 250, 3], [1, 5, 300, 7], [1, 64, 65, 66, 67, 68, 69, 70, 71]]


def dequantized_copy(folder, meaning, target):
    """The same checkpoint in float32: every quantized linear replaced by the weight it encodes."""
    target.mkdir()
    config = json.loads((folder / "config.json").read_text())
    config.pop("quantization_config")
    (target / "config.json").write_text(json.dumps(config | {"torch_dtype": "float32"}))
    quantized_parts = {f"{m}.{s}" for m in meaning for s in ("qweight", "qzeros", "scales", "g_idx", "weight",
                                                              "weight_packed", "weight_scale", "weight_shape")}
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        tensors = {k: f.get_tensor(k).float() for k in f.keys() if k not in quantized_parts}  # noqa: SIM118
    tensors |= {f"{m}.weight": w.float().contiguous() for m, w in meaning.items()}
    save_file(tensors, str(target / "model.safetensors"))
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (folder / name).is_file():
            (target / name).write_text((folder / name).read_text())
    return target


def linear_weights(model):
    """Each linear layer's row-major weight by module name (a oneDNN-packed one unpacked)."""
    return {name: (m.unpacked() if isinstance(m, PackedLinear) else m).weight
            for name, m in model.named_modules() if isinstance(m, (nn.Linear, PackedLinear))}


@pytest.fixture(scope="module", params=list(BUILDERS))
def pair(request, tmp_path_factory, tokenizer):
    build, mode = BUILDERS[request.param]
    root = tmp_path_factory.mktemp(request.param)
    folder, meaning = build(root / "quantized")
    tokenizer.save_pretrained(folder)
    reference = dequantized_copy(folder, meaning, root / "dequantized")
    loaded = load_model(str(folder), torch.float32, "cpu")
    return mode, loaded, load_model(str(reference), torch.float32, "cpu"), folder, reference


def test_projections_hold_the_checkpoint_layout_and_its_bytes(pair):
    mode, loaded = pair[:2]
    model = loaded.model
    projections = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    assert len(projections) == 4 * loaded.facts.num_layers and weight_quantization(model) == mode
    planned = sum(checkpoint_weight_bytes_by_part(loaded.facts, loaded.facts.checkpoint, "fp32").values())
    assert weight_bytes_held(model) == planned


def test_same_tokens_as_the_dequantized_checkpoint(pair):
    mode, loaded, reference = pair[:3]
    ours = [o.token_ids for o in LLM(loaded=loaded, quantization=mode, **LIMITS).generate(PROMPTS, GREEDY)]
    theirs = [o.token_ids for o in LLM(loaded=reference, **LIMITS).generate(PROMPTS, GREEDY)]
    assert ours == theirs


def test_projection_weights_equal_what_the_checkpoint_encodes(pair):
    from kvpilot.kernels.quant_reference import dequantize

    loaded, reference = pair[1:3]
    ref = linear_weights(reference.model)
    for name, module in loaded.model.named_modules():
        if isinstance(module, QuantizedLinear):
            assert torch.equal(dequantize(module.weight), ref[name].float()), name


@pytest.mark.parametrize("rank", [0, 1])
def test_each_tensor_parallel_rank_holds_its_share_of_the_checkpoint(pair, rank):
    """Rank `rank` of 2 cuts the stored layout as it cuts the dequantized float weights."""
    from kvpilot.kernels.quant_reference import dequantize
    from kvpilot.runtime.models.parallel import Parallel

    folder, reference = pair[3:]
    share = load_model(str(folder), torch.float32, "cpu", parallel=Parallel(rank, 2)).model
    ref = linear_weights(load_model(str(reference), torch.float32, "cpu", parallel=Parallel(rank, 2)).model)
    checked = 0
    for name, module in share.named_modules():
        if isinstance(module, QuantizedLinear):
            assert torch.equal(dequantize(module.weight), ref[name].float()), name
            checked += 1
    assert checked == 8


def test_a_different_quantization_than_the_checkpoints_is_refused(tmp_path, tokenizer):
    folder, _ = gptq(tmp_path / "gptq")
    tokenizer.save_pretrained(folder)
    with pytest.raises(UnsupportedOption, match="loads as int4 weights, not fp8"):
        load_model(str(folder), torch.float32, "cpu", quantization="fp8")
