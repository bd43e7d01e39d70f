"""The catalog's entries for the families the runtime runs (Qwen3, Gemma 2/3, Phi-3/4, Granite,
OLMo 2, Mixtral, Qwen3-MoE): their configs (as published on the hub, from the model cards' figures) give the published
parameter counts, and every catalog entry passes the runtime's own check, so a catalog model is
never planned and then refused by the pods."""

from __future__ import annotations

import pytest

from kvpilot.runtime.memory.facts import _catalog, catalog_names, from_catalog
from kvpilot.runtime.memory.support import check_hf_config, layer_windows

# total billions (model card or the hub's safetensors count), non-embedding billions where the card says
PUBLISHED = {
    "qwen3-0.6b": (0.6, 0.44), "qwen3-1.7b": (1.7, 1.4), "qwen3-4b": (4.0, 3.6), "qwen3-8b": (8.2, 6.95),
    "qwen3-14b": (14.8, 13.2), "qwen3-32b": (32.8, 31.2),
    "gemma-2-2b": (2.614, None), "gemma-2-27b": (27.23, None), "gemma-3-1b": (1.0, None),
    "phi-4": (14.66, None), "phi-3-mini-4k": (3.821, None), "granite-3.1-8b": (8.17, None),
    "olmo-2-7b": (7.30, None),
    # every expert counted: Mistral's announcements (46.7B, 141B), the Qwen3 model cards (30.5B / 29.9B, 235B / 234B)
    "mixtral-8x7b": (46.7, None), "mixtral-8x22b": (141, None), "qwen3-30b-a3b": (30.5, 29.9),
    "qwen3-235b-a22b": (235, 234),
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_parameter_counts_match_the_model_cards(name):
    total, non_embedding = PUBLISHED[name]
    facts = from_catalog(name)
    decimals = len(str(total).split(".")[1]) if "." in str(total) else 0  # within half a unit of the last digit
    assert facts.num_params / 1e9 == pytest.approx(total, abs=0.5 * 10**-decimals)
    if non_embedding is not None:
        parts = facts.params_by_part
        rest = facts.num_params - parts["embeddings"] - parts["lm_head"]
        assert rest / 1e9 == pytest.approx(non_embedding, rel=0.01)


@pytest.mark.parametrize("name", catalog_names())
def test_every_catalog_model_is_one_the_runtime_runs(name):
    check_hf_config(_catalog()[name]["config"])


def test_sliding_windows_of_the_catalog():
    assert layer_windows(_catalog()["gemma-2-9b"]["config"]) == (4096, None) * 21
    gemma3 = layer_windows(_catalog()["gemma-3-1b"]["config"])
    assert gemma3[:6] == (512,) * 5 + (None,) and gemma3.count(None) == 4
    assert set(layer_windows(_catalog()["qwen3-8b"]["config"])) == {None}
    assert set(layer_windows(_catalog()["phi-3-mini-4k"]["config"])) == {2047}
