"""One engine step on the device: pack the scheduled tokens (decodes first, then prefill chunks)
into one forward pass, take the logits of the sequences whose every token is then computed, and
sample their next tokens.

Under pipeline parallelism every rank gets the packed inputs; a stage after the first receives the
hidden states from the one before it, and the last stage sends the sampled rows' logits to rank 0."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch

from kvpilot.runtime.engine.config import EngineConfig
from kvpilot.runtime.engine.kv_cache import KVCache, allocate_kv_cache
from kvpilot.runtime.engine.sampler import Sampler
from kvpilot.runtime.engine.scheduler import ScheduledBatch
from kvpilot.runtime.engine.sequence import Sequence, TokenLogprob
from kvpilot.runtime.memory.facts import ModelFacts
from kvpilot.runtime.models.compiled import compile_decoder
from kvpilot.runtime.models.layers import AttentionMetadata
from kvpilot.runtime.models.llama import LlamaForCausalLM
from kvpilot.runtime.models.parallel import SINGLE, Parallel, Sends

logger = logging.getLogger("kvpilot.runtime.engine.model_runner")


@dataclass
class HostInputs:
    """One step's packed inputs as host lists: what rank 0 broadcasts to tensor-parallel workers."""

    tokens: list[int]
    positions: list[int]
    slots: list[list[int]]  # per KV group (memory/kv_groups.py)
    num_decodes: int
    decode_block_tables: list[list[list[int]]]  # per KV group
    decode_context_lens: list[int]
    prefill_block_tables: list[list[list[int]]]  # per KV group
    prefill_cu_seqlens: list[int]
    prefill_context_lens: list[int]
    prefill_max_query_len: int
    sample_rows: list[int]  # rows of the packed batch whose logits are sampled
    prompt_rows: list[int] = field(default_factory=list)  # rows whose logits score the next prompt token


@dataclass
class StepInputs:
    input_ids: torch.Tensor
    positions: torch.Tensor
    meta: AttentionMetadata | list[AttentionMetadata]  # one for every layer, or one per layer
    sample_indices: torch.Tensor


@dataclass
class InFlight:
    """A step rank 0 has started (its first stage computed); the last stage's logits are to come."""

    host: HostInputs
    sample_seqs: list[Sequence]
    prompt_targets: list[tuple[Sequence, int]]
    logits: torch.Tensor | None  # already here when rank 0's stage is the last


@dataclass
class StepResult:
    seqs: list[Sequence]  # the sequences that got a token, in the order of `token_ids`
    token_ids: list[int | None]
    logprobs: list[TokenLogprob | None]
    errors: list[str | None]  # a request whose own sampling failed (its token is None)


def _block_tables(seqs: list[Sequence], group: int) -> list[list[int]]:
    width = max((len(s.block_table) for s in seqs), default=0)
    return [s.block_tables[group] + [0] * (width - len(s.block_table)) for s in seqs]


class ModelRunner:
    def __init__(self, model: LlamaForCausalLM, facts: ModelFacts, config: EngineConfig, sampler: Sampler | None,
                 parallel: Parallel = SINGLE) -> None:
        """`sampler`: None on tensor-parallel workers, which never sample."""
        self.model, self.facts, self.sampler, self.parallel = model, facts, sampler, parallel
        self.device = torch.device(config.device)
        self.block_size = config.block_size
        self.kv_groups = config.kv_groups(facts)  # every stage's block tables: packed on rank 0
        self.stage_kv_groups = self.kv_groups.for_layers(parallel.stage_of(facts.num_layers).layers)
        self.dtype = config.torch_dtype
        self.sends = Sends()
        self.kv_cache: KVCache = allocate_kv_cache(facts, config.num_kv_blocks, config.block_size,
                                                   config.kv_torch_dtype, self.device, self.stage_kv_groups,
                                                   parallel.size)

    def _slots(self, table: list[int], start: int, end: int) -> list[int]:
        bs = self.block_size
        return [table[p // bs] * bs + p % bs for p in range(start, end)]

    def pack(self, batch: ScheduledBatch) -> tuple[HostInputs, list[Sequence], list[tuple[Sequence, int]]]:
        """The batch's tokens packed (decodes first, then prefill chunks), the sequences to sample, and
        the prompt tokens whose logprobs the prompt rows score."""
        groups = range(self.kv_groups.num_groups)
        tokens: list[int] = []
        positions: list[int] = []
        slots: list[list[int]] = [[] for _ in groups]
        sample_rows: list[int] = []
        sample_seqs: list[Sequence] = []
        prompt_rows: list[int] = []
        prompt_targets: list[tuple[Sequence, int]] = []  # (sequence, index of the prompt token) per prompt row
        for seq in batch.decodes:
            pos = seq.num_computed_tokens
            tokens.append(seq.token_ids[pos])
            positions.append(pos + seq.rope_offset)
            for group_slots, table in zip(slots, seq.block_tables, strict=True):
                group_slots.append(table[pos // self.block_size] * self.block_size + pos % self.block_size)
            if pos + 1 == seq.num_tokens:
                sample_rows.append(len(tokens) - 1)
                sample_seqs.append(seq)
        cu_seqlens, prefill_lens = [0], []
        for seq, n in batch.prefills:
            start, end = seq.num_computed_tokens, seq.num_computed_tokens + n
            tokens += seq.token_ids[start:end]
            positions += range(start + seq.rope_offset, end + seq.rope_offset)
            for group_slots, table in zip(slots, seq.block_tables, strict=True):
                group_slots += self._slots(table, start, end)
            self._prompt_rows(seq, start, end, len(tokens) - n, prompt_rows, prompt_targets)
            cu_seqlens.append(cu_seqlens[-1] + n)
            prefill_lens.append(end)
            if end == seq.num_tokens:
                sample_rows.append(len(tokens) - 1)
                sample_seqs.append(seq)
        prefilled = [seq for seq, _ in batch.prefills]
        host = HostInputs(
            tokens, positions, slots, len(batch.decodes), [_block_tables(batch.decodes, g) for g in groups],
            [s.num_computed_tokens + 1 for s in batch.decodes], [_block_tables(prefilled, g) for g in groups],
            cu_seqlens, prefill_lens, max((n for _, n in batch.prefills), default=0), sample_rows, prompt_rows)
        return host, sample_seqs, prompt_targets

    @staticmethod
    def _prompt_rows(seq: Sequence, start: int, end: int, first_row: int, rows: list[int],
                     targets: list[tuple[Sequence, int]]) -> None:
        """Rows of a prefill chunk whose logits score prompt tokens not scored yet (a chunk computed
        again after a preemption scores nothing twice)."""
        if seq.prompt_logprobs is None:
            return
        for pos in range(max(start, len(seq.prompt_logprobs) - 1), min(end, seq.num_prompt_tokens - 1)):
            rows.append(first_row + pos - start)
            targets.append((seq, pos + 1))

    def to_device(self, host: HostInputs) -> StepInputs:
        def tensor(values: list, dtype: torch.dtype) -> torch.Tensor:
            return torch.tensor(values, dtype=dtype).to(self.device, non_blocking=True)

        decode_lens = tensor(host.decode_context_lens, torch.int32)
        cu_seqlens = tensor(host.prefill_cu_seqlens, torch.int32)
        prefill_lens = tensor(host.prefill_context_lens, torch.int32)
        metas = [AttentionMetadata(
            slot_mapping=tensor(slots, torch.int64),
            num_decode_tokens=host.num_decodes,
            decode_block_tables=tensor(decode_tables, torch.int32),
            decode_context_lens=decode_lens,
            prefill_block_tables=tensor(prefill_tables, torch.int32),
            prefill_cu_seqlens_q=cu_seqlens,
            prefill_context_lens=prefill_lens,
            decode_max_context_len=max(host.decode_context_lens, default=0),
            prefill_max_query_len=host.prefill_max_query_len,
            prefill_max_context_len=max(host.prefill_context_lens, default=0),
        ) for slots, decode_tables, prefill_tables in zip(host.slots, host.decode_block_tables,
                                                          host.prefill_block_tables, strict=True)]
        meta = metas[0] if len(metas) == 1 else [metas[g] for g in self.stage_kv_groups.layer_groups()]
        return StepInputs(tensor(host.tokens, torch.int64), tensor(host.positions, torch.int64), meta,
                          tensor(host.sample_rows + host.prompt_rows, torch.int64))

    @torch.inference_mode()
    def execute(self, host: HostInputs) -> torch.Tensor | None:
        """This stage's forward pass, and on the last stage the sampled rows' logits (None when no row is
        sampled, or on another stage). Every rank runs it with the same inputs."""
        p = self.parallel
        inputs = self.to_device(host)
        received = None
        if not p.is_first_stage:
            received = p.recv_prev((len(host.tokens), self.facts.hidden_size), self.dtype, self.device)
        hidden = self.model(inputs.input_ids, inputs.positions, self.kv_cache.k_caches, self.kv_cache.v_caches,
                            inputs.meta, received)
        if not p.is_last_stage:
            p.send_next(self.sends, host, hidden, self.device)
            return None
        if not host.sample_rows and not host.prompt_rows:
            return None
        logits = self.model.compute_logits(hidden[inputs.sample_indices])
        if p.stages > 1 and p.rank == 0:
            p.send_logits(self.sends, logits)
        return logits

    def compile(self) -> None:
        """Compile the decoder where the model allows (models/compiled.py) and build its graph now, with a
        forward of two prompt tokens that writes no cache slot; a compile that fails (inductor needs a C++
        compiler) leaves the decoder eager, with a warning."""
        decoder = self.model.model
        decoder.compiled = compile_decoder(decoder)
        if decoder.compiled is None:
            return
        started = time.perf_counter()
        groups = range(self.kv_groups.num_groups)
        warm_up = HostInputs([0, 0], [0, 1], [[-1, -1] for _ in groups], 0, [[] for _ in groups], [],
                             [[[0]] for _ in groups], [0, 2], [2], 2, [1])
        try:
            self.execute(warm_up)
        except Exception as err:  # whatever torch.compile raised: the eager decoder is right too
            decoder.compiled = None
            logger.warning("torch.compile failed, the decoder runs eagerly: %s", str(err).strip().splitlines()[0])
            return
        logger.info("decoder compiled (torch.compile, inductor) in %.1f s", time.perf_counter() - started)

    def stop(self) -> None:
        """Rank 0: tell every other rank to finish; another rank: pass the word to the next stage."""
        if self.parallel.global_rank == 0:
            self.parallel.share_step(None)
        if not self.parallel.is_last_stage:
            self.parallel.send_next(self.sends, None, None, self.device)
        self.sends.wait()

    @torch.inference_mode()
    def _score_prompts(self, logits: torch.Tensor, targets: list[tuple[Sequence, int]]) -> None:
        logprobs = logits.float().log_softmax(dim=-1)
        for row, (seq, index) in enumerate(targets):
            seq.prompt_logprobs.append(self.sampler.logprob(logprobs[row], seq.token_ids[index],
                                                            seq.params.prompt_logprobs, with_rank=True))

    def run(self, batch: ScheduledBatch) -> StepResult:
        """Compute the batch's tokens into the KV cache and sample for the sequences that are ready
        (call before the scheduler's `postprocess`, which counts the tokens as computed)."""
        return self.finish(self.submit(batch))

    def submit(self, batch: ScheduledBatch) -> InFlight:
        """Rank 0: start a step (its stage computes it now; later stages as they get to it)."""
        host, sample_seqs, prompt_targets = self.pack(batch)
        self.parallel.share_step(host)
        return InFlight(host, sample_seqs, prompt_targets, self.execute(host))

    def finish(self, step: InFlight) -> StepResult:
        """Rank 0: the step's logits (from the last stage, when it is another) sampled."""
        host, sample_seqs, prompt_targets, logits = step.host, step.sample_seqs, step.prompt_targets, step.logits
        rows = len(host.sample_rows) + len(host.prompt_rows)
        if self.parallel.stages > 1 and rows:
            logits = self.parallel.recv_logits((rows, self.facts.vocab_size), self.dtype, self.device)
        if logits is None:
            return StepResult([], [], [], [])
        if host.prompt_rows:
            logits, prompt_logits = logits[: len(host.sample_rows)], logits[len(host.sample_rows) :]
            self._score_prompts(prompt_logits, prompt_targets)
        if not host.sample_rows:
            return StepResult([], [], [], [])
        with torch.inference_mode():
            token_ids, logprobs, errors = self.sampler.sample(logits, sample_seqs)
        return StepResult(sample_seqs, token_ids, logprobs, errors)
