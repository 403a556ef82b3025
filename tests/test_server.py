"""The OpenAI-compatible server on the tiny Mixtral, over a real localhost socket (uvicorn in a thread).

The tiny model's text is gibberish; requests use ignore_eos (vLLM's extension) where a test needs an
exact number of tokens.
"""
import asyncio
import contextlib
import json
import socket
import threading
import time

import httpx
import openai
import pytest

from emoe.engine import Engine, EngineConfig
from emoe.server import create_app
from emoe.serving import EngineLoop

pytestmark = pytest.mark.usefixtures("one_thread")
KEY = "sk-test"
AUTH = {"Authorization": f"Bearer {KEY}"}
MAX_BATCH = 4


@contextlib.contextmanager
def serve(tiny_mixtral, api_key=KEY, max_waiting=8, scheduler="task-aware", grace=10.0, prepare=None):
    """prepare(engine): a change to the engine before the app is made (e.g. another chat template)."""
    eng = Engine(EngineConfig(str(tiny_mixtral), budget=0.5, max_batch=MAX_BATCH, prefix_reuse=True))  # as `serve`
    if prepare is not None:
        prepare(eng)
    loop = EngineLoop(eng, scheduler, max_waiting=max_waiting)
    app = create_app(loop, "tiny", api_key, shutdown_grace_s=grace)
    import uvicorn
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    th = threading.Thread(target=server.run, daemon=True)
    th.start()
    t0 = time.time()
    while not server.started:
        assert th.is_alive() and time.time() - t0 < 20, "server did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}", loop
    finally:
        server.should_exit = True
        th.join(30)


@pytest.fixture(scope="module")
def srv(tiny_mixtral, one_thread):
    with serve(tiny_mixtral) as s:
        yield s


def slow_steps(loop, seconds):
    """Make each decode step take at least `seconds` so tests can act while requests are in flight."""
    step = loop.engine.step

    def slow():
        time.sleep(seconds)
        return step()
    loop.engine.step = slow
    return lambda: vars(loop.engine).pop("step", None)


def wait_for(cond, timeout=10.0):
    t0 = time.time()
    while not cond():
        if time.time() - t0 > timeout:
            return False
        time.sleep(0.01)
    return True


# -- the official client, unchanged ---------------------------------------------------------------
def test_openai_client(srv):
    url, loop = srv
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0)
    r = client.completions.create(model="tiny", prompt="Summarize: the cat sat on the mat.", max_tokens=5,
                                  temperature=0)
    assert r.object == "text_completion" and isinstance(r.choices[0].text, str)
    assert r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens > 0 and r.usage.completion_tokens <= 5
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens

    c = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                                       seed=1, extra_body={"ignore_eos": True, "task": "qa", "ttft_ms": 5000})
    assert c.choices[0].message.role == "assistant" and c.choices[0].finish_reason == "length"
    assert c.usage.completion_tokens == 4

    chunks = list(client.chat.completions.create(
        model="tiny", messages=[{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}],
        max_tokens=6, stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 6
    assert all(ch.usage is None for ch in chunks[:-1])
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    # the streamed text is the non-streamed text (greedy, same prompt)
    same = client.chat.completions.create(
        model="tiny", messages=[{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}],
        max_tokens=6, temperature=0, extra_body={"ignore_eos": True})
    again = list(client.chat.completions.create(
        model="tiny", messages=[{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}],
        max_tokens=6, temperature=0, stream=True, extra_body={"ignore_eos": True}))
    assert "".join(ch.choices[0].delta.content or "" for ch in again if ch.choices) == same.choices[0].message.content
    assert text is not None

    lp = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=3,
                                        logprobs=True, top_logprobs=2, frequency_penalty=0.5,
                                        extra_body={"ignore_eos": True, "top_k": 20})
    assert len(lp.choices[0].logprobs.content) == 3 and len(lp.choices[0].logprobs.content[0].top_logprobs) == 2
    clp = client.completions.create(model="tiny", prompt="hi", max_tokens=2, logprobs=1, extra_body={"ignore_eos": True})
    assert len(clp.choices[0].logprobs.token_logprobs) == 2

    models = client.models.list()
    assert [m.id for m in models.data] == ["tiny"]


def test_streamed_completion_and_endpoints(srv):
    url, _ = srv
    with httpx.stream("POST", f"{url}/v1/completions", headers=AUTH, json={
            "model": "tiny", "prompt": ["hello"], "max_tokens": 3, "stream": True, "ignore_eos": True}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [ln for ln in r.iter_lines() if ln]
    assert lines[-1] == "data: [DONE]" and all(ln.startswith("data: ") for ln in lines)
    h = httpx.get(f"{url}/health")
    assert h.status_code == 200 and h.json()["status"] == "ok"
    m = httpx.get(f"{url}/metrics")
    assert m.status_code == 200
    for name in ("emoe:time_to_first_token_seconds", "emoe:inter_token_latency_seconds",
                 "emoe:e2e_request_latency_seconds", "emoe:request_queue_time_seconds", "emoe:prompt_tokens_total",
                 "emoe:generation_tokens_total", "emoe:request_success_total", "emoe:expert_hits_total",
                 "emoe:expert_misses_total", "emoe:expert_bytes_loaded_total", "emoe:num_requests_running",
                 "emoe:num_requests_waiting", "emoe:resident_expert_bytes", "emoe:expert_budget_bytes",
                 "emoe:kv_cache_bytes", "emoe:slo_met_total", "emoe:scheduler_refusals_total",
                 "emoe:scheduler_late_admissions_total", "emoe:decode_step_base_seconds",
                 "emoe:decode_step_per_request_seconds", "emoe:prefix_reused_tokens_total"):
        assert name in m.text, name
    assert "emoe:time_to_first_token_seconds_count" in m.text


def test_a_follow_up_prompt_reuses_the_kv_of_the_one_before(srv):
    """The next turn re-sends the conversation; its prefix's KV is still in the slot, and /metrics says so."""
    url, _ = srv

    def reused():
        line = [ln for ln in httpx.get(f"{url}/metrics").text.splitlines()
                if ln.startswith("emoe:prefix_reused_tokens_total")][0]
        return float(line.split()[-1])
    prompt = "Once upon a time, in a land far away, there lived"
    r = httpx.post(f"{url}/v1/completions", headers=AUTH, json={
        "model": "tiny", "prompt": prompt, "max_tokens": 4, "ignore_eos": True}).json()
    before = reused()
    r2 = httpx.post(f"{url}/v1/completions", headers=AUTH, json={
        "model": "tiny", "prompt": prompt + r["choices"][0]["text"] + " and then", "max_tokens": 2,
        "ignore_eos": True})
    assert r2.status_code == 200 and reused() - before >= 5


# -- bad input -------------------------------------------------------------------------------------
GOOD = {"model": "tiny", "prompt": "hi", "max_tokens": 2}
BAD = [  # (endpoint, body or raw bytes, status, param)
    ("completions", b'{"model": "tiny", "prompt": ', 400, None),
    ("completions", b"[1, 2]", 400, None),
    ("completions", {"model": "tiny"}, 400, "prompt"),
    ("completions", {"prompt": "hi"}, 400, "model"),
    ("completions", {**GOOD, "max_tokens": "lots"}, 400, "max_tokens"),
    ("completions", {**GOOD, "prompt": [1, 2, 10 ** 6]}, 400, "prompt"),  # token ids past the vocabulary
    ("completions", {**GOOD, "prompt": []}, 400, "prompt"),
    ("completions", {**GOOD, "prompt": ["a", "b"], "stream": True}, 400, "prompt"),
    ("completions", {**GOOD, "prompt": ["a", ""]}, 400, "prompt"),
    ("completions", {**GOOD, "prompt": ["a"] * 65}, 400, "prompt"),
    ("completions", {**GOOD, "stream": "maybe"}, 400, "stream"),
    ("completions", {**GOOD, "model": "gpt-4"}, 404, "model"),
    ("completions", {**GOOD, "prompt": "word " * 400}, 400, "prompt"),
    ("completions", {**GOOD, "max_tokens": 0}, 400, "max_tokens"),
    ("completions", {**GOOD, "max_tokens": 5000}, 400, "max_tokens"),  # prompt + max_tokens over the context
    ("completions", {**GOOD, "max_tokens": -3}, 400, "max_tokens"),
    ("completions", {**GOOD, "temperature": -0.5}, 400, "temperature"),
    ("completions", {**GOOD, "top_p": 0}, 400, "top_p"),
    ("completions", {**GOOD, "top_k": -1}, 400, "top_k"),
    ("completions", {**GOOD, "min_p": 1.5}, 400, "min_p"),
    ("completions", {**GOOD, "frequency_penalty": 3}, 400, "frequency_penalty"),
    ("completions", {**GOOD, "presence_penalty": -2.5}, 400, "presence_penalty"),
    ("completions", {**GOOD, "repetition_penalty": 0}, 400, "repetition_penalty"),
    ("completions", {**GOOD, "task": "astrology"}, 400, "task"),
    ("completions", {**GOOD, "ttft_ms": -1}, 400, "ttft_ms"),
    ("completions", {**GOOD, "stop": [""]}, 400, "stop"),
    ("completions", {**GOOD, "logit_bias": {"7": 150}}, 400, "logit_bias"),
    ("completions", {**GOOD, "logit_bias": {"seven": 1}}, 400, "logit_bias"),
    ("completions", {**GOOD, "logit_bias": {"99999999": 1}}, 400, "logit_bias"),
    ("completions", {**GOOD, "response_format": {"type": "xml"}}, 400, "response_format"),
    ("completions", {**GOOD, "response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "frob"}}}},
     400, "response_format"),
    ("completions", {**GOOD, "guided_regex": "(unclosed"}, 400, "guided_regex"),
    ("completions", {**GOOD, "guided_choice": []}, 400, "guided_choice"),
    ("completions", {**GOOD, "guided_regex": "a+", "guided_choice": ["b"]}, 400, "guided_regex"),
    ("completions", {**GOOD, "grammar": 'root ::= ('}, 400, "grammar"),
    ("completions", {**GOOD, "guided_grammar": ""}, 400, "guided_grammar"),
    ("chat/completions", {"model": "tiny", "messages": []}, 400, "messages"),
    ("chat/completions", {"model": "tiny", "messages": "hi"}, 400, "messages"),
    ("chat/completions", {"model": "tiny", "messages": [{"role": "wizard", "content": "x"}]}, 400, "messages"),
    ("chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "x" * 2000}]}, 400, "messages"),
]


@pytest.mark.parametrize("endpoint,body,status,param", BAD, ids=[f"{i}" for i in range(len(BAD))])
def test_bad_input(srv, endpoint, body, status, param):
    url, loop = srv
    kw = {"content": body, "headers": {**AUTH, "Content-Type": "application/json"}} if isinstance(body, bytes) \
        else {"json": body, "headers": AUTH}
    r = httpx.post(f"{url}/v1/{endpoint}", **kw)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert err["param"] == param
    ok = httpx.post(f"{url}/v1/completions", json=GOOD, headers=AUTH)  # the server keeps serving
    assert ok.status_code == 200 and ok.json()["usage"]["prompt_tokens"] > 0
    assert loop.alive and loop.errors == 0


def test_sampling_extensions_are_accepted(srv):
    """top_k, min_p, repetition_penalty (vLLM's) and the OpenAI penalties reach the sampler."""
    r = httpx.post(f"{srv[0]}/v1/completions", headers=AUTH, json={
        **GOOD, "temperature": 0.8, "top_k": 5, "min_p": 0.05, "presence_penalty": 0.5, "frequency_penalty": 0.5,
        "repetition_penalty": 1.2, "seed": 3, "max_tokens": 4, "ignore_eos": True})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
    t = httpx.post(f"{srv[0]}/tokenize", headers=AUTH, json={"prompt": " the"}).json()["tokens"][-1]
    want = httpx.post(f"{srv[0]}/detokenize", headers=AUTH, json={"tokens": [t] * 3}).json()["prompt"]
    r = httpx.post(f"{srv[0]}/v1/completions", headers=AUTH, json={  # logit_bias steers greedy decoding
        **GOOD, "temperature": 0, "max_tokens": 3, "ignore_eos": True, "logit_bias": {str(t): 100}})
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == want


def test_structured_output(srv):
    """response_format (OpenAI's json_object and json_schema, through the official client) and vLLM's guided_regex
    and guided_choice: the tiny model's gibberish comes out as a document of the asked form, streamed too, and the
    answer ends when the document does (finish_reason stop, not length)."""
    import re
    url, loop = srv
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0)
    msgs = [{"role": "user", "content": "Rate the cat: good or bad?"}]
    schema = {"type": "object", "properties": {"verdict": {"enum": ["good", "bad"]}, "sure": {"type": "boolean"}},
              "required": ["verdict", "sure"], "additionalProperties": False}
    fmt = {"type": "json_schema", "json_schema": {"name": "rating", "schema": schema, "strict": True}}
    for temperature in (0, 1):
        c = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=40, temperature=temperature,
                                           seed=4, response_format=fmt)
        doc = json.loads(c.choices[0].message.content)
        assert set(doc) == {"verdict", "sure"} and doc["verdict"] in ("good", "bad") and isinstance(doc["sure"], bool)
        assert c.choices[0].finish_reason == "stop"
    streamed = list(client.chat.completions.create(model="tiny", messages=msgs, max_tokens=40, temperature=0,
                                                   response_format=fmt, stream=True))
    assert "".join(ch.choices[0].delta.content or "" for ch in streamed if ch.choices) == \
        client.chat.completions.create(model="tiny", messages=msgs, max_tokens=40, temperature=0,
                                       response_format=fmt).choices[0].message.content
    obj = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=40, temperature=0,
                                         response_format={"type": "json_object"})
    assert isinstance(json.loads(obj.choices[0].message.content), dict)
    r = httpx.post(f"{url}/v1/completions", headers=AUTH, json={**GOOD, "max_tokens": 12, "temperature": 1,
                                                                 "guided_regex": "[0-9]{3}-[0-9]{4}"}).json()
    assert re.fullmatch("[0-9]{3}-[0-9]{4}", r["choices"][0]["text"]) and r["choices"][0]["finish_reason"] == "stop"
    r = httpx.post(f"{url}/v1/completions", headers=AUTH, json={**GOOD, "max_tokens": 12,
                                                                 "guided_choice": ["yes", "no", "maybe"]}).json()
    assert r["choices"][0]["text"] in ("yes", "no", "maybe")
    gbnf = 'root ::= "(" item ", " item ")"\nitem ::= "cat" | "dog"'  # llama-server's `grammar` field
    r = httpx.post(f"{url}/v1/completions", headers=AUTH, json={**GOOD, "max_tokens": 40, "temperature": 1,
                                                                 "seed": 2, "grammar": gbnf}).json()
    assert re.fullmatch(r"\((cat|dog), (cat|dog)\)", r["choices"][0]["text"])
    r = httpx.post(f"{url}/v1/completions", headers=AUTH, json={**GOOD, "max_tokens": 40, "temperature": 0,
                                                                 "json_schema": {"enum": ["up", "down"]}}).json()
    assert json.loads(r["choices"][0]["text"]) in ("up", "down")
    assert loop.alive and loop.errors == 0


def test_logprobs_of_the_answer(srv):
    """completions: logprobs=N gives each token, its log-probability, N alternatives and text offsets; chat:
    logprobs/top_logprobs in the chat shape. Greedy picks the likeliest, so its logprob tops its list."""
    import math
    url = srv[0]
    r = httpx.post(f"{url}/v1/completions", headers=AUTH, json={
        **GOOD, "temperature": 0, "max_tokens": 4, "ignore_eos": True, "logprobs": 3}).json()
    lp = r["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == 4
    assert len(lp["text_offset"]) == 4 and lp["text_offset"][0] == 0
    for chosen, top in zip(lp["token_logprobs"], lp["top_logprobs"]):  # keyed by text: partial bytes can collide
        assert 1 <= len(top) <= 3 and chosen <= 0 and math.isclose(chosen, max(top.values()), rel_tol=1e-6)
    c = httpx.post(f"{url}/v1/chat/completions", headers=AUTH, json={
        "model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "ignore_eos": True,
        "logprobs": True, "top_logprobs": 2}).json()
    content = c["choices"][0]["logprobs"]["content"]
    assert len(content) == 3 and all(len(e["top_logprobs"]) == 2 and e["bytes"] == list(e["token"].encode())
                                     for e in content)
    plain = httpx.post(f"{url}/v1/completions", headers=AUTH, json={**GOOD, "max_tokens": 2}).json()
    assert plain["choices"][0]["logprobs"] is None
    bad = httpx.post(f"{url}/v1/completions", headers=AUTH, json={**GOOD, "logprobs": 21})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "logprobs"
    # streamed: each chunk carries the logprobs of the tokens it completes, all of them by the end
    for endpoint, body, key in (("completions", {**GOOD, "logprobs": 1}, "tokens"),
                                ("chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "hi"}],
                                                      "logprobs": True, "top_logprobs": 1}, "content")):
        with httpx.stream("POST", f"{url}/v1/{endpoint}", headers=AUTH, json={
                **body, "max_tokens": 5, "ignore_eos": True, "stream": True}) as s:
            chunks = [json.loads(ln[6:]) for ln in s.iter_lines() if ln.startswith("data: {")]
        got = [e for c in chunks for ch in c["choices"] if ch.get("logprobs") for e in ch["logprobs"][key]]
        assert len(got) == 5, (endpoint, chunks)
    bad = httpx.post(f"{url}/v1/chat/completions", headers=AUTH, json={
        "model": "tiny", "messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "top_logprobs"


def test_echo_returns_the_prompt_and_its_logprobs(srv):
    """lm-eval-harness's loglikelihood request: echo + logprobs give every prompt token's log-probability
    (the first has none) before the answer's."""
    url, _ = srv
    r = httpx.post(f"{url}/v1/completions", headers=AUTH, json={
        **GOOD, "prompt": "Summarize: the cat sat", "echo": True, "logprobs": 1, "max_tokens": 1,
        "temperature": 0, "ignore_eos": True}).json()
    choice, n = r["choices"][0], r["usage"]["prompt_tokens"]
    lp = choice["logprobs"]
    assert choice["text"].startswith("Summarize: the cat sat")
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == n + 1
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert all(v <= 0 for v in lp["token_logprobs"][1:])
    bad = httpx.post(f"{url}/v1/completions", headers=AUTH, json={**GOOD, "echo": True, "stream": True})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "echo"


def test_several_prompts_give_one_choice_each(srv):
    """A list of prompts (text or token ids) is one choice per prompt, in order, with usage summed; each
    choice is what the prompt alone gives."""
    url, loop = srv
    greedy = {"max_tokens": 3, "temperature": 0, "ignore_eos": True}
    alone = [httpx.post(f"{url}/v1/completions", headers=AUTH, json={**GOOD, **greedy, "prompt": p}).json()
             for p in ("hi", "Summarize: the cat")]
    for prompts in (["hi", "Summarize: the cat"], [loop.engine.codec.encode(p) for p in ("hi", "Summarize: the cat")]):
        both = httpx.post(f"{url}/v1/completions", headers=AUTH, json={**GOOD, **greedy, "prompt": prompts}).json()
        assert [c["index"] for c in both["choices"]] == [0, 1]
        assert [c["text"] for c in both["choices"]] == [a["choices"][0]["text"] for a in alone]
        assert both["usage"]["completion_tokens"] == 6
        assert both["usage"]["prompt_tokens"] == sum(a["usage"]["prompt_tokens"] for a in alone)


def test_n_answers_per_prompt(srv):
    """n sampled answers per prompt: choice k answers prompt k // n; a seed gives each answer its own
    (seed + i), so seeded requests repeat; the prompt is counted once in usage."""
    url, _ = srv
    body = {**GOOD, "max_tokens": 4, "temperature": 1.0, "seed": 7, "ignore_eos": True}
    r = httpx.post(f"{url}/v1/completions", headers=AUTH, json={**body, "prompt": ["hi", "Summarize: the cat"],
                                                                  "n": 3}).json()
    assert [c["index"] for c in r["choices"]] == list(range(6)) and r["usage"]["completion_tokens"] == 24
    again = httpx.post(f"{url}/v1/completions", headers=AUTH, json={**body, "prompt": ["hi", "Summarize: the cat"],
                                                                      "n": 3}).json()
    assert [c["text"] for c in again["choices"]] == [c["text"] for c in r["choices"]]
    one = httpx.post(f"{url}/v1/completions", headers=AUTH, json={**body, "prompt": "hi"}).json()
    assert r["usage"]["prompt_tokens"] == one["usage"]["prompt_tokens"] + len(
        httpx.post(f"{url}/tokenize", headers=AUTH, json={"prompt": "Summarize: the cat"}).json()["tokens"])
    assert r["choices"][0]["text"] == one["choices"][0]["text"]  # answer 0 has the request's own seed
    chat = httpx.post(f"{url}/v1/chat/completions", headers=AUTH, json={
        "model": "tiny", "messages": [{"role": "user", "content": "hi"}], "n": 2, "max_tokens": 2}).json()
    assert [c["index"] for c in chat["choices"]] == [0, 1]
    for bad in ({**GOOD, "n": 0}, {**GOOD, "n": 17}, {**GOOD, "n": 2, "stream": True}):
        res = httpx.post(f"{url}/v1/completions", headers=AUTH, json=bad)
        assert res.status_code == 400 and res.json()["error"]["param"] == "n"


def test_prompt_as_token_ids(srv):
    """OpenAI's completions take token ids as the prompt too; they are used as they are."""
    url, loop = srv
    greedy = {"max_tokens": 3, "temperature": 0, "ignore_eos": True}
    want = httpx.post(f"{url}/v1/completions", headers=AUTH, json={**GOOD, **greedy}).json()
    ids = loop.engine.codec.encode(GOOD["prompt"])
    for prompt in (ids, [ids]):
        got = httpx.post(f"{url}/v1/completions", headers=AUTH, json={**GOOD, **greedy, "prompt": prompt}).json()
        assert got["choices"][0]["text"] == want["choices"][0]["text"]
        assert got["usage"]["prompt_tokens"] == want["usage"]["prompt_tokens"] == len(ids)


def test_tokenize_and_detokenize(srv):
    url, loop = srv
    r = httpx.post(f"{url}/tokenize", headers=AUTH, json={"prompt": "hello there"}).json()
    assert r["tokens"] == loop.engine.codec.encode("hello there") and r["count"] == len(r["tokens"])
    chat = httpx.post(f"{url}/tokenize", headers=AUTH, json={"messages": [{"role": "user", "content": "hi"}]}).json()
    assert chat["count"] == len(loop.engine.codec.encode(loop.engine.codec.apply_chat([{"role": "user", "content": "hi"}])))
    back = httpx.post(f"{url}/detokenize", headers=AUTH, json={"tokens": r["tokens"]}).json()
    assert back["prompt"] == "hello there"
    for path, body, param in (("tokenize", {}, "prompt"), ("detokenize", {"tokens": [10 ** 6]}, "tokens")):
        bad = httpx.post(f"{url}/{path}", headers=AUTH, json=body)
        assert bad.status_code == 400 and bad.json()["error"]["param"] == param
    assert httpx.post(f"{url}/tokenize", json={"prompt": "x"}).status_code == 401  # behind the API key too


def test_unknown_route_is_openai_style(srv):
    r = httpx.get(f"{srv[0]}/v1/nothing", headers=AUTH)
    assert r.status_code == 404 and r.json()["error"]["message"]


def test_api_key(srv):
    url, _ = srv
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        r = httpx.post(f"{url}/v1/completions", json=GOOD, headers=headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(f"{url}/v1/models").status_code == 401
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{url}/v1", api_key="nope", max_retries=0).models.list()


# -- faults ------------------------------------------------------------------------------------------
def test_disconnect_mid_stream_frees_the_slot(srv):
    url, loop = srv
    undo = slow_steps(loop, 0.02)
    try:
        aborted = loop.metrics._success.labels("emoe", "abort")._value.get()
        body = {"model": "tiny", "messages": [{"role": "user", "content": "talk"}], "max_tokens": 200,
                "stream": True, "ignore_eos": True}
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, headers=AUTH) as r:
            got = 0
            for line in r.iter_lines():
                got += line.startswith("data: ")
                if got >= 3:
                    break
            assert len(loop.engine.free_slots) == MAX_BATCH - 1
        # the connection is closed: the server aborts the request and its KV slot is free again
        assert wait_for(lambda: len(loop.engine.free_slots) == MAX_BATCH and not loop.engine.running, 5)
        assert loop.metrics._success.labels("emoe", "abort")._value.get() == aborted + 1
    finally:
        undo()


def test_burst_gives_429_never_5xx_nor_over_budget(srv):
    url, loop = srv
    cache = loop.engine.cache
    peak, stop = [0], threading.Event()

    def watch():
        while not stop.is_set():
            peak[0] = max(peak[0], cache.used_bytes)
            time.sleep(0.001)

    async def burst():
        async with httpx.AsyncClient(timeout=60) as client:
            body = {"model": "tiny", "prompt": "hello there", "max_tokens": 8, "ignore_eos": True}
            rs = await asyncio.gather(*[client.post(f"{url}/v1/completions", json=body, headers=AUTH)
                                        for _ in range(40)])
            return [r.status_code for r in rs], [r.json() for r in rs]

    undo = slow_steps(loop, 0.02)
    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        codes, bodies = asyncio.run(burst())
    finally:
        stop.set()
        watcher.join()
        undo()
    assert set(codes) <= {200, 429}, codes
    assert codes.count(429) > 0 and codes.count(200) >= MAX_BATCH
    assert all(b["error"]["code"] == "rate_limit_exceeded" for c, b in zip(codes, bodies) if c == 429)
    assert all(b["usage"]["completion_tokens"] == 8 for c, b in zip(codes, bodies) if c == 200)
    assert 0 < peak[0] <= cache.budget_bytes
    assert wait_for(lambda: len(loop.engine.free_slots) == MAX_BATCH, 5)
    assert httpx.post(f"{url}/v1/completions", json=GOOD, headers=AUTH).status_code == 200


def test_engine_error_is_500_and_the_server_recovers(srv):
    url, loop = srv
    step, calls = loop.engine.step, []

    def boom():
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("boom")
        return step()
    loop.engine.step = boom
    try:
        r = httpx.post(f"{url}/v1/completions", json={**GOOD, "max_tokens": 4, "ignore_eos": True}, headers=AUTH)
    finally:
        vars(loop.engine).pop("step", None)
    assert r.status_code == 500 and "boom" in r.json()["error"]["message"]
    assert loop.errors == 1 and len(loop.engine.free_slots) == MAX_BATCH and not loop.engine.running
    assert httpx.post(f"{url}/v1/completions", json=GOOD, headers=AUTH).status_code == 200

def test_shutdown_finishes_in_flight_requests(tiny_mixtral):
    with serve(tiny_mixtral, api_key=None, scheduler="fcfs") as (url, loop):
        slow_steps(loop, 0.02)
        body = {"model": "tiny", "prompt": "hello", "max_tokens": 20, "ignore_eos": True}
        results = []

        def call():
            results.append(httpx.post(f"{url}/v1/completions", json=body, timeout=60))
        threads = [threading.Thread(target=call) for _ in range(3)]
        for t in threads:
            t.start()
        assert wait_for(lambda: len(loop.engine.running) == 3, 10)
        closer = threading.Thread(target=loop.shutdown, args=(20.0,))
        closer.start()
        assert wait_for(lambda: not loop.accepting, 5)
        late = httpx.post(f"{url}/v1/completions", json=body)
        assert late.status_code == 503 and late.json()["error"]["code"] == "shutting_down"
        assert httpx.get(f"{url}/health").status_code == 503
        for t in threads:
            t.join(30)
        closer.join(30)
        assert [r.status_code for r in results] == [200] * 3
        assert all(r.json()["choices"][0]["finish_reason"] == "length" for r in results)
        assert not loop.alive and len(loop.engine.free_slots) == MAX_BATCH


def test_shutdown_past_grace_aborts(tiny_mixtral):
    with serve(tiny_mixtral, api_key=None, scheduler="sjf") as (url, loop):
        slow_steps(loop, 0.05)
        body = {"model": "tiny", "prompt": "hello", "max_tokens": 200, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as r:
            lines = r.iter_lines()
            assert next(ln for ln in lines if ln.startswith("data: "))
            loop.shutdown(0.1)
            rest = [ln for ln in lines if ln]
        assert rest[-1] == "data: [DONE]" and '"shutting_down"' in rest[-2]
        assert not loop.alive and len(loop.engine.free_slots) == MAX_BATCH


def test_cli_serve_with_profile_and_sigint(tiny_mixtral, tmp_path):
    """`emoe serve --profile` (task-static loader, task-aware scheduler) answers, then exits cleanly on SIGINT."""
    import signal
    import subprocess
    import sys

    from emoe.engine import SamplingParams
    from emoe.profile import Profile, fingerprint
    eng = Engine(EngineConfig(str(tiny_mixtral), miss_policy="all", trace=True, max_batch=4))
    tasks = ["qa", "code"]
    done = eng.generate(["Answer: who wrote Hamlet?", "SELECT 1;"] * 2, SamplingParams(max_tokens=3, ignore_eos=True),
                        tasks=tasks * 2, chat=False)
    c = eng.cfg
    Profile(fingerprint(tiny_mixtral), tasks, c.num_layers, c.num_experts, c.top_k, list(c.moe_layers),
            {"qa": 3.0, "code": 3.0}, {"qa": 8.0, "code": 6.0}, 0.001, eng.cache.expert_bytes,
            {"decode": 0.01, "prefill": 0.001}, {t: [1] * c.num_layers for t in tasks}, {},
            traces=[r.trace for r in done]).save(tmp_path / "prof")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "emoe.cli", "serve", "--model", str(tiny_mixtral), "--budget", "0.5",
                             "--profile", str(tmp_path / "prof"), "--port", str(port), "--api-key", KEY,
                             "--log-level", "warning"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        def up():
            assert proc.poll() is None, proc.stdout.read()
            with contextlib.suppress(httpx.HTTPError):
                return httpx.get(f"{url}/health").status_code == 200
        assert wait_for(up, 60)
        r = httpx.post(f"{url}/v1/completions", headers=AUTH, json={**GOOD, "model": tiny_mixtral.name, "task": "qa"})
        assert r.status_code == 200, r.text
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out
    assert "task-static" in out and "Traceback" not in out
