"""Behaviour of the embedded model (package data): it must load, answer in task form, route by task,
and come with a profile that matches it."""
from pathlib import Path

from emoe import default_model_dir
from emoe.datasets import load_split
from emoe.engine import Engine, EngineConfig, SamplingParams

MODEL = default_model_dir()


def test_shipped_files_are_small_and_safetensors():
    d = Path(MODEL)
    assert (d / "model.safetensors").stat().st_size <= 64 * 2**20
    assert not list(d.glob("*.bin")) and (d / "tokenizer.json").is_file()


def test_sentiment_answers_are_labels(one_thread):
    eng = Engine(EngineConfig(MODEL, miss_policy="all", max_batch=6))
    exs = load_split("test", "sentiment")[:6]
    reqs = eng.generate([e.prompt for e in exs], SamplingParams(max_tokens=6))
    labels = {e.answer.strip().lower() for e in load_split("train", "sentiment")}
    hits = sum(eng.text(r).strip().lower() in labels for r in reqs)
    assert hits >= 5, [eng.text(r) for r in reqs]


def test_routing_differs_between_tasks_more_than_within(one_thread):
    from emoe.analysis import analyze
    rep = analyze(MODEL, per_task=12, progress=False)
    assert all(b > 2 * w for b, w in zip(rep["js_between_bits"], rep["js_within_bits"]))


def test_shipped_profile_matches_model_and_drives_emoe(one_thread):
    from emoe.eval import Setup, build
    from emoe.predictor import Predictor
    from emoe.profile import Profile
    prof = Profile.load(Path(MODEL) / "profile", MODEL)
    pred = Predictor.load(Path(MODEL) / "profile" / "predictor-a")
    policy, residency = build("emoe-a", Setup(prof, {"a": pred}))
    eng = Engine(EngineConfig(MODEL, budget=0.4, max_batch=2), policy=policy, residency=residency)
    exs = load_split("test", "qa")[:2]
    eng.generate([e.prompt for e in exs], SamplingParams(max_tokens=4), tasks=["qa", "qa"])
    assert eng.cache.used_bytes <= 0.4 * eng.total_expert_bytes
    assert eng.cache.stats.hit_rate > 0.5
