"""Where a decode step's time goes on a GPU: cold vs warm tokens/s per configuration, then the top
operators of one warm run under torch.profiler. For `scripts/gpu_check.sh`; runs on CPU too.

  python scripts/gpu_profile.py [--model DIR] [--configs all:1.0,reroute:0.4,shadow:0.4] [--profile]

host/dq:B runs host misses with a GGUF's blocks dequantised per run instead of on the CPU int4 kernel.
"""
from __future__ import annotations

import argparse
import time

import torch

from emoe import default_model_dir
from emoe.bench.memory import PROMPTS
from emoe.engine import Engine, EngineConfig, SamplingParams


def timed(eng: Engine, params: SamplingParams) -> float:
    t0 = time.perf_counter()
    reqs = eng.generate(PROMPTS[:4], params)
    if eng.device.type == "cuda":
        torch.cuda.synchronize()
    return sum(len(r.output_ids) for r in reqs) / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=str(default_model_dir()))
    ap.add_argument("--configs", default="all:1.0,reroute:0.4,shadow:0.4")
    ap.add_argument("--experts-on", default="ram")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--trace", action="store_true", help="record routing traces, as eMoE's residency policies do")
    ap.add_argument("--profile", action="store_true", help="torch.profiler table of one warm run per config")
    a = ap.parse_args()
    params = SamplingParams(max_tokens=a.max_tokens, ignore_eos=True)
    for spec in a.configs.split(","):
        policy, budget = spec.split(":")
        t0 = time.perf_counter()
        extra = {"trace": True} if a.trace else {}  # only what is asked: ab_profile.sh runs older trees too
        if policy.endswith("/dq"):
            extra["host_kernel"] = False
        eng = Engine(EngineConfig(a.model, budget=float(budget), miss_policy=policy.removesuffix("/dq"),
                                  experts_on=a.experts_on, max_batch=4, **extra))
        build = time.perf_counter() - t0
        cold, warm1, warm2 = (timed(eng, params) for _ in range(3))
        st = eng.cache.stats
        print(f"{policy + '+trace' * a.trace:8} {float(budget):.2f} on {eng.device.type}/{str(eng.dtype)[6:]}: startup {build:.1f}s, "
              f"tok/s cold {cold:.1f} warm {warm1:.1f} {warm2:.1f}; loaded {st.bytes_loaded / 2**20:.0f} MiB in "
              f"{st.load_seconds:.2f}s, {st.host_runs} expert runs on the host"
              + ((", auto runs every miss on the host" if eng.policy.min_tokens == float("inf") else
                  f", auto loads misses of {eng.policy.min_tokens:g}+ tokens") if hasattr(eng.policy, "min_tokens") else ""),
              flush=True)
        if a.profile:
            acts = [torch.profiler.ProfilerActivity.CPU]
            if eng.device.type == "cuda":
                acts.append(torch.profiler.ProfilerActivity.CUDA)
            with torch.profiler.profile(activities=acts) as prof:
                timed(eng, SamplingParams(max_tokens=8, ignore_eos=True))
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18, max_name_column_width=40))
        del eng
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
