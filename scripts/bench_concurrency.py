"""Output tokens/s and bytes read of prompts served from the disk forms tier with LRU loads, with the requests in
flight chosen by concurrency.Concurrency (ctl) or every slot at once (fixed): docs/results/concurrency.txt.

    python scripts/bench_concurrency.py BUDGET {ctl,fixed} PROMPTS TOKENS [--model runs/big/import] [--slots 4]
"""
from __future__ import annotations

import argparse
import json
import time

from emoe.engine import Engine, EngineConfig, SamplingParams

OPENINGS = ["The history of the city begins", "Write a short story about a lighthouse keeper who",
            "Explain how a refrigerator works:", "List five facts about the moon.", "A recipe for bread:",
            "The rules of chess are", "Dear committee, I am writing to", "In the year 2040, cars"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("budget", type=float, help="bytes of experts held (or a fraction)")
    ap.add_argument("mode", choices=["ctl", "fixed"])
    ap.add_argument("prompts", type=int)
    ap.add_argument("tokens", type=int)
    ap.add_argument("--model", default="runs/big/import")
    ap.add_argument("--slots", type=int, default=4)
    a = ap.parse_args()
    prompts = [f"{OPENINGS[i % len(OPENINGS)]} ({i})" for i in range(a.prompts)]
    eng = Engine(EngineConfig(a.model, budget=a.budget, miss_policy="load", experts_on="disk", max_batch=a.slots,
                              dense_blocks=True))
    if a.mode == "fixed":
        eng.concurrency = None
    read0, t0 = eng.store.stats.bytes_read, time.perf_counter()
    got = eng.generate(prompts, SamplingParams(max_tokens=a.tokens, ignore_eos=True, temperature=0), chat=False)
    secs, c = time.perf_counter() - t0, eng.concurrency
    print(json.dumps({"mode": a.mode, "tok_s": round(sum(len(r.output_ids) for r in got) / secs, 2),
                      "read_mb": round((eng.store.stats.bytes_read - read0) / 2**20), "hit": round(eng.cache.stats.hit_rate, 3),
                      "trail": c.trail if c else None,
                      "cost_mb": {k: round(v / 2**20, 1) for k, v in c.cost.items()} if c else None}))


if __name__ == "__main__":
    main()
