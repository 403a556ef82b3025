"""One task alone at a budget: its own task-static experts resident (plan_top on the profile's shares),
reference answers of the test split teacher-forced, top-1 agreement with the all-resident model and
per-layer coverage of the all-resident routing. Separates "the model is fragile" from "tasks share the
budget" in `emoe eval`'s mixed stream.

    python scripts/single_task.py [--budget 0.4] [--per-task 15] [--model DIR (its profile in DIR/profile)]
"""
import argparse

import torch

from emoe.datasets import TASKS, load_split
from emoe.engine import Engine, EngineConfig, SamplingParams
from emoe.loader import plan_top
from emoe.policies import Reroute
from emoe.profile import Profile

MODEL = "emoe/models/emoe-tiny"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--budget", type=float, default=0.4)
    ap.add_argument("--per-task", type=int, default=15)
    ap.add_argument("--model", default=MODEL)
    args = ap.parse_args()
    model = args.model
    prof = Profile.load(model + "/profile", model)
    shares, pop = prof.task_static(), prof.popular()
    ref = Engine(EngineConfig(model, miss_policy="all", max_batch=1, experts_on="ram", trace=True))
    eng = Engine(EngineConfig(model, budget=args.budget, max_batch=1, experts_on="ram"), policy=Reroute())
    print(f"budget {args.budget}: task, experts per layer, agreement, coverage per layer")
    for task in TASKS:
        eng.loader.apply(plan_top(shares[task], eng.cache.capacity, prof.moe_layers, prof.top_k, pop))
        mask = eng.cache.mask.cpu()
        agree = n = 0
        cov = torch.zeros(2, len(prof.moe_layers))
        for ex in load_split("test", task)[: args.per_task]:
            p = eng.make_request(ex.prompt, SamplingParams(max_tokens=1), task).prompt_ids
            ans = eng.codec.encode(ex.answer)[:64]
            if not ans or len(p) + len(ans) > eng.max_len:
                continue
            want = ref.score(p, ans, task).argmax(-1)
            tr = ref.last_score_trace.total.float()
            for j, layer in enumerate(prof.moe_layers):
                cov[0, j] += tr[layer][mask[layer]].sum()
                cov[1, j] += tr[layer].sum()
            agree += int((eng.score(p, ans, task).argmax(-1) == want).sum())
            n += len(ans)
        sizes = [len(eng.cache.resident(layer)) for layer in prof.moe_layers]
        print(f"{task:14} {sizes} agreement {agree / max(n, 1):.3f} coverage "
              f"{[round(float(c), 2) for c in cov[0] / cov[1].clamp_min(1)]}")


if __name__ == "__main__":
    main()
