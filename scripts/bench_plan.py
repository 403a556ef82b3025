"""What the loader costs per scheduling decision besides moving bytes, at real models' expert counts: planning
(loader.plan_levels: a precision per expert) and applying the plan (cache.set_resident: the difference). eval's
overhead share counts both next to the moves; on the embedded model's 64 experts they were about half of it, and
both grow with layers x experts. Experts are tiny here (32x32 matrices) so copying costs next to nothing and what
is timed is the bookkeeping; each shape is a model family's MoE layers x experts (top-k).

    python scripts/bench_plan.py [--plans 30] [--shapes emoe-tiny,mixtral-8x7b,qwen3-30b-a3b,deepseek-v3]

Prints ms per call for each shape, stickiness 0 and 1 (emoe-a-sticky): planning with the greedy walk in runs of
steps (loader._greedy) and one step at a time (_greedy_loop), alternated call by call on the same demands, and
applying the plan; "again": set_resident of the same plan with nothing moved since, which the Loader skips (a
server admitting one request at a time keeps its plan while the task mix stays). plan_levels takes the runs from
loader.RUNS_FROM experts.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from emoe import loader
from emoe.cache import ExpertCache
from emoe.loader import plan_levels

SHAPES = {"emoe-tiny": (4, 16, 2), "mixtral-8x7b": (32, 8, 2), "olmoe": (16, 64, 8), "qwen3-30b-a3b": (48, 128, 8),
          "deepseek-v3": (58, 256, 8)}
I = H = 32


class Store:
    tier = "ram"  # as eval's: every copy is made at the start and memoised, so a move is a plain copy

    def __init__(self, seed: int = 0):
        self.g, self.w = torch.Generator().manual_seed(seed), {}

    def read(self, layer, expert):
        if (layer, expert) not in self.w:
            self.w[(layer, expert)] = tuple(torch.randn(I, H, generator=self.g) for _ in range(3))
        return self.w[(layer, expert)]

    def read_packed(self, layer, expert):
        return self.read(layer, expert), lambda ts: ts


def demands(L: int, E: int, n: int, seed: int = 1) -> list[torch.Tensor]:
    """n expected-token matrices: each a batch of 4 requests from 6 tasks, each task with its own skewed shares."""
    g = torch.Generator().manual_seed(seed)
    tasks = [torch.distributions.Dirichlet(torch.full((E,), 0.3)).sample((L,)) for _ in range(6)]
    out = []
    for _ in range(n):
        picks = torch.randint(0, 6, (4,), generator=g).tolist()
        out.append(sum(tasks[t] * float(torch.randint(20, 400, (1,), generator=g)) for t in picks))
    return out


def run(name: str, plans: int, stickiness: float) -> tuple[float, float, float, float]:
    """Median ms per call: planning in runs, planning step by step, applying, and applying the same plan again
    with nothing moved since (what loader.Loader now skips)."""
    L, E, k = SHAPES[name]
    store = Store()
    cache = ExpertCache(store, 0, "cpu", torch.float32, L, E, 3 * I * H, kernel=False)
    cache.budget_bytes = int(0.4 * L * E * cache.expert_bytes)
    layers = list(range(L))
    cache.enable_shadow(layers, 4, 8, fill=False)
    levels, popular = cache.levels(k), torch.rand(L, E)
    Ns = demands(L, E, plans + 1)
    cache.set_resident(plan_levels(Ns[0], levels, layers, popular, cache, stickiness))
    times: dict[str, list[float]] = {"runs": [], "loop": [], "apply": []}
    was = loader.RUNS_FROM
    try:
        for i, N in enumerate(Ns[1:]):
            got = {}
            for walk in (("runs", "loop") if i % 2 else ("loop", "runs")):
                loader.RUNS_FROM = 0 if walk == "runs" else float("inf")
                t0 = time.perf_counter()
                got[walk] = plan_levels(N, levels, layers, popular, cache, stickiness)
                times[walk].append(time.perf_counter() - t0)
            assert got["runs"] == got["loop"]
            t0 = time.perf_counter()
            cache.set_resident(got["runs"])
            times["apply"].append(time.perf_counter() - t0)
            assert cache.used_bytes <= cache.budget_bytes
        for _ in range(plans):
            t0 = time.perf_counter()
            cache.set_resident(got["runs"])
            times.setdefault("again", []).append(time.perf_counter() - t0)
    finally:
        loader.RUNS_FROM = was
    return tuple(statistics.median(times[w]) * 1e3 for w in ("runs", "loop", "apply", "again"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--plans", type=int, default=30)
    ap.add_argument("--shapes", default=",".join(SHAPES))
    args = ap.parse_args()
    torch.set_num_threads(1)
    print(f"{'shape':16} {'L x E':>9} {'stick':>5} {'runs ms':>8} {'loop ms':>8} {'loop/runs':>9} {'apply ms':>8}"
          f" {'again ms':>8}   (medians of {args.plans} calls)")
    for name in args.shapes.split(","):
        L, E, _ = SHAPES[name]
        for h in (0.0, 1.0):
            r, s, a, again = run(name, args.plans, h)
            print(f"{name:16} {f'{L}x{E}':>9} {h:5g} {r:8.2f} {s:8.2f} {s / r:9.2f} {a:8.2f} {again:8.2f}", flush=True)


if __name__ == "__main__":
    main()
