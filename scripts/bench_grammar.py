"""Structured output's cost: decode tokens/s of the same prompts with and without a grammar, alternated in one
process on one engine, and the time the masks take per row (emoe.grammar.mask_rows, a step's rows at once).

  python scripts/bench_grammar.py [--model DIR] [--rounds 5] [--batch 4]

The grammar is a JSON schema whose strings are free (so answers run to max_tokens in both arms: ignore_eos keeps
the free-text arm going, the schema's long string field keeps the grammar open).
"""
from __future__ import annotations

import argparse
import statistics
import time

from emoe import default_model_dir, grammar
from emoe.engine import Engine, EngineConfig, SamplingParams

SCHEMA = {"type": "object", "properties": {"summary": {"type": "string"}}, "required": ["summary"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=default_model_dir())
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=48)
    a = ap.parse_args()
    eng = Engine(EngineConfig(a.model, miss_policy="all", max_batch=a.batch))
    prompts = [f"Summarize: the {w} sat on the mat and looked at the garden for a long while." for w in
               ("cat", "dog", "owl", "fox", "hen", "elk", "yak", "emu")[: a.batch]]
    g = grammar.json_schema(SCHEMA)
    arms = {"free": SamplingParams(max_tokens=a.tokens, ignore_eos=True),
            "json": SamplingParams(max_tokens=a.tokens, ignore_eos=True, grammar=g)}
    masks = []  # (seconds, rows) of each step's masks (grammar.mask_rows: all the step's rows at once)
    real = grammar.mask_rows

    def timed(constraints, logits):
        t = time.perf_counter()
        out = real(constraints, logits)
        masks.append((time.perf_counter() - t, len(constraints)))
        return out
    grammar.mask_rows = timed
    rates = {k: [] for k in arms}
    for _ in range(a.rounds):
        for name, p in arms.items():
            t = time.perf_counter()
            reqs = eng.generate(prompts, p)
            rates[name].append(sum(len(r.output_ids) for r in reqs) / (time.perf_counter() - t))
    f, j = (statistics.median(rates[k]) for k in arms)
    print(f"{a.model}: vocab {eng.cfg.vocab_size}, batch {a.batch}, {a.tokens} tokens, medians of {a.rounds}")
    print(f"free text {f:.1f} tok/s, JSON schema {j:.1f} tok/s, json/free {j / f:.2f}; "
          f"masks {sum(t for t, _ in masks) / sum(n for _, n in masks) * 1e6:.0f} us a row over {len(masks)} steps "
          f"of {sum(n for _, n in masks) / len(masks):.1f} rows")


if __name__ == "__main__":
    main()
