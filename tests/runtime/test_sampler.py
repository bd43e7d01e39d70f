"""The sampler on hand-made logits: greedy, seeds, top-k / top-p / min-p masks, penalties,
min_tokens and logprobs."""

from __future__ import annotations

import math
import re

import pytest
import torch

from kvpilot.runtime.engine.sampler import ARGMAX_BLOCK, Sampler, apply_min_p, apply_penalties, greedy_tokens, truncate
from kvpilot.runtime.engine.sampling import SamplingParams
from kvpilot.runtime.engine.sequence import Sequence

EOS = 3


def seq(params: SamplingParams, prompt: list[int] | None = None, output: list[int] = ()) -> Sequence:
    generator = None if params.seed is None else torch.Generator().manual_seed(params.seed)
    s = Sequence("r", prompt or [0], params, block_size=4, generator=generator)
    for t in output:
        s.append_token(t)
    return s


def sampler(seed: int = 0) -> Sampler:
    return Sampler([EOS], torch.Generator().manual_seed(seed))


def test_greedy_takes_the_argmax_whatever_the_other_knobs():
    logits = torch.tensor([[0.0, 2.0, 1.0, 0.5]])
    tokens, _ = sampler()(logits, [seq(SamplingParams(temperature=0.0, top_k=1, top_p=0.1))])
    assert tokens == [1]


def test_a_seed_repeats_its_samples_whatever_is_batched_with_it():
    logits = torch.randn(1, 50, generator=torch.Generator().manual_seed(1))
    params = SamplingParams(temperature=1.0, seed=1234)
    runs = []
    for engine_seed, batch in ((0, 1), (99, 5)):  # different engine seed, different neighbours
        s, seeded = sampler(engine_seed), seq(params)
        others = [seq(SamplingParams(temperature=1.0)) for _ in range(batch - 1)]
        runs.append([s(logits.repeat(batch, 1), [*others, seeded])[0][-1] for _ in range(20)])
    assert runs[0] == runs[1] and len(set(runs[0])) > 1
    other_seed = seq(SamplingParams(temperature=1.0, seed=4321))
    assert [sampler()(logits, [other_seed])[0][0] for _ in range(20)] != runs[0]


def test_sampling_follows_the_distribution():
    probs = torch.tensor([0.6, 0.3, 0.1, 0.0])
    logits = probs.clamp_min(1e-30).log().repeat(4000, 1)
    tokens, _ = sampler()(logits, [seq(SamplingParams(temperature=1.0)) for _ in range(4000)])
    freq = torch.bincount(torch.tensor(tokens), minlength=4).float() / 4000
    assert torch.allclose(freq, probs, atol=0.03)


def test_top_k_and_top_p_masks():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]] * 3)
    kept = truncate(logits, torch.tensor([2, 0, 0]), torch.tensor([1.0, 1.0, 0.7])) > float("-inf")
    assert kept[0].tolist() == [True, True, False, False, False]  # top-2
    assert kept[1].all()  # top_k 0 keeps all
    probs = logits[2].softmax(-1)  # 0.64, 0.24, 0.09, ...: 0.64 < 0.7, so the second token is kept too
    assert probs[0] < 0.7 < probs[0] + probs[1]
    assert kept[2].tolist() == [True, True, False, False, False]


def test_min_p_drops_tokens_below_a_fraction_of_the_best():
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    kept = apply_min_p(logits, torch.tensor([0.2])) > float("-inf")
    assert kept.tolist() == [[True, True, True, False]]  # floor 0.2 * 0.5 = 0.1


def test_penalties():
    params = SamplingParams(repetition_penalty=2.0, frequency_penalty=0.5, presence_penalty=0.25)
    s = seq(params, prompt=[0], output=[1, 1, 2])
    logits = torch.tensor([[4.0, -4.0, 4.0, 4.0, 1.0]])
    apply_penalties(logits, [s])
    # token 0: prompt only, repetition -> 2; token 1: -4*2 - 2*0.5 - 0.25; token 2: 4/2 - 0.5 - 0.25
    assert logits.tolist() == [[2.0, -9.25, 1.25, 4.0, 1.0]]
    untouched = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0]])
    apply_penalties(untouched, [seq(SamplingParams(), output=[1, 2])])
    assert untouched.tolist() == [[1.0, 2.0, 3.0, 4.0, 5.0]]


def test_min_tokens_bans_eos_and_stop_tokens_until_reached():
    logits = torch.tensor([[0.0, 0.0, 1.0, 9.0, 8.0]])
    params = SamplingParams(temperature=0.0, min_tokens=2, stop_token_ids=[4])
    assert sampler()(logits.clone(), [seq(params, output=[0])])[0] == [2]
    assert sampler()(logits.clone(), [seq(params, output=[0, 0])])[0] == [EOS]


def test_logprobs_are_the_models_log_softmax_with_the_top_n():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0]])
    _, (lp,) = sampler()(logits, [seq(SamplingParams(temperature=0.0, logprobs=2, repetition_penalty=1.5))])
    expected = logits.log_softmax(-1)[0]
    assert lp.token_id == 1 and lp.logprob == pytest.approx(float(expected[1]))
    assert [t for t, _ in lp.top] == [1, 2] and lp.top[1][1] == pytest.approx(float(expected[2]))
    _, (none,) = sampler()(logits, [seq(SamplingParams(temperature=0.0))])
    assert none is None


@pytest.mark.parametrize(("field", "value"), [("temperature", -0.1), ("top_p", 0.0), ("top_k", -2), ("min_p", 1.5),
                                              ("max_tokens", 0), ("repetition_penalty", 0.0), ("logprobs", 21),
                                              ("presence_penalty", 2.5)])
def test_bad_parameters_are_named(field, value):
    with pytest.raises(ValueError, match=rf"{field} must be .* got {re.escape(repr(value))}"):
        SamplingParams(**{field: value})


def test_vllm_spellings_are_accepted():
    params = SamplingParams(top_k=-1, stop="END")
    assert params.top_k == 0 and params.stop == ["END"] and not math.isnan(params.temperature)


@pytest.mark.parametrize("vocab", [7, ARGMAX_BLOCK, 3 * ARGMAX_BLOCK, 3 * ARGMAX_BLOCK + 5, 49152])
def test_greedy_tokens_are_argmax_ties_tails_and_empty_rows_included(vocab):
    gen = torch.Generator().manual_seed(vocab)
    for _ in range(10):
        logits = torch.randn(6, vocab, generator=gen)
        logits[torch.rand(6, vocab, generator=gen) < 0.3] = float("-inf")
        logits[0, [1, vocab - 1]] = 50.0  # a tie across blocks (and the tail): the first index wins
        logits[1, vocab - 1] = 60.0  # the last token alone
        logits[2] = float("-inf")  # nothing left: argmax answers 0
        logits[3, vocab // 2] = float("nan")  # a NaN is argmax's maximum
        assert greedy_tokens(logits).tolist() == logits.argmax(dim=-1).tolist()
