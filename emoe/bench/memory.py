"""`emoe bench memory`: the same prompts at several budgets and miss policies, one run.

Every (policy, budget) runs in a fresh subprocess so that its peak RSS is its own. The all-resident run
goes first; the others report next-token agreement with it, teacher-forced on its outputs (so one early
divergence does not hide how well the rest agrees).
"""
from __future__ import annotations

import json
import resource
import subprocess
import sys
import time

import torch

PROMPTS = [
    "Summarize: The city council met on Tuesday to discuss the new park. Residents asked for more trees and "
    "a playground, and the council agreed to fund both from next year's budget.",
    "Is this review positive, negative, neutral or ambivalent? The food was cold and the waiter ignored us.",
    "Answer the question: What is the capital of France?",
    "Write an SQL query: How many singers are older than 30? Tables: singer(id, name, age)",
    "Are these two sentences similar? A: The cat sat on the mat. B: A cat was sitting on a mat.",
    "Alex gave Sam a present. How would Sam feel as a result?",
]


def worker(args: dict) -> dict:
    from ..cache import BudgetError
    from ..engine import Engine, EngineConfig, SamplingParams
    torch.manual_seed(0)
    t_build = time.perf_counter()
    try:
        eng = Engine(EngineConfig(args["model"], budget=args["budget"], miss_policy=args["policy"],
                                  experts_on=args["experts_on"], max_batch=len(args["prompts"]),
                                  host_kernel=args.get("host_kernel", True), dense_blocks=args.get("dense_blocks", False)))
    except BudgetError as e:  # e.g. int4 copies of every expert exceed a small budget: a gap, not a failure
        return {"policy": args["policy"], "budget": args["budget"], "skipped": str(e)}
    build_s = time.perf_counter() - t_build
    params = SamplingParams(max_tokens=args["max_tokens"], ignore_eos=True)
    t0 = time.perf_counter()
    reqs = eng.generate(args["prompts"], params)
    secs = time.perf_counter() - t0
    agree = n = 0
    with eng.uncounted():  # the counters below stay serving's
        for ref in args.get("reference") or []:
            logits = eng.score(ref["prompt_ids"], ref["output_ids"])
            agree += int((logits.argmax(-1).cpu() == torch.tensor(ref["output_ids"])).sum())
            n += len(ref["output_ids"])
    s = eng.cache.stats
    return {"policy": args["policy"], "budget": args["budget"], "host_kernel": args.get("host_kernel", True),
            "resident_bytes": eng.cache.used_bytes, "total_expert_bytes": eng.total_expert_bytes,
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            # on a GPU the fast tier is device memory: dense weights + experts + KV + activations
            "peak_device_bytes": torch.cuda.max_memory_allocated(eng.device) if eng.device.type == "cuda" else None,
            "tokens_per_s": sum(len(r.output_ids) for r in reqs) / secs, "hit_rate": s.hit_rate,
            "bytes_loaded": s.bytes_loaded, "load_seconds": s.load_seconds, "startup_s": build_s,
            "store_bandwidth": eng.store.stats.bandwidth, "direct_io": eng.store.direct,
            "agreement": agree / n if n else 1.0,
            "outputs": [{"prompt_ids": r.prompt_ids, "output_ids": r.output_ids} for r in reqs]}


def _spawn(args: dict) -> dict:
    proc = subprocess.run([sys.executable, "-m", "emoe.bench.memory"], input=json.dumps(args),
                          capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"worker {args['policy']}@{args['budget']} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run(model: str, budgets: list[float], policies: list[str], experts_on: str, max_tokens: int,
        prompts: list[str] | None = None, host_kernel: tuple[bool, ...] = (True,), dense_blocks: bool = False) -> list[dict]:
    """host_kernel: for the policies that run misses on the host, with a GGUF's kernel forms (True), with
    its blocks dequantised per run (False), or both side by side; rows without kernel read "host/dq".
    dense_blocks: every row (the reference too) runs a GGUF's dense projections on the file's blocks."""
    from ..checkpoint import Checkpoint
    from ..store import raw_direct_bandwidth
    base = {"model": model, "experts_on": experts_on, "max_tokens": max_tokens, "prompts": prompts or PROMPTS,
            "dense_blocks": dense_blocks}
    ref = _spawn({**base, "policy": "all", "budget": 1.0})
    ref["agreement"] = 1.0
    rows = [ref]
    for policy in policies:
        for b in budgets:
            for k in host_kernel if policy in ("host", "auto") else (True,):
                if b < 1.0 or policy != "all":
                    rows.append(_spawn({**base, "policy": policy, "budget": b, "reference": ref["outputs"],
                                        "host_kernel": k}))
    raw = raw_direct_bandwidth(next(iter(Checkpoint(model).experts.values())).locs[0].path)
    for r in rows:
        r["raw_direct_bandwidth"] = raw
        r.pop("outputs", None)
    return rows


def table(rows: list[dict]) -> str:
    mib = 2 ** 20
    head = (f"{'policy':8} {'budget':>6} {'resident MiB':>13} {'peak RSS MiB':>13} {'tok/s':>7} "
            f"{'hit rate':>8} {'loaded MiB':>10} {'agree':>6} {'load GB/s':>9}")
    gpu = any(r.get("peak_device_bytes") for r in rows)
    if gpu:
        head += f" {'peak GPU MiB':>12}"
    lines = [head, "-" * len(head)]
    for r in rows:
        name = r["policy"] + ("" if r.get("host_kernel", True) else "/dq")
        if "skipped" in r:
            lines.append(f"{name:8} {r['budget']:>6.2f}  skipped: {r['skipped']}")
            continue
        lines.append(f"{name:8} {r['budget']:>6.2f} {r['resident_bytes'] / mib:>13.1f} "
                     f"{r['peak_rss_bytes'] / mib:>13.1f} {r['tokens_per_s']:>7.1f} {r['hit_rate']:>8.1%} "
                     f"{r['bytes_loaded'] / mib:>10.1f} {r['agreement']:>6.3f} {r['store_bandwidth'] / 1e9:>9.2f}"
                     + (f" {(r.get('peak_device_bytes') or 0) / mib:>12.1f}" if gpu else ""))
    raw = rows[0]["raw_direct_bandwidth"]
    lines.append(f"raw O_DIRECT read of the checkpoint file: {raw / 1e9:.2f} GB/s "
                 f"(expert loads above include the copy into the fast tier; direct I/O: {rows[0]['direct_io']})")
    return "\n".join(lines)


if __name__ == "__main__":
    print(json.dumps(worker(json.loads(sys.stdin.read()))))
