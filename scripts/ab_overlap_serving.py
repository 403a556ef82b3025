"""Serving's wall time with a plan's reads landing in the background (cache.overlap) against read before
set_resident returns, alternated in one process on the embedded model's int8 forms from disk: 32 mixed requests in
batches of 4, 16 tokens each. Prints each round's seconds and the loader's share, and the per-round ratio.

    python scripts/ab_overlap_serving.py [POLICY] [BUDGET] [ROUNDS]      # default emoe-a 0.4 8
"""
import sys, time, statistics
from pathlib import Path
from emoe import default_model_dir
from emoe.commands import _predictors
from emoe.datasets import load_split
from emoe.engine import Engine, EngineConfig, SamplingParams
from emoe.eval import Setup, build
from emoe.profile import Profile
import random
pol = sys.argv[1] if len(sys.argv) > 1 else "emoe-a"
budget = float(sys.argv[2]) if len(sys.argv) > 2 else 0.4
model = default_model_dir(); pd = str(Path(model) / "profile"); prof = Profile.load(pd, model)
setup = Setup(prof, _predictors(pd, [pol]))
rng = random.Random(0)
tasks = prof.tasks
exs = [rng.choice(load_split("test", rng.choice(tasks))) for _ in range(32)]
engs = {}
for name in ("overlapped", "together"):
    policy, residency = build(pol, setup)
    engs[name] = Engine(EngineConfig(model, budget=budget, max_batch=4, experts_on="disk", host_int8=True, device="cpu"),
                        policy=policy, residency=residency)
    if name == "together":
        engs[name].cache.overlap = False
params = SamplingParams(max_tokens=16)
times = {n: [] for n in engs}
over = {n: [] for n in engs}
for rnd in range(int(sys.argv[3]) if len(sys.argv) > 3 else 8):
    for name, eng in (engs.items() if rnd % 2 == 0 else reversed(list(engs.items()))):
        s0 = eng.loader.stats.seconds
        t = time.perf_counter()
        for i in range(0, len(exs), 4):
            eng.generate([e.prompt for e in exs[i:i+4]], params, tasks=[e.task for e in exs[i:i+4]])
        dt = time.perf_counter() - t
        times[name].append(dt); over[name].append((eng.loader.stats.seconds - s0) / dt)
        print(name, rnd, f"{dt:.3f}s overhead {over[name][-1]:.4f}", flush=True)
for n in times:
    print(n, "median s", f"{statistics.median(times[n]):.3f}", "overhead", f"{statistics.median(over[n]):.4f}")
ratios = [a / b for a, b in zip(times["together"], times["overlapped"])]
print("together/overlapped per round", " ".join(f"{r:.3f}" for r in ratios), "median", f"{statistics.median(ratios):.3f}")
