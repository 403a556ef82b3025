"""OpenAI-compatible HTTP API over an EngineLoop (FastAPI): what `emoe serve` runs.

/v1/completions, /v1/chat/completions (SSE streaming with `data: [DONE]`, stream_options.include_usage),
/v1/models, /tokenize, /detokenize, /health, /metrics; request bodies and errors are in api.py. Extra
request fields: `task` (else extracted from the prompt when a task extractor is given) and per-request
SLOs `ttft_ms`, `tpot_ms` (else the task's defaults).
Every error is an OpenAI-style body {"error": {"message", "type", "param", "code"}}; bad input is a
4xx and never disturbs the engine loop, which runs in its own thread.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import os
import time
import uuid
from contextlib import asynccontextmanager
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .api import (MAX_N, MAX_PROMPTS, APIError, ChatRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest,
                  _Common, _error, guided, template_kwargs, template_message, token_biases)
from .datasets import TASKS
from .engine import SamplingParams
from .grammar import GrammarError
from .metrics import CONTENT_TYPE
from .scheduler import DEFAULT_SLOS
from .serving import EngineLoop, Job, QueueFull, ShuttingDown
from .reasoning import ChatAnswer
from .reasoning import parser_for as reasoning_parser
from .tools import ToolError, check_tools, forced_calls, parser_for, template_messages


def serve_threads(n: int | None) -> int:
    """Torch threads for the serving engine: by default every core available to the process. (One core was
    left to the HTTP event loop while 2 engine threads on 2 cores made requests ~3x slower than 1; the cause
    was a second OpenMP team, the loading thread's, which serving.release_openmp now frees. Since, 2 threads
    beat 1 on 2 cores with the client on them too: docs/results/serve_threads.txt.)"""
    if n is not None:
        if n < 1:
            raise ValueError(f"--threads must be >= 1, got {n}")
        return n
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def create_app(loop: EngineLoop, model_name: str, api_key: str | None = None, extractor=None,
               default_slos: dict | None = None, shutdown_grace_s: float = 30.0, tool_parser: str = "auto",
               reasoning: str = "auto") -> FastAPI:
    """default_slos: task → (ttft_ms, tpot_ms); the None key is the default for an unknown task.
    tool_parser, reasoning: how tool calls and reasoning are read out of chat answers (tools.py,
    reasoning.py; auto: by what the chat template writes)."""
    eng = loop.engine
    parser = parser_for(tool_parser, eng.codec.template)
    reasoner = reasoning_parser(reasoning, eng.codec.template)
    slos = {**DEFAULT_SLOS, **(default_slos or {})}
    known_tasks = tuple(extractor.known_tasks) if extractor is not None else \
        tuple(dict.fromkeys([*TASKS, *(t for t in slos if t)]))
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app):
        loop.start()
        yield
        # uvicorn has already waited for open connections; whatever is left gets the grace period
        await asyncio.to_thread(loop.shutdown, shutdown_grace_s)

    app = FastAPI(title="emoe", lifespan=lifespan)

    @app.exception_handler(APIError)
    async def _api_error(request, exc: APIError):
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, exc: RequestValidationError):
        errs = exc.errors()
        first = errs[0] if errs else {}
        if first.get("type") == "json_invalid":
            return _error(400, f"malformed JSON body: {first.get('ctx', {}).get('error', first.get('msg'))}",
                          "invalid_request_error")
        if first.get("loc") == ("body",) and first.get("type") in ("model_attributes_type", "dict_type"):
            return _error(400, "the request body must be a JSON object (Content-Type: application/json)",
                          "invalid_request_error")
        parts = [f"{'.'.join(str(x) for x in e.get('loc', ())[1:]) or 'body'}: {e.get('msg')}" for e in errs]
        loc = [x for x in first.get("loc", ())[1:] if isinstance(x, str)]
        return _error(400, "; ".join(parts), "invalid_request_error", loc[0] if loc else None)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request, exc: StarletteHTTPException):
        return _error(exc.status_code, str(exc.detail), "invalid_request_error" if exc.status_code < 500 else "server_error")

    @app.exception_handler(Exception)
    async def _crash(request, exc: Exception):
        return _error(500, f"internal error: {exc}", "server_error")

    async def auth(request: Request) -> None:
        if api_key is None:
            return
        got = request.headers.get("authorization", "")
        token = got[7:].strip() if got[:7].lower() == "bearer " else ""
        if not hmac.compare_digest(token.encode(), api_key.encode()):
            raise APIError(401, "invalid or missing API key (send 'Authorization: Bearer <key>')",
                           param=None, code="invalid_api_key")

    # -- the shared path of both endpoints -------------------------------------------------------
    def check_n(body: _Common) -> None:
        if not 1 <= body.n <= MAX_N or (body.n > 1 and body.stream):
            raise APIError(400, f"n must be in 1..{MAX_N}, and 1 when streaming", param="n")

    def make_job(body: _Common, prompt, task_text: str, chat: bool, sample: int = 0, tools=None,
                 forced: str | None = None) -> Job:
        """sample: which of the n answers to one prompt (a given seed is offset by it)."""
        if body.model != model_name:
            raise APIError(404, f"the model {body.model!r} does not exist; this server serves {model_name!r}",
                           param="model", code="model_not_found")

        max_tokens = getattr(body, "max_completion_tokens", None) or body.max_tokens
        explicit = max_tokens is not None
        if not explicit:
            max_tokens = eng.max_len if chat else 16  # OpenAI: completions default 16, chat up to the context
        if max_tokens <= 0:
            raise APIError(400, f"max_tokens must be at least 1, got {max_tokens}", param="max_tokens")
        temperature = 1.0 if body.temperature is None else body.temperature
        if temperature < 0:
            raise APIError(400, f"temperature must be >= 0, got {temperature}", param="temperature")
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if any(s == "" for s in stop) or len(stop) > 4:
            raise APIError(400, "stop must be up to 4 non-empty strings", param="stop")
        if body.task is not None:
            if body.task not in known_tasks:
                raise APIError(400, f"unknown task {body.task!r}; known tasks: {', '.join(known_tasks)}", param="task")
            task = body.task
        else:
            task = extractor.extract(task_text) if extractor is not None else None
        ttft_ms, tpot_ms = slos.get(task, slos[None])
        if chat:
            if body.top_logprobs is not None and not body.logprobs:
                raise APIError(400, "top_logprobs needs logprobs=true", param="top_logprobs")
            logprobs = (body.top_logprobs or 0) if body.logprobs else None
        else:
            logprobs = body.logprobs
            if body.echo and body.stream:
                raise APIError(400, "echo is supported with stream=false", param="echo")
        prompt_logprobs = logprobs if not chat and body.echo else None
        rules = guided(body)
        if forced is not None and rules is not None:
            raise APIError(400, "a forced tool call (tool_choice) and a structured-output rule cannot be combined",
                           param="tool_choice")
        rules = forced or rules
        think = reasoner.token_ids(eng.codec.tok) if chat and rules is not None and reasoner is not None else None
        try:
            given = {k: v for k in ("top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty",
                                    "repetition_penalty") if (v := getattr(body, k)) is not None}
            if body.logit_bias is not None:
                given["logit_bias"] = token_biases(body.logit_bias)
            params = SamplingParams(max_tokens=max_tokens, temperature=temperature,
                                    seed=None if body.seed is None else body.seed + sample,
                                    stop=tuple(stop), ignore_eos=body.ignore_eos, logprobs=logprobs,
                                    prompt_logprobs=prompt_logprobs, grammar=rules, think=think, **given)
        except ValueError as e:
            raise APIError(400, str(e), param=str(e).split()[0]) from None
        try:
            req = eng.make_request(prompt, params, task, chat=chat, request_id=uuid.uuid4().hex, tools=tools,
                                   template_kwargs=template_kwargs(body))
        except ValueError as e:
            code = "context_length_exceeded" if "tokens" in str(e) else None
            param = "logit_bias" if str(e).startswith("logit_bias") else "response_format" \
                if isinstance(e, GrammarError) else "messages" if chat else "prompt"
            raise APIError(400, str(e), param=param, code=code) from None
        room = eng.max_len - len(req.prompt_ids)
        if explicit and max_tokens > room:  # vLLM's rule: an explicit request that cannot fit is refused
            raise APIError(400, f"this model's maximum context length is {eng.max_len} tokens; you requested "
                           f"{len(req.prompt_ids) + max_tokens} ({len(req.prompt_ids)} in the prompt, {max_tokens} "
                           f"for the completion)", param="max_tokens", code="context_length_exceeded")
        req.params.max_tokens = min(max_tokens, room)
        return Job(req, (body.ttft_ms or ttft_ms) / 1e3, (body.tpot_ms or tpot_ms) / 1e3,
                   queue=asyncio.Queue(), aloop=asyncio.get_running_loop())

    def submit(job: Job) -> None:
        try:
            loop.submit(job)
        except QueueFull as e:
            raise APIError(429, f"server busy: {e}", "rate_limit_exceeded", code="rate_limit_exceeded") from None
        except ShuttingDown as e:
            raise APIError(503, str(e), "service_unavailable", code="shutting_down") from None

    def token_logprobs(records: list | None, chat: bool, want_top: bool, offset: int = 0) -> dict | None:
        """[(token, log-probability, top alternatives)] in OpenAI's completions or chat `logprobs` shape;
        offset: the text length before the first of them (streamed chunks)."""
        if records is None:
            return None
        text = [eng.codec.decode([t]) for t, _, _ in records]
        if chat:
            def entry(s: str, v: float) -> dict:
                return {"token": s, "logprob": v, "bytes": list(s.encode())}
            return {"content": [{**entry(s, lp), "top_logprobs": [entry(eng.codec.decode([i]), v) for i, v in top]}
                                for s, (_, lp, top) in zip(text, records)]}
        offsets = [offset]
        for s in text[:-1]:
            offsets.append(offsets[-1] + len(s))

        def by_text(top: list[tuple[int, float]] | None) -> dict | None:  # tokens decoding alike: the likelier
            if top is None:
                return None
            d: dict[str, float] = {}
            for i, v in top:
                d.setdefault(eng.codec.decode([i]), v)
            return d
        return {"tokens": text, "token_logprobs": [lp for _, lp, _ in records],
                "top_logprobs": [by_text(top) for _, _, top in records] if want_top else None,
                "text_offset": offsets}

    def answer_logprobs(job: Job, chat: bool) -> dict | None:
        """The answer's logprobs; with echo, the prompt's first (its first token has none: nothing predicts it)."""
        req = job.req
        if req.params.logprobs is None:
            return None
        records = [(t, lp, top) for t, (lp, top) in zip(req.output_ids, req.logprobs)]
        if req.params.prompt_logprobs is not None:
            records = [(req.prompt_ids[0], None, None)] + [
                (t, lp, top) for t, (lp, top) in zip(req.prompt_ids[1:], req.prompt_logprobs)] + records
        return token_logprobs(records, chat, bool(req.params.logprobs))

    def submit_all(jobs: list[Job]) -> None:
        """All or none: a refusal part-way (queue full) aborts the ones already in."""
        done = []
        try:
            for job in jobs:
                submit(job)
                done.append(job)
        except APIError:
            for job in done:
                loop.abort(job)
            raise

    def usage_of(jobs: list[Job], n: int) -> dict:
        """One prompt's tokens once however many answers it got (OpenAI's count), every answer's tokens."""
        p, c = sum(j.prompt_len for j in jobs[::n]), sum(j.generated for j in jobs)
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}

    def usage(job: Job) -> dict:
        p, c = job.prompt_len, job.generated
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}

    def end_error(job: Job, ev: tuple) -> APIError:
        if ev[0] == "error":
            return APIError(500, ev[1], "server_error")
        return APIError(503, "request aborted: the server is shutting down", "service_unavailable",
                        code="shutting_down")

    async def collect(request: Request, job: Job) -> tuple[str, tuple]:
        """Wait for the whole answer; abort when the client goes away meanwhile."""
        parts = []
        try:
            while True:
                try:
                    ev = await asyncio.wait_for(job.queue.get(), timeout=0.5)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        loop.abort(job)
                        return "".join(parts), ("done", "abort")
                    continue
                if ev[0] == "delta":
                    parts.append(ev[1])
                else:
                    return "".join(parts), ev
        finally:
            if job.finish_reason is None:
                loop.abort(job)

    async def answers(request: Request, jobs: list[Job]) -> list[tuple[Job, str, str]]:
        """Every job's whole answer and finish reason; the first that failed or was aborted is the error."""
        results = await asyncio.gather(*(collect(request, job) for job in jobs))
        for job, (_, ev) in zip(jobs, results):
            if ev[0] != "done" or ev[1] == "abort":
                raise end_error(job, ev)
        return [(job, text, ev[1]) for job, (text, ev) in zip(jobs, results)]

    def stream(job: Job, rid: str, obj: str, include_usage: bool, chunk_of):
        """SSE body. Cancelled by Starlette when the client disconnects: `finally` aborts the job."""
        def sse(d: dict) -> str:
            return f"data: {json.dumps(d, separators=(',', ':'))}\n\n"

        def frame(choice: dict | None, use=None) -> dict:
            d = {"id": rid, "object": obj, "created": int(time.time()), "model": model_name,
                 "choices": [choice] if choice is not None else []}
            if include_usage:
                d["usage"] = use
            return d

        async def gen():
            try:
                first = chunk_of(None, None, None, first=True)
                if first is not None:
                    yield sse(frame(first))
                sent = 0  # text length streamed so far: completions' logprobs give offsets into the whole answer
                while True:
                    ev = await job.queue.get()
                    if ev[0] == "delta":
                        yield sse(frame(chunk_of(ev[1], None, token_logprobs(ev[2], obj.startswith("chat"),
                                                                            bool(job.req.params.logprobs), sent))))
                        sent += len(ev[1])
                        continue
                    if ev[0] == "done" and ev[1] != "abort":
                        yield sse(frame(chunk_of(None, ev[1], None)))
                        if include_usage:
                            yield sse(frame(None, usage(job)))
                    else:
                        yield sse(end_error(job, ev).body())
                    yield "data: [DONE]\n\n"
                    return
            finally:
                if job.finish_reason is None:
                    loop.abort(job)

        return StreamingResponse(gen(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    # -- endpoints ---------------------------------------------------------------------------------
    @app.post("/v1/completions", dependencies=[Depends(auth)])
    async def completions(body: CompletionRequest, request: Request):
        # a string, token ids, or a list of either: one choice per prompt, in order
        prompts = [body.prompt] if isinstance(body.prompt, str) or (body.prompt and isinstance(body.prompt[0], int)) \
            else list(body.prompt)
        if not prompts or any(not p for p in prompts):
            raise APIError(400, "prompt is empty", param="prompt")
        if len(prompts) > MAX_PROMPTS or (len(prompts) > 1 and body.stream):
            raise APIError(400, f"up to {MAX_PROMPTS} prompts a request, and one when streaming", param="prompt")
        texts = [p if isinstance(p, str) else eng.codec.decode(p) for p in prompts]
        check_n(body)  # n answers per prompt, all checked before any runs; choice k is prompt k // n's answer k % n
        jobs = [make_job(body, p, t, chat=False, sample=i) for p, t in zip(prompts, texts) for i in range(body.n)]
        submit_all(jobs)
        rid = f"cmpl-{jobs[0].req.id}"
        if body.stream:
            def chunk(text, reason, lps, first=False):
                return None if first else {"index": 0, "text": text or "", "logprobs": lps, "finish_reason": reason}
            inc = bool(body.stream_options and body.stream_options.include_usage)
            return stream(jobs[0], rid, "text_completion", inc, chunk)
        choices = [{"index": i, "text": (texts[i // body.n] if body.echo else "") + text,
                    "logprobs": answer_logprobs(job, False), "finish_reason": reason}
                   for i, (job, text, reason) in enumerate(await answers(request, jobs))]
        return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model_name,
                "choices": choices, "usage": usage_of(jobs, body.n)}

    @app.post("/v1/chat/completions", dependencies=[Depends(auth)])
    async def chat_completions(body: ChatRequest, request: Request):
        messages = template_messages([template_message(m) for m in body.messages])
        users = [m["content"] for m in messages if m["role"] == "user"]
        check_n(body)
        try:
            tools = check_tools(body.tools, body.tool_choice, parser)
            forced = forced_calls(tools, body.tool_choice, parser)
        except ToolError as e:
            raise APIError(400, str(e), param="tools" if parser is None else "tool_choice") from None
        jobs = [make_job(body, messages, users[-1] if users else messages[-1]["content"], chat=True, sample=i,
                         tools=tools, forced=forced) for i in range(body.n)]
        submit_all(jobs)
        job = jobs[0]
        rid = f"chatcmpl-{job.req.id}"
        def shaper(j: Job) -> ChatAnswer:  # reasoning and tool calls out of the answer's text
            return ChatAnswer(reasoner, parser, tools, eng.codec.decode(j.req.prompt_ids[-8:]))
        if body.stream:
            shape = shaper(job)

            def chunk(text, reason, lps, first=False):
                if first:
                    return {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                            "finish_reason": None}
                delta, reason = shape.delta(text, reason)
                return {"index": 0, "delta": delta, "logprobs": lps, "finish_reason": reason}
            inc = bool(body.stream_options and body.stream_options.include_usage)
            return stream(job, rid, "chat.completion.chunk", inc, chunk)

        def choice(i: int, j: Job, text: str, reason: str) -> dict:
            message, reason = shaper(j).message(text, reason)
            return {"index": i, "message": message, "logprobs": answer_logprobs(j, True), "finish_reason": reason}
        choices = [choice(i, j, text, reason) for i, (j, text, reason) in enumerate(await answers(request, jobs))]
        return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model_name,
                "choices": choices, "usage": usage_of(jobs, body.n)}

    # vLLM's token endpoints: what a prompt costs in tokens, and back (the codec reads, never the engine)
    @app.post("/tokenize", dependencies=[Depends(auth)])
    async def tokenize(body: TokenizeRequest):
        if (body.prompt is None) == (body.messages is None):
            raise APIError(400, "give either prompt or messages", param="prompt")
        text = body.prompt if body.prompt is not None else eng.codec.apply_chat(
            template_messages([template_message(m) for m in body.messages]), body.tools, template_kwargs(body))
        ids = eng.codec.encode(text)
        return {"tokens": ids, "count": len(ids), "max_model_len": eng.max_len}

    @app.post("/detokenize", dependencies=[Depends(auth)])
    async def detokenize(body: DetokenizeRequest):
        if not all(0 <= t < eng.cfg.vocab_size for t in body.tokens):
            raise APIError(400, f"token ids must lie in 0..{eng.cfg.vocab_size - 1}", param="tokens")
        return {"prompt": eng.codec.decode(body.tokens)}

    @app.get("/v1/models", dependencies=[Depends(auth)])
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "emoe", "max_model_len": eng.max_len}]}

    @app.get("/health")
    async def health():
        st = loop.stats()
        ok = loop.alive and st["accepting"]
        return JSONResponse({"status": "ok" if ok else "unavailable", **st}, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def metrics():
        return Response(loop.metrics.text(), media_type=CONTENT_TYPE)

    return app
