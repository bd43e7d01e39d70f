"""Loading HF directories: a sharded safetensors checkpoint of SmolLM2 (transformers 5 config, tied
embeddings) gives HF's greedy tokens; small random Qwen2 (QKV bias), Llama 3 (rope scaling, untied,
head_dim != hidden / heads) and Mistral checkpoints give HF's log-probabilities token for token."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from kvpilot.runtime.engine.llm import LLM
from kvpilot.runtime.engine.sampling import SamplingParams
from kvpilot.runtime.loading.loader import load_model, resolve_model_path
from kvpilot.runtime.memory.facts import UnknownModel
from kvpilot.runtime.memory.support import UnsupportedOption

pytestmark = pytest.mark.slow
SMALL = {"hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 2, "vocab_size": 49152, "max_position_embeddings": 256, "initializer_range": 0.2}


def save_hf_dir(model, tokenizer, path, **kwargs) -> None:
    model.save_pretrained(path, **kwargs)
    tokenizer.save_pretrained(path)


def test_sharded_safetensors_directory(hf_model, tokenizer, tmp_path, parity_prompts, hf_reference, greedy):
    config = copy.deepcopy(hf_model.config)
    del config.quantization_config  # a GGUF-loaded HF model refuses to save; a plain copy does not
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config)
    plain.load_state_dict(hf_model.state_dict(), assign=True)
    save_hf_dir(plain, tokenizer, tmp_path, max_shard_size="200MB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert "rope_theta" not in json.loads((tmp_path / "config.json").read_text())  # under rope_parameters
    llm = LLM(str(tmp_path), device="cpu", num_kv_blocks=32, max_model_len=256)
    assert llm.engine.facts.rope_theta == 100000.0 and llm.engine.facts.tie_word_embeddings
    outputs = llm.generate(parity_prompts[:3], greedy)
    assert [o.token_ids for o in outputs] == hf_reference[:3]
    assert llm.apply_chat_template([{"role": "user", "content": "hi"}])[-3:] == tokenizer.encode("assistant\n")[-3:]


@pytest.mark.parametrize("kind", ["qwen2", "llama3", "mistral"])
def test_architectures_match_hf_logprobs(kind, tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config

    torch.manual_seed(0)
    if kind == "qwen2":
        config = Qwen2Config(**SMALL, tie_word_embeddings=True)
    elif kind == "llama3":
        config = LlamaConfig(**SMALL, head_dim=32, tie_word_embeddings=False, rope_theta=500000.0,
                             rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                           "high_freq_factor": 4.0, "original_max_position_embeddings": 32})
    else:
        config = MistralConfig(**SMALL, head_dim=24, sliding_window=128)  # = max_model_len below: no effect
    reference = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    save_hf_dir(reference, tokenizer, tmp_path)
    prompts = [tokenizer.encode(t) for t in ("The quick brown fox", "def main():\n    return 42")]
    llm = LLM(str(tmp_path), device="cpu", num_kv_blocks=16, max_model_len=128, max_num_batched_tokens=8,
              max_num_seqs=2)
    if kind == "qwen2":
        assert llm.engine.facts.qkv_bias
    outputs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=10, logprobs=1))
    for prompt, out in zip(prompts, outputs, strict=True):
        with torch.no_grad():
            logits = reference(torch.tensor([prompt + out.token_ids])).logits[0].float()
        hf_logprobs = logits.log_softmax(-1)[len(prompt) - 1 : -1]
        for step, (token_id, lp) in enumerate(zip(out.token_ids, out.logprobs, strict=True)):
            assert lp.logprob == pytest.approx(float(hf_logprobs[step, token_id]), abs=1e-4)
            assert float(hf_logprobs[step].max()) - float(hf_logprobs[step, token_id]) < 1e-4  # HF's greedy pick


def test_bad_model_paths_are_explained(tmp_path):
    with pytest.raises(UnknownModel, match="does not exist"):
        resolve_model_path(str(tmp_path / "nope"))
    with pytest.raises(UnknownModel, match=r"no config.json and 0 .gguf files"):
        resolve_model_path(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(UnsupportedOption, match=r"architecture 'GPT2LMHeadModel' is not supported: supported"):
        load_model(str(tmp_path), torch.float32, "cpu")


def test_a_field_the_runtime_does_not_honour_is_refused_at_load(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], **SMALL, "hidden_act": "gelu_pytorch_tanh", "moe_experts": 8}))
    with pytest.raises(UnsupportedOption, match=rf"{tmp_path.name}: config field moe_experts=8 .*not honoured"):
        load_model(str(tmp_path), torch.float32, "cpu")
    (tmp_path / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], **SMALL, "rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}))
    with pytest.raises(UnsupportedOption, match=r"past 256 tokens.*asked: 512"):
        load_model(str(tmp_path), torch.float32, "cpu", max_positions=512)
