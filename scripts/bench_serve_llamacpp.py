"""emoe's server against llama-server on the same GGUF under the same load, side by side in one run: the
client is `emoe bench serve`'s (an Azure trace's arrival times and token counts, outputs held to the
trace's length with ignore_eos, prompts from the test split scaled to --max-prompt-tokens), both servers on
the same threads with --slots requests decoded together (llama-server -np, emoe --max-batch). emoe serves
the file as its CPU default does (experts and dense projections on the file's blocks, budget 0), imported
once before either server starts; "ready" is each server's start-up, launch to /health answering.

    python scripts/bench_serve_llamacpp.py --llama-cpp LLAMA_DIR --gguf FILE.gguf [--slots 4 --requests 32]
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

from emoe.bench import serve
from emoe.commands import _gguf_import_dir

TRACE = Path(__file__).resolve().parents[1].parent / "shared/traces/AzureLLMInferenceTrace_conv.csv"


@contextmanager
def running(cmd: list[str], port: int, env: dict | None = None, wait_s: float = 600, preexec_fn=None):
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, preexec_fn=preexec_fn)
    t0 = time.perf_counter()
    try:
        deadline = time.time() + wait_s
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"{cmd[0]} did not come up (exit {proc.poll()})") from None
                time.sleep(0.1)
        yield time.perf_counter() - t0  # seconds until /health answered: the server's start-up
    finally:
        proc.terminate()
        proc.wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--llama-cpp", type=Path, required=True, help="llama.cpp tree with build/bin/llama-server")
    ap.add_argument("--gguf", type=Path, required=True)
    ap.add_argument("--trace", type=Path, default=TRACE)
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--time-scale", type=float, default=1.0, help="trace arrival offsets are divided by this")
    ap.add_argument("--slots", type=int, default=4)
    ap.add_argument("--ctx", type=int, default=1024, help="context per slot")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--max-prompt-tokens", type=int, default=400)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--port", type=int, default=8093)
    ap.add_argument("--emoe-arg", action="append", default=[], metavar="ARG",
                    help="passed on to `emoe serve` (repeat; e.g. --emoe-arg=--scheduler --emoe-arg=fcfs)")
    a = ap.parse_args()
    reqs = serve.make_requests(a.requests, trace=a.trace, time_scale=a.time_scale, max_tokens=a.max_tokens,
                               max_prompt_tokens=a.max_prompt_tokens)
    llama = [str(a.llama_cpp / "build/bin/llama-server"), "-m", str(a.gguf), "--port", str(a.port), "-np",
             str(a.slots), "-c", str(a.slots * a.ctx), "-t", str(a.threads), "-tb", str(a.threads), "--no-webui"]
    os.environ["EMOE_CACHE"] = cache = tempfile.mkdtemp(prefix="emoe-cache-")
    _gguf_import_dir(a.gguf)  # the import `emoe serve --model FILE.gguf` makes, once, before any clock
    emoe = [sys.executable, "-m", "emoe.cli", "serve", "--model", str(a.gguf), "--port", str(a.port),
            "--max-batch", str(a.slots), "--max-len", str(a.ctx), "--threads", str(a.threads), *a.emoe_arg]
    rows, ready = {}, {}
    for name, cmd in (("llama.cpp", llama), ("emoe", emoe)):
        with running(cmd, a.port, env={**os.environ, "EMOE_CACHE": cache}) as ready[name]:
            serve.run_benchmark(f"http://127.0.0.1:{a.port}", reqs[:a.slots])  # warm-up
            rows[name] = serve.run_benchmark(f"http://127.0.0.1:{a.port}", reqs)
    print(f"{a.gguf.name}: {len(reqs)} requests of {a.trace.name} (time scale {a.time_scale:g}), {a.slots} slots, "
          f"{a.threads} threads, outputs up to {a.max_tokens} tokens, prompts up to {a.max_prompt_tokens}")
    print(f"{'server':10} {'ready s':>7} {'done':>5} {'req/s':>6} {'out tok/s':>9} {'TTFT mean/p99 ms':>18} "
          f"{'TPOT mean/p99 ms':>17}")
    for name, r in rows.items():
        if not r["completed"]:
            print(f"{name:10} {ready[name]:7.1f} no request completed: {r['errors']}")
            continue
        t, p = r["ttft_ms"], r["tpot_ms"]
        print(f"{name:10} {ready[name]:7.1f} {r['completed']:>5} {r['request_throughput']:6.2f} {r['output_token_throughput']:9.1f} "
              f"{t['mean']:8.0f}/{t['p99']:<9.0f} {p['mean']:7.1f}/{p['p99']:<9.1f}"
              + (f" failed {r['failed']}: {r['errors']}" if r["failed"] else ""))
    e, l = rows["emoe"], rows["llama.cpp"]
    if e["completed"] and l["completed"]:
        print(f"emoe / llama.cpp: output tokens/s {e['output_token_throughput'] / l['output_token_throughput']:.2f}x, "
              f"mean TTFT {e['ttft_ms']['mean'] / l['ttft_ms']['mean']:.2f}x, "
              f"mean TPOT {e['tpot_ms']['mean'] / l['tpot_ms']['mean']:.2f}x")


if __name__ == "__main__":
    main()
