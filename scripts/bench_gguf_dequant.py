"""emoe's torch GGUF dequantisers (emoe/gguf_blocks.py, emoe/gguf_iq.py) against gguf-py's numpy ones, side by side on one
expert-sized matrix per type (Qwen3-30B-A3B's 768×2048), best of `--repeats`; outputs compared too.

    python scripts/bench_gguf_dequant.py [--rows 768 --cols 2048 --repeats 7]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from gguf_writer import _random_blocks  # noqa: E402

from emoe.gguf_blocks import dequantize  # noqa: E402


def best(f, repeats: int) -> float:
    f()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        f()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    import gguf
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=768)
    ap.add_argument("--cols", type=int, default=2048)
    ap.add_argument("--repeats", type=int, default=7)
    a = ap.parse_args()
    Q = gguf.GGMLQuantizationType
    print(f"{a.rows}x{a.cols}, {torch.get_num_threads()} torch threads, best of {a.repeats}")
    print(f"{'type':7} {'gguf-py ms':>10} {'torch ms':>9} {'ratio':>6}  equal")
    for q in (Q.Q4_0, Q.Q4_1, Q.Q8_0, Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.MXFP4, Q.IQ4_NL, Q.IQ4_XS, Q.IQ2_XXS,
              Q.IQ2_XS, Q.IQ2_S, Q.IQ3_XXS, Q.IQ3_S, Q.IQ1_S, Q.IQ1_M, Q.TQ1_0, Q.TQ2_0):
        shape = (a.rows, a.cols)
        b = gguf.quants.quantize(np.random.default_rng(0).standard_normal(shape).astype(np.float32), q) \
            if q in (Q.Q4_0, Q.Q4_1, Q.Q8_0, Q.MXFP4) else _random_blocks(shape, q, 0)
        t = torch.from_numpy(b)
        ref, got = best(lambda: gguf.quants.dequantize(b, q), a.repeats), best(lambda: dequantize(t, int(q)), a.repeats)
        same = torch.allclose(dequantize(t, int(q)), torch.from_numpy(gguf.quants.dequantize(b, q)), rtol=1e-6, atol=1e-7)
        print(f"{q.name:7} {ref * 1e3:10.2f} {got * 1e3:9.2f} {ref / got:5.2f}x  {same}")


if __name__ == "__main__":
    main()
