"""The serving loop: one background thread owns the Engine and batches at iteration level.

Torch work never runs on the asyncio event loop: the HTTP side only `submit`s jobs and reads their
asyncio.Queue, which the loop thread feeds through `loop.call_soon_threadsafe`. Each iteration:

    aborts → scheduler.select(waiting, running, free slots) → engine.admit(batch) → engine.step()

`engine.admit` runs the residency policy's plan (the eMoE loader) on every scheduling decision, so
the resident experts follow the batch's task mix. The loop measures what the scheduler assumes --
decode step cost a + c·n (fitted over the batch sizes seen), per-prompt-token prefill cost and expert
load latency (moving averages) -- and per request TTFT, inter-token latency, E2E and queue time for
the metrics.

Events a job receives, in order: ("delta", text, logprobs)* then ("done", finish_reason) — or ("error", message);
logprobs is None unless the request asked for them, else [(token, log-probability, top alternatives)] of the
tokens since the last delta
when the engine failed on it. finish_reason is "stop", "length" or "abort" (client gone / shutdown).
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time
import traceback
from dataclasses import dataclass, field

from .engine import Engine, Request
from .loader import demands_of
from .metrics import Metrics
from .scheduler import Scheduler, SchedContext, fit_step_cost, make_scheduler
from .tokenizer import StreamDecoder

log = logging.getLogger("emoe.serving")


def release_openmp() -> bool:
    """Free the calling thread's OpenMP workers (made by the torch ops that loaded the model), so that the
    engine thread's are the only ones on the cores: with two teams libgomp stops spin-waiting and every torch
    op waits for sleeping workers (the server decoded at 0.32x Engine.generate's speed; bench_engine_loop.py).
    False where the runtime lacks omp_pause_resource_all."""
    import ctypes
    import glob
    import os

    import torch
    for lib in sorted(glob.glob(os.path.join(os.path.dirname(torch.__file__), "lib", "lib*omp*.so*"))):
        try:
            pause = ctypes.CDLL(lib).omp_pause_resource_all
        except (OSError, AttributeError):
            continue
        pause.argtypes, pause.restype = [ctypes.c_int], ctypes.c_int
        return pause(2) == 0  # omp_pause_hard: this thread's team exits; a later parallel region makes a new one
    return False


class QueueFull(RuntimeError):
    """The waiting list is at max_waiting (HTTP 429)."""


class ShuttingDown(RuntimeError):
    """The loop no longer accepts work (HTTP 503)."""


@dataclass(eq=False)
class Job:
    """An engine Request plus what serving needs: SLOs, timing, and the channel back to the client."""
    req: Request
    ttft_slo_s: float = 2.0
    tpot_slo_s: float = 0.2
    arrival: float = field(default_factory=time.perf_counter)
    queue: asyncio.Queue | None = None             # events for the HTTP handler
    aloop: asyncio.AbstractEventLoop | None = None  # the loop owning `queue`
    admitted_at: float | None = None
    first_token_at: float | None = None
    last_token_at: float | None = None
    finished_at: float | None = None
    finish_reason: str | None = None
    error: str | None = None
    text_sent: str = ""
    n_seen: int = 0                                 # output tokens already accounted
    lp_sent: int = 0                                # output tokens whose logprobs went out with a delta
    detok: StreamDecoder | None = None              # the output's text, decoded a few ids a step
    events: list = field(default_factory=list)      # used when there is no asyncio queue (tests)
    done: threading.Event = field(default_factory=threading.Event)

    # -- what schedulers read ----------------------------------------------------------------------
    @property
    def task(self) -> str | None:
        return self.req.task

    @property
    def prompt_len(self) -> int:
        return len(self.req.prompt_ids)

    @property
    def generated(self) -> int:
        return len(self.req.output_ids)

    @property
    def max_tokens(self) -> int:
        return self.req.params.max_tokens

    @property
    def engine_request(self) -> Request:
        return self.req

    def push(self, event: tuple) -> None:
        if self.queue is None or self.aloop is None:
            self.events.append(event)
            return
        try:
            self.aloop.call_soon_threadsafe(self.queue.put_nowait, event)
        except RuntimeError:  # the client's event loop is gone (server stopped): nobody is listening
            pass


def _snapshot(obj) -> dict:
    """Shallow state of a residency policy, containers copied, so a dry-run plan can be undone."""
    return {k: (v.copy() if isinstance(v, (dict, list, set)) else v) for k, v in vars(obj).items()}


def _restore(obj, state: dict) -> None:
    for k in [k for k in vars(obj) if k not in state]:
        delattr(obj, k)
    for k, v in state.items():
        setattr(obj, k, v)


class EngineLoop:
    def __init__(self, engine: Engine, scheduler: str | Scheduler = "fcfs", profile=None,
                 max_waiting: int = 256, token_budget: int = 2048, metrics: Metrics | None = None,
                 ema: float = 0.2, interleave: bool = True):
        """interleave: admitted prompts are prefilled a chunk per engine step, between decode steps, so a
        long prompt delays running requests by one chunk at a time, not by its whole prefill."""
        if max_waiting < 1 or token_budget < 1:
            raise ValueError("max_waiting and token_budget must be >= 1")
        self.engine = engine
        self.scheduler = make_scheduler(scheduler) if isinstance(scheduler, str) else scheduler
        self.metrics = metrics or Metrics()
        self.max_waiting, self.ema, self.interleave = max_waiting, ema, interleave
        cost = profile.token_cost_s if profile is not None else {}
        self.ctx = SchedContext(out_len=dict(profile.out_len) if profile is not None else {},
                                token_budget=token_budget)
        self.ctx.token_cost_s = cost.get("decode", self.ctx.token_cost_s)
        self.ctx.prefill_cost_s = cost.get("prefill", self.ctx.prefill_cost_s)
        # ΔE only exists when a residency policy re-plans at admission; without one nothing is loaded
        self.load_latency_s = profile.load_latency_s if profile is not None else 0.0
        if engine.residency is not None:
            self.ctx.delta_e = self._delta_e
        self._memo: dict = {}
        self._steps: dict[int, tuple[float, int]] = {}  # batch size → (EMA step seconds, samples)
        self._waiting: list[Job] = []
        self._running: list[Job] = []
        self._aborts: list[Job] = []
        self._cv = threading.Condition()
        self.accepting = True
        self._stop_at: float | None = None
        self._thread: threading.Thread | None = None
        self.errors = 0

    # -- called from the HTTP side ---------------------------------------------------------------
    def start(self) -> "EngineLoop":
        if self._thread is None:
            release_openmp()  # the engine thread's team alone on the CPUs
            self._thread = threading.Thread(target=self._run, name="emoe-engine", daemon=True)
            self._thread.start()
        return self

    def submit(self, job: Job) -> None:
        with self._cv:
            if not self.accepting:
                raise ShuttingDown("the server is shutting down")
            if len(self._waiting) >= self.max_waiting:
                raise QueueFull(f"{len(self._waiting)} requests are already waiting (max_waiting {self.max_waiting})")
            self._waiting.append(job)
            self._cv.notify()

    def abort(self, job: Job) -> None:
        """Client gone: drop it from the queue, or have the loop thread abort it in the engine."""
        with self._cv:
            if job in self._waiting:
                self._waiting.remove(job)
                self._finalize(job, "abort")
            elif job.finish_reason is None:
                self._aborts.append(job)
                self._cv.notify()

    def stop_accepting(self) -> None:
        """New submissions get ShuttingDown (503); accepted work goes on (first half of a shutdown)."""
        with self._cv:
            self.accepting = False

    def shutdown(self, grace_s: float = 30.0) -> None:
        """Stop accepting; serve what was accepted for up to grace_s, then abort the rest; join."""
        with self._cv:
            self.accepting = False
            stop_at = time.perf_counter() + max(0.0, grace_s)
            self._stop_at = stop_at if self._stop_at is None else min(self._stop_at, stop_at)
            self._cv.notify()
        if self._thread is not None:
            self._thread.join(grace_s + 30)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stats(self) -> dict:
        with self._cv:
            return {"running": len(self._running), "waiting": len(self._waiting),
                    "free_slots": len(self.engine.free_slots), "accepting": self.accepting,
                    "late_admissions": self.scheduler.late_admissions, "errors": self.errors,
                    "token_cost_s": self.ctx.token_cost_s, "step_base_s": self.ctx.step_base_s,
                    "prefill_cost_s": self.ctx.prefill_cost_s}

    # -- the loop thread ---------------------------------------------------------------------------
    def _run(self) -> None:
        eng = self.engine
        while True:
            with self._cv:
                aborts, self._aborts = self._aborts, []
                if self._stop_at is not None and time.perf_counter() > self._stop_at:
                    for j in self._waiting:  # grace is over: abort whatever is left
                        self._finalize(j, "abort")
                    self._waiting.clear()
                    aborts += self._running
                if self._stop_at is not None and not self._waiting and not self._running and not aborts:
                    break
                if not self._waiting and not self._running and not aborts:
                    self._sync_metrics()
                    self._cv.wait(0.1)
                    continue
                waiting = list(self._waiting)
            for j in aborts:
                if j in self._running:
                    eng.abort(j.req)
                    self._running.remove(j)
                    self._finalize(j, "abort")
            if waiting and eng.room():
                self._admit(waiting)
            if eng.running or eng.prefilling:
                self._step()
            self._sync_metrics()

    def _sync_metrics(self) -> None:
        self.metrics.sync_engine(self.engine, len(self._running), len(self._waiting))
        self.metrics.sync_scheduler(self.scheduler, self.ctx)

    def _admit(self, waiting: list[Job]) -> None:
        eng = self.engine
        now = time.perf_counter()
        try:
            picked = self.scheduler.select(waiting, list(self._running), eng.room(), now, self.ctx)
        except Exception as e:  # noqa: BLE001 — fail these requests rather than hang them behind a dead loop
            with self._cv:
                failed = [j for j in waiting if j in self._waiting]
                for j in failed:
                    self._waiting.remove(j)
            self._fail(failed, e)
            return
        with self._cv:  # a job may have been aborted from the queue since the snapshot
            batch = [j for j in picked if j in self._waiting][: eng.room()]
            for j in batch:
                self._waiting.remove(j)
        if not batch:
            return
        st, ld = eng.cache.stats, eng.loader.stats
        bytes0, lsec0, plan0 = st.bytes_loaded, st.load_seconds, ld.seconds
        t0 = time.perf_counter()
        for j in batch:
            j.admitted_at = t0
            self.metrics.queue.observe(t0 - j.arrival)
            self.metrics.prompt_tokens.inc(j.prompt_len)
        try:
            eng.admit([j.req for j in batch], complete=not self.interleave)
        except Exception as e:  # noqa: BLE001 — a failed batch must not take the server down
            self._fail(batch, e)
            return
        t1 = time.perf_counter()
        if not self.interleave:
            n_tok = sum(j.prompt_len for j in batch)
            self._update("prefill_cost_s", (t1 - t0 - (ld.seconds - plan0)) / max(n_tok, 1))
        if st.bytes_loaded > bytes0:  # per full expert's bytes: shadow copies move fractions of one
            per = (st.load_seconds - lsec0) / (st.bytes_loaded - bytes0) * eng.cache.expert_bytes
            self.load_latency_s = per if self.load_latency_s == 0 else \
                (1 - self.ema) * self.load_latency_s + self.ema * per
        self._running.extend(batch)
        if not self.interleave:
            self._emit(batch, t1)

    def _step(self) -> None:
        eng = self.engine
        rows = [j for j in self._running if j.req.finish_reason is None]
        before = [len(j.req.output_ids) for j in rows]
        decoding = len(eng.running)
        t0 = time.perf_counter()
        try:
            eng.step()
        except Exception as e:  # noqa: BLE001
            self._fail(rows, e)
            return
        t1 = time.perf_counter()
        n_pre, s_pre = eng.last_prefill
        if n_pre:
            self._update("prefill_cost_s", s_pre / n_pre)
        self._observe_step(decoding, t1 - t0 - s_pre)
        # the jobs that got a token: every decoding one, and those whose prefill ended this step
        self._emit([j for j, n in zip(rows, before) if len(j.req.output_ids) != n or j.req.finish_reason], t1)

    def _observe_step(self, n: int, secs: float) -> None:
        """Each batch size keeps an EMA of its step times (and a capped count, so the fit follows the
        machine); a and c are refitted from them after every step."""
        if n < 1 or secs <= 0:
            return
        t, k = self._steps.get(n, (secs, 0))
        self._steps[n] = ((1 - self.ema) * t + self.ema * secs if k else secs, min(k + 1, 50))
        self.ctx.step_base_s, self.ctx.token_cost_s = fit_step_cost(self._steps)

    def _update(self, name: str, value: float) -> None:
        if value > 0:
            setattr(self.ctx, name, (1 - self.ema) * getattr(self.ctx, name) + self.ema * value)

    def _emit(self, jobs: list[Job], t: float) -> None:
        """Each of `jobs` just had one token sampled (EOS included, though the engine drops it)."""
        m, codec = self.metrics, self.engine.codec
        for j in jobs:
            if j.first_token_at is None:
                j.first_token_at = t
                m.ttft.observe(t - j.arrival)
            else:
                m.itl.observe(t - j.last_token_at)
            j.last_token_at = t
            new = j.generated - j.n_seen
            if new > 0:
                m.generation_tokens.inc(new)
                j.n_seen = j.generated
            if j.req.finish_reason is not None:
                self._running.remove(j)
                self._finalize(j, j.req.finish_reason)
                continue
            if new > 0:
                j.detok = j.detok or StreamDecoder(codec.decode)
                text = j.detok.add(j.req.output_ids)
                # hold back what could still become a stop string, and half-decoded UTF-8
                end = len(text) - max((len(s) for s in j.req.params.stop), default=1) + 1
                while end > 0 and text[end - 1] == "\ufffd":
                    end -= 1
                if end > len(j.text_sent) and text.startswith(j.text_sent):
                    j.push(("delta", text[len(j.text_sent):end], self._logprobs(j)))
                    j.text_sent = text[:end]

    @staticmethod
    def _logprobs(j: Job) -> list | None:
        """The logprobs of the tokens sampled since the last delta (None when the request asked for none)."""
        if j.req.params.logprobs is None:
            return None
        n = len(j.req.output_ids)
        out = [(t, lp, top) for t, (lp, top) in zip(j.req.output_ids[j.lp_sent:n], j.req.logprobs[j.lp_sent:n])]
        j.lp_sent = n
        return out

    def _finalize(self, j: Job, reason: str) -> None:
        j.finish_reason, j.finished_at = reason, time.perf_counter()
        m = self.metrics
        m.finished(reason)
        if reason != "abort":
            m.e2e.observe(j.finished_at - j.arrival)
            full = self.engine.text(j.req)
            rest, lps = full[len(j.text_sent):] if full.startswith(j.text_sent) else "", self._logprobs(j)
            if rest or lps:
                j.push(("delta", rest, lps))
                j.text_sent += rest
            m.slo(j.task, self.slo_met(j))
        j.push(("done", reason))
        j.done.set()

    @staticmethod
    def slo_met(j: Job) -> bool:
        if j.first_token_at is None:
            return False
        n = j.generated
        tpot = (j.last_token_at - j.first_token_at) / (n - 1) if n > 1 else 0.0
        return j.first_token_at - j.arrival <= j.ttft_slo_s and tpot <= j.tpot_slo_s

    def _fail(self, jobs: list[Job], exc: Exception) -> None:
        self.errors += 1
        log.error("engine failed on %d request(s): %s\n%s", len(jobs), exc, traceback.format_exc())
        for j in jobs:
            if j.req.finish_reason is None and j.req.slot >= 0:
                self.engine.abort(j.req)  # frees its KV slot even if it never joined the batch
            if j in self._running:
                self._running.remove(j)
            j.error, j.finish_reason, j.finished_at = f"engine error: {exc}", "error", time.perf_counter()
            self.metrics.finished("error")
            j.push(("error", j.error))
            j.done.set()

    # -- ΔE for the task-aware scheduler -------------------------------------------------------------
    def _delta_e(self, reqs: list[Request]) -> float:
        """Seconds of expert loading if `reqs` were the batch: the residency plan is computed on a
        snapshot of the policy's state (planning has side effects, e.g. eMoE's per-task prompt counts)
        and never applied; bytes it would bring in (in full experts) × measured per-expert load latency."""
        eng, res = self.engine, self.engine.residency
        st = eng.cache.stats
        key = (tuple(sorted((d.task, d.input_tokens, d.requests) for d in demands_of(reqs))),
               sum(1 for r in reqs if r.slot < 0), st.loads, st.evictions)
        if key not in self._memo:
            state = _snapshot(res)
            try:
                plan = res.plan(reqs, eng.cache)
            finally:
                _restore(res, state)
            missing = eng.cache.incoming_bytes(plan) / eng.cache.expert_bytes if plan else 0.0
            if len(self._memo) > 512:
                self._memo.clear()
            self._memo[key] = missing
        return self._memo[key] * self.load_latency_s
