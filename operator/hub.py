"""Model facts from the Hugging Face hub, for `hf://` sources outside the catalog.

Two small files answer what the memory model needs: `config.json` (the architecture) and
`model.safetensors.index.json`, whose `metadata.total_size` gives the exact weight bytes. The index
guards the plan: a checkpoint much bigger than the architecture formula says (mixture-of-experts,
a vision tower) would be planned too small and crash with out-of-memory, so it is refused instead.
"""

from __future__ import annotations

import json
import os
import threading
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any

from kvpilot.runtime.memory.facts import ModelFacts, UnknownModel, from_hf_config

DEFAULT_ENDPOINT = "https://huggingface.co"
TIMEOUT_SECONDS = 10.0  # per file; both are a few kB
# Bytes per parameter of the checkpoint's dtype (`torch_dtype` in config.json).
CHECKPOINT_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# Embedding copies, rotary buffers and norms the formula rounds differently stay well under this.
PARAM_TOLERANCE = 0.10
USER_AGENT = "kvpilot-operator"


class HubError(UnknownModel):
    """The hub could not answer. `retryable`: a later try may succeed (network, 5xx, missing token)."""

    def __init__(self, message: str, retryable: bool) -> None:
        super().__init__(message)
        self.retryable = retryable


@dataclass(frozen=True)
class HubModel:
    facts: ModelFacts
    num_params: int | None  # from the safetensors index; None when the repo has a single file


def parse_repo(source: str) -> tuple[str, str]:
    """`hf://org/name[/file]` -> (`org/name`, short name)."""
    parts = source.removeprefix("hf://").strip("/").split("/")
    if len(parts) < 2:
        raise HubError(f"model source {source!r} is not hf://org/name", retryable=False)
    return f"{parts[0]}/{parts[1]}", parts[1]


class Hub:
    """One client for the process: the endpoint (HF_ENDPOINT honoured) and a cache of answers."""

    def __init__(self, endpoint: str | None = None, timeout: float = TIMEOUT_SECONDS) -> None:
        self.endpoint = (endpoint or os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")
        self.timeout = timeout
        self._cache: dict[tuple[str, str], HubModel] = {}
        self._lock = threading.Lock()

    def _get(self, repo: str, revision: str, filename: str, token: str | None) -> Any | None:
        """A JSON file of the repo; None when the repo has no such file."""
        url = f"{self.endpoint}/{repo}/resolve/{revision}/{filename}"
        request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
        if token:  # not forwarded on the redirect to the CDN, which signs its own URLs
            request.add_unredirected_header("Authorization", f"Bearer {token}")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as err:
            if err.code == 404:
                return None
            if err.code in (401, 403):
                hint = "set spec.model.tokenSecret to a Secret with key HF_TOKEN" if not token else \
                    "the token in spec.model.tokenSecret has no access to it"
                raise HubError(f"{url}: HTTP {err.code}: {repo} is gated or private; {hint}", retryable=True) from None
            retryable = err.code >= 500 or err.code == 429
            raise HubError(f"{url}: HTTP {err.code} from the hub", retryable) from None
        except (urllib.error.URLError, TimeoutError, OSError) as err:
            reason = getattr(err, "reason", err)
            raise HubError(f"{url}: cannot reach the hub ({reason}); set spec.model.architecture to plan "
                           "without it", retryable=True) from None
        except json.JSONDecodeError as err:
            raise HubError(f"{url}: not JSON ({err})", retryable=False) from None

    def cached(self, source: str, revision: str | None = None) -> HubModel | None:
        """What an earlier `model` call found, without asking the hub (or reading a token for it)."""
        with self._lock:
            return self._cache.get((parse_repo(source)[0], revision or "main"))

    def model(self, source: str, revision: str | None = None, token: str | None = None) -> HubModel:
        repo, short = parse_repo(source)
        key = (repo, revision or "main")
        if found := self.cached(source, revision):
            return found
        config = self._get(repo, key[1], "config.json", token)
        if config is None:
            raise HubError(f"{self.endpoint}/{repo} has no config.json at revision {key[1]}: check "
                           "spec.model.source and spec.model.revision, or set spec.model.architecture",
                           retryable=False)
        facts = from_hf_config(config, name=short.lower())
        index = self._get(repo, key[1], "model.safetensors.index.json", token)
        num_params = None
        total = (index or {}).get("metadata", {}).get("total_size")
        dtype_bytes = CHECKPOINT_DTYPE_BYTES.get(config.get("torch_dtype", "bfloat16"))
        if total and dtype_bytes:
            num_params = int(total) // dtype_bytes
        found = HubModel(facts, num_params)
        check_params(source, found)
        with self._lock:
            self._cache[key] = found
        return found


def check_params(source: str, found: HubModel) -> None:
    """Refuse checkpoints the architecture formula cannot account for (they would be planned too small)."""
    if found.num_params is None:
        return
    formula = found.facts.num_params
    if found.num_params > formula * (1 + PARAM_TOLERANCE):
        raise HubError(f"{source}: the checkpoint holds {found.num_params / 1e9:.2f}B parameters but its "
                       f"architecture accounts for {formula / 1e9:.2f}B (mixture-of-experts or extra towers "
                       "the memory model does not know): serve a supported model, or give "
                       "spec.model.architecture that matches the weights", retryable=False)
