"""Offline profile of a model on task-labelled prompts: one versioned folder later commands read.

profile.json  format, model fingerprint, shape, per-task prompt/output lengths, measured expert load
              latency and per-token compute cost, the sensitivity profile, the fitted task extractor
traces.jsonl  routing traces (prompt *and* generated tokens) of every profiled prompt, in stream order
test_traces.jsonl  (written by `emoe train-predictor`) the test split's traces, cached; saving a profile
              drops it
"""
from __future__ import annotations

import hashlib
import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .traces import Trace, load_traces, save_traces

FORMAT = "emoe-profile/1"
SENS_THRESHOLD = 0.85


class ProfileError(ValueError):
    pass


def fingerprint(model_dir: str | Path) -> str:
    """config.json + safetensors headers: changes whenever the weights' layout or the model does."""
    h = hashlib.sha256()
    d = Path(model_dir)
    h.update((d / "config.json").read_bytes())
    for f in sorted(d.glob("*.safetensors")):
        with open(f, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            h.update(fh.read(n))
        h.update(str(f.stat().st_size).encode())
    return h.hexdigest()[:16]


@dataclass(slots=True)
class Profile:
    model_fingerprint: str
    tasks: list[str]
    num_layers: int
    num_experts: int
    top_k: int
    moe_layers: list[int]
    out_len: dict[str, float]
    prompt_len: dict[str, float]
    load_latency_s: float                 # one expert, slow tier → fast tier
    expert_bytes: int
    token_cost_s: dict[str, float]        # measured per-token compute: {"prefill": s, "decode": s}
    sensitivity: dict[str, list[int]]     # task → s per layer (0 = insensitive)
    similarity: dict[str, list[float]]    # task → similarity with the first m MoE layers randomised
    extractor: dict | None = None
    data: dict | None = None  # the user's prompt file profiled ({"path", "sha256"}: datasets.use), None: the shipped sets
    traces: list[Trace] = field(default_factory=list)

    def save(self, directory: str | Path) -> None:
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        meta = {k: getattr(self, k) for k in self.__slots__ if k != "traces"}
        (d / "profile.json").write_text(json.dumps({"format": FORMAT, **meta}, indent=1))
        save_traces(self.traces, d / "traces.jsonl")
        # `train-predictor` caches the test split's traces here; they came from whatever model the folder
        # was profiled with before, so a new profile must not inherit them
        (d / "test_traces.jsonl").unlink(missing_ok=True)

    @classmethod
    def load(cls, directory: str | Path, model_dir: str | Path | None = None) -> "Profile":
        d = Path(directory)
        path = d / "profile.json"
        if not path.is_file():
            raise ProfileError(f"{d} is not a profile folder (no profile.json); create one with `emoe profile`")
        meta = json.loads(path.read_text())
        fmt = meta.pop("format", None)
        if fmt != FORMAT:
            raise ProfileError(f"{path} has format {fmt!r}; this emoe reads {FORMAT!r} — re-run `emoe profile`")
        prof = cls(**meta, traces=load_traces(d / "traces.jsonl"))
        if model_dir is not None and (fp := fingerprint(model_dir)) != prof.model_fingerprint:
            raise ProfileError(f"{d} was profiled on another model (fingerprint {prof.model_fingerprint}, "
                               f"this model is {fp}); re-run `emoe profile` for {model_dir}")
        return prof

    def task_static(self) -> dict[str, torch.Tensor]:
        from .predictor import task_static  # the same prior the predictor starts from
        return {t: f for t, f in task_static(self.traces).items() if t in self.tasks}

    def popular(self) -> torch.Tensor:
        return torch.stack([t.total.float() for t in self.traces]).sum(0)

    def sensitivity_tensors(self) -> dict[str, torch.Tensor]:
        return {t: torch.tensor(s, dtype=torch.float32) for t, s in self.sensitivity.items()}


def measure_load_latency(engine, n: int = 16) -> float:
    """Seconds to bring one expert from the slow tier into the fast tier (read + copy), averaged."""
    from .cache import ExpertCache
    c = engine.cfg
    probe = ExpertCache(engine.store, engine.cache.expert_bytes * n, engine.device, engine.dtype,
                        c.num_layers, c.num_experts, engine.expert_numel)
    keys = random.Random(0).sample(sorted(engine.ckpt.experts), min(n, len(engine.ckpt.experts)))
    for k in keys:
        probe.admit(*k)
    return probe.stats.load_seconds / len(keys)


def sensitivity_curve(model_dir: str, prompts: list[str], refs: list[str], max_tokens: int,
                      moe_layers: list[int], similarity, **engine) -> list[float]:
    """Similarity to the all-resident outputs when the first m MoE layers route at random, m = 1..M.
    `engine`: EngineConfig settings (a budget runs non-resident experts in the slow tier: same outputs)."""
    from .engine import Engine, EngineConfig, SamplingParams
    from .policies import RandomRouting
    if not prompts:
        return [0.0] * len(moe_layers)  # nothing fits: count every layer as sensitive
    curve = []
    for m in range(1, len(moe_layers) + 1):
        eng = Engine(EngineConfig(model_dir, max_batch=len(prompts), **engine), policy=RandomRouting(moe_layers[:m], seed=m))
        outs = eng.generate(prompts, SamplingParams(max_tokens=max_tokens))
        sims = similarity([eng.text(r) for r in outs], refs)
        curve.append(sum(sims) / len(sims))
        del eng, outs  # before the next one is built: a model over a third of RAM does not fit twice
    return curve


def flags_from_curve(curve: list[float], moe_layers: list[int], num_layers: int,
                     threshold: float = SENS_THRESHOLD) -> list[int]:
    """Layers 1..m* are insensitive (s = 0) where randomising them all still keeps similarity ≥ threshold."""
    s = [1] * num_layers
    for m, sim in enumerate(curve, start=1):
        if sim < threshold:
            break
        s[moe_layers[m - 1]] = 0
    return s


def exact_engine(budget: float = 1.0, experts_on: str = "disk", dtype: str | None = None) -> dict:
    """EngineConfig settings whose outputs are the model's own: everything resident, or under a budget
    for a model larger than memory, the rest run in the slow tier (the `host` miss policy) on the weights
    as loaded (not a GGUF's kernel forms, whose bf16 activations and scales would differ slightly)."""
    return dict(budget=budget, miss_policy="all" if budget >= 1.0 else "host", experts_on=experts_on, dtype=dtype,
                host_kernel=False)


def trace_stream(model_dir: str, examples, max_tokens: int, batch: int = 8, on_batch=None, **engine):
    """Greedy generation of examples in order with the model's own routing, traced (prompt + answer)."""
    from .engine import Engine, EngineConfig, SamplingParams
    eng = Engine(EngineConfig(model_dir, max_batch=batch, trace=True, **(engine or exact_engine())))
    params = SamplingParams(max_tokens=max_tokens)
    examples = [e for e in examples if eng.fits(e.prompt, max_tokens)]
    reqs, t0 = [], time.perf_counter()
    for i in range(0, len(examples), batch):
        chunk = examples[i: i + batch]
        reqs += eng.generate([e.prompt for e in chunk], params, tasks=[e.task for e in chunk])
        if on_batch:
            on_batch(len(chunk))
    return eng, reqs, time.perf_counter() - t0


def run_profile(model_dir: str, out: str | Path, per_task: int = 40, max_tokens: int = 48,
                sens_prompts: int = 8, batch: int = 8, seed: int = 0, similarity=None, progress=True,
                budget: float = 1.0, experts_on: str = "disk", dtype: str | None = None) -> Profile:
    from tqdm import tqdm

    from .datasets import load_split, source, tasks
    from .tasks import TaskExtractor
    TASKS = tasks()  # the shipped six, or those of the user's file in use (--data)
    if similarity is None:
        from .similarity import embedding_similarity as similarity
    rng = random.Random(seed)
    train = load_split("train")
    by_task = {t: [e for e in train if e.task == t] for t in TASKS}
    stream = []
    for t in TASKS:
        stream += [(t, e) for e in rng.sample(by_task[t], min(per_task, len(by_task[t])))]
    rng.shuffle(stream)  # a mixed stream: uniformly random task per request, as in the paper
    bar = tqdm(total=len(stream) + len(TASKS), desc="profile", disable=not progress)
    engine = exact_engine(budget, experts_on, dtype)
    eng, reqs, secs = trace_stream(model_dir, [e for _, e in stream], max_tokens, batch, bar.update, **engine)
    n_prompt = sum(len(r.prompt_ids) for r in reqs)
    n_out = sum(len(r.output_ids) for r in reqs)
    # per-token costs from a calibrated split: decode steps dominate; prefill tokens are batched
    decode_cost = secs / max(n_out, 1)
    cfg, load_latency, expert_bytes = eng.cfg, measure_load_latency(eng), eng.cache.expert_bytes
    prompt_of = {id(r): e.prompt for r, e in zip(reqs, [e for _, e in stream if eng.fits(e.prompt, max_tokens)])}
    mine = {t: [r for r in reqs if r.task == t][:sens_prompts] for t in TASKS}
    refs = {t: [eng.text(r) for r in mine[t]] for t in TASKS}
    del eng  # the sensitivity runs' engines hold the model too: one copy at a time, not two (or three)
    sens, curves = {}, {}
    for t in TASKS:
        prompts = [prompt_of[id(r)] for r in mine[t]]
        curves[t] = sensitivity_curve(model_dir, prompts, refs[t], max_tokens, list(cfg.moe_layers), similarity,
                                      **engine)
        sens[t] = flags_from_curve(curves[t], list(cfg.moe_layers), cfg.num_layers)
        bar.update(1)
    bar.close()
    ex = TaskExtractor.fit(train, kind="classifier")
    prof = Profile(
        model_fingerprint=fingerprint(model_dir), tasks=list(TASKS), num_layers=cfg.num_layers,
        num_experts=cfg.num_experts, top_k=cfg.top_k, moe_layers=list(cfg.moe_layers),
        out_len={t: _mean([len(r.output_ids) for r in reqs if r.task == t]) for t in TASKS},
        prompt_len={t: _mean([len(r.prompt_ids) for r in reqs if r.task == t]) for t in TASKS},
        load_latency_s=load_latency, expert_bytes=expert_bytes,
        token_cost_s={"decode": decode_cost, "prefill": secs / max(n_prompt + n_out, 1)},
        sensitivity=sens, similarity=curves, extractor=ex.to_json(), data=source(), traces=[r.trace for r in reqs])
    prof.save(out)
    return prof


def _mean(xs) -> float:
    return float(sum(xs) / len(xs)) if xs else 0.0
