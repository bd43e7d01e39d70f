"""memory/support.py: the one list of what the runtime runs. Every field of the supported families'
HF configs is honoured or known to be inert; anything else is refused in one line naming the field,
its value and what is supported, by the loader and by `python -m kvpilot.runtime serve` (exit 2)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from kvpilot.runtime.memory.support import ARCHITECTURES, UnsupportedOption, check_hf_config, layer_windows

LLAMA = {"architectures": ["LlamaForCausalLM"], "hidden_size": 64, "intermediate_size": 128,
         "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 1000,
         "max_position_embeddings": 256, "hidden_act": "silu", "rope_theta": 10000.0}
CONFIG_CLASSES = {"LlamaForCausalLM": "LlamaConfig", "MistralForCausalLM": "MistralConfig",
                  "Qwen2ForCausalLM": "Qwen2Config", "Qwen3ForCausalLM": "Qwen3Config",
                  "GraniteForCausalLM": "GraniteConfig", "Olmo2ForCausalLM": "Olmo2Config",
                  "Phi3ForCausalLM": "Phi3Config", "SmolLM3ForCausalLM": "SmolLM3Config",
                  "Gemma2ForCausalLM": "Gemma2Config", "Gemma3ForCausalLM": "Gemma3TextConfig",
                  "MixtralForCausalLM": "MixtralConfig", "Qwen3MoeForCausalLM": "Qwen3MoeConfig",
                  "Qwen2MoeForCausalLM": "Qwen2MoeConfig"}


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_every_field_transformers_writes_for_a_supported_family_is_known(arch):
    """A field transformers adds to a family's config (this version's defaults, as save_pretrained
    writes them) is either honoured or inert: else this list is stale and a checkpoint would be refused."""
    import transformers

    config = getattr(transformers, CONFIG_CLASSES[arch])().to_dict()
    config["architectures"] = [arch]
    check_hf_config(config, max_model_len=4096)


@pytest.mark.parametrize(("change", "message"), [
    ({"architectures": ["GPT2LMHeadModel"]}, r"architecture 'GPT2LMHeadModel' is not supported: supported "
                                             r"architectures are LlamaForCausalLM, "),
    ({"hidden_act": "swish_10"}, r"hidden_act='swish_10' is not supported: supported activations are silu, gelu"),
    ({"moe_experts": 8}, r"config field moe_experts=8 \(LlamaForCausalLM\) is not honoured by this runtime"),
    ({"embedding_multiplier": 12.0}, r"embedding_multiplier=12.0 \(LlamaForCausalLM\) is not honoured"),
    ({"rope_scaling": {"rope_type": "su", "factor": 2.0}}, r"rope_scaling.rope_type='su' is not supported: "
                                                            r"supported rope types are default, linear, llama3, yarn"),
    ({"rope_scaling": {"rope_type": "linear", "factor": 2.0, "mrope_section": [1]}},
     r"rope_scaling.mrope_section=\[1\] is not honoured for rope type 'linear': it reads factor"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, r"of rope type 'yarn' lacks original_max_position"),
    ({"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}, r"rope_type='dynamic' changes its frequencies past "
                                                                r"256 tokens.*at most 256 \(asked: 512\)"),
    ({"quantization_config": {"quant_method": "bitsandbytes", "load_in_4bit": True}},
     r"quantization_config.quant_method='bitsandbytes' is not supported"),
    ({"layer_types": ["full_attention", "chunked_attention"]}, r"layer_types holds 'chunked_attention'"),
    ({"layer_types": ["full_attention"]}, r"layer_types has 1 entries for 2 layers"),
    ({"num_local_experts": 8}, r"num_local_experts=8 \(LlamaForCausalLM\) is not honoured"),  # experts: Mixtral's
])
def test_what_the_runtime_does_not_run_is_refused_by_name(change, message):
    with pytest.raises(UnsupportedOption, match=message):
        check_hf_config({**LLAMA, **change}, max_model_len=512)


def test_refusals_are_one_line():
    with pytest.raises(UnsupportedOption) as err:
        check_hf_config({**LLAMA, "attn_logit_softcapping": 50.0})
    assert "\n" not in str(err.value) and "attn_logit_softcapping=50.0" in str(err.value)


def test_what_runs_passes():
    check_hf_config({**LLAMA, "hidden_act": "gelu_pytorch_tanh", "attention_bias": True, "mlp_bias": True,
                     "rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}})
    check_hf_config({**LLAMA, "rope_scaling": {"type": "dynamic", "factor": 2.0}}, max_model_len=256)


def test_layer_windows():
    assert layer_windows(LLAMA) == (None, None)
    assert layer_windows({**LLAMA, "architectures": ["MistralForCausalLM"], "sliding_window": 32}) == (32, 32)
    qwen2_off = {**LLAMA, "sliding_window": 32, "use_sliding_window": False}
    assert layer_windows(qwen2_off) == (None, None)
    gemma2_v4 = {**LLAMA, "architectures": ["Gemma2ForCausalLM"], "num_hidden_layers": 4, "sliding_window": 16}
    assert layer_windows(gemma2_v4) == (16, None, 16, None)
    gemma3_v4 = {**LLAMA, "architectures": ["Gemma3ForCausalLM"], "num_hidden_layers": 7, "sliding_window": 8,
                 "sliding_window_pattern": 6}
    assert layer_windows(gemma3_v4) == (8, 8, 8, 8, 8, None, 8)
    v5 = {**LLAMA, "architectures": ["Qwen3ForCausalLM"], "sliding_window": 8,
          "layer_types": ["full_attention", "sliding_attention"]}
    assert layer_windows(v5) == (None, 8)
    qwen2_v4 = {**LLAMA, "architectures": ["Qwen2ForCausalLM"], "num_hidden_layers": 4, "sliding_window": 8,
                "use_sliding_window": True, "max_window_layers": 3}
    assert layer_windows(qwen2_v4) == (None, None, None, 8)
    smollm3 = {**LLAMA, "architectures": ["SmolLM3ForCausalLM"], "num_hidden_layers": 4, "sliding_window": 8,
               "use_sliding_window": True}
    assert layer_windows(smollm3) == (None, None, None, 8)  # the layer without rope (every 4th by default)
    assert layer_windows({**LLAMA, "sliding_window": 8}) == (None, None)  # Llama has no sliding attention


def test_serve_refuses_an_unsupported_checkpoint_in_one_line_and_exit_2(tmp_path):
    """What operator pods run: the log says what is wrong in one line, never a traceback."""
    (tmp_path / "config.json").write_text(json.dumps({**LLAMA, "hidden_act": "swish_10"}))
    done = subprocess.run([sys.executable, "-m", "kvpilot.runtime", "serve", "--model", str(tmp_path),
                           "--device", "cpu"], capture_output=True, text=True, timeout=300)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2, done.stderr
    assert len(lines) == 1 and "hidden_act='swish_10' is not supported" in lines[0], done.stderr
    assert tmp_path.name in lines[0]


def test_plan_the_operator_and_serve_refuse_a_model_the_runtime_cannot_run_in_the_same_line(tmp_path):
    """One refusal, three doors: `kvpilot plan` (exit 2), the operator (condition Unsupported, nothing
    rendered) and the pods' `serve` (exit 2) say the same one line about the same config.json."""
    from kvpilot.operator.reconcile import NotPlanned, plan_for
    from kvpilot.operator.spec import parse_manifest

    (tmp_path / "config.json").write_text(json.dumps({**LLAMA, "rope_scaling": {"rope_type": "su", "factor": 2.0}}))
    why = "rope_scaling.rope_type='su' is not supported: supported rope types are"
    lines = {}
    for door, args in (("plan", ["kvpilot.cli.main", "plan", "--model", str(tmp_path), "--gpu", "l4"]),
                       ("serve", ["kvpilot.runtime", "serve", "--model", str(tmp_path), "--device", "cpu"])):
        done = subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, timeout=300)
        stderr = [line for line in done.stderr.splitlines() if line.strip()]
        assert done.returncode == 2 and len(stderr) == 1 and why in stderr[0], (door, done.stderr)
        lines[door] = stderr[0][stderr[0].index(why):]
    manifest = {"apiVersion": "kvpilot.io/v1alpha1", "kind": "LLMDeployment", "metadata": {"name": "su"},
                "spec": {"model": {"source": f"file://{tmp_path}"}, "gpu": {"type": "l4"}}}
    with pytest.raises(NotPlanned) as refused:
        plan_for(parse_manifest(manifest), op=None)  # a local config.json: neither the hub nor Kubernetes is asked
    assert refused.value.reason == "Unsupported" and "\n" not in refused.value.message
    lines["operator"] = refused.value.message[refused.value.message.index(why):]
    assert lines["plan"] == lines["serve"] == lines["operator"], lines
