"""A multi-turn chat, each turn re-sending the conversation, with and without prefix reuse, side by side
on one model (alternated rounds): prompt tokens actually prefilled and time to first token per turn.

  python scripts/bench_prefix_reuse.py [--model DIR] [--turns 6] [--rounds 2]
"""
from __future__ import annotations

import argparse
import time

QUESTIONS = ["Summarize: the committee met on Tuesday to discuss the new budget for the city parks, and after a "
             "long debate agreed to fund two new playgrounds and repair the old fountain.",
             "Is that a positive or negative outcome?", "Who decided it?", "What will be repaired?",
             "Write one SQL query that lists the parks.", "Answer in one word: was it a long debate?",
             "How many playgrounds?", "Thank you."]


def chat(eng, turns: int) -> list[tuple[int, float]]:
    """(tokens prefilled, seconds to first token) for each turn of one conversation."""
    from emoe.engine import SamplingParams
    msgs, out = [], []
    params = SamplingParams(max_tokens=24)
    for q in QUESTIONS[:turns]:
        msgs.append({"role": "user", "content": q})
        req = eng.make_request(eng.codec.apply_chat(msgs), params, chat=False)
        before = eng.reused_tokens
        t0 = time.perf_counter()
        eng.admit([req])
        ttft = time.perf_counter() - t0
        while eng.running:
            eng.step()
        out.append((len(req.prompt_ids) - (eng.reused_tokens - before), ttft))
        msgs.append({"role": "assistant", "content": eng.text(req)})
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--turns", type=int, default=6)
    ap.add_argument("--rounds", type=int, default=2)
    a = ap.parse_args()
    import torch
    from emoe import default_model_dir
    from emoe.engine import Engine, EngineConfig
    torch.set_num_threads(2)
    engines = {m: Engine(EngineConfig(a.model or str(default_model_dir()), miss_policy="all", max_batch=4,
                                      prefix_reuse=m)) for m in (False, True)}
    chat(engines[True], 2)  # warm-up
    res = {False: [], True: []}
    for _ in range(a.rounds):
        for m in (False, True):
            res[m].append(chat(engines[m], a.turns))
    print(f"{a.turns}-turn chat, {a.rounds} rounds alternated; per turn: prompt tokens prefilled / ms to first token")
    for m, name in ((False, "no reuse"), (True, "prefix reuse")):
        for run in res[m]:
            print(f"{name:13}" + "".join(f" {n:5d}/{t * 1e3:5.1f}" for n, t in run))
    tot = {m: (sum(n for run in res[m] for n, _ in run), sum(t for run in res[m] for _, t in run)) for m in res}
    print(f"prefix reuse / no reuse: prompt tokens prefilled {tot[True][0] / tot[False][0]:.2f}x, "
          f"time to first token {tot[True][1] / tot[False][1]:.2f}x (sums over all turns)")


if __name__ == "__main__":
    main()
