"""emoe against llama.cpp itself, on GGUF files llama.cpp's own tools made.

A checkout of llama.cpp (built with `cmake -B build && cmake --build build --target llama-quantize
llama-server`, or the copy vendored in the PyPI sdist of llama-cpp-python) converts a Hugging Face MoE
folder with `convert_hf_to_gguf.py` (needs `pip install sentencepiece`) and quantises it with
`llama-quantize`; emoe imports each file (`emoe import-gguf`, experts left packed in the file) and both
answer the same prompts, given as the same token ids:

- tokenizer: the tokenizer emoe builds from the GGUF's vocabulary gives llama-server's /tokenize ids;
- greedy: emoe's 16 greedy tokens equal llama.cpp's (llama-server /completion, temperature 0);
- teacher-forced: emoe's next-token argmax along llama.cpp's continuation equals llama.cpp's token, and
  the log-probability each gives that token (llama.cpp's pre-sampling one);
- own f32: each system's greedy tokens on this file equal its own on the f32 file (how far quantisation
  moves each: llama.cpp also quantises activations to 8 bits in its quantised matmuls, emoe does not);
- decode speed: tokens/s after the first token, llama-server's own timing against emoe's, one request at
  a time on the same threads.
emoe runs all-resident and under a budget with misses on the host (exact) or on low-bit copies.

    python scripts/check_llamacpp.py --llama-cpp LLAMA_DIR [--model DIR] [--quants f32,q8_0,Q4_0,Q4_K_M,Q3_K_M,Q2_K]
    python scripts/check_llamacpp.py --llama-cpp LLAMA_DIR --gguf YOUR-MODEL-Q4_K_M.gguf [...]   (your own files:
        imported as they are; the prompts come through the file's own tokenizer and chat template)
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import torch
from tokenizers import Tokenizer

from emoe.datasets import load_split
from emoe.engine import Engine, EngineConfig, SamplingParams

# llama.cpp's converter names a byte-level BPE tokenizer's split rule by hashing its output; a tokenizer it
# does not know (the embedded model's) is named with --pre instead.
CONVERT = """
import runpy, sys
llama, pre = sys.argv[1], sys.argv[2]
sys.path.insert(0, llama)
sys.argv = [llama + "/convert_hf_to_gguf.py"] + sys.argv[3:]
if pre:
    import conversion.base as base
    for cls in vars(base).values():
        if isinstance(cls, type) and "get_vocab_base_pre" in vars(cls):
            cls.get_vocab_base_pre = lambda self, tokenizer: pre
runpy.run_path(sys.argv[0], run_name="__main__")
"""
CONVERT_TYPES = ("f32", "f16", "bf16", "q8_0")  # what the converter writes itself; others go through llama-quantize


def make_gguf(llama: Path, model: Path, work: Path, qtype: str, pre: str, extra: list[str]) -> Path:
    out = work / f"model-{qtype}.gguf"
    if out.is_file():
        return out
    if qtype in CONVERT_TYPES:
        cmd = [sys.executable, "-c", CONVERT, str(llama), pre, str(model), "--outtype", qtype, "--outfile", str(out), *extra]
    else:
        cmd = [str(llama / "build/bin/llama-quantize"), str(make_gguf(llama, model, work, "f32", pre, extra)), str(out),
               qtype]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return out


def post(port: int, path: str, body: dict) -> dict:
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=300) as r:
        return json.load(r)


@contextmanager
def llama_server(llama: Path, gguf: Path, port: int, threads: int, ctx: int):
    proc = subprocess.Popen([str(llama / "build/bin/llama-server"), "-m", str(gguf), "--port", str(port),
                             "-c", str(ctx), "-t", str(threads), "-tb", str(threads), "-np", "1", "--no-webui", "-ctk", "f32", "-ctv", "f32"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(600):
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(0.2)
        else:
            raise RuntimeError("llama-server did not come up")
        yield
    finally:
        proc.terminate()
        proc.wait()


def llama_side(port: int, texts: list[str], prompts: list[list[int]], n: int) -> dict:
    tok = [post(port, "/tokenize", {"content": t, "add_special": False, "parse_special": True})["tokens"]
           for t in texts]
    runs = [post(port, "/completion", {"prompt": ids, "n_predict": n, "temperature": 0, "n_probs": 1,
                                       "return_tokens": True, "cache_prompt": False, "ignore_eos": True})
            for ids in prompts]
    # llama-server leaves out the probabilities of trailing tokens that end mid-character: compare what it gives
    # (and the key itself when every token does)
    lps = [[p["logprob"] for p, t in zip(r.get("completion_probabilities", []), r["tokens"]) if p["id"] == t]
           for r in runs]
    return {"tokenize": tok, "tokens": [r["tokens"] for r in runs], "logprobs": lps,
            "tok_s": [r["timings"]["predicted_per_second"] for r in runs]}


@torch.inference_mode()
def emoe_side(model: Path, policy: str, budget: float, prompts: list[list[int]], ref: dict, n: int,
              host_kernel: bool = True, dense_int8: bool = False, dtype: str | None = None,
              dense_blocks: bool = False, form_bits: int = 8) -> dict:
    eng = Engine(EngineConfig(str(model), budget=budget, miss_policy=policy, experts_on="ram", max_batch=1,
                              host_kernel=host_kernel, dense_int8=dense_int8, dtype=dtype, dense_blocks=dense_blocks,
                              host_form_bits=form_bits))
    same, agree, dlp, tok_s, outputs = 0, [], [], [], []
    stops = sorted(eng.codec.stop_ids)  # llama.cpp's ignore_eos bans end-of-generation tokens: so does this
    params = SamplingParams(max_tokens=n, ignore_eos=True, logit_bias={t: -100.0 for t in stops})
    for ids, want, want_lp in zip(prompts, ref["tokens"], ref["logprobs"]):
        (r,) = eng.generate([ids], params)
        same += r.output_ids == want
        outputs.append(r.output_ids)
        tok_s.append((len(r.output_ids) - 1) / (r.finished_at - r.first_token_at))
        lp = torch.log_softmax(eng.score(ids, want).float(), -1)
        agree += (lp.index_fill(-1, torch.tensor(stops), -torch.inf).argmax(-1) == torch.tensor(want)).tolist()
        got = lp.gather(-1, torch.tensor(want)[:, None])[:len(want_lp), 0]
        dlp += (got - torch.tensor(want_lp)).abs().tolist()
    return {"same": same / len(prompts), "outputs": outputs, "agreement": sum(agree) / len(agree),
            "dlogprob": sum(dlp) / len(dlp) if dlp else float("nan"), "max_dlogprob": max(dlp, default=float("nan")), "tok_s": sorted(tok_s)[len(tok_s) // 2],
            "hit_rate": eng.cache.stats.hit_rate}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--llama-cpp", type=Path, required=True, help="llama.cpp source tree with build/bin")
    ap.add_argument("--model", type=Path, default=Path(__file__).parents[1] / "emoe/models/emoe-tiny")
    ap.add_argument("--work", type=Path, default=Path("runs/llamacpp"))
    ap.add_argument("--quants", default="f32,q8_0,Q4_0,Q4_K_M,Q3_K_M,Q2_K", help="f32 first: the others are "
                    "compared with it too")
    ap.add_argument("--pre", default="gpt-2", help="tokenizer.ggml.pre to write ('' to let llama.cpp hash it)")
    ap.add_argument("--gguf", type=Path, nargs="+", help="compare on these GGUF files instead of converting --model")
    ap.add_argument("--convert-arg", action="append", default=[], help="passed to convert_hf_to_gguf.py "
                    "(e.g. --convert-arg=--no-mtp for Qwen3-Next / Qwen3.5 without their MTP head)")
    ap.add_argument("--n", type=int, default=16, help="test-split prompts")
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--modes", default="all@1.0,host@0.4,shadow@0.4",
                    help="emoe's rows: MISS_POLICY@BUDGET; host/dq@B runs host misses dequantised per run "
                    "(--no-host-kernel) instead of on the CPU int4 kernel; a +d8 suffix (host+d8@0) runs the dense "
                    "projections as int8 copies (--dense-int8), +db on the file's own blocks (--dense-blocks), +bf16 computes "
                    "in bf16 (--dtype bfloat16), +f4 holds sub-4-bit types as int4 forms (--host-form-bits 4)")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--port", type=int, default=8091)
    a = ap.parse_args()
    for need in ("convert_hf_to_gguf.py", "build/bin/llama-server", "build/bin/llama-quantize"):
        if not (a.llama_cpp / need).exists():
            sys.exit(f"{a.llama_cpp / need} not found: build llama.cpp first (see this script's docstring)")
    a.work.mkdir(parents=True, exist_ok=True)
    files = [(f.stem, f) for f in a.gguf] if a.gguf else \
        [(q, make_gguf(a.llama_cpp, a.model, a.work, q, a.pre, a.convert_arg)) for q in a.quants.split(",")]
    for label, gguf in files:
        subprocess.run([sys.executable, "-m", "emoe.cli", "import-gguf", str(gguf), "--out", str(a.work / f"import-{label}")],
                       check=True, stdout=subprocess.DEVNULL)
    eng = Engine(EngineConfig(str(a.work / f"import-{files[0][0]}" if a.gguf else a.model), miss_policy="all", max_batch=1))
    codec, ctx = eng.codec, eng.max_len
    del eng
    rows = load_split("test")[: a.n]
    texts = [codec.apply_chat([{"role": "user", "content": r.prompt}]) for r in rows]
    prompts = [codec.encode(t)[: ctx - a.tokens - 1] for t in texts]  # a short-context model reads the start
    modes = [(m.partition("@")[0], float(m.partition("@")[2])) for m in a.modes.split(",")]
    print(f"model {[f.name for f in a.gguf] if a.gguf else a.model}, {len(prompts)} test prompts, {a.tokens} greedy tokens each, {a.threads} threads; "
          f"emoe experts in RAM")
    print(f"{'gguf':{max(8, *(len(q) for q, _ in files))}} {'emoe misses':12} {'tokenizer':>9} {'greedy =':>8} {'agreement':>9} "
          f"{'|Δlogp| mean/max':>17} {'own f32 (llama.cpp/emoe)':>24} {'hit rate':>8} {'emoe tok/s':>10} {'llama.cpp tok/s':>15}")
    f32 = {}  # each system's greedy tokens from the f32 file: how far does quantisation move each?

    def drift(mine: list[list[int]], key: str) -> str:
        return f"{sum(x == y for x, y in zip(mine, f32[key])) / len(mine):.3f}" if key in f32 else "-"

    width = max(8, *(len(q) for q, _ in files))
    for q, gguf in files:
        imported = a.work / f"import-{q}"
        with llama_server(a.llama_cpp, gguf, a.port, a.threads, ctx):
            ref = llama_side(a.port, texts, prompts, a.tokens)
        imported_tok = Tokenizer.from_file(str(imported / "tokenizer.json"))  # built from the GGUF's vocabulary
        tok_ok = sum(x == imported_tok.encode(t, add_special_tokens=False).ids
                     for x, t in zip(ref["tokenize"], texts)) / len(prompts)
        llama_tps = sorted(ref["tok_s"])[len(prompts) // 2]
        if q == "f32":
            f32["llama"] = ref["tokens"]
        for policy, budget in modes:
            name, *flags = policy.split("+")
            r = emoe_side(imported, name.removesuffix("/dq"), budget, prompts, ref, a.tokens,
                          host_kernel=not name.endswith("/dq"), dense_int8="d8" in flags,
                          dtype="bfloat16" if "bf16" in flags else None, dense_blocks="db" in flags,
                          form_bits=4 if "f4" in flags else 8)
            if q == "f32" and policy == "all":
                f32["emoe"] = r["outputs"]
            own = f"{drift(ref['tokens'], 'llama')}/{drift(r['outputs'], 'emoe')}"
            print(f"{q:{width}} {policy + f'@{budget:.0%}':12} {tok_ok:9.3f} {r['same']:8.3f} {r['agreement']:9.3f} "
                  f"{r['dlogprob']:8.4f}/{r['max_dlogprob']:.4f} {own:>24} {r['hit_rate']:8.3f} {r['tok_s']:10.1f} {llama_tps:15.1f}", flush=True)


if __name__ == "__main__":
    main()
