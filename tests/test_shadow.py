"""Low-bit shadow copies: quantisation error and bytes, the budget with shadows (never exceeded; every
expert is resident or shadowed, never both), refusals change nothing, and the Shadow miss policy in the
engine (closer to all-resident than rerouting at the same bytes)."""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from emoe.cache import BudgetError, ExpertCache
from emoe import quant as quant_mod
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

    def read_packed(self, layer, expert):
        return self.read(layer, expert), lambda ts: ts


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


def test_int4_fits_offsets_by_least_squares():
    """int4 copies are asymmetric and refined past the group's range: on skewed groups (a SiLU-gated
    projection's are) their error is below both the range fit's and symmetric absmax's; constant and all-zero
    groups come back exactly, with no NaN."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 256, generator=g).exp() * 0.01  # skewed, every group positive
    x = w.view(64, -1, 32)

    def err(scale, lo):
        u = ((x - lo) / scale).round().clamp(0, 15)
        return float((u * scale + lo - x).norm() / x.norm())
    lo, hi = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)
    absmax = x.abs().amax(-1, keepdim=True) / 7
    sym = float(((x / absmax).round().clamp(-7, 7) * absmax - x).norm() / x.norm())
    fitted = err(*quant_mod.fit_int4(x))
    assert fitted < 0.97 * err((hi - lo) / 15, lo) and fitted < 0.6 * sym
    assert float((dequantize(quantize(w, 4)) - w).norm() / w.norm()) < 1.02 * fitted  # (fp16 scale and zero)
    flat = torch.zeros(64, 64)
    flat[:, 32:] = 0.25
    q = quantize(flat, 4)
    assert torch.equal(dequantize(q), flat) and q.zero is not None


@pytest.mark.parametrize("kernel", [False, True])
def test_copies_take_their_layouts_group_at_a_symmetric_copys_bytes(kernel):
    """Portable int4 copies hold an offset per 64 values, kernel ones per 32 (the kernel's zero is paid anyway):
    either way no more bytes than a symmetric copy per 32 took, budgeted exactly, with less error."""
    class Store(RandStore):
        def __init__(self):
            g = torch.Generator().manual_seed(1)
            self.w = {(0, e): (torch.randn(64, 128, generator=g).exp() * 0.01, torch.randn(64, 128, generator=g) * 0.02,
                               torch.randn(128, 64, generator=g) * 0.02) for e in range(2)}
            self.reads = 0
    if kernel and not quant_mod.kernel_fits((64, 128), 32):
        pytest.skip("no CPU int4 kernel in this torch")
    store = Store()
    cache = ExpertCache(store, 10**6, "cpu", torch.float32, 1, 2, 3 * 64 * 128, kernel=kernel)
    cache.enable_shadow([0], 4, hi_bits=8)
    assert cache.kernel == kernel and cache._groups == {4: 32 if kernel else 64, 8: 32}
    symmetric = sum(64 * 128 // 2 + 64 * 128 // 32 * (4 if kernel else 2) for _ in range(3))
    assert cache._qcost[4] == symmetric
    for bits in (4, 8):
        copy = cache._copy((0, 1), bits)
        assert sum(t.nbytes for t in copy) == cache._qcost[bits]
    for t, w in zip(cache._copy((0, 1), 4), store.w[(0, 1)]):
        x = w.view(w.shape[0], -1, 32)
        scale = x.abs().amax(-1, keepdim=True) / 7
        sym = float(((x / scale).round().clamp(-7, 7) * scale - x).norm() / x.norm())
        assert float((dequantize(t) - w).norm() / w.norm()) < 0.95 * sym


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
        assert cache.levels_held.tolist() == [[cache.level((l, e)) for e in range(EXPERTS)] for l in range(LAYERS)]
        assert cache.used_bytes == len(model) * EB + (SLOTS - len(model)) * SB <= budget
    for l in range(LAYERS):  # a shadow approximates the expert it stands for, resident or not
        for e in range(EXPERTS):
            got = cache.get(l, e) if (l, e) in cache else [dequantize(t) for t in cache.approx(l, e)]
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
    slots = len(sh.cfg.moe_layers) * sh.cfg.num_experts
    assert len(sh.cache._shadow) + len(sh.cache) == slots
    assert sh.store.stats.reads == 1 + slots  # a shape probe, then each expert once: no copy made to be dropped
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
    with pytest.raises(ValueError, match="-q4 replaces rerouting"):
        build("lru-q4", s)
    from emoe.policies import Host
    assert known("emoe-a-sticky-host") and known("popular-host") and not known("q4-host")
    pol, res = build("popular-host", s)
    assert isinstance(pol, Host) and res is not None
    with pytest.raises(ValueError, match="-host replaces rerouting"):
        build("lru-host", s)
    from emoe.policies import Auto
    pol, res = build("task-static-auto", s)
    assert known("emoe-a-auto") and type(pol) is Auto and pol.min_tokens is None and res is not None


SB8 = sum(qbytes(tuple(t.shape), 8, 32) for t in RandStore().w[(0, 0)])
COST = {0: 0, 4: SB, 8: SB8, 16: EB}
level_rows = st.dictionaries(st.integers(0, LAYERS - 1), st.lists(st.sampled_from([0, 4, 8, 16]), min_size=EXPERTS,
                                                                  max_size=EXPERTS), max_size=LAYERS)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(budget=st.integers(0, SLOTS * EB), fill=st.booleans(), plans=st.lists(level_rows, max_size=8))
def test_precision_plans_fit_or_change_nothing(budget, fill, plans):
    from emoe.cache import FULL, Plan
    store = RandStore()
    cache = ExpertCache(store, budget, "cpu", torch.float32, LAYERS, EXPERTS, NUMEL)
    if fill and SLOTS * SB > budget:
        with pytest.raises(BudgetError):
            cache.enable_shadow(list(range(LAYERS)), 4, hi_bits=8)
        return
    cache.enable_shadow(list(range(LAYERS)), 4, hi_bits=8, fill=fill)
    model = {(l, e): 4 if fill else 0 for l in range(LAYERS) for e in range(EXPERTS)}
    for levels in plans:
        new = dict(model) | {(l, e): v for l, lv in levels.items() for e, v in enumerate(lv)}
        before = ({k: cache.level(k) for k in model}, cache.used_bytes)
        if sum(COST[v] for v in new.values()) > budget:
            with pytest.raises(BudgetError):
                cache.set_resident(Plan(levels))
            assert ({k: cache.level(k) for k in model}, cache.used_bytes) == before
        else:
            cache.set_resident(Plan(levels))
            model = new
        assert {k: cache.level(k) for k in model} == model
        assert cache.levels_held.tolist() == [[model[(l, e)] for e in range(EXPERTS)] for l in range(LAYERS)]
        assert cache.used_bytes == sum(COST[v] for v in model.values()) <= budget
        assert torch.equal(cache.mask, torch.tensor([[model[(l, e)] == FULL for e in range(EXPERTS)]
                                                     for l in range(LAYERS)]))
        assert torch.equal(cache.avail, torch.tensor([[model[(l, e)] > 0 for e in range(EXPERTS)]
                                                      for l in range(LAYERS)]))
    for (l, e), v in model.items():  # each level holds that expert's weights, as exactly as its bits allow
        if v:
            got = cache.get(l, e) if v == FULL else [dequantize(t) for t in cache.approx(l, e)]
            for a, b in zip(got, store.w[(l, e)]):
                assert float((a - b).norm() / b.norm()) < {4: 0.2, 8: 0.02, 16: 1e-6}[v]


def test_plan_levels_buys_copies_before_precision():
    """Greedy by error removed per byte, with int4/int8/full priced as on a bf16 GPU (0.281/0.516/1)."""
    from emoe.cache import Levels
    from emoe.loader import plan_levels
    N = torch.tensor([[5.0, 1.0, 0.0, 3.0], [0.0, 4.0, 2.0, 0.5]])
    pop = torch.ones(2, 4)

    def plan(budget, N=N, **kw):
        return plan_levels(N, Levels(budget, {0: 0, 4: 281, 8: 516, 16: 1000}, top_k=2), [0, 1], pop, **kw).levels

    # int4 copies of each layer's top-2; the 235 bytes left raise the busiest expert to int8
    assert plan(4 * 281 + 235) == {0: [8, 0, 0, 4], 1: [0, 4, 4, 0]}
    # int8 for every expert expecting tokens; an idle one gets a copy before anyone gets a full one...
    assert plan(6 * 516 + 300) == {0: [8, 8, 4, 8], 1: [0, 8, 8, 8]}
    # ...unless a full copy fits: it removes more expected error than a copy nobody is expected to use
    assert plan(6 * 516 + 2 * 484) == {0: [16, 8, 0, 8], 1: [0, 16, 8, 8]}
    with pytest.raises(BudgetError, match="top-2"):
        plan(4 * 281 - 1)
    for b in (0, 1200, 2500, 5000, 9000):  # never over budget
        lv = plan(b + 4 * 281)
        assert sum({0: 0, 4: 281, 8: 516, 16: 1000}[v] for row in lv.values() for v in row) <= b + 4 * 281

    class Held:  # stickiness: a level an expert holds is worth (1 + h)x
        levels_held = torch.tensor([[8, 0, 0, 4], [0, 4, 4, 0]])
    N2 = torch.tensor([[5.0, 1.0, 3.5, 3.0], [0.0, 4.0, 2.0, 0.5]])
    assert plan(4 * 281 + 235, N2)[0] == [8, 0, 4, 0]
    assert plan(4 * 281 + 235, N2, cache=Held(), stickiness=1.0)[0] == [8, 0, 0, 4]


def test_bad_plans_are_refused():
    from emoe.cache import Plan
    cache = ExpertCache(RandStore(), SLOTS * EB, "cpu", torch.float32, LAYERS, EXPERTS, NUMEL)
    cache.enable_shadow(list(range(LAYERS)), 4)
    with pytest.raises(ValueError, match="one of"):
        cache.set_resident(Plan({0: [8, 0, 0, 0]}))  # no int8 copies in this cache
    with pytest.raises(ValueError, match="one of"):
        cache.set_resident(Plan({0: [4, 4]}))
    assert len(cache) == 0 and cache.used_bytes == SLOTS * SB
    with pytest.raises(ValueError, match="must exceed"):
        ExpertCache(RandStore(), SLOTS * EB, "cpu", torch.float32, LAYERS, EXPERTS, NUMEL).enable_shadow([0, 1], 8, 4)


def test_ram_slow_tier_keeps_copies_so_level_changes_do_not_requantise():
    from emoe.cache import Plan
    store = RandStore()
    store.tier = "ram"
    cache = ExpertCache(store, SLOTS * EB, "cpu", torch.float32, LAYERS, EXPERTS, NUMEL)
    cache.enable_shadow(list(range(LAYERS)), 4, hi_bits=8)
    start = store.reads
    assert start == 1 + 2 * SLOTS  # the shape probe, then each expert once per precision
    cache.set_resident(Plan({0: [8, 16, 4, 4]}))
    assert store.reads == start + 1  # the int8 copy existed; the full expert is loaded
    cache.set_resident(Plan({0: [4, 4, 4, 4]}))
    cache.set_resident(Plan({0: [8, 4, 4, 4]}))
    assert store.reads == start + 1 and cache.level((0, 0)) == 8 and cache.level((0, 1)) == 4
    assert cache.used_bytes == SB8 + 7 * SB


def test_quantize_writes_copies_the_engine_reads_instead_of_quantising(tiny_mixtral, tmp_path, one_thread):
    import shutil

    from emoe.cli import main
    from emoe.engine import Engine, EngineConfig
    from emoe.policies import Shadow
    from emoe.copies import copies_path
    from tiny import make_tiny
    model = tmp_path / "m"
    shutil.copytree(tiny_mixtral, model)
    main(["quantize", "--model", str(model)])
    assert copies_path(model, 4).is_file() and copies_path(model, 8).is_file()

    def engine(m):
        return Engine(EngineConfig(str(m), budget=0.6, miss_policy="reroute"), policy=Shadow(4, hi_bits=8))
    made, read = engine(tiny_mixtral), engine(model)
    slots = len(made.cfg.moe_layers) * made.cfg.num_experts
    assert made.store.stats.reads == 1 + slots  # quantised from the slow tier at startup
    assert read.store.stats.reads <= 3 + len(read.cache) < 1 + slots  # full experts and two identity checks
    assert set(read.cache._shadow) == set(made.cache._shadow)
    for key, q in read.cache._shadow.items():
        for a, b in zip(q, made.cache._shadow[key]):
            assert a.bits == b.bits == 4 and torch.equal(a.data, b.data) and torch.equal(a.scale, b.scale)
            assert a.zero is not None and torch.equal(a.zero, b.zero)  # the offsets travel in the file
    other = make_tiny("mixtral", tmp_path / "o", seed=1)  # same layout, other weights
    shutil.copytree(model / "shadows", other / "shadows")
    with pytest.raises(ValueError, match="other weights"):
        engine(other)
    (other / "shadows" / "int4-g32.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match="not a readable copies file"):
        engine(other)
    with pytest.raises(SystemExit, match="bits"):
        main(["quantize", "--model", str(model), "--bits", "3"])


def test_quantize_writes_each_layouts_int4_group_and_engines_read_their_own(tmp_path, one_thread, capsys):
    """`emoe quantize --layout portable` writes int4 per 64 (int4-g64), `--layout kernel` per 32; an engine reads the
    file of its own layout's group and quantises nothing of that precision at startup."""
    from emoe.cli import main
    from emoe.engine import Engine, EngineConfig
    from emoe.policies import Shadow
    from emoe.copies import copies_path
    from tiny import make_tiny
    model = make_tiny("mixtral", tmp_path / "m", intermediate_size=64)  # rows of 64 values: both groups divide them
    main(["quantize", "--model", str(model), "--bits", "4", "--layout", "portable"])
    assert copies_path(model, 4, 64).is_file() and not copies_path(model, 4, 32).exists()
    if quant_mod.kernel_fits((64, 64), 32):  # the kernel layout finds only the portable file: said, then quantised
        eng = Engine(EngineConfig(str(model), budget=0.6, miss_policy="reroute", device="cpu"), policy=Shadow(4))
        assert 4 not in eng.cache.copy_files and "--layout kernel" in capsys.readouterr().err
    main(["quantize", "--model", str(model), "--bits", "4", "--layout", "kernel"])
    assert copies_path(model, 4, 32).is_file()
    for kernel in (False, True):
        eng = Engine(EngineConfig(str(model), budget=0.6, miss_policy="reroute", qkernel=kernel), policy=Shadow(4))
        want = 64 if not eng.cache.kernel else 32
        assert eng.cache._groups[4] == want and eng.cache.copy_files[4].group == want
        if not eng.cache.kernel:
            assert all(t.group == 64 and t.zero is not None for q in eng.cache._shadow.values() for t in q)


def test_copies_files_from_before_offsets_still_load(tmp_path, one_thread):
    """A copies file written before int4 held offsets (no `.zero` tensors) reads as the symmetric copies it holds."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from emoe.cli import main
    from emoe.engine import Engine, EngineConfig
    from emoe.policies import Shadow
    from emoe.copies import copies_path
    from tiny import make_tiny
    model = make_tiny("mixtral", tmp_path / "m")
    main(["quantize", "--model", str(model), "--bits", "4"])
    path = copies_path(model, 4, 32)
    with safe_open(str(path), framework="pt") as f:
        meta, kept = f.metadata(), {k: f.get_tensor(k) for k in f.keys() if not k.endswith(".zero")}
    save_file(kept, str(path), metadata=meta)
    eng = Engine(EngineConfig(str(model), budget=0.6, miss_policy="reroute", qkernel=False), policy=Shadow(4))
    q = eng.cache.copy_files[4].get((eng.cfg.moe_layers[0], 0))[0]
    assert q.zero is None
    u = torch.stack((q.data & 15, q.data >> 4), -1).view(q.shape).float()
    scale = q.scale.float().repeat_interleave(q.group, 1)
    assert torch.equal(dequantize(q), (u - 8) * scale)


def test_paired_difference_intervals():
    from emoe.eval import paired_difference, versus_table
    n = 60
    g = torch.Generator().manual_seed(0)
    base = (torch.rand(n, generator=g) * 0.5 + 0.25).tolist()
    better = [min(1.0, x + 0.2) for x in base]
    noisy = [x + float(e) for x, e in zip(base, torch.randn(n, generator=g) * 0.05)]

    def rec(name, sims, hits):
        return {"policy": name, "budget": 0.4, "per_request": {"similarity": sims, "agree": [[h, 10] for h in hits]}}
    a, b, c = rec("a", better, [9] * n), rec("b", base, [7] * n), rec("c", noisy, [7] * n)
    d, (lo, hi) = paired_difference(a, b)
    assert 0.15 < lo <= d <= hi < 0.21  # a consistent gain: the interval excludes 0
    d, (lo, hi) = paired_difference(c, b)
    assert lo < 0 < hi  # noise: the interval straddles 0
    d, (lo, hi) = paired_difference(a, b, "agree")
    assert d == pytest.approx(0.2) and lo == pytest.approx(0.2) and hi == pytest.approx(0.2)
    with pytest.raises(ValueError, match="different streams"):
        paired_difference(a, rec("e", base[:10], [7] * 10))
    text = versus_table([a, b, c], "b")
    assert "a " in text and "c " in text and "+0.2" in text and "hit rate" not in text  # records without hit counts
    # hit rate: each batch's (hits, routed) on its first request, the rest (0, 0); a ratio of sums
    for r, per in ((a, [80, 100]), (b, [70, 100])):
        r["per_request"]["hits"] = [per if i % 4 == 0 else [0, 0] for i in range(n)]
    d, (lo, hi) = paired_difference(a, b, "hit")
    assert d == pytest.approx(0.1) and lo == pytest.approx(0.1) and hi == pytest.approx(0.1)
    assert "hit rate +0.100 [+0.100, +0.100]" in versus_table([a, b], "b")
    with pytest.raises(ValueError, match="per-batch hit counts"):
        paired_difference(a, c, "hit")


kernel = pytest.mark.skipif(not quant_mod.kernel_fits((64, 64), 32), reason="no CPU int4 kernel in this torch")


@kernel
@pytest.mark.parametrize("bits", [4, 8])
def test_kernel_layout_matches_torch_and_round_trips(bits):
    """KTensor packs as aten's own converter does under AVX512 (its 64-row blocks; under AVX2 aten packs 32, and
    the forms keep theirs), unpacks exactly, costs the same bytes, and multiplies like the dequantised copy up
    to the kernel's bf16 activations."""
    g = torch.Generator().manual_seed(bits)
    w = torch.randn(128, 96, generator=g) * 0.05
    q = quantize(w, bits, 32)
    k = quant_mod.to_kernel(q)
    for u, p in zip(quant_mod._nibbles(q), k.planes):
        aten = torch.ops.aten._convert_weight_to_int4pack_for_cpu(u.to(torch.int32), 1)
        assert torch.equal(p, aten) == quant_mod.kernel_reads_forms()
    back = quant_mod.from_kernel(k)
    assert torch.equal(back.data, q.data)  # values exact; scales rounded to the kernel's bf16
    assert float((dequantize(k) - dequantize(q)).norm() / dequantize(q).norm()) < 4e-3
    assert k.nbytes == quant_mod.kbytes((128, 96), bits, 32)
    assert q.nbytes == quant_mod.qbytes((128, 96), bits, 32) == k.nbytes - (128 * 3 * 6 if bits == 8 else 0)
    x = torch.randn(7, 96, generator=g)
    want = x @ dequantize(q).T
    for got in (quant_mod.linear(x, k), quant_mod.linear(x, q)):
        assert got.dtype == x.dtype and float((got - want).norm() / want.norm()) < 1e-2
    w2 = [quantize(torch.randn(*shape, generator=g) * 0.05, bits, 32) for shape in ((128, 64), (128, 64), (64, 128))]
    x = torch.randn(5, 64, generator=g)
    want = quant_mod.swiglu(x, *w2)                   # dequantised, fp32
    got = quant_mod.swiglu(x, *map(quant_mod.to_kernel, w2))  # wholly in bf16 on the kernel
    assert got.dtype == x.dtype and float((got - want).norm() / want.norm()) < 2e-2


def test_kernel_is_skipped_where_the_layout_does_not_fit():
    assert not quant_mod.kernel_fits((96, 64), 32) and not quant_mod.kernel_fits((128, 96), 48)


@kernel
def test_engine_runs_copies_on_the_kernel_like_dequantised(one_thread):
    """On the embedded model (384×256 experts: the kernel's layout fits; the tiny test models' do not)."""
    from emoe import default_model_dir
    from emoe.engine import Engine, EngineConfig
    from emoe.policies import Shadow
    prompt, cont = list(range(3, 40)), list(range(200, 232))
    got = {}
    for on in (True, False):
        eng = Engine(EngineConfig(default_model_dir(), budget=0.4, qkernel=on, experts_on="ram", device="cpu"),
                     policy=Shadow(8))  # the CPU kernel: on a GPU, copies keep the portable layout
        kinds = {type(t).__name__ for q in eng.cache._shadow.values() for t in q}
        assert kinds == ({"KTensor"} if on else {"QTensor"})
        got[on] = eng.score(prompt, cont)
        assert eng.cache.stats.shadow_uses > 0
    assert float((got[True] - got[False]).abs().max()) < 0.05 * float(got[False].abs().max())


@kernel
def test_copies_from_files_land_in_the_kernel_layout(tmp_path, one_thread):
    """`emoe quantize`'s files (portable layout) feed the kernel layout exactly as copies made at startup."""
    import shutil

    from emoe import default_model_dir
    from emoe.cli import main
    from emoe.engine import Engine, EngineConfig
    from emoe.policies import Shadow
    plain, model = tmp_path / "plain", tmp_path / "m"
    for d in (plain, model):
        shutil.copytree(default_model_dir(), d, ignore=shutil.ignore_patterns("shadows", "profile"))
    main(["quantize", "--model", str(model), "--bits", "4", "--layout", "kernel"])  # (auto: portable where CUDA is)

    def engine(m):
        return Engine(EngineConfig(str(m), budget=0.4, experts_on="disk", device="cpu"), policy=Shadow(4))
    made, read = engine(plain), engine(model)
    assert read.store.stats.reads < made.store.stats.reads
    assert set(read.cache._shadow) == set(made.cache._shadow)
    for key, q in read.cache._shadow.items():
        for a, b in zip(q, made.cache._shadow[key]):
            assert type(a).__name__ == "KTensor" and all(torch.equal(x, y) for x, y in zip(a.planes, b.planes))
            assert all(torch.equal(x, y) for x, y in zip(a.sz, b.sz))
