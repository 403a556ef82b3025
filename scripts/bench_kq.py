"""Few-row products with kernel forms on a CPU: ckernel's routines (bf16 or int8 activations) against PyTorch's
int4 kernel ("off"), side by side in one run.

  python scripts/bench_kq.py [--model GGUF_IMPORT_DIR ...] [--batch 1,4] [--rounds 2]

Part 1 times one 768x1024 matrix (Q4-class one plane, int8-class two) for 1..48 rows in each mode: it is what
ckernel.ROWS is read from, with scripts/bench_prefill_dequant.py (the matrix stays in cache here, so this is the arithmetic, not the memory).
Part 2, per --model, decodes 64 tokens (experts at budget 0 on their forms, dense projections on the file's
blocks) in each mode, and in bf16 with the decode attention left to torch (cstep.attend off), alternated,
--rounds times, and prints tokens/s and the ratio to "off", and whether the first tokens agree with "off".
"""
from __future__ import annotations

import argparse
import time

import torch

from bench_prefill_dequant import best  # scripts/ is on the path when this runs

from emoe import ckernel, quant


def modes() -> list[str]:
    lib = ckernel.library()
    return [m for m, bit in ckernel.MODES.items() if lib is not None and lib.modes & bit] + ["off"]


def matrices() -> None:
    g = torch.Generator().manual_seed(0)
    for bits in (4, 8):
        w = quant.to_kernel(quant.quantize(torch.randn(768, 1024, generator=g), bits, 32))
        print(f"\n768x1024, {bits}-bit form ({len(w.planes)} plane(s)): µs per product (best of 200), ratio to off")
        for rows in (1, 2, 3, 4, 8, 16, 47):
            x = torch.randn(rows, 1024, generator=g)
            t = {}
            for m in modes():
                ckernel.KQ = m
                t[m] = best(lambda: quant.linear(x, w), 200) * 1e6 if m == "off" or ckernel.kq_able(w) else float("nan")
                if m != "off":  # time the routine itself, whatever quant.linear's row limit says
                    t[m] = best(lambda: ckernel.kq_linear(x, w), 200) * 1e6
            print(f"  {rows:2d} rows  " + "  ".join(f"{m} {v:7.1f}" for m, v in t.items())
                  + "  " + "  ".join(f"{m}/off {t['off'] / t[m]:.2f}x" for m in t if m != "off"))


def decode(model: str, batch: int, rounds: int) -> None:
    from emoe.engine import Engine, EngineConfig, SamplingParams
    eng = Engine(EngineConfig(model, miss_policy="host", budget=0, experts_on="ram", dense_blocks=True, max_batch=batch))
    prompts = [[(37 * i + 11 * j) % 300 + 3 for j in range(30)] for i in range(batch)]
    params = SamplingParams(max_tokens=64, temperature=0.0, ignore_eos=True)
    from emoe.model import MoEModel
    c_decode = MoEModel._c_decode
    variants = modes() + ["bf16, torch attention"] if "bf16" in modes() else modes()
    rates, first = {m: [] for m in variants}, {}
    for _ in range(rounds):
        for m in variants:
            ckernel.KQ = m.split(",")[0]
            MoEModel._c_decode = c_decode if "," not in m else (lambda self, q, cache: False)
            eng.generate(prompts, params)  # warm
            t0 = time.perf_counter()
            out = eng.generate(prompts, params)
            rates[m].append(64 * batch / (time.perf_counter() - t0))
            first[m] = [r.output_ids[:16] for r in out]
    print(f"\n{model}, batch {batch}: decode tokens/s (64 each, {rounds} rounds alternated)")
    for m, r in rates.items():
        same = sum(a == b for a, b in zip(first[m], first["off"]))
        print(f"  {m:21s} {' '.join(f'{v:6.1f}' for v in r)}  ratio to off {sum(r) / sum(rates['off']):.2f}x  "
              f"first 16 tokens as off's: {same}/{batch}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", action="append", default=[])
    ap.add_argument("--batch", default="1,4")
    ap.add_argument("--rounds", type=int, default=2)
    a = ap.parse_args()
    print("modes built for this CPU:", modes(), "threads:", torch.get_num_threads())
    matrices()
    for m in a.model:
        for b in map(int, a.batch.split(",")):
            decode(m, b, a.rounds)


if __name__ == "__main__":
    main()
