"""`LLM`: offline generation over a list of prompts, all batched by the engine at once."""

from __future__ import annotations

import itertools
from collections.abc import Sequence as Seq
from typing import Any

from kvpilot.runtime.engine.config import EngineConfig
from kvpilot.runtime.engine.llm_engine import LLMEngine
from kvpilot.runtime.engine.outputs import EngineStats, RequestOutput
from kvpilot.runtime.engine.sampling import SamplingParams
from kvpilot.runtime.loading.loader import LoadedModel


class LLM:
    """`LLM(model=None, **EngineConfig fields)`; model None is the embedded SmolLM2-135M-Instruct."""

    def __init__(self, model: str | None = None, loaded: LoadedModel | None = None, **options: Any) -> None:
        self.engine = LLMEngine(EngineConfig(model=model, **options), loaded)
        self._ids = itertools.count()

    @property
    def tokenizer(self) -> Any:
        return self.engine.tokenizer

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> list[int]:
        return self.engine.apply_chat_template(messages, add_generation_prompt)

    def stats(self) -> EngineStats:
        return self.engine.stats()

    def close(self) -> None:
        """Stop a tensor-parallel engine's worker processes (nothing to do on one device)."""
        self.engine.close()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def generate(self, prompts: str | list[int] | Seq[str] | Seq[list[int]],
                 params: SamplingParams | Seq[SamplingParams] | None = None) -> list[RequestOutput]:
        """Run every prompt to completion; one final output per prompt, in order. Prompts are text
        (tokenized here) or token ids. Every request is checked before any runs."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = params or SamplingParams()
        params_list = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
        if len(params_list) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(params_list)} sampling parameters")
        prompt_ids = [self.tokenizer.encode(p) if isinstance(p, str) else list(p) for p in prompts]
        request_ids = [f"llm-{next(self._ids)}" for _ in prompts]
        for rid, ids, p in zip(request_ids, prompt_ids, params_list, strict=True):
            self.engine.check_request(rid, ids, p)
        for rid, ids, p in zip(request_ids, prompt_ids, params_list, strict=True):
            self.engine.add_request(rid, ids, p)
        final: dict[str, RequestOutput] = {}
        logprobs: dict[str, list] = {rid: [] for rid in request_ids}
        while self.engine.has_unfinished_requests:
            for out in self.engine.step():
                logprobs[out.request_id] += out.logprobs or []
                if out.finished:
                    final[out.request_id] = out
        return [_whole(final[rid], logprobs[rid]) for rid in request_ids]


def _whole(out: RequestOutput, logprobs: list) -> RequestOutput:
    """The last output of a request, restated as one piece: everything is new."""
    return RequestOutput(request_id=out.request_id, num_prompt_tokens=out.num_prompt_tokens,
                         new_token_ids=list(out.token_ids), new_text=out.text, token_ids=out.token_ids, text=out.text,
                         logprobs=logprobs if out.logprobs is not None else None, finish_reason=out.finish_reason,
                         num_cached_tokens=out.num_cached_tokens, queue_seconds=out.queue_seconds)
