"""From the last position's logits of every sampled sequence to one token each, in a few batched
tensor ops: stop-token masking (min_tokens), penalties, greedy argmax, temperature, top-k / top-p /
min-p, and sampling by the exponential race (argmax of p / q, q ~ Exp(1)), which lets a request with
a seed draw its q from its own generator while the rest share the engine's. Rows under a grammar
(structured output, engine/guidance.py) get the grammar's token mask first, greedy and sampled alike."""

from __future__ import annotations

import logging
from collections.abc import Sequence as Seq
from typing import NamedTuple

import torch

from kvpilot.runtime.engine.guidance import Guidance, apply_bitmask
from kvpilot.runtime.engine.sampling import SamplingParams
from kvpilot.runtime.engine.sequence import Sequence, TokenLogprob


def stop_token_ids(params: SamplingParams, eos_token_ids: Seq[int]) -> list[int]:
    return list(params.stop_token_ids) + ([] if params.ignore_eos else list(eos_token_ids))


def apply_min_tokens(logits: torch.Tensor, seqs: Seq[Sequence], eos_token_ids: Seq[int]) -> None:
    """Before min_tokens are out, the tokens that would stop a sequence cannot be drawn."""
    for row, seq in enumerate(seqs):
        if seq.num_output_tokens < seq.params.min_tokens:
            banned = stop_token_ids(seq.params, eos_token_ids)
            if banned:
                logits[row, banned] = float("-inf")


def apply_penalties(logits: torch.Tensor, seqs: Seq[Sequence]) -> None:
    """Repetition penalty over prompt and output (divide positive logits, multiply negative ones, as
    HF and vLLM do); presence and frequency penalties over the output, as OpenAI defines them."""
    rows = [i for i, seq in enumerate(seqs) if seq.params.has_penalties]
    if not rows:
        return
    vocab, device = logits.shape[1], logits.device
    longest = max(seqs[i].num_tokens for i in rows)
    padded = torch.full((len(rows), longest), vocab, dtype=torch.long)  # index `vocab` is a dump column
    is_output = torch.zeros((len(rows), longest), dtype=torch.bool)
    for r, i in enumerate(rows):
        seq = seqs[i]
        padded[r, : seq.num_tokens] = torch.tensor(seq.token_ids)
        is_output[r, seq.num_prompt_tokens : seq.num_tokens] = True
    padded, is_output = padded.to(device), is_output.to(device)
    counts = torch.zeros((len(rows), vocab + 1), device=device).scatter_add_(1, padded, is_output.float())[:, :vocab]
    seen = torch.zeros((len(rows), vocab + 1), dtype=torch.bool, device=device).scatter_(1, padded, True)[:, :vocab]
    params = [seqs[i].params for i in rows]
    rep = torch.tensor([p.repetition_penalty for p in params], device=device).unsqueeze(1)
    freq = torch.tensor([p.frequency_penalty for p in params], device=device).unsqueeze(1)
    pres = torch.tensor([p.presence_penalty for p in params], device=device).unsqueeze(1)
    sub = logits[rows]
    sub = torch.where(seen, torch.where(sub > 0, sub / rep, sub * rep), sub)
    sub = sub - freq * counts - pres * (counts > 0).float()
    logits[rows] = sub


def truncate(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Keep each row's top_k tokens (0: all), then the smallest set whose probability reaches top_p."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    ranks = torch.arange(logits.shape[-1], device=logits.device)
    k = torch.where(top_k > 0, top_k, logits.shape[-1]).unsqueeze(1)
    sorted_logits = sorted_logits.masked_fill(ranks >= k, float("-inf"))
    probs = sorted_logits.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs
    sorted_logits = sorted_logits.masked_fill(mass_before >= top_p.unsqueeze(1), float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter_(1, order, sorted_logits)


ARGMAX_BLOCK = 1024


def greedy_tokens(logits: torch.Tensor) -> torch.Tensor:
    """`logits.argmax(dim=-1)` (the first index of each row's maximum), found through block maxima:
    torch's CPU argmax over a row of a large vocabulary takes ~10x the time of its max (amax), so the
    rows are cut into blocks, the first block holding the row's max is found, and argmax runs on it."""
    rows, vocab = logits.shape
    blocks = vocab // ARGMAX_BLOCK
    if blocks < 2:
        return logits.argmax(dim=-1)
    head = logits[:, : blocks * ARGMAX_BLOCK].reshape(rows, blocks, ARGMAX_BLOCK)
    block_max = head.amax(dim=-1)
    best = block_max.argmax(dim=-1)  # the first block holding the max
    tokens = best * ARGMAX_BLOCK + head[torch.arange(rows, device=logits.device), best].argmax(dim=-1)
    if blocks * ARGMAX_BLOCK < vocab:  # the tail wins only when strictly greater: ties go to the lower index
        tail_max, tail_token = logits[:, blocks * ARGMAX_BLOCK :].max(dim=-1)
        tokens = torch.where(tail_max > block_max.amax(dim=-1), tail_token + blocks * ARGMAX_BLOCK, tokens)
    return tokens


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Drop tokens less likely than min_p times the most likely one."""
    probs = logits.softmax(dim=-1)
    floor = min_p.unsqueeze(1) * probs.max(dim=-1, keepdim=True).values
    return logits.masked_fill(probs < floor, float("-inf"))


logger = logging.getLogger("kvpilot.runtime.engine.sampler")


class SampleResult(NamedTuple):
    """One step's samples; a row whose own sampling failed has token None and its error."""

    token_ids: list[int | None]
    logprobs: list[TokenLogprob | None]
    errors: list[str | None]


class Sampler:
    def __init__(self, eos_token_ids: Seq[int], generator: torch.Generator, guidance: Guidance | None = None) -> None:
        """`guidance`: the grammar engine for structured-output rows; None: such rows are refused."""
        self.eos_token_ids = list(eos_token_ids)
        self.generator = generator
        self.guidance = guidance

    def __call__(self, logits: torch.Tensor, seqs: Seq[Sequence]) -> tuple[list[int], list[TokenLogprob | None]]:
        """logits [len(seqs), vocab] -> one token per sequence, and its logprobs where asked."""
        logits = logits.to(torch.float32, copy=True)  # masked and penalized in place below
        raw_logprobs = logits.log_softmax(dim=-1) if any(s.params.logprobs is not None for s in seqs) else None
        apply_min_tokens(logits, seqs, self.eos_token_ids)
        apply_penalties(logits, seqs)
        guided = [i for i, seq in enumerate(seqs) if seq.matcher is not None]
        if guided:
            self._apply_grammars(logits, guided, seqs)
        tokens = greedy_tokens(logits)
        sampled = [i for i, seq in enumerate(seqs) if not seq.params.greedy]
        if sampled:
            race = self._race(logits[sampled], [seqs[i] for i in sampled])
            tokens[sampled] = race.argmax(dim=-1)
        token_list = tokens.tolist()
        for i in guided:
            seqs[i].matcher.consume_token(token_list[i])
        logprobs = [None if raw_logprobs is None or seq.params.logprobs is None
                    else self.logprob(raw_logprobs[i], token_list[i], seq.params.logprobs)
                    for i, seq in enumerate(seqs)]
        return token_list, logprobs

    def sample(self, logits: torch.Tensor, seqs: Seq[Sequence]) -> SampleResult:
        """`self(logits, seqs)`, but one request cannot fail the others: when the batch fails, each row
        is sampled alone, and only the rows that fail alone get an error. When every row fails alone
        (and there is more than one), the fault is the engine's, not a request's: it is raised."""
        try:
            tokens, logprobs = self(logits, seqs)
            return SampleResult(list(tokens), logprobs, [None] * len(seqs))
        except Exception as batch_error:
            if len(seqs) > 1:
                logger.warning("sampling a batch of %d failed (%s); sampling each request alone", len(seqs),
                               batch_error)
            result = SampleResult([], [], [])
            for row, seq in enumerate(seqs):
                try:
                    (token,), (logprob,) = self(logits[row : row + 1], [seq])
                    result.token_ids.append(token)
                    result.logprobs.append(logprob)
                    result.errors.append(None)
                except Exception as err:
                    logger.exception("request %r: sampling failed", seq.request_id)
                    result.token_ids.append(None)
                    result.logprobs.append(None)
                    result.errors.append(f"sampling failed: {type(err).__name__}: {err}")
            if len(seqs) > 1 and all(result.errors):
                raise batch_error
            return result

    def _race(self, logits: torch.Tensor, seqs: Seq[Sequence]) -> torch.Tensor:
        """p / q per token: its argmax is a sample of p (and, restricted to any subset, of p there)."""
        device = logits.device
        params = [s.params for s in seqs]
        logits = logits / torch.tensor([p.temperature for p in params], device=device).unsqueeze(1)
        if any(p.truncates for p in params):
            logits = truncate(logits, torch.tensor([p.top_k for p in params], device=device),
                              torch.tensor([p.top_p for p in params], device=device))
        if any(p.min_p > 0 for p in params):
            logits = apply_min_p(logits, torch.tensor([p.min_p for p in params], device=device))
        probs = logits.softmax(dim=-1)
        race = torch.empty_like(probs).exponential_(generator=self.generator)
        for row, seq in enumerate(seqs):
            if seq.generator is not None:
                race[row].exponential_(generator=seq.generator)
        return probs / race

    def _apply_grammars(self, logits: torch.Tensor, rows: list[int], seqs: Seq[Sequence]) -> None:
        """Mask the guided rows to their grammars' next tokens (one bitmask for the batch). A row left with
        nothing (min_tokens banning the end the grammar demands) gets its end back: the grammar wins."""
        if self.guidance is None:
            raise ValueError("structured output needs a grammar engine, and this sampler has none")
        apply_bitmask(logits, rows, self.guidance.bitmask([seqs[i].matcher for i in rows]))
        index = torch.tensor(rows, device=logits.device)
        dead = torch.isinf(logits[index]).all(dim=-1).tolist()
        for row, is_dead in zip(rows, dead, strict=True):
            if is_dead and self.eos_token_ids:
                logits[row, self.eos_token_ids[0]] = 0.0

    @staticmethod
    def logprob(logprobs: torch.Tensor, token_id: int, top_n: int, with_rank: bool = False) -> TokenLogprob:
        top = []
        if top_n:
            values, ids = logprobs.topk(top_n)
            top = list(zip(ids.tolist(), values.tolist(), strict=True))
        rank = int((logprobs > logprobs[token_id]).sum()) + 1 if with_rank else None
        return TokenLogprob(token_id, float(logprobs[token_id]), top, rank)
