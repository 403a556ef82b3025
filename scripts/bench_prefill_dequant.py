"""Many-row products with kernel forms on a CPU: PyTorch's int4 kernel against unpacking the form once to bf16
(emoe.ckernel) and a oneDNN bf16 matmul, side by side in one run.

  python scripts/bench_prefill_dequant.py [--model GGUF_IMPORT_DIR] [--rounds 3]

Part 1 sweeps the row count for a 768x1024 matrix held as one plane (Q4 forms) and as two (int8 forms): it is
what quant.DEQUANT_ROWS is read from. Part 2, with --model, times whole prompts (time to the first token,
experts at budget 0 on their forms, dense projections on the file's blocks) with the routine and without,
alternated, and says whether the first tokens agree.
"""
from __future__ import annotations

import argparse
import time

import torch

from emoe import quant
from emoe.ckernel import dequant_t


def best(f, n: int) -> float:
    f()
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        f()
        times.append(time.perf_counter() - t0)
    return min(times)


def sweep() -> None:
    w, default = torch.randn(768, 1024), dict(quant.DEQUANT_ROWS)
    print("rows  planes  int4 kernel µs  dequant+bf16 mm µs  kernel/dequant  (quant._kmm both ways; two planes: "
          "hi and lo bf16 matrices, two matmuls)")
    for bits in (4, 8):
        k = quant.to_kernel(quant.quantize(w, bits, 32))
        for rows in (8, 16, 24, 32, 48, 64, 128, 512):
            xb = torch.randn(rows, 1024).bfloat16()
            quant.DEQUANT_ROWS.update({1: 1 << 30, 2: 1 << 30})
            kern = best(lambda: quant._kmm(xb, k), 20)
            quant.DEQUANT_ROWS.update({1: 0, 2: 0})
            dq = best(lambda: quant._kmm(xb, k), 20)
            quant.DEQUANT_ROWS.update(default)
            print(f"{rows:4d}  {len(k.planes):6d}  {kern * 1e6:14.0f}  {dq * 1e6:18.0f}  {kern / dq:14.2f}")


def prompts(model: str, rounds: int) -> None:
    from emoe.engine import Engine, EngineConfig, SamplingParams
    eng = Engine(EngineConfig(model, miss_policy="host", budget=0, experts_on="ram", dense_blocks=True, max_batch=1))
    words = "the quick brown fox jumps over the lazy dog and then it runs away into the forest".split()
    ids = eng.codec.encode(" ".join(words * 20))[: eng.max_len - 2]
    one = SamplingParams(max_tokens=1)
    default, off = dict(quant.DEQUANT_ROWS), {k: 1 << 30 for k in quant.DEQUANT_ROWS}
    eng.generate([ids], one)
    ttft, first = {"kernel": [], "dequant": []}, {}
    for _ in range(rounds):
        for name, rows in (("kernel", off), ("dequant", default)):
            quant.DEQUANT_ROWS.update(rows)
            t0 = time.perf_counter()
            (r,) = eng.generate([ids], one)
            ttft[name].append(time.perf_counter() - t0)
            first[name] = r.output_ids
    quant.DEQUANT_ROWS.update(default)
    k, d = min(ttft["kernel"]), min(ttft["dequant"])
    print(f"\n{model}: {len(ids)}-token prompt, best of {rounds} alternated rounds; {torch.get_num_threads()} threads")
    print(f"time to first token: int4 kernel {k * 1e3:.0f} ms, dequant {d * 1e3:.0f} ms, kernel/dequant {k / d:.2f}x "
          f"({len(ids) / k:.0f} vs {len(ids) / d:.0f} prompt tokens/s); same first token: {first['kernel'] == first['dequant']}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", action="append", default=[], help="a GGUF import (repeatable)")
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    if dequant_t(quant.to_kernel(quant.quantize(torch.randn(64, 64), 4, 32))) is None:
        raise SystemExit("emoe.ckernel is unavailable here (no C compiler, or EMOE_NO_CKERNEL set)")
    sweep()
    for m in a.model:
        prompts(m, a.rounds)


if __name__ == "__main__":
    main()
