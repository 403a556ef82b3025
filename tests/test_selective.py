"""The selective miss policy: load only where a token leans on the missing expert, reroute the rest."""
import pytest
import torch

from emoe.policies import Selective, make_policy


class FakeCache:
    def __init__(self, resident_row):
        self.mask = torch.tensor([resident_row])


def test_selective_loads_heavy_misses_and_reroutes_light_ones():
    cache = FakeCache([True, True, False, False])   # experts 0, 1 resident in layer 0
    probs = torch.tensor([[0.05, 0.15, 0.70, 0.10],   # first choice 2 missing (weight 0.82 of top-2): exact
                          [0.50, 0.05, 0.05, 0.40],   # second choice 3 missing (0.44 < 0.5): rerouted to 0, 1
                          [0.60, 0.30, 0.05, 0.05]])  # all resident: untouched
    weights, ids = torch.topk(probs, 2, dim=-1)
    w, i = Selective(0.5).select(0, None, probs, weights, ids, cache)
    assert i[0].tolist() == [2, 1] and torch.equal(w[0], weights[0])
    assert sorted(i[1].tolist()) == [0, 1] and float(w[1].sum()) == pytest.approx(float(weights[1].sum()))
    assert torch.equal(i[2], ids[2])
    # threshold 0 is LRU (nothing rerouted), above 1 is pure reroute
    _, i0 = Selective(0.0).select(0, None, probs, weights, ids, cache)
    assert torch.equal(i0, ids)
    _, i1 = Selective(1.0).select(0, None, probs, weights, ids, cache)
    assert cache.mask[0][i1[:2]].all()
    with pytest.raises(ValueError, match="threshold"):
        Selective(1.5)
    assert make_policy("selective", threshold=0.7).threshold == 0.7


def test_selective_fetch_loads_within_budget(tiny_mixtral):
    from emoe.engine import Engine, EngineConfig, SamplingParams
    pol = Selective(0.5)
    eng = Engine(EngineConfig(str(tiny_mixtral), budget=0.5, miss_policy="reroute"), policy=pol)
    before = eng.cache.stats.loads
    eng.generate(["hello there", "a b c d"], SamplingParams(max_tokens=6))
    assert eng.cache.used_bytes <= eng.cache.budget_bytes
    assert eng.cache.stats.loads > before  # first-choice misses were loaded (never over budget)
