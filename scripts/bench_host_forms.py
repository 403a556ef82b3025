"""One host run per expert, side by side: a GGUF's experts held as host forms (the CPU int4 kernel) against
held packed and dequantised per run (--no-host-kernel), µs per expert at 1, 4 and 16 tokens, 64 experts,
the second of two passes.

    python scripts/bench_host_forms.py [--model runs/gguf-pair/imported]
"""
from __future__ import annotations

import argparse
import time

import torch

from emoe.checkpoint import Checkpoint
from emoe.quant import swiglu
from emoe.store import RamStore


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="runs/gguf-pair/imported")
    ap.add_argument("--experts", type=int, default=64)
    a = ap.parse_args()
    ck = Checkpoint(a.model)
    keys = list(ck.experts)[: a.experts]
    ck.experts = {k: ck.experts[k] for k in keys}
    stores = {"forms": RamStore(ck, host_forms=True), "dequantised": RamStore(ck, host_forms=False)}
    hidden = ck.config.hidden_size
    print(f"{a.model}: {len(keys)} experts, types {ck.experts[keys[0]].qtypes}, {torch.get_num_threads()} threads")
    for n in (1, 4, 16):
        x = torch.randn(n, hidden)
        row = []
        for name, st in stores.items():
            for _ in range(2):  # the second pass is timed
                t0 = time.perf_counter()
                for k in keys:
                    swiglu(x, *st.read_host(*k))
                us = (time.perf_counter() - t0) / len(keys) * 1e6
            row.append(f"{name} {us:.0f} µs")
        print(f"{n:>3} tokens: " + ", ".join(row))


if __name__ == "__main__":
    main()
