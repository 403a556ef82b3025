"""`emoe bench serve` against a fake streaming OpenAI-compatible server (uvicorn on 127.0.0.1 in a thread)."""
import asyncio
import csv
import json
import math
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from emoe.bench.serve import BenchRequest, make_requests, read_trace, run_benchmark, format_table
from emoe.cli import main

TRACES = Path(__file__).parents[1].parent / "shared/traces"
FIRST_S, GAP_S, FAIL = 0.08, 0.02, "PLEASE-429"
PROMPTS = {"qa": ["short?", "a" * 40, "b" * 400], "code": ["x" * 100], "conversation": ["c" * n for n in (8, 80, 800)]}


def fake_app() -> FastAPI:
    app = FastAPI()
    app.state.bodies = []

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": "fake-moe", "object": "model"}]}

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await request.json()
        app.state.bodies.append(body)
        if FAIL in body["prompt"]:
            return JSONResponse({"error": {"message": "too many requests", "type": "overloaded"}}, status_code=429)
        n = body["max_tokens"]

        async def gen():
            for i in range(n):
                await asyncio.sleep(FIRST_S if i == 0 else GAP_S)
                chunk = {"id": "c", "object": "text_completion", "choices": [{"index": 0, "text": f" t{i}"}]}
                yield f"data: {json.dumps(chunk)}\n\n"
            usage = {"prompt_tokens": 7, "completion_tokens": n, "total_tokens": n + 7}
            yield f"data: {json.dumps({'id': 'c', 'choices': [], 'usage': usage})}\n\n"
            yield "data: [DONE]\n\n"
        return StreamingResponse(gen(), media_type="text/event-stream")
    return app


@pytest.fixture(scope="module")
def server():
    app = fake_app()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    srv = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    th = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    th.start()
    deadline = time.time() + 10
    while not srv.started and time.time() < deadline:
        time.sleep(0.02)
    assert srv.started
    yield f"http://127.0.0.1:{sock.getsockname()[1]}", app
    srv.should_exit = True
    th.join(5)


def _reqs(n_ok=4, n_fail=2, tokens=5):
    return [BenchRequest("what is up?", "qa", tokens, prompt_tokens=3) for _ in range(n_ok)] + \
        [BenchRequest(f"{FAIL} write code", "code", tokens, prompt_tokens=4) for _ in range(n_fail)]


def test_metrics_against_fake_server(server):
    url, app = server
    app.state.bodies.clear()
    res = run_benchmark(url, _reqs(), goodput={"ttft": 5000, "tpot": 5000})
    assert res["model"] == "fake-moe" and res["completed"] == 4 and res["failed"] == 2
    assert res["total_output_tokens"] == 20 and res["total_input_tokens"] == 28  # usage replaces estimates
    # the fake server's sleeps are lower bounds; upper bounds only catch unit mistakes (a loaded machine adds
    # hundreds of ms), and TTFT is told apart from E2E by the four gaps that follow the first token
    assert FIRST_S * 1e3 - 5 <= res["ttft_ms"]["mean"] < FIRST_S * 1e3 + 1000
    assert GAP_S * 1e3 - 5 <= res["tpot_ms"]["mean"] < GAP_S * 1e3 + 500
    assert GAP_S * 1e3 - 5 <= res["itl_ms"]["median"] < GAP_S * 1e3 + 500
    assert res["e2e_ms"]["mean"] >= (FIRST_S + 4 * GAP_S) * 1e3 - 5
    assert res["e2e_ms"]["mean"] - res["ttft_ms"]["mean"] >= 4 * GAP_S * 1e3 - 5
    assert res["e2e_ms"]["p99"] >= res["e2e_ms"]["median"] >= res["ttft_ms"]["median"]
    assert set(res["ttft_ms"]) >= {"mean", "median", "p99", "std"}
    assert math.isclose(res["request_throughput"], 4 / res["duration_s"])
    assert math.isclose(res["output_token_throughput"], 20 / res["duration_s"])
    assert math.isclose(res["goodput"], 4 / res["duration_s"])  # loose SLO: every success counts
    att = res["slo_attainment"]
    assert att["overall"] == pytest.approx(4 / 6) and att["per_task"] == {"code": 0.0, "qa": 1.0}
    assert any("429" in e and "too many requests" in e for e in res["errors"])
    body = app.state.bodies[0]
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert body["task"] == "qa" and body["ttft_ms"] == 5000 and body["tpot_ms"] == 5000
    assert body["temperature"] == 0 and body["model"] == "fake-moe" and "ignore_eos" not in body
    table = format_table(res)
    print(table)
    for label in ("Serving Benchmark Result", "Successful requests:", "Benchmark duration (s):",
                  "Request throughput (req/s):", "Output token throughput (tok/s):", "Request goodput (req/s):",
                  "Mean TTFT (ms):", "Median TPOT (ms):", "P99 ITL (ms):", "Mean E2EL (ms):", "qa (4/4 ok):"):
        assert label in table


def test_tight_slo_and_no_slo(server):
    url, _ = server
    tight = run_benchmark(url, _reqs(2, 1), goodput="ttft:1 tpot:5000")  # first token takes 80 ms
    assert tight["goodput"] == 0 and tight["slo_attainment"]["overall"] == 0
    tpot_only = run_benchmark(url, _reqs(2, 0), goodput=["tpot:1"])
    assert tpot_only["goodput"] == 0 and tpot_only["completed"] == 2
    none = run_benchmark(url, _reqs(1, 0), model="m")
    assert none["goodput"] is None and none["slo_attainment"] is None and none["model"] == "m"


def test_per_task_slo_is_sent_and_judged(server):
    url, app = server
    app.state.bodies.clear()
    reqs = [BenchRequest("what is up?", "qa", 3, prompt_tokens=3), BenchRequest("code it", "code", 3, prompt_tokens=3)]
    # qa gets a TTFT it cannot meet (the first token takes 80 ms); code keeps the loose global SLO
    res = run_benchmark(url, reqs, goodput={"ttft": 5000, "tpot": 5000}, task_slo={"qa": {"ttft": 1.0}})
    assert res["slo_attainment"]["per_task"] == {"code": 1.0, "qa": 0.0}
    assert math.isclose(res["goodput"], 1 / res["duration_s"])
    sent = {b["task"]: (b["ttft_ms"], b["tpot_ms"]) for b in app.state.bodies}
    assert sent == {"qa": (1.0, 5000), "code": (5000, 5000)}
    assert "qa: ttft<=1ms" in format_table(res)
    only_task = run_benchmark(url, reqs[:1], task_slo={"qa": {"ttft": 5000, "tpot": 5000}})
    assert only_task["goodput"] is not None and only_task["slo_attainment"]["overall"] == 1.0


def test_unreachable_server_and_timeout(server):
    url, _ = server
    res = run_benchmark(url, _reqs(2, 0, tokens=20), model="m", timeout=0.15)  # 80 + 19*20 ms > 150 ms
    assert res["failed"] == 2 and any("timed out" in e for e in res["errors"])
    assert res["ttft_ms"]["mean"] is None and "-" in format_table(res)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    with pytest.raises(ValueError, match="pass --model"):
        run_benchmark(dead, _reqs(1, 0))
    res = run_benchmark(dead, _reqs(1, 0), model="m")
    assert res["failed"] == 1 and res["completed"] == 0


def test_arrivals_poisson_gamma_and_inf():
    n, rate = 4000, 10.0
    pois = np.diff([r.arrival_s for r in make_requests(n, rate, 1.0, seed=1, prompts=PROMPTS, task_mix="qa")])
    burst = np.diff([r.arrival_s for r in make_requests(n, rate, 0.2, seed=1, prompts=PROMPTS, task_mix="qa")])
    assert pois.mean() == pytest.approx(1 / rate, rel=0.06) and burst.mean() == pytest.approx(1 / rate, rel=0.12)
    assert pois.var() / pois.mean() ** 2 == pytest.approx(1.0, rel=0.15)  # exponential: CV^2 = 1
    assert burst.var() > 3 * pois.var()                                    # gamma(0.2): CV^2 = 5
    allnow = make_requests(5, prompts=PROMPTS, task_mix="qa")
    assert [r.arrival_s for r in allnow] == [0.0] * 5 and all(r.max_tokens == 64 for r in allnow)


def test_task_mix_and_prompt_fit():
    reqs = make_requests(3000, 100.0, prompts=PROMPTS, task_mix="qa:1,code:3", max_prompt_tokens=50, seed=2)
    share = sum(r.task == "code" for r in reqs) / len(reqs)
    assert share == pytest.approx(0.75, abs=0.03)
    assert all(r.prompt_tokens <= 50 for r in reqs)  # the 400-char qa prompt (100 tokens) does not fit
    mixed = make_requests(60, prompts=None, seed=0)   # the real test split, uniform over TASKS
    assert len({r.task for r in mixed}) >= 4 and all(r.prompt for r in mixed)


@pytest.mark.skipif(not (TRACES / "AzureLLMInferenceTrace_conv.csv").is_file(), reason="shared traces absent")
def test_trace_replay_scaling():
    path = TRACES / "AzureLLMInferenceTrace_conv.csv"
    with open(path) as f:
        rows = list(zip(range(301), csv.reader(f)))[1:]
    off, ctx, gen = read_trace(path, 300)
    assert len(off) == 300 and off[0] == 0 and np.all(np.diff(off) >= 0)
    reqs = make_requests(300, trace=path, time_scale=4.0, max_tokens=32, max_prompt_tokens=200)
    assert all(r.task == "conversation" for r in reqs)  # _conv trace default
    assert np.allclose([r.arrival_s for r in reqs], off / 4.0)
    assert [r.trace_context_tokens for r in reqs] == [int(r[1][1]) for r in rows]
    outs = np.array([r.max_tokens for r in reqs])
    assert outs.min() >= 1 and outs.max() == 32 and len(set(outs)) > 10
    assert outs[np.argmax(gen)] == 32 and outs[np.argmin(gen)] <= outs.mean()
    lens = np.array([r.prompt_tokens for r in reqs])
    assert lens.max() <= 220 and len(set(lens)) > 5
    assert np.corrcoef(lens, ctx)[0, 1] > 0.5  # longer trace contexts get longer prompts
    code = make_requests(20, trace=path, task_mix="code:1,qa:1", seed=3, prompts=PROMPTS)
    assert {r.task for r in code} == {"code", "qa"}


@pytest.mark.skipif(not (TRACES / "AzureLLMInferenceTrace_conv.csv").is_file(), reason="shared traces absent")
def test_cli_trace_replay_json(server, tmp_path, capsys):
    url, _ = server
    out = tmp_path / "res.json"
    main(["bench", "serve", "--base-url", url + "/v1", "--trace", str(TRACES / "AzureLLMInferenceTrace_conv.csv"),
          "--num-requests", "6", "--time-scale", "50", "--max-tokens", "4", "--goodput", "ttft:2000", "tpot:2000",
          "--slo", "conversation:2500:2000", "--json", str(out)])
    printed = capsys.readouterr().out
    assert "Serving Benchmark Result" in printed and "conversation (6/6 ok):" in printed
    res = json.loads(out.read_text())
    for key in ("completed", "failed", "duration_s", "request_throughput", "output_token_throughput", "goodput",
                "ttft_ms", "tpot_ms", "itl_ms", "e2e_ms", "slo_attainment", "config"):
        assert key in res
    for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"):
        assert set(res[key]) >= {"mean", "median", "p99"}
    assert res["completed"] == 6 and res["slo_attainment"]["per_task"] == {"conversation": 1.0}
    # a trace row's output length is replayed exactly (ignore_eos), not cut short by the model's EOS
    want = sum(r.max_tokens for r in make_requests(6, trace=TRACES / "AzureLLMInferenceTrace_conv.csv",
                                                   time_scale=50, max_tokens=4))
    assert res["total_output_tokens"] == want
    assert res["config"]["time_scale"] == 50 and res["config"]["goodput"] == {"ttft": 2000, "tpot": 2000}
    assert res["config"]["request_rate"] == "inf"
    assert res["config"]["task_slo"] == {"conversation": {"ttft": 2500, "tpot": 2000}}
    # the six arrivals span (row 6 - row 1) / 50 seconds
    assert res["duration_s"] >= read_trace(TRACES / "AzureLLMInferenceTrace_conv.csv", 6)[0][-1] / 50


def test_bad_inputs(tmp_path):
    with pytest.raises(ValueError, match=r"nope\.csv.*TIMESTAMP, ContextTokens, GeneratedTokens"):
        make_requests(trace=tmp_path / "nope.csv", prompts=PROMPTS, task_mix="qa")
    bad = tmp_path / "bad.csv"
    bad.write_text("time,prompt,output\n1,2,3\n")
    with pytest.raises(ValueError, match=r"bad\.csv.*TIMESTAMP, ContextTokens, GeneratedTokens"):
        make_requests(trace=bad, prompts=PROMPTS, task_mix="qa")
    bad.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46.68,12,x\n")
    with pytest.raises(ValueError, match=r"bad\.csv:2"):
        read_trace(bad)
    with pytest.raises(ValueError, match="known tasks: summarization, sentiment, qa"):
        make_requests(5, task_mix="qa:1,poetry:2", prompts=PROMPTS)
    for rate in (0, -1.0):
        with pytest.raises(ValueError, match="request rate must be > 0"):
            make_requests(5, rate, prompts=PROMPTS, task_mix="qa")
    with pytest.raises(ValueError, match="burstiness"):
        make_requests(5, 1.0, 0, prompts=PROMPTS, task_mix="qa")
    with pytest.raises(ValueError, match="KEY:MS"):
        run_benchmark("http://127.0.0.1:9", _reqs(1, 0), goodput="e2e:100")
    with pytest.raises(SystemExit) as exc:
        main(["bench", "serve", "--base-url", "http://127.0.0.1:9", "--request-rate", "0"])
    assert str(exc.value.code).startswith("emoe: request rate must be > 0")
    with pytest.raises(SystemExit) as exc:
        main(["bench", "serve", "--base-url", "http://127.0.0.1:9", "--task-mix", "poetry"])
    assert "unknown task 'poetry'" in str(exc.value.code) and "conversation" in str(exc.value.code)
    with pytest.raises(SystemExit):  # argparse: a malformed per-task SLO
        main(["bench", "serve", "--base-url", "http://127.0.0.1:9", "--slo", "qa:fast:1"])
