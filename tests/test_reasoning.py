"""A thinking model's <think> block split into reasoning_content, plain and streamed, alone and before a
tool call; answers come from a stand-in for the engine loop (test_tools.canned)."""
import json

import openai
import pytest

from emoe.reasoning import Think, ThinkStream, parser_for
from test_server import KEY, serve
from test_tools import CALL, TEMPLATE, WEATHER, canned
from tiny import VOCAB

pytestmark = pytest.mark.usefixtures("one_thread")
# a thinking model's template: it can open the reasoning block itself, and writes </think> (auto picks it up)
THINKING = TEMPLATE.replace("<|assistant|>\n", "<|assistant|>\n{% if open_think %}<think>\n{% endif %}") + \
    "{# the model closes its reasoning with </think> #}"


def stream_all(pieces, opened=False):
    s = ThinkStream(opened)
    out = [s.feed(p) for p in pieces] + [s.finish()]
    return "".join(r for r, _ in out), "".join(c for _, c in out)


def test_think_blocks_split_plain_and_streamed():
    t = Think()
    assert t.split("<think>\nhmm, 2+2\n</think>\n\nIt is 4.") == ("hmm, 2+2", "It is 4.")
    assert t.split("hmm\n</think>\n\n4", opened=True) == ("hmm", "4")      # the template opened the block
    assert t.split("It is 4.") == (None, "It is 4.")                      # no block: all content
    assert t.split("<think>\ncut short by max_tokens") == ("cut short by max_tokens", None)
    assert t.split("<think>\n\n</think>\n\nDone.") == (None, "Done.")     # an empty block
    assert stream_all(["<thi", "nk>\n", "hmm, 2", "+2\n</th", "ink>", "\n\n", "It is", " 4."]) == ("hmm, 2+2\n", "It is 4.")
    assert stream_all(["hmm\n", "</think>\n\n4"], opened=True) == ("hmm\n", "4")
    assert stream_all(["plain ", "text <thi", "nk> not at the start"]) == ("", "plain text <think> not at the start")
    assert stream_all(["<", "b>bold"]) == ("", "<b>bold")                 # looked like a tag, was not
    assert stream_all(["<think>\ncut"]) == ("cut", "")
    assert t.opened("<|assistant|>\n<think>\n") and not t.opened("<|assistant|>\n")
    assert isinstance(parser_for("auto", THINKING), Think) and parser_for("auto", TEMPLATE) is None
    assert parser_for("none", THINKING) is None
    with pytest.raises(ValueError, match="unknown reasoning parser"):
        parser_for("r1", THINKING)


@pytest.fixture(scope="module")
def think_srv(tiny_mixtral, one_thread):
    def thinking(eng):
        eng.codec.template = THINKING
    with serve(tiny_mixtral, prepare=thinking) as s:
        yield s


def collect(stream):
    reasoning = content = ""
    calls, reason = {}, None
    for ch in stream:
        if not ch.choices:
            continue
        d = ch.choices[0].delta
        reasoning += getattr(d, "reasoning_content", None) or ""
        content += d.content or ""
        for c in d.tool_calls or []:
            calls[c.index] = c
        reason = ch.choices[0].finish_reason or reason
    return reasoning, content, calls, reason


def test_served_reasoning_plain_streamed_and_before_a_call(think_srv, monkeypatch):
    url, loop = think_srv
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY)
    ask = dict(model="tiny", messages=[{"role": "user", "content": "2+2?"}])
    monkeypatch.setattr(loop, "submit", loop.submit)
    canned(loop, ["<think>\n", "the sum of 2", " and 2\n</think>", "\n\n", "It is 4."])
    m = client.chat.completions.create(**ask).choices[0].message
    assert m.content == "It is 4." and m.model_extra["reasoning_content"] == "the sum of 2 and 2"
    assert collect(client.chat.completions.create(stream=True, **ask))[:2] == ("the sum of 2 and 2\n", "It is 4.")
    # the template opens the block itself (DeepSeek-R1's way): the answer starts inside it
    r = client.chat.completions.create(extra_body={"chat_template_kwargs": {"open_think": True}}, **ask)
    assert r.choices[0].message.content == "It is 4."
    canned(loop, ["Let me look it up.\n</think>\n\n", CALL])
    ask_tools = {**ask, "tools": [WEATHER], "extra_body": {"chat_template_kwargs": {"open_think": True}}}
    r = client.chat.completions.create(**ask_tools)
    m = r.choices[0].message
    assert r.choices[0].finish_reason == "tool_calls" and m.content is None
    assert m.model_extra["reasoning_content"] == "Let me look it up."
    assert json.loads(m.tool_calls[0].function.arguments) == {"city": "Paris"}
    reasoning, content, calls, reason = collect(client.chat.completions.create(stream=True, **ask_tools))
    assert reasoning == "Let me look it up.\n" and content == "" and reason == "tool_calls"
    assert calls[0].function.name == "get_weather"
    with pytest.raises(openai.BadRequestError, match="may not set"):
        client.chat.completions.create(extra_body={"chat_template_kwargs": {"add_generation_prompt": False}}, **ask)


@pytest.fixture(scope="module")
def think_model(tmp_path_factory):
    """A tiny Mixtral whose tokenizer has <think> and </think> as single tokens, as thinking models' have."""
    from tokenizers import Tokenizer

    from tiny import VOCAB, make_tiny, write_tokenizer
    d = make_tiny("mixtral", tmp_path_factory.mktemp("think") / "m")
    write_tokenizer(d, vocab=VOCAB - 2)  # ids 0..VOCAB-4, then the two tags; VOCAB-1 is the end id
    tok = Tokenizer.from_file(str(d / "tokenizer.json"))
    tok.add_tokens(["<think>", "</think>"])
    tok.save(str(d / "tokenizer.json"))
    return d


def test_a_grammar_holds_a_thinking_models_answer_after_its_reasoning(think_model):
    """grammar.Constraint with think ids: a first token may open the reasoning block, every token is allowed inside
    it, and the grammar holds what follows </think>; a block the prompt opened is reasoning from the start, one it
    opened and closed is not. logit_bias pushes the tiny model to the tags, so each phase shows in its tokens."""
    from emoe import grammar
    from emoe.engine import Engine, EngineConfig, SamplingParams
    eng = Engine(EngineConfig(str(think_model), miss_policy="all"))
    s, e = Think.token_ids(eng.codec.tok)
    assert (s, e) == (VOCAB - 3, VOCAB - 2)
    g, ask = grammar.choice(["yes", "no"]), eng.codec.encode("Is it so? ")

    def run(ids, bias, think):
        (r,) = eng.generate([ids], SamplingParams(max_tokens=6, grammar=g, think=think, logit_bias=bias), chat=False)
        return r.output_ids, r.finish_reason
    assert run(ask, {s: 100}, (s, e)) == ([s] * 6, "length")  # opened by the model: <think> again is reasoning
    out, reason = run(ask, {s: 100}, None)  # no think ids: the grammar from the first token forbids the tag
    assert s not in out and eng.codec.decode(out) in ("yes", "no") and reason == "stop"
    out, reason = run(ask + [s], {e: 100}, (s, e))  # the prompt opened it: </think>, then the grammar (e masked)
    assert out[0] == e and e not in out[1:] and eng.codec.decode(out[1:]) in ("yes", "no") and reason == "stop"
    out, reason = run(ask + [s, e], {s: 100, e: 100}, (s, e))  # opened and closed (reasoning off): the grammar only
    assert s not in out and e not in out and eng.codec.decode(out) in ("yes", "no") and reason == "stop"
    with pytest.raises(ValueError, match="two different token ids"):
        SamplingParams(grammar=g, think=(s, s))


def test_a_forced_tool_call_comes_after_the_reasoning(think_model):
    """Served with the reasoning parser on: tool_choice holds a thinking model's answer to a call after its
    reasoning block, not from the first token (where <think> would be forbidden)."""
    def thinking(eng):
        eng.codec.template = THINKING
    with serve(think_model, prepare=thinking) as (url, loop):
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY)
        s, e = Think.token_ids(loop.engine.codec.tok)
        ask = dict(model="tiny", messages=[{"role": "user", "content": "t"}], tools=[WEATHER], tool_choice="required")
        r = client.chat.completions.create(max_tokens=5, logit_bias={str(s): 100}, **ask)  # reasons to max_tokens
        assert r.choices[0].finish_reason == "length" and not r.choices[0].message.tool_calls
        assert r.choices[0].message.model_extra["reasoning_content"]
        r = client.chat.completions.create(logit_bias={str(e): 100}, temperature=0,
                                           extra_body={"chat_template_kwargs": {"open_think": True}}, **ask)
        m = r.choices[0].message
        assert r.choices[0].finish_reason == "tool_calls" and m.tool_calls[0].function.name == "get_weather"
