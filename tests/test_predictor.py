import json

import numpy as np
import pytest
import torch

from emoe.datasets import TASKS
from emoe.predictor import FORMAT, Predictor, baselines, evaluate, main, popular, set_metrics, task_static
from emoe.traces import Trace, save_traces

L, E, DENSE, MOE, RESIDENT = 4, 16, 1, [0, 2, 3], 6


def synth(n: int, alpha: float = 0.6, drift: float = 0.05, tokens: int = 200, seed: int = 0) -> list[Trace]:
    """Mixed stream, uniformly random task per prompt. Each task has a Dirichlet(alpha) expert distribution per
    layer whose logits random-walk over time; a trace is a multinomial draw of `tokens` assignments per layer."""
    rng = np.random.default_rng(seed)
    logits = {t: np.log(rng.dirichlet(np.full(E, alpha), size=L) + 1e-6) for t in TASKS}
    out = []
    for i in range(n):
        for t in TASKS:
            logits[t] += drift * rng.standard_normal((L, E))
        task = TASKS[rng.integers(len(TASKS))]
        pr = np.exp(logits[task] - logits[task].max(-1, keepdims=True))
        c = torch.from_numpy(rng.multinomial(tokens, pr / pr.sum(-1, keepdims=True))).long()
        c[DENSE] = 0
        out.append(Trace(f"r{i}", task, c // 2, c - c // 2, 20, 10))
    return out


@pytest.fixture(scope="module")
def stream():
    s = synth(720)
    return s[:600], s[600:]


@pytest.fixture(scope="module")
def fitted(stream):
    train, _ = stream
    out = {}
    for kind in ("a", "l"):
        out[kind] = Predictor.fit(train, kind=kind)
    return out


@pytest.mark.parametrize("kind", ["a", "l"])
def test_predictions_are_distributions(fitted, stream, kind):
    train, test = stream
    p = fitted[kind]
    assert p.moe_layers == MOE and p.tasks == TASKS
    for hist in ([], train[:1], train, train + test):
        for task in TASKS:
            f = p.predict(task, hist)
            assert f.shape == (L, E) and f.dtype == torch.float32
            assert torch.all(f >= 0)
            torch.testing.assert_close(f[MOE].sum(-1), torch.ones(len(MOE)))
            assert torch.all(f[DENSE] == 0)


@pytest.mark.parametrize("kind", ["a", "l"])
def test_empty_history_is_task_prior(fitted, stream, kind):
    static = task_static(stream[0])
    for task in TASKS:
        f = fitted[kind].predict(task, [])
        torch.testing.assert_close(f, fitted[kind].prior(task))
        assert (f - static[task]).abs().max() < 2e-3  # the prior is smoothed by 1e-4 per expert


# Measured F1 / coverage (600 train / 120 test traces, 6 resident of 16; seeds 0, 1, 2 of `synth`):
#   task-static          0.756/0.828  0.751/0.894  0.750/0.851   (any p)
#   eMoE-A p=1           0.842/0.872  0.822/0.923  0.839/0.885
#   eMoE-A p=10          0.830/0.866  0.813/0.921  0.829/0.882
#   eMoE-A p=40          0.818/0.861  0.808/0.919  0.817/0.877
#   eMoE-L p=1           0.846/0.874  0.822/0.923  0.839/0.886
# Smallest gap to task-static over these: F1 +0.057, coverage +0.025; the margins below are about half.
# (The unlearned same-task EMA baseline scores the same as eMoE-A here, 0.847/0.874 on seed 0: this stream
# has no structure beyond per-task drift for the MLP to learn.)
@pytest.mark.parametrize("kind,p", [("a", 1), ("a", 10), ("a", 40), ("l", 1)])
def test_beats_task_static_on_drifting_stream(fitted, stream, kind, p):
    train, test = stream
    static = evaluate(baselines(train)["task-static"], test, RESIDENT, p=p, history=train)
    ours = evaluate(fitted[kind], test, RESIDENT, p=p, history=train)
    assert ours["n"] == static["n"] == len(test)
    assert ours["f1"] >= static["f1"] + 0.03, (ours, static)
    assert ours["coverage"] >= static["coverage"] + 0.012, (ours, static)
    assert set(ours["per_task"]) == set(TASKS)


def test_popular_is_worse_than_task_static(stream):
    train, test = stream
    b = baselines(train)
    pop, static = (evaluate(b[k], test, RESIDENT, history=train) for k in ("popular", "task-static"))
    assert pop["f1"] < static["f1"] and pop["coverage"] < static["coverage"]
    g = popular(train)
    torch.testing.assert_close(g[MOE].sum(-1), torch.ones(len(MOE)))
    assert torch.all(g[DENSE] == 0)


@pytest.mark.parametrize("kind", ["a", "l"])
def test_save_load_roundtrip(fitted, stream, tmp_path, kind):
    train, test = stream
    p = fitted[kind]
    p.save(tmp_path)
    assert {f.name for f in tmp_path.iterdir()} == {"predictor.safetensors", "predictor.json"}
    q = Predictor.load(tmp_path)
    assert (q.kind, q.tasks, q.moe_layers) == (p.kind, p.tasks, p.moe_layers)
    assert q.nbytes == p.nbytes > 0
    for task in TASKS:
        for hist in ([], train, train + test[:7]):
            assert torch.equal(p.predict(task, hist), q.predict(task, hist))
    meta = json.loads((tmp_path / "predictor.json").read_text())
    assert meta["format"] == FORMAT
    meta["format"] = "emoe-predictor/0"
    (tmp_path / "predictor.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"emoe-predictor/0.*emoe-predictor/1"):
        Predictor.load(tmp_path)


def test_unknown_task_and_kind(fitted, stream):
    with pytest.raises(ValueError, match="known tasks: summarization, sentiment"):
        fitted["a"].predict("translation", stream[0])
    with pytest.raises(ValueError, match="known kinds"):
        Predictor.fit(stream[0][:20], kind="x")


def test_evaluate_reuses_predictions_every_p(stream):
    train, test = stream
    stream_all = train + test
    calls, static = [], task_static(train)

    def fn(task, history):
        calls.append((task, len(history)))
        return static[task]

    r = evaluate(fn, stream_all, RESIDENT, p=40)
    per_task = {t: sum(x.task == t for x in stream_all) for t in TASKS}
    assert r["calls"] == len(calls) == sum(-(-n // 40) for n in per_task.values())
    for task in TASKS:  # called on the 1st, 41st, 81st ... prompt of the task, with the history before it
        idx = [i for i, x in enumerate(stream_all) if x.task == task][::40]
        assert [h for t, h in calls if t == task] == idx
    assert r["n"] == len(stream_all) and sum(v["n"] for v in r["per_task"].values()) == len(stream_all)
    calls.clear()
    r1 = evaluate(fn, stream_all, RESIDENT, p=1)
    assert len(calls) == len(stream_all) and r1["calls"] == len(stream_all)
    # the predictor ignores the history here, so reuse changes nothing
    assert r1["f1"] == pytest.approx(r["f1"]) and r1["coverage"] == pytest.approx(r["coverage"])


def test_set_metrics_by_hand():
    counts = torch.zeros(2, 5, dtype=torch.long)
    counts[0] = torch.tensor([50, 30, 15, 5, 0])  # 90% set: {0, 1, 2}
    pred = torch.zeros(2, 5)
    pred[0] = torch.tensor([0.4, 0.0, 0.3, 0.2, 0.1])  # top-2: {0, 2}
    m = set_metrics(pred, counts, 2, moe_layers=[0, 1])
    assert m["layers"] == 1  # layer 1 has no tokens (dense): skipped
    assert m["precision"] == pytest.approx(1.0) and m["recall"] == pytest.approx(2 / 3)
    assert m["f1"] == pytest.approx(0.8) and m["coverage"] == pytest.approx(0.65)
    m = set_metrics(pred, counts, [4, 0])
    assert m["precision"] == pytest.approx(0.5) and m["recall"] == pytest.approx(2 / 3)
    assert m["coverage"] == pytest.approx(0.70)


def test_cli_table(stream, tmp_path, capsys):
    path = tmp_path / "traces.jsonl"
    save_traces(stream[0][:200], path)
    main([str(path), "--resident", "6", "--p", "1,40", "--epochs", "3"])
    out = capsys.readouterr().out
    for name in ("eMoE-A", "eMoE-L", "task-static", "popular", "previous-prompt", "same-task-EMA"):
        assert out.count(name) >= 2, out


def test_adaptive_p_repredicts_when_coverage_drops():
    """Phases of one label with two routings: fixed p = 40 keeps a stale prediction through a phase change;
    the drift trigger re-predicts right after the first prompt it covers badly."""
    from emoe.predictor import drifted

    def trace(i, hot):
        c = torch.zeros(L, E, dtype=torch.long)
        c[MOE, hot * 8: hot * 8 + 4] = 50
        return Trace(f"r{i}", "qa", c, torch.zeros_like(c))
    phases = [trace(i, (i // 10) % 2) for i in range(60)]
    prev = baselines(phases)["previous-prompt"]
    fixed = evaluate(prev, phases, 4, p=40)
    adapt = evaluate(prev, phases, 4, p=40, adaptive=True)
    assert adapt["coverage"] > fixed["coverage"] + 0.3
    assert fixed["calls"] == 2 and fixed["calls"] < adapt["calls"] <= 12  # ~one extra call per phase change
    assert drifted(0.4, 0.9) and drifted(0.8, 0.9) and not drifted(0.88, 0.9)


def test_loader_sizes_split_the_same_bytes_by_predicted_share():
    from emoe.predictor import loader_sizes
    pred = torch.zeros(L, E)
    pred[0, :2] = 0.5                     # a layer that needs two experts
    pred[2] = torch.linspace(1, 0.1, E)   # layers that spread
    pred[3] = torch.linspace(1, 0.2, E)
    sizes = loader_sizes(RESIDENT * len(MOE), MOE, top_k=2)(pred)
    assert sum(sizes) == RESIDENT * len(MOE) and sizes[DENSE] == 0
    assert sizes[0] == 2 and min(sizes[m] for m in MOE) >= 2 and sizes[2] + sizes[3] == 16


def test_evaluate_with_loader_sizes_scores_the_sets_the_loader_keeps(stream):
    from emoe.predictor import loader_sizes
    train, test = stream
    static = baselines(train)["task-static"]
    uniform = evaluate(static, test, RESIDENT, history=train)
    split = evaluate(static, test, loader_sizes(RESIDENT * len(MOE), MOE, 2), history=train)
    assert split["n"] == uniform["n"] and split["coverage"] >= uniform["coverage"] - 0.02


def _coverage(f: torch.Tensor, t: Trace) -> float:
    """Share of a trace's routed assignments in the top-RESIDENT experts of f, over the MoE layers."""
    got = t.total.float()
    top = f[MOE].topk(RESIDENT, -1).indices
    return float(got[MOE].gather(1, top).sum() / got[MOE].sum())


def test_unlabelled_traffic_is_predicted_from_recent_routing(stream):
    """Fitted with unlabelled=True (on the traces replayed in runs of one task and in arrival order), a
    request with no task is predicted from the recent routing of unlabelled traffic: on runs of one task it
    covers more than the global mix, which is all a task-static plan has for such a request, and in
    random order about as much; labelled predictions and the empty-history prior are kept."""
    from dataclasses import replace

    from emoe.predictor import UNLABELLED
    train, test = stream
    p = Predictor.fit(train, kind="a", unlabelled=True)
    assert p.tasks[-1] == UNLABELLED and UNLABELLED not in Predictor.fit(train[:60], kind="a").tasks
    torch.testing.assert_close(p.predict(UNLABELLED, []), p.prior(UNLABELLED))
    assert (p.prior(UNLABELLED) - popular(train)).abs().max() < 2e-3
    by_task = {}
    for t in test:
        by_task.setdefault(t.task, []).append(replace(t, task=None))
    phased = [t for task in sorted(by_task) for t in by_task[task][:10]]  # phases of up to 10, no labels
    ours = [_coverage(p.predict(UNLABELLED, train + phased[:i]), t) for i, t in enumerate(phased)]
    mix = [_coverage(popular(train), t) for t in phased]
    # measured (seed 0): 0.770 against the mix's 0.621; the margin below is about half
    assert sum(ours) / len(ours) >= sum(mix) / len(mix) + 0.07, (sum(ours) / len(ours), sum(mix) / len(mix))
    # unrelated requests in arrival order: history that does not hang together is barely trusted
    # (measured 0.589 against the mix's 0.593; fitted on runs alone, without the likeness scaling: 0.553)
    rnd = [replace(t, task=None) for t in test]
    ours = [_coverage(p.predict(UNLABELLED, train + rnd[:i]), t) for i, t in enumerate(rnd)]
    mix = [_coverage(popular(train), t) for t in rnd]
    assert sum(ours) / len(ours) >= sum(mix) / len(mix) - 0.02
    labelled = evaluate(p, test, RESIDENT, p=1, history=train)["f1"]
    assert labelled >= evaluate(baselines(train)["task-static"], test, RESIDENT, p=1, history=train)["f1"] + 0.03
