"""`emoe analyze`: what the embedded model does per task — held-out perplexity and task-dependent routing.

For every test-split example the reference answer is scored teacher-forced after its prompt (all experts
resident), giving per-task perplexity and the routing of prompt + answer tokens. Per task and layer the
normalised expert histogram is compared between tasks and within a task (two disjoint halves of its
prompts) with the Jensen–Shannon divergence (bits): task-aware prediction pays off when between-task
divergence clearly exceeds within-task divergence.
"""
from __future__ import annotations

import itertools
import json
import math
import random
from pathlib import Path

import torch


def js_bits(p: torch.Tensor, q: torch.Tensor) -> float:
    p, q = p.double() / p.sum(), q.double() / q.sum()
    m = 0.5 * (p + q)

    def kl(a, b):
        mask = a > 0
        return float((a[mask] * (a[mask] / b[mask]).log2()).sum())
    return 0.5 * kl(p, m) + 0.5 * kl(q, m)


def analyze(model: str, per_task: int = 100, seed: int = 0, max_answer: int = 64, progress=True) -> dict:
    from tqdm import tqdm

    from .datasets import TASKS, load_split
    from .engine import Engine, EngineConfig
    eng = Engine(EngineConfig(model, miss_policy="all", max_batch=1, trace=True))
    moe = list(eng.cfg.moe_layers)
    rng = random.Random(seed)
    hist, ppl, halves = {}, {}, {}
    for task in tqdm(TASKS, desc="analyze", disable=not progress):
        exs = load_split("test", task)
        rng.shuffle(exs)
        exs = exs[:per_task]
        nll = n_tok = 0
        counts = []
        for ex in exs:
            prompt = eng.codec.encode(eng.codec.apply_chat([{"role": "user", "content": ex.prompt}]))
            end = list(eng.cfg.eos_token_ids[:1])  # the answer ends where the model should stop
            ans = (eng.codec.encode(ex.answer) + end)[:max_answer]
            if len(prompt) + len(ans) > eng.max_len or not ans:
                continue
            lp = torch.log_softmax(eng.score(prompt, ans), -1)
            nll -= float(lp.gather(1, torch.tensor(ans, device=lp.device)[:, None]).sum())
            n_tok += len(ans)
            counts.append(eng.last_score_trace.prefill[moe].float())
        ppl[task] = math.exp(nll / max(n_tok, 1))
        c = torch.stack(counts)
        hist[task] = c.sum(0)
        halves[task] = (c[0::2].sum(0), c[1::2].sum(0))
    layers = range(len(moe))
    between = [sum(js_bits(hist[a][l], hist[b][l]) for a, b in itertools.combinations(TASKS, 2))
               / math.comb(len(TASKS), 2) for l in layers]
    within = [sum(js_bits(halves[t][0][l], halves[t][1][l]) for t in TASKS) / len(TASKS) for l in layers]
    return {"perplexity": ppl, "js_between_bits": between, "js_within_bits": within, "moe_layers": moe,
            "histograms": {t: (hist[t] / hist[t].sum(1, keepdim=True)).tolist() for t in TASKS}}


def heatmap(report: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    tasks = list(report["histograms"])
    fig, axes = plt.subplots(1, len(tasks), figsize=(3.2 * len(tasks), 2.6), sharey=True)
    for ax, t in zip(axes, tasks):
        h = torch.tensor(report["histograms"][t])
        im = ax.imshow(h, aspect="auto", cmap="viridis", vmin=0, vmax=float(h.max()))
        ax.set_title(t, fontsize=9)
        ax.set_xlabel("expert")
        ax.set_yticks(range(h.shape[0]), [f"L{l}" for l in report["moe_layers"]])
    axes[0].set_ylabel("MoE layer")
    fig.colorbar(im, ax=axes, shrink=0.8, label="share of tokens")
    fig.savefig(path, dpi=110, bbox_inches="tight")


def summary(report: dict) -> str:
    lines = ["held-out perplexity (test split, reference answers, all experts resident):"]
    lines += [f"  {t:14} {p:8.2f}" for t, p in report["perplexity"].items()]
    lines.append("Jensen-Shannon divergence of expert histograms, bits (between tasks / within a task):")
    for l, b, w in zip(report["moe_layers"], report["js_between_bits"], report["js_within_bits"]):
        lines.append(f"  layer {l}: between {b:.4f}  within {w:.4f}  ratio {b / max(w, 1e-9):.1f}x")
    return "\n".join(lines)


def save(report: dict, path: str) -> None:
    Path(path).write_text(json.dumps(report, indent=1))
