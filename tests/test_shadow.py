"""Low-bit shadow copies: quantisation error and bytes, the budget with shadows (never exceeded; every
expert is resident or shadowed, never both), refusals change nothing, and the Shadow miss policy in the
engine (closer to all-resident than rerouting at the same bytes)."""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from emoe.cache import BudgetError, ExpertCache
from emoe.quant import dequantize, qbytes, quantize

LAYERS, EXPERTS, I, H = 2, 4, 4, 6
NUMEL = 3 * I * H
EB = NUMEL * 4


class RandStore:
    def __init__(self):
        g = torch.Generator().manual_seed(0)
        self.w = {(l, e): (torch.randn(I, H, generator=g), torch.randn(I, H, generator=g), torch.randn(H, I, generator=g))
                  for l in range(LAYERS) for e in range(EXPERTS)}
        self.reads = 0

    def read(self, layer, expert):
        self.reads += 1
        return self.w[(layer, expert)]


SB = sum(qbytes(tuple(t.shape), 4, 32) for t in RandStore().w[(0, 0)])
SLOTS = LAYERS * EXPERTS


@pytest.mark.parametrize("bits,tol", [(8, 0.01), (4, 0.15)])
def test_quantize_round_trip_error_and_bytes(bits, tol):
    w = torch.randn(96, 256) * 0.02
    q = quantize(w, bits, 32)
    assert q.nbytes == qbytes((96, 256), bits, 32) < w.numel() * 4 * bits / 16
    assert float((dequantize(q) - w).norm() / w.norm()) < tol
    odd = quantize(w[:, :250], bits, 32)  # 32 does not divide 250: one scale per row
    assert odd.group == 250 and dequantize(odd).shape == (96, 250)
    with pytest.raises(ValueError, match="bits"):
        quantize(w, 3)


def test_enable_shadow_refusals_change_nothing():
    store = RandStore()
    cache = ExpertCache(store, SLOTS * SB - 1, "cpu", torch.float32, LAYERS, EXPERTS, NUMEL)
    with pytest.raises(BudgetError, match="int4 shadow"):
        cache.enable_shadow(list(range(LAYERS)), 4)
    assert cache.used_bytes == 0 and cache.shadow_bits == 0 and cache.capacity == (SLOTS * SB - 1) // EB
    cache.budget_bytes = SLOTS * SB + EB
    cache.admit(0, 0)
    with pytest.raises(RuntimeError, match="before any expert"):
        cache.enable_shadow(list(range(LAYERS)), 4)


ops = st.one_of(st.tuples(st.just("admit"), st.integers(0, LAYERS - 1), st.integers(0, EXPERTS - 1)),
                st.tuples(st.just("evict"), st.integers(0, LAYERS - 1), st.integers(0, EXPERTS - 1)),
                st.tuples(st.just("set"), st.dictionaries(st.integers(0, LAYERS - 1),
                                                          st.lists(st.integers(0, EXPERTS - 1), max_size=EXPERTS),
                                                          max_size=LAYERS)))


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(extra=st.integers(0, SLOTS * EB), seq=st.lists(ops, max_size=20))
def test_budget_with_shadows(extra, seq):
    store = RandStore()
    budget = SLOTS * SB + extra
    cache = ExpertCache(store, budget, "cpu", torch.float32, LAYERS, EXPERTS, NUMEL)
    cache.enable_shadow(list(range(LAYERS)), 4)
    cap = min(SLOTS, extra // (EB - SB))
    assert cache.capacity == cap
    model: set = set()
    for kind, *args in seq:
        if kind == "admit":
            key = tuple(args)
            if key not in model and len(model) + 1 > cap:
                with pytest.raises(BudgetError):
                    cache.admit(*key)
            else:
                cache.admit(*key)
                model.add(key)
        elif kind == "evict":
            cache.evict(*args)
            model.discard(tuple(args))
        else:
            plan = args[0]
            new = {k for k in model if k[0] not in plan} | {(l, e) for l, ids in plan.items() for e in ids}
            if len(new) > cap:
                with pytest.raises(BudgetError):
                    cache.set_resident(plan)
            else:
                cache.set_resident(plan)
                model = new
        assert set(cache.resident()) == model
        assert set(cache._shadow) == {(l, e) for l in range(LAYERS) for e in range(EXPERTS)} - model
        assert cache.used_bytes == len(model) * EB + (SLOTS - len(model)) * SB <= budget
    for l in range(LAYERS):  # a shadow approximates the expert it stands for, resident or not
        for e in range(EXPERTS):
            got = cache.get(l, e) if (l, e) in cache else cache.approx(l, e)
            for a, b in zip(got, store.w[(l, e)]):
                assert float((a - b).norm() / b.norm()) < 0.2


def test_shadow_policy_in_engine(tiny_mixtral, one_thread):
    from emoe.engine import Engine, EngineConfig
    from emoe.policies import Shadow
    ref = Engine(EngineConfig(str(tiny_mixtral), miss_policy="all"))
    prompt, cont = ref.codec.encode("the quick brown fox")[:6], list(range(5, 17))
    want = ref.score(prompt, cont)

    def err(eng):
        return float((eng.score(prompt, cont) - want).abs().max())

    budget = 0.35
    rr = Engine(EngineConfig(str(tiny_mixtral), budget=budget, miss_policy="reroute"))
    sh = Engine(EngineConfig(str(tiny_mixtral), budget=budget, miss_policy="reroute"), policy=Shadow(8))
    assert sh.cache.used_bytes <= sh.cache.budget_bytes == rr.cache.budget_bytes
    assert 0 < len(sh.cache) < len(rr.cache)  # the shadows take some of the bytes full experts had
    assert err(sh) < err(rr) / 4
    assert sh.cache.stats.shadow_uses > 0
    q8 = Engine(EngineConfig(str(tiny_mixtral), budget=budget, miss_policy="reroute"), policy=Shadow(8, full=False))
    assert len(q8.cache) == 0 and err(q8) < err(rr) / 4
    with pytest.raises(BudgetError, match="int8 shadow"):
        Engine(EngineConfig(str(tiny_mixtral), budget=0.1, miss_policy="reroute"), policy=Shadow(8))


def test_eval_names_shadowed_policies():
    from emoe.eval import Setup, build, known
    from emoe.policies import Shadow
    assert known("popular-q4") and known("emoe-a-sticky-q8") and known("q4")
    assert not known("popular-q3") and not known("nope-q4")

    class P:  # build only needs the profile for residency factories it does not call here
        pass
    s = Setup(P(), {})
    pol, res = build("q8", s)
    assert isinstance(pol, Shadow) and pol.shadow_bits == 8 and not pol.full and res is None
    pol, res = build("popular-q4", s)
    assert isinstance(pol, Shadow) and pol.full and res is not None
    with pytest.raises(ValueError, match="shadow copies replace rerouting"):
        build("lru-q4", s)


SB8 = sum(qbytes(tuple(t.shape), 8, 32) for t in RandStore().w[(0, 0)])
keysets = st.dictionaries(st.integers(0, LAYERS - 1), st.lists(st.integers(0, EXPERTS - 1), max_size=EXPERTS),
                          max_size=LAYERS)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(extra=st.integers(0, SLOTS * EB), plans=st.lists(st.tuples(keysets, keysets), max_size=8))
def test_two_level_plans_fit_or_change_nothing(extra, plans):
    from emoe.cache import Plan
    store = RandStore()
    budget = SLOTS * SB + extra
    cache = ExpertCache(store, budget, "cpu", torch.float32, LAYERS, EXPERTS, NUMEL)
    cache.enable_shadow(list(range(LAYERS)), 4, hi_bits=8)
    full_m, hi_m = set(), set()
    for full, hi in plans:
        f = {k for k in full_m if k[0] not in full} | {(l, e) for l, ids in full.items() for e in ids}
        h = ({k for k in hi_m if k[0] not in hi} | {(l, e) for l, ids in hi.items() for e in ids}) - f
        before = (set(cache.resident()), set(cache._hi), cache.used_bytes)
        if len(f) * EB + len(h) * SB8 + (SLOTS - len(f) - len(h)) * SB > budget:
            with pytest.raises(BudgetError):
                cache.set_resident(Plan(full, hi))
            assert (set(cache.resident()), set(cache._hi), cache.used_bytes) == before
        else:
            cache.set_resident(Plan(full, hi))
            full_m, hi_m = f, h
        assert set(cache.resident()) == full_m and cache._hi == hi_m
        for k, q in cache._shadow.items():  # every other expert has exactly one shadow, at its level
            assert k not in full_m and q[0].bits == (8 if k in hi_m else 4)
        assert len(cache._shadow) == SLOTS - len(full_m)
        assert cache.used_bytes == len(full_m) * EB + len(hi_m) * SB8 + (SLOTS - len(full_m) - len(hi_m)) * SB
        assert cache.used_bytes <= budget


def test_plan_levels_prefers_more_int8_copies_over_full_ones():
    from emoe.loader import plan_levels
    store = RandStore()
    cache = ExpertCache(store, SLOTS * SB + 3 * (SB8 - SB), "cpu", torch.float32, LAYERS, EXPERTS, NUMEL)
    cache.enable_shadow(list(range(LAYERS)), 4, hi_bits=8)
    N = torch.tensor([[5.0, 1.0, 0.0, 3.0], [0.0, 4.0, 2.0, 0.5]])
    pop = torch.ones(LAYERS, EXPERTS)
    plan = plan_levels(N, cache.levels(), [0, 1], pop)
    assert plan.full == {0: [], 1: []}  # three int8 copies fit, no full one
    assert plan.hi == {0: [0, 3], 1: [1]}
    cache.set_resident(plan)
    assert cache.used_bytes <= cache.budget_bytes
    # stickiness: a held int8 copy yields only to an expert expecting (1 + h)x its tokens
    N2 = torch.tensor([[5.0, 1.0, 3.5, 3.0], [0.0, 4.0, 2.0, 0.5]])
    assert plan_levels(N2, cache.levels(), [0, 1], pop, cache, stickiness=1.0).hi == {0: [0, 3], 1: [1]}
    assert plan_levels(N2, cache.levels(), [0, 1], pop).hi == {0: [0, 2], 1: [1]}
    # enough bytes for int8 everywhere: the rest raises the top experts to full precision
    rich = ExpertCache(store, SLOTS * SB8 + 2 * (EB - SB8), "cpu", torch.float32, LAYERS, EXPERTS, NUMEL)
    rich.enable_shadow(list(range(LAYERS)), 4, hi_bits=8)
    plan = plan_levels(N, rich.levels(), [0, 1], pop)
    assert plan.full == {0: [0], 1: [1]} and sum(map(len, plan.hi.values())) == SLOTS - 2
    rich.set_resident(plan)
    assert rich.used_bytes <= rich.budget_bytes and len(rich) == 2


def test_plan_with_hi_needs_hi_shadows():
    from emoe.cache import Plan
    cache = ExpertCache(RandStore(), SLOTS * EB, "cpu", torch.float32, LAYERS, EXPERTS, NUMEL)
    cache.enable_shadow(list(range(LAYERS)), 4)
    with pytest.raises(ValueError, match="hi_bits"):
        cache.set_resident(Plan({0: [1]}, {1: [2]}))
    assert len(cache) == 0
    with pytest.raises(ValueError, match="must exceed"):
        ExpertCache(RandStore(), SLOTS * EB, "cpu", torch.float32, LAYERS, EXPERTS, NUMEL).enable_shadow([0, 1], 8, 4)
