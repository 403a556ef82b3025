"""adaptive.Adapt: the residency plan or LRU, whichever the recent routing's ghosts say would have hit more."""
import pytest
import torch

from emoe.adaptive import Adapt
from emoe.cache import ExpertCache
from emoe.engine import Engine, EngineConfig, SamplingParams


class _Store:
    tier, expert_nbytes = "ram", 0

    def read_packed(self, layer, expert):
        return (torch.full((2, 2), float(expert)),) * 3, (lambda ts: ts)

    def read_host(self, layer, expert):
        return (torch.full((2, 2), float(expert)),) * 3


def _cache(capacity=4, layers=2, experts=16):
    return ExpertCache(_Store(), capacity * 4 * 4 * 3, "cpu", torch.float32, layers, experts, 12)


def _route(policy, cache, layer, experts):
    ids = torch.tensor([experts])
    policy.observe(layer, ids, cache)
    for e in experts:
        policy.fetch(layer, e, cache)


def test_it_turns_to_lru_when_tokens_share_experts_the_plan_left_out_and_back():
    cache = _cache()
    p = Adapt(plan={0: [0, 1], 1: [0, 1]}, window=2, margin=0.1)
    p.prepare(cache, [0, 1])
    assert p.mode == "plan" and set(cache.resident()) == {(0, 0), (0, 1), (1, 0), (1, 1)}
    for _ in range(8):  # the same two unplanned experts, token after token: LRU's ghost hits them all
        _route(p, cache, 0, [5, 6])
    assert p.mode == "lru" and p.switches[0][1] == "lru"
    for _ in range(4):  # in LRU mode a miss is loaded, evicting the least recently used
        _route(p, cache, 1, [9, 10])
    assert {(1, 9), (1, 10)} <= set(cache.resident()) and cache.used_bytes <= cache.budget_bytes
    assert not p.follows({0: [0, 1], 1: [0, 1]})  # the engine leaves the plan unapplied while LRU leads
    for i in range(16):  # the plan's experts a layer at a time, each beside a one-off: LRU keeps the one-offs in vain
        _route(p, cache, i % 2, [0, 1, 4 + i % 12])
    assert p.mode == "plan" and [m for _, m in p.switches] == ["lru", "plan"]
    assert {(0, 0), (0, 1), (1, 0), (1, 1)} <= set(cache.resident())  # the plan restored at the switch
    loads = cache.stats.loads
    _route(p, cache, 1, [7])
    assert cache.stats.loads == loads and cache.stats.host_runs > 0  # plan mode: a miss runs where it lies
    with pytest.raises(ValueError, match="window"):
        Adapt(window=0)


def test_adapt_serves_the_ram_tiers_tokens_from_disk_forms(qwen_gguf_import, forms_cache_on):
    greedy = SamplingParams(max_tokens=8, ignore_eos=True)
    prompts = ["hello there", "the cat sat on"]
    want = Engine(EngineConfig(str(qwen_gguf_import), device="cpu", miss_policy="host", budget=0, experts_on="ram",
                               dense_blocks=True)).generate(prompts, greedy, chat=False)
    policy = Adapt(window=8)
    eng = Engine(EngineConfig(str(qwen_gguf_import), device="cpu", miss_policy="adapt", budget=0.5, experts_on="disk",
                              dense_blocks=True), policy=policy)
    got = eng.generate(prompts, greedy, chat=False)
    assert [r.output_ids for r in got] == [r.output_ids for r in want]
    assert eng.cache.used_bytes <= eng.cache.budget_bytes and policy._total > 0
