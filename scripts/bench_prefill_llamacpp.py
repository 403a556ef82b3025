"""Prompt processing, emoe against llama.cpp on the same GGUF and the same prompts, one after the other (each
server's idle threads would otherwise share the cores with the other's timing): llama-server's own
prompt_ms, then emoe's time to the first token (the CPU default: experts and dense projections on the file's
blocks, budget 0) with the prefill routine (emoe.ckernel) and without it.

  python scripts/bench_prefill_llamacpp.py --llama-cpp LLAMA_DIR --gguf FILE.gguf --model IMPORT_DIR
      [--lengths 16,50,128,254] [--rounds 3]

IMPORT_DIR is the GGUF imported by `emoe import-gguf` (its tokenizer makes the prompts, for both sides).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.request
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from check_llamacpp import llama_server  # noqa: E402

from emoe import quant  # noqa: E402
from emoe.engine import Engine, EngineConfig, SamplingParams  # noqa: E402

WORDS = "the quick brown fox jumps over the lazy dog and then it runs away into the forest".split()


def prompts(eng: Engine, lengths: list[int], rounds: int) -> dict[int, list[list[int]]]:
    return {n: [eng.codec.encode(" ".join(WORDS[i:] + WORDS[:i]) * 40)[:n] for i in range(rounds)] for n in lengths}


def llama_ms(port: int, ids: list[int]) -> float:
    body = json.dumps({"prompt": ids, "n_predict": 1, "cache_prompt": False}).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}/completion", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.loads(r.read())["timings"]["prompt_ms"]


def emoe_ms(eng: Engine, ids: list[int]) -> float:
    t0 = time.perf_counter()
    eng.generate([ids], SamplingParams(max_tokens=1))
    return (time.perf_counter() - t0) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--llama-cpp", type=Path, required=True)
    ap.add_argument("--gguf", type=Path, required=True)
    ap.add_argument("--model", required=True, help="the GGUF's emoe import")
    ap.add_argument("--lengths", default="16,50,128,254")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--port", type=int, default=8131)
    a = ap.parse_args()
    threads = torch.get_num_threads()
    eng = Engine(EngineConfig(a.model, miss_policy="host", budget=0, experts_on="ram", dense_blocks=True, max_batch=1))
    lengths = [n for n in map(int, a.lengths.split(",")) if n < eng.max_len]
    ps = prompts(eng, lengths, a.rounds)
    with llama_server(a.llama_cpp, a.gguf, a.port, threads, eng.max_len):
        llama = {n: min(llama_ms(a.port, ids) for ids in ps[n]) for n in lengths}
    default = dict(quant.DEQUANT_ROWS)
    emoe_ms(eng, ps[lengths[0]][0])
    mine, kernel = {}, {}
    for n in lengths:
        quant.DEQUANT_ROWS.update({k: 1 << 30 for k in default})
        kernel[n] = min(emoe_ms(eng, ids) for ids in ps[n])
        quant.DEQUANT_ROWS.update(default)
        mine[n] = min(emoe_ms(eng, ids) for ids in ps[n])
    print(f"{a.gguf.name}: best of {a.rounds} prompts per length, {threads} threads; llama.cpp's prompt_ms, then "
          f"emoe's time to its first token")
    print("tokens  llama.cpp ms  emoe ms  emoe int4-kernel-only ms  emoe/llama.cpp  kernel-only/llama.cpp")
    for n in lengths:
        print(f"{n:6d}  {llama[n]:12.0f}  {mine[n]:7.0f}  {kernel[n]:24.0f}  {mine[n] / llama[n]:14.2f}  "
              f"{kernel[n] / llama[n]:21.2f}")


if __name__ == "__main__":
    main()
