"""Peak memory and time of one long prompt's prefill at several --prefill-chunk sizes, each in a fresh
process (peak RSS is per process), side by side in one run, with the first tokens compared:

  python scripts/bench_prefill_chunk.py [--model DIR] [--tokens 2000] [--chunks 4096,512,128]

A DeepSeek-format random model (absorbed MLA) shows the most: scripts/make_random_model.py --family deepseek_v3.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def one(model: str, tokens: int, chunk: int) -> dict:
    import torch
    from emoe.engine import Engine, EngineConfig, SamplingParams
    torch.set_num_threads(2)
    eng = Engine(EngineConfig(model, miss_policy="all", max_batch=1, max_len=tokens + 8, prefill_chunk=chunk,
                              experts_on="ram"))
    ids = eng.codec.encode("The quick brown fox jumps over the lazy dog near the river bank. " * (tokens // 8 + 1))
    text = eng.codec.decode(ids[:tokens])
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    r = eng.generate([text], SamplingParams(max_tokens=2, ignore_eos=True), chat=False)[0]
    return {"chunk": chunk, "prompt_tokens": len(r.prompt_ids), "seconds": time.perf_counter() - t0,
            "peak_over_engine_mib": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024,
            "first_tokens": r.output_ids}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--tokens", type=int, default=2000)
    ap.add_argument("--chunks", default="4096,512,128")
    ap.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)  # worker: one chunk size
    a = ap.parse_args()
    if a.model is None:
        from emoe import default_model_dir
        a.model = str(default_model_dir())
    if a.one is not None:
        print(json.dumps(one(a.model, a.tokens, a.one)))
        return
    rows = []
    for c in (int(x) for x in a.chunks.split(",")):
        out = subprocess.run([sys.executable, __file__, "--model", a.model, "--tokens", str(a.tokens), "--one", str(c)],
                             capture_output=True, text=True, check=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    ref = rows[0]
    print(f"{'chunk':>6} {'prompt':>7} {'seconds':>8} {'peak MiB over engine':>21} {'× first':>8}  same tokens")
    for r in rows:
        print(f"{r['chunk']:6d} {r['prompt_tokens']:7d} {r['seconds']:8.2f} {r['peak_over_engine_mib']:21.0f} "
              f"{r['peak_over_engine_mib'] / max(ref['peak_over_engine_mib'], 1e-9):8.2f}  {r['first_tokens'] == ref['first_tokens']}")


if __name__ == "__main__":
    main()
