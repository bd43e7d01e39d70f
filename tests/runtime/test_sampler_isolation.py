"""One request's bad values fail that request alone, never the batch it is sampled with (#16).

The engine refuses such values at admission (SamplingParams.for_vocab, LLMEngine.check_request);
these tests hand the sampler values that slipped past it, as a future bug might let them."""

from __future__ import annotations

import pytest
import torch

from kvpilot.runtime.engine.sampler import Sampler
from kvpilot.runtime.engine.sampling import SamplingParams
from kvpilot.runtime.engine.sequence import Sequence

EOS = 3
VOCAB = 8


def seq(request_id: str, params: SamplingParams) -> Sequence:
    generator = None if params.seed is None else torch.Generator().manual_seed(params.seed)
    return Sequence(request_id, [0], params, block_size=4, generator=generator)


def logits_for(rows: int) -> torch.Tensor:
    return torch.arange(rows * VOCAB, dtype=torch.float32).reshape(rows, VOCAB) % 5


@pytest.mark.parametrize("bad", [
    SamplingParams(temperature=0.0, min_tokens=2, max_tokens=4, stop_token_ids=[VOCAB + 10]),  # id past vocab
    SamplingParams(temperature=1.0, top_k=2**63),  # overflows a tensor of int64
])
def test_a_bad_row_fails_alone_and_the_others_get_their_tokens(bad):
    good = [SamplingParams(temperature=0.0), SamplingParams(temperature=0.0, logprobs=2)]
    seqs = [seq("good-0", good[0]), seq("bad", bad), seq("good-1", good[1])]
    logits = logits_for(3)
    alone = [Sampler([EOS], torch.Generator().manual_seed(0))(logits[i : i + 1], [seqs[i]]) for i in (0, 2)]

    with pytest.raises(Exception):  # noqa: B017 - whatever the batched ops raise: the batch as a whole fails
        Sampler([EOS], torch.Generator().manual_seed(0))(logits, seqs)
    result = Sampler([EOS], torch.Generator().manual_seed(0)).sample(logits, seqs)

    assert result.token_ids[1] is None and result.errors[1].startswith("sampling failed")
    assert result.errors[0] is None and result.errors[2] is None
    assert [result.token_ids[0], result.token_ids[2]] == [alone[0][0][0], alone[1][0][0]]
    assert result.logprobs[2] == alone[1][1][0]


def test_when_every_row_fails_the_engine_is_at_fault_and_it_raises():
    bad = SamplingParams(temperature=1.0, top_k=2**63)
    with pytest.raises(ValueError, match="Overflow"):
        Sampler([EOS], torch.Generator().manual_seed(0)).sample(logits_for(2), [seq("a", bad), seq("b", bad)])


def test_a_healthy_batch_is_sampled_as_before():
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=0.7, seed=5)]
    logits = logits_for(2)
    batched = Sampler([EOS], torch.Generator().manual_seed(0))(logits, [seq("a", params[0]), seq("b", params[1])])
    result = Sampler([EOS], torch.Generator().manual_seed(0)).sample(logits, [seq("a", params[0]), seq("b", params[1])])
    assert (result.token_ids, result.errors) == (batched[0], [None, None])


def test_params_for_a_vocabulary():
    with pytest.raises(ValueError, match=r"stop_token_ids: ids \[8\] are outside the vocabulary 0..7"):
        SamplingParams(stop_token_ids=[8]).for_vocab(VOCAB)
    assert SamplingParams(top_k=2**63).for_vocab(VOCAB).top_k == 0  # at least the vocabulary: every token
    assert SamplingParams(top_k=5).for_vocab(VOCAB).top_k == 5
    with pytest.raises(ValueError, match="seed must be in"):
        SamplingParams(seed=2**64)
    assert SamplingParams(seed=2**64 - 1).seed == 2**64 - 1
