"""How much do harmless changes move `emoe eval`'s similarity? The all-resident model against itself.

The same test stream as `emoe eval --dtype bfloat16 --n N --seed S`, served all-resident in bf16 with
batches of 4 (eval's reference), then again with batch 1, batch 8, and in fp32. Nothing is offloaded or
quantised in any of them: what they lose is the metric's floor for perturbations of bf16 rounding size.
  python scripts/noise_floor.py --n 96 --seed 1
"""
from __future__ import annotations

import argparse

from emoe import default_model_dir
from emoe.engine import Engine, EngineConfig, SamplingParams
from emoe.eval import serve_stream, test_stream
from emoe.similarity import embedding_similarity


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=default_model_dir())
    ap.add_argument("--n", type=int, default=96)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--max-tokens", type=int, default=48)
    a = ap.parse_args()
    params = SamplingParams(max_tokens=a.max_tokens)

    def engine(dtype, batch):
        return Engine(EngineConfig(a.model, miss_policy="all", max_batch=batch, experts_on="ram", dtype=dtype))
    ref = engine("bfloat16", 4)
    stream = test_stream(a.n, a.seed, fits=lambda p: ref.fits(p, a.max_tokens + 64))
    refs, _ = serve_stream(ref, stream, params, 4)
    print(f"reference: all-resident, bf16, batches of 4; {len(stream)} test prompts (seed {a.seed})")
    for label, dtype, batch in (("bf16, batch 1", "bfloat16", 1), ("bf16, batch 8", "bfloat16", 8),
                                ("fp32, batch 4", "float32", 4)):
        rows, _ = serve_stream(engine(dtype, batch), stream, params, batch, refs)
        sims = embedding_similarity([r["text"] for r in rows], [r["text"] for r in refs])
        scored = [r["agree"] for r in rows if "agree" in r]
        agree = f"{sum(x for x, _ in scored) / sum(n for _, n in scored):.3f}"
        changed = sum(r["output_ids"] != f["output_ids"] for r, f in zip(rows, refs))
        print(f"{label:14} similarity {sum(sims) / len(sims):.3f}  agreement {agree}  "
              f"answers changed {changed}/{len(rows)}  lowest {sorted(round(float(s), 2) for s in sims)[:4]}")


if __name__ == "__main__":
    main()
