"""emoe eval's emoe-a-host from disk (the embedded model's int8 forms), a plan's admissions read together
(FormDiskStore.stage_keys) against one after another, alternated in one process: docs/results/plan_moves.txt.

    python scripts/ab_plan_moves_eval.py [--rounds 2]
"""
from __future__ import annotations

import argparse
from pathlib import Path

from emoe import default_model_dir
from emoe.commands import _predictors
from emoe.eval import Setup, evaluate, grid
from emoe.formstore import FormDiskStore
from emoe.profile import Profile


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=2)
    a = ap.parse_args()
    model = default_model_dir()
    prof_dir = str(Path(model) / "profile")
    prof = Profile.load(prof_dir, model)
    together = FormDiskStore.stage_keys
    for rnd in range(a.rounds):
        for name in ("together", "one by one"):
            FormDiskStore.stage_keys = together if name == "together" else None  # cache.set_resident asks by name
            setup = Setup(prof, _predictors(prof_dir, ["emoe-a-host"]))
            recs = evaluate(model, grid(setup, ["emoe-a-host"], [0.4, 0.2]), n=48, experts_on="disk", host_int8=True,
                            similarity=lambda x, y: [1.0] * len(x), log=lambda m: None)
            for r in recs:
                print(f"{name:10s} round {rnd} budget {r['budget']}: overhead {r['overhead_share']:.4f} "
                      f"move {r['move_share']:.4f} read {r['bytes_read'] / 2**20:.0f} MiB tok/s {r['tokens_per_s']:.1f}",
                      flush=True)


if __name__ == "__main__":
    main()
