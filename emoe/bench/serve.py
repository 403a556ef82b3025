"""`emoe bench serve`: a vLLM-style load benchmark for any OpenAI-compatible `/v1/completions` server.

Workload. Either synthetic arrivals -- Poisson (burstiness 1) or gamma with shape B and scale 1/(R*B),
so the mean inter-arrival time is 1/R and its squared coefficient of variation 1/B (B < 1 is burstier);
`request_rate=inf` sends everything at once -- or a replay of an Azure LLM inference trace (CSV with
TIMESTAMP, ContextTokens, GeneratedTokens). Replay keeps the trace's arrival offsets (relative to the
first row) divided by `time_scale` and scales its sizes to what the model serves:

* in_scale = max_prompt_tokens / p99(ContextTokens), out_scale = max_tokens / p99(GeneratedTokens) over
  the replayed rows: the trace's length range maps linearly onto the model's (the top 1% is clamped);
* max_tokens of a request = clamp(round(GeneratedTokens * out_scale), 1, max_tokens);
* its prompt is the test-split prompt of its task whose length (chars/4 as a token estimate) is closest
  to min(ContextTokens * in_scale, max_prompt_tokens), ties broken at random.

The task of a request comes from the task mix (default: uniform over TASKS; conversation for a `_conv`
trace, code for a `_code` one). Synthetic requests draw any test prompt of their task that fits.
Each request streams (SSE) and records TTFT (first chunk with text), inter-token latencies, E2E latency
and output tokens (usage.completion_tokens if sent, else content chunks). Metrics follow vLLM's
benchmark_serving; goodput counts requests/s meeting every given SLO (TTFT <= ttft, TPOT <= tpot with
TPOT = (E2E - TTFT) / (output tokens - 1)); SLO attainment is the share of *all* requests (failed ones
count as missed) meeting them, overall and per task.
"""
from __future__ import annotations

import asyncio
import csv
import json
import math
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

TRACE_COLUMNS = ("TIMESTAMP", "ContextTokens", "GeneratedTokens")
SLO_KEYS = ("ttft", "tpot")


@dataclass
class BenchRequest:
    prompt: str
    task: str
    max_tokens: int
    arrival_s: float = 0.0                     # offset from the start of the run
    prompt_tokens: int = 0                     # chars/4 estimate (the server's usage replaces it)
    trace_context_tokens: int | None = None    # the trace row it replays, if any
    trace_generated_tokens: int | None = None


@dataclass
class RequestResult:
    task: str
    success: bool = False
    status: int | None = None
    error: str = ""
    ttft_s: float = 0.0
    e2e_s: float = 0.0
    itl_s: list[float] = field(default_factory=list)
    prompt_tokens: int = 0
    output_tokens: int = 0

    @property
    def tpot_s(self) -> float:
        return (self.e2e_s - self.ttft_s) / (self.output_tokens - 1) if self.output_tokens > 1 else 0.0


def est_tokens(text: str) -> int:
    return max(1, round(len(text) / 4))


def parse_task_mix(text: str | dict | None) -> dict[str, float]:
    """'summarization:1,qa:2' (a bare task weighs 1) -> {task: weight}; None -> uniform over TASKS."""
    from ..datasets import TASKS
    if text is None:
        return {t: 1.0 for t in TASKS}
    items = text.items() if isinstance(text, dict) else \
        [(p.partition(":")[0].strip(), p.partition(":")[2].strip() or "1") for p in text.split(",") if p.strip()]
    mix = {}
    for task, w in items:
        if task not in TASKS:
            raise ValueError(f"unknown task {task!r} in task mix; known tasks: {', '.join(TASKS)}")
        try:
            mix[task] = float(w)
        except ValueError:
            raise ValueError(f"task mix weight for {task!r} must be a number, got {w!r}") from None
        if not mix[task] > 0 or math.isinf(mix[task]):
            raise ValueError(f"task mix weight for {task!r} must be a positive number, got {w!r}")
    if not mix:
        raise ValueError(f"empty task mix {text!r}; expected e.g. 'summarization:1,qa:2'")
    return mix


def parse_goodput(items: list[str] | str | None) -> dict[str, float]:
    """['ttft:500', 'tpot:50'] (milliseconds) -> {'ttft': 500.0, 'tpot': 50.0}."""
    slo = {}
    for item in items.replace(",", " ").split() if isinstance(items, str) else items or []:
        key, _, val = item.partition(":")
        if key not in SLO_KEYS:
            raise ValueError(f"bad goodput SLO {item!r}; expected KEY:MS with KEY one of {', '.join(SLO_KEYS)}")
        try:
            slo[key] = float(val)
        except ValueError:
            raise ValueError(f"bad goodput SLO {item!r}: {val!r} is not a number of milliseconds") from None
        if not slo[key] > 0:
            raise ValueError(f"bad goodput SLO {item!r}: milliseconds must be > 0")
    return slo


def _timestamp(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        dt = datetime.fromisoformat(text.strip())
    return (dt if dt.tzinfo else dt.replace(tzinfo=timezone.utc)).timestamp()


def read_trace(path: str | Path, limit: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(arrival offsets in s from the first row, ContextTokens, GeneratedTokens) of the first `limit` rows."""
    expect = f"expected a CSV with columns {', '.join(TRACE_COLUMNS)}"
    ts, ctx, gen = [], [], []
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = csv.reader(f)
            header = [h.strip() for h in next(rows, [])]
            if any(c not in header for c in TRACE_COLUMNS):
                raise ValueError(f"trace {path}: {expect}; found {', '.join(header) or 'nothing'}")
            idx = [header.index(c) for c in TRACE_COLUMNS]
            for n, row in enumerate(rows, 2):
                if limit is not None and len(ts) >= limit:
                    break
                if not any(x.strip() for x in row):
                    continue
                try:
                    t, c, g = (row[i] for i in idx)
                    ts.append(_timestamp(t))
                    ctx.append(int(c))
                    gen.append(int(g))
                except (IndexError, ValueError) as e:
                    raise ValueError(f"trace {path}:{n}: cannot parse row {row} ({e}); {expect}") from None
                if ctx[-1] < 0 or gen[-1] < 0:
                    raise ValueError(f"trace {path}:{n}: negative token count in {row}")
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read trace {path}: {e}; {expect}") from None
    if not ts:
        raise ValueError(f"trace {path} has no rows; {expect}")
    t = np.asarray(ts)
    return t - t[0], np.asarray(ctx), np.asarray(gen)


def load_prompts(tasks) -> dict[str, list[str]]:
    from ..datasets import load_split
    return {t: [e.prompt for e in load_split("test", t)] for t in tasks}


def make_requests(num_requests: int | None = None, request_rate: float = math.inf, burstiness: float = 1.0,
                  trace: str | Path | None = None, time_scale: float = 1.0, task_mix=None,
                  max_tokens: int = 64, max_prompt_tokens: int = 400, seed: int = 0,
                  prompts: dict[str, list[str]] | None = None) -> list[BenchRequest]:
    """The workload, arrival offsets included (see the module docstring). `prompts` ({task: [text]})
    replaces the test split. Without a trace, `num_requests` defaults to 100; with one, to all rows."""
    if not request_rate > 0:
        raise ValueError(f"request rate must be > 0 (or inf), got {request_rate}")
    for name, v in (("burstiness", burstiness), ("time scale", time_scale)):
        if not 0 < v < math.inf:
            raise ValueError(f"{name} must be a positive number, got {v}")
    for name, v in (("num requests", num_requests), ("max tokens", max_tokens),
                    ("max prompt tokens", max_prompt_tokens)):
        if v is not None and v < 1:
            raise ValueError(f"{name} must be >= 1, got {v}")
    if task_mix is None and trace is not None:
        name = Path(trace).stem.lower()
        task_mix = "conversation" if "_conv" in name else "code" if "_code" in name else None
    mix = parse_task_mix(task_mix)
    rng = np.random.default_rng(seed)
    prompts = prompts if prompts is not None else load_prompts(mix)
    pools = {}
    for t in mix:
        texts = sorted(prompts.get(t) or [], key=est_tokens)
        if not texts:
            raise ValueError(f"no prompts for task {t!r}")
        pools[t] = (texts, np.array([est_tokens(p) for p in texts]))
    if trace is not None:
        offsets, ctx, gen = read_trace(trace, num_requests)
        offsets, n = offsets / time_scale, len(offsets)
        in_scale = max_prompt_tokens / max(float(np.percentile(ctx, 99)), 1.0)
        out_scale = max_tokens / max(float(np.percentile(gen, 99)), 1.0)
        outs = np.clip(np.round(gen * out_scale), 1, max_tokens).astype(int)
    else:
        n = num_requests or 100
        gaps = np.zeros(n) if math.isinf(request_rate) else rng.gamma(burstiness, 1.0 / (request_rate * burstiness), n)
        offsets = np.concatenate([[0.0], np.cumsum(gaps[:-1])])
        outs = np.full(n, max_tokens)
    names = list(mix)
    weights = np.array([mix[t] for t in names])
    tasks = rng.choice(len(names), size=n, p=weights / weights.sum())
    out = []
    for i in range(n):
        task = names[tasks[i]]
        texts, ests = pools[task]
        if trace is not None:
            target = min(ctx[i] * in_scale, max_prompt_tokens)
            j = int(np.searchsorted(ests, target))
            near = [k for k in (j - 1, j) if 0 <= k < len(ests)]
            best = ests[min(near, key=lambda k: abs(ests[k] - target))]
            lo, hi = np.searchsorted(ests, best, "left"), np.searchsorted(ests, best, "right")
            prompt = texts[int(rng.integers(lo, hi))]
        else:
            fit = max(1, int(np.searchsorted(ests, max_prompt_tokens, "right")))
            prompt = texts[int(rng.integers(0, fit))]
        out.append(BenchRequest(prompt, task, int(outs[i]), float(offsets[i]), est_tokens(prompt),
                                int(ctx[i]) if trace is not None else None,
                                int(gen[i]) if trace is not None else None))
    return out


def _error_text(body: str) -> str:
    try:
        err = json.loads(body)
        err = err.get("error", err) if isinstance(err, dict) else err
        msg = err.get("message") or err.get("detail") if isinstance(err, dict) else None
        return str(msg or err)[:300]
    except (ValueError, AttributeError):
        return body.strip()[:300] or "empty error body"


async def _stream(client, url: str, body: dict, headers: dict, res: RequestResult, t0: float) -> None:
    async with client.stream("POST", url, json=body, headers=headers) as resp:
        res.status = resp.status_code
        if resp.status_code >= 400:
            res.error = f"HTTP {resp.status_code}: {_error_text((await resp.aread()).decode(errors='replace'))}"
            return
        last, chunks, usage, done = None, 0, None, False
        async for line in resp.aiter_lines():
            line = line.strip()
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if done := data == "[DONE]":
                break
            now = time.perf_counter()
            obj = json.loads(data)
            if obj.get("error"):
                res.error = f"stream error: {_error_text(data)}"
                return
            text = "".join((c.get("text") or (c.get("delta") or {}).get("content") or "")
                           for c in obj.get("choices") or [])
            if text:
                if last is None:
                    res.ttft_s = now - t0
                else:
                    res.itl_s.append(now - last)
                last, chunks = now, chunks + 1
            usage = obj.get("usage") or usage
        res.e2e_s = time.perf_counter() - t0
        if not done:
            res.error = "stream ended before data: [DONE]"
            return
        if last is None:  # an empty completion: the first "token" is the end of the stream
            res.ttft_s = res.e2e_s
        res.output_tokens = int((usage or {}).get("completion_tokens") or chunks)
        res.prompt_tokens = int((usage or {}).get("prompt_tokens") or res.prompt_tokens)
        res.success = True


def slo_for(task: str, slo: dict, task_slo: dict | None) -> dict:
    """The SLO a request of `task` is sent with and judged by: the global one, overridden per task."""
    return {**slo, **((task_slo or {}).get(task) or {})}


async def _send(client, url, model, req: BenchRequest, slo, headers, timeout, sem) -> RequestResult:
    body = {"model": model, "prompt": req.prompt, "max_tokens": req.max_tokens, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}, "task": req.task}
    if req.trace_generated_tokens is not None:  # a trace row's output length is the load to replay
        body["ignore_eos"] = True
    body.update({f"{k}_ms": v for k, v in slo.items()})
    res = RequestResult(req.task, prompt_tokens=req.prompt_tokens)
    async with sem:
        t0 = time.perf_counter()
        try:
            await asyncio.wait_for(_stream(client, url, body, headers, res, t0), timeout)
        except asyncio.TimeoutError:
            res.error = f"timed out after {timeout:g} s"
        except Exception as e:  # noqa: BLE001 -- any transport/protocol failure is a failed request
            res.error = f"{type(e).__name__}: {e}"[:300]
    return res


async def _served_model(client, base: str, headers: dict) -> str:
    try:
        r = await client.get(base + "/v1/models", headers=headers)
        r.raise_for_status()
        return r.json()["data"][0]["id"]
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"cannot list models at {base}/v1/models ({type(e).__name__}: {e}); pass --model") from None


async def arun_benchmark(base_url: str, requests: list[BenchRequest], model: str | None = None,
                         goodput: dict | None = None, api_key: str | None = None, timeout: float = 300.0,
                         max_concurrency: int | None = None, task_slo: dict | None = None) -> dict:
    import httpx
    if not requests:
        raise ValueError("no requests to send")
    if not timeout > 0:
        raise ValueError(f"timeout must be > 0 s, got {timeout}")
    slo = parse_goodput(goodput) if not isinstance(goodput, dict) else dict(goodput)
    base = base_url.rstrip("/").removesuffix("/v1")
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    sem = asyncio.Semaphore(max_concurrency or len(requests))
    async with httpx.AsyncClient(timeout=httpx.Timeout(timeout),
                                 limits=httpx.Limits(max_connections=max_concurrency)) as client:
        model = model or await _served_model(client, base, headers)
        tasks, start = [], time.perf_counter()
        for req in sorted(requests, key=lambda r: r.arrival_s):
            delay = start + req.arrival_s - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(
                _send(client, base + "/v1/completions", model, req, slo_for(req.task, slo, task_slo), headers,
                      timeout, sem)))
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
    return {**summarize(results, duration, slo, task_slo), "model": model}


def run_benchmark(base_url: str, requests: list[BenchRequest], **kw) -> dict:
    """Send `requests` at their arrival offsets to `base_url` and return the metrics dict (see summarize).
    Keywords: model (default: the first of /v1/models), goodput ({'ttft': ms, 'tpot': ms} or
    'ttft:MS tpot:MS'), task_slo ({task: {'ttft': ms, 'tpot': ms}}, overriding goodput per task), api_key,
    timeout (s per request), max_concurrency."""
    return asyncio.run(arun_benchmark(base_url, requests, **kw))


def _stats(xs) -> dict:
    if not len(xs):
        return {"mean": None, "median": None, "p99": None, "std": None}
    a = np.asarray(xs, dtype=float)
    return {"mean": float(a.mean()), "median": float(np.median(a)), "p99": float(np.percentile(a, 99)),
            "std": float(a.std())}


def summarize(results: list[RequestResult], duration_s: float, slo: dict | None = None,
              task_slo: dict | None = None) -> dict:
    """vLLM benchmark_serving metrics; latency stats in ms over successful requests (None when none).
    Each request is judged by slo_for(its task)."""
    slo, task_slo = slo or {}, task_slo or {}
    ok = [r for r in results if r.success]
    dur = max(duration_s, 1e-9)

    def meets(r: RequestResult) -> bool:
        s = slo_for(r.task, slo, task_slo)
        return r.success and r.ttft_s * 1e3 <= s.get("ttft", math.inf) and r.tpot_s * 1e3 <= s.get("tpot", math.inf)

    tasks = sorted({r.task for r in results})
    per_task = {t: [r for r in results if r.task == t] for t in tasks}
    inp, outp = sum(r.prompt_tokens for r in ok), sum(r.output_tokens for r in ok)
    good = sum(map(meets, results))
    return {
        "num_requests": len(results), "completed": len(ok), "failed": len(results) - len(ok),
        "duration_s": duration_s, "total_input_tokens": inp, "total_output_tokens": outp,
        "request_throughput": len(ok) / dur, "output_token_throughput": outp / dur,
        "total_token_throughput": (inp + outp) / dur, "goodput": good / dur if slo or task_slo else None,
        "ttft_ms": _stats([r.ttft_s * 1e3 for r in ok]),
        "tpot_ms": _stats([r.tpot_s * 1e3 for r in ok if r.output_tokens > 1]),
        "itl_ms": _stats([x * 1e3 for r in ok for x in r.itl_s]),
        "e2e_ms": _stats([r.e2e_s * 1e3 for r in ok]),
        "slo": slo or None, "task_slo": task_slo or None,
        "slo_attainment": {"overall": good / len(results),
                           "per_task": {t: sum(map(meets, rs)) / len(rs) for t, rs in per_task.items()}}
        if (slo or task_slo) and results else None,
        "per_task": {t: {"requests": len(rs), "completed": sum(r.success for r in rs),
                         "mean_ttft_ms": _stats([r.ttft_s * 1e3 for r in rs if r.success])["mean"],
                         "mean_e2e_ms": _stats([r.e2e_s * 1e3 for r in rs if r.success])["mean"]}
                     for t, rs in per_task.items()},
        "errors": dict(Counter(r.error for r in results if not r.success).most_common(10)),
    }


def format_table(res: dict) -> str:
    def num(v):
        return "-" if v is None else f"{v:.2f}"

    def row(label, v):
        return f"{label:<40} {v}"

    lines = [f"{' Serving Benchmark Result ':=^50}", row("Successful requests:", res["completed"]),
             row("Failed requests:", res["failed"]), row("Benchmark duration (s):", num(res["duration_s"])),
             row("Total input tokens:", res["total_input_tokens"]),
             row("Total generated tokens:", res["total_output_tokens"]),
             row("Request throughput (req/s):", num(res["request_throughput"])),
             row("Request goodput (req/s):", num(res["goodput"])),
             row("Output token throughput (tok/s):", num(res["output_token_throughput"])),
             row("Total Token throughput (tok/s):", num(res["total_token_throughput"]))]
    for key, name, title in (("ttft", "TTFT", "Time to First Token"),
                             ("tpot", "TPOT", "Time per Output Token (excl. 1st token)"),
                             ("itl", "ITL", "Inter-token Latency"), ("e2e", "E2EL", "End-to-end Latency")):
        lines += [f"{title:-^50}"] + [row(f"{label} {name} (ms):", num(res[f"{key}_ms"][s]))
                                      for label, s in (("Mean", "mean"), ("Median", "median"), ("P99", "p99"))]
    att, slo = res.get("slo_attainment"), ", ".join(f"{k}<={v:g}ms" for k, v in (res.get("slo") or {}).items())
    slo += (" + " if slo else "") + "; ".join(f"{t}: " + ", ".join(f"{k}<={v:g}ms" for k, v in d.items())
                                              for t, d in (res.get("task_slo") or {}).items())
    lines.append(f"{' SLO attainment (' + (slo or 'no SLO given') + ') ':-^50}")
    lines += [row("Overall:", f"{att['overall']:.1%}")] if att else []
    lines += [row(f"{t} ({pt['completed']}/{pt['requests']} ok):", f"{att['per_task'][t]:.1%}" if att else "-")
              for t, pt in res.get("per_task", {}).items()]
    lines += [f"error x{n}: {err}" for err, n in res.get("errors", {}).items()] + ["=" * 50]
    return "\n".join(lines)


def save_json(res: dict, path: str | Path, config: dict) -> None:
    cfg = {k: "inf" if isinstance(v, float) and math.isinf(v) else v for k, v in config.items()}
    Path(path).write_text(json.dumps({**res, "config": cfg}, indent=1))
