"""`emoe bench kernel`: low-bit copies run dequantised vs on PyTorch's CPU int4 kernel, side by side.

Two parts, one run: each expert matrix of the model at a few token counts (µs per call, best of
`repeats`), then the same prompts generated end to end with the kernel on and off (interleaved, so
machine noise hits both), with next-token agreement against the all-resident outputs.
"""
from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from ..quant import kernel_fits, linear, quantize, to_kernel
from .memory import PROMPTS


def best_us(fn, n: int, repeats: int, sync=lambda: None) -> float:
    """µs per call of fn, best of `repeats` rounds of n calls; sync waits for a GPU's queued work."""
    fn()
    sync()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        sync()
        best = min(best, (time.perf_counter() - t0) / n)
    return best * 1e6


def ops(model: str, tokens=(1, 4, 16, 64), repeats: int = 5, calls: int = 50) -> list[dict]:
    from ..checkpoint import Checkpoint
    from ..store import open_store
    ck = Checkpoint(model)
    gate, _, down = open_store(ck, "ram").read(*next(iter(ck.experts)))
    rows = []
    for name, w in (("gate/up", gate.float()), ("down", down.float())):
        if not kernel_fits(tuple(w.shape), 32):
            raise ValueError(f"{name} {tuple(w.shape)}: the CPU int4 kernel does not fit this shape (rows must "
                             f"be a multiple of 64, columns of 32) or this torch lacks it")
        for t in tokens:
            x = torch.randn(t, w.shape[1])
            row = {"matrix": name, "shape": list(w.shape), "tokens": t,
                   "full_fp32_us": best_us(lambda: F.linear(x, w), calls, repeats)}
            for bits in (4, 8):
                q = quantize(w, bits)
                k = to_kernel(q)
                row[f"int{bits}_dequant_us"] = best_us(lambda: linear(x, q), calls, repeats)
                row[f"int{bits}_kernel_us"] = best_us(lambda: linear(x, k), calls, repeats)
            rows.append(row)
    return rows


def end_to_end(model: str, budgets=(0.4, 0.2), max_tokens: int = 32, rounds: int = 2) -> list[dict]:
    """tok/s (best of `rounds`, every configuration once per round) of all-resident and of int4 copies
    with the kernel on and off, at each budget; agreement teacher-forced on the all-resident outputs."""
    from ..engine import Engine, EngineConfig, SamplingParams
    from ..policies import Shadow
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    cfg = dict(experts_on="ram", max_batch=len(PROMPTS))
    engines = {(1.0, None): Engine(EngineConfig(model, miss_policy="all", **cfg))}
    for b in budgets:
        for on in (True, False):
            engines[(b, on)] = Engine(EngineConfig(model, budget=b, qkernel=on, **cfg), policy=Shadow(4))
    secs = {k: [] for k in engines}
    outs = {}
    for _ in range(rounds):
        for k, eng in engines.items():
            t0 = time.perf_counter()
            outs[k] = eng.generate(PROMPTS, params)
            secs[k].append(time.perf_counter() - t0)
    refs = outs[(1.0, None)]
    n_ref = sum(len(r.output_ids) for r in refs)
    rows = []
    for (b, on), eng in engines.items():
        with eng.uncounted():  # shadow_runs stays serving's
            agree = sum(int((eng.score(r.prompt_ids, r.output_ids).argmax(-1).cpu() == torch.tensor(r.output_ids))
                            .sum()) for r in refs) if on is not None else n_ref
        rows.append({"budget": b, "kernel": on, "tokens_per_s": sum(len(r.output_ids) for r in outs[(b, on)])
                     / min(secs[(b, on)]), "agreement": agree / n_ref, "shadow_runs": eng.cache.stats.shadow_uses})
    return rows


def table(op_rows: list[dict], e2e: list[dict]) -> str:
    head = (f"{'matrix':8} {'shape':>10} {'tok':>4} {'fp32 full':>10} {'int4 deq':>9} {'int4 kern':>9} "
            f"{'deq/kern':>8} {'int8 deq':>9} {'int8 kern':>9} {'deq/kern':>8}   (µs per call)")
    lines = [head, "-" * len(head)]
    for r in op_rows:
        lines.append(f"{r['matrix']:8} {'x'.join(map(str, r['shape'])):>10} {r['tokens']:>4} {r['full_fp32_us']:>10.1f} "
                     f"{r['int4_dequant_us']:>9.1f} {r['int4_kernel_us']:>9.1f} "
                     f"{r['int4_dequant_us'] / r['int4_kernel_us']:>7.1f}x {r['int8_dequant_us']:>9.1f} "
                     f"{r['int8_kernel_us']:>9.1f} {r['int8_dequant_us'] / r['int8_kernel_us']:>7.1f}x")
    lines += ["", f"{'budget':>6} {'kernel':>6} {'tok/s':>7} {'agreement':>9} {'copy runs':>9} {'speed-up':>8}"]
    lines.append(f"{1.0:>6.2f} {'all':>6} {e2e[0]['tokens_per_s']:>7.1f} {1.0:>9.3f} {0:>9}")
    for b in dict.fromkeys(r["budget"] for r in e2e[1:]):
        on, off = (next(r for r in e2e if r["budget"] == b and r["kernel"] == k) for k in (True, False))
        for r in (on, off):
            lines.append(f"{b:>6.2f} {'on' if r['kernel'] else 'off':>6} {r['tokens_per_s']:>7.1f} "
                         f"{r['agreement']:>9.3f} {r['shadow_runs']:>9} "
                         f"{on['tokens_per_s'] / off['tokens_per_s'] if r is on else 1.0:>7.2f}x")
    return "\n".join(lines)
