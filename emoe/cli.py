"""`emoe` command line: it only parses arguments and wires modules together."""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from . import default_model_dir


def _model_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="HF checkpoint folder (default: the embedded emoe-tiny model)")


def _model(args) -> str:
    path = args.model or default_model_dir()
    if args.model is None and not (Path(path) / "model.safetensors").is_file():
        sys.exit(f"emoe: the embedded model is missing at {path}; train it with `emoe train-model` or pass --model")
    return path


def _slo(text: str):
    from .serving import parse_slo
    try:
        return parse_slo(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _floats(text: str) -> list[float]:
    try:
        vals = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not vals or any(not 0 < v <= 1 for v in vals):
        raise argparse.ArgumentTypeError(f"budgets must be fractions in (0, 1], got {text!r}")
    return vals


def _profile_dir(args, model: str, required: bool = False) -> str | None:
    """--profile, else the profile shipped inside the model folder (the embedded model has one)."""
    if getattr(args, "profile", None):
        return args.profile
    shipped = Path(model) / "profile"
    if (shipped / "profile.json").is_file():
        return str(shipped)
    if required:
        raise ValueError(f"no profile: pass --profile (create one with `emoe profile --model {model} --out DIR`)")
    return None


def _warn_unprofiled(args, model: str, prof_dir: str | None) -> None:
    if prof_dir is None and args.budget < 1.0 and args.miss_policy == "reroute":
        print(f"[emoe] {model} has no profile: misses are rerouted over an even split of the budget, which "
              f"changes outputs; profile it (`emoe profile --model {model} --out DIR --budget {args.budget:g}`, "
              f"then --profile DIR) or pass --miss-policy auto (exact: misses run in the slow tier, or are loaded where "
              f"that is faster)", file=sys.stderr)


def _residency(model: str, profile_dir: str, name: str | None, stickiness: float = 0.0):
    """(miss policy, residency factory, profile) for a named policy. Default: eMoE-A (task-static without a
    predictor) with int4/int8 copies of the experts not held in full: at 40% of expert bytes it keeps
    0.98 teacher-forced agreement where the paper's rerouting keeps 0.42 (README, Results)."""
    from .eval import Setup, build
    from .profile import Profile
    prof = Profile.load(profile_dir, model)
    if name is None:
        name = "emoe-a-q48" if (Path(profile_dir) / "predictor-a").is_dir() else "task-static-q48"
    policy, residency = build(name, Setup(prof, _predictors(profile_dir, [name]), stickiness=stickiness))
    return policy, residency, prof, name


def _dtype_arg(p) -> None:
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16"],
                   help="fast-tier and compute dtype (default: float32 on CPU, where bf16 matmuls are often slow; "
                   "the checkpoint's on CUDA). bfloat16 halves what each full expert costs in the fast tier")


def cmd_generate(args) -> None:
    from .engine import Engine, EngineConfig, SamplingParams
    model = _model(args)
    policy = residency = None
    task = args.task
    prof_dir = _profile_dir(args, model) if args.budget < 1.0 and args.miss_policy == "reroute" else None
    if args.policy is not None and prof_dir is None:
        raise ValueError("--policy needs a profile and --miss-policy reroute with a budget below 1.0")
    _warn_unprofiled(args, model, _profile_dir(args, model))
    if prof_dir:  # eMoE residency from the profile; the task from the prompt unless given
        from .tasks import TaskExtractor
        policy, residency, prof, name = _residency(model, prof_dir, args.policy)
        if prof.extractor:
            task = TaskExtractor.from_json(prof.extractor).extract(args.prompt, task)
    eng = Engine(EngineConfig(model, budget=args.budget, miss_policy=policy.name if policy else args.miss_policy,
                              experts_on=args.experts_on, max_batch=1, dtype=args.dtype), policy=policy,
                 residency=residency)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                            seed=args.seed)
    t0 = time.perf_counter()
    (req,) = eng.generate([args.prompt], params, tasks=[task], chat=not args.raw)
    print(eng.text(req))
    how = f", {name} residency, task {task}" if prof_dir else ""
    print(eng.summary(time.perf_counter() - t0) + how, file=sys.stderr)


def cmd_train_model(args) -> None:
    import torch
    from .train import TrainConfig, train
    torch.set_num_threads(args.threads)
    out = Path(args.out or default_model_dir())
    cfg = TrainConfig(minutes=args.minutes, seq=args.seq, batch=args.batch, lr=args.lr, seq_entropy=args.seq_entropy,
                      trainable=args.trainable)
    general = Path(args.general_text) if args.general_text else None
    if general is not None and not general.is_file():
        sys.exit(f"emoe: general text {general} not found; build it with `python scripts/build_data.py --general-text`")
    print(train(out, Path(args.run_dir), general, cfg, overwrite=args.overwrite,
                init=Path(args.init) if args.init else None))


def cmd_quantize(args) -> None:
    """int4/int8 copies of every expert, once, beside the checkpoint: shadow policies read them at startup."""
    from .checkpoint import Checkpoint
    from .quant import save_copies
    from .store import open_store
    model = _model(args)
    ckpt = Checkpoint(model)
    store, t0 = open_store(ckpt, "disk"), time.perf_counter()
    for b in args.bits:
        path = save_copies(model, store, sorted(ckpt.experts), b)
        print(f"{path}: {path.stat().st_size / 2**20:.1f} MiB, {time.perf_counter() - t0:.1f} s")


def cmd_profile(args) -> None:
    from .profile import run_profile
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
    from .eval import EXTRA, POLICIES, Setup, evaluate, grid, known, plot, table, versus_table
    from .profile import Profile
    model = _model(args)
    prof = Profile.load(args.profile, model)
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


def _predictors(profile_dir: str, policies: list[str]) -> dict:
    from .predictor import Predictor
    out = {}
    for kind in ("a", "l"):
        d = Path(profile_dir) / f"predictor-{kind}"
        if d.is_dir():
            out[kind] = Predictor.load(d)
    need = {"emoe-a": "a", "emoe-e": "a", "emoe-l": "l", "emoe-a-hybrid": "a", "emoe-a-prompt": "a",
            "emoe-a-sticky": "a", "emoe-a-selective": "a"}
    missing = sorted({need[p] for p in policies if p in need and need[p] not in out})
    if missing:
        raise ValueError(f"{profile_dir} has no predictor-{missing[0]}; run `emoe train-predictor {profile_dir}`")
    return out


def cmd_train_predictor(args) -> None:
    from .eval import test_stream
    from .predictor import Predictor, baselines, evaluate, hindsight, loader_sizes
    from .profile import Profile, exact_engine, trace_stream
    from .traces import load_traces, save_traces
    model = _model(args)
    prof = Profile.load(args.profile, model)
    test_path = Path(args.profile) / "test_traces.jsonl"
    if not test_path.is_file():  # traced once from the test split; never used for fitting
        _, reqs, _ = trace_stream(model, test_stream(args.test_n, seed=1), args.max_tokens,
                                  **exact_engine(args.trace_budget, args.experts_on, args.dtype))
        save_traces([r.trace for r in reqs], test_path)
    test = load_traces(test_path)
    methods = {}
    for kind in ("a", "l"):
        t0 = time.perf_counter()
        pred = Predictor.fit(prof.traces, kind=kind)
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


def cmd_serve(args) -> None:
    import uvicorn

    from .engine import Engine, EngineConfig
    from .metrics import Metrics
    from .server import create_app, serve_threads
    from .serving import EngineLoop
    model = _model(args)
    prof = extractor = policy = residency = None
    prof_dir = _profile_dir(args, model)
    _warn_unprofiled(args, model, prof_dir)
    if prof_dir:  # profiled costs and task extractor for the scheduler; the eMoE loader when rerouting
        from .profile import Profile
        from .tasks import TaskExtractor
        prof = Profile.load(prof_dir, model)
        extractor = TaskExtractor.from_json(prof.extractor) if prof.extractor else None
        if args.miss_policy == "reroute" and args.budget < 1.0:
            policy, residency, prof, name = _residency(model, prof_dir, args.policy, args.stickiness)
            print(f"[emoe] residency policy {name} (stickiness {args.stickiness:g}), miss policy {policy.name}",
                  file=sys.stderr)
    if args.policy is not None and residency is None:
        raise ValueError("--policy needs a profile and --miss-policy reroute with a budget below 1.0")
    import torch
    torch.set_num_threads(serve_threads(args.threads))
    print(f"[emoe] engine threads {torch.get_num_threads()}", file=sys.stderr)
    eng = Engine(EngineConfig(model, budget=args.budget, miss_policy=policy.name if policy else args.miss_policy,
                              experts_on=args.experts_on, max_batch=args.max_batch, max_len=args.max_len,
                              prefill_chunk=args.prefill_chunk,
                              dtype=args.dtype,
                              memory_bytes=int(args.memory_mb * 2**20) if args.memory_mb else None),
                 policy=policy, residency=residency)
    served = args.served_model_name or Path(model).name
    from .scheduler import make_scheduler
    loop = EngineLoop(eng, make_scheduler(args.scheduler, args.admission_control), prof, max_waiting=args.max_waiting, token_budget=args.token_budget,
                      metrics=Metrics(served))
    app = create_app(loop, served, args.api_key, extractor, default_slos=dict(args.slo or []),
                     shutdown_grace_s=args.grace)

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):  # SIGINT/SIGTERM: new requests get 503 while in-flight ones finish
            loop.stop_accepting()
            super().handle_exit(sig, frame)

    print(f"[emoe] serving {served} ({args.scheduler} scheduler, budget {args.budget}) on "
          f"http://{args.host}:{args.port}/v1", file=sys.stderr)
    try:
        Server(uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                              timeout_graceful_shutdown=max(1, int(args.grace)))).run()
    except KeyboardInterrupt:  # uvicorn re-raises the captured SIGINT after its graceful shutdown
        pass


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="emoe", description="task-aware memory-efficient MoE inference")
    sub = ap.add_subparsers(dest="cmd", required=True)

    g = sub.add_parser("generate", help="generate text for one prompt")
    g.add_argument("prompt")
    _model_arg(g)
    g.add_argument("--budget", type=float, default=1.0, help="fraction of routed-expert bytes kept resident")
    g.add_argument("--miss-policy", default="reroute", choices=["reroute", "load", "host", "auto", "all"],
                   help="without a profile: reroute a miss, load it (LRU), run it on the host CPU in place, or "
                   "auto: on the host for few tokens, loaded for many (break-even measured at start)")
    g.add_argument("--experts-on", default="disk", choices=["disk", "ram"])
    g.add_argument("--max-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--raw", action="store_true", help="do not apply the chat template")
    g.add_argument("--task", default=None, help="task of the prompt (default: extracted from it)")
    g.add_argument("--profile", default=None, help="profile folder (default: the one shipped with the model)")
    g.add_argument("--policy", default=None, help="residency policy (default: emoe-a-q48 when a predictor exists, "
                   "else task-static-q48); the -q4 / -q8 / -q48 suffix runs misses on low-bit copies, without it "
                   "they are rerouted (the paper's rule, far less exact)")
    _dtype_arg(g)
    g.set_defaults(fn=cmd_generate)

    from .bench.cli import add_parsers
    add_parsers(sub.add_parser("bench", help="benchmarks").add_subparsers(dest="bench", required=True))

    qz = sub.add_parser("quantize", help="write int4/int8 copies of every expert beside the checkpoint")
    _model_arg(qz)
    qz.add_argument("--bits", type=lambda t: [int(x) for x in t.split(",")], default=[4, 8])
    qz.set_defaults(fn=cmd_quantize)

    pr = sub.add_parser("profile", help="routing traces, output lengths, load latency and sensitivity")
    _model_arg(pr)
    pr.add_argument("--out", required=True, help="profile folder to write")
    pr.add_argument("--per-task", type=int, default=40, help="training prompts per task")
    pr.add_argument("--max-tokens", type=int, default=48)
    pr.add_argument("--sens-prompts", type=int, default=8, help="prompts per task for the sensitivity probe")
    pr.add_argument("--budget", type=float, default=1.0, help="for a model larger than memory: keep this share of "
                    "expert bytes in the fast tier and run the rest in the slow tier (same traces and outputs)")
    pr.add_argument("--experts-on", default="disk", choices=["disk", "ram"])
    _dtype_arg(pr)
    pr.set_defaults(fn=cmd_profile)

    tp = sub.add_parser("train-predictor", help="fit eMoE-A/L predictors on a profile; report set metrics on the test split")
    tp.add_argument("profile")
    _model_arg(tp)
    tp.add_argument("--budget", type=float, default=0.4, help="sets experts resident per layer for the metrics")
    tp.add_argument("--p", type=lambda t: [int(x) for x in t.split(",")], default=[1, 10, 40])
    tp.add_argument("--test-n", type=int, default=120)
    tp.add_argument("--max-tokens", type=int, default=48)
    tp.add_argument("--trace-budget", type=float, default=1.0, help="as profile's --budget, for tracing the test split")
    tp.add_argument("--experts-on", default="disk", choices=["disk", "ram"])
    _dtype_arg(tp)
    tp.set_defaults(fn=cmd_train_predictor)

    ev = sub.add_parser("eval", help="accuracy/memory/overhead of policies × budgets on the test split")
    _model_arg(ev)
    ev.add_argument("--profile", required=True)
    ev.add_argument("--budgets", type=_floats, default=_floats("0.8,0.6,0.4,0.2"))
    ev.add_argument("--policies", default=",".join(["all", "random", "popular", "task-static", "lru",
                                                    "moe-infinity", "pregated", "emoe-a", "emoe-l", "emoe-e"]))
    ev.add_argument("--n", type=int, default=60, help="requests in the mixed test stream")
    ev.add_argument("--seed", type=int, default=0, help="which test prompts, and in which task order")
    ev.add_argument("--reference-budget", type=float, default=1.0, help="for a model larger than memory: the "
                    "reference (all-resident) outputs with this share resident and the rest run in the slow tier")
    ev.add_argument("--split", default="test", choices=["test", "val"],
                    help="val for choosing designs and settings; test for reporting them")
    ev.add_argument("--versus", default=None, help="print every policy's paired difference from this one, with CIs")
    ev.add_argument("--max-tokens", type=int, default=48)
    ev.add_argument("--batch", type=int, default=4)
    ev.add_argument("--group-window", type=int, default=0, help="serve each W consecutive arrivals grouped by "
                    "task (batches of mostly one task); 0 = arrival order, as in the paper")
    ev.add_argument("--p", type=int, default=40, help="predictor period in prompts")
    ev.add_argument("--adaptive", action="store_true", help="eMoE policies re-predict early when coverage drops")
    ev.add_argument("--stickiness", type=float, default=0.0, help="task-static/eMoE plans: a resident expert "
                    "yields only to one expecting (1+H)x its tokens (fewer moves)")
    ev.add_argument("--adaptive-compare", action="store_true",
                    help="also run eMoE-A with adaptive p at --sweep-budget, beside fixed p")
    ev.add_argument("--p-sweep", type=lambda t: [int(x) for x in t.split(",")], default=None)
    ev.add_argument("--sweep-budget", type=float, default=0.4)
    ev.add_argument("--dtype", default=None, choices=["float32", "bfloat16"],
                    help="fast-tier/compute dtype (default float32 on CPU); bfloat16 prices experts as on a GPU")
    ev.add_argument("--similarity", default="embedding", choices=["embedding", "deferred"],
                    help="deferred: no embedding model here (e.g. a GPU box without the eval extra); "
                         "`emoe rescore` fills it in later from the texts --json keeps")
    ev.add_argument("--json", default=None)
    ev.add_argument("--plot", default=None)
    ev.set_defaults(fn=cmd_eval)

    rs = sub.add_parser("rescore", help="fill in embedding similarity of an `emoe eval --json` file from its texts")
    rs.add_argument("json")
    rs.add_argument("--versus", default=None, help="print every policy's paired difference from this one, with CIs")
    rs.set_defaults(fn=cmd_rescore)

    an = sub.add_parser("analyze", help="per-task perplexity, routing divergence and heat-map")
    _model_arg(an)
    an.add_argument("--per-task", type=int, default=100)
    an.add_argument("--plot", default=None, help="heat-map PNG (layers × experts per task)")
    an.add_argument("--json", default=None)
    an.set_defaults(fn=cmd_analyze)

    t = sub.add_parser("train-model", help="train the embedded model (resumable)")
    t.add_argument("--out", default=None, help="output folder (default: the package's embedded model)")
    t.add_argument("--run-dir", default="runs/train")
    t.add_argument("--general-text", default=str(Path.home() / ".cache/emoe-data/general.txt"))
    t.add_argument("--minutes", type=float, default=80)
    t.add_argument("--seq", type=int, default=384)
    t.add_argument("--batch", type=int, default=12)
    t.add_argument("--threads", type=int, default=2)
    t.add_argument("--overwrite", action="store_true", help="replace an existing model at --out")
    t.add_argument("--lr", type=float, default=3e-3)
    t.add_argument("--seq-entropy", type=float, default=0.0, help="per-sequence routing-entropy penalty")
    t.add_argument("--init", default=None, help="start from a previous --run-dir or an exported model folder "
                   "(fine-tuning; same tokenizer)")
    t.add_argument("--trainable", default="all", choices=["all", "router"],
                   help="router: fine-tune only the router gates (reshapes routing, keeps what experts learned)")
    t.set_defaults(fn=cmd_train_model)

    se = sub.add_parser("serve", help="OpenAI-compatible server (continuous batching, task-aware scheduler)")
    _model_arg(se)
    se.add_argument("--budget", type=float, default=0.4, help="fraction of routed-expert bytes kept resident")
    se.add_argument("--miss-policy", default="reroute", choices=["reroute", "load", "host", "auto", "all"],
                    help="without --profile: what a miss does (with one, --policy decides)")
    se.add_argument("--policy", default=None, help="residency policy from the profile (default: emoe-a-q48 when "
                    "the profile has a predictor, else task-static-q48); e.g. emoe-a, task-static, popular; "
                    "the -q4 / -q8 / -q48 suffix runs misses on low-bit copies, without it they are rerouted")
    se.add_argument("--profile", default=None, help="profile folder (`emoe profile`): loader, costs, task extractor")
    se.add_argument("--stickiness", type=float, default=1.0, help="task-static/eMoE plans: a resident expert "
                    "yields only to one expecting (1+H)x its tokens; 0 is the paper's loader (more moves)")
    se.add_argument("--scheduler", default="task-aware", choices=["task-aware", "fcfs", "sjf"])
    se.add_argument("--admission-control", action=argparse.BooleanOptionalAction, default=True,
                    help="task-aware: refuse an admission that would make a running request miss its SLO "
                    "(Algorithm 1); --no-admission-control keeps only its ordering")
    se.add_argument("--host", default="127.0.0.1")
    se.add_argument("--port", type=int, default=8000)
    se.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1")
    se.add_argument("--memory-mb", type=float, default=None,
                    help="experts + KV cache together; the KV slots (max batch) are what the expert budget leaves")
    se.add_argument("--served-model-name", default=None, help="model id in the API (default: the folder name)")
    se.add_argument("--max-batch", type=int, default=8, help="KV slots: requests decoded together")
    se.add_argument("--max-len", type=int, default=1024, help="KV slot length (prompt + output tokens)")
    se.add_argument("--prefill-chunk", type=int, default=512, help="prompt tokens per request per forward pass")
    se.add_argument("--max-waiting", type=int, default=256, help="queued requests beyond this get 429")
    se.add_argument("--token-budget", type=int, default=2048, help="max prompt tokens admitted per step")
    se.add_argument("--experts-on", default="disk", choices=["disk", "ram"])
    _dtype_arg(se)
    se.add_argument("--threads", type=int, default=None,
                    help="torch threads for the engine (default: the cores available minus one, at least 1)")
    se.add_argument("--grace", type=float, default=30.0, help="seconds in-flight requests get at shutdown")
    se.add_argument("--slo", type=_slo, action="append", metavar="TASK:TTFT_MS:TPOT_MS",
                    help="default SLO of a task's requests (repeatable; TASK 'default' for requests of no known "
                    "task); a request's own ttft_ms/tpot_ms win. Built-in table: emoe.serving.DEFAULT_SLOS")
    se.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    se.set_defaults(fn=cmd_serve)
    return ap


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        args.fn(args)
    except (ValueError, OSError, KeyError) as e:  # bad input: one clear line, no traceback
        sys.exit(f"emoe: {e}")


if __name__ == "__main__":
    main()
