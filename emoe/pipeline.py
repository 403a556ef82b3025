"""The eMoE pipeline's subcommands: profile a model, train its predictors, evaluate every policy against them, rescore
an evaluation, analyze routing (the parser is in cli.py; serving's commands are in commands.py)."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from .commands import _model, _predictors


def cmd_profile(args) -> None:
    from . import datasets
    from .profile import run_profile
    datasets.use(args.data)
    prof = run_profile(_model(args), args.out, per_task=args.per_task, max_tokens=args.max_tokens,
                       sens_prompts=args.sens_prompts, budget=args.budget, experts_on=args.experts_on,
                       dtype=args.dtype)
    print(f"profile written to {args.out}: {len(prof.traces)} traces, load latency "
          f"{prof.load_latency_s * 1e3:.2f} ms/expert")
    print(sensitivity_table(prof))


def sensitivity_table(prof) -> str:
    lines = [f"{'task':14} {'out len':>7}  similarity with first m MoE layers random (m=1..)   s per layer"]
    for t in prof.tasks:
        curve = " ".join(f"{x:.2f}" for x in prof.similarity[t])
        lines.append(f"{t:14} {prof.out_len[t]:>7.1f}  {curve:42}  {prof.sensitivity[t]}")
    return "\n".join(lines)


def cmd_eval(args) -> None:
    from . import datasets
    from .eval import EXTRA, POLICIES, Setup, evaluate, grid, known, plot, table, versus_table
    from .profile import Profile
    model = _model(args)
    prof = Profile.load(args.profile, model)
    datasets.use(prof.data)  # a profile of the user's prompts is evaluated on their test split
    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    unknown = [p for p in policies if not known(p)]
    if unknown:
        raise ValueError(f"unknown policies {unknown}; choose from {', '.join(POLICIES + EXTRA)} "
                         f"(a reroute policy + -q4/-q8 serves misses from shadow copies)")
    predictors = _predictors(args.profile, policies)
    setup = Setup(prof, predictors, p=args.p, adaptive=args.adaptive, stickiness=args.stickiness)
    configs = grid(setup, policies, args.budgets)
    for p in args.p_sweep or []:
        configs.append((f"emoe-a p={p}", "emoe-a", args.sweep_budget, Setup(prof, predictors, p=p)))
    for label, adaptive_p in (("emoe-a adaptive", True),) if args.adaptive_compare else ():
        configs.append((label, "emoe-a", args.sweep_budget, Setup(prof, predictors, p=args.p, adaptive=True)))
    if args.similarity == "deferred" and not args.json:
        raise ValueError("--similarity deferred keeps the texts for `emoe rescore`: give --json OUT")
    from .eval import deferred_similarity
    recs = evaluate(model, configs, n=args.n, max_tokens=args.max_tokens, batch=args.batch,
                    log=lambda m: print(m, file=sys.stderr), group_window=args.group_window, dtype=args.dtype,
                    unlabelled=args.unlabelled, experts_on=args.experts_on, host_int8=args.host_int8,
                    seed=args.seed, split=args.split, reference_budget=args.reference_budget,
                    similarity=deferred_similarity if args.similarity == "deferred" else None)
    print(table(recs))
    if args.versus:
        print("\n" + versus_table(recs, args.versus))
    print()
    print(sensitivity_table(prof))
    if args.json:
        Path(args.json).write_text(json.dumps(recs, indent=1))
    if args.plot:
        plot([r for r in recs if known(r["policy"])], args.plot)


def cmd_rescore(args) -> None:
    from .eval import rescore, table, versus_table
    path = Path(args.json)
    try:
        recs = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not an `emoe eval --json` file: {e}") from None
    if not isinstance(recs, list) or not all(isinstance(r, dict) for r in recs):
        raise ValueError(f"{path} is not an `emoe eval --json` file: expected a list of records")
    recs = rescore(recs)
    path.write_text(json.dumps(recs, indent=1))
    print(table(recs))
    if args.versus:
        print("\n" + versus_table(recs, args.versus))


def cmd_train_predictor(args) -> None:
    from . import datasets
    from .eval import test_stream
    from .predictor import Predictor, baselines, evaluate, hindsight, loader_sizes
    from .profile import Profile, exact_engine, trace_stream
    from .traces import load_traces, save_traces
    model = _model(args)
    prof = Profile.load(args.profile, model)
    datasets.use(prof.data)  # a profile of the user's prompts is tested on their test split
    test_path = Path(args.profile) / "test_traces.jsonl"
    if not test_path.is_file():  # traced once from the test split; never used for fitting
        _, reqs, _ = trace_stream(model, test_stream(args.test_n, seed=1), args.max_tokens,
                                  **exact_engine(args.trace_budget, args.experts_on, args.dtype))
        save_traces([r.trace for r in reqs], test_path)
    test = load_traces(test_path)
    methods = {}
    for kind in ("a", "l") + (("u",) if args.unlabelled else ()):  # u: eMoE-A fitted for unlabelled traffic too
        t0 = time.perf_counter()
        pred = Predictor.fit(prof.traces, kind="a" if kind == "u" else kind, unlabelled=kind == "u")
        pred.save(Path(args.profile) / f"predictor-{kind}")
        print(f"eMoE-{kind.upper()}: fitted on {len(prof.traces)} profile traces in {time.perf_counter() - t0:.1f}s, "
              f"{pred.nbytes / 1e3:.0f} kB", file=sys.stderr)
        methods[f"emoe-{kind}"] = pred
    methods |= baselines(prof.traces)
    n_res = max(prof.top_k, round(args.budget * prof.num_experts))
    report = []
    print(f"test split: {len(test)} traces; {n_res} of {prof.num_experts} experts resident per layer (budget {args.budget})")
    print(f"{'method':16} {'p':>3} {'precision':>9} {'recall':>7} {'F1':>6} {'coverage':>8}")
    # uniform: n_res in every layer (the paper's metric); loader: the same bytes split over layers as the
    # loader splits them for that prediction, i.e. the sets that would actually be resident
    capacity = n_res * len(prof.moe_layers)
    sizings = {"uniform": n_res, "loader": loader_sizes(capacity, prof.moe_layers, prof.top_k)}
    for sizing, n in sizings.items():
        if sizing == "loader":
            print(f"L per layer as the loader splits {capacity} experts over the layers:")
        for p in args.p:
            for name, fn in methods.items():
                r = evaluate(fn, test, n, p=p, history=prof.traces)
                report.append({"method": name, "p": p, "sizing": sizing,
                               **{k: r[k] for k in ("precision", "recall", "f1", "coverage")}})
                print(f"{name:16} {p:>3} {r['precision']:>9.3f} {r['recall']:>7.3f} {r['f1']:>6.3f} "
                      f"{r['coverage']:>8.3f}")
        r = hindsight(test, n, prof.moe_layers)  # each prompt's own routing: the ceiling for any predictor
        report.append({"method": "oracle", "p": None, "sizing": sizing,
                       **{k: r[k] for k in ("precision", "recall", "f1", "coverage")}})
        print(f"{'oracle':16} {'-':>3} {r['precision']:>9.3f} {r['recall']:>7.3f} {r['f1']:>6.3f} {r['coverage']:>8.3f}")
    (Path(args.profile) / "predictor_report.json").write_text(json.dumps(report, indent=1))


def cmd_analyze(args) -> None:
    from . import analysis
    rep = analysis.analyze(_model(args), per_task=args.per_task)
    print(analysis.summary(rep))
    if args.plot:
        analysis.heatmap(rep, args.plot)
    if args.json:
        analysis.save(rep, args.json)
