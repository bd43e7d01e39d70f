"""The synchronous engine: requests in, one scheduled step at a time, outputs out. `LLM` (offline
batches) and `AsyncLLMEngine` (the server's streams) are thin drivers of this one loop."""

from __future__ import annotations

import dataclasses
import logging
import time
from collections import deque
from typing import Any

import torch

from kvpilot.runtime.engine.block_manager import BlockManager
from kvpilot.runtime.engine.config import EngineConfig
from kvpilot.runtime.engine.detokenizer import IncrementalDetokenizer
from kvpilot.runtime.engine.guidance import Guidance
from kvpilot.runtime.engine.host_kv import HostBlockIndex, HostKVTier, SwapPolicy
from kvpilot.runtime.engine.kv_cache import DTYPE_NAMES, expected_kv_bytes
from kvpilot.runtime.engine.model_runner import InFlight, ModelRunner, StepResult
from kvpilot.runtime.engine.outputs import EngineStats, HostTierStats, RequestOutput
from kvpilot.runtime.engine.sampler import Sampler, stop_token_ids
from kvpilot.runtime.engine.sampling import SamplingParams
from kvpilot.runtime.engine.scheduler import RequestLimits, ScheduledBatch, Scheduler
from kvpilot.runtime.engine.sequence import Sequence, TokenLogprob
from kvpilot.runtime.engine.threads import set_cpu_threads
from kvpilot.runtime.engine.workers import start_workers
from kvpilot.runtime.loading.loader import LoadedModel, load_model, weight_bytes_held
from kvpilot.runtime.memory.host_tier import swap_cost
from kvpilot.runtime.memory.kv_groups import kv_block_bytes
from kvpilot.runtime.models.offload import offload_weights, streamer_of
from kvpilot.runtime.models.parallel import SINGLE, Parallel
from kvpilot.runtime.models.quantized import weight_quantization

logger = logging.getLogger("kvpilot.runtime.engine.llm_engine")
MiB = 1 << 20


class LLMEngine:
    def __init__(self, config: EngineConfig, loaded: LoadedModel | None = None) -> None:
        started = time.perf_counter()
        self.parallel, self.workers = SINGLE, None
        self.rank_weight_bytes: list[int] = []  # weights each rank holds, in global rank order
        if config.world_size > 1:
            if loaded is not None:
                raise ValueError("a tensor- or pipeline-parallel engine loads its own shards: pass no loaded model")
            self.parallel, self.workers = start_workers(config)
            loaded = self._load_shard(config)
        self.loaded = loaded or load_configured(config)
        loaded_as = weight_quantization(self.loaded.model)
        if loaded_as != config.quantization:
            raise ValueError(f"the model was loaded with {loaded_as or 'no'} weight quantization, the config asks "
                             f"for {config.quantization or 'none'}")
        streamer = streamer_of(self.loaded.model)
        offloaded = len(streamer.layers) if streamer else 0
        if offloaded != config.offload_layers:
            raise ValueError(f"the model was loaded with {offloaded} offloaded layers, the config asks for "
                             f"{config.offload_layers} (offload_weights)")
        self.facts = self.loaded.facts
        self.config = config = config.for_model(self.facts)
        self.tokenizer = self.loaded.tokenizer
        self.eos_token_ids = self.loaded.eos_token_ids
        self.device = torch.device(config.device)
        if self.device.type == "cpu":
            set_cpu_threads()
        groups = config.kv_groups(self.facts)
        stage_groups = groups.for_layers(self.parallel.stage_of(self.facts.num_layers).layers)
        _check_device_memory(self.device, expected_kv_bytes(self.facts, config.num_kv_blocks, config.block_size,
                                                            config.kv_torch_dtype, stage_groups,
                                                            config.tensor_parallel_size))
        host_index = HostBlockIndex(config.host_kv_blocks) if config.host_kv_blocks else None
        self.block_manager = BlockManager(config.num_kv_blocks, config.block_size, config.enable_prefix_caching,
                                          groups.windows, host_index)
        swap = None
        if host_index is not None:
            block_bytes = kv_block_bytes(self.facts, DTYPE_NAMES[config.kv_torch_dtype], config.block_size, groups)
            swap = SwapPolicy(config.preemption_mode, swap_cost(self.device.type), block_bytes, self.facts.num_layers)
        self.scheduler = Scheduler(config, self.block_manager, swap)
        self.limits = RequestLimits(self.facts.vocab_size, config.max_model_len, config.num_kv_blocks,
                                    config.block_size, tuple(groups.windows))
        generator = torch.Generator(device=self.device).manual_seed(config.seed)
        self.guidance = Guidance(self.tokenizer, self.facts.vocab_size, self.eos_token_ids)
        sampler = Sampler(self.eos_token_ids, generator, self.guidance)
        self.runner = ModelRunner(self.loaded.model, self.facts, config, sampler, self.parallel)
        if not config.enforce_eager:
            self.runner.compile()
        self.host_tier = HostKVTier(self.runner.kv_cache.pool, config.host_kv_blocks) if host_index else None
        self.requests: dict[str, tuple[Sequence, IncrementalDetokenizer]] = {}
        self.in_flight: deque[tuple[ScheduledBatch, InFlight]] = deque()  # pipeline micro-batches, oldest first
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0
        self.prefill_tokens_total = 0  # tokens computed in prefill chunks (prefix-cache hits are not)
        logger.info("engine ready: model=%s device=%s dtype=%s weights=%s kv=%s kv_blocks=%d block_size=%d kv_mib=%.1f "
                    "max_model_len=%d max_num_seqs=%d max_batched_tokens=%d prefix_caching=%s host_kv_blocks=%d "
                    "host_kv_mib=%.1f seconds=%.1f",
                    self.facts.name, config.device, config.dtype, config.quantization or config.dtype,
                    config.kv_cache_dtype, config.num_kv_blocks, config.block_size,
                    self.runner.kv_cache.nbytes / MiB, config.max_model_len, config.max_num_seqs,
                    config.max_num_batched_tokens, config.enable_prefix_caching, config.host_kv_blocks,
                    self.host_tier.nbytes / MiB if self.host_tier else 0.0, time.perf_counter() - started)

    def _load_shard(self, config: EngineConfig) -> LoadedModel:
        """Rank 0's shard; raises what a worker's load raised (every rank reports before any runs)."""
        try:
            loaded = load_configured(config, self.parallel)
        except Exception:
            self.parallel.all_ok(False, config.device)
            self.workers.stop_group()
            raise
        if not self.parallel.all_ok(True, config.device):
            self.workers.stop_group()
            self.workers.raise_failure()
        self.rank_weight_bytes = self.parallel.all_gather_object(weight_bytes_held(loaded.model))
        self.parallel.broadcast(dataclasses.asdict(config.for_model(loaded.facts)))  # the workers' limits
        return loaded

    def close(self) -> None:
        """Stop the tensor-parallel workers (nothing to do for one process). The engine is unusable after."""
        if self.workers is not None:
            self.runner.stop()
            self.workers.stop_group()
            self.workers = None

    @property
    def max_model_len(self) -> int:
        return self.config.max_model_len

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> list[int]:
        return chat_token_ids(self.tokenizer, messages, add_generation_prompt)

    def check_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Raise `AdmissionError` (a ValueError naming the numbers) for a request that can never be served."""
        self.limits.check(request_id, prompt_token_ids, params)

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> None:
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already running")
        params = self.limits.check(request_id, prompt_token_ids, params)
        generator = None
        if params.seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(params.seed)
        seq = Sequence(request_id, prompt_token_ids, params, self.config.block_size, generator)
        seq.rope_offset = self.loaded.model.rope_offset(len(prompt_token_ids) + params.max_tokens)
        if params.structured is not None:
            seq.matcher = self.guidance.matcher(params.structured)  # GrammarError (a ValueError) names the fault
        self.scheduler.add(seq)
        self.requests[request_id] = (seq, IncrementalDetokenizer(self.tokenizer, prompt_token_ids, params.stop,
                                                                 params.include_stop_str_in_output))

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """Finish a request now (its blocks are free on return); None if it is not running."""
        entry = self.requests.pop(request_id, None)
        if entry is None:
            return None
        seq, detok = entry
        self.scheduler.finish(seq, "abort")
        return self._output(seq, detok, [], [])

    @property
    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished or bool(self.in_flight)

    def _schedule(self, busy: frozenset[int] = frozenset(), max_seqs: int | None = None) -> ScheduledBatch:
        batch = self.scheduler.schedule(busy, max_seqs)
        if batch.preempted:
            logger.info("preempted %d sequences (swapped: %s): %s", len(batch.preempted),
                        [s.request_id for s in batch.preempted if s.swapped_blocks],
                        [s.request_id for s in batch.preempted])
        if self.host_tier is not None:  # before the forward pass that overwrites the spilled blocks
            self.host_tier.run(self.block_manager.take_copies())
        self.prefill_tokens_total += sum(n for _, n in batch.prefills)
        return batch

    def step(self) -> list[RequestOutput]:
        """Schedule, run the model once, sample; one output for each request that got a token.

        With pipeline stages, up to `pipeline_micro_batches` steps of disjoint sequences are in flight,
        each with an even share of the live sequences: each call starts steps until that many are, then
        finishes the oldest."""
        if self.config.pipeline_micro_batches > 1:
            return self._pipelined_step()
        batch = self._schedule()
        if batch.is_empty:
            return []
        result = self.runner.run(batch)
        self.scheduler.postprocess(batch)
        return self._outputs(result)

    def _pipelined_step(self) -> list[RequestOutput]:
        micro_batches = self.config.pipeline_micro_batches
        while len(self.in_flight) < micro_batches:
            busy = frozenset(seq.seq_id for batch, _ in self.in_flight for seq, _ in batch.items())
            live = len(self.scheduler.running) + len(self.scheduler.waiting)
            batch = self._schedule(busy, max(1, -(-live // micro_batches)))
            if batch.is_empty:
                break
            self.in_flight.append((batch, self.runner.submit(batch)))
        if not self.in_flight:
            return []
        batch, step = self.in_flight.popleft()
        result = self.runner.finish(step)
        done = [i for i, seq in enumerate(result.seqs) if seq.is_finished]  # aborted while in flight
        batch.decodes = [seq for seq in batch.decodes if not seq.is_finished]
        batch.prefills = [(seq, n) for seq, n in batch.prefills if not seq.is_finished]
        self.scheduler.postprocess(batch)
        return self._outputs(StepResult(*([x for i, x in enumerate(column) if i not in done] for column in (
            result.seqs, result.token_ids, result.logprobs, result.errors))))

    def _outputs(self, result: StepResult) -> list[RequestOutput]:
        outputs = []
        for seq, token_id, logprob, error in zip(result.seqs, result.token_ids, result.logprobs, result.errors,
                                                 strict=True):
            if error is not None:  # this request's own failure: it ends alone, with its error
                self.scheduler.finish(seq, "error")
                outputs.append(self._output(seq, self.requests.pop(seq.request_id)[1], [], [], error))
                continue
            seq.append_token(token_id, logprob)
            self.generation_tokens_total += 1
            if seq.num_output_tokens == 1:
                self.prompt_tokens_total += seq.num_prompt_tokens
            seq_detok = self.requests[seq.request_id][1]
            reason = self._finish_reason(seq, seq_detok, token_id)
            if reason is not None:
                self.scheduler.finish(seq, reason)
                del self.requests[seq.request_id]
            outputs.append(self._output(seq, seq_detok, [token_id], [logprob] if logprob else []))
        return outputs

    def _finish_reason(self, seq: Sequence, detok: IncrementalDetokenizer, token_id: int) -> str | None:
        params = seq.params
        may_stop = seq.num_output_tokens >= params.min_tokens
        if may_stop and token_id in stop_token_ids(params, self.eos_token_ids):
            if params.include_stop_str_in_output and token_id not in self.eos_token_ids:
                detok.append(token_id, check_stop=False)
            return "stop"  # the stop token's text is part of the output only when asked for
        if detok.append(token_id, check_stop=may_stop):
            return "stop"
        if seq.matcher is not None and seq.matcher.is_stopped():
            return "stop"  # the grammar is complete and admits nothing more
        if seq.num_output_tokens >= params.max_tokens or seq.num_tokens >= self.config.max_model_len:
            return "length"
        return None

    def _output(self, seq: Sequence, detok: IncrementalDetokenizer, new_token_ids: list[int],
                logprobs: list[TokenLogprob], error: str | None = None) -> RequestOutput:
        queued = None if seq.first_scheduled_time is None else seq.first_scheduled_time - seq.arrival_time
        return RequestOutput(
            request_id=seq.request_id, num_prompt_tokens=seq.num_prompt_tokens, new_token_ids=new_token_ids,
            new_text=detok.take_delta(finished=seq.is_finished), token_ids=seq.output_token_ids,
            text=detok.output_text[: detok.num_emitted_chars],
            logprobs=logprobs if seq.params.logprobs is not None else None,
            finish_reason=seq.finish_reason, num_cached_tokens=seq.num_cached_tokens, queue_seconds=queued,
            error=error, prompt_logprobs=seq.prompt_logprobs if new_token_ids and seq.num_output_tokens == 1 else None)

    def stats(self) -> EngineStats:
        bm, sched = self.block_manager, self.scheduler
        allocated, used = bm.slot_usage(sched.running)
        return EngineStats(
            num_running=len(sched.running), num_waiting=len(sched.waiting), num_kv_blocks=bm.num_blocks,
            num_free_kv_blocks=bm.num_free_blocks, kv_cache_usage=bm.usage, num_preemptions=sched.num_preemptions,
            prefix_cache_queries=bm.prefix_cache_queries, prefix_cache_hits=bm.prefix_cache_hits,
            prompt_tokens_total=self.prompt_tokens_total, generation_tokens_total=self.generation_tokens_total,
            kv_slots_allocated=allocated, kv_slots_used=used, prefill_tokens_total=self.prefill_tokens_total,
            num_swap_preemptions=sched.num_swap_preemptions, host=self._host_stats())

    def _host_stats(self) -> HostTierStats | None:
        if self.host_tier is None:
            return None
        index, tier, bm = self.block_manager.host, self.host_tier, self.block_manager
        return HostTierStats(
            num_blocks=index.num_blocks, num_used_blocks=index.num_used, spilled_blocks=index.spilled_blocks,
            restored_blocks=index.restored_blocks, swapped_out_blocks=index.swapped_out_blocks,
            swapped_in_blocks=index.swapped_in_blocks, bytes_to_host=tier.bytes_to_host,
            bytes_to_gpu=tier.bytes_to_gpu, cache_queries=bm.host_cache_queries, cache_hits=bm.host_cache_hits)


def chat_token_ids(tokenizer: Any, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> list[int]:
    """Token ids of a conversation in the model's chat template, ready for `add_request`."""
    return list(tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True,
                                              return_dict=False))


def _check_device_memory(device: torch.device, kv_bytes: int) -> None:
    """On a GPU, the plan's KV pool must fit in what the driver says is free after the weights."""
    if device.type != "cuda":
        return
    free, _ = torch.cuda.mem_get_info(device)
    if kv_bytes > free:
        raise RuntimeError(f"the KV cache needs {kv_bytes / MiB:.0f} MiB but {device} has {free / MiB:.0f} MiB "
                           "free after loading the weights: lower num_kv_blocks, max_model_len or "
                           "gpu_memory_utilization")


def load_configured(config: EngineConfig, parallel: Parallel = SINGLE) -> LoadedModel:
    """The model `config` names, loaded for this rank (its offloaded layers in host memory)."""
    loaded = load_model(config.model, config.torch_dtype, config.device, config.max_model_len, config.quantization,
                        parallel)
    offload_weights(loaded.model, config.offload_layers)
    return loaded
