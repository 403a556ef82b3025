"""The hindsight (oracle) bounds: a residency plan and a predictor ceiling from the prompt's own routing."""
from pathlib import Path
from types import SimpleNamespace

import torch

from emoe import default_model_dir
from emoe.predictor import baselines, evaluate, hindsight, loader_sizes
from emoe.profile import Profile
from emoe.residency import Hindsight
from emoe.traces import Trace, load_traces

MODEL = default_model_dir()


def _profile():
    return Profile.load(Path(MODEL) / "profile", MODEL)


def test_hindsight_plans_each_batch_from_its_own_routing():
    prof = _profile()
    L, E = prof.num_layers, prof.num_experts
    a, b = torch.zeros(L, E, dtype=torch.long), torch.zeros(L, E, dtype=torch.long)
    a[:, 5], b[:, 9] = 50, 40           # prompt a uses expert 5 everywhere, b expert 9 (in answers)
    a[:, 1], b[:, 2] = 1, 1
    routing = {(1, 2): Trace("a", "qa", a, torch.zeros_like(a)), (3,): Trace("b", "qa", torch.zeros_like(b), b)}
    h = Hindsight(prof, capacity=len(prof.moe_layers) * prof.top_k, routing=routing)
    ra, rb = SimpleNamespace(id="a", prompt_ids=[1, 2]), SimpleNamespace(id="b", prompt_ids=[3])
    plan = h.plan([ra, rb], None)
    assert all({5, 9} <= set(plan[layer]) for layer in prof.moe_layers)
    assert h.plan([ra, rb], None) is plan                               # same batch: same plan, no recompute
    assert all(5 in h.plan([ra], None)[layer] for layer in prof.moe_layers)
    assert h.plan([ra, SimpleNamespace(id="c", prompt_ids=[7])], None) is None  # unseen prompt: keep as is


def test_no_predictor_covers_more_than_the_prompts_own_routing():
    prof = _profile()
    test = load_traces(Path(MODEL) / "profile" / "test_traces.jsonl")[:40]
    ts = baselines(prof.traces)["task-static"]
    for n in (4, 6):
        ceiling, got = hindsight(test, n, prof.moe_layers), evaluate(ts, test, n, history=prof.traces)
        assert got["coverage"] <= ceiling["coverage"] + 1e-9 and ceiling["coverage"] > 0.5
    sizes = loader_sizes(6 * len(prof.moe_layers), prof.moe_layers, prof.top_k)
    assert hindsight(test, sizes, prof.moe_layers)["f1"] > 0.5


def test_oracle_is_refused_outside_eval():
    import pytest

    from emoe.eval import Setup, build
    for name in ("oracle", "oracle-q48"):
        with pytest.raises(ValueError, match="only `emoe eval`"):
            build(name, Setup(_profile(), {}))
