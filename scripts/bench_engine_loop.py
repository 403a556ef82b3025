"""The serving loop's own cost: the same requests through EngineLoop (the engine in its own thread, as
`emoe serve` runs it, without HTTP) and through Engine.generate (the calling thread), side by side in one
run. --keep-openmp skips EngineLoop.start's release of the loading thread's OpenMP workers, to show what
two worker teams on the same cores cost.

    python scripts/bench_engine_loop.py --model DIR [--requests 32 --slots 4 --max-tokens 64 --keep-openmp]
"""
from __future__ import annotations

import argparse
import random
import time

from emoe import serving
from emoe.engine import Engine, EngineConfig, SamplingParams
from emoe.serving import EngineLoop, Job


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--slots", type=int, default=4)
    ap.add_argument("--prompt-tokens", type=int, default=110)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--budget", type=float, default=0.0)
    ap.add_argument("--keep-openmp", action="store_true")
    a = ap.parse_args()
    eng = Engine(EngineConfig(a.model, budget=a.budget, miss_policy="host", experts_on="ram", dense_blocks=True,
                              max_batch=a.slots, max_len=a.prompt_tokens + a.max_tokens + 8))
    rng = random.Random(0)
    vocab = eng.cfg.vocab_size
    prompts = [[rng.randrange(vocab) for _ in range(a.prompt_tokens)] for _ in range(a.requests)]
    params = SamplingParams(max_tokens=a.max_tokens, ignore_eos=True)
    eng.generate(prompts[:a.slots], SamplingParams(max_tokens=4, ignore_eos=True))  # warm-up
    if a.keep_openmp:
        serving.release_openmp = lambda: False
    loop = EngineLoop(eng, "fcfs", None).start()
    t0 = time.perf_counter()
    jobs = [Job(eng.make_request(p, params, None, chat=False), ttft_slo_s=1e9, tpot_slo_s=1e9) for p in prompts]
    for j in jobs:
        loop.submit(j)
    for j in jobs:
        j.done.wait()
    looped = sum(len(j.req.output_ids) for j in jobs) / (time.perf_counter() - t0)
    loop.shutdown(1)
    t0 = time.perf_counter()
    out = eng.generate(prompts, params)
    direct = sum(len(r.output_ids) for r in out) / (time.perf_counter() - t0)
    print(f"{a.model}: {a.requests} requests of {a.prompt_tokens} prompt tokens, {a.max_tokens} out, {a.slots} slots, "
          f"budget {a.budget:g}{', OpenMP workers kept' if a.keep_openmp else ''}")
    print(f"EngineLoop {looped:7.1f} out tokens/s   Engine.generate {direct:7.1f}   ratio {looped / direct:.2f}")


if __name__ == "__main__":
    main()
