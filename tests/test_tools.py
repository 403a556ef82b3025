"""Tool calling (OpenAI `tools`): tools rendered by the chat template, Hermes <tool_call> blocks parsed out
of answers, streamed or not. The tiny model calls no tool of its own accord, so end-to-end answers with calls
come from a stand-in for the engine loop that answers with fixed text, and from the real engine held to a call
by tool_choice ('required' or a named function: structured output)."""
import json

import httpx
import openai
import pytest

from emoe.tools import Hermes, ToolError, ToolStream, check_tools, forced_calls, parser_for, template_messages
from test_server import AUTH, KEY, serve

pytestmark = pytest.mark.usefixtures("one_thread")
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "weather in a city",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
TEMPLATE = ("{% if tools %}<tools>{% for t in tools %}{{ t | tojson }}{% endfor %}</tools>\n{% endif %}"
            "{% for m in messages %}<|{{ m['role'] }}|>{% if m.tool_calls %}{% for c in m.tool_calls %}"
            "<tool_call>{{ c.function | tojson }}</tool_call>{% endfor %}{% endif %}{{ m['content'] }}<|end|>\n"
            "{% endfor %}<|assistant|>\n")


def test_hermes_blocks_become_openai_tool_calls():
    h = Hermes()
    content, calls = h.parse("I'll check.\n" + CALL + "\n" + CALL.replace("Paris", "Oslo"))
    assert content == "I'll check.\n" and [c["function"]["name"] for c in calls] == ["get_weather"] * 2
    assert [json.loads(c["function"]["arguments"]) for c in calls] == [{"city": "Paris"}, {"city": "Oslo"}]
    assert all(c["type"] == "function" and c["id"].startswith("call_") for c in calls)
    assert len({c["id"] for c in calls}) == 2
    assert h.parse(CALL)[0] is None                       # nothing before the call
    assert h.parse("no call here") == ("no call here", [])
    cut = CALL.removesuffix("\n</tool_call>")             # an answer cut before the closing tag still parses
    assert json.loads(h.parse(cut)[1][0]["function"]["arguments"]) == {"city": "Paris"}
    bad = "x <tool_call>{not json}</tool_call>"
    assert h.parse(bad) == (bad, [])                      # not a call: the text stays whole
    assert h.parse('<tool_call>{"arguments": {}}</tool_call>')[1] == []


def test_streamed_text_holds_back_only_what_may_start_a_call():
    s = ToolStream(Hermes())
    assert [s.feed(t) for t in ["Sure", " <tool", "_call>", '{"name": "f", "arguments": {"a": 1}}', "</tool_call>"]] \
        == ["Sure", " ", "", "", ""]
    rest, calls = s.finish()
    assert rest == "" and calls[0]["function"]["name"] == "f"
    s = ToolStream(Hermes())
    assert "".join(s.feed(t) for t in ["a <", " b <tool_c", "ar", " done"]) + s.finish()[0] == "a < b <tool_car done"
    s = ToolStream(Hermes())
    assert s.feed("x <tool_call>{oops") == "x " and s.finish() == ("<tool_call>{oops", [])


def test_requests_that_cannot_be_served_are_refused():
    h = Hermes()
    assert check_tools(None, None, h) is None and check_tools([WEATHER], "none", None) is None
    assert check_tools([WEATHER], "auto", h) == [WEATHER]
    for tools, choice, parser, msg in [([{"type": "function"}], None, h, "tools\\[0\\]"),
                                       ([{"type": "retrieval", "function": {"name": "x"}}], None, h, "tools\\[0\\]"),
                                       ([WEATHER], "always", h, "tool_choice must be"),
                                       ([WEATHER], {"type": "function"}, h, "tool_choice must be"),
                                       ([WEATHER], "auto", None, "no tool-call format")]:
        with pytest.raises(ToolError, match=msg):
            check_tools(tools, choice, parser)
    assert check_tools([WEATHER], "required", h) == [WEATHER]
    assert forced_calls([WEATHER], "auto", h) is None and forced_calls([WEATHER], "required", h)
    with pytest.raises(ToolError, match="not among the tools"):
        forced_calls([WEATHER], {"type": "function", "function": {"name": "get_time"}}, h)
    bad = {"type": "function", "function": {"name": "f", "parameters": {"type": "frobnicate"}}}
    with pytest.raises(ToolError, match="does not compile"):
        forced_calls([bad], "required", h)
    assert isinstance(parser_for("auto", TEMPLATE), Hermes) and parser_for("auto", "{{ messages }}") is None
    assert parser_for("none", TEMPLATE) is None
    with pytest.raises(ValueError, match="unknown tool-call parser"):
        parser_for("mistral", TEMPLATE)


def test_assistant_calls_reach_the_template_as_objects():
    msgs = [{"role": "assistant", "content": "", "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "content": "18C", "tool_call_id": "call_1"}]
    out = template_messages(msgs)
    assert out[0]["tool_calls"][0]["function"]["arguments"] == {"city": "Paris"}
    assert msgs[0]["tool_calls"][0]["function"]["arguments"] == '{"city": "Paris"}'  # the client's copy untouched


def hermes_template(eng):
    eng.codec.template = TEMPLATE


def canned(loop, pieces):
    """The engine loop answers every job with these text pieces."""
    def submit(job):
        def push():
            for p in pieces:
                job.queue.put_nowait(("delta", p, None))
            job.finish_reason = "stop"
            job.queue.put_nowait(("done", "stop"))
        job.aloop.call_soon_threadsafe(push)
    loop.submit = submit


@pytest.fixture(scope="module")
def tool_srv(tiny_mixtral, one_thread):
    with serve(tiny_mixtral, prepare=hermes_template) as s:
        yield s


def test_tools_are_rendered_into_the_prompt(tool_srv):
    url, loop = tool_srv
    history = [{"role": "user", "content": "weather in Paris?"},
               {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
                   "name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
               {"role": "tool", "content": "18C", "tool_call_id": "call_1"}]
    plain = httpx.post(f"{url}/tokenize", json={"messages": history}, headers=AUTH).json()["count"]
    with_tools = httpx.post(f"{url}/tokenize", json={"messages": history, "tools": [WEATHER]}, headers=AUTH).json()
    assert with_tools["count"] > plain
    text = loop.engine.codec.decode(with_tools["tokens"])
    assert '"name": "get_weather"' in text and '{"name": "get_weather", "arguments": {"city": "Paris"}}' in text


def test_served_tool_calls_plain_and_streamed(tool_srv, monkeypatch):
    url, loop = tool_srv
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY)
    ask = dict(model="tiny", messages=[{"role": "user", "content": "weather in Paris?"}], tools=[WEATHER])
    real = client.chat.completions.create(max_tokens=4, **ask)  # the real engine: its text has no call
    assert real.choices[0].finish_reason in ("stop", "length") and not real.choices[0].message.tool_calls
    monkeypatch.setattr(loop, "submit", loop.submit)
    canned(loop, ["I'll check.", "\n<tool", "_call>\n", '{"name": "get_weather", ', '"arguments": {"city": "Paris"}}',
                  "\n</tool_call>"])
    r = client.chat.completions.create(**ask)
    msg = r.choices[0].message
    assert r.choices[0].finish_reason == "tool_calls" and msg.content == "I'll check.\n"
    assert msg.tool_calls[0].function.name == "get_weather"
    assert json.loads(msg.tool_calls[0].function.arguments) == {"city": "Paris"}
    content, calls = "", {}
    for ch in client.chat.completions.create(stream=True, **ask):
        d = ch.choices[0].delta if ch.choices else None
        if d is not None and d.content:
            content += d.content
        for c in (d.tool_calls or []) if d is not None else []:
            calls[c.index] = c
        if ch.choices and ch.choices[0].finish_reason:
            reason = ch.choices[0].finish_reason
    assert content == "I'll check.\n" and reason == "tool_calls"
    assert calls[0].function.name == "get_weather" and json.loads(calls[0].function.arguments) == {"city": "Paris"}
    # without tools the same text is plain content
    r = client.chat.completions.create(model="tiny", messages=ask["messages"])
    assert r.choices[0].message.content.startswith("I'll check.\n<tool_call>") and r.choices[0].finish_reason == "stop"


def test_tool_choice_holds_the_real_engine_to_a_call(tool_srv):
    """tool_choice 'required' or a named function: the tiny model's answer is held (structured output) to one
    Hermes block calling that tool with arguments of its schema, parsed into OpenAI's tool_calls, plain and
    streamed, greedy and sampled."""
    url, _ = tool_srv
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY)
    # short names: the tiny model's context is 256 tokens and its tokenizer spends about one a character
    clock = {"type": "function", "function": {"name": "now", "parameters": {
        "type": "object", "properties": {"z": {"type": "boolean"}}, "additionalProperties": False}}}
    ask = dict(model="tiny", messages=[{"role": "user", "content": "t"}], tools=[clock])
    for choice, temperature in (({"type": "function", "function": {"name": "now"}}, 0), ("required", 1)):
        r = client.chat.completions.create(tool_choice=choice, temperature=temperature, seed=5, **ask)
        (call,) = r.choices[0].message.tool_calls
        args = json.loads(call.function.arguments)
        assert r.choices[0].finish_reason == "tool_calls" and call.function.name == "now"
        assert set(args) <= {"z"} and all(isinstance(v, bool) for v in args.values())
    calls = {}
    for ch in client.chat.completions.create(tool_choice="required", temperature=0, stream=True, **ask):
        for c in (ch.choices[0].delta.tool_calls or []) if ch.choices else []:
            calls[c.index] = c
    assert calls[0].function.name == "now" and set(json.loads(calls[0].function.arguments)) <= {"z"}


def test_tool_requests_the_server_cannot_serve_are_400(tool_srv, tiny_mixtral):
    url, _ = tool_srv
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "tools": [WEATHER]}
    for bad in ({"tool_choice": {"type": "function", "function": {"name": "nope"}}},
                {"tool_choice": "required", "response_format": {"type": "json_object"}}):
        r = httpx.post(f"{url}/v1/chat/completions", json={**body, **bad}, headers=AUTH)
        assert r.status_code == 400 and r.json()["error"]["param"] == "tool_choice", r.text
    with serve(tiny_mixtral) as (plain_url, _):  # a chat template with no tool-call format
        r = httpx.post(f"{plain_url}/v1/chat/completions", json=body, headers=AUTH)
        assert r.status_code == 400 and r.json()["error"]["param"] == "tools"
        assert "no tool-call format" in r.json()["error"]["message"]
