"""Serving's wall time on the disk forms tier (the embedded model's int8 forms), reads into used buffers that nothing
views (FormDiskStore.spare_bytes, the default) against a new mapping every read, alternated in one process:
32 mixed test-split requests in batches of 4, 16 tokens each, per round; two engines built once, the order flipped
every round. Prints each round's seconds and the loader's share of them, then the per-round ratio (B's time over A's)
with a bootstrap interval: docs/results/plan_moves.txt.

    python scripts/ab_read_buffers.py [--policy emoe-a-host] [--budget 0.4] [--rounds 30]
    python scripts/ab_read_buffers.py --micro     # one O_DIRECT read of an expert's size: new mapping or reused buffer

(At commit 8fbf108 the same script, as ab_overlap_serving.py --compare overlap, timed a plan's reads landing in the
background against read before set_resident returns: no gain, and that code is gone; plan_moves.txt.)
"""
from __future__ import annotations

import argparse
import math
import random
import statistics
import time
from pathlib import Path

from emoe import default_model_dir
from emoe.commands import _predictors
from emoe.datasets import load_split
from emoe.engine import Engine, EngineConfig, SamplingParams
from emoe.eval import Setup, build
from emoe.profile import Profile

ARMS = (("reused", {}), ("fresh", {"spare_bytes": 0}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--policy", default="emoe-a-host", help="-host: every miss a read; lru: loads and evictions")
    ap.add_argument("--budget", type=float, default=0.4)
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--micro", action="store_true", help="time single reads instead of serving")
    a = ap.parse_args()
    model = default_model_dir()
    if a.micro:
        return micro(model)
    prof_dir = str(Path(model) / "profile")
    prof = Profile.load(prof_dir, model)
    setup = Setup(prof, _predictors(prof_dir, [a.policy]))
    rng = random.Random(0)
    exs = [rng.choice(load_split("test", rng.choice(prof.tasks))) for _ in range(32)]
    engines = {}
    for name, knobs in ARMS:
        policy, residency = build(a.policy, setup)
        eng = Engine(EngineConfig(model, budget=a.budget, max_batch=4, experts_on="disk", host_int8=True, device="cpu"),
                     policy=policy, residency=residency)
        eng.store.spare_bytes = knobs.get("spare_bytes", eng.store.spare_bytes)
        engines[name] = eng
    params = SamplingParams(max_tokens=16)
    secs: dict[str, list[float]] = {n: [] for n in engines}
    share: dict[str, list[float]] = {n: [] for n in engines}
    for rnd in range(a.rounds):
        for name in (list(engines) if rnd % 2 == 0 else list(engines)[::-1]):
            eng = engines[name]
            s0, t0 = eng.loader.stats.seconds, time.perf_counter()
            for i in range(0, len(exs), 4):
                eng.generate([e.prompt for e in exs[i:i + 4]], params, tasks=[e.task for e in exs[i:i + 4]])
            dt = time.perf_counter() - t0
            secs[name].append(dt)
            share[name].append((eng.loader.stats.seconds - s0) / dt)
            print(f"{name:10s} round {rnd:2d} {dt:.3f} s, loader {share[name][-1]:.2%}", flush=True)
    first, second = list(engines)
    for name in engines:
        print(f"{name:10s} median {statistics.median(secs[name]):.3f} s, loader {statistics.median(share[name]):.2%}")
    logs = [math.log(b / x) for x, b in zip(secs[first], secs[second])]
    g = random.Random(1)
    boots = sorted(sum(g.choice(logs) for _ in logs) / len(logs) for _ in range(2000))
    print(f"{second}/{first} time: geometric mean {math.exp(sum(logs) / len(logs)):.3f}, 95% bootstrap "
          f"[{math.exp(boots[50]):.3f}, {math.exp(boots[1949]):.3f}], above 1 in {sum(x > 0 for x in logs)} of {len(logs)}")


def micro(model: str) -> None:
    """400 O_DIRECT reads of one expert's forms' size from the embedded model's largest forms-cache file, into a new
    mapping each (unmapped after) or into one reused buffer: wall and CPU time per read, 3 rounds."""
    import mmap
    import os
    from emoe.checkpoint import Checkpoint
    from emoe.formstore import FormDiskStore
    store = FormDiskStore(Checkpoint(model), int8=True)
    path = max({loc.path for loc, _, _ in store._spans.values()}, key=os.path.getsize)
    n, size = -(-store.expert_nbytes // 4096) * 4096, os.path.getsize(path)
    offs = [(i * n) % (size - n) // 4096 * 4096 for i in range(400)]
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    buf = mmap.mmap(-1, n)

    def timed(new: bool) -> tuple[float, float]:
        t, c = time.perf_counter(), time.process_time()
        for o in offs:
            os.preadv(fd, [mmap.mmap(-1, n) if new else buf], o)
        return (time.perf_counter() - t) / len(offs) * 1e3, (time.process_time() - c) / len(offs) * 1e3

    print(f"{n / 2**20:.2f} MiB reads from {path}")
    for _ in range(3):
        (w1, c1), (w2, c2) = timed(True), timed(False)
        print(f"new mapping {w1:.3f} ms a read ({c1:.3f} ms CPU)   reused buffer {w2:.3f} ms ({c2:.3f} ms CPU)")
    os.close(fd)


if __name__ == "__main__":
    main()
