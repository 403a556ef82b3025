"""int4 copies fitted to the experts' outputs (calibrate.gptq_int4) against the plain fit (quant.quantize) and the
plain fit weighted by each input channel's activation energy, on the embedded model's experts: the relative squared
error of each expert matrix's outputs, X W^T, on activations of *validation* prompts (Hessians from training ones).

    python scripts/ab_calibrated_copies.py [--model DIR] [--train 16] [--val 8]
"""
from __future__ import annotations

import argparse
import statistics

import torch

from emoe import default_model_dir
from emoe.calibrate import collect, gptq_int4
from emoe.checkpoint import Checkpoint
from emoe.datasets import TASKS, load_split
from emoe.quant import dequantize, fit_int4, int4_params, quantize
from emoe.store import RamStore


def weighted(w: torch.Tensor, energy: torch.Tensor, group: int) -> torch.Tensor:
    """The plain fit's two least-squares rounds, each weight's square error weighted by its input's energy."""
    rows, cols = w.shape
    x, a = w.float().reshape(rows, cols // group, group), energy.float().reshape(1, cols // group, group) + 1e-12
    scale, lo = fit_int4(x, steps=0)  # the range fit, refined below with the weights
    A, sx = a.sum(-1, keepdim=True), (a * x).sum(-1, keepdim=True)
    for _ in range(2):
        u = ((x - lo) / scale).round().clamp(0, 15)
        su, suu, sux = (a * u).sum(-1, keepdim=True), (a * u * u).sum(-1, keepdim=True), (a * u * x).sum(-1, keepdim=True)
        det = A * suu - su * su
        ok = det > 1e-9 * A * A
        fit = (A * sux - su * sx) / det.clamp_min(1e-30)
        scale = torch.where(ok & (fit > 0), fit, scale)
        lo = torch.where(ok, (sx - scale * su) / A, lo)
    scale, zero = (t.float() for t in int4_params(scale, lo))
    return ((((x - zero) / scale + 8).round().clamp(0, 15) - 8) * scale + zero).reshape(rows, cols)


def out_error(w: torch.Tensor, approx: torch.Tensor, h: torch.Tensor) -> float:
    d, w, h = (approx - w).double(), w.double(), h.double()
    return float(torch.einsum("rc,cd,rd->", d, h, d) / torch.einsum("rc,cd,rd->", w, h, w))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=str(default_model_dir()))
    ap.add_argument("--train", type=int, default=16, help="training prompts per task (the Hessians)")
    ap.add_argument("--val", type=int, default=8, help="validation prompts per task (the activations scored on)")
    args = ap.parse_args()
    train = collect(args.model, [e for t in TASKS for e in load_split("train", t)[: args.train]])
    val = collect(args.model, [e for t in TASKS for e in load_split("val", t)[: args.val]])
    store = RamStore(Checkpoint(args.model))
    keys = sorted(k for k in train.tokens if train.of(k) is not None and val.tokens.get(k, 0) > 0)
    for group in (32, 64):
        errs: dict[str, list[float]] = {"plain": [], "weighted": [], "gptq": []}
        for key in keys:
            for i, w in enumerate(store.read(*key)):
                w = w.float()
                ht, hv = train.of(key)[i == 2], (val.inputs, val.mids)[i == 2][key]
                errs["plain"].append(out_error(w, dequantize(quantize(w, 4, group)), hv))
                errs["weighted"].append(out_error(w, weighted(w, ht.diagonal(), group), hv))
                errs["gptq"].append(out_error(w, dequantize(gptq_int4(w, ht, group)), hv))
        base = statistics.mean(errs["plain"])
        for name, v in errs.items():
            print(f"per {group}: {name:8} output squared error mean {statistics.mean(v):.5f} median {statistics.median(v):.5f}"
                  f" ({statistics.mean(v) / base:.2f}x plain; {len(v)} matrices of {len(keys)} experts)")


if __name__ == "__main__":
    main()
