"""`emoe bench dispatch`: one MoE layer's routed experts, run per expert with a nonzero each (the
dispatch before 2026-11-26, and the usual reference loop) vs `engine.run_experts` (one sort, one host
sync), side by side on the engine's device, with their outputs compared bit for bit.

Routing comes from the model's own router on random hidden states, so the expert mix is realistic.
"""
from __future__ import annotations

import torch

from ..dispatch import run_experts
from ..model import route
from ..quant import swiglu
from .kernel import best_us


def per_expert(x, weights, ids, fetch, num_experts: int) -> torch.Tensor:
    out = torch.zeros_like(x)
    for e in torch.unique(ids).tolist():
        tok, slot = torch.where(ids == e)
        out.index_add_(0, tok, swiglu(x[tok], *fetch(e)) * weights[tok, slot, None])
    return out


def run(model: str, tokens=(1, 4, 16, 64), calls: int = 50, repeats: int = 5, device: str | None = None) -> list[dict]:
    from ..engine import Engine, EngineConfig
    eng = Engine(EngineConfig(model, miss_policy="all", experts_on="ram", max_batch=1, device=device))
    cfg, layer = eng.cfg, eng.cfg.moe_layers[0]
    gate_w = eng.model.w[f"model.layers.{layer}.{cfg.spec.moe_prefix}.{cfg.spec.router}.weight"]
    fetch = lambda e, n=1: eng.cache.peek((layer, e))  # noqa: E731
    sync = torch.cuda.synchronize if eng.device.type == "cuda" else (lambda: None)
    g = torch.Generator().manual_seed(0)
    rows = []
    with torch.inference_mode():
        for t in tokens:
            x = torch.randn(t, cfg.hidden_size, generator=g).to(eng.device, eng.dtype)
            _, weights, ids = route(x @ gate_w.T, cfg.top_k, cfg.norm_topk_prob)
            weights = weights.to(x.dtype)
            args = (x, weights, ids, fetch, cfg.num_experts)
            same = torch.equal(per_expert(*args), run_experts(*args))
            rows.append({"tokens": t, "experts_used": int(torch.unique(ids).numel()), "identical": same,
                         "device": eng.device.type,
                         "per_expert_us": best_us(lambda: per_expert(*args), calls, repeats, sync),
                         "sorted_us": best_us(lambda: run_experts(*args), calls, repeats, sync)})
    return rows


def table(rows: list[dict]) -> str:
    head = f"{'tokens':>6} {'experts':>7} {'per expert µs':>13} {'one sort µs':>11} {'speed-up':>8} {'identical':>9}"
    lines = [f"one MoE layer's routed experts on {rows[0]['device'] if rows else '?'}", head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['tokens']:>6} {r['experts_used']:>7} {r['per_expert_us']:>13.1f} {r['sorted_us']:>11.1f} "
                     f"{r['per_expert_us'] / r['sorted_us']:>7.2f}x {str(r['identical']):>9}")
    return "\n".join(lines)
