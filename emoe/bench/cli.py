"""The `emoe bench` subcommands: memory, serve (load generator), compare (configurations side by side),
kernel (low-bit copies dequantised vs the CPU int4 kernel), dispatch (per-expert loop vs one sort),
capacity (equal total memory). Thin: argument parsing and printing; the work is in the sibling modules."""
from __future__ import annotations

import json
from pathlib import Path

from ..cli import _floats, _model_arg, _slo
from ..commands import _model, _predictors


def cmd_bench_memory(args) -> None:
    from . import memory
    kernel = {"on": (True,), "off": (False,), "both": (True, False)}[args.host_kernel]
    rows = memory.run(_model(args), args.budgets, args.miss_policy.split(","), args.experts_on, args.max_tokens,
                      host_kernel=kernel, dense_blocks=args.dense_blocks)
    print(memory.table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


def cmd_bench_kernel(args) -> None:
    from . import kernel
    op_rows = kernel.ops(_model(args), repeats=args.repeats)
    e2e = kernel.end_to_end(_model(args), args.budgets, args.max_tokens)
    print(kernel.table(op_rows, e2e))
    if args.json:
        Path(args.json).write_text(json.dumps({"ops": op_rows, "end_to_end": e2e}, indent=1))


def cmd_bench_dispatch(args) -> None:
    from . import dispatch
    rows = dispatch.run(_model(args), args.tokens, repeats=args.repeats, device=args.device)
    print(dispatch.table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


def _bench_slos(args) -> tuple[dict, dict]:
    """--goodput (global) and --slo TASK:TTFT:TPOT (per task; 'default' replaces the global one)."""
    from .serve import parse_goodput
    slo, task_slo = parse_goodput(args.goodput), {}
    for task, (ttft, tpot) in args.slo or []:
        (slo if task is None else task_slo.setdefault(task, {})).update(ttft=ttft, tpot=tpot)
    return slo, task_slo


def cmd_bench_serve(args) -> None:
    from . import serve
    slo, task_slo = _bench_slos(args)
    reqs = serve.make_requests(args.num_requests, args.request_rate, args.burstiness, args.trace,
                               args.time_scale, args.task_mix, args.max_tokens, args.max_prompt_tokens,
                               args.seed)
    res = serve.run_benchmark(args.base_url, reqs, model=args.model, goodput=slo, api_key=args.api_key,
                              timeout=args.timeout, max_concurrency=args.max_concurrency, task_slo=task_slo)
    print(serve.format_table(res))
    if args.json:
        cfg = {k: getattr(args, k) for k in ("base_url", "num_requests", "request_rate", "burstiness", "trace",
                                             "time_scale", "task_mix", "max_tokens", "max_prompt_tokens",
                                             "seed", "timeout", "max_concurrency")}
        serve.save_json(res, args.json, {**cfg, "model": res["model"], "goodput": slo, "task_slo": task_slo,
                                         "requests": len(reqs)})


def cmd_bench_compare(args) -> None:
    from . import compare
    from .serve import parse_task_mix
    workload = dict(num_requests=args.num_requests, request_rate=args.request_rate, burstiness=args.burstiness,
                    trace=args.trace, time_scale=args.time_scale, task_mix=parse_task_mix(args.task_mix),
                    max_tokens=args.max_tokens, max_prompt_tokens=args.max_prompt_tokens, seed=args.seed)
    goodput, task_slo = _bench_slos(args)
    only = args.only.split(",") if args.only else None
    res = compare.run(args.model, args.profile, args.budget, workload, goodput, policy=args.policy,
                      server_args=["--experts-on", args.experts_on, "--max-batch", str(args.max_batch)]
                      + (["--threads", str(args.threads)] if args.threads else []),
                      only=only, repeats=args.repeats, task_slo=task_slo)
    print(compare.side_by_side(res))
    if args.json:
        compare.save(res, args.json, {**workload, "goodput": goodput, "task_slo": task_slo, "budget": args.budget,
                                      "repeats": args.repeats, "max_batch": args.max_batch, "threads": args.threads})


def cmd_bench_capacity(args) -> None:
    from . import capacity
    setup = None
    model = _model(args)
    if args.profile:
        from ..eval import Setup
        from ..profile import Profile
        setup = (Setup(Profile.load(args.profile, model), _predictors(args.profile, [args.policy])), args.policy)
    rows = capacity.run(model, args.budget, setup, memory_bytes=int(args.memory_mb * 2**20) if args.memory_mb else None,
                        max_len=args.max_len, max_tokens=args.max_tokens, cap_batch=args.cap_batch)
    print(capacity.table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


def add_parsers(b) -> None:
    """Register memory, serve, compare and capacity under the `bench` subparsers `b`."""
    m = b.add_parser("memory", help="resident bytes, peak RSS, speed and agreement across budgets")
    _model_arg(m)
    m.add_argument("--budgets", type=lambda t: _floats(t, zero=True), default=_floats("1.0,0.6,0.4,0.2"),
                   help="fractions of expert bytes in the fast tier (0: none, for host and auto misses)")
    m.add_argument("--miss-policy", default="reroute,load", help="comma-separated: reroute,load,shadow,host,auto")
    m.add_argument("--experts-on", default="disk", choices=["disk", "ram"])
    m.add_argument("--max-tokens", type=int, default=32)
    m.add_argument("--host-kernel", default="on", choices=["on", "off", "both"],
                   help="host/auto misses on a GGUF's Q4-Q8 experts: on the CPU int4 kernel, dequantised, or both")
    m.add_argument("--dense-blocks", action="store_true",
                   help="every row (the all-resident reference too) runs a GGUF's dense projections on its blocks")
    m.add_argument("--json", default=None)
    m.set_defaults(fn=cmd_bench_memory)

    sv = b.add_parser("serve", help="load benchmark of an OpenAI-compatible server (vLLM benchmark_serving style)")
    sv.add_argument("--base-url", required=True, help="server root, e.g. http://127.0.0.1:8000")
    sv.add_argument("--model", default=None, help="served model name (default: the first of /v1/models)")
    sv.add_argument("--num-requests", type=int, default=None,
                    help="requests to send (default 100; with --trace, every row: the first N rows)")
    sv.add_argument("--request-rate", type=float, default=float("inf"), help="requests/s (inf: all at once)")
    sv.add_argument("--burstiness", type=float, default=1.0,
                    help="gamma shape of inter-arrival times: 1 = Poisson, < 1 burstier, > 1 more regular")
    sv.add_argument("--trace", default=None, help="Azure LLM trace CSV to replay (TIMESTAMP, ContextTokens, "
                                                  "GeneratedTokens), e.g. ../shared/traces/AzureLLMInferenceTrace_conv.csv")
    sv.add_argument("--time-scale", type=float, default=1.0, help="trace arrival offsets are divided by this")
    sv.add_argument("--task-mix", default=None, help="e.g. summarization:1,qa:2 (default: uniform; "
                                                     "conversation for a _conv trace, code for a _code one)")
    sv.add_argument("--goodput", nargs="+", default=None, metavar="KEY:MS", help="SLOs, e.g. ttft:500 tpot:50")
    sv.add_argument("--slo", type=_slo, action="append", metavar="TASK:TTFT_MS:TPOT_MS",
                    help="per-task SLO (repeatable), sent with each request of the task and judged by")
    sv.add_argument("--max-tokens", type=int, default=64, help="output tokens per request (trace: the cap)")
    sv.add_argument("--max-prompt-tokens", type=int, default=400, help="trace prompt lengths are scaled to this")
    sv.add_argument("--api-key", default=None)
    sv.add_argument("--seed", type=int, default=0)
    sv.add_argument("--timeout", type=float, default=300.0, help="seconds per request, whole stream included")
    sv.add_argument("--max-concurrency", type=int, default=None, help="cap on requests in flight")
    sv.add_argument("--json", default=None, help="write the metrics and the config as one JSON object")
    sv.set_defaults(fn=cmd_bench_serve)

    bc = b.add_parser("compare", help="eMoE vs LRU vs all-resident vs FCFS ablation on one workload")
    _model_arg(bc)
    bc.add_argument("--profile", required=True)
    bc.add_argument("--policy", default="emoe-a")
    bc.add_argument("--budget", type=float, default=0.4)
    bc.add_argument("--num-requests", type=int, default=60)
    bc.add_argument("--request-rate", type=float, default=float("inf"))
    bc.add_argument("--burstiness", type=float, default=1.0)
    bc.add_argument("--trace", default=None)
    bc.add_argument("--time-scale", type=float, default=1.0)
    bc.add_argument("--task-mix", default=None)
    bc.add_argument("--goodput", nargs="+", default=None, metavar="KEY:MS")
    bc.add_argument("--slo", type=_slo, action="append", metavar="TASK:TTFT_MS:TPOT_MS",
                    help="per-task SLO (repeatable), sent with each request of the task and judged by")
    bc.add_argument("--max-tokens", type=int, default=48)
    bc.add_argument("--max-prompt-tokens", type=int, default=300)
    bc.add_argument("--max-batch", type=int, default=8)
    bc.add_argument("--experts-on", default="disk", choices=["disk", "ram"])
    bc.add_argument("--threads", type=int, default=None, help="servers' engine threads (default: emoe serve's)")
    bc.add_argument("--only", default=None,
                    help="comma-separated subset of emoe,lru-fcfs,all-fcfs,emoe-fcfs,emoe-noac")
    bc.add_argument("--repeats", type=int, default=1, help="run the configurations round-robin this many times; "
                    "report medians")
    bc.add_argument("--seed", type=int, default=0)
    bc.add_argument("--json", default=None)
    bc.set_defaults(fn=cmd_bench_compare)

    kn = b.add_parser("kernel", help="low-bit copies dequantised vs on the CPU int4 kernel, per op and end to end")
    _model_arg(kn)
    kn.add_argument("--budgets", type=_floats, default=_floats("0.4,0.2"))
    kn.add_argument("--max-tokens", type=int, default=32)
    kn.add_argument("--repeats", type=int, default=5)
    kn.add_argument("--json", default=None)
    kn.set_defaults(fn=cmd_bench_kernel)

    dp = b.add_parser("dispatch", help="one MoE layer's experts: a nonzero per expert vs one sort, side by side")
    _model_arg(dp)
    dp.add_argument("--tokens", type=lambda t: [int(x) for x in t.split(",")], default=[1, 4, 16, 64])
    dp.add_argument("--repeats", type=int, default=5)
    dp.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    dp.add_argument("--json", default=None)
    dp.set_defaults(fn=cmd_bench_dispatch)

    bk = b.add_parser("capacity", help="batch, prompt length and throughput at equal total memory")
    _model_arg(bk)
    bk.add_argument("--budget", type=float, default=0.4)
    bk.add_argument("--profile", default=None)
    bk.add_argument("--policy", default="emoe-a")
    bk.add_argument("--memory-mb", type=float, default=None, help="experts + KV (default: all experts + 2 slots)")
    bk.add_argument("--max-len", type=int, default=512)
    bk.add_argument("--max-tokens", type=int, default=32)
    bk.add_argument("--cap-batch", type=int, default=32)
    bk.add_argument("--json", default=None)
    bk.set_defaults(fn=cmd_bench_capacity)
