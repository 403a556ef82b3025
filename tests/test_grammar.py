"""Structured output (emoe.grammar): the engine samples only what a grammar allows, on the embedded model."""
import json
import re
from pathlib import Path

import pytest
import torch

from emoe import default_model_dir, grammar
from emoe.datasets import load_split
from emoe.engine import Engine, EngineConfig, SamplingParams

pytestmark = pytest.mark.usefixtures("one_thread")
LABELS = ["positive", "negative", "neutral", "ambivalent"]
SCHEMA = {"type": "object", "properties": {"sentiment": {"enum": LABELS}, "sure": {"type": "boolean"}},
          "required": ["sentiment", "sure"], "additionalProperties": False}


@pytest.fixture(scope="module")
def eng():
    return Engine(EngineConfig(default_model_dir(), miss_policy="all", max_batch=4))


def test_json_schema_answers_are_documents_of_the_schema(eng):
    """Greedy and sampled answers to sentiment prompts are JSON documents of the schema, in json.dumps' layout,
    and end with the document (finish_reason stop)."""
    rows = load_split("test", "sentiment")[:4]
    g = grammar.response_format({"type": "json_schema", "json_schema": {"name": "s", "schema": SCHEMA}})
    for temperature in (0.0, 1.0):
        reqs = eng.generate([x.prompt for x in rows], SamplingParams(max_tokens=40, temperature=temperature, seed=1,
                                                                      grammar=g))
        docs = [json.loads(eng.text(r)) for r in reqs]
        assert all(r.finish_reason == "stop" for r in reqs)
        assert all(set(d) == {"sentiment", "sure"} and d["sentiment"] in LABELS and isinstance(d["sure"], bool)
                   for d in docs)
        assert all(eng.text(r) == json.dumps(d) for r, d in zip(reqs, docs))  # grammar.JSON_LAYOUT


def test_regex_and_choice(eng):
    prompt = "Is this review positive, negative, neutral or ambivalent? Great view, friendly staff."
    (r,) = eng.generate([prompt], SamplingParams(max_tokens=12, temperature=1.0, seed=2,
                                                 grammar=grammar.regex("[0-9]{3}-[0-9]{4}")))
    assert re.fullmatch("[0-9]{3}-[0-9]{4}", eng.text(r)) and r.finish_reason == "stop"
    (r,) = eng.generate([prompt], SamplingParams(max_tokens=12, grammar=grammar.choice(["good", "bad"])))
    assert eng.text(r) in ("good", "bad") and r.finish_reason == "stop"


def test_logprobs_stay_the_models_own(eng):
    """The mask steers sampling only: the log-probabilities returned are the model's unmasked ones, so a forced
    token can score below an alternative the grammar forbade."""
    prompt = "Is this review positive, negative, neutral or ambivalent? Great view, friendly staff."
    p = SamplingParams(max_tokens=8, logprobs=3, grammar=grammar.choice(["zzz"]))
    (r,) = eng.generate([prompt], p)
    (free,) = eng.generate([prompt], SamplingParams(max_tokens=1, logprobs=3))
    chosen, top = r.logprobs[0]
    assert eng.text(r) == "zzz" and top == free.logprobs[0][1] and chosen < top[0][1]


def test_masks_cut_exactly_what_the_grammar_forbids():
    tok = grammar.tokenizer((Path(default_model_dir()) / "tokenizer.json").read_text(), 8192, [0])
    c = grammar.Constraint(tok, grammar.choice(["yes", "no"]), 8192)
    lg = c.mask(torch.zeros(8192))
    allowed = (lg > float("-inf")).nonzero().flatten().tolist()
    assert 0 < len(allowed) < 20 and lg.dtype == torch.float32
    c.advance(allowed[0])
    assert grammar.Constraint(tok, grammar.choice(["yes", "no"]), 8192).mask(torch.zeros(8192)).isfinite().sum() == len(allowed)
    with pytest.raises(grammar.GrammarError, match="broke the grammar"):
        grammar.Constraint(tok, grammar.choice(["yes"]), 8192).advance(int((lg == float("-inf")).nonzero()[0]))


def test_a_steps_masks_at_once_are_each_rows_own():
    """mask_rows over rows of different grammars and states (one buffer, unpacked once) gives each row the mask
    its constraint gives alone."""
    tok = grammar.tokenizer((Path(default_model_dir()) / "tokenizer.json").read_text(), 8192, [0])
    cons = [grammar.Constraint(tok, g, 8192) for g in (grammar.choice(["yes", "no"]), grammar.json_schema(SCHEMA),
                                                       grammar.regex("[0-9]+"), grammar.choice(["yes", "no"]))]
    first = cons[1].mask(torch.zeros(8192)).isfinite().nonzero().flatten().tolist()
    cons[1].advance(first[0])  # a state past the start
    lg = torch.randn(4, 8192, generator=torch.Generator().manual_seed(0))
    both = grammar.mask_rows(cons, lg)
    for c, row, got in zip(cons, lg, both):
        assert torch.equal(got, c.mask(row))
    assert not torch.equal(both[0].isfinite(), both[1].isfinite()) and torch.equal(both[0].isfinite(), both[3].isfinite())


@pytest.mark.parametrize("bad,match", [
    (lambda: grammar.response_format({"type": "xml"}), "type must be"),
    (lambda: grammar.response_format({"type": "json_schema"}), "json_schema"),
    (lambda: grammar.json_schema("{not json"), "not valid JSON"),
    (lambda: grammar.json_schema({"type": "frobnicate"}), "frobnicate"),
    (lambda: grammar.regex("(unclosed"), "guided_regex"),
    (lambda: grammar.choice(["ok", ""]), "non-empty"),
])
def test_bad_rules_are_refused_by_name(bad, match):
    with pytest.raises(grammar.GrammarError, match=match):
        bad()


def test_free_text_formats_compile_to_nothing():
    assert grammar.response_format(None) is None and grammar.response_format({"type": "text"}) is None


def test_a_grammar_that_allows_nothing_ends_only_its_own_answer(eng, monkeypatch):
    """Where a request's grammar allows no token of the model's vocabulary, that answer ends there (stop) and the
    batch's other rows go on."""
    prompt = "Is this review positive, negative, neutral or ambivalent? Great view, friendly staff."
    real = grammar.mask_rows
    monkeypatch.setattr(grammar, "mask_rows", lambda cons, lg: torch.stack(
        [torch.full_like(row, float("-inf")) if c.vocab == -1 else real([c], row[None])[0] for c, row in zip(cons, lg)]))
    stuck = eng.make_request(prompt, SamplingParams(max_tokens=8, grammar=grammar.choice(["good", "bad"])))
    stuck.constraint.vocab = -1
    free = eng.make_request(prompt, SamplingParams(max_tokens=4, ignore_eos=True))
    eng.admit([stuck, free])
    while eng.running:
        eng.step()
    assert stuck.finish_reason == "stop" and stuck.output_ids == []
    assert free.finish_reason == "length" and len(free.output_ids) == 4
