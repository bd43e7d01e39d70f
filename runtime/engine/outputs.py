"""What the engine hands out: one `RequestOutput` per request per step (and a final one), and a
snapshot of its state for metrics."""

from __future__ import annotations

from dataclasses import dataclass

from kvpilot.runtime.engine.sequence import TokenLogprob


@dataclass
class RequestOutput:
    request_id: str
    num_prompt_tokens: int
    new_token_ids: list[int]  # generated since the previous output of this request
    new_text: str  # text released since the previous output (stop-string candidates are held back)
    token_ids: list[int]  # every generated token so far
    text: str  # every character released so far
    logprobs: list[TokenLogprob] | None = None  # for `new_token_ids`, when the request asked for logprobs
    finish_reason: str | None = None  # "stop", "length", "abort" or "error" once finished
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
    queue_seconds: float | None = None  # arrival to first schedule
    error: str | None = None  # why this request alone failed (finish_reason "error")
    prompt_logprobs: list[TokenLogprob | None] | None = None  # with the first token, when asked for

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(frozen=True)
class HostTierStats:
    """The host KV tier (engine/host_kv.py): blocks, and what moved through it since start-up."""

    num_blocks: int
    num_used_blocks: int  # cached prefix blocks and swapped sequences' blocks
    spilled_blocks: int  # evicted prefix blocks copied in
    restored_blocks: int  # prefix blocks copied back for a prompt
    swapped_out_blocks: int
    swapped_in_blocks: int
    bytes_to_host: int
    bytes_to_gpu: int
    cache_queries: int  # prompt tokens looked up in the tier (those the GPU pool missed)
    cache_hits: int  # of those, tokens restored from it

    @property
    def usage(self) -> float:
        return self.num_used_blocks / self.num_blocks


@dataclass(frozen=True)
class EngineStats:
    num_running: int
    num_waiting: int
    num_kv_blocks: int
    num_free_kv_blocks: int
    kv_cache_usage: float  # 0..1, blocks in use
    num_preemptions: int
    prefix_cache_queries: int  # prompt tokens looked up in the prefix cache
    prefix_cache_hits: int  # of those, tokens found
    prompt_tokens_total: int
    generation_tokens_total: int
    kv_slots_allocated: int = 0  # tokens the blocks held by running sequences could hold
    kv_slots_used: int = 0  # tokens whose K/V those blocks hold
    prefill_tokens_total: int = 0  # prompt (and recomputed) tokens run through the model, cache hits left out
    num_swap_preemptions: int = 0  # of num_preemptions, those swapped to the host tier
    host: HostTierStats | None = None  # None: no host KV tier
