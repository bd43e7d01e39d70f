"""A mixture-of-experts model from the hub: its safetensors index agrees with the memory model, which
counts every expert, so the size guard passes it; an index holding more experts than the config is
still refused (the plan would be too small)."""

from __future__ import annotations

import pytest

from kvpilot.operator.hub import Hub, HubError
from kvpilot.runtime.memory.facts import _catalog

REPO = "mistralai/Mixtral-8x7B-v0.1"
TOTAL_SIZE = 93_405_585_408  # the repo's model.safetensors.index.json metadata.total_size (bf16)


def test_mixtral_from_the_hub_is_planned_with_every_expert(fake_hub):
    fake_hub.serve(REPO, "config.json", _catalog()["mixtral-8x7b"]["config"])
    fake_hub.serve(REPO, "model.safetensors.index.json", {"metadata": {"total_size": TOTAL_SIZE}})
    found = Hub(fake_hub.url).model(f"hf://{REPO}")
    assert (found.facts.num_experts, found.facts.num_experts_per_tok) == (8, 2)
    assert found.num_params == found.facts.num_params == TOTAL_SIZE // 2


def test_an_index_with_more_experts_than_the_config_is_refused(fake_hub):
    fake_hub.serve(REPO, "config.json", {**_catalog()["mixtral-8x7b"]["config"], "num_local_experts": 4})
    fake_hub.serve(REPO, "model.safetensors.index.json", {"metadata": {"total_size": TOTAL_SIZE}})
    with pytest.raises(HubError, match=r"the checkpoint holds 46.70B parameters but its architecture accounts"):
        Hub(fake_hub.url).model(f"hf://{REPO}")
