"""Decode tokens/s of an older revision against this tree on a CPU, alternated in fresh processes on one machine
(same models, prompts and options), with new/old ratios at the end. For changes to the decode step's host
overhead, which only side-by-side runs can show on a noisy machine.

  git worktree add /tmp/old REV     # or: git archive REV | tar -x -C /tmp/old
  python scripts/ab_decode.py --old /tmp/old --model runs/llamacpp-random/import-Q4_0 [--batch 1,4] [--rounds 3]

Each run loads the model (experts at budget 0 on their RAM-tier forms, `--dense-blocks`: the CPU default for
a GGUF import), warms up, and reports the better of two 128-token greedy decodes from 30-token prompts.
--host-only stubs out the C routines that do the arithmetic, so what is left is the host's own work per token.
--prefill N times N-token prompts with one token out instead (prompt tokens/s); --context N decodes 64 tokens
after N-token prompts, timed from the first token.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
from pathlib import Path

RUN = """
import sys, time
from emoe import ckernel
from emoe.engine import Engine, EngineConfig, SamplingParams
B = int(sys.argv[2])
if sys.argv[3] == "1":  # --host-only: the C routines that do a step's arithmetic return at once (the router stays)
    lib, skip = ckernel.library(), {"kq_moe", "kq_linear", "kq_attend", "kq_rmsnorm", "kq_attn_block", "kq_layers"}
    class HostOnly:
        def __getattr__(self, name):
            return (lambda *a: 0) if name in skip else getattr(lib, name)  # (kq_moe returns a count)
    ckernel._lib = HostOnly()
int8 = sys.argv[5] == "1"  # --int8: a full-precision folder's experts and dense projections as int8 forms
C = int(sys.argv[6])  # --context: C-token prompts, then decode tokens/s after the first token
eng = Engine(EngineConfig(sys.argv[1], miss_policy="host", budget=0, experts_on="ram", dense_blocks=True, max_batch=B,
                          host_int8=int8, dense_int8=int8, **({"max_len": C + 65} if C else {})))
P = int(sys.argv[4])  # --prefill: prompts of P tokens, one token out, prompt tokens/s
prompts = [[(37 * i + 11 * j) % 300 + 3 for j in range(P or C or 30)] for i in range(B)]
params = SamplingParams(max_tokens=1 if P else 64 if C else 128, temperature=0.0, ignore_eos=True)
eng.generate(prompts, params)
best = 0.0
for _ in range(2):
    t0 = time.perf_counter()
    reqs = eng.generate(prompts, params)
    t1 = time.perf_counter()
    best = max(best, 63 * B / (t1 - max(r.first_token_at for r in reqs)) if C else (P or 128) * B / (t1 - t0))
print(best)
"""


def rate(tree: Path, model: str, batch: int, host_only: bool = False, prefill: int = 0, int8: bool = False,
         context: int = 0) -> float:
    """One fresh process importing emoe from `tree` (its directory first on the path, whatever is installed)."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    r = subprocess.run([sys.executable, "-c", RUN, model, str(batch), str(int(host_only)), str(prefill), str(int(int8)),
                        str(context)], cwd=tree, env=env,
                       capture_output=True,
                       text=True, timeout=600)
    if r.returncode:
        raise SystemExit(f"{tree}: {r.stderr.strip().splitlines()[-1] if r.stderr.strip() else r.returncode}")
    return float(r.stdout.split()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--old", required=True, type=Path, help="the older tree (a worktree or an archive's extraction)")
    ap.add_argument("--model", action="append", required=True, help="a model folder (repeatable)")
    ap.add_argument("--batch", default="1", help="rows decoded at once, comma-separated")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--host-only", action="store_true",
                    help="stub out the C routines that do the arithmetic: tokens/s of the host work alone (Python, "
                         "ctypes, small torch ops); the tokens are garbage then, the time is what is measured")
    ap.add_argument("--prefill", type=int, default=0, metavar="N",
                    help="time N-token prompts (one token out) instead: prompt tokens/s")
    ap.add_argument("--context", type=int, default=0, metavar="N",
                    help="decode 64 tokens after N-token prompts (the model's max_position_embeddings allowing), "
                         "timed from the first token: decode tokens/s at that context")
    ap.add_argument("--int8", action="store_true", help="for a full-precision folder: its experts and dense "
                    "projections as int8 forms (--host-int8 --dense-int8), so the C routines run them")
    a = ap.parse_args()
    new = Path(__file__).resolve().parent.parent
    old = a.old.resolve()
    if not (old / "emoe" / "__init__.py").is_file():
        raise SystemExit(f"--old {old}: no emoe package there")
    for model in a.model:
        model = str(Path(model).resolve())
        for batch in map(int, a.batch.split(",")):
            got = {"old": [], "new": []}
            for _ in range(a.rounds):
                for name, tree in (("old", old), ("new", new)):
                    got[name].append(rate(tree, model, batch, a.host_only, a.prefill, a.int8, a.context))
            ratios = [n / o for n, o in zip(got["new"], got["old"])]
            print(f"{Path(model).name:>16} batch {batch}: old {' '.join(f'{v:6.1f}' for v in got['old'])}  "
                  f"new {' '.join(f'{v:6.1f}' for v in got['new'])} tokens/s  new/old per round "
                  f"{' '.join(f'{r:.2f}' for r in ratios)}{' (prefill)' if a.prefill else f' (context {a.context})' if a.context else ''} (median {statistics.median(ratios):.2f}x)", flush=True)


if __name__ == "__main__":
    main()
