"""quant.quantize 128 rows at a time (quant.ROWS) against the whole matrix at once, alternated in one process; and the
int4 fit's rounds against the range alone: ms per matrix and the ratio, side by side (docs/results/int4_offsets.txt).

    python scripts/bench_quantize.py [--shape 2048,4096] [--rounds 5]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from emoe import quant


def timed(w: torch.Tensor, bits: int, rows: int, steps: int) -> float:
    quant.ROWS, fit = rows, quant.fit_int4
    quant.fit_int4 = lambda x: fit(x, steps)
    try:
        t = time.perf_counter()
        quant.quantize(w, bits)
        return (time.perf_counter() - t) * 1e3
    finally:
        quant.fit_int4 = fit


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="2048,4096")
    ap.add_argument("--rounds", type=int, default=5)
    a = ap.parse_args()
    rows, cols = (int(x) for x in a.shape.split(","))
    w = torch.randn(rows, cols, generator=torch.Generator().manual_seed(0))
    chunk = quant.ROWS
    modes = {"int8, whole": (8, rows, 2), "int8, 128 rows": (8, chunk, 2),
             "int4 range only, whole": (4, rows, 0), "int4 fitted, whole": (4, rows, 2),
             "int4 fitted, 128 rows": (4, chunk, 2)}
    for args in modes.values():
        timed(w, *args)  # warm
    ms = {m: [] for m in modes}
    for r in range(a.rounds):
        for m in (modes if r % 2 == 0 else reversed(modes)):
            ms[m].append(timed(w, *modes[m]))
    quant.ROWS = chunk
    med = {m: statistics.median(v) for m, v in ms.items()}
    print(f"{rows} x {cols}, {torch.get_num_threads()} threads, median of {a.rounds} alternated rounds")
    for m, v in med.items():
        print(f"  {m:24s} {v:7.1f} ms   (min {min(ms[m]):.1f}, max {max(ms[m]):.1f})")
    print(f"  int8: whole / 128 rows {med['int8, whole'] / med['int8, 128 rows']:.2f}x;  int4 fitted: whole / 128 rows "
          f"{med['int4 fitted, whole'] / med['int4 fitted, 128 rows']:.2f}x;  int4 fitted 128 rows / range-only whole "
          f"{med['int4 fitted, 128 rows'] / med['int4 range only, whole']:.2f}x")


if __name__ == "__main__":
    main()
