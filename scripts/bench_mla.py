"""A DeepSeek import's latent-attention decode block (cstep.mla_block) timed on its own, every layer in turn as a step
runs them, at several context lengths: with kv_b's int8 forms per head (what the step call uses) and with its float32
kv_b. For the block's cost beside a whole step's (docs/results/mla_step.txt).

    python scripts/bench_mla.py --model runs/llamacpp-ds/import-Q4_K_M [--positions 30,300,880] [--rounds 30]
"""
from __future__ import annotations

import argparse
import time

import torch

from emoe import cstep, decode_block
from emoe.engine import Engine, EngineConfig


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="a DeepSeek-family GGUF import (emoe import-gguf)")
    ap.add_argument("--positions", default="30,300,880")
    ap.add_argument("--rounds", type=int, default=30)
    a = ap.parse_args()
    eng = Engine(EngineConfig(a.model, budget=0, miss_policy="host", experts_on="ram", max_batch=1, dense_blocks=True))
    m = eng.model
    if m.cfg.mla is None:
        raise SystemExit(f"{a.model} has no latent attention")
    blocks = [decode_block.block_weights(m, i) for i in range(m.cfg.num_layers)]
    if any(b is None for b in blocks):
        raise SystemExit("some layer's projections are not kernel forms: nothing for the step call to run")
    x, slot = torch.randn(1, m.cfg.hidden_size), torch.tensor([0])
    print(f"{a.model}: {len(blocks)} layers, {m.cfg.num_heads} heads, {torch.get_num_threads()} threads; ms a layer")
    print(f"{'positions':>9} {'kv_b int8 forms':>15} {'kv_b float32':>12}")
    for p in map(int, a.positions.split(",")):
        if p >= eng.kv.k[0].shape[1]:
            raise SystemExit(f"position {p} is past the KV slot length {eng.kv.k[0].shape[1]}")
        pos = torch.tensor([p])
        tables, row = m.rope_tables(pos[:, None], torch.float32), []
        for forms in (True, False):
            t = time.perf_counter()
            for _ in range(a.rounds):
                for i, (_, f, plain, ln, ln2, scale, flags, biases, dims, heads_kv) in enumerate(blocks):
                    cstep.mla_block(x.clone(), ln, ln2, m.cfg.rms_norm_eps, f, plain, eng.kv.k[i], slot, pos, tables,
                                      m.cfg.num_heads, dims, scale, flags, biases, heads_kv if forms else (None, None))
            row.append((time.perf_counter() - t) / a.rounds / len(blocks) * 1e3)
        print(f"{p:9d} {row[0]:15.3f} {row[1]:12.3f}")


if __name__ == "__main__":
    main()
