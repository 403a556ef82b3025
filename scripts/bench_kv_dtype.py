"""Decode tokens/s with the attention layers' KV cache in float32 (a CPU's default) against bf16 (--kv-dtype
bfloat16), alternated in one process on one model and one prompt, at a few context lengths: what halving the
bytes each step's attention reads is worth as the context grows, and how far the tokens move.

  python scripts/bench_kv_dtype.py --model DIR [--contexts 256,1024,4096] [--tokens 32] [--rounds 3] [--batch 1]

DIR's max_position_embeddings bounds the contexts. Experts at budget 0 run on the RAM tier's forms with host
misses (the CPU default for packed experts), the dense projections on a GGUF's blocks where it has them.
"""
from __future__ import annotations

import argparse
import statistics
import time

from emoe.engine import Engine, EngineConfig, SamplingParams


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--contexts", default="256,1024,4096")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch", type=int, default=1)
    a = ap.parse_args()
    ctxs = [int(c) for c in a.contexts.split(",")]
    engines = {kd: Engine(EngineConfig(a.model, miss_policy="host", budget=0, experts_on="ram", dense_blocks=True,
                                       max_batch=a.batch, max_len=max(ctxs) + a.tokens + 1, kv_dtype=kd))
               for kd in ("float32", "bfloat16")}
    params = SamplingParams(max_tokens=a.tokens, temperature=0.0, ignore_eos=True)
    print(f"{a.model}: batch {a.batch}, {a.tokens} tokens after each prompt; KV bytes per slot: "
          + ", ".join(f"{kd} {e.kv.nbytes / e.max_batch / 2**20:.0f} MiB" for kd, e in engines.items()))
    print(f"{'context':>7} {'f32 tok/s':>10} {'bf16 tok/s':>10} {'bf16/f32':>8} {'same tokens':>11}")
    for n in ctxs:
        prompts = [[(37 * i + 11 * j) % 300 + 3 for j in range(n)] for i in range(a.batch)]
        rates, outs = {kd: [] for kd in engines}, {}
        for _ in range(a.rounds):
            for kd, eng in engines.items():
                t = time.perf_counter()
                reqs = eng.generate(prompts, params, chat=False)
                total = time.perf_counter() - t
                first = max(r.first_token_at for r in reqs) - t  # the prefill, and the first token with it
                rates[kd].append(a.batch * (a.tokens - 1) / (total - first))
                outs[kd] = [r.output_ids for r in reqs]
        f, b = (statistics.median(rates[kd]) for kd in engines)
        same = sum(x == y for x, y in zip(outs["float32"], outs["bfloat16"]))
        print(f"{n:7d} {f:10.1f} {b:10.1f} {b / f:8.2f} {same:>5}/{a.batch}")


if __name__ == "__main__":
    main()
