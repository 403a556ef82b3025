"""Where the predictor has something to learn: traffic without task labels whose content drifts.

The profile's traces (training split) and the shipped test-split traces are relabelled with one label
("unlabelled": no extractor knows these tasks) and replayed in phases: `--phase` consecutive prompts
of one true task, then another, as when an application's traffic shifts over the day. Task-static
then knows only the global mix; the predictors see the recent routing. Set metrics are the same as
`emoe train-predictor` (top-n experts per layer vs the experts covering 90% of the prompt's tokens).

    python scripts/drift_predictor.py [--phase 10] [--resident 6] [--p 1,10,40]
"""
import argparse
import random
from dataclasses import replace

from emoe.predictor import Predictor, baselines, evaluate
from emoe.traces import load_traces

PROFILE = "emoe/models/emoe-tiny/profile"


def phased(traces, phase: int, seed: int):
    """Relabel every trace 'unlabelled' and order them in phases of `phase` prompts of one true task."""
    rng, by = random.Random(seed), {}
    for t in traces:
        by.setdefault(t.task, []).append(t)
    queues = {k: list(v) for k, v in by.items()}
    out = []
    while any(queues.values()):
        task = rng.choice(sorted(k for k, v in queues.items() if v))
        out += [replace(t, task="unlabelled") for t in queues[task][:phase]]
        queues[task] = queues[task][phase:]
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--phase", type=int, default=10)
    ap.add_argument("--resident", type=int, default=6)
    ap.add_argument("--p", default="1,10,40")
    args = ap.parse_args()
    train = phased(load_traces(f"{PROFILE}/traces.jsonl"), 2 * args.phase, seed=0)
    test = phased(load_traces(f"{PROFILE}/test_traces.jsonl"), args.phase, seed=1)
    methods = {f"emoe-{k}": Predictor.fit(train, kind=k) for k in ("a", "l")}
    methods |= baselines(train)
    print(f"{len(train)} train / {len(test)} test traces, one label, phases of {args.phase} test prompts; "
          f"{args.resident} experts per layer")
    print(f"{'method':16} {'p':>8} {'calls':>5} {'precision':>9} {'recall':>7} {'F1':>6} {'coverage':>8}")
    runs = [(int(x), False) for x in args.p.split(",")] + [(int(x), True) for x in args.p.split(",")[1:]]
    for p, adaptive in runs:
        for name, fn in methods.items():
            r = evaluate(fn, test, args.resident, p=p, history=train, adaptive=adaptive)
            label = f"{p}{' adapt' if adaptive else ''}"
            print(f"{name:16} {label:>8} {r['calls']:>5} {r['precision']:>9.3f} {r['recall']:>7.3f} "
                  f"{r['f1']:>6.3f} {r['coverage']:>8.3f}")


if __name__ == "__main__":
    main()
