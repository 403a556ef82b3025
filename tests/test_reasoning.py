"""A thinking model's <think> block split into reasoning_content, plain and streamed, alone and before a
tool call; answers come from a stand-in for the engine loop (test_tools.canned)."""
import json

import openai
import pytest

from emoe.reasoning import Think, ThinkStream, parser_for
from test_server import KEY, serve
from test_tools import CALL, TEMPLATE, WEATHER, canned

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
