"""What a long prompt's prefill does to a request already decoding, with the serving loop's prefill
interleaved a chunk per step (the default) or done whole at admission, side by side on one engine:

  python scripts/bench_prefill_interleave.py [--model DIR] [--tokens 900] [--chunk 128] [--rounds 2]

A short request decodes; once it has 8 tokens a long prompt arrives. Printed per mode: the short
request's largest and mean gap between tokens, the long request's time to first token, and the ratio
of the largest gaps. A DeepSeek-format random model makes the prefill long on a CPU:
scripts/make_random_model.py --family deepseek_v3 --hidden 1024 --inter 512 --experts 16 --layers 2.
"""
from __future__ import annotations

import argparse
import time
from collections import defaultdict


def run_once(eng, interleave: bool, long_text: str) -> dict:
    from emoe.engine import SamplingParams
    from emoe.serving import EngineLoop, Job
    loop = EngineLoop(eng, "fcfs", interleave=interleave)
    times = defaultdict(list)
    emit = loop._emit

    def timed(jobs, t):  # every token's time, per job
        for j in jobs:
            times[j].append(t)
        emit(jobs, t)
    loop._emit = timed
    loop.start()
    short = Job(eng.make_request("Say something about rivers.", SamplingParams(max_tokens=40, ignore_eos=True),
                                 chat=False))
    loop.submit(short)
    while short.generated < 8:
        time.sleep(0.001)
    long_ = Job(eng.make_request(long_text, SamplingParams(max_tokens=4, ignore_eos=True), chat=False))
    loop.submit(long_)
    short.done.wait(120)
    long_.done.wait(120)
    loop.shutdown(1.0)
    gaps = [b - a for a, b in zip(times[short], times[short][1:])]
    return {"max_gap": max(gaps), "mean_gap": sum(gaps) / len(gaps), "long_ttft": long_.first_token_at - long_.arrival}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--tokens", type=int, default=900)
    ap.add_argument("--chunk", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=2)
    a = ap.parse_args()
    import torch
    from emoe import default_model_dir
    from emoe.engine import Engine, EngineConfig
    torch.set_num_threads(2)
    eng = Engine(EngineConfig(a.model or str(default_model_dir()), miss_policy="all", max_batch=2,
                              max_len=a.tokens + 16, prefill_chunk=a.chunk, experts_on="ram"))
    ids = eng.codec.encode("The quick brown fox jumps over the lazy dog near the river bank. " * (a.tokens // 8 + 1))
    long_text = eng.codec.decode(ids[: a.tokens])
    run_once(eng, True, long_text)  # warm-up
    res = defaultdict(list)
    for _ in range(a.rounds):
        for mode in (False, True):
            res[mode].append(run_once(eng, mode, long_text))
    print(f"long prompt {len(eng.codec.encode(long_text))} tokens, chunks of {a.chunk}; {a.rounds} rounds, alternated")
    print(f"{'prefill':12} {'short max gap s':>16} {'short mean gap s':>17} {'long TTFT s':>12}")
    for mode, name in ((False, "whole"), (True, "interleaved")):
        for r in res[mode]:
            print(f"{name:12} {r['max_gap']:16.3f} {r['mean_gap']:17.4f} {r['long_ttft']:12.3f}")
    mx = {m: sum(r["max_gap"] for r in res[m]) / a.rounds for m in res}
    tt = {m: sum(r["long_ttft"] for r in res[m]) / a.rounds for m in res}
    print(f"interleaved / whole: largest gap {mx[True] / mx[False]:.2f}x, long TTFT {tt[True] / tt[False]:.2f}x")


if __name__ == "__main__":
    main()
