"""Task-aware loader (eMoE Eq. 2): expected tokens per expert → top-L per layer under the byte budget.

    N_i = Σ_tasks (Σ_j W_j + T·W_o) · s · f_i

W_j input tokens of the T running requests of a task, W_o the task's expected output length, s the
task's per-layer sensitivity flag, f_i the predicted share. Experts are ranked over *all* layers at once,
so L differs per layer: a layer where every task is insensitive (N = 0) keeps only top-k experts (the
profile's most used, per PAPER.md's open point) and its bytes go to layers where routing matters.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch


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


def plan_levels(N: torch.Tensor | None, levels, moe_layers: list[int], fallback: torch.Tensor,
                cache=None, stickiness: float = 0.0):
    """Two-level shadows (every expert holds at least a low-bit copy): raise the experts with most
    expected tokens to the hi-bit copy first, as many as the budget allows, and only when every expert
    has one, raise the top ones to full precision. Per byte, a hi-bit copy (int8: ~0.5% weight error)
    recovers nearly all of what the low-bit one (int4: ~10%) loses, for a third of a full copy's price,
    so covering more experts beats exactness for a few. With `cache` and stickiness h, an expert already
    at a level keeps it unless another expects (1 + h)× its tokens."""
    from .cache import Plan
    E = fallback.shape[1]
    score = fallback[moe_layers].float() / (fallback[moe_layers].float().sum() + 1e-9) * 1e-6
    if N is not None:
        score = score + N[moe_layers].float()
    slots = len(moe_layers) * E

    def ranked(held):
        s = score if cache is None or stickiness <= 0 else score * (1 + stickiness * held.float())
        return s.flatten().argsort(descending=True)

    if cache is not None:
        full_now = cache.mask[moe_layers].cpu()
        hi_now = full_now.clone()
        for l, e in cache._hi:
            hi_now[moe_layers.index(l), e] = True
    else:
        full_now = hi_now = torch.zeros(len(moe_layers), E, dtype=torch.bool)
    n_hi = min(slots, levels.free_bytes // max(1, levels.hi_cost))
    n_full = 0
    if n_hi == slots:
        n_full = min(slots, (levels.free_bytes - slots * levels.hi_cost) // max(1, levels.full_cost - levels.hi_cost))
    full = torch.zeros(slots, dtype=torch.bool)
    full[ranked(full_now)[:n_full]] = True
    hi = torch.zeros(slots, dtype=torch.bool)
    hi[ranked(hi_now)[:n_hi]] = True
    hi &= ~full
    full, hi = full.view(len(moe_layers), E), hi.view(len(moe_layers), E)
    return Plan({l: full[j].nonzero().flatten().tolist() for j, l in enumerate(moe_layers)},
                {l: hi[j].nonzero().flatten().tolist() for j, l in enumerate(moe_layers)})


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

    def apply(self, plan: dict[int, list[int]], t_start: float | None = None) -> None:
        t0 = time.perf_counter() if t_start is None else t_start
        t1 = time.perf_counter()
        loaded, evicted = self.cache.set_resident(plan)
        self.stats.move_seconds += time.perf_counter() - t1
        self.stats.updates += 1
        self.stats.experts_loaded += loaded
        self.stats.experts_evicted += evicted
        self.stats.seconds += time.perf_counter() - t0
