"""hub.py against a local HTTP server that serves config.json and the safetensors index like the hub."""

from __future__ import annotations

import socket

import pytest

from kvpilot.operator.hub import Hub, HubError
from kvpilot.runtime.memory.facts import UnknownModel, from_hf_config
from kvpilot.runtime.memory.support import UnsupportedOption

REPO = "acme/tiny-llama"


@pytest.fixture
def config(fake_hub, tiny_config):
    fake_hub.serve(REPO, "config.json", tiny_config)
    return tiny_config


def params(config) -> int:
    return from_hf_config(config).num_params


def test_config_and_index_give_facts_and_exact_params(fake_hub, config):
    fake_hub.serve(REPO, "model.safetensors.index.json", {"metadata": {"total_size": 2 * params(config)}})
    found = Hub(fake_hub.url).model(f"hf://{REPO}")
    assert (found.facts.num_layers, found.facts.num_kv_heads, found.facts.name) == (4, 2, "tiny-llama")
    assert found.num_params == params(config)


def test_single_file_repo_has_no_param_count_and_answers_are_cached(fake_hub, config):
    hub = Hub(fake_hub.url)
    assert hub.model(f"hf://{REPO}").num_params is None
    asked = len(fake_hub.requests)
    hub.model(f"hf://{REPO}")
    assert len(fake_hub.requests) == asked


def test_revision_and_token(fake_hub, tiny_config):
    fake_hub.serve(REPO, "config.json", tiny_config, revision="v2", token="s3cret")
    hub = Hub(fake_hub.url)
    with pytest.raises(HubError, match=r"gated or private; set spec\.model\.tokenSecret") as err:
        hub.model(f"hf://{REPO}", revision="v2")
    assert err.value.retryable  # the Secret may be created later
    assert hub.model(f"hf://{REPO}", revision="v2", token="s3cret").facts.hidden_size == 512
    assert ("/acme/tiny-llama/resolve/v2/config.json", "Bearer s3cret") in fake_hub.requests


def test_hf_endpoint_environment_is_honoured(fake_hub, config, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", fake_hub.url + "/")
    hub = Hub()
    assert hub.endpoint == fake_hub.url and hub.model(f"hf://{REPO}").facts.num_layers == 4


def test_mixture_of_experts_checkpoint_is_refused(fake_hub, tiny_config):
    """The runtime's own support list refuses the field it does not honour, before any size check."""
    fake_hub.serve(REPO, "config.json", tiny_config | {"num_local_experts": 8})
    fake_hub.serve(REPO, "model.safetensors.index.json", {"metadata": {"total_size": 2 * 6 * params(tiny_config)}})
    with pytest.raises(UnsupportedOption, match=r"num_local_experts=8 .* is not honoured by this runtime"):
        Hub(fake_hub.url).model(f"hf://{REPO}")


@pytest.mark.parametrize(("status", "message", "retryable"), [
    (None, "has no config.json at revision main: check spec.model.source", False),
    (503, "hub unreachable: .* answered HTTP 503; retrying with backoff", True),
    (429, "hub unreachable: .* answered HTTP 429", True),
    (400, "HTTP 400 from the hub", False),
])
def test_failures_say_what_to_do(fake_hub, status, message, retryable):
    if status is not None:
        fake_hub.serve(REPO, "config.json", {"error": "no"}, status=status)
    with pytest.raises(HubError, match=message) as err:
        Hub(fake_hub.url).model(f"hf://{REPO}")
    assert err.value.retryable is retryable


def test_unreachable_hub_is_retryable_and_points_at_architecture():
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(HubError, match=r"hub unreachable: .*ConnectError.*set spec\.model\.architecture") as err:
        Hub(f"http://127.0.0.1:{port}", timeout=2).model(f"hf://{REPO}")
    assert err.value.retryable


def test_source_must_name_org_and_model():
    with pytest.raises(HubError, match="is not hf://org/name"):
        Hub("http://unused").model("hf://just-a-name")


def test_a_hub_outage_is_not_an_unknown_model():
    assert not issubclass(HubError, UnknownModel)
