"""What-if: would 6-bit copies lift similarity at 40% of the bytes in bf16 pricing? Before building a packed 6-bit
format, emulate it: a level's copies are quantised to 6 bits (symmetric, |q| <= 31, held in int8 storage) and priced
as 6 bits a weight plus its scales, and the planner's error for that level is 6-bit's. The same stream is served with
the real levels (none / int4 per 64 / int8 per 32 / full), with 6-bit per 32 in place of int8 (6.5 bits a weight), and
with 6-bit per 64 as the only copies (6.25 bits: every expert's copy fits, with little room for full ones), paired.
--none-errors E1,E2 instead serves the real levels with the planner's error for an expert held at no level (rerouted;
1.0 by default) set to each E: below 1 the planner drops the coldest experts' int4 copies for int8 on busier ones.

    python scripts/whatif_int6.py [--n 288] [--seed 5] [--budget 0.4] [--policy emoe-a-sticky-q48] [--split test] [--json OUT] [--none-errors 0.5,0.25]
"""
from __future__ import annotations

import argparse
import contextlib
import json
from pathlib import Path

import torch

from emoe import cache as cache_mod
from emoe import eval as ev
from emoe import loader, quant, tier
from emoe.commands import _predictors
from emoe.profile import Profile

PROFILE = "emoe/models/emoe-tiny/profile"


def six_bit(w: torch.Tensor, group: int) -> quant.QTensor:
    """w as 6-bit values (symmetric, |q| <= 31, a fp16 scale per group), in an int8 QTensor's storage."""
    q = quant.quantize(w, 8, group)
    scale = (q.scale.float() * 127 / 31).half()  # amax / 31
    x = w.float().reshape(w.shape[0], -1, q.group)
    data = torch.round(x / scale.float()[..., None]).clamp_(-31, 31).to(torch.int8).reshape(w.shape)
    return quant.QTensor(data, scale, q.shape, 8, q.group)


@contextlib.contextmanager
def six_bit_level(level: int, group: int, error: float):
    """Copies at `level` held as 6-bit values per `group` (in an int8 QTensor: level 8), priced so, with the planner's
    `error` for them. The level keeps its number, so the rest of the machinery is unchanged."""
    quantize, qbytes, err, group_of, copies = cache_mod.quantize, cache_mod.qbytes, loader.ERROR[level], \
        cache_mod.copy_group, tier._copies

    def q(w, bits=4, g=32):
        return six_bit(w, group) if bits == level else quantize(w, bits, g)

    def qb(shape, bits, g):  # 6 bits a weight and a 2-byte scale a group
        return shape[0] * shape[1] * 6 // 8 + shape[0] * (shape[1] // group) * 2 if bits == level else qbytes(shape, bits, g)
    cache_mod.quantize, cache_mod.qbytes, loader.ERROR[level] = q, qb, error
    cache_mod.copy_group = lambda cols, bits, kernel, g=32: group if bits == level else group_of(cols, bits, kernel, g)
    tier._copies = lambda *a: (lambda b, g: None)  # (no copies file: quantised at startup, as patched)
    try:
        yield
    finally:
        cache_mod.quantize, cache_mod.qbytes, loader.ERROR[level] = quantize, qbytes, err
        cache_mod.copy_group, tier._copies = group_of, copies


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=288)
    ap.add_argument("--seed", type=int, default=5)
    ap.add_argument("--budget", type=float, default=0.4)
    ap.add_argument("--policy", default="emoe-a-sticky-q48")
    ap.add_argument("--split", default="test")
    ap.add_argument("--json")
    ap.add_argument("--none-errors", type=lambda t: [float(x) for x in t.split(",")])
    args = ap.parse_args()
    prof = Profile.load(PROFILE)
    setup = lambda: ev.Setup(prof, _predictors(PROFILE, [args.policy, "emoe-a-sticky"]))  # noqa: E731
    kw = dict(n=args.n, seed=args.seed, dtype="bfloat16", split=args.split, log=lambda m: None)
    model = "emoe/models/emoe-tiny"
    w = torch.randn(256, 384, generator=torch.Generator().manual_seed(0))
    for name, q in (("int8 per 32", quant.quantize(w, 8, 32)), ("6-bit per 32", six_bit(w, 32)),
                    ("6-bit per 64", six_bit(w, 64)), ("int4 per 64", quant.quantize(w, 4, 64))):
        print(f"# {name}: relative weight error {float((quant.dequantize(q) - w).norm() / w.norm()):.4f} (gaussian)")
    recs = ev.evaluate(model, [("all", "all", 1.0, setup()), (args.policy, args.policy, args.budget, setup())], **kw)
    # (a copy's level is its bits: an emulated level must be the int8 one, so "6-bit only" is the one-level q8 policy)
    for label, policy, group, error in () if args.none_errors else (("6-bit for int8", args.policy, 32, 0.022),
                                                                    ("6-bit only", "emoe-a-sticky-q8", 64, 0.025)):
        with six_bit_level(8, group, error):
            recs += ev.evaluate(model, [(f"{policy} {label}", policy, args.budget, setup())], **kw)
    for e0 in args.none_errors or ():
        was, loader.ERROR[0] = loader.ERROR[0], e0
        try:
            recs += ev.evaluate(model, [(f"{args.policy} none={e0:g}", args.policy, args.budget, setup())], **kw)
        finally:
            loader.ERROR[0] = was
    print(ev.table(recs))
    if args.json:
        Path(args.json).write_text(json.dumps(recs, indent=1))
    for b in recs[2:]:
        for key in ("similarity", "agree"):
            d, (lo, hi) = ev.paired_difference(b, recs[1], key)
            print(f"{b['policy']} against the real levels, {key}: {d:+.3f} [{lo:+.3f}, {hi:+.3f}]")


if __name__ == "__main__":
    main()
