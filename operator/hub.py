"""Model facts from the Hugging Face hub, for `hf://` sources outside the catalog.

Two small files answer what the memory model needs: `config.json` (the architecture) and
`model.safetensors.index.json`, whose `metadata.total_size` gives the exact weight bytes. The index
guards the plan: a checkpoint much bigger than the architecture formula says (mixture-of-experts,
a vision tower) would be planned too small and crash with out-of-memory, so it is refused instead.

The files are read with `huggingface_hub` (its URLs, auth headers and error classes: gated, missing
repo, revision or file), from `HF_ENDPOINT` when it names a mirror, with the token of the spec's
Secret for gated and private repos (never the operator's own). Nothing is written to disk. A hub that
does not answer is "hub unreachable", retryable: the handler retries with backoff (kopf.TemporaryError).
"""

from __future__ import annotations

import json
import os
import threading
from dataclasses import dataclass
from typing import Any

import httpx2  # huggingface_hub's HTTP client: its transport errors mean the hub is unreachable
from huggingface_hub import get_session, hf_hub_url
from huggingface_hub.utils import (
    EntryNotFoundError,
    GatedRepoError,
    HfHubHTTPError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
    build_hf_headers,
    hf_raise_for_status,
)

from kvpilot.runtime.memory.facts import ModelFacts, from_hf_config

DEFAULT_ENDPOINT = "https://huggingface.co"
TIMEOUT_SECONDS = 10.0  # per file; both are a few kB
# Bytes per parameter of the checkpoint's dtype (`torch_dtype` in config.json).
CHECKPOINT_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# Embedding copies, rotary buffers and norms the formula rounds differently stay well under this.
PARAM_TOLERANCE = 0.10
USER_AGENT = "kvpilot-operator"


class HubError(Exception):
    """The hub could not answer what the plan needs. Not an unknown model: the model may exist and the
    hub be down. `retryable`: a later try may succeed (network, 5xx, a token Secret still missing)."""

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
        url = hf_hub_url(repo, filename, revision=revision, endpoint=self.endpoint)
        # token=False: no token unless the spec gives one (the operator's own must not leak to tenants).
        headers = build_hf_headers(token=token or False, library_name=USER_AGENT)
        try:
            response = get_session().get(url, headers=headers, follow_redirects=True, timeout=self.timeout)
            hf_raise_for_status(response)
            return json.loads(response.content)
        except EntryNotFoundError:
            return None
        except GatedRepoError:
            hint = ("set spec.model.tokenSecret to a Secret with key HF_TOKEN" if not token else
                    "the token in spec.model.tokenSecret has no access to it")
            raise HubError(f"{url}: {repo} is gated or private; {hint}", retryable=True) from None
        except RevisionNotFoundError:
            raise HubError(f"{repo} has no revision {revision!r}: check spec.model.revision", retryable=False) from None
        except RepositoryNotFoundError:
            hint = "" if token else " (a private repo needs spec.model.tokenSecret)"
            raise HubError(f"{url}: {repo} is gated or private, or does not exist: check spec.model.source{hint}",
                           retryable=bool(not token)) from None
        except HfHubHTTPError as err:
            status = err.response.status_code if err.response is not None else None
            if status in (401, 403):
                hint = ("set spec.model.tokenSecret to a Secret with key HF_TOKEN" if not token else
                        "the token in spec.model.tokenSecret has no access to it")
                raise HubError(f"{url}: HTTP {status}: {repo} is gated or private; {hint}", retryable=True) from None
            if status is not None and (status >= 500 or status == 429):
                raise HubError(f"hub unreachable: {url} answered HTTP {status}; retrying with backoff (or set "
                               "spec.model.architecture to plan without it)", retryable=True) from None
            raise HubError(f"{url}: HTTP {status} from the hub", retryable=False) from None
        except httpx2.TransportError as err:
            raise HubError(f"hub unreachable: {self.endpoint} ({type(err).__name__}: {err}); retrying with backoff "
                           "(or set spec.model.architecture to plan without it)", retryable=True) from None
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
