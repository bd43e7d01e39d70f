"""fit_advice.py: every suggestion is a spec that plans, and the numbers are the plan's."""

from __future__ import annotations

import re

import pytest

from kvpilot.operator.fit_advice import advice
from kvpilot.operator.planning import plan_deployment
from kvpilot.operator.spec import parse_spec
from kvpilot.runtime.memory.planner import NoFit


def spec_with(spec: dict, field: str, value: str):
    """The spec with one dotted camelCase field set, as the user would edit it."""
    edited = {**spec, "gpu": dict(spec["gpu"]), "serving": dict(spec.get("serving", {}))}
    *parents, leaf = field.split(".")
    node = edited
    for part in parents:
        node = node[part]
    node[leaf] = int(value) if value.isdigit() else value
    return parse_spec(edited)


@pytest.mark.parametrize("spec", [
    {"model": {"source": "llama-3.1-405b"}, "gpu": {"type": "l4", "maxPerReplica": 1}},
    {"model": {"source": "llama-3.1-8b"}, "gpu": {"type": "t4", "maxPerReplica": 1}, "quantization": "fp16",
     "serving": {"maxContextLength": 65536, "concurrency": 6}},
    {"model": {"source": "llama-3.1-70b"}, "gpu": {"type": "a100-40gb", "maxPerReplica": 2}, "quantization": "bf16",
     "serving": {"maxContextLength": 8192, "concurrency": 16}},
])
def test_each_suggested_change_fits(spec):
    with pytest.raises(NoFit):
        plan_deployment(parse_spec(spec))
    message = advice(parse_spec(spec), None)
    suggested = re.findall(r"([a-zA-Z.]+): (\S+) \(", message.split("Changes that fit, each alone: ")[1])
    assert suggested, message
    for field, value in suggested:
        plan_deployment(spec_with(spec, field, value))  # raises if the suggestion does not fit
