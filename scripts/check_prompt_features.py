"""Can a prompt's own routing predict its other layers beyond its task's mean (task-static)? PAPER.md suggests "cheap
prompt features (e.g. the first layer's router output)" as predictor input. This probe gives a softmax regression the
prompt's actual first-MoE-layer prefill shares (what the first layer's router says, and more: after attention), with
the task one-hot and their products, on top of the task-static log-prior; fitted on the profile's training traces,
scored as `emoe train-predictor` scores (set F1 and coverage at the loader's per-layer L, 40% budget) on its test traces.
Then the other way a predictor could beat the task's mean, recent history: the test traces served with each task's
prompts in order along the first principal component of their routing shares (the strongest within-task drift these
prompts allow), tasks interleaved at random, against the same traces in arrival order.

    python scripts/check_prompt_features.py [--profile emoe/models/emoe-tiny/profile] [--budget 0.4]
"""
from __future__ import annotations

import argparse
import random
from pathlib import Path

import torch

from emoe.predictor import Predictor, _norm, baselines, evaluate, loader_sizes, set_metrics, task_static
from emoe.profile import Profile
from emoe.traces import load_traces


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--profile", default="emoe/models/emoe-tiny/profile")
    ap.add_argument("--budget", type=float, default=0.4)
    args = ap.parse_args()
    prof, d = Profile.load(args.profile), Path(args.profile)
    train, test = load_traces(d / "traces.jsonl"), load_traces(d / "test_traces.jsonl")
    static, tasks = task_static(train), sorted(task_static(train))
    L, E = train[0].total.shape
    moe = list(prof.moe_layers)
    sizes = loader_sizes(int(args.budget * len(moe) * E), moe, prof.top_k)

    def feats(t):
        f0, hot = _norm(t.prefill[moe[0]].float()[None])[0], torch.zeros(len(tasks))
        hot[tasks.index(t.task)] = 1
        return torch.cat([hot, f0, (hot[:, None] * f0[None]).flatten()])

    def prior(ts):
        return torch.stack([torch.log(_norm(static[t.task].float() + 1e-4)) for t in ts]).flatten(1)

    X, P = torch.stack([feats(t) for t in train]), prior(train)
    Y = torch.stack([_norm(t.total.float()) for t in train])[:, moe]
    Xt, Pt = torch.stack([feats(t) for t in test]), prior(test)
    print(f"{len(train)} training / {len(test)} test traces, {len(moe)} MoE layers x {E} experts, budget {args.budget}")
    print(f"{'predictor':28} {'layers':>8} {'F1':>7} {'coverage':>9} {'train KL':>9}")
    for wd in (0.0, 1e-5, 1e-4):
        W = torch.zeros(X.shape[1], L * E, requires_grad=True)
        opt = torch.optim.Adam([W], lr=1e-2)
        for _ in range(800):
            opt.zero_grad()
            logp = torch.log_softmax((P + X @ W).view(-1, L, E)[:, moe], -1)
            loss = (Y * (torch.log(Y.clamp_min(1e-12)) - logp)).sum(-1).mean() + wd * W.pow(2).sum()
            loss.backward()
            opt.step()
        with torch.no_grad():
            pred = torch.softmax((Pt + Xt @ W).view(-1, L, E), -1)
            kl0 = (Y * (torch.log(Y.clamp_min(1e-12)) - torch.log_softmax(P.view(-1, L, E)[:, moe], -1))).sum(-1).mean()
        for name, fn, kl in ((f"prompt features, wd {wd:g}", lambda i, t: pred[i], loss.item()),
                             ("task-static", lambda i, t: static[t.task].float(), kl0.item())):
            for lay, label in ((moe, "all"), (moe[1:], "after 1st")):
                rows = [set_metrics(fn(i, t), t.total, sizes(fn(i, t)), lay) for i, t in enumerate(test)]
                f1, cov = (sum(r[k] for r in rows) / len(rows) for k in ("f1", "coverage"))
                print(f"{name:28} {label:>9} {f1:7.4f} {cov:9.4f} {kl:9.4f}")


    print(f"\n{'stream':8} {'p':>3} {'predictor':16} {'F1':>7} {'coverage':>9}")
    methods = {"emoe-a": Predictor.load(d / "predictor-a"), **baselines(train)}
    for order, stream in (("arrival", test), ("phased", phased(test))):
        for p in (1, 10):
            for name, fn in methods.items():
                r = evaluate(fn, stream, sizes, p=p, history=train)
                print(f"{order:8} {p:>3} {name:16} {r['f1']:7.4f} {r['coverage']:9.4f}")


def phased(traces, seed: int = 0):
    """Each task's traces sorted along the first principal component of their routing shares; tasks interleaved."""
    by: dict = {}
    for t in traces:
        by.setdefault(t.task, []).append(t)
    for ts in by.values():
        X = torch.stack([_norm(t.total.float()).flatten() for t in ts])
        pc = torch.linalg.svd(X - X.mean(0), full_matrices=False).Vh[0]
        ts.sort(key=lambda t: float(_norm(t.total.float()).flatten() @ pc))
    rng, out = random.Random(seed), []
    while any(by.values()):
        out.append(by[rng.choice(sorted(k for k, v in by.items() if v))].pop(0))
    return out


if __name__ == "__main__":
    main()
