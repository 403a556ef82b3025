"""`emoe bench compare`: the same workload against the server in each configuration, side by side.

Configurations (each a fresh `emoe serve` subprocess on the same model, budget and workload):
  emoe       eMoE loader (predictor + Eq. 2) at the budget, task-aware SLO scheduler
  lru-fcfs   LRU on-demand loading at the budget (mixtral-offloading), FCFS
  all-fcfs   every expert resident, FCFS
  emoe-fcfs  eMoE loader at the budget, FCFS (the scheduler ablation)
Ratios printed: mean E2E of eMoE vs LRU and vs all-resident; goodput of task-aware vs FCFS.
"""
from __future__ import annotations

import json
import os
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
            "emoe-fcfs": emoe + ["--scheduler", "fcfs"]}


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
        log_path: str = "compare-servers.log") -> dict:
    reqs = make_requests(**workload)
    out = {}
    with open(log_path, "a") as log:
        for name, args in configs(budget, profile, policy).items():
            if only and name not in only:
                continue
            port = _free_port()
            extra = (["--model", model] if model else []) + list(server_args)
            proc = _serve(args + extra, port, log)
            try:
                print(f"[compare] {name}: {len(reqs)} requests", file=sys.stderr)
                out[name] = run_benchmark(f"http://127.0.0.1:{port}", reqs, goodput=goodput)
            finally:
                proc.send_signal(signal.SIGINT)
                try:
                    proc.wait(60)
                except subprocess.TimeoutExpired:
                    proc.kill()
    return out


def ratios(res: dict) -> dict:
    def e2e(n):
        return res[n]["e2e_ms"]["mean"] if n in res and res[n]["e2e_ms"] else None

    def good(n):
        return res[n].get("goodput") if n in res else None
    r = {}
    if e2e("emoe") and e2e("lru-fcfs"):
        r["e2e_emoe_over_lru"] = e2e("emoe") / e2e("lru-fcfs")
    if e2e("emoe") and e2e("all-fcfs"):
        r["e2e_emoe_over_all"] = e2e("emoe") / e2e("all-fcfs")
    if good("emoe") is not None and good("emoe-fcfs"):
        r["goodput_taskaware_over_fcfs"] = good("emoe") / good("emoe-fcfs")
    return r


def side_by_side(res: dict) -> str:
    names = list(res)
    rows = [("completed", lambda r: f"{r['completed']}/{r['num_requests']}"),
            ("duration s", lambda r: f"{r['duration_s']:.1f}"),
            ("output tok/s", lambda r: f"{r['output_token_throughput']:.1f}"),
            ("goodput req/s", lambda r: "-" if r["goodput"] is None else f"{r['goodput']:.3f}"),
            ("SLO attainment", lambda r: "-" if not r["slo_attainment"] else f"{r['slo_attainment']['overall']:.1%}")]
    for key in ("ttft_ms", "tpot_ms", "e2e_ms"):
        for stat in ("mean", "p99"):
            rows.append((f"{stat} {key[:-3].upper()} ms", lambda r, k=key, s=stat: "-" if not r[k] else f"{r[k][s]:.0f}"))
    lines = [f"{'':18}" + "".join(f"{n:>12}" for n in names)]
    lines += [f"{label:18}" + "".join(f"{fn(res[n]):>12}" for n in names) for label, fn in rows]
    for k, v in ratios(res).items():
        lines.append(f"{k}: {v:.2f}x")
    return "\n".join(lines)


def save(res: dict, path: str, config: dict) -> None:
    with open(path, "w") as f:
        json.dump({"config": config, "results": res, "ratios": ratios(res)}, f, indent=1, default=str)


__all__ = ["run", "side_by_side", "ratios", "save", "format_table"]
