"""`emoe bench compare`: the same workload against the server in each configuration, side by side.

Configurations (each a fresh `emoe serve` subprocess on the same model, budget and workload):
  emoe       eMoE loader (predictor + Eq. 2) at the budget, task-aware SLO scheduler
  lru-fcfs   LRU on-demand loading at the budget (mixtral-offloading), FCFS
  all-fcfs   every expert resident, FCFS
  emoe-fcfs  eMoE loader at the budget, FCFS (the scheduler ablation)
  emoe-noac  eMoE loader, task-aware ordering without Algorithm 1's admission test (which part pays)
Ratios printed: mean E2E of eMoE vs LRU and vs all-resident; goodput of task-aware vs FCFS.
With repeats > 1 the configurations run round-robin that many times (a noisy machine drifts; taking
them in turn spreads the drift over all), each is reported by its median-goodput run, and the
ratios are of medians over the repeats.
"""
from __future__ import annotations

import json
import os
import statistics
import signal
import socket
import subprocess
import sys
import time

import httpx

from .serve import format_table, make_requests, run_benchmark


def configs(budget: float, profile: str, policy: str) -> dict[str, list[str]]:
    emoe = ["--budget", str(budget), "--profile", profile, "--policy", policy]
    return {"emoe": emoe + ["--scheduler", "task-aware"],
            "lru-fcfs": ["--budget", str(budget), "--miss-policy", "load", "--scheduler", "fcfs"],
            "all-fcfs": ["--miss-policy", "all", "--scheduler", "fcfs"],
            "emoe-fcfs": emoe + ["--scheduler", "fcfs"],
            "emoe-noac": emoe + ["--scheduler", "task-aware", "--no-admission-control"]}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(args: list[str], port: int, log) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "emoe.cli", "serve", "--port", str(port), "--host", "127.0.0.1", *args]
    proc = subprocess.Popen(cmd, stdout=log, stderr=log, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.time() + 180
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}: {' '.join(cmd)}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError("server did not become healthy in 180 s")


def run(model: str | None, profile: str, budget: float, workload: dict, goodput: dict | None,
        policy: str = "emoe-a", server_args: list[str] = (), only: list[str] | None = None,
        log_path: str = "compare-servers.log", repeats: int = 1, task_slo: dict | None = None) -> dict:
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    all_cfg = configs(budget, profile, policy)
    unknown = [n for n in only or [] if n not in all_cfg]
    if unknown:
        raise ValueError(f"unknown configurations {unknown}; choose from {', '.join(all_cfg)}")
    chosen = {n: a for n, a in all_cfg.items() if not only or n in only}
    reqs = make_requests(**workload)
    runs: dict[str, list[dict]] = {n: [] for n in chosen}
    with open(log_path, "a") as log:
        for rep in range(repeats):
            for name, args in chosen.items():
                port = _free_port()
                extra = (["--model", model] if model else []) + list(server_args)
                proc = _serve(args + extra, port, log)
                try:
                    print(f"[compare] {name} (run {rep + 1}/{repeats}): {len(reqs)} requests", file=sys.stderr)
                    runs[name].append(run_benchmark(f"http://127.0.0.1:{port}", reqs, goodput=goodput,
                                                    task_slo=task_slo))
                finally:
                    proc.send_signal(signal.SIGINT)
                    try:
                        proc.wait(60)
                    except subprocess.TimeoutExpired:
                        proc.kill()
    return {name: _median_run(rs) for name, rs in runs.items()}


def _median_run(rs: list[dict]) -> dict:
    """The run with the median goodput (else median mean E2E), with every run's key numbers attached."""
    good = [r.get("goodput") for r in rs]
    e2e = [r["e2e_ms"]["mean"] if r["e2e_ms"] else None for r in rs]
    key = good if None not in good else [x if x is not None else float("inf") for x in e2e]
    pick = sorted(range(len(rs)), key=lambda i: key[i])[(len(rs) - 1) // 2]
    return {**rs[pick], "runs": {"goodput": good, "e2e_mean_ms": e2e}}


def ratios(res: dict) -> dict:
    def med(n, key):
        xs = [x for x in (res[n].get("runs") or {}).get(key, []) if x is not None]
        return statistics.median(xs) if xs else None

    def e2e(n):
        if n not in res or not res[n]["e2e_ms"]:
            return None
        return med(n, "e2e_mean_ms") or res[n]["e2e_ms"]["mean"]

    def good(n):
        if n not in res or res[n].get("goodput") is None:
            return None
        return med(n, "goodput") or res[n]["goodput"]
    r = {}
    if e2e("emoe") and e2e("lru-fcfs"):
        r["e2e_emoe_over_lru"] = e2e("emoe") / e2e("lru-fcfs")
    if e2e("emoe") and e2e("all-fcfs"):
        r["e2e_emoe_over_all"] = e2e("emoe") / e2e("all-fcfs")
    if good("emoe") is not None and good("emoe-fcfs"):
        r["goodput_taskaware_over_fcfs"] = good("emoe") / good("emoe-fcfs")
    if good("emoe-noac") is not None and good("emoe-fcfs"):
        r["goodput_taskaware_no_admission_over_fcfs"] = good("emoe-noac") / good("emoe-fcfs")
    return r


def side_by_side(res: dict) -> str:
    names = list(res)
    rows = [("completed", lambda r: f"{r['completed']}/{r['num_requests']}"),
            ("duration s", lambda r: f"{r['duration_s']:.1f}"),
            ("output tok/s", lambda r: f"{r['output_token_throughput']:.1f}"),
            ("goodput req/s", lambda r: "-" if r["goodput"] is None else f"{r['goodput']:.3f}"),
            ("SLO attainment", lambda r: "-" if not r["slo_attainment"] else f"{r['slo_attainment']['overall']:.1%}")]
    if any(len((res[n].get("runs") or {}).get("goodput", [])) > 1 for n in names):
        rows.append(("goodput each run", lambda r: "/".join("-" if g is None else f"{g:.1f}"
                                                          for g in r["runs"]["goodput"])))
    for key in ("ttft_ms", "tpot_ms", "e2e_ms"):
        for stat in ("mean", "p99"):
            rows.append((f"{stat} {key[:-3].upper()} ms", lambda r, k=key, s=stat: "-" if not r[k] else f"{r[k][s]:.0f}"))
    cells = [(label, [fn(res[n]) for n in names]) for label, fn in rows]
    w = max(12, 2 + max(len(c) for _, row in cells for c in row + names))  # cells never run together
    lines = [f"{'':18}" + "".join(f"{n:>{w}}" for n in names)]
    lines += [f"{label:18}" + "".join(f"{c:>{w}}" for c in row) for label, row in cells]
    for k, v in ratios(res).items():
        lines.append(f"{k}: {v:.2f}x")
    return "\n".join(lines)


def save(res: dict, path: str, config: dict) -> None:
    with open(path, "w") as f:
        json.dump({"config": config, "results": res, "ratios": ratios(res)}, f, indent=1, default=str)


__all__ = ["run", "side_by_side", "ratios", "save", "format_table"]
