"""Task-aware loader (eMoE Eq. 2): expected tokens per expert → top-L per layer under the byte budget.

    N_i = Σ_tasks (Σ_j W_j + T·W_o) · s · f_i

W_j input tokens of the T running requests of a task, W_o the task's expected output length, s the
task's per-layer sensitivity flag, f_i the predicted share. Experts are ranked over *all* layers at once,
so L differs per layer: a layer where every task is insensitive (N = 0) keeps only top-k experts (the
profile's most used, per PAPER.md's open point) and its bytes go to layers where routing matters.
With low-bit shadow copies (policies.Shadow), `plan_levels` turns the same N into a precision per expert.
"""
from __future__ import annotations

import contextlib
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch

from .cache import FULL, BudgetError, Plan, land


@dataclass(frozen=True, slots=True)
class TaskDemand:
    task: str
    input_tokens: int   # Σ W_j over the running requests of this task
    requests: int       # T


def demands_of(batch) -> list[TaskDemand]:
    """Group running/admitted requests (anything with .task and .prompt_ids) by task."""
    acc: dict[str, list[int]] = {}
    for r in batch:
        a = acc.setdefault(r.task or "unknown", [0, 0])
        a[0] += len(r.prompt_ids)
        a[1] += 1
    return [TaskDemand(t, w, n) for t, (w, n) in acc.items()]


def expected_tokens(demands: list[TaskDemand], shares: dict[str, torch.Tensor], out_len: dict[str, float],
                    sensitivity: dict[str, torch.Tensor] | None) -> torch.Tensor:
    """Eq. 2 summed over tasks → N [num_layers, E]."""
    N = None
    for d in demands:
        f = shares[d.task]
        s = sensitivity[d.task][:, None] if sensitivity is not None and d.task in sensitivity else 1.0
        term = (d.input_tokens + d.requests * out_len.get(d.task, 0.0)) * s * f
        N = term if N is None else N + term
    return N


def plan_top(N: torch.Tensor | None, capacity: int, moe_layers: list[int], top_k: int,
             fallback: torch.Tensor, resident: torch.Tensor | None = None, stickiness: float = 0.0
             ) -> dict[int, list[int]]:
    """Keep the `capacity` experts with most expected tokens, every layer holding at least top_k.
    Ties and zero-demand slots are broken by `fallback` (the profile's popularity), so the budget is
    always used: a resident expert costs nothing extra once loaded. With `resident` ([layers, E] bool)
    and stickiness h > 0, a resident expert is displaced only by one expecting (1 + h)× its tokens:
    when the task mix shifts a little, swapping near-ties costs a load and buys almost no coverage."""
    E = fallback.shape[1]
    score = fallback[moe_layers].float() / (fallback[moe_layers].float().sum() + 1e-9) * 1e-6
    if N is not None:
        score = score + N[moe_layers].float()
    if resident is not None and stickiness > 0:
        score = score * (1 + stickiness * resident[moe_layers].to("cpu", torch.float32))
    capacity = min(capacity, len(moe_layers) * E)
    chosen = torch.zeros(len(moe_layers), E, dtype=torch.bool)
    # fewer than top_k per layer only when the budget cannot hold more (shadow copies serve the rest)
    chosen.scatter_(1, score.topk(min(top_k, E, capacity // len(moe_layers)), dim=1).indices, True)
    rest = capacity - int(chosen.sum())
    if rest > 0:
        flat = score.masked_fill(chosen, float("-inf")).flatten()
        chosen.view(-1)[flat.topk(rest).indices] = True
    return {layer: chosen[j].nonzero().flatten().tolist() for j, layer in enumerate(moe_layers)}


# Relative weight error of each way to hold an expert (int4 with offsets 7.3-8.6% by layout, quant.copy_group; int8
# ≈ 0.5%: tests/test_shadow.py); not holding it means a reroute to a different expert, as wrong as a whole expert.
# (int4 was 0.1 while its copies were symmetric, 9.7%: docs/results/int4_offsets.txt, section 5)
ERROR = {0: 1.0, 4: 0.08, 8: 0.005}


def plan_levels(N: torch.Tensor | None, levels, moe_layers: list[int], fallback: torch.Tensor,
                cache=None, stickiness: float = 0.0):
    """Precision per expert under the byte budget (beyond the paper): every step up (none → int4 →
    int8 → full) is worth the error it removes times the tokens expected on that expert, per byte it
    costs; steps are taken best first while bytes last. Error falls steeply and price rises steeply, so
    the budget first buys a low-bit copy of every expert that expects tokens, then raises the busiest
    to int8, and buys full copies only when little else is left to fix. Each layer holds a copy of at
    least its top-k (rerouting needs a full top-k). With `cache` and stickiness h, a level an expert
    already holds is worth (1 + h)× as much: near-ties do not move."""
    E, L = fallback.shape[1], len(moe_layers)
    pop = fallback[moe_layers].float()
    score = pop / (pop.sum() + 1e-9) * 1e-6
    if N is not None:
        score = score + N[moe_layers].float()
    cost, err = levels.cost, {**ERROR, FULL: 0.0}
    order = sorted(cost)
    held = cache.levels_held[moe_layers] if cache is not None and stickiness > 0 else None
    level = torch.zeros(L, E, dtype=torch.long)
    spent = 0
    k = min(levels.top_k, E)
    if k:
        keep = score * (1 + stickiness * (held > 0).float()) if held is not None else score
        level.scatter_(1, keep.topk(k, dim=1).indices, order[1])
        spent = L * k * cost[order[1]]  # (k a layer)
        if spent > levels.budget_bytes:
            raise BudgetError(f"budget {levels.budget_bytes} bytes cannot hold int{order[1]} copies of the top-{k} "
                              f"experts of each of {L} layers ({spent} bytes): rerouting needs them")
    vals = []
    for a, b in zip(order, order[1:]):
        v = score * (err[a] - err[b]) / (cost[b] - cost[a])
        vals.append(v * (1 + stickiness * (held >= b).float()) if held is not None else v)
    ranked = torch.stack(vals).flatten().argsort(descending=True, stable=True)
    greedy = _greedy if L * E >= RUNS_FROM and _in_order(ranked, len(order) - 1, L * E) else _greedy_loop
    lv = greedy(ranked, level.flatten(), order, cost, levels.budget_bytes - spent)
    return Plan({l: lv[j * E: (j + 1) * E] for j, l in enumerate(moe_layers)})


# experts from which the greedy walk goes in runs of steps (_greedy): below, its dozen torch calls cost more than the
# loop's Python steps (scripts/bench_plan.py: 0.34 against 0.20 ms at 4 x 16, 0.74 against 0.97 at 16 x 64)
RUNS_FROM = 1024


def _in_order(ranked: torch.Tensor, steps: int, n: int) -> bool:
    """Whether each expert's steps up come best first in their own order (none → int4 before int4 → int8...): so
    they do whenever error per byte falls with each step, and then the greedy walk can be taken in whole runs."""
    rank = torch.empty_like(ranked)
    rank[ranked] = torch.arange(len(ranked))
    rank = rank.view(steps, n)
    return bool((rank[:-1] < rank[1:]).all())


def _greedy(ranked: torch.Tensor, lv: torch.Tensor, order: list[int], cost: dict, room: int) -> list[int]:
    """_greedy_loop's levels, a run of steps at a time: the longest prefix of the steps still open that fits is
    all taken (each expert's steps are in order: _in_order); then every step dearer than the bytes left is
    dropped, with its expert's later steps. Each round drops the dearest kind of step left, so there are at
    most as many rounds as kinds of step (3), not a Python iteration per step as in the loop."""
    n = lv.numel()
    step, pos = ranked // n, ranked % n
    lo = torch.tensor(order[:-1])[step]  # the level each step starts from
    price = torch.tensor([cost[b] - cost[a] for a, b in zip(order, order[1:])])[step]
    open_ = lo >= lv[pos]  # steps below what an expert already holds (the top-k's first) are never taken
    step, pos, price = step[open_], pos[open_], price[open_]
    lv = lv.clone()
    while len(step):
        fits = price <= room
        if not bool(fits.all()):  # dropped: and so is every later step of the same expert
            first_bad = torch.full((n,), len(order), dtype=step.dtype)
            first_bad.scatter_reduce_(0, pos[~fits], step[~fits], "amin")
            keep = step < first_bad[pos]
            step, pos, price = step[keep], pos[keep], price[keep]
        if not len(step):
            break
        spent = price.cumsum(0)
        take = int((spent <= room).sum())
        if take:
            # an expert's steps rise, so its last level taken is the largest (index_put's order is not defined)
            lv.scatter_reduce_(0, pos[:take], torch.tensor(order[1:])[step[:take]], "amax")
            room -= int(spent[take - 1])
        step, pos, price = step[take:], pos[take:], price[take:]
    return lv.tolist()


def _greedy_loop(ranked: torch.Tensor, lv: torch.Tensor, order: list[int], cost: dict, room: int) -> list[int]:
    """Steps best first, each taken if its expert holds the level it starts from and its bytes fit."""
    lv, n = lv.tolist(), lv.numel()
    cheapest = min(cost[b] - cost[a] for a, b in zip(order, order[1:]))
    for f in ranked.tolist():
        if room < cheapest:  # nothing else can fit: most steps end here
            break
        step, pos = divmod(f, n)
        a, b = order[step], order[step + 1]
        if lv[pos] == a and cost[b] - cost[a] <= room:
            lv[pos] = b
            room -= cost[b] - cost[a]
    return lv


@dataclass(slots=True)
class LoaderStats:
    updates: int = 0
    experts_loaded: int = 0
    experts_evicted: int = 0
    seconds: float = 0.0   # planning + moving experts: the overhead eMoE reports
    move_seconds: float = 0.0  # the moving part (the rest of the cache's load time is on-demand stalls)


class Loader:
    """Applies plans to the cache, moving only the difference, and accounts for the time it takes."""

    def __init__(self, cache):
        self.cache, self.stats = cache, LoaderStats()
        self._applied = (None, -1)  # (the last plan applied, the cache's version right after)

    def apply(self, plan: dict[int, list[int]], t_start: float | None = None) -> None:
        """Move what `plan` changes. The same plan object again, with nothing moved since (a residency keeps its
        plan while the batch's task mix stays: a server admitting one request at a time), is a no-op: comparing a
        plan over 48 x 128 experts with the cache costs milliseconds for nothing."""
        t0 = time.perf_counter() if t_start is None else t_start
        if plan is self._applied[0] and self.cache.version == self._applied[1]:
            self.stats.seconds += time.perf_counter() - t0
            return
        t1 = time.perf_counter()
        loaded, evicted = self.cache.set_resident(plan)
        self._applied = (plan, self.cache.version)
        self.stats.move_seconds += time.perf_counter() - t1
        self.stats.updates += 1
        self.stats.experts_loaded += loaded
        self.stats.experts_evicted += evicted
        self.stats.seconds += time.perf_counter() - t0


class Mover:
    """Lands a plan's loads on one worker thread (beyond the paper's synchronous loader). The cache holds each
    admitted expert at once (mask, bytes, LRU) and the first layer call that reads its weights waits for it, so
    the moves of layer l overlap the compute of the layers before it, and outputs are those of loading in place:
    no token ever runs on a copy that has not landed. On CUDA the copies run on their own stream."""

    def __init__(self, device: torch.device, dtype: torch.dtype):
        self.device, self.dtype = torch.device(device), dtype
        self.stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="emoe-move", initializer=torch.set_num_threads, initargs=(1,))
        self.busy_seconds = 0.0  # the worker's time landing copies (overlapped, unlike the waits)

    def bring(self, reads: list) -> list[Future]:
        """Futures of the experts' weights, for (packed tensors, unpack) reads, landed in order by one job: one
        wake-up of the worker per plan, not per expert (each costs the main thread a hand-over of the GIL)."""
        futures = [Future() for _ in reads]
        if reads:
            self.pool.submit(self._land, reads, futures)
        return futures

    def _land(self, reads, futures) -> None:
        t0 = time.perf_counter()
        with torch.cuda.stream(self.stream) if self.stream is not None else contextlib.nullcontext():
            for (packed, unpack), f in zip(reads, futures):
                try:
                    w = land(packed, unpack, self.device, self.dtype)
                    if self.stream is not None:
                        self.stream.synchronize()
                    f.set_result(w)
                except BaseException as e:  # (the layer call that reads it raises it)
                    f.set_exception(e)
        self.busy_seconds += time.perf_counter() - t0

    def landed(self, w):
        """Weights from the worker, made safe to use on the compute stream: on CUDA the allocator must not hand
        their memory to the next copy while compute queued on them has not run."""
        if self.stream is not None:
            for t in w:
                t.record_stream(torch.cuda.current_stream(self.device))
        return w

    def close(self) -> None:
        self.pool.shutdown(wait=True)
