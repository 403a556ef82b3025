"""Profile → predictor → eMoE residency → eval, end to end on the tiny checkpoint (fast settings)."""
import json

import pytest
import torch

from emoe.profile import FORMAT, Profile, ProfileError, flags_from_curve, run_profile


def token_sim(a, b):
    from emoe.similarity import token_similarity
    return [token_similarity(list(x), list(y)) for x, y in zip(a, b)]


@pytest.fixture(scope="module")
def tiny_mixtral(tmp_path_factory):
    """A tiny model with a long context: the tiny byte-level tokenizer makes prompts long."""
    from tiny import make_tiny
    return make_tiny("mixtral", tmp_path_factory.mktemp("tiny_long") / "m", max_position_embeddings=4096)


@pytest.fixture(scope="module")
def profile_dir(tiny_mixtral, tmp_path_factory, one_thread):
    out = tmp_path_factory.mktemp("profile")
    run_profile(str(tiny_mixtral), out, per_task=3, max_tokens=4, sens_prompts=2, similarity=token_sim,
                progress=False)
    return out


CPU_EXACT = pytest.mark.skipif(__import__("torch").cuda.is_available(),
                               reason="bit-equal only where the host and the fast tier share arithmetic (a CPU)")


@CPU_EXACT
def test_profile_under_a_budget_gives_the_same_traces(profile_dir, tiny_mixtral, tmp_path):
    """A model larger than memory is profiled with most experts left in the slow tier and run there:
    the traces, output lengths and sensitivity are those of the all-resident profile."""
    out = tmp_path / "p"
    run_profile(str(tiny_mixtral), out, per_task=3, max_tokens=4, sens_prompts=2, similarity=token_sim,
                progress=False, budget=0.3, experts_on="ram")
    a, b = Profile.load(profile_dir, tiny_mixtral), Profile.load(out, tiny_mixtral)
    assert [t.total.tolist() for t in a.traces] == [t.total.tolist() for t in b.traces]
    assert a.out_len == b.out_len and a.sensitivity == b.sensitivity and a.similarity == b.similarity


@pytest.fixture
def engines_alive(monkeypatch):
    """How many engines were alive as each was built: each holds its budget of the model, so a profile or an eval
    must not keep one while it builds the next (a 2.2 GB model was refused at the sensitivity step with three)."""
    import weakref

    from emoe import engine as engine_mod
    alive, counts = weakref.WeakSet(), []
    init = engine_mod.Engine.__init__

    def counting(self, *a, **k):
        init(self, *a, **k)
        alive.add(self)
        counts.append(len(alive))
    monkeypatch.setattr(engine_mod.Engine, "__init__", counting)
    return counts


def test_profile_holds_one_engine_at_a_time(tiny_mixtral, tmp_path, engines_alive, one_thread):
    run_profile(str(tiny_mixtral), tmp_path / "p", per_task=2, max_tokens=3, sens_prompts=1, similarity=token_sim,
                progress=False)
    assert len(engines_alive) > 2 and max(engines_alive) == 1


def test_flags_from_curve():
    assert flags_from_curve([0.9, 0.86, 0.5, 0.9], [0, 1, 2, 3], 4) == [0, 0, 1, 1]
    assert flags_from_curve([0.5, 0.99], [1, 3], 4) == [1, 1, 1, 1]


def test_profile_roundtrip_and_refusals(profile_dir, tiny_mixtral, tmp_path):
    prof = Profile.load(profile_dir, tiny_mixtral)
    assert len(prof.traces) == 18 and set(prof.out_len) == set(prof.tasks)
    assert prof.load_latency_s > 0 and all(len(s) == prof.num_layers for s in prof.sensitivity.values())
    meta = json.loads((profile_dir / "profile.json").read_text())
    bad = tmp_path / "old"
    bad.mkdir()
    (bad / "traces.jsonl").write_text((profile_dir / "traces.jsonl").read_text())
    (bad / "profile.json").write_text(json.dumps({**meta, "format": "emoe-profile/0"}))
    with pytest.raises(ProfileError, match="emoe-profile/0"):
        Profile.load(bad)
    (bad / "profile.json").write_text(json.dumps({**meta, "format": FORMAT, "model_fingerprint": "other"}))
    with pytest.raises(ProfileError, match="another model"):
        Profile.load(bad, tiny_mixtral)


def test_eval_runs_every_policy_within_budget(profile_dir, tiny_mixtral, one_thread, engines_alive):
    from emoe.eval import EXTRA, POLICIES, Setup, evaluate, grid
    from emoe.predictor import Predictor
    prof = Profile.load(profile_dir, tiny_mixtral)
    preds = {k: Predictor.fit(prof.traces, kind=k, epochs=3) for k in "al"}
    preds["u"] = Predictor.fit(prof.traces, kind="a", epochs=3, unlabelled=True)
    configs = grid(Setup(prof, preds, p=2), list(POLICIES + EXTRA), [0.5])
    configs.append(("emoe-a adaptive", "emoe-a", 0.5, Setup(prof, preds, p=1000, adaptive=True)))
    recs = evaluate(str(tiny_mixtral), configs, n=6,
                    max_tokens=4, batch=3, similarity=lambda a, b: [float(x == y) for x, y in zip(a, b)],
                    log=lambda m: None)
    by = {r["policy"]: r for r in recs}
    assert set(by) == set(POLICIES + EXTRA) | {"emoe-a adaptive"}
    assert by["all"]["similarity"] == 1.0 and by["all"]["token_agreement"] == 1.0
    assert by["lru"]["token_agreement"] == 1.0  # on-demand loading is lossless
    for r in recs:
        assert r["resident_fraction"] <= r["budget"] + 1e-9
        assert 0 <= r["hit_rate"] <= 1 and r["tokens_per_s"] > 0
        hits, n = (sum(x) for x in zip(*r["per_request"]["hits"]))  # each batch's, which --versus resamples
        assert n > 0 and hits / n == pytest.approx(r["hit_rate"])
    assert by["emoe-e"]["predictor_calls"] >= by["emoe-a"]["predictor_calls"]
    assert len(engines_alive) == len(recs) + 1 and max(engines_alive) == 1  # the reference's, then one per config


def test_deferred_similarity_is_filled_in_by_rescore(profile_dir, tiny_mixtral, one_thread):
    """A run without the embedding model keeps its texts; rescoring them equals scoring in the run."""
    import math

    from emoe.eval import Setup, deferred_similarity, evaluate, grid, rescore
    prof = Profile.load(profile_dir, tiny_mixtral)
    configs = grid(Setup(prof, {}), ["all", "popular"], [0.3])
    exact = lambda a, b: [float(x == y) for x, y in zip(a, b)]  # noqa: E731
    kw = dict(n=4, max_tokens=4, batch=2, log=lambda m: None)
    now = evaluate(str(tiny_mixtral), configs, similarity=exact, **kw)
    later = json.loads(json.dumps(evaluate(str(tiny_mixtral), configs, similarity=deferred_similarity, **kw)))
    assert all(math.isnan(r["similarity"]) for r in later)
    rescore(later, exact)
    for a, b in zip(now, later):
        assert a["similarity"] == b["similarity"] and a["per_task"] == b["per_task"]
        assert a["per_request"]["similarity"] == b["per_request"]["similarity"]
    del later[1]["per_request"]["text"]
    kept = json.dumps(later)
    with pytest.raises(ValueError, match="kept no texts"):
        rescore(later, lambda a, b: [0.5] * len(a))
    assert json.dumps(later) == kept  # refused whole: the record before the bad one is unchanged too


def test_group_by_task_keeps_each_window_and_orders_by_first_arrival():
    from types import SimpleNamespace

    from emoe.eval import group_by_task
    stream = [SimpleNamespace(task=t, i=i) for i, t in enumerate("abacbcaab")]
    grouped = group_by_task(stream, 4)
    assert [e.task for e in grouped] == list("aabcbcaab")
    assert [e.i for e in grouped[:4]] == [0, 2, 1, 3]            # stable within a task
    assert sorted(e.i for e in grouped) == list(range(9))       # nothing lost or duplicated
    assert group_by_task(stream, 0) == stream and group_by_task(stream, 1) == stream


def test_saving_a_profile_drops_cached_test_traces(profile_dir, tiny_mixtral, tmp_path):
    """Test traces cached by train-predictor belong to the model the folder was profiled with before."""
    prof = Profile.load(profile_dir, tiny_mixtral)
    stale = tmp_path / "test_traces.jsonl"
    stale.write_text((profile_dir / "traces.jsonl").read_text())
    prof.save(tmp_path)
    assert not stale.exists() and (tmp_path / "traces.jsonl").is_file()


@CPU_EXACT
def test_eval_reference_under_a_budget_is_the_all_resident_one(profile_dir, tiny_mixtral):
    """A model larger than memory gets its reference outputs with the rest of the experts run in the slow
    tier: every policy scores as against the all-resident reference."""
    from emoe.eval import Setup, evaluate, grid
    prof = Profile.load(profile_dir, tiny_mixtral)
    exact = lambda a, b: [float(x == y) for x, y in zip(a, b)]  # noqa: E731
    kw = dict(n=4, max_tokens=4, batch=2, log=lambda m: None, similarity=exact)
    configs = grid(Setup(prof, {}), ["popular", "popular-host"], [0.3])
    full = evaluate(str(tiny_mixtral), configs, **kw)
    tight = evaluate(str(tiny_mixtral), configs, reference_budget=0.2, **kw)
    for a, b in zip(full, tight):
        assert (a["similarity"], a["token_agreement"]) == (b["similarity"], b["token_agreement"])
    assert tight[1]["token_agreement"] == 1.0  # host misses: the model's own tokens


@CPU_EXACT
def test_layer_placement_is_llama_cpp_n_cpu_moe(profile_dir, tiny_mixtral, one_thread):
    """`layers`: whole layers' experts in the fast tier, the last first, as many as fit (llama.cpp's
    --n-cpu-moe); with -host the output is the model's own, and only those layers' tokens hit. Rerouting
    needs a resident expert in every layer, so `layers` alone is refused."""
    from emoe.engine import BudgetError, Engine, EngineConfig, SamplingParams
    from emoe.eval import Setup, build
    from emoe.residency import ByLayer
    prof = Profile.load(profile_dir, tiny_mixtral)
    E, layers = prof.popular().shape[1], list(prof.moe_layers)
    plan = ByLayer(prof, int(1.6 * E)).initial()
    assert plan[layers[-1]] == list(range(E)) and all(plan[l] == [] for l in layers[:-1])
    assert all(v == [] for v in ByLayer(prof, E - 1).initial().values())
    policy, residency = build("layers-host", Setup(prof, {}))
    eng = Engine(EngineConfig(str(tiny_mixtral), budget=0.5, miss_policy=policy.name, trace=True), policy=policy,
                 residency=residency)
    reqs = eng.generate(["Summarize: the cat sat on the mat.", "hi"], SamplingParams(max_tokens=4, ignore_eos=True))
    ref = Engine(EngineConfig(str(tiny_mixtral), miss_policy="all")).generate(
        ["Summarize: the cat sat on the mat.", "hi"], SamplingParams(max_tokens=4, ignore_eos=True))
    assert [r.output_ids for r in reqs] == [r.output_ids for r in ref]
    fast = {l for l in layers if eng.cache.resident(l)}
    assert fast and all(len(eng.cache.resident(l)) == E for l in fast)
    policy, residency = build("layers", Setup(prof, {}))
    with pytest.raises(BudgetError, match="have no resident expert"):
        Engine(EngineConfig(str(tiny_mixtral), budget=0.5, miss_policy=policy.name), policy=policy,
               residency=residency)


def test_emoe_predicts_unlabelled_requests_only_with_a_predictor_that_learnt_them(profile_dir, tiny_mixtral):
    """A request with no task (the loader groups it as "unknown") is predicted from recent routing by a
    predictor fitted with unlabelled=True (policy emoe-u), and falls back to the global mix otherwise."""
    from emoe.predictor import UNLABELLED, Predictor
    from emoe.residency import EMoE
    prof = Profile.load(profile_dir, tiny_mixtral)
    for unlabelled in (False, True):
        pred = Predictor.fit(prof.traces, kind="a", epochs=3, unlabelled=unlabelled)
        res = EMoE(prof, 8, pred, p=1)
        calls = res.calls
        f = res.shares("unknown")
        assert (res.calls > calls) == unlabelled
        if unlabelled:
            torch.testing.assert_close(f, pred.predict(UNLABELLED, res.history))
            assert res.shares(None) is res.cached[UNLABELLED]  # None and "unknown" are the same traffic
        else:
            torch.testing.assert_close(f, res.popular / res.popular.sum(1, keepdim=True).clamp_min(1))


def test_a_sticky_prompt_refresh_moves_an_expert_only_for_a_clear_gain(profile_dir, tiny_mixtral):
    """emoe-a-sticky-prompt: after a prefill the refresh plans with the cache's resident set, as plan() does, so a
    resident expert yields only to one expecting (1 + h)x its tokens; without the cache it chases near-ties."""
    from types import SimpleNamespace

    from emoe.predictor import Predictor
    from emoe.residency import EMoE
    prof = Profile.load(profile_dir, tiny_mixtral)
    res = EMoE(prof, 8, Predictor.fit(prof.traces, kind="a", epochs=3), p=1, prompt_aware=True, stickiness=1.0)
    L, E = res.popular.shape
    res.shares = lambda task: torch.full((L, E), 1.0 / E)  # the task says nothing: every expert alike
    held = res._top(torch.arange(E, 0, -1).float().expand(L, E))  # the fast tier holds the low ids
    mask = torch.zeros(L, E, dtype=torch.bool)
    for layer, ids in held.items():
        mask[layer, ids] = True
    prompt = (10 + torch.arange(E)).expand(L, E).clone()  # the prompt leans, a little, to the high ids
    req = SimpleNamespace(id=1, task="qa", prompt_ids=[0] * 20)
    moved = {}
    for name, cache in (("free", None), ("sticky", SimpleNamespace(mask=mask))):
        plan = res.after_prefill([req], [req], [prompt], cache)
        assert sum(map(len, plan.values())) == 8
        moved[name] = sum(len(set(ids) - set(held[layer])) for layer, ids in plan.items())
    assert moved["sticky"] == 0 < moved["free"]


def test_async_loads_give_the_outputs_and_counters_of_loading_in_place(profile_dir, tiny_mixtral, one_thread):
    """A plan's loads landing on the mover's thread (async_loads) are waited for by the first layer call that reads
    them, so every token runs on the weights it would have run on had they loaded in place."""
    from emoe.engine import Engine, EngineConfig, SamplingParams
    from emoe.eval import Setup, build
    prof = Profile.load(profile_dir, tiny_mixtral)
    prompts = ["Summarize: the cat sat on the mat.", "hi", "Is this review positive? Great film.", "def f(x):"]
    tasks = [t for t in sorted(prof.tasks)][:4] * 2
    got = {}
    for on in (None, False, True):
        policy, residency = build("task-static-q48", Setup(prof, {}))
        eng = Engine(EngineConfig(str(tiny_mixtral), budget=0.5, miss_policy=policy.name, max_batch=2,
                                  async_loads=on), policy=policy, residency=residency)
        assert (eng.cache.mover is not None) == (on if on is not None else eng.device.type == "cuda")  # the default
        if on is None:
            continue
        outs = []
        for i in range(0, 8, 2):  # a plan per admission, over changing task mixes
            outs += [r.output_ids for r in eng.generate(prompts[i % 4: i % 4 + 2], SamplingParams(max_tokens=6),
                                                        tasks=tasks[i: i + 2])]
        s = eng.cache.stats
        got[on] = outs, (s.hits, s.misses, s.loads, s.evictions, s.bytes_loaded, s.shadow_uses)
    assert got[False][1][2] > 0  # plans moved experts
    assert got[True] == got[False]


def test_profile_of_a_users_own_prompts_keeps_their_tasks_and_file(tiny_mixtral, tmp_path, one_thread):
    """`emoe profile --data FILE`: the profile's tasks, lengths, sensitivity and extractor are the file's, and it
    records the file, so eval's test stream (datasets.use(profile.data)) comes from the same file's test split."""
    from emoe import datasets
    from emoe.eval import test_stream
    from emoe.tasks import TaskExtractor
    path = tmp_path / "mine.jsonl"
    rows = [{"task": "sql", "prompt": f"Write SQL counting rows of table t{i}."} for i in range(30)] + \
        [{"task": "support", "prompt": f"Order {i} never arrived. Help?"} for i in range(30)]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    try:
        datasets.use(path)
        run_profile(str(tiny_mixtral), tmp_path / "prof", per_task=3, max_tokens=4, sens_prompts=2,
                    similarity=token_sim, progress=False)
        datasets.use(None)
        prof = Profile.load(tmp_path / "prof", tiny_mixtral)
        assert prof.tasks == ["sql", "support"] and set(prof.sensitivity) == set(prof.out_len) == {"sql", "support"}
        assert prof.data["path"] == str(path.resolve()) and len(prof.traces) == 6
        assert set(TaskExtractor.from_json(prof.extractor).known_tasks) == {"sql", "support"}
        datasets.use(prof.data)
        assert {e.task for e in test_stream(20, seed=0)} == {"sql", "support"}
    finally:
        datasets.use(None)
