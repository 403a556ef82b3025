"""emoe eval's emoe-a-host (or --policy) from disk (the embedded model's int8 forms), alternated in one process: a plan's admissions
read in the background while serving computes (cache.overlap, the default), read together before set_resident
returns (FormDiskStore.stage_keys), or one after another: docs/results/plan_moves.txt.

    python scripts/ab_plan_moves_eval.py [--rounds 2] [--arms overlapped,together,one-by-one]
"""
from __future__ import annotations

import argparse
from pathlib import Path

from emoe import default_model_dir
from emoe.commands import _predictors
from emoe.eval import Setup, evaluate, grid
from emoe.formstore import FormDiskStore
from emoe.profile import Profile

ARMS = ("overlapped", "together", "one-by-one")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--arms", default=",".join(ARMS[:2]), help=f"comma-separated, of {', '.join(ARMS)}")
    ap.add_argument("--n", type=int, default=48, help="requests per run")
    ap.add_argument("--policy", default="emoe-a-host", help="emoe-a (rerouting) reads nothing but plan moves")
    a = ap.parse_args()
    arms = a.arms.split(",")
    if not set(arms) <= set(ARMS):
        ap.error(f"--arms: choose from {', '.join(ARMS)}")
    model = default_model_dir()
    prof_dir = str(Path(model) / "profile")
    prof = Profile.load(prof_dir, model)
    prefetch, together = FormDiskStore.prefetch, FormDiskStore.stage_keys
    for rnd in range(a.rounds):
        for name in arms:  # cache.overlap and cache.set_resident look these up by name
            FormDiskStore.prefetch = prefetch if name == "overlapped" else None
            FormDiskStore.stage_keys = None if name == "one-by-one" else together
            setup = Setup(prof, _predictors(prof_dir, [a.policy]))
            recs = evaluate(model, grid(setup, [a.policy], [0.4, 0.2]), n=a.n, experts_on="disk", host_int8=True,
                            similarity=lambda x, y: [1.0] * len(x), log=lambda m: None)
            for r in recs:
                print(f"{name:10s} round {rnd} budget {r['budget']}: overhead {r['overhead_share']:.4f} "
                      f"move {r['move_share']:.4f} stall {r['stall_share']:.4f} read {r['bytes_read'] / 2**20:.0f} MiB "
                      f"hit {r['hit_rate']:.3f} tok/s {r['tokens_per_s']:.1f}", flush=True)


if __name__ == "__main__":
    main()
