"""`emoe bench capacity`: what the memory freed by a smaller expert budget buys, at equal total memory.

Total memory M = expert bytes + KV cache bytes is fixed (default: all experts plus `base_batch` KV slots
of `max_len` tokens). Each configuration spends what its experts leave on KV: the largest batch of
`max_len` slots, the longest single prompt (also capped by the model's context), and the tokens/s of
serving that batch, measured on the same test-split prompts.
"""
from __future__ import annotations

import time

from ..engine import Engine, EngineConfig, SamplingParams
from ..tier import resolve_budget


def kv_bytes_per_token(eng: Engine) -> int:
    c = eng.cfg
    return c.kv_numel_per_token * eng.kv.k[0].element_size()


def _engine(model, budget, max_batch, max_len, setup, experts_on):
    if setup is None or budget >= 1.0:
        return Engine(EngineConfig(model, budget=budget, miss_policy="all" if budget >= 1.0 else "reroute",
                                   max_batch=max_batch, max_len=max_len, experts_on=experts_on))
    from ..eval import build
    policy, residency = build(setup[1], setup[0])
    return Engine(EngineConfig(model, budget=budget, miss_policy=policy.name, max_batch=max_batch,
                               max_len=max_len, experts_on=experts_on), policy=policy, residency=residency)


def run(model: str, budget: float, setup=None, memory_bytes: int | None = None, max_len: int = 512,
        base_batch: int = 2, max_tokens: int = 32, cap_batch: int = 32, experts_on: str = "ram") -> list[dict]:
    from ..eval import test_stream
    probe = Engine(EngineConfig(model, miss_policy="all", max_batch=1, max_len=max_len, experts_on=experts_on))
    per_tok, total = kv_bytes_per_token(probe), probe.total_expert_bytes
    ctx = probe.cfg.max_position_embeddings
    M = memory_bytes or total + base_batch * max_len * per_tok
    stream = test_stream(4 * cap_batch, seed=3, fits=lambda p: probe.fits(p, max_tokens))
    filler = " ".join(e.prompt for e in stream)
    probe = None  # one engine alive at a time: the probe holds the whole model (as eval and profile do)
    rows = []
    for name, b in (("all-resident", 1.0), (f"budget {budget:g}", budget)):
        expert = resolve_budget(b, total) if b < 1.0 else total
        kv_tokens = (M - expert) // per_tok
        batch = kv_tokens // max_len
        if batch < 1:
            raise ValueError(f"{M} bytes leave no {max_len}-token KV slot next to {expert} bytes of experts")
        longest = min(kv_tokens, ctx)
        eng = None
        eng = _engine(model, b, 1, longest, setup, experts_on)
        ids = eng.codec.encode(filler)[: longest - max_tokens]
        t0 = time.perf_counter()
        eng.admit([eng.make_request(eng.codec.decode(ids), SamplingParams(max_tokens=4, ignore_eos=True), chat=False)])
        while eng.running:
            eng.step()
        long_s = time.perf_counter() - t0
        run_batch = min(batch, cap_batch)
        eng = None
        eng = _engine(model, b, run_batch, max_len, setup, experts_on)
        t0 = time.perf_counter()
        reqs = eng.generate([e.prompt for e in stream[: 2 * run_batch]],
                            SamplingParams(max_tokens=max_tokens, ignore_eos=True), tasks=[e.task for e in stream])
        secs = time.perf_counter() - t0
        rows.append({"config": name, "memory_bytes": M, "expert_bytes": expert, "kv_bytes": M - expert,
                     "max_batch": batch, "batch_run": run_batch, "longest_prompt": len(ids),
                     "longest_prompt_s": long_s, "context_limited": kv_tokens >= ctx,
                     "tokens_per_s": sum(len(r.output_ids) for r in reqs) / secs,
                     "hit_rate": eng.cache.stats.hit_rate})
    return rows


def table(rows: list[dict]) -> str:
    mib = 2 ** 20
    lines = [f"{'config':14} {'experts MiB':>11} {'KV MiB':>7} {'max batch':>9} {'longest prompt':>14} {'tok/s':>7} {'hit':>6}"]
    for r in rows:
        lp = f"{r['longest_prompt']}{'*' if r['context_limited'] else ''}"
        lines.append(f"{r['config']:14} {r['expert_bytes'] / mib:>11.1f} {r['kv_bytes'] / mib:>7.1f} "
                     f"{r['max_batch']:>9} {lp:>14} {r['tokens_per_s']:>7.1f} {r['hit_rate']:>6.3f}")
    a, b = rows
    lines.append(f"same memory ({a['memory_bytes'] / mib:.1f} MiB): batch {b['max_batch'] / a['max_batch']:.1f}x, "
                 f"prompt {b['longest_prompt'] / a['longest_prompt']:.1f}x, throughput "
                 f"{b['tokens_per_s'] / a['tokens_per_s']:.2f}x (batch run capped at {b['batch_run']}; "
                 f"* = capped by the model's context)")
    return "\n".join(lines)
