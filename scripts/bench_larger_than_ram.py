"""emoe and llama.cpp on a GGUF larger than the memory they are given, side by side in one run: each runs in a
memory cgroup of its own limited to the same bytes (page cache included, as the kernel charges it), with the
model's files dropped from the page cache first, and decodes the same prompts on the same threads: one request at
a time, or all at once (--streams N: N slots, output tokens over the wall time).

- llama.cpp maps the file (`--no-repack`: by default it repacks every weight into anonymous memory, which the
  limit kills, also run and reported) and the page cache decides which pages stay;
- emoe holds a budget of experts in RAM as their kernel forms and reads the others' forms from its forms cache
  with O_DIRECT (formstore), under each miss policy asked for: `load` (on demand, LRU), `host` (read and run,
  the resident set stays as planned) and `reroute` (to a resident expert: no reads, not exact).

emoe's budget is the limit less what the process holds besides experts, measured first: the peak memory of a
run holding none (budget 0, `host` from disk) under no limit, plus --margin-mb.

Needs root (a memory cgroup, v1 or v2) and a llama.cpp build with llama-server. The forms cache is built
before any limited run (the first start writes it).

    python scripts/bench_larger_than_ram.py --llama-cpp LLAMA_DIR --gguf FILE.gguf --limits-mb 1600,1200
    python scripts/bench_larger_than_ram.py ... --streams 4 --policies load --skip-repack
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_serve_llamacpp import running  # noqa: E402

OPENINGS = ["The history of the city begins", "Write a short story about a lighthouse keeper who",
           "Explain how a refrigerator works:", "List five facts about the moon."]


def prompts(n: int) -> list[str]:
    """The four openings, then as many more as asked, each numbered (no two alike, so no prompt cache serves one)."""
    return OPENINGS[:n] + [f"{OPENINGS[i % len(OPENINGS)]} ({i})" for i in range(len(OPENINGS), n)]


def memory_cgroup() -> tuple[Path, int]:
    """This process's memory cgroup folder and its version (1 or 2)."""
    from emoe.store import memory_cgroups
    found = memory_cgroups()
    if not found:
        raise SystemExit("no memory cgroup found")
    d, v1 = found[0]
    return d, 1 if v1 else 2


class Limited:
    """A fresh child cgroup limited to `limit` bytes (None: no limit), removed after."""

    def __init__(self, limit: int | None, name: str):
        parent, self.v = memory_cgroup()
        self.dir = parent / f"emoe-bench-{name}-{os.getpid()}"
        self.dir.mkdir()
        if limit is not None:
            (self.dir / ("memory.limit_in_bytes" if self.v == 1 else "memory.max")).write_text(str(limit))

    def enter(self) -> None:  # preexec_fn: the child joins before it execs
        (self.dir / "cgroup.procs").write_text(str(os.getpid()))

    def peak(self) -> int:
        return int((self.dir / ("memory.max_usage_in_bytes" if self.v == 1 else "memory.peak")).read_text())

    def close(self) -> None:
        for _ in range(50):
            try:
                self.dir.rmdir()
                return
            except OSError:
                time.sleep(0.1)


def drop_cache(paths: list[Path]) -> None:
    """The files' pages out of the page cache, so no run finds the model there for free."""
    for p in paths:
        for f in ([p] if p.is_file() else [f for f in p.rglob("*") if f.is_file()]):
            fd = os.open(f, os.O_RDONLY)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            os.close(fd)


def post(port: int, body: dict, timeout: float = 900) -> dict:
    req = urllib.request.Request(f"http://127.0.0.1:{port}/completion", json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.load(r)


def llama(a, limit: int | None, repack: bool) -> dict:
    cg = Limited(limit, "llama")
    cmd = [str(a.llama_cpp / "build/bin/llama-server"), "-m", str(a.gguf), "--port", str(a.port), "-t", str(a.threads),
           "-np", str(a.streams), "-c", str(1024 * a.streams), *([] if repack else ["--no-repack"])]
    ask = (lambda p: post(a.port, {"prompt": p, "n_predict": a.tokens, "temperature": a.temperature, "top_k": 0,  # noqa: E731
                                   "top_p": 1.0, "min_p": 0.0, "seed": 1, "ignore_eos": True, "cache_prompt": False}))
    try:
        with running(cmd, a.port, preexec_fn=cg.enter):
            try:
                if a.streams > 1:  # every prompt at once: output tokens over the wall time, prefills included
                    t0 = time.perf_counter()
                    with ThreadPoolExecutor(a.prompts) as pool:
                        got = list(pool.map(ask, prompts(a.prompts)))
                    rates = [sum(r["tokens_predicted"] for r in got) / (time.perf_counter() - t0)]
                else:
                    rates = [ask(p)["timings"]["predicted_per_second"] for p in prompts(a.prompts)]
            except OSError:
                return {"error": "exited while decoding (the limit's OOM kill)"}
            return {"tok_s": rates, "peak_mb": cg.peak() / 2**20}
    except RuntimeError as e:  # it exited while loading: the limit's OOM kill
        return {"error": f"{e}: killed while loading"}
    finally:
        cg.close()


def emoe_child(a) -> None:
    """Runs inside the cgroup: one engine, the prompts one at a time; prints a JSON line."""
    from emoe.engine import Engine, EngineConfig, SamplingParams
    eng = Engine(EngineConfig(str(a.model), budget=a.budget_bytes, miss_policy=a.policy, experts_on="disk",
                              max_batch=a.streams, dense_blocks=True))
    rates = []
    if a.streams > 1:  # every prompt at once, as llama-server's: output tokens over the wall time, prefills included
        t0 = time.perf_counter()
        got = eng.generate(prompts(a.prompts), SamplingParams(max_tokens=a.tokens, ignore_eos=True, temperature=a.temperature,
                                                   seed=1), chat=False)
        rates.append(sum(len(r.output_ids) for r in got) / (time.perf_counter() - t0))
    for p in prompts(a.prompts) if a.streams == 1 else ():
        t0 = time.perf_counter()
        (r,) = eng.generate([p], SamplingParams(max_tokens=a.tokens, ignore_eos=True, temperature=a.temperature,
                                                seed=1), chat=False)
        rates.append((len(r.output_ids) - 1) / (time.perf_counter() - r.first_token_at))
        assert r.first_token_at >= t0
    s = eng.cache.stats
    print(json.dumps({"tok_s": rates, "resident_mb": eng.cache.used_bytes / 2**20, "hit_rate": s.hit_rate,
                      "read_mb": eng.store.stats.bytes_read / 2**20, "forms": bool(getattr(eng.store, "form_tier", 0))}))


def emoe(a, limit: int | None, budget: int, policy: str) -> dict:
    cg = Limited(limit, "emoe")
    cmd = [sys.executable, __file__, "--child", "--model", str(a.model), "--budget-bytes", str(budget),
           "--policy", policy, "--tokens", str(a.tokens), "--temperature", str(a.temperature), "--streams", str(a.streams),
           "--prompts", str(a.prompts)]
    env = dict(os.environ, OMP_NUM_THREADS=str(a.threads))
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, preexec_fn=cg.enter, env=env)
        if p.returncode:
            return {"error": f"exited {p.returncode}: {p.stderr.strip().splitlines()[-1] if p.stderr.strip() else ''}"}
        return {**json.loads(p.stdout.strip().splitlines()[-1]), "peak_mb": cg.peak() / 2**20}
    finally:
        cg.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--llama-cpp", type=Path)
    ap.add_argument("--gguf", type=Path)
    ap.add_argument("--model", type=Path, help="emoe's import of the GGUF (default: emoe's own import folder for it)")
    ap.add_argument("--limits-mb", default="1600,1200")
    ap.add_argument("--policies", default="load,host,reroute")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--temperature", type=float, default=0.0,
                    help="sampling temperature, the whole distribution (0: greedy; a random model's greedy answers "
                         "repeat a few tokens, whose experts a cache then keeps)")
    ap.add_argument("--margin-mb", type=float, default=64)
    ap.add_argument("--streams", type=int, default=1,
                    help="1: the prompts one at a time (decode tokens/s each); N: all at once, N slots (output tokens/s "
                         "over the wall time, prefills included)")
    ap.add_argument("--prompts", type=int, default=4, help="how many prompts (the four openings, then numbered repeats)")
    ap.add_argument("--skip-repack", action="store_true", help="leave out llama.cpp's default load (killed under a limit)")
    ap.add_argument("--port", type=int, default=8093)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--budget-bytes", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--policy", default="host", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        return emoe_child(a)
    if a.model is None:
        from emoe.commands import _gguf_import_dir
        a.model = _gguf_import_dir(a.gguf)
    from emoe.engine import Engine, EngineConfig  # the import, and the forms cache, made here, unlimited
    Engine(EngineConfig(str(a.model), budget=0, miss_policy="host", experts_on="disk", max_batch=1, dense_blocks=True))
    files = [a.gguf, a.model, Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "emoe" / "forms"]
    how = ("one request at a time" if a.streams == 1 else
           f"all at once ({a.streams} slots; output tokens/s over the wall time, prefills included)")
    print(f"# {a.gguf} ({a.gguf.stat().st_size / 2**20:.0f} MiB), {a.tokens} tokens after each of {a.prompts} "
          f"prompts, {how}, {a.threads} threads, temperature {a.temperature:g}; decode tokens/s, median (min-max)")
    drop_cache(files)
    base = emoe(a, None, 0, "host")
    if "error" in base:
        raise SystemExit(f"emoe's run without experts failed: {base['error']}")
    drop_cache(files)
    free = llama(a, None, False)
    fmt = lambda r: (f"{statistics.median(r['tok_s']):7.1f} ({min(r['tok_s']):.1f}-{max(r['tok_s']):.1f})  "  # noqa: E731
                     f"peak {r['peak_mb']:.0f} MiB" if "tok_s" in r else r["error"])
    print(f"no limit   llama.cpp mmap      {fmt(free)}")
    print(f"no limit   emoe, no expert held {fmt(base)} (what emoe holds besides experts)")
    for mb in (float(x) for x in a.limits_mb.split(",")):
        limit = int(mb * 2**20)
        budget = max(0, int(limit - (base["peak_mb"] + a.margin_mb) * 2**20))
        for repack in (False,) if a.skip_repack else (False, True):
            drop_cache(files)
            print(f"{mb:6.0f} MiB llama.cpp {'repack' if repack else 'mmap  '}    {fmt(llama(a, limit, repack))}",
                  flush=True)
        for policy in a.policies.split(","):
            drop_cache(files)
            r = emoe(a, limit, budget, policy)
            extra = (f"  budget {budget / 2**20:.0f} MiB, held {r['resident_mb']:.0f}, hit rate {r['hit_rate']:.2f}, "
                     f"read {r['read_mb']:.0f} MiB" if "tok_s" in r else "")
            print(f"{mb:6.0f} MiB emoe {policy:8s}       {fmt(r)}{extra}", flush=True)


if __name__ == "__main__":
    main()
