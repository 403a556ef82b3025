"""Miss policies: what happens when the router wants an expert that is not in the fast tier.

A policy is a small object with three methods, chosen by name from `MISS_POLICIES`:
  prepare(cache, layers)   initial residency before the first request
  select(layer, x, probs, weights, ids, cache) -> (weights, ids)   routing actually executed
  fetch(layer, expert, cache, n_tokens) -> weights   the tensors to run for n_tokens (may load, may not)
Residency *prediction* (which experts to keep) lives in the loader; these only decide the miss.
"""
from __future__ import annotations

import math
import time

import torch

from .cache import BudgetError, ExpertCache, Plan
from .quant import swiglu


def even_plan(layers: list[int], num_experts: int, capacity: int, order=None) -> dict[int, list[int]]:
    """Split `capacity` experts evenly over layers. Without a profile there is no better guess than
    `order` (default: expert id); the eMoE loader replaces this with predicted shares."""
    per, extra = divmod(min(capacity, len(layers) * num_experts), len(layers))
    plan = {}
    for j, layer in enumerate(layers):
        ranked = list(order[layer]) if order is not None else list(range(num_experts))
        plan[layer] = sorted(ranked[: min(num_experts, per + (j < extra))])
    return plan


def reroute(probs: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, resident: torch.Tensor):
    """eMoE's rule: a token whose top-k includes a non-resident expert goes to its best resident ones.
    The new weights are rescaled to the original top-k weight sum, which equals top-k renormalisation
    for families that normalise (Mixtral, Qwen3) and keeps the magnitude for those that do not."""
    # every row is rerouted and the untouched ones put back: no host sync, which a GPU decode step is bound by
    need = ~resident[ids].all(-1, keepdim=True)
    k = ids.shape[-1]
    # -1 keeps non-resident experts below every resident one even where probabilities underflow to 0
    w2, i2 = torch.topk(probs.masked_fill(~resident, -1.0), k, dim=-1)
    total = w2.sum(-1, keepdim=True)
    share = torch.where(total > 0, w2 / total.clamp_min(1e-30), torch.full_like(w2, 1.0 / k))
    w2 = share * weights.float().sum(-1, keepdim=True)
    return torch.where(need, w2.to(weights.dtype), weights), torch.where(need, i2, ids)


class AllResident:
    """No budget: every expert stays in the fast tier (the quality and speed reference)."""
    name = "all"

    def min_experts(self, layers: list[int], num_experts: int, top_k: int) -> int:
        return len(layers) * num_experts

    def prepare(self, cache: ExpertCache, layers: list[int]) -> None:
        cache.set_resident({l: list(range(cache.num_experts)) for l in layers})

    def select(self, layer, x, probs, weights, ids, cache):
        return weights, ids

    def fetch(self, layer: int, expert: int, cache: ExpertCache, n_tokens: int = 1):
        return cache.get(layer, expert)


class Reroute(AllResident):
    """Fixed residency chosen by a plan (even split until a loader sets one); misses never stall."""
    name = "reroute"
    full_topk = True  # rerouting needs a full top-k resident in every MoE layer (the engine checks)

    def __init__(self, plan: dict[int, list[int]] | None = None):
        self.plan = plan

    def min_experts(self, layers, num_experts, top_k):
        return len(layers) * top_k  # every layer must be able to serve a full top-k

    def prepare(self, cache, layers):
        cache.set_resident(self.plan or even_plan(layers, cache.num_experts, cache.capacity))
        short = [l for l in layers if len(cache.resident(l)) == 0]
        if short:
            raise BudgetError(f"layers {short} have no resident expert")

    def select(self, layer, x, probs, weights, ids, cache):
        return reroute(probs, weights, ids, cache.mask[layer])


class LoadOnDemand(AllResident):
    """mixtral-offloading's baseline: load a missing expert when needed, evicting the least recently used."""
    name = "load"
    keeps_routing = True  # (a step on held forms may route in C: dispatch.live_tables)

    def min_experts(self, layers, num_experts, top_k):
        return top_k

    def prepare(self, cache, layers):
        cache.set_resident(even_plan(layers, cache.num_experts, cache.capacity))

    def fetch(self, layer, expert, cache, n_tokens=1):
        key = (layer, expert)
        if key not in cache:
            while cache.used_bytes + cache.expert_bytes > cache.budget_bytes:
                victim = cache.lru(exclude={key})
                if victim is None:
                    raise BudgetError("budget cannot hold a single expert")
                cache.evict(*victim)
            cache.admit(layer, expert)
        return cache.get(layer, expert)


class PreGated(Reroute):
    """Pre-gated-MoE style: at each MoE layer, the *next* MoE layer's router is applied to the current
    hidden state and the experts it picks are fetched before that layer runs (evicting that layer's
    least-used residents); whatever the pre-gate missed is rerouted. Each layer keeps an even share.
    `routers` maps layer → next layer's router weight."""
    name = "pregated"

    def __init__(self, routers: dict[int, tuple[int, torch.Tensor]] | None = None, plan=None):
        super().__init__(plan)
        self.routers = routers or {}

    def select(self, layer, x, probs, weights, ids, cache):
        nxt = self.routers.get(layer)
        if nxt is not None:
            nlayer, w = nxt
            want = torch.topk(x.float() @ w.float().T, ids.shape[-1], dim=-1).indices
            counts = torch.bincount(want.flatten(), minlength=cache.num_experts)
            cur = cache.resident(nlayer)
            keep = len(cur)
            order = sorted(range(cache.num_experts), key=lambda e: (-int(counts[e]), e not in cur))
            cache.set_resident({nlayer: order[:keep]})
        return super().select(layer, x, probs, weights, ids, cache)


class Hybrid(Reroute):
    """Per task and layer: reroute where the task is insensitive (s = 0), load on demand (LRU) where it is
    sensitive — exactness only where the sensitivity profile says it matters. The engine tells it which
    task each token belongs to via `begin`."""
    name = "hybrid"

    def __init__(self, sensitivity: dict[str, list[int]] | None = None, plan=None):
        super().__init__(plan)
        self.sensitivity, self.token_sens = sensitivity or {}, None

    def begin(self, token_tasks: list) -> None:
        rows = [self.sensitivity.get(t, None) for t in token_tasks]
        width = max((len(r) for r in rows if r), default=0)
        self.token_sens = torch.tensor([r if r else [1] * width for r in rows], dtype=torch.bool) if width else None

    def select(self, layer, x, probs, weights, ids, cache):
        w2, i2 = reroute(probs, weights, ids, cache.mask[layer])
        if self.token_sens is None:
            return weights, ids  # no profile: every layer counts as sensitive
        sens = self.token_sens[:, layer].to(ids.device)[:, None]
        return torch.where(sens, weights, w2), torch.where(sens, ids, i2)

    fetch = LoadOnDemand.fetch


class Selective(Reroute):
    """Reroute a miss unless the missing expert carries at least `threshold` of the token's top-k
    weight; then run the token exactly, loading what it needs on demand (LRU). A knob between reroute
    (threshold > 1) and LRU (threshold 0): a load is paid only where a token leans on the missing
    expert, which is where rerouting changes the output most. Top-2 models: 0.5 = whenever the
    token's first choice is missing."""
    name = "selective"

    def __init__(self, threshold: float = 0.5, plan=None):
        if not 0 <= threshold <= 1:
            raise ValueError(f"selective threshold must be in [0, 1], got {threshold}")
        super().__init__(plan)
        self.threshold = threshold

    def select(self, layer, x, probs, weights, ids, cache):
        resident = cache.mask[layer]
        share = weights.float() / weights.float().sum(-1, keepdim=True).clamp_min(1e-30)
        exact = (~resident[ids] & (share >= self.threshold)).any(-1, keepdim=True)
        w2, i2 = reroute(probs, weights, ids, resident)
        return torch.where(exact, weights, w2), torch.where(exact, ids, i2)

    fetch = LoadOnDemand.fetch


class Shadow(Reroute):
    """Beyond the paper: no token is rerouted. The fast tier holds a `bits`-bit copy of every expert that
    is not resident at full precision (counted in the budget), and a miss runs that copy: the expert
    the router chose, slightly perturbed, instead of a different expert. Residency then decides which
    experts run exactly. full=False keeps nothing at full precision (all-quantised, llama.cpp-style).
    hi_bits > bits: the residency plan picks each expert's precision (none, bits, hi_bits or full;
    loader.plan_levels), and a miss on an expert with no copy is rerouted."""
    name = "shadow"
    full_topk = False  # copies stand in for missing experts

    def __init__(self, bits: int = 4, plan=None, full: bool = True, hi_bits: int = 0):
        super().__init__(plan)
        self.shadow_bits, self.full, self.hi_bits = bits, full, hi_bits

    def min_experts(self, layers, num_experts, top_k):
        return 0  # copies serve the misses; fill_shadows / plan_levels refuse a budget they do not fit

    def prepare(self, cache, layers):
        plan = (self.plan or even_plan(layers, cache.num_experts, cache.capacity)) if self.full else {}
        cache.set_resident(plan)
        if not isinstance(plan, Plan):  # a precision Plan says which copies exist; otherwise all do
            cache.fill_shadows()

    def select(self, layer, x, probs, weights, ids, cache):
        return reroute(probs, weights, ids, cache.avail[layer])  # only experts with no copy at all

    def fetch(self, layer, expert, cache, n_tokens=1):
        return cache.get(layer, expert) if (layer, expert) in cache else cache.approx(layer, expert)


class Host(Reroute):
    """Fiddler / llama.cpp `--n-cpu-moe` style, with eMoE choosing what stays in the fast tier: a miss runs
    on the host CPU with the expert's own weights (only the token activations cross), so the output is
    exact at any budget and no expert bytes move. The residency plan decides which experts run on the
    fast device; the predictor's hit rate is the share of expert work done there. Needs `--experts-on
    ram` to pay off (from disk, each miss reads its expert again)."""
    name = "host"
    full_topk = False
    keeps_routing = True  # select is the router's choice: a decode step may route in C (decode_block.decode_layers)

    def min_experts(self, layers, num_experts, top_k):
        return 0

    def prepare(self, cache, layers):
        cache.set_resident(self.plan or even_plan(layers, cache.num_experts, cache.capacity))

    def select(self, layer, x, probs, weights, ids, cache):
        return weights, ids

    def defers(self, layer, expert, cache, n_tokens=1) -> bool:
        """Whether fetch will hand back slow-tier weights (dispatch then copies the layer's tokens to the
        host before it queues the device's experts)."""
        return (layer, expert) not in cache

    def fetch(self, layer, expert, cache, n_tokens=1):
        return cache.host(layer, expert) if self.defers(layer, expert, cache, n_tokens) else cache.get(layer, expert)

    def hosts_all(self, layer, cache, n_tokens) -> bool:
        """Whether fetch hands back slow-tier weights for every expert of the layer at up to n_tokens each
        (dispatch then runs the layer without asking per expert)."""
        return cache.n_resident[layer] == 0


class Auto(Host):
    """Fiddler's rule on top of Host: a miss runs where it finishes first. On the host it costs time per
    token; loaded, it costs one copy whatever the token count plus the fast device's small time per token.
    So decode misses (a few tokens) run on the host and prefill misses (many) are loaded, evicting the least
    recently used expert (the loader restores its plan at its next decision). min_tokens, the break-even
    count, is measured at start (break_even_tokens) unless given."""
    name = "auto"

    def __init__(self, plan=None, min_tokens: float | None = None):
        super().__init__(plan)
        self.min_tokens = min_tokens

    def prepare(self, cache, layers):
        super().prepare(cache, layers)
        if self.min_tokens is None:
            self.min_tokens = break_even_tokens(cache, layers[0])

    def defers(self, layer, expert, cache, n_tokens=1) -> bool:
        return (layer, expert) not in cache and not (n_tokens >= self.min_tokens
                                                     and cache.budget_bytes >= cache.expert_bytes)

    def fetch(self, layer, expert, cache, n_tokens=1):
        if self.defers(layer, expert, cache, n_tokens):
            return cache.host(layer, expert)
        return LoadOnDemand.fetch(self, layer, expert, cache)  # a hit, or a miss worth a copy

    def hosts_all(self, layer, cache, n_tokens) -> bool:
        return super().hosts_all(layer, cache, n_tokens) and not (
            n_tokens >= self.min_tokens and cache.budget_bytes >= cache.expert_bytes)


class Slack(Host):
    """Host with room to spare: the residency plan takes `1 - share` of the budget and stays; a miss is loaded
    into the rest, evicting the least recently used expert the plan did not choose, and where nothing but the
    plan is held, it runs in the slow tier as Host runs it. Why: when misses are disk reads (formstore), LRU
    alone lets a prefill's many experts push out what decode needs (on the embedded model it kept 9% of the
    work at 40%), while a fixed plan misses what consecutive tokens share; this keeps both. The output is exact."""
    name = "slack"
    keeps_routing = False  # (measured only with a call per layer, not with the step calls: dispatch.live_tables)

    def __init__(self, plan=None, share: float = 0.25):
        super().__init__(plan)
        if not 0 < share < 1:
            raise ValueError(f"the slack's share of the budget must be in (0, 1), got {share}")
        self.share = share

    def plan_capacity(self, capacity: int) -> int:
        """Experts the residency plan may hold: the rest of the budget is the slack."""
        return capacity - int(capacity * self.share)

    def prepare(self, cache, layers):
        cache.set_resident(self.plan or even_plan(layers, cache.num_experts, self.plan_capacity(cache.capacity)))

    def _room(self, key, cache) -> bool:
        """Make room for key in the slack (evicting unplanned experts, least recently used first); False if none."""
        while cache.used_bytes + cache.expert_bytes > cache.budget_bytes:
            victim = cache.lru(exclude=cache.pinned | {key})
            if victim is None:
                return False
            cache.evict(*victim)
        return True

    def defers(self, layer, expert, cache, n_tokens=1) -> bool:
        key = (layer, expert)
        return key not in cache and cache.lru(exclude=cache.pinned | {key}) is None \
            and cache.used_bytes + cache.expert_bytes > cache.budget_bytes

    def fetch(self, layer, expert, cache, n_tokens=1):
        key = (layer, expert)
        if key in cache:
            return cache.get(layer, expert)
        if self._room(key, cache):
            cache.admit(layer, expert)
            return cache.get(layer, expert)
        return cache.host(layer, expert)

    def hosts_all(self, layer, cache, n_tokens) -> bool:
        return False


def break_even_tokens(cache: ExpertCache, layer: int, probe: tuple[int, int] = (1, 64), repeats: int = 3) -> float:
    """Fewest tokens for which loading a missing expert and running it on the fast device beats running it
    where the slow tier holds it, from best-of-`repeats` timings of one expert at two token counts (the
    slow tier's read counted on both sides). Where a host run repeats work a load does once and keeps
    (reading from disk, unpacking FP8 or MXFP4), always load; where both tiers are the same host memory
    and nothing needs unpacking, a copy never pays: never load. A RAM tier of GGUF kernel forms is timed
    on a CPU too: the kernel may beat the fast tier's own full-precision matmul."""
    forms = getattr(cache.store, "forms", False)
    if cache.store.tier == "disk" or (cache.device.type == "cpu" and getattr(cache.store, "packed", False) and not forms):
        return 1.0
    if cache.device.type == "cpu" and not forms:
        return math.inf
    sync = (lambda: torch.cuda.synchronize(cache.device)) if cache.device.type == "cuda" else (lambda: None)

    def best(f) -> float:
        times = []
        for _ in range(repeats):
            sync()
            t0 = time.perf_counter()
            f()
            sync()
            times.append(time.perf_counter() - t0)
        return min(times)

    dev_w = cache.bring(layer, 0)
    load = best(lambda: cache.bring(layer, 0))
    hidden = dev_w[0].shape[1]
    host = [best(lambda n=n: swiglu(torch.randn(n, hidden, dtype=cache.dtype),
                                    *(t.to(cache.dtype) if isinstance(t, torch.Tensor) else t
                                      for t in cache.store.read_host(layer, 0)))) for n in probe]
    dev = [best(lambda n=n: swiglu(torch.randn(n, hidden, dtype=cache.dtype, device=cache.device), *dev_w))
           for n in probe]
    return crossover(load, host, dev, probe)


def crossover(load: float, host: tuple[float, float] | list[float], dev: tuple[float, float] | list[float],
              probe: tuple[int, int]) -> float:
    """Fewest tokens n with host(n) > load + dev(n), host and dev linear through their two timings."""
    slope = (host[1] - host[0] - dev[1] + dev[0]) / (probe[1] - probe[0])  # seconds per token a load saves
    if slope <= 0:
        return math.inf
    return float(math.ceil(probe[0] + max(0.0, (load + dev[0] - host[0]) / slope)))


class RandomRouting(Host):
    """Tokens at `layers` go to random experts (weights kept), every other token as the router says: the
    probe the sensitivity profile uses to find layers where a task tolerates mis-routing. Under a budget,
    experts not resident run in the slow tier (Host), so only the randomised layers differ from the model."""
    name = "random-routing"
    keeps_routing = False

    def __init__(self, layers=(), seed: int = 0):
        super().__init__()
        self.layers, self.gen = set(layers), torch.Generator().manual_seed(seed)

    def select(self, layer, x, probs, weights, ids, cache):
        if layer not in self.layers:
            return weights, ids
        noise = torch.rand(probs.shape, generator=self.gen).to(probs.device)
        return weights, noise.topk(ids.shape[-1], dim=-1).indices


MISS_POLICIES = {p.name: p for p in (AllResident, Reroute, LoadOnDemand, RandomRouting, PreGated, Hybrid, Selective,
                                     Shadow, Host, Auto, Slack)}


def make_policy(name: str, **kw):
    if name == "adapt":  # (its module builds on this one)
        from .adaptive import Adapt
        return Adapt(**kw)
    if name not in MISS_POLICIES:
        raise ValueError(f"unknown miss policy {name!r}; choose one of {sorted([*MISS_POLICIES, 'adapt'])}")
    return MISS_POLICIES[name](**kw)
