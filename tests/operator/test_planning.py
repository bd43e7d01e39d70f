"""planning.py: the spec's sizes read as Kubernetes reads them (kubernetes.utils.parse_quantity)."""

from __future__ import annotations

import pytest

from kvpilot.operator.planning import quantity_bytes
from kvpilot.runtime.memory.devices import UnknownDevice


@pytest.mark.parametrize(("value", "expected"), [("48Gi", 48 << 30), ("80G", 80 * 10**9), (1073741824, 1 << 30),
                                                 ("1.5Gi", 3 << 29)])
def test_sizes_are_kubernetes_quantities(value, expected):
    assert quantity_bytes(value, "gpu.memory") == expected


def test_a_size_that_is_not_a_quantity_names_its_field():
    with pytest.raises(UnknownDevice, match=r"gpu\.memory: 'lots' is not a size"):
        quantity_bytes("lots", "gpu.memory")
