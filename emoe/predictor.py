"""Expert predictor (eMoE component 3): task + previous prompts' routing -> f[layer, e], the expected share
of the next prompts' routed token-assignments that go to expert e (rows sum to 1 on MoE layers, 0 on dense).

Decisions the paper leaves open (PAPER.md, "Left open"):
- Target: per layer, the normalised token-count histogram of prefill+decode of the next prompt of the task.
- Inputs: the task, and exponential moving averages (decay 0.7 per prompt, last `window` prompts) of the
  normalised histograms of the most recent prompts of the same task and of any task. No prompt features.
- Model: not XLNet but a small MLP whose output is a residual on the log of the task's mean histogram
  (task-static): logits = log prior + [h(x) - h(x0)] + gate_l * conf * (log ema_same - log prior), where x0
  is the empty-history input. With no history the prediction is exactly the task prior.
  eMoE-A predicts all layers at once; eMoE-L chains per-layer models from the previous same-task prompt's
  first MoE layer through its own predictions (trained end to end through the chain).
- Set metrics: predicted set = top-n by predicted share; actual set = fewest experts covering >= 90% of
  the prompt's assignments in the layer; coverage = share of the prompt's assignments in the predicted set.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import time
from pathlib import Path
from typing import Callable, Sequence

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .datasets import TASKS
from .traces import Trace, load_traces

FORMAT = "emoe-predictor/1"
# requests that arrive without a task (and none is extracted) share this pseudo-task when the predictor is
# fitted with unlabelled=True: its prior is the global mix, its history all recent traffic
UNLABELLED = "(unlabelled)"
KINDS = ("a", "l")
EPS = 1e-4
COVER = 0.9
DEFAULTS = {"hidden": 256, "hidden_l": 64, "dropout": 0.1, "decay": 0.7, "window": 16, "lookback": 1024,
            "lr": 3e-3, "weight_decay": 1e-4, "batch": 64, "patience": 20, "phase_window": 60}
PredictFn = Callable[[str, Sequence[Trace]], torch.Tensor]


@contextlib.contextmanager
def _one_thread():
    """Tiny tensors: intra-op threads only add wake-up latency (20 ms instead of 0.2 ms on a busy host)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _norm(counts: torch.Tensor) -> torch.Tensor:
    """Row-normalise [..., L, E] counts to shares; all-zero rows (dense layers) stay zero."""
    c = counts.float()
    return c / c.sum(-1, keepdim=True).clamp_min(1e-12)


def task_static(traces: Sequence[Trace]) -> dict[str, torch.Tensor]:
    """Mean normalised histogram [L, E] per task (the task-static baseline and the predictor's prior)."""
    by: dict[str, list[torch.Tensor]] = {}
    for t in traces:
        if t.task is not None:
            by.setdefault(t.task, []).append(t.total)
    return {k: _norm(_norm(torch.stack(v)).mean(0)) for k, v in by.items()}


def popular(traces: Sequence[Trace]) -> torch.Tensor:
    """Global mean normalised histogram [L, E] over all traces."""
    return _norm(_norm(torch.stack([t.total for t in traces])).mean(0))


def _in_runs(traces: Sequence[Trace], window: int) -> list[int]:
    """Trace indices with each `window` consecutive arrivals grouped by task (first arrival first)."""
    out = []
    for start in range(0, len(traces), window):
        chunk = list(range(start, min(start + window, len(traces))))
        first = {}
        for i in chunk:
            first.setdefault(traces[i].task, len(first))
        out += sorted(chunk, key=lambda i: first[traces[i].task])
    return out


def _alike(h: torch.Tensor, moe: list[int]) -> float:
    """How alike consecutive histograms [k, L, E] are: the mean overlap Σ min(p, q) over MoE layers and
    neighbouring pairs, raised to the 4th power so that unrelated prompts count for little (0 for k < 2)."""
    if h.shape[0] < 2:
        return 0.0
    return float(torch.minimum(h[1:, moe], h[:-1, moe]).sum(-1).mean()) ** 4


def _ema(h: torch.Tensor, decay: float) -> tuple[torch.Tensor, float]:
    """EMA of [k, L, E] histograms (oldest first) -> (ema [L, E], confidence 1 - decay^k in [0, 1))."""
    if h.shape[0] == 0:
        return torch.zeros(h.shape[1:]), 0.0
    w = decay ** torch.arange(h.shape[0] - 1, -1, -1, dtype=torch.float32)
    return (w[:, None, None] * h).sum(0) / w.sum(), 1.0 - decay ** h.shape[0]


class _ModelA(nn.Module):
    def __init__(self, T: int, L: int, E: int, hidden: int, dropout: float):
        super().__init__()
        self.L, self.E, self.drop, self.gate = L, E, nn.Dropout(dropout), nn.Parameter(torch.zeros(L))
        self.l1, self.l2 = nn.Linear(T + 2 * L * E + 2, hidden), nn.Linear(hidden, L * E, bias=False)
        nn.init.zeros_(self.l2.weight)  # starts as the prior (+ the gated same-task EMA term)

    def forward(self, f: dict, plog: torch.Tensor) -> torch.Tensor:
        B = plog.shape[0]
        hist = torch.cat([f["ema_s"].flatten(1), f["conf_s"], f["ema_a"].flatten(1), f["conf_a"]], 1)
        x, x0 = torch.cat([f["onehot"], hist], 1), torch.cat([f["onehot"], torch.zeros_like(hist)], 1)
        corr = self.l2(self.drop(torch.relu(self.l1(x)) - torch.relu(self.l1(x0)))).view(B, self.L, self.E)
        skip = self.gate[:, None] * f["conf_s"][:, :, None] * (torch.log(f["ema_s"] + EPS) - plog)
        return plog + corr + skip


class _ModelL(nn.Module):
    def __init__(self, T: int, L: int, E: int, hidden: int, dropout: float, moe: list[int]):
        super().__init__()
        self.moe, inp, self.drop, self.gate = moe, T + 2 * E + 1, nn.Dropout(dropout), nn.Parameter(torch.zeros(L))
        self.w1 = nn.Parameter(torch.randn(L, inp, hidden) / inp ** 0.5)  # one small MLP per layer, stacked
        self.b1, self.w2 = nn.Parameter(torch.zeros(L, hidden)), nn.Parameter(torch.zeros(L, hidden, E))

    def forward(self, f: dict, plog: torch.Tensor) -> torch.Tensor:
        out = plog.clone()
        oh, cs = f["onehot"], f["conf_s"]
        prev, prev0 = f["prev"][:, self.moe[0]], torch.zeros_like(f["prev"][:, 0])  # chain start: last prompt
        for l in self.moe:
            x = torch.cat([oh, prev, f["ema_s"][:, l], cs], 1)
            x0 = torch.cat([oh, prev0, torch.zeros_like(prev), torch.zeros_like(cs)], 1)
            h = torch.relu(x @ self.w1[l] + self.b1[l]) - torch.relu(x0 @ self.w1[l] + self.b1[l])
            skip = self.gate[l] * cs * (torch.log(f["ema_s"][:, l] + EPS) - plog[:, l])
            out[:, l] = plog[:, l] + self.drop(h) @ self.w2[l] + skip
            prev, prev0 = torch.softmax(out[:, l], -1), torch.softmax(plog[:, l], -1)
        return out


class Predictor:
    """eMoE-A (kind "a") or eMoE-L (kind "l"); build with `Predictor.fit(traces, kind=...)` or `load`."""

    def __init__(self, kind: str, tasks: Sequence[str], num_layers: int, num_experts: int,
                 moe_layers: Sequence[int], priors: torch.Tensor, hyper: dict | None = None):
        if kind not in KINDS:
            raise ValueError(f"unknown predictor kind {kind!r}; known kinds: {', '.join(KINDS)}")
        self.kind, self.tasks, self.moe_layers = kind, tuple(tasks), list(moe_layers)
        self.num_layers, self.num_experts = num_layers, num_experts
        self.hyper = {**DEFAULTS, **(hyper or {})}
        self.priors = priors.float()  # [T, L, E]
        self._mask = torch.tensor([[l in self.moe_layers] for l in range(num_layers)])
        self._plog = torch.where(self._mask, torch.log(_norm(self.priors + EPS)), torch.zeros(()))
        T, h = len(self.tasks), self.hyper
        self.model = (_ModelA(T, num_layers, num_experts, h["hidden"], h["dropout"]) if kind == "a" else
                      _ModelL(T, num_layers, num_experts, h["hidden_l"], h["dropout"], self.moe_layers))
        self.model.eval()

    def _feat(self, ti: int, same: torch.Tensor, any_: torch.Tensor) -> dict:
        """Features of one example from [k, L, E] histograms (oldest first) of same-task / any-task prompts.
        For UNLABELLED the history's confidence is scaled by how alike its last prompts are (in a run of
        one task they overlap; unrelated requests do not), so that unrelated history is not trusted."""
        (es, cs), (ea, ca) = _ema(same, self.hyper["decay"]), _ema(any_, self.hyper["decay"])
        if self.tasks[ti] == UNLABELLED:
            cs *= _alike(same[-4:], self.moe_layers)
        return {"task": ti, "ema_s": es, "conf_s": cs, "ema_a": ea, "conf_a": ca,
                "prev": same[-1] if same.shape[0] else torch.zeros_like(es)}

    def _batch(self, feats: list[dict]) -> tuple[dict, torch.Tensor]:
        ti = torch.tensor([f["task"] for f in feats])
        b = {k: torch.stack([f[k] for f in feats]) for k in ("ema_s", "ema_a", "prev")}
        b |= {k: torch.tensor([[f[k]] for f in feats]) for k in ("conf_s", "conf_a")}
        b["onehot"] = nn.functional.one_hot(ti, len(self.tasks)).float()
        return b, self._plog[ti]

    def _task_index(self, task: str) -> int:
        if task not in self.tasks:
            raise ValueError(f"unknown task {task!r}; known tasks: {', '.join(self.tasks)}")
        return self.tasks.index(task)

    def _out(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.where(self._mask, torch.softmax(logits, -1), torch.zeros(()))

    @classmethod
    def fit(cls, traces: Sequence[Trace], kind: str = "a", epochs: int = 200, seed: int = 0,
            unlabelled: bool = False, **hyper) -> "Predictor":
        """Train on a mixed stream (arrival order): one pair (history before t -> trace t) per t; the last
        10% of pairs are the validation set for early stopping. Single-threaded, seconds for ~1000 traces.
        unlabelled: every trace is also an example of UNLABELLED, its history the unlabelled traces before it,
        replayed in runs of one task (each `phase_window` arrivals grouped by task, as traffic drifts), so
        that traffic with no task is predicted from its recent routing rather than the global mix."""
        H = _norm(torch.stack([t.total for t in traces])) if traces else torch.zeros(0, 0, 0)  # [N, L, E]
        if not (moe := [l for l in range(H.shape[1]) if H[:, l].sum() > 0]):
            raise ValueError("cannot fit a predictor: no routed tokens in the traces")
        static, pop = task_static(traces), popular(traces)
        tasks = list(TASKS) + sorted(set(static) - set(TASKS)) + ([UNLABELLED] if unlabelled else [])
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            priors = torch.stack([static.get(t, pop) for t in tasks])
            p = cls(kind, tasks, H.shape[1], H.shape[2], moe, priors, hyper)
            W, lb, feats, tgts, last = p.hyper["window"], p.hyper["lookback"], [], [], {}
            runs = _in_runs(traces, p.hyper["phase_window"]) if unlabelled else []
            for i, t in enumerate(traces):
                if t.task is not None:
                    same = [j for j in last.get(t.task, []) if i - j <= lb]
                    feats.append(p._feat(p.tasks.index(t.task), H[same], H[max(0, i - W):i]))
                    tgts.append(H[i])
                    last[t.task] = (same + [i])[-W:]
                if unlabelled:  # interleaved, so that early stopping watches every kind; runs and arrival order
                    for order in (runs, range(len(traces))):
                        recent = H[list(order[max(0, i - W):i])]
                        feats.append(p._feat(p.tasks.index(UNLABELLED), recent, recent))
                        tgts.append(H[order[i]])
            if not feats:
                raise ValueError("no trace carries a task label")
            X, P = p._batch(feats)
            with _one_thread():
                p._train(X, P, torch.stack(tgts), len(feats) - len(feats) // 10, epochs)
        return p

    def _loss(self, X: dict, P: torch.Tensor, Y: torch.Tensor, idx) -> torch.Tensor:
        logits = self.model({k: v[idx] for k, v in X.items()}, P[idx])[:, self.moe_layers]
        y = Y[idx][:, self.moe_layers]
        return (y * (torch.log(y.clamp_min(1e-12)) - torch.log_softmax(logits, -1))).sum(-1).mean()

    def _train(self, X, P, Y, n_tr: int, epochs: int) -> None:
        h, m = self.hyper, self.model
        opt = torch.optim.Adam(m.parameters(), lr=h["lr"], weight_decay=h["weight_decay"])
        val = torch.arange(n_tr, len(Y)) if len(Y) > n_tr else torch.arange(n_tr)  # tiny sets: train loss
        best, best_state, bad, self.val_losses = float("inf"), None, 0, []
        for _ in range(epochs):
            m.train()
            for idx in torch.randperm(n_tr).split(h["batch"]):
                opt.zero_grad()
                self._loss(X, P, Y, idx).backward()
                opt.step()
            m.eval()
            with torch.no_grad():
                v = self._loss(X, P, Y, val).item()
            self.val_losses.append(v)  # validation KL per epoch
            if v < best - 1e-6:
                best, bad, best_state = v, 0, {k: t.clone() for k, t in m.state_dict().items()}
            elif (bad := bad + 1) >= h["patience"]:
                break
        m.load_state_dict(best_state)

    @torch.no_grad()
    def predict(self, task: str, history: Sequence[Trace]) -> torch.Tensor:
        """f [num_layers, E] float32 for the next prompts of `task`, given the stream so far (oldest first)."""
        ti, W, same, any_ = self._task_index(task), self.hyper["window"], [], []
        for k, t in enumerate(reversed(history)):
            if k >= self.hyper["lookback"] or (len(same) >= W and len(any_) >= W):
                break
            if len(any_) < W:
                any_.append(t.total)
            if len(same) < W and (t.task == task or (task == UNLABELLED and t.task is None)):
                same.append(t.total)
        shape = (self.num_layers, self.num_experts)
        if any_ and tuple(any_[0].shape) != shape:
            raise ValueError(f"trace shape {tuple(any_[0].shape)} does not match the predictor's {shape}")
        stack = lambda xs: _norm(torch.stack(xs[::-1])) if xs else torch.zeros(0, *shape)  # noqa: E731
        with _one_thread():
            X, P = self._batch([self._feat(ti, stack(same), stack(any_))])
            return self._out(self.model(X, P))[0]

    __call__ = predict

    def prior(self, task: str) -> torch.Tensor:
        return self._out(self._plog[self._task_index(task)])

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in [*self.model.state_dict().values(), self.priors])

    def save(self, directory: str | Path) -> None:
        (d := Path(directory)).mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.model.state_dict().items()}, d / "predictor.safetensors")
        meta = {"format": FORMAT, "kind": self.kind, "tasks": list(self.tasks), "num_layers": self.num_layers,
                "num_experts": self.num_experts, "moe_layers": self.moe_layers, "hyper": self.hyper,
                "priors": self.priors.tolist()}
        (d / "predictor.json").write_text(json.dumps(meta))

    @classmethod
    def load(cls, directory: str | Path) -> "Predictor":
        d = Path(directory)
        meta = json.loads((d / "predictor.json").read_text())
        if meta.get("format") != FORMAT:
            raise ValueError(f"unsupported predictor format {meta.get('format')!r}; expected {FORMAT!r}")
        p = cls(meta["kind"], meta["tasks"], meta["num_layers"], meta["num_experts"], meta["moe_layers"],
                torch.tensor(meta["priors"], dtype=torch.float32), meta["hyper"])
        p.model.load_state_dict(load_file(str(d / "predictor.safetensors")))
        return p


def baselines(train: Sequence[Trace]) -> dict[str, PredictFn]:
    """task-static, popular, previous-prompt-of-same-task and same-task-EMA predictors (callables)."""
    static, pop = task_static(train), popular(train)

    def previous(task, history):
        for t in reversed(history):
            if t.task == task:
                return _norm(t.total)
        return static.get(task, pop)

    def ema(task, history):  # the same-task EMA the learned predictors start from, unlearned
        h = [t.total for t in history[-DEFAULTS["lookback"]:] if t.task == task][-DEFAULTS["window"]:]
        return _ema(_norm(torch.stack(h)), DEFAULTS["decay"])[0] if h else static.get(task, pop)
    return {"task-static": lambda task, history: static.get(task, pop), "popular": lambda task, history: pop,
            "previous-prompt": previous, "same-task-EMA": ema}


def set_metrics(pred: torch.Tensor, actual_counts: torch.Tensor, n_resident: int | Sequence[int],
                moe_layers: Sequence[int] | None = None) -> dict:
    """Set precision/recall/F1 (macro over layers) and token coverage (share of all the prompt's assignments
    landing in the predicted sets). `n_resident`: int, or one entry per layer. Layers the prompt did not use
    (zero counts) are skipped; `moe_layers=None` means every layer with counts."""
    layers = range(actual_counts.shape[0]) if moe_layers is None else moe_layers
    P, R, F, cov, tot = [], [], [], 0.0, 0.0
    for l in layers:
        c = actual_counts[l].double()
        if (s := c.sum().item()) <= 0:
            continue
        n = min(n_resident if isinstance(n_resident, int) else n_resident[l], pred.shape[-1])
        ps = torch.topk(pred[l], n).indices.tolist()
        v, order = torch.sort(c, descending=True)
        act = set(order[:int((torch.cumsum(v, 0) < COVER * s - 1e-9).sum()) + 1].tolist())
        hit = len(set(ps) & act)
        P.append(hit / max(len(ps), 1)), R.append(hit / len(act))
        F.append(2 * P[-1] * R[-1] / (P[-1] + R[-1]) if hit else 0.0)
        cov, tot = cov + c[ps].sum().item(), tot + s
    m = lambda x: sum(x) / max(len(x), 1)  # noqa: E731
    return {"precision": m(P), "recall": m(R), "f1": m(F), "coverage": cov / max(tot, 1e-12), "layers": len(F)}


def drifted(cover: float, avg: float, min_hit: float = 0.5, drift: float = 0.05) -> bool:
    """Adaptive p's trigger: the last prompt's coverage by the current prediction fell `drift` below its
    task's running average, or below `min_hit` outright."""
    return cover < min_hit or cover < avg - drift


def loader_sizes(capacity: int, moe_layers: Sequence[int], top_k: int):
    """Per-layer L as the loader would choose it from a prediction: the `capacity` experts with the highest
    predicted share over all layers, each layer keeping at least top_k (eMoE Eq. 2 with one task)."""
    from .loader import plan_top

    def sizes(pred: torch.Tensor) -> list[int]:
        plan = plan_top(pred, capacity, list(moe_layers), top_k, fallback=pred)
        return [len(plan.get(layer, ())) for layer in range(pred.shape[0])]
    return sizes


def evaluate(predictor: PredictFn, traces: Sequence[Trace], n_resident, p: int = 1,
             history: Sequence[Trace] = (), adaptive: bool = False) -> dict:
    """Walk the stream in order; predict each trace from what came before it (`history` + earlier traces),
    calling the predictor only on every p-th prompt of a task and reusing its last prediction in between.
    `n_resident`: experts kept per layer (int or per-layer list), or a function of the prediction giving the
    per-layer list (`loader_sizes`).
    adaptive=True also re-predicts right after a prompt whose coverage `drifted`."""
    full, off, moe = list(history) + list(traces), len(history), getattr(predictor, "moe_layers", None)
    cache, seen, rows, calls, avg, stale = {}, {}, [], 0, {}, set()
    for i, t in enumerate(traces):
        if t.task is None:
            continue
        if seen.get(t.task, 0) % p == 0 or t.task in stale:
            cache[t.task], calls, seen[t.task] = predictor(t.task, full[:off + i]), calls + 1, 0
            stale.discard(t.task)
        seen[t.task] = seen.get(t.task, 0) + 1
        n = n_resident(cache[t.task]) if callable(n_resident) else n_resident
        rows.append((t.task, set_metrics(cache[t.task], t.total, n, moe)))
        if adaptive:
            cover = rows[-1][1]["coverage"]
            if drifted(cover, avg.setdefault(t.task, cover)):
                stale.add(t.task)
            avg[t.task] = 0.8 * avg[t.task] + 0.2 * cover
    keys = ("precision", "recall", "f1", "coverage")
    avg = lambda rs: {k: sum(r[k] for r in rs) / max(len(rs), 1) for k in keys} | {"n": len(rs)}  # noqa: E731
    per_task = {g: avg([r for task, r in rows if task == g]) for g in dict.fromkeys(task for task, _ in rows)}
    return avg([r for _, r in rows]) | {"calls": calls, "per_task": per_task}


def hindsight(traces: Sequence[Trace], n_resident, moe_layers: Sequence[int] | None = None) -> dict:
    """The same metrics for each prompt's own routing as the prediction: the ceiling any predictor of
    per-layer shares can reach at this L (precision and recall fall short of 1 only where L differs from
    the set covering COVER of the tokens)."""
    rows = [set_metrics(t.total.float(), t.total, n_resident(t.total.float()) if callable(n_resident)
                        else n_resident, moe_layers) for t in traces if t.task is not None]
    return {k: sum(r[k] for r in rows) / max(len(rows), 1) for k in ("precision", "recall", "f1", "coverage")}


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m emoe.predictor", description=__doc__.split("\n")[0])
    ap.add_argument("traces")
    ap.add_argument("--test", help="test traces (default: the last 20%% of TRACES, with the rest as history)")
    ap.add_argument("--resident", type=int, default=6, help="experts kept per MoE layer")
    ap.add_argument("--p", default="1,10,40", help="predictor invoked every p prompts of a task")
    ap.add_argument("--epochs", type=int, default=200)
    ap.add_argument("--save", help="directory to save the eMoE-A predictor in")
    a = ap.parse_args(argv)
    tr = load_traces(a.traces)
    cut = len(tr) if a.test else int(len(tr) * 0.8)
    tr, test, hist = tr[:cut], load_traces(a.test) if a.test else tr[cut:], [] if a.test else tr[:cut]
    methods: dict[str, PredictFn] = {}
    for kind in KINDS:
        t0 = time.perf_counter()
        methods[f"eMoE-{kind.upper()}"] = pr = Predictor.fit(tr, kind=kind, epochs=a.epochs)
        t1 = time.perf_counter()
        for _ in range(20):
            pr.predict(pr.tasks[0], list(hist) + list(test))
        print(f"eMoE-{kind.upper()}: fit {t1 - t0:.1f}s, predict {(time.perf_counter() - t1) / 20 * 1e3:.2f} ms,"
              f" {pr.nbytes / 1e6:.3f} MB")
        if a.save and kind == "a":
            pr.save(a.save)
    methods |= baselines(tr)
    print(f"{len(tr)} train / {len(test)} test traces, {a.resident} resident experts per layer")
    print(f"{'method':<16}{'p':>4}{'P':>8}{'R':>8}{'F1':>8}{'cover':>8}")
    for p in (int(x) for x in a.p.split(",")):
        for name, fn in methods.items():
            r = evaluate(fn, test, a.resident, p=p, history=hist)
            print(f"{name:<16}{p:>4}{r['precision']:>8.3f}{r['recall']:>8.3f}{r['f1']:>8.3f}{r['coverage']:>8.3f}")


if __name__ == "__main__":
    main()
