"""Task-type extraction for incoming prompts (eMoE, "task-aware expert loading").

Two learned extractors map a prompt to one of the task types seen in training:

* `KeywordExtractor` - the paper's rule: per-task keyword profiles (words and leading
  bigrams frequent in that task's prompts and rare elsewhere, by smoothed log-odds of
  document frequency); most keyword matches wins, ties to the most frequent task.
* `ClassifierExtractor` - softmax regression (numpy, L2, mini-batch SGD, fixed epochs) on
  hashed word uni/bigrams and character 3-grams of the prompt's opening.
`TaskExtractor` wraps one of them; an explicit task supplied by the caller always wins.
"""
from __future__ import annotations

import json
import re
import time
import zlib
from collections import Counter

import numpy as np

from .datasets import TASKS, Example, load_split

VERSION = "emoe-tasks/1"
_WORD = re.compile(r"[a-z0-9]+")


def _words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def _keyword_terms(text: str, n_prefix: int = 4) -> set[str]:
    """Unigrams plus bigrams of the first `n_prefix` words (instruction prefixes)."""
    w = _words(text)
    head = w[:n_prefix]
    return set(w) | {f"{a} {b}" for a, b in zip(head, head[1:])}


class KeywordExtractor:
    def __init__(self, keywords: dict[str, list[str]] | None = None, prior: list[str] | None = None):
        self.keywords = keywords or {}   # task -> keywords (best first)
        self.prior = prior or []         # tasks by training frequency, most frequent first
        self._sets = {t: set(k) for t, k in self.keywords.items()}

    def fit(self, examples: list[Example], top_k: int = 30, min_df: float = 0.1,
            min_score: float = 2.0) -> "KeywordExtractor":
        counts = Counter(e.task for e in examples)
        df = {t: Counter() for t in counts}
        for e in examples:
            df[e.task].update(_keyword_terms(e.prompt))
        total, n, self.keywords = sum(df.values(), Counter()), len(examples), {}
        for t in counts:
            n_in, n_out = counts[t], n - counts[t]
            scored = []
            for term, d in df[t].items():
                if d / n_in < min_df:
                    continue
                d_out = total[term] - d
                score = np.log((d + 0.5) / (n_in + 1)) - np.log((d_out + 0.5) / (n_out + 1))
                if score > min_score:
                    scored.append((-score, term))
            self.keywords[t] = [term for _, term in sorted(scored)[:top_k]]
        self.prior = sorted(counts, key=lambda t: (-counts[t], t))
        self._sets = {t: set(k) for t, k in self.keywords.items()}
        return self

    def scores(self, prompt: str) -> dict[str, int]:
        terms = _keyword_terms(prompt)
        return {t: len(terms & self._sets[t]) for t in self.prior}

    def predict(self, prompt: str) -> str:
        s = self.scores(prompt)
        return max(self.prior, key=lambda t: (s[t], -self.prior.index(t)))

    def to_json(self) -> dict:
        return {"keywords": self.keywords, "prior": self.prior}

    @classmethod
    def from_json(cls, d: dict) -> "KeywordExtractor":
        return cls({t: list(k) for t, k in d["keywords"].items()}, list(d["prior"]))


class ClassifierExtractor:
    def __init__(self, n_buckets: int = 2**14, max_words: int = 64, max_chars: int = 40):
        if n_buckets & (n_buckets - 1):
            raise ValueError("n_buckets must be a power of two")
        self.n_buckets, self.max_words, self.max_chars = n_buckets, max_words, max_chars
        self.classes: list[str] = []
        self.W, self.b = np.zeros((n_buckets, 0)), np.zeros(0)

    def features(self, prompt: str) -> tuple[np.ndarray, np.ndarray]:
        """Sparse feature vector: (bucket indices, values), log(1+count), L2-normalised."""
        w = _words(prompt)[: self.max_words]
        head = " ".join(prompt.lower().split())[: self.max_chars]
        grams = [f"w:{x}" for x in w] + [f"b:{a} {b}" for a, b in zip(w, w[1:])]
        grams += [f"c:{head[i:i + 3]}" for i in range(len(head) - 2)]
        mask = self.n_buckets - 1
        c = Counter(zlib.crc32(g.encode()) & mask for g in grams or ["<empty>"])
        idx = np.fromiter(c.keys(), dtype=np.int64, count=len(c))
        val = np.log1p(np.fromiter(c.values(), dtype=np.float64, count=len(c)))
        return idx, val / np.linalg.norm(val)

    def _matrix(self, prompts: list[str]):
        feats = [self.features(p) for p in prompts]
        rows = np.repeat(np.arange(len(feats)), [len(i) for i, _ in feats])
        cols = np.concatenate([i for i, _ in feats])
        vals = np.concatenate([v for _, v in feats])
        return rows, cols, vals

    def fit(self, examples: list[Example], l2: float = 1e-5, epochs: int = 8, batch: int = 64,
            lr: float = 4.0, seed: int = 0) -> "ClassifierExtractor":
        """Mini-batch SGD on the softmax cross-entropy + L2 (fixed epochs, deterministic)."""
        self.classes = [t for t in TASKS if any(e.task == t for e in examples)]
        self.classes += sorted({e.task for e in examples} - set(self.classes))
        rng = np.random.default_rng(seed)
        examples = [examples[i] for i in rng.permutation(len(examples))]
        y = np.array([self.classes.index(e.task) for e in examples])
        n, k = len(examples), len(self.classes)
        rows, cols, vals = self._matrix([e.prompt for e in examples])
        used, cols = np.unique(cols, return_inverse=True)      # train only on used buckets
        m, eye = len(used), np.eye(k)
        starts = np.searchsorted(rows, np.arange(0, n + batch, batch).clip(max=n))
        W, b = np.zeros((m, k)), np.zeros(k)
        for epoch in range(epochs):
            step = lr / (1 + epoch)
            for j in rng.permutation(len(starts) - 1):
                lo, hi, r0 = starts[j], starts[j + 1], j * batch   # every row has >= 1 feature
                r, c, v = rows[lo:hi] - r0, cols[lo:hi], vals[lo:hi]
                nb = int(r[-1]) + 1
                contrib = W[c] * v[:, None]
                Z = np.stack([np.bincount(r, contrib[:, q], nb) for q in range(k)], 1) + b
                P = np.exp(Z - Z.max(1, keepdims=True))
                P /= P.sum(1, keepdims=True)
                G = (P - eye[y[r0:r0 + nb]]) / nb
                Gc = G[r] * v[:, None]
                W *= 1 - step * l2
                for q in range(k):
                    W[:, q] -= step * np.bincount(c, Gc[:, q], m)
                b -= step * G.sum(0)
        self.W = np.zeros((self.n_buckets, k))
        self.W[used] = np.round(W, 5)
        self.b = np.round(b, 5)
        return self

    def _logits(self, prompt: str) -> np.ndarray:
        idx, val = self.features(prompt)
        return val @ self.W[idx] + self.b

    def predict_proba(self, prompt: str) -> dict[str, float]:
        z = self._logits(prompt)
        p = np.exp(z - z.max())
        p /= p.sum()
        return {t: float(q) for t, q in zip(self.classes, p)}

    def predict(self, prompt: str) -> str:
        return self.classes[int(np.argmax(self._logits(prompt)))]

    def to_json(self) -> dict:
        nz = np.flatnonzero(np.any(self.W != 0, axis=1))
        return {"classes": self.classes, "n_buckets": self.n_buckets, "max_words": self.max_words,
                "max_chars": self.max_chars, "bias": self.b.tolist(),
                "rows": nz.tolist(), "weights": self.W[nz].tolist()}

    @classmethod
    def from_json(cls, d: dict) -> "ClassifierExtractor":
        c = cls(int(d["n_buckets"]), int(d["max_words"]), int(d["max_chars"]))
        c.classes = list(d["classes"])
        c.W = np.zeros((c.n_buckets, len(c.classes)))
        if d["rows"]:
            c.W[np.asarray(d["rows"], dtype=np.int64)] = np.asarray(d["weights"], dtype=np.float64)
        c.b = np.asarray(d["bias"], dtype=np.float64)
        return c


_KINDS = {"classifier": ClassifierExtractor, "keywords": KeywordExtractor}


def _check_kind(kind) -> None:
    if kind not in _KINDS:
        raise ValueError(f"unknown extractor kind {kind!r}; known kinds: {', '.join(_KINDS)}")


class TaskExtractor:
    """Maps a prompt (and optionally an explicit task) to a task type."""

    def __init__(self, kind: str, model: ClassifierExtractor | KeywordExtractor):
        _check_kind(kind)
        self.kind, self.model = kind, model

    @classmethod
    def fit(cls, examples: list[Example], kind: str = "classifier") -> "TaskExtractor":
        _check_kind(kind)
        if not examples:
            raise ValueError("cannot fit a task extractor on zero examples")
        return cls(kind, _KINDS[kind]().fit(examples))

    @property
    def known_tasks(self) -> tuple[str, ...]:
        names = self.model.classes if self.kind == "classifier" else self.model.prior
        return tuple([t for t in TASKS if t in names] + sorted(set(names) - set(TASKS)))

    def extract(self, prompt: str, explicit: str | None = None) -> str:
        if explicit is not None:
            if explicit not in self.known_tasks:
                raise ValueError(f"unknown task {explicit!r}; known tasks: {', '.join(self.known_tasks)}")
            return explicit
        return self.model.predict(prompt)

    def to_json(self) -> dict:
        return {"version": VERSION, "kind": self.kind, "model": self.model.to_json()}

    @classmethod
    def from_json(cls, d: dict) -> "TaskExtractor":
        v = d.get("version") if isinstance(d, dict) else None
        if v != VERSION:
            raise ValueError(f"unsupported task-extractor format {v!r}; this build reads {VERSION!r} only")
        _check_kind(d.get("kind"))
        return cls(d["kind"], _KINDS[d["kind"]].from_json(d["model"]))


def accuracy(extractor, examples: list[Example]) -> dict:
    """{"overall", "per_task": {task: acc}, "n"} for anything with extract() or predict()."""
    pred = extractor.extract if hasattr(extractor, "extract") else extractor.predict
    hits, seen = Counter(), Counter()
    for e in examples:
        seen[e.task] += 1
        hits[e.task] += pred(e.prompt) == e.task
    n = sum(seen.values())
    return {"overall": sum(hits.values()) / n if n else float("nan"), "n": n,
            "per_task": {t: hits[t] / seen[t] for t in seen}}


def main() -> None:
    train = load_split("train")
    splits = {s: load_split(s) for s in ("val", "test")}
    print(f"{'kind':<11} {'split':<5} {'overall':>8} " + " ".join(f"{t[:13]:>13}" for t in TASKS))
    for kind in _KINDS:
        t0 = time.perf_counter()
        ex = TaskExtractor.fit(train, kind)
        fit_s = time.perf_counter() - t0
        for s, data in splits.items():
            a = accuracy(ex, data)
            cells = " ".join(f"{a['per_task'].get(t, float('nan')):>13.4f}" for t in TASKS)
            print(f"{kind:<11} {s:<5} {a['overall']:>8.4f} {cells}")
        size = len(json.dumps(ex.to_json(), separators=(",", ":")))
        print(f"{'':<11} fit {fit_s:.2f}s, serialised JSON {size / 1024:.1f} KiB")


if __name__ == "__main__":
    main()
