"""Admission schedulers for the serving loop: which waiting requests join the running batch now.

One interface, chosen by name (`make_scheduler`): `fcfs`, `sjf`, `task-aware`.

    select(waiting, running, free_slots, now, ctx) -> list of waiting jobs to admit now, in order

Jobs are duck-typed (serving.Job is the real one): `task`, `prompt_len`, `generated`, `max_tokens`,
`arrival`, `ttft_slo_s`, `tpot_slo_s`, `first_token_at` (None before the first token), plus
`engine_request` (what residency plans look at). `ctx` (SchedContext) carries what the scheduler
may assume about costs; the engine loop keeps it current.

Every scheduler admits at most `free_slots` jobs and at most `ctx.token_budget` prompt tokens per
step, except that the first job of a step is always allowed (a prompt longer than the budget would
otherwise never run).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

# (ttft_ms, tpot_ms) per task: short answers (sentiment, comparison, qa) get tight TTFTs, long
# prompts (summarization) and long answers (conversation, code) looser ones. None = unknown task.
DEFAULT_SLOS: dict[str | None, tuple[float, float]] = {
    "sentiment": (1000.0, 200.0), "comparison": (1000.0, 200.0), "qa": (1500.0, 200.0),
    "summarization": (3000.0, 200.0), "conversation": (2000.0, 200.0), "code": (2000.0, 200.0),
    None: (2000.0, 200.0),
}


def check_slo_tasks(slos: dict, known) -> None:
    """--slo tasks must be ones the server knows (the profile's, else the shipped six), or default."""
    bad = [t for t in slos if t is not None and t not in known]
    if bad:
        raise ValueError(f"unknown task {bad[0]!r} in --slo; known: default, {', '.join(known)}")


def parse_slo(text: str) -> tuple[str | None, tuple[float, float]]:
    """'TASK:TTFT_MS:TPOT_MS' (TASK 'default' = requests of no known task) → (task, (ttft, tpot)). Which task names
    exist is known only once a profile is loaded (a user's own tasks: datasets.use): check_slo_tasks."""
    from .datasets import TASKS
    parts = text.split(":")
    if len(parts) != 3:
        raise ValueError(f"SLO {text!r} must be TASK:TTFT_MS:TPOT_MS, e.g. qa:1000:150")
    task, *vals = parts
    if not task:
        raise ValueError(f"SLO {text!r} names no task; known: default, {', '.join(TASKS)}")
    try:
        ttft, tpot = (float(v) for v in vals)
    except ValueError:
        raise ValueError(f"SLO {text!r}: TTFT and TPOT must be milliseconds") from None
    if not (0 < ttft < math.inf and 0 < tpot < math.inf):
        raise ValueError(f"SLO {text!r}: TTFT and TPOT must be positive milliseconds")
    return (None if task == "default" else task), (ttft, tpot)


DEFAULT_OUT_LEN = 64.0
G_RESET = 0.05  # paper: when a request outlives its task's mean length, expect 5% of it more


@dataclass(slots=True)
class SchedContext:
    out_len: dict[str, float] = field(default_factory=dict)  # task → profiled mean output tokens
    default_out_len: float = DEFAULT_OUT_LEN                 # unknown task, or no profile
    token_cost_s: float = 0.02      # c: marginal seconds per running request in a decode step (online fit)
    step_base_s: float = 0.0        # a: seconds per decode step whatever the batch (online fit); batched
                                    # hardware reads all weights once per step, so a step costs a + c·n
    prefill_cost_s: float = 0.002   # seconds per prompt token (online EMA); Eq. 3's W·c uses this
    token_budget: int = 2048        # max prompt (prefill) tokens admitted per step
    # ΔE: seconds of expert loading that admitting `candidates` (engine requests) next to the running
    # ones would cause. None = no residency policy: nothing is loaded at admission.
    delta_e: Callable[[list], float] | None = None

    def expected_out(self, job) -> float:
        """Expected output tokens: the task's profiled mean, capped by the job's max_tokens."""
        mean = self.out_len.get(job.task, self.default_out_len) if job.task else self.default_out_len
        return max(1.0, min(float(job.max_tokens), mean if mean > 0 else self.default_out_len))

    def remaining(self, job) -> float:
        """G: tokens the job still has to generate. Start value G0 = expected_out; decremented per
        generated token; when it reaches 0 before the job ends, it resets to 5% of G0 (and again each
        time that runs out) — the paper's rule. Never more than max_tokens allows."""
        g0 = self.expected_out(job)
        left = g0 - job.generated
        if left <= 0:
            chunk = max(1.0, G_RESET * g0)
            left = chunk - math.fmod(-left, chunk)
        return max(0.0, min(left, float(job.max_tokens - job.generated)))

    def step_s(self, n: int) -> float:
        """Expected seconds of one decode step with n running requests."""
        return self.step_base_s + self.token_cost_s * n

    def loading(self, candidates: list) -> float:
        return self.delta_e(candidates) if self.delta_e is not None and candidates else 0.0


def fit_step_cost(samples: dict[int, tuple[float, int]]) -> tuple[float, float]:
    """{batch size n: (mean step seconds, weight)} → (a, c) of step = a + c·n, weighted least squares,
    both kept ≥ 0. With one batch size seen there is nothing to separate them: a = 0 (the paper's n·c)."""
    pts = [(n, t, w) for n, (t, w) in samples.items() if w > 0]
    if not pts:
        raise ValueError("no step samples to fit")
    W = sum(w for _, _, w in pts)
    mn, mt = sum(w * n for n, _, w in pts) / W, sum(w * t for _, t, w in pts) / W
    var = sum(w * (n - mn) ** 2 for n, _, w in pts)
    if var == 0:
        return 0.0, mt / mn
    c = sum(w * (n - mn) * (t - mt) for n, t, w in pts) / var
    a = mt - c * mn
    if c < 0:
        return mt, 0.0
    if a < 0:
        return 0.0, sum(w * n * t for n, t, w in pts) / sum(w * n * n for n, _, w in pts)
    return a, c


class Scheduler:
    name = "base"

    def __init__(self):
        self.late_admissions = 0   # admitted although already unable to meet their own TTFT
        self.refusals = 0          # times an admission was refused to protect a running job

    def select(self, waiting: list, running: list, free_slots: int, now: float, ctx: SchedContext) -> list:
        raise NotImplementedError

    @staticmethod
    def _fits(chosen: list, job, ctx: SchedContext) -> bool:
        """Token budget: the first job of a step always fits."""
        return not chosen or sum(j.prompt_len for j in chosen) + job.prompt_len <= ctx.token_budget


class FCFS(Scheduler):
    """Arrival order; stops at the first job that does not fit (no overtaking)."""
    name = "fcfs"

    def select(self, waiting, running, free_slots, now, ctx):
        chosen = []
        for job in sorted(waiting, key=lambda j: j.arrival):
            if len(chosen) >= free_slots or not self._fits(chosen, job, ctx):
                break
            chosen.append(job)
        return chosen


class SJF(Scheduler):
    """Shortest expected job first: prompt_len·prefill_cost + expected_out(task)·c (ties by arrival).
    A job that does not fit the token budget is skipped so shorter ones behind it can go."""
    name = "sjf"

    @staticmethod
    def job_seconds(job, ctx: SchedContext) -> float:
        return job.prompt_len * ctx.prefill_cost_s + ctx.expected_out(job) * ctx.token_cost_s

    def select(self, waiting, running, free_slots, now, ctx):
        chosen = []
        for job in sorted(waiting, key=lambda j: (self.job_seconds(j, ctx), j.arrival)):
            if len(chosen) >= free_slots:
                break
            if self._fits(chosen, job, ctx):
                chosen.append(job)
        return chosen


class TaskAware(Scheduler):
    """eMoE Algorithm 1 with Eq. 3 (the printed pseudocode's bugs fixed: the admitted request is R,
    and W is R's input token count, not a running total of tokens).

    Waiting jobs are ordered (`order`) in two groups: those that can still make their TTFT deadline
    d_R = arrival_R + ttft_slo_R, shortest expected job first (prompt + the task's profiled output:
    the paper orders by SLO stringency alone, which under overload serves long jobs that then make
    every short one behind them late); then those that cannot, oldest first (FCFS spends capacity
    on requests already lost, and every later one misses too). Measured: docs/results/compare*.txt.
    R is admitted when a slot and the token budget allow and, for every job S in the batch (running,
    plus those already admitted this step) that currently meets its SLO, its expected finish still
    meets S's deadline:

        t_S = ΔE + W·c_p + G_S·(a + c·n_S) + r_S  ≤  D_S

      D_S  S's last-token deadline, from arrival. Before its first token: ttft_slo + tpot_slo·(G_S − 1).
           After: (first_token − arrival) + tpot_slo·(generated_S − 1 + G_S) — TPOT is judged from
           the first token on, so TTFT slack cannot pay for a slow decode (the paper's single E2E
           budget lets it, and the client measuring TTFT and TPOT apart then sees misses)

      ΔE   expert-loading seconds the residency plan for batch+R would cause (ctx.delta_e; 0 without
           a residency policy) — the loader stalls every running job once
      W    prompt tokens of R plus of those admitted before it this step (their prefill runs in the
           same admission); c_p the per-prompt-token cost (the paper uses one c; prefill is batched
           and far cheaper per token, so we measure it apart)
      G_S  tokens S still has to generate (SchedContext.remaining: task mean − generated, reset to
           5% of the start value when exhausted)
      n_S  jobs expected to still run while S finishes: those (S itself, R included) with G ≥ G_S —
           they are in every one of S's decode steps
      a, c decode step cost a + c·n for n running jobs, fitted online (the paper's n·c alone is a = 0;
           on real hardware a step's cost is mostly a, so n·c overestimates large batches)
      r_S  now − arrival_S: time S has been in the system (both sides are measured from arrival)

    "Currently meets its SLO": its first token came within ttft_slo (or, before its first token, the
    TTFT deadline has not passed) and its pace since then is within tpot_slo per token. Jobs already
    missing are not protected — refusing R cannot save them.

    R's own TTFT never blocks R: a job that would miss its TTFT even if admitted now is still admitted
    (counted in `late_admissions`). A refused job is skipped so later ones may fit, except that once a
    refused job is past its TTFT deadline, nothing behind it is admitted this step: capacity goes to
    it as soon as the batch drains (late jobs are not starved by other late ones). With an empty batch
    nothing can be hurt, so the head of the queue always gets in. admission_control=False keeps the
    ordering and admits whatever fits (the ablation `emoe serve --no-admission-control`).
    """
    name = "task-aware"

    def __init__(self, admission_control: bool = True):
        super().__init__()
        self.admission_control = admission_control

    @staticmethod
    def deadline_ttft(job) -> float:
        return job.arrival + job.ttft_slo_s

    @staticmethod
    def meets_slo(job, now: float) -> bool:
        if job.first_token_at is None:
            return now <= job.arrival + job.ttft_slo_s
        if job.first_token_at - job.arrival > job.ttft_slo_s:
            return False
        return now - job.first_token_at <= job.tpot_slo_s * max(job.generated, 1)

    @staticmethod
    def finish_estimate(s, batch: list, w_tokens: float, delta_e: float, now: float, ctx: SchedContext) -> float:
        """Eq. 3: expected time from S's arrival to its last token if the batch is `batch`."""
        g_s = ctx.remaining(s)
        n_s = sum(1 for j in batch if ctx.remaining(j) >= g_s)
        return delta_e + w_tokens * ctx.prefill_cost_s + g_s * ctx.step_s(n_s) + (now - s.arrival)

    @staticmethod
    def e2e_budget(s, ctx: SchedContext) -> float:
        g_s = ctx.remaining(s)
        if s.first_token_at is None:
            return s.ttft_slo_s + s.tpot_slo_s * max(g_s - 1, 0.0)
        return (s.first_token_at - s.arrival) + s.tpot_slo_s * max(s.generated - 1 + g_s, 0.0)

    @classmethod
    def order(cls, job, now: float, ctx: SchedContext) -> tuple:
        """Jobs that can still make their TTFT first, shortest expected job first; then those that
        cannot, oldest first. Serving a hopeless job ahead of a feasible one turns one miss into two."""
        late = now + job.prompt_len * ctx.prefill_cost_s > cls.deadline_ttft(job)
        return (late, job.arrival if late else SJF.job_seconds(job, ctx), job.arrival)

    def select(self, waiting, running, free_slots, now, ctx):
        chosen: list = []
        w_tokens = 0
        for r in sorted(waiting, key=lambda j: self.order(j, now, ctx)):
            if len(chosen) >= free_slots:
                break
            if not self._fits(chosen, r, ctx):
                continue
            batch = list(running) + chosen + [r]
            protected = [s for s in running + chosen if self.meets_slo(s, now)] if self.admission_control else []
            w = w_tokens + r.prompt_len
            de = ctx.loading([j.engine_request for j in batch]) if protected else 0.0
            ok = all(self.finish_estimate(s, batch, w, de, now, ctx) <= self.e2e_budget(s, ctx) for s in protected)
            if not ok:
                self.refusals += 1
                if now > self.deadline_ttft(r):
                    break  # don't starve: nothing overtakes a late job
                continue
            if now + de + w * ctx.prefill_cost_s > self.deadline_ttft(r):
                self.late_admissions += 1
            chosen.append(r)
            w_tokens = w
        return chosen


SCHEDULERS = {s.name: s for s in (FCFS, SJF, TaskAware)}


def make_scheduler(name: str, admission_control: bool = True) -> Scheduler:
    """admission_control=False keeps task-aware's ordering but drops Algorithm 1's admission test."""
    if name not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}; choose one of {', '.join(SCHEDULERS)}")
    return TaskAware(admission_control) if name == TaskAware.name else SCHEDULERS[name]()
