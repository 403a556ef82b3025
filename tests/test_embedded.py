"""Behaviour of the embedded model (package data): it must load, answer in task form, route by task,
and come with a profile that matches it."""
from pathlib import Path

from conftest import same_model_tokens
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


def test_shadow_copies_keep_outputs_where_rerouting_does_not(one_thread, capsys):
    """At 40% of expert bytes, misses run on int4/int8 copies (emoe-a-sticky-q48) and the teacher-forced
    agreement with all-resident stays high; rerouting the same misses (emoe-a) loses much of it."""
    from emoe.cli import main
    from emoe.eval import Setup, build
    from emoe.predictor import Predictor
    from emoe.profile import Profile
    prof = Profile.load(Path(MODEL) / "profile", MODEL)
    setup = Setup(prof, {"a": Predictor.load(Path(MODEL) / "profile" / "predictor-a")})
    ref = Engine(EngineConfig(MODEL, miss_policy="all", max_batch=1))
    exs = [e for t in ("summarization", "code", "conversation") for e in load_split("test", t)[:2]]
    refs = [ref.generate([e.prompt], SamplingParams(max_tokens=12), tasks=[e.task])[0] for e in exs]

    def agreement(name):
        policy, residency = build(name, setup)
        eng = Engine(EngineConfig(MODEL, budget=0.4, max_batch=1), policy=policy, residency=residency)
        hit = n = 0
        for e, r in zip(exs, refs):
            pred = eng.score(r.prompt_ids, r.output_ids, e.task).argmax(-1).tolist()
            hit += sum(a == b for a, b in zip(pred, r.output_ids))
            n += len(r.output_ids)
        assert eng.cache.used_bytes <= eng.cache.budget_bytes
        return hit / n

    shadow, rerouted = agreement("emoe-a-sticky-q48"), agreement("emoe-a")
    assert shadow >= 0.9 and shadow > rerouted + 0.2, (shadow, rerouted)
    main(["generate", exs[0].prompt, "--budget", "0.4", "--policy", "emoe-a-sticky-q48", "--max-tokens", "4"])
    assert "int4/int8 copies" in capsys.readouterr().err


def test_emoe_residency_with_misses_run_on_the_host_is_exact(one_thread):
    """emoe-a-host: the predictor picks what the fast tier holds, every miss runs on the host in place.
    Same tokens as all-resident at 40%, nothing loaded on demand, and the plan serves most of the work."""
    from emoe.eval import Setup, build
    from emoe.predictor import Predictor
    from emoe.profile import Profile
    prof = Profile.load(Path(MODEL) / "profile", MODEL)
    policy, residency = build("emoe-a-host", Setup(prof, {"a": Predictor.load(Path(MODEL) / "profile" / "predictor-a")}))
    exs = [e for t in ("sentiment", "code") for e in load_split("test", t)[:2]]
    params = SamplingParams(max_tokens=8)
    ref = Engine(EngineConfig(MODEL, miss_policy="all", max_batch=1))
    want = [ref.generate([e.prompt], params, tasks=[e.task])[0].output_ids for e in exs]
    eng = Engine(EngineConfig(MODEL, budget=0.4, max_batch=1, experts_on="ram"), policy=policy, residency=residency)
    got = [eng.generate([e.prompt], params, tasks=[e.task])[0].output_ids for e in exs]
    assert same_model_tokens(got, want)
    s = eng.cache.stats
    assert s.host_runs > 0 and s.hit_rate > 0.5 and eng.cache.used_bytes <= eng.cache.budget_bytes
