"""Time a residency plan's moves on the disk forms tier (emoe/formstore.py): the fast tier switches between two
plans that share no expert, so every move evicts one plan's experts and reads the other's from disk. Alternates,
in one process, the plan's admissions read together (FormDiskStore.stage_keys: concurrent reads) against one
after another. Prints seconds per move and the read rate.

    python scripts/bench_plan_moves.py --host-int8                      # the embedded model, int8 forms
    python scripts/bench_plan_moves.py --model runs/big/import --budget 0.3
"""
from __future__ import annotations

import argparse
import statistics
import time

from emoe import default_model_dir
from emoe.engine import Engine, EngineConfig


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="default: the embedded model")
    ap.add_argument("--budget", type=float, default=0.4)
    ap.add_argument("--host-int8", action="store_true", help="full-precision experts as int8 forms")
    ap.add_argument("--moves", type=int, default=8, help="moves per round and setting")
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    cfg = dict(budget=a.budget, miss_policy="host", experts_on="disk", host_int8=a.host_int8, device="cpu")
    eng = Engine(EngineConfig(a.model or default_model_dir(), **cfg))
    cache, store = eng.cache, eng.store
    if not hasattr(store, "stage_keys"):
        raise SystemExit("not the disk forms tier: pass --host-int8 for a full-precision model, or a packed one")
    layers, E = eng.cfg.moe_layers, cache.num_experts
    per = min(cache.capacity // len(layers), E // 2)  # two plans of `per` experts a layer, sharing none
    plans = [{l: list(range(per)) for l in layers}, {l: list(range(E - per, E)) for l in layers}]
    staged = store.stage_keys
    print(f"{len(layers)} layers x {per} experts a move ({per * len(layers) * cache.expert_bytes / 2**20:.1f} MiB)")
    cache.set_resident(plans[0])
    times: dict[str, list[float]] = {"together": [], "one by one": []}
    for _ in range(a.rounds):
        for name in times:
            store.stage_keys = staged if name == "together" else None  # cache.set_resident asks for it by name
            for i in range(a.moves):
                t0 = time.perf_counter()
                cache.set_resident(plans[(i + 1) % 2])
                times[name].append(time.perf_counter() - t0)
            cache.set_resident(plans[0])
    mib = per * len(layers) * cache.expert_bytes / 2**20
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"{name:10s} median {med * 1e3:7.1f} ms a move ({mib / med:6.0f} MiB/s), "
              f"per round {' '.join(f'{statistics.median(ts[r * a.moves:(r + 1) * a.moves]) * 1e3:.1f}' for r in range(a.rounds))} ms")


if __name__ == "__main__":
    main()
