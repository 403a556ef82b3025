"""ExpertCache: the byte budget is never overshot, refused moves change nothing, the mask mirrors the
resident set, set_resident moves only the difference, and the counters add up."""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from emoe.cache import BudgetError, ExpertCache

LAYERS, EXPERTS, I, H = 3, 4, 2, 3
NUMEL = 3 * I * H                     # gate [I,H] + up [I,H] + down [H,I]
EB = NUMEL * 4                        # float32 bytes per expert
TOTAL = LAYERS * EXPERTS * EB


class FakeStore:
    """The cache calls store.read / read_packed(layer, expert); values encode the key so reads can be checked."""

    def __init__(self):
        self.reads = []

    def read(self, layer, expert):
        self.reads.append((layer, expert))
        v = float(layer * 100 + expert)
        return (torch.full((I, H), v), torch.full((I, H), v + 0.25), torch.full((H, I), v + 0.5))

    def read_packed(self, layer, expert):
        return self.read(layer, expert), lambda ts: ts


def make_cache(budget):
    store = FakeStore()
    return store, ExpertCache(store, budget, "cpu", torch.float32, LAYERS, EXPERTS, NUMEL)


def expected_mask(keys):
    m = torch.zeros(LAYERS, EXPERTS, dtype=torch.bool)
    for l, e in keys:
        m[l, e] = True
    return m


def snapshot(cache):
    s = cache.stats
    return set(cache.resident()), (s.loads, s.evictions, s.bytes_loaded)


# layer/expert ids mostly in range, sometimes one outside it on either side
layer_ids = st.integers(-1, LAYERS)
expert_ids = st.integers(-1, EXPERTS)
ops = st.one_of(
    st.tuples(st.just("admit"), layer_ids, expert_ids),
    st.tuples(st.just("evict"), st.integers(0, LAYERS - 1), st.integers(0, EXPERTS - 1)),
    st.tuples(st.just("set"), st.dictionaries(st.integers(0, LAYERS - 1),
                                              st.lists(st.integers(0, EXPERTS - 1), max_size=EXPERTS + 1),
                                              max_size=LAYERS)),
    st.tuples(st.just("set_bad"), st.dictionaries(layer_ids, st.lists(expert_ids, max_size=3), max_size=3)),
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(budget=st.integers(0, TOTAL + EB), seq=st.lists(ops, max_size=25))
def test_budget_property(budget, seq):
    store, cache = make_cache(budget)
    model: set[tuple[int, int]] = set()  # the resident set we expect
    cap = budget // EB
    assert cache.capacity == cap
    for op in seq:
        before_keys, before_counts = snapshot(cache)
        assert before_keys == model
        kind = op[0]
        if kind == "admit":
            _, l, e = op
            if not (0 <= l < LAYERS and 0 <= e < EXPERTS):
                with pytest.raises(KeyError):
                    cache.admit(l, e)
            elif (l, e) in model:
                cache.admit(l, e)
            elif len(model) + 1 > cap:
                with pytest.raises(BudgetError):
                    cache.admit(l, e)
            else:
                cache.admit(l, e)
                model.add((l, e))
        elif kind == "evict":
            _, l, e = op
            cache.evict(l, e)
            model.discard((l, e))
        else:
            plan = op[1]
            # every listed expert is validated before anything moves (a layer listed with no experts is
            # not looked at: for an out-of-range layer that is a no-op)
            in_range = all(0 <= l < LAYERS and 0 <= e < EXPERTS for l, ids in plan.items() for e in ids)
            new = {k for k in model if k[0] not in plan} | {(l, e) for l, ids in plan.items() for e in ids}
            if not in_range:
                with pytest.raises(KeyError):
                    cache.set_resident(plan)
            elif len(new) > cap:
                with pytest.raises(BudgetError):
                    cache.set_resident(plan)
            else:
                loaded, evicted = cache.set_resident(plan)
                assert (loaded, evicted) == (len(new - model), len(model - new))
                s = cache.stats
                assert s.loads - before_counts[0] == len(new - model)
                assert s.evictions - before_counts[1] == len(model - new)
                model = new
        keys, counts = snapshot(cache)
        if keys == before_keys:  # refused or no-op: nothing moved, nothing counted
            assert counts == before_counts
        # invariants after every operation
        assert keys == model
        assert len(cache) == len(model)
        assert cache.used_bytes == len(model) * EB
        assert cache.used_bytes <= cache.budget_bytes == budget
        assert torch.equal(cache.mask, expected_mask(model))
        assert torch.equal(cache.levels_held, expected_mask(model).long() * 16)  # FULL where resident, else none
        s = cache.stats
        assert s.loads - s.evictions == len(model)
        assert s.bytes_loaded == s.loads * EB
        assert len(store.reads) == s.loads
        for l in range(LAYERS):
            assert cache.resident(l) == sorted(e for (ll, e) in model if ll == l)
    for l, e in model:  # resident weights are what the store gave for that expert
        gate, up, down = cache.get(l, e)
        v = float(l * 100 + e)
        assert gate.shape == (I, H) and down.shape == (H, I)
        assert torch.all(gate == v) and torch.all(up == v + 0.25) and torch.all(down == v + 0.5)


def test_refused_set_resident_is_all_or_nothing():
    store, cache = make_cache(5 * EB)
    cache.set_resident({0: [0, 1], 1: [2]})
    before = snapshot(cache), cache.mask.clone(), list(store.reads)
    with pytest.raises(BudgetError):
        cache.set_resident({1: [0, 1, 2, 3]})  # 2 kept in layer 0 + 4 = 6 > 5
    with pytest.raises(KeyError):
        cache.set_resident({1: [0], 2: [EXPERTS]})  # the valid part must not be applied either
    with pytest.raises(KeyError):
        cache.set_resident({LAYERS: [0]})
    assert snapshot(cache) == before[0]
    assert torch.equal(cache.mask, before[1])
    assert store.reads == before[2]


def test_set_resident_moves_only_the_difference():
    store, cache = make_cache(TOTAL)
    assert cache.set_resident({0: [0, 1, 2], 1: [0, 1], 2: [3]}) == (6, 0)
    store.reads.clear()
    stats0 = (cache.stats.loads, cache.stats.evictions, cache.stats.bytes_loaded)
    layer2_weights = cache.get(2, 3)
    loaded, evicted = cache.set_resident({0: [1, 2, 3], 1: [1, 0]})  # layer 1 the same (any order)
    assert (loaded, evicted) == (1, 1)
    assert store.reads == [(0, 3)]  # only the new expert is read
    assert cache.stats.loads - stats0[0] == 1
    assert cache.stats.evictions - stats0[1] == 1
    assert cache.stats.bytes_loaded - stats0[2] == EB
    assert cache.resident(0) == [1, 2, 3] and cache.resident(1) == [0, 1] and cache.resident(2) == [3]
    assert cache.get(2, 3) is layer2_weights  # untouched layer: same tensors, not reloaded
    # an empty list empties that layer only
    assert cache.set_resident({0: []}) == (0, 3)
    assert cache.resident(0) == [] and cache.resident(1) == [0, 1]
    assert not cache.mask[0].any()


def test_admit_evict_edges():
    store, cache = make_cache(EB)
    for l, e in [(0, EXPERTS), (0, -1), (LAYERS, 0), (-1, 0)]:
        with pytest.raises(KeyError):
            cache.admit(l, e)
    assert len(cache) == 0 and not cache.mask.any() and store.reads == []
    cache.admit(1, 2)
    cache.admit(1, 2)  # already resident: no second read
    assert store.reads == [(1, 2)] and cache.stats.loads == 1
    with pytest.raises(BudgetError):
        cache.admit(1, 3)
    cache.evict(0, 0)  # not resident: nothing counted
    assert cache.stats.evictions == 0
    cache.evict(1, 2)
    assert cache.stats.evictions == 1 and not cache.mask.any()


def test_negative_budget_raises():
    with pytest.raises(BudgetError):
        make_cache(-1)


def test_zero_budget_holds_nothing():
    _, cache = make_cache(0)
    assert cache.capacity == 0
    with pytest.raises(BudgetError):
        cache.admit(0, 0)
    assert cache.set_resident({0: []}) == (0, 0)


def test_failed_read_mid_plan_leaves_masks_as_held():
    """set_resident writes the masks once, at its end: a read failing partway must still leave them as held."""
    store, cache = make_cache(TOTAL)
    cache.set_resident({0: [0], 1: [0]})
    read = store.read

    def flaky(layer, expert):
        if (layer, expert) == (1, 2):
            raise OSError("disk gone")
        return read(layer, expert)
    store.read = flaky
    with pytest.raises(OSError):
        cache.set_resident({0: [1], 1: [2]})  # evicts (0,0) and (1,0), loads (0,1), fails on (1,2)
    assert cache.resident() == [(0, 1)]
    assert torch.equal(cache.mask, expected_mask(cache.resident()))
    assert torch.equal(cache.avail, cache.mask)
