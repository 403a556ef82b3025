"""Decode tokens/s of one engine setup on the disk forms tier (emoe/formstore.py), alternated between settings in
fresh processes: the concurrent readers of a layer's misses (formstore.READERS), the forms cache against forms
made from the file at each read (EMOE_FORMS_CACHE=0), experts in RAM, or a decode step's layers in C calls that
stop at a miss (dispatch.live_tables) against a call per layer, or reads into used buffers (formstore.SPARE_BYTES, in
MiB) against a new mapping every read. Prints each prompt's decode tokens/s.

    python scripts/bench_formstore.py --model runs/big/import --budget 1048576000 --policy load --vary readers=4,1
    python scripts/bench_formstore.py --model runs/big/import --budget 1048576000 --policy load --vary cache=1,0
    python scripts/bench_formstore.py --model runs/big/import --budget 1048576000 --policy load --vary step=c,layers
    python scripts/bench_formstore.py --model runs/big/import --budget 1048576000 --vary policy=load,adapt,host
    python scripts/bench_formstore.py --model runs/big/import --budget 1048576000 --policy load --vary spare=32,0
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

PROMPTS = ["The history of the city begins", "Write a short story about a lighthouse keeper who",
           "Explain how a refrigerator works:", "List five facts about the moon."]


def child(a) -> None:
    from emoe import formstore
    from emoe.engine import Engine, EngineConfig, SamplingParams
    formstore.READERS, formstore.SPARE_BYTES = a.readers, a.spare << 20
    if a.step == "layers":
        from emoe.dispatch import ExpertDispatch
        ExpertDispatch.live_tables = lambda self, layers, x: None
    eng = Engine(EngineConfig(a.model, budget=a.budget, miss_policy=a.policy, experts_on=a.experts_on, max_batch=1,
                              dense_blocks=True))
    rates = []
    for p in PROMPTS:
        (r,) = eng.generate([p], SamplingParams(max_tokens=a.tokens, ignore_eos=True, temperature=a.temperature,
                                                seed=1), chat=False)
        rates.append((len(r.output_ids) - 1) / (time.perf_counter() - r.first_token_at))
    print(json.dumps({"tok_s": rates, "read_s": eng.store.stats.seconds, "read_mb": eng.store.stats.bytes_read / 2**20,
                      "switches": getattr(eng.policy, "switches", None)}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--budget", type=float, default=0.3, help="a fraction of the experts, or bytes when > 1")
    ap.add_argument("--policy", default="load")
    ap.add_argument("--experts-on", default="disk", choices=["disk", "ram"])
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--readers", type=int, default=4)
    ap.add_argument("--vary", default="readers=4,1",
                    help="readers=A,B (concurrent reads), cache=1,0 (EMOE_FORMS_CACHE), experts_on=disk,ram, step=c,layers, "
                         "spare=32,0 (MiB), or policy=load,adapt")
    ap.add_argument("--spare", type=int, default=32, help="MiB of used read buffers kept per size (formstore.SPARE_BYTES)")
    ap.add_argument("--step", default="c", choices=["c", "layers"],
                    help="a decode step's held experts in C calls (c) or a call per layer (layers)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        return child(a)
    knob, values = a.vary.split("=")
    base = [sys.executable, __file__, "--child", "--model", a.model, "--budget", str(a.budget), "--policy", a.policy,
            "--tokens", str(a.tokens), "--temperature", str(a.temperature)]
    for _ in range(a.rounds):
        for v in values.split(","):
            env, args = dict(os.environ), ["--readers", str(a.readers), "--experts-on", a.experts_on, "--step", a.step,
                                           "--spare", str(a.spare)]
            if knob == "readers":
                args[1] = v
            elif knob == "cache":
                env["EMOE_FORMS_CACHE"] = v
            elif knob == "experts_on":
                args[3] = v
            elif knob == "step":
                args[5] = v
            elif knob == "spare":
                args[7] = v
            elif knob == "policy":
                args += ["--policy", v]  # (the later --policy wins)
            else:
                raise SystemExit(f"unknown --vary knob {knob!r}")
            out = subprocess.run(base + args, capture_output=True, text=True, env=env, check=True).stdout
            r = json.loads(out.strip().splitlines()[-1])
            print(f"{knob}={v:5s} decode tok/s {' '.join(f'{x:5.1f}' for x in sorted(r['tok_s']))}  "
                  f"reads {r['read_mb']:.0f} MiB in {r['read_s']:.2f} s"
                  + (f"  switches {r['switches']}" if r["switches"] is not None else ""), flush=True)


if __name__ == "__main__":
    main()
