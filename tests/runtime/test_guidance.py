"""Structured output in the engine: llguidance's masks hold every answer to its schema, regex, choice
or grammar, for greedy and sampled rows batched with free ones; bad specs are refused by name."""

from __future__ import annotations

import json
import re

import jsonschema
import llguidance.hf
import pytest
import torch

from kvpilot.runtime.engine.guidance import GrammarError, Guidance, apply_bitmask, check
from kvpilot.runtime.engine.llm import LLM
from kvpilot.runtime.engine.sampling import SamplingParams, StructuredOutputs

PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 120},
                                           "pet": {"enum": ["cat", "dog", "none"]}},
          "required": ["name", "age", "pet"], "additionalProperties": False}


@pytest.fixture(scope="module")
def chat(loaded_model):
    llm = LLM(loaded=loaded_model, num_kv_blocks=64, max_model_len=512, device="cpu", max_num_batched_tokens=128)
    return llm, lambda question: llm.apply_chat_template([{"role": "user", "content": question}])


@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_json_schema_answers_validate(chat, temperature):
    llm, prompt = chat
    spec = StructuredOutputs(json=json.dumps(PERSON))
    guided = SamplingParams(max_tokens=64, temperature=temperature, seed=3, structured=spec)
    free = SamplingParams(max_tokens=8, temperature=temperature, seed=3)
    questions = ["Describe a person as JSON.", "Who is Ada Lovelace? Answer in JSON.", "Make up a character."]
    outputs = llm.generate([prompt(q) for q in questions] * 2, [guided] * 3 + [free] * 3)
    for out in outputs[:3]:
        assert out.finish_reason == "stop", out.text  # closed by the grammar, not cut by max_tokens
        jsonschema.validate(json.loads(out.text), PERSON)


def test_json_object_regex_and_choice(chat):
    llm, prompt = chat
    specs = [StructuredOutputs(json_object=True), StructuredOutputs(regex=r"[0-9]{3}-[A-Z]{2}"),
             StructuredOutputs(choice=("yes", "no", "maybe")),
             StructuredOutputs(grammar='start: "The answer is " NUMBER "."\nNUMBER: /[1-9][0-9]?/')]
    params = [SamplingParams(max_tokens=64, temperature=0.0, structured=s) for s in specs]
    outputs = llm.generate([prompt("Give me a code.")] * len(specs), params)
    assert isinstance(json.loads(outputs[0].text), dict), outputs[0].text
    assert re.fullmatch(r"[0-9]{3}-[A-Z]{2}", outputs[1].text), outputs[1].text
    assert outputs[2].text in ("yes", "no", "maybe")
    assert re.fullmatch(r"The answer is [1-9][0-9]?\.", outputs[3].text), outputs[3].text
    assert all(o.finish_reason == "stop" for o in outputs)


def test_compiled_grammars_are_cached_and_requests_do_not_share_state(chat):
    llm, _prompt = chat
    spec = StructuredOutputs(json=json.dumps(PERSON))
    first = llm.engine.guidance.matcher(spec)
    second = llm.engine.guidance.matcher(spec)
    assert first is not second and len(llm.engine.guidance._compiled) >= 1
    assert first.consume_token(llm.tokenizer.encode("{")[0])
    assert second.validate_tokens(llm.tokenizer.encode("{")) == 1  # untouched by the first one's token


def test_the_grammar_tokenizer_is_built_at_start_up_so_a_first_guided_request_stalls_no_stream(loaded_model,
                                                                                                   monkeypatch):
    """Built by the first guided request, the llguidance tokenizer (seconds on a busy machine) stalled
    the step that admitted it, and with it every running stream."""
    llm = LLM(loaded=loaded_model, num_kv_blocks=64, max_model_len=512, device="cpu", max_num_batched_tokens=128)

    def built_in_a_step(*_args, **_kwargs):
        raise AssertionError("the grammar tokenizer was built after start-up, inside a step")

    monkeypatch.setattr(llguidance.hf, "from_tokenizer", built_in_a_step)
    engine, prompt = llm.engine, llm.apply_chat_template([{"role": "user", "content": "Describe a person."}])
    engine.add_request("free", prompt, SamplingParams(max_tokens=64, temperature=0.0, ignore_eos=True))
    free_tokens = [len(out.new_token_ids) for out in engine.step()]
    engine.add_request("guided", prompt, SamplingParams(max_tokens=40, temperature=0.0,
                                                        structured=StructuredOutputs(json=json.dumps(PERSON))))
    guided_text, steps = "", 0
    while "guided" in engine.requests:
        outputs = {out.request_id: out for out in engine.step()}
        free_tokens.append(len(outputs["free"].new_token_ids))  # the free stream gets a token every step
        guided_text += outputs["guided"].new_text
        steps += 1
    assert free_tokens == [1] * (steps + 1)
    jsonschema.validate(json.loads(guided_text), PERSON)


@pytest.mark.parametrize(("spec", "names"), [
    (StructuredOutputs(json='{"type": "strin"}'), "strin"),
    (StructuredOutputs(json='{"type": "object", "required": "a"}'), "required"),
    (StructuredOutputs(json="[1, 2"), "JSON"),
    (StructuredOutputs(regex="[a-"), "unclosed character class"),
    (StructuredOutputs(grammar="start: foo"), "foo"),
])
def test_bad_specs_are_refused_by_name(chat, spec, names):
    with pytest.raises(GrammarError, match=re.escape(names)):
        check(spec)
    llm, prompt = chat
    with pytest.raises(ValueError, match=re.escape(names)):
        llm.engine.add_request("bad", prompt("hi"), SamplingParams(structured=spec))
    assert "bad" not in llm.engine.requests


def test_spec_needs_exactly_one_constraint():
    with pytest.raises(ValueError, match="exactly one"):
        StructuredOutputs()
    with pytest.raises(ValueError, match="exactly one"):
        StructuredOutputs(json="{}", regex="a")


def test_apply_bitmask_keeps_exactly_the_set_bits():
    vocab = 70
    allowed = [[0, 31, 32, 69], [5]]
    mask = torch.zeros((2, 3), dtype=torch.int32)
    for row, tokens in enumerate(allowed):
        for t in tokens:
            word = int(mask[row, t // 32]) | (1 << (t % 32))
            mask[row, t // 32] = word - (1 << 32) if word >= 1 << 31 else word  # int32 wraps
    logits = torch.randn(3, vocab)
    before = logits.clone()
    apply_bitmask(logits, [0, 2], mask)
    assert torch.equal(logits[1], before[1])
    for row, tokens in zip([0, 2], allowed, strict=True):
        finite = torch.isfinite(logits[row]).nonzero().flatten().tolist()
        assert finite == tokens


def test_a_tokenizer_llguidance_cannot_read_refuses_guided_requests_not_the_engine():
    """A model whose tokenizer is not an HF fast tokenizer still serves; a guided request to it is
    refused by name (a 400 at the server) instead of failing the engine's start-up."""
    class NotAFastTokenizer:
        """What the engine's detokenizer needs, nothing of transformers' PreTrainedTokenizerFast."""

    guidance = Guidance(NotAFastTokenizer(), vocab_size=64, eos_token_ids=[0])
    with pytest.raises(GrammarError, match="structured output is not available for this model's tokenizer"):
        guidance.matcher(StructuredOutputs(regex="[0-9]+"))
