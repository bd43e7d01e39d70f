"""What the server needs of an engine: the one interface between the OpenAI server and the engine.

`AsyncLLMEngine` implements it over the step loop in this process; anything else that does (an
engine in its own process, say) serves the same API unchanged.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, Protocol

from kvpilot.runtime.engine.outputs import EngineStats, RequestOutput
from kvpilot.runtime.engine.sampling import SamplingParams


class EngineClient(Protocol):
    @property
    def tokenizer(self) -> Any: ...

    @property
    def max_model_len(self) -> int: ...

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> list[int]:
        """The model's chat template applied to OpenAI-style messages, as token ids."""

    def is_ready(self) -> bool:
        """False once the engine has failed for good (the pod's readiness and liveness probes read it)."""

    def check_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Raise a ValueError naming the value for a request the engine must refuse (too long, token ids
        outside the vocabulary, ...), before anything is sent back."""

    def stats(self) -> EngineStats:
        """Queue, running batch and KV-cache figures, never blocking on a step."""

    def generate(self, request_id: str, prompt_token_ids: list[int],
                 params: SamplingParams) -> AsyncIterator[RequestOutput]:
        """One request's outputs as they come; the last carries the finish reason."""

    def abort(self, request_id: str) -> None:
        """End a request now; its stream gets a last output with finish_reason "abort"."""

    async def shutdown(self) -> None:
        """Stop the step loop and release the model's workers."""
