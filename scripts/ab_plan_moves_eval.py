"""emoe eval's emoe-a-host from disk (the embedded model's int8 forms), a plan's admissions read together
(FormDiskStore.stage_keys) against one after another, alternated in one process: docs/results/plan_moves.txt.

    python scripts/ab_plan_moves_eval.py
"""
from emoe import default_model_dir
from emoe.eval import Setup, evaluate, grid
from emoe.formstore import FormDiskStore
from emoe.profile import Profile
from emoe.commands import _predictors
prof_dir = "emoe/models/emoe-tiny/profile"
prof = Profile.load(prof_dir, default_model_dir())
real = FormDiskStore.stage_keys
for rnd in range(2):
    for name in ("together", "one by one"):
        FormDiskStore.stage_keys = real if name == "together" else None
        setup = Setup(prof, _predictors(prof_dir, ["emoe-a-host"]))
        recs = evaluate(default_model_dir(), grid(setup, ["emoe-a-host"], [0.4, 0.2]), n=48, experts_on="disk",
                        host_int8=True, similarity=lambda a, b: [1.0] * len(a), log=lambda m: None)
        for r in recs:
            print(f"{name:10s} round {rnd} budget {r['budget']}: overhead {r['overhead_share']:.4f} move {r['move_share']:.4f} "
                  f"read {r['bytes_read'] / 2**20:.0f} MiB tok/s {r['tokens_per_s']:.1f}", flush=True)
