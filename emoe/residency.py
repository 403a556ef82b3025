"""Residency policies: which experts the fast tier should hold for the current batch.

One small interface, chosen by name in eval/serve:
  initial() -> {layer: [expert ids]}                    before the first request (the profile's best guess)
  plan(batch, cache) -> {layer: [expert ids]} | None    on every scheduling decision (admission)
  after_prefill(batch, new, partial, cache) -> plan | None  once new requests' prompt routing is known
  observe(req)                                          when a request finishes (its trace is final)
The engine hands plans to the loader, which moves only the difference. Misses are the miss policy's.
"""
from __future__ import annotations

import torch

from .loader import demands_of, expected_tokens, plan_levels, plan_top
from .predictor import UNLABELLED, drifted
from .profile import Profile


class _Base:
    name = "base"
    needs_traces = False

    def __init__(self, profile: Profile, capacity: int, stickiness: float = 0.0):
        self.profile, self.capacity, self.stickiness = profile, capacity, stickiness
        self.layers, self.top_k = list(profile.moe_layers), profile.top_k
        self.popular = profile.popular()

    def initial(self):
        return self._top(self.popular)

    def plan(self, batch, cache):
        return None

    def after_prefill(self, batch, new, partial, cache=None):
        return None

    def observe(self, req) -> None:
        pass

    levels = None  # set by the engine when the cache holds two-level shadows: plans then pick precisions

    def _top(self, N, cache=None):
        if self.levels is not None:
            return plan_levels(N, self.levels, self.layers, self.popular, cache, self.stickiness)
        return plan_top(N, self.capacity, self.layers, self.top_k, self.popular,
                        None if cache is None else cache.mask, self.stickiness)


class RandomSet(_Base):
    """Baseline: a random resident set of the budget's size (fixed)."""
    name = "random"

    def __init__(self, profile, capacity, seed: int = 0):
        super().__init__(profile, capacity)
        g = torch.Generator().manual_seed(seed)
        self._score = torch.rand(self.popular.shape, generator=g)

    def initial(self):
        return self._top(self._score)


class Popular(_Base):
    """Baseline: the experts most used over all profiled prompts (fixed)."""
    name = "popular"


class TaskAware(_Base):
    """Eq. 2 with per-task shares. `shares(task)` supplies f; task-static uses the profile's means,
    eMoE a predictor called every p prompts of a task (or adaptively, see adaptive)."""
    name = "task-static"

    def __init__(self, profile, capacity, use_sensitivity: bool = True, stickiness: float = 0.0):
        super().__init__(profile, capacity, stickiness)
        self.static = profile.task_static()
        self.sens = profile.sensitivity_tensors() if use_sensitivity else None

    def shares(self, task: str) -> torch.Tensor:
        return self.static.get(task, self.popular / self.popular.sum(1, keepdim=True).clamp_min(1))

    def plan(self, batch, cache):
        ds = demands_of(batch)
        if not ds:
            return None
        shares = {d.task: self.shares(d.task) for d in ds}
        # keep the plan while the batch's task mix and the predictions stay the same: token counts alone
        # shift N a little, and chasing them moves experts for nothing (the loader moves only the diff)
        key = (frozenset(shares), getattr(self, "calls", 0))
        if key != getattr(self, "_last_key", None):
            self._last_key = key
            self._last_plan = self._top(expected_tokens(ds, shares, self.profile.out_len, self.sens), cache)
        return self._last_plan


class EMoE(TaskAware):
    """eMoE: the predictor turns recent routing traces + task into f, re-run every p prompts per task.
    Tasks whose layers are all insensitive skip the predictor (their N is zero anyway).
    adaptive=True re-predicts early on drift instead of a fixed count: when the share of a finished
    prompt's routing that the task's current prediction covers falls `drift` below that task's running
    average coverage (or below `min_hit` outright)."""
    needs_traces = True

    def __init__(self, profile, capacity, predictor, p: int = 40, name: str = "emoe-a",
                 adaptive: bool = False, min_hit: float = 0.5, history: int = 64, prompt_aware: bool = False,
                 drift: float = 0.05, stickiness: float = 0.0):
        super().__init__(profile, capacity, stickiness=stickiness)
        self.prompt_aware, self.req_f = prompt_aware, {}
        self.predictor, self.p, self.name = predictor, max(1, p), name
        self.adaptive, self.min_hit, self.max_hist, self.drift = adaptive, min_hit, history, drift
        self.cover_avg: dict[str, float] = {}
        self.history: list = list(profile.traces[-history:])
        self.cached: dict[str, torch.Tensor] = {}
        self.since: dict[str, int] = {}
        self.calls = 0
        self.stale: set[str] = set()

    def initial(self):
        """Before serving starts, predict every profiled task from the profile's history: the first
        request of a task then finds its shares ready instead of paying for the call (counted in calls)."""
        for task in [*self.profile.tasks, None]:
            self.shares(task)
        return super().initial()

    def shares(self, task):
        task = self._key(task)  # traffic with no task: from its recent routing, where the predictor learnt it
        if task not in self.predictor.tasks:  # no task (or one the predictor never saw): the static fallback
            return super().shares(task)
        sens = self.sens[task] if self.sens is not None and task in self.sens else None
        if sens is not None and float(sens.sum()) == 0:
            return super().shares(task)
        if task not in self.cached or self.since.get(task, 0) >= self.p or task in self.stale:
            self.cached[task] = self.predictor.predict(task, self.history)
            self.since[task] = 0
            self.stale.discard(task)
            self.calls += 1
        return self.cached[task]

    def _key(self, task):
        """A request's task as the predictor knows it: no task (None, or the loader's "unknown") is UNLABELLED
        where the predictor was fitted with it."""
        return UNLABELLED if task in (None, "unknown") and UNLABELLED in self.predictor.tasks else task

    def plan(self, batch, cache):
        for r in batch:
            if getattr(r, "slot", -1) < 0 or not r.output_ids:  # newly admitted: counts toward p
                k = self._key(r.task)
                self.since[k] = self.since.get(k, 0) + 1
        return super().plan(batch, cache)

    def after_prefill(self, batch, new, partial, cache=None):
        """Prompt-aware refresh (beyond the paper): once a prompt's own routing is known, blend it into
        its request's shares for the decode phase; answers reuse many of the prompt's experts."""
        if not self.prompt_aware or not new:
            return None
        for r, c in zip(new, partial):
            self.req_f[r.id] = c.float() / c.float().sum(1, keepdim=True).clamp_min(1)
        N = None
        for r in batch:
            f = self.shares(r.task)
            if r.id in self.req_f:
                f = 0.5 * f + 0.5 * self.req_f[r.id]
            s = self.sens[r.task][:, None] if self.sens is not None and r.task in self.sens else 1.0
            term = (len(r.prompt_ids) + self.profile.out_len.get(r.task, 0.0)) * s * f
            N = term if N is None else N + term
        return self._top(N, cache)  # (stickiness: a refresh moves an expert only for a clear gain, as plan does)

    def observe(self, req):
        self.req_f.pop(req.id, None)
        if req.trace is None:
            return
        self.history = (self.history + [req.trace])[-self.max_hist:]
        key = self._key(req.task)
        if self.adaptive and key in self.cached:
            f = self.cached[key]
            got = req.trace.total.float()
            planned = torch.zeros_like(got, dtype=torch.bool)
            for layer in self.layers:  # approximate: was the wanted routing inside the predicted top set?
                planned[layer, f[layer].topk(max(self.top_k, self.capacity // len(self.layers))).indices] = True
            cover = float(got[planned].sum() / got.sum().clamp_min(1))
            avg = self.cover_avg.get(key, cover)
            if drifted(cover, avg, self.min_hit, self.drift):
                self.stale.add(key)
            self.cover_avg[key] = 0.8 * avg + 0.2 * cover


class ByLayer(_Base):
    """Baseline: llama.cpp's `--n-cpu-moe N` placement. Whole layers' experts sit in the fast tier, the last
    layers first, as many as the budget holds; the first N layers' experts stay in the slow tier, where
    (with -host) their tokens run. Fixed, and blind to which experts are used."""
    name = "layers"

    def initial(self):
        per = len(self.popular[0]) if len(self.popular) else 0
        whole = self.capacity // max(1, per)
        fast = set(self.layers[len(self.layers) - whole:]) if whole else set()
        return {l: list(range(per)) if l in fast else [] for l in self.layers}


class MoEInfinity(_Base):
    """MoE-Infinity style: match each new request's observed (prefill) expert-activation matrix against
    the stored traces by cosine, and make the best matches' full activation the residency for decode."""
    name = "moe-infinity"

    def __init__(self, profile, capacity):
        super().__init__(profile, capacity)
        pre = torch.stack([t.prefill.float() for t in profile.traces])
        self.keys = pre.flatten(1) / pre.flatten(1).norm(dim=1, keepdim=True).clamp_min(1e-9)
        self.values = torch.stack([t.total.float() / t.total.float().sum(1, keepdim=True).clamp_min(1)
                                   for t in profile.traces])

    def after_prefill(self, batch, new, partial, cache=None):
        if not partial:
            return None
        N = 0
        for counts in partial:
            q = counts.float().flatten()
            best = (self.keys @ (q / q.norm().clamp_min(1e-9))).argmax()
            N = N + self.values[best] * float(counts.sum())
        return self._top(N, cache)


class Hindsight(_Base):
    """A bound for eval, not a deployable policy: plans each batch from its requests' actual routing (prompt
    and answer, recorded by the all-resident run of the same stream), i.e. what a perfect predictor of
    per-layer shares would hand Eq. 2. It bounds prediction, not accuracy: it re-plans for every batch, and
    under rerouting a stable plan measured better than this one (README, Results)."""
    name = "oracle"

    def __init__(self, profile, capacity, routing: dict):
        super().__init__(profile, capacity)
        self.routing, self._key, self._plan = routing, None, None

    def plan(self, batch, cache):
        counts = [None if (t := self.routing.get(tuple(r.prompt_ids))) is None else t.total for r in batch]
        if not batch or any(c is None for c in counts):
            return None  # a prompt the reference never served: keep what is resident
        key = frozenset(r.id for r in batch)
        if key != self._key:
            self._key, self._plan = key, self._top(sum(c.float() for c in counts), cache)
        return self._plan
