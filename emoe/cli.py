"""`emoe` command line: the argument parser; each subcommand's work is in commands.py (serving) or pipeline.py
(eMoE's profile, predictors and eval)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .commands import cmd_generate, cmd_import_gguf, cmd_quantize, cmd_serve, cmd_train_model
from .pipeline import cmd_analyze, cmd_eval, cmd_profile, cmd_rescore, cmd_train_predictor


def _model_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="HF checkpoint folder (default: the embedded emoe-tiny model)")


def _slo(text: str):
    from .scheduler import parse_slo
    try:
        return parse_slo(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _floats(text: str, zero: bool = False) -> list[float]:
    try:
        vals = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not vals or any(not (0 <= v <= 1 and (zero or v > 0)) for v in vals):
        raise argparse.ArgumentTypeError(f"budgets must be fractions in {'[' if zero else '('}0, 1], got {text!r}")
    return vals


def _dtype_arg(p) -> None:
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16"],
                   help="fast-tier and compute dtype (default: float32 on CPU, where bf16 matmuls are often slow; "
                   "the checkpoint's on CUDA). bfloat16 halves what each full expert costs in the fast tier")


def _kv_dtype_arg(p) -> None:
    p.add_argument("--kv-dtype", default=None, choices=["float32", "bfloat16"],
                   help="the attention layers' KV cache, MLA's latents too (default: the compute dtype). bfloat16 on "
                   "a CPU halves a float32 cache (the bytes of llama.cpp's f16 default), and the C attention reads it")


def _host_kernel_arg(p) -> None:
    p.add_argument("--host-kernel", action=argparse.BooleanOptionalAction, default=True,
                   help="with host/auto misses and --experts-on ram, hold a GGUF's Q4/Q5/Q6_K/Q8_0/MXFP4 experts "
                   "(and the MXFP4 / FP8 releases' ones) in the CPU int4 kernel's layout, where RAM holds them, and run "
                   "host misses on it (default; bf16 activations), or dequantise each "
                   "matrix per run (--no-host-kernel: the file's exact arithmetic, in the file's bytes)")
    _activations_arg(p)


def _activations_arg(p) -> None:
    p.add_argument("--activations", choices=["bf16", "int8", "torch"], default=None,
                   help="what a decode step's products on kernel forms round their activations to, on a CPU: bf16 "
                   "in emoe's C routines (as PyTorch's kernel takes them), int8 per 32 (as llama.cpp's quantised "
                   "matmuls round them; faster where compute-bound), or torch: PyTorch's int4 kernel where it reads "
                   "the forms' layout (AVX512), else the unpacked matrix. Default: int8 for a GGUF's forms (quantised "
                   "for llama.cpp's int8 activations), else bf16 where the CPU has AVX512-BF16, else int8 (the "
                   "environment's EMOE_KQ=auto|bf16|int8|off says the same; a mode given holds for every model)")


def _data_arg(p) -> None:
    p.add_argument("--data", default=None, metavar="FILE.jsonl",
                   help="your own prompts, one JSON object a line with a task and a prompt (an answer optional), instead "
                   "of the six shipped tasks; split 70/15/15 by a hash of the prompt. A profile remembers it: "
                   "train-predictor and eval then draw from it too")


def _host_int8_arg(p) -> None:
    p.add_argument("--host-int8", action="store_true",
                   help="with host/auto misses and --experts-on ram, hold full-precision (bf16/fp16) experts as int8 "
                   "forms of the CPU int4 kernel too: 0.6x bf16's bytes and faster host runs where the CPU's bf16 "
                   "matmuls are slow, at 0.5%% weight error")
    p.add_argument("--host-form-bits", type=int, choices=(8, 4), default=8,
                   help="forms of a GGUF's sub-4-bit types that are quantised again (Q2_K, IQ1-IQ3, TQ): int8 "
                   "(default, 10 bits a weight, 0.5%% error) or int4 (5 bits, 1.1-1.3x the tokens/s, but agreement "
                   "with llama.cpp was 0.82-0.88 against int8's 0.90-0.96 on a random model). Where int8 forms would not "
                   "fit the RAM, int4 is used. Builds with emoe's AVX2 routines hold these types exactly at 5-6 bits "
                   "a weight instead, and ignore this")


def _dense_int8_arg(p) -> None:
    p.add_argument("--dense-blocks", action=argparse.BooleanOptionalAction, default=None,
                   help="on a CPU, run a GGUF import's dense projections (attention, shared experts, lm_head) on the "
                   "file's own quantised blocks in kernel forms, as llama.cpp does, instead of the import's float "
                   "copies (default on a CPU; docs/results/check_llamacpp_dense_blocks.txt)")
    p.add_argument("--dense-int8", action="store_true",
                   help="on a CPU, run the dense projections (attention, shared experts, lm_head) as int8 copies on "
                   "the int4 kernel (0.5%% weight error, bf16 activations): they are read whole for every token, so "
                   "this decoded 1.3-1.6x faster, and cost 3-35%% of next-token agreement (docs/results/"
                   "check_dense_int8.txt)")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="emoe", description="task-aware memory-efficient MoE inference")
    sub = ap.add_subparsers(dest="cmd", required=True)

    g = sub.add_parser("generate", help="generate text for one prompt")
    g.add_argument("prompt")
    _model_arg(g)
    g.add_argument("--budget", type=float, default=None, help="fraction of routed-expert bytes kept resident "
                   "(default 1.0; 0: none, every expert runs in the slow tier with --miss-policy host)")
    g.add_argument("--miss-policy", default=None, choices=["reroute", "load", "host", "auto", "shadow", "all"],
                   help="what a miss does: reroute it (the paper's rule; with a profile, --policy's residency), "
                   "load it (LRU), run it on the host CPU in place, auto: on the host for few tokens, loaded "
                   "for many (break-even timed at start), or shadow: run an int4 copy of it held in the budget "
                   "(a GGUF's copies are its own values). Default: reroute with a profile, else auto")
    g.add_argument("--experts-on", default=None, choices=["disk", "ram"], help="the slow tier (default disk)")
    g.add_argument("--max-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--raw", action="store_true", help="do not apply the chat template")
    g.add_argument("--json-schema", default=None, metavar="SCHEMA",
                   help="structured output: the answer is a JSON document of this schema (inline JSON, a file's "
                   "path, or 'object' for any JSON object)")
    g.add_argument("--task", default=None, help="task of the prompt (default: extracted from it)")
    g.add_argument("--profile", default=None, help="profile folder (default: the one shipped with the model)")
    g.add_argument("--policy", default=None, help="residency policy (default: emoe-a-q48 when a predictor exists, "
                   "else task-static-q48); the -q4 / -q8 / -q48 suffix runs misses on low-bit copies, without it "
                   "they are rerouted (the paper's rule, far less exact)")
    _dtype_arg(g)
    _kv_dtype_arg(g)
    _host_kernel_arg(g)
    _dense_int8_arg(g)
    _host_int8_arg(g)
    g.set_defaults(fn=cmd_generate)

    from .bench.cli import add_parsers
    add_parsers(sub.add_parser("bench", help="benchmarks").add_subparsers(dest="bench", required=True))

    qz = sub.add_parser("quantize", help="write int4/int8 copies of every expert beside the checkpoint")
    _model_arg(qz)
    qz.add_argument("--bits", type=lambda t: [int(x) for x in t.split(",")], default=[4, 8])
    qz.add_argument("--layout", choices=("auto", "kernel", "portable"), default="auto",
                    help="int4 copies for the CPU kernel's layout (an offset per 32 values) or the portable one (GPUs; "
                         "per 64); auto: portable where CUDA is present, else the kernel's where this CPU has it")
    qz.add_argument("--calibrate", type=int, default=0, metavar="N",
                    help="fit int4 copies to the experts' outputs on N training prompts per task (GPTQ; emoe/calibrate.py) "
                         "instead of to their weights alone; 0: the plain fit")
    qz.add_argument("--max-tokens", type=int, default=32, help="tokens generated per calibration prompt")
    _data_arg(qz)
    qz.set_defaults(fn=cmd_quantize)

    ig = sub.add_parser("import-gguf", help="a llama.cpp GGUF → a model folder whose experts stay packed in the "
                        "GGUF (--model FILE.gguf does this once by itself, into $EMOE_CACHE)")
    ig.add_argument("gguf", help="the .gguf file (the first shard of a split one)")
    ig.add_argument("--out", required=True, help="model folder to write (new or empty)")
    ig.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"],
                    help="for the dense tensors the GGUF quantised (float tensors stay as stored)")
    ig.add_argument("--lean", action="store_true",
                    help="leave the quantised dense projections (attention, shared experts, lm_head) in the GGUF: a "
                    "CPU runs them on the file's blocks anyway; a GPU or --no-dense-blocks dequantises them at each "
                    "start. Most of a large model's dense bytes and import time (--model FILE.gguf imports lean "
                    "where there is no GPU)")
    ig.set_defaults(fn=cmd_import_gguf)

    pr = sub.add_parser("profile", help="routing traces, output lengths, load latency and sensitivity")
    _model_arg(pr)
    pr.add_argument("--out", required=True, help="profile folder to write")
    pr.add_argument("--per-task", type=int, default=40, help="training prompts per task")
    _data_arg(pr)
    pr.add_argument("--max-tokens", type=int, default=48)
    pr.add_argument("--sens-prompts", type=int, default=8, help="prompts per task for the sensitivity probe")
    pr.add_argument("--budget", type=float, default=1.0, help="for a model larger than memory: keep this share of "
                    "expert bytes in the fast tier and run the rest in the slow tier (same traces and outputs)")
    pr.add_argument("--experts-on", default="disk", choices=["disk", "ram"])
    _dtype_arg(pr)
    pr.set_defaults(fn=cmd_profile)

    tp = sub.add_parser("train-predictor", help="fit eMoE-A/L predictors on a profile; report set metrics on the test split")
    tp.add_argument("profile")
    _model_arg(tp)
    tp.add_argument("--budget", type=float, default=0.4, help="sets experts resident per layer for the metrics")
    tp.add_argument("--p", type=lambda t: [int(x) for x in t.split(",")], default=[1, 10, 40])
    tp.add_argument("--test-n", type=int, default=120)
    tp.add_argument("--max-tokens", type=int, default=48)
    tp.add_argument("--trace-budget", type=float, default=1.0, help="as profile's --budget, for tracing the test split")
    tp.add_argument("--experts-on", default="disk", choices=["disk", "ram"])
    tp.add_argument("--unlabelled", action="store_true", help="also fit predictor-u (policy emoe-u): eMoE-A that "
                    "predicts requests with no task from the recent routing of all traffic")
    _dtype_arg(tp)
    tp.set_defaults(fn=cmd_train_predictor)

    ev = sub.add_parser("eval", help="accuracy/memory/overhead of policies × budgets on the test split")
    _model_arg(ev)
    ev.add_argument("--profile", required=True)
    _activations_arg(ev)  # shadow copies in kernel forms run through them
    ev.add_argument("--budgets", type=_floats, default=_floats("0.8,0.6,0.4,0.2"))
    ev.add_argument("--policies", default=",".join(["all", "random", "popular", "task-static", "lru",
                                                    "moe-infinity", "pregated", "emoe-a", "emoe-l", "emoe-e"]),
                    help="comma-separated; a reroute policy + -q4/-q8/-q48 runs misses on low-bit copies, + -host on "
                    "the slow tier; any policy + -async lands its plans' loads on a worker thread (serve --async-loads)")
    ev.add_argument("--n", type=int, default=60, help="requests in the mixed test stream")
    ev.add_argument("--seed", type=int, default=0, help="which test prompts, and in which task order")
    ev.add_argument("--reference-budget", type=float, default=1.0, help="for a model larger than memory: the "
                    "reference (all-resident) outputs with this share resident and the rest run in the slow tier")
    ev.add_argument("--split", default="test", choices=["test", "val"],
                    help="val for choosing designs and settings; test for reporting them")
    ev.add_argument("--versus", default=None, help="print every policy's paired difference from this one, with CIs")
    ev.add_argument("--max-tokens", type=int, default=48)
    ev.add_argument("--batch", type=int, default=4)
    ev.add_argument("--unlabelled", action="store_true", help="serve the stream with no task labels (as traffic "
                    "whose task nobody gives or extracts): task-static falls back to the global mix, emoe-u predicts")
    ev.add_argument("--group-window", type=int, default=0, help="serve each W consecutive arrivals grouped by "
                    "task (batches of mostly one task); 0 = arrival order, as in the paper")
    ev.add_argument("--p", type=int, default=40, help="predictor period in prompts")
    ev.add_argument("--adaptive", action="store_true", help="eMoE policies re-predict early when coverage drops")
    ev.add_argument("--stickiness", type=float, default=0.0, help="task-static/eMoE plans: a resident expert "
                    "yields only to one expecting (1+H)x its tokens (fewer moves)")
    ev.add_argument("--adaptive-compare", action="store_true",
                    help="also run eMoE-A with adaptive p at --sweep-budget, beside fixed p")
    ev.add_argument("--p-sweep", type=lambda t: [int(x) for x in t.split(",")], default=None)
    ev.add_argument("--sweep-budget", type=float, default=0.4)
    ev.add_argument("--dtype", default=None, choices=["float32", "bfloat16"],
                    help="fast-tier/compute dtype (default float32 on CPU); bfloat16 prices experts as on a GPU")
    ev.add_argument("--experts-on", default="ram", choices=["disk", "ram"],
                    help="the slow tier of the policies' runs (disk on a CPU: experts in kernel forms, misses read "
                         "from disk, as for a model larger than RAM)")
    _host_int8_arg(ev)
    ev.add_argument("--similarity", default="embedding", choices=["embedding", "deferred"],
                    help="deferred: no embedding model here (e.g. a GPU box without the eval extra); "
                         "`emoe rescore` fills it in later from the texts --json keeps")
    ev.add_argument("--json", default=None)
    ev.add_argument("--plot", default=None)
    ev.set_defaults(fn=cmd_eval)

    rs = sub.add_parser("rescore", help="fill in embedding similarity of an `emoe eval --json` file from its texts")
    rs.add_argument("json")
    rs.add_argument("--versus", default=None, help="print every policy's paired difference from this one, with CIs")
    rs.set_defaults(fn=cmd_rescore)

    an = sub.add_parser("analyze", help="per-task perplexity, routing divergence and heat-map")
    _model_arg(an)
    an.add_argument("--per-task", type=int, default=100)
    an.add_argument("--plot", default=None, help="heat-map PNG (layers × experts per task)")
    an.add_argument("--json", default=None)
    an.set_defaults(fn=cmd_analyze)

    t = sub.add_parser("train-model", help="train the embedded model (resumable)")
    t.add_argument("--out", default=None, help="output folder (default: the package's embedded model)")
    t.add_argument("--run-dir", default="runs/train")
    t.add_argument("--general-text", default=str(Path.home() / ".cache/emoe-data/general.txt"))
    t.add_argument("--minutes", type=float, default=80)
    t.add_argument("--seq", type=int, default=384)
    t.add_argument("--batch", type=int, default=12)
    t.add_argument("--threads", type=int, default=2)
    t.add_argument("--overwrite", action="store_true", help="replace an existing model at --out")
    t.add_argument("--lr", type=float, default=3e-3)
    t.add_argument("--seq-entropy", type=float, default=0.0, help="per-sequence routing-entropy penalty")
    t.add_argument("--init", default=None, help="start from a previous --run-dir or an exported model folder "
                   "(fine-tuning; same tokenizer)")
    t.add_argument("--trainable", default="all", choices=["all", "router"],
                   help="router: fine-tune only the router gates (reshapes routing, keeps what experts learned)")
    t.set_defaults(fn=cmd_train_model)

    se = sub.add_parser("serve", help="OpenAI-compatible server (continuous batching, task-aware scheduler)")
    _model_arg(se)
    se.add_argument("--budget", type=float, default=None, help="fraction of routed-expert bytes kept resident "
                    "(default 0.4; 0: none, every expert runs in the slow tier with --miss-policy host)")
    se.add_argument("--miss-policy", default=None, choices=["reroute", "load", "host", "auto", "shadow", "all"],
                    help="what a miss does (see generate); default: reroute with a profile (--policy decides), "
                    "else auto")
    se.add_argument("--policy", default=None, help="residency policy from the profile (default: emoe-a-q48 when "
                    "the profile has a predictor, else task-static-q48); e.g. emoe-a, task-static, popular; "
                    "the -q4 / -q8 / -q48 suffix runs misses on low-bit copies, without it they are rerouted")
    se.add_argument("--profile", default=None, help="profile folder (`emoe profile`): loader, costs, task extractor")
    se.add_argument("--stickiness", type=float, default=1.0, help="task-static/eMoE plans: a resident expert "
                    "yields only to one expecting (1+H)x its tokens; 0 is the paper's loader (more moves)")
    se.add_argument("--scheduler", default="task-aware", choices=["task-aware", "fcfs", "sjf"])
    se.add_argument("--admission-control", action=argparse.BooleanOptionalAction, default=True,
                    help="task-aware: refuse an admission that would make a running request miss its SLO "
                    "(Algorithm 1); --no-admission-control keeps only its ordering")
    se.add_argument("--host", default="127.0.0.1")
    se.add_argument("--port", type=int, default=8000)
    se.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1")
    se.add_argument("--memory-mb", type=float, default=None,
                    help="experts + KV cache together; the KV slots (max batch) are what the expert budget leaves")
    se.add_argument("--served-model-name", default=None, help="model id in the API (default: the folder name)")
    se.add_argument("--max-batch", type=int, default=8, help="KV slots: requests decoded together")
    se.add_argument("--max-len", type=int, default=1024, help="KV slot length (prompt + output tokens)")
    se.add_argument("--prefill-chunk", type=int, default=512, help="prompt tokens per request per forward pass")
    se.add_argument("--prefix-reuse", action=argparse.BooleanOptionalAction, default=True,
                    help="a request takes the free KV slot that still holds its longest prefix (a chat's earlier "
                    "turns) and prefills only the rest (default; --no-prefix-reuse turns it off)")
    se.add_argument("--prompt-cache-mb", type=int, default=1024,
                    help="with prefix reuse: host memory for the KV of slots taken over, restored for a later "
                    "prompt with a longer shared prefix than any free slot holds (llama-server's --cache-ram; "
                    "0: off)")
    se.add_argument("--prefill-interleave", action=argparse.BooleanOptionalAction, default=True,
                    help="prefill admitted prompts a chunk per step between decode steps (default), or whole at "
                    "admission (--no-prefill-interleave)")
    se.add_argument("--max-waiting", type=int, default=256, help="queued requests beyond this get 429")
    se.add_argument("--token-budget", type=int, default=2048, help="max prompt tokens admitted per step")
    se.add_argument("--experts-on", default=None, choices=["disk", "ram"], help="the slow tier (default disk)")
    _dtype_arg(se)
    _kv_dtype_arg(se)
    _host_kernel_arg(se)
    _dense_int8_arg(se)
    _host_int8_arg(se)
    se.add_argument("--async-loads", action=argparse.BooleanOptionalAction, default=None,
                    help="plans' loads land on a worker thread (a CUDA stream on a GPU) while earlier layers compute; "
                    "a layer call waits only for its own experts, so outputs are those of loading in place. Default: "
                    "on with a GPU (1.05-1.09x tokens/s on an H200), off on a CPU, where the copies compete with "
                    "compute for the cores and gained nothing on 2 of them")
    se.add_argument("--threads", type=int, default=None,
                    help="torch threads for the engine (default: the cores available)")
    se.add_argument("--grace", type=float, default=30.0, help="seconds in-flight requests get at shutdown")
    se.add_argument("--slo", type=_slo, action="append", metavar="TASK:TTFT_MS:TPOT_MS",
                    help="default SLO of a task's requests (repeatable; TASK 'default' for requests of no known "
                    "task); a request's own ttft_ms/tpot_ms win. Built-in table: emoe.scheduler.DEFAULT_SLOS")
    se.add_argument("--tool-call-parser", default="auto", choices=["auto", "hermes", "none"],
                    help="how chat answers' tool calls are read (OpenAI `tools`): hermes, <tool_call> blocks "
                    "(Qwen2.5/3, Hermes); auto: hermes when the chat template writes that tag; none: refuse tools")
    se.add_argument("--reasoning-parser", default="auto", choices=["auto", "think", "none"],
                    help="a thinking model's <think>…</think> goes to the message's reasoning_content (Qwen3, QwQ, "
                    "DeepSeek-R1); auto: when the chat template writes </think>")
    se.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    se.set_defaults(fn=cmd_serve)
    return ap


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if getattr(args, "activations", None):  # process-wide, as the routines are
        from . import ckernel
        ckernel.ask({"torch": "off"}.get(args.activations, args.activations))
    try:
        args.fn(args)
    except (ValueError, OSError, KeyError) as e:  # bad input: one clear line, no traceback
        sys.exit(f"emoe: {e}")


if __name__ == "__main__":
    main()
