"""emoe.ckernel: kernel forms unpacked to bf16 W^T in C for many-row products (a prefill's), and the int4
kernel kept for few rows and wherever the routine cannot be built."""
import pytest
import torch

from emoe import ckernel, cstep, quant
from emoe.forms import codebook_form, int4_form, kernel_copy5, mxfp4_planes
from emoe.gguf_blocks import IQ4_VALUES, kernel_copy

pytestmark = pytest.mark.skipif(ckernel.library() is None, reason="no C compiler here")


def forms():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(192, 256, generator=g)
    u5 = torch.randint(0, 32, (128, 256), dtype=torch.uint8, generator=g)
    scale, minimum = torch.rand(128, 8, generator=g) * 0.1, torch.randn(128, 8, generator=g) * 0.1
    mx = torch.randint(-12, 13, (128, 256), generator=g)
    return {"int4": quant.to_kernel(quant.quantize(w, 4, 32)), "int8": quant.to_kernel(quant.quantize(w, 8, 32)),
            "int4 asymmetric": int4_form(w), "q5": kernel_copy5(u5, scale, minimum),
            "mxfp4": mxfp4_planes(mx, torch.full((128, 8), 0.25), codebook=False),
            "mxfp4 codebook": mxfp4_planes(mx, torch.full((128, 8), 0.25), codebook=True),
            "iq4 codebook": codebook_form(torch.tensor(IQ4_VALUES)[torch.randint(0, 16, (128, 256), generator=g)],
                                          torch.randn(128, 8, generator=g) * 0.01, IQ4_VALUES),
            "group 16": kernel_copy(u5 // 2, torch.rand(128, 16, generator=g) * 0.1, torch.randn(128, 16, generator=g) * 0.1,
                                    16)}


@pytest.mark.parametrize("name", list(forms()))
def test_unpacked_transpose_is_the_forms_matrix_in_bf16(name):
    """One plane: the matrix rounded once to bf16 (4-bit values times a scale lose nothing that matters
    there). Two planes (int8-class values): hi + lo, 16 significant bits, as the int4 kernel's fp32 holds them."""
    k = forms()[name]
    want = quant.dequantize(k, torch.float32)
    parts = ckernel.dequant_t(k)
    assert len(parts) == len(k.planes)
    assert all(t.dtype == torch.bfloat16 and t.shape == (k.shape[1], k.shape[0]) and t.is_contiguous() for t in parts)
    got = sum(t.float() for t in parts).t()
    # torch sums the planes in another order: a last-bit difference before the rounding
    tol = 2 ** -8 if len(parts) == 1 else 2 ** -15
    assert ((got - want).abs() <= tol * want.abs() + 1e-6).all()
    if name.startswith("mxfp4"):  # small integers times a power of two: exact
        assert torch.equal(got, want)


def test_many_rows_take_the_unpacked_matrix_and_few_the_int4_kernel(monkeypatch):
    """quant.linear picks per call: past DEQUANT_ROWS rows the unpacked form and oneDNN's bf16 matmul (its
    cost barely grows with rows), below them the int4 kernel (per 4 rows); both within rounding the
    activations and weights to bf16 of the exact product."""
    monkeypatch.setattr(ckernel, "KQ", "off")  # the choice between these two (with the few-row routine: its tests)
    calls = []
    real = quant.dequant_t
    monkeypatch.setattr(quant, "dequant_t", lambda w, *blocks, **kw: calls.append(w.shape) or real(w, *blocks, **kw))
    for name in ("int4", "int8"):
        k = forms()[name]
        need = quant.DEQUANT_ROWS[len(k.planes)]
        x = torch.randn(need, k.shape[1])
        ref = x @ quant.dequantize(k).T
        calls.clear()
        few, many = quant.linear(x[: need - 1], k), quant.linear(x, k)
        # only the call with enough rows; both where PyTorch's kernel packs another layout (AVX2)
        assert calls == [k.shape] * (1 if quant.kernel_reads_forms() else 2)
        act = (x.bfloat16().float() @ quant.dequantize(k).T - ref).abs().max()
        for y, r in ((few, ref[: need - 1]), (many, ref)):
            assert (y - r).abs().max() <= 6 * act


def test_without_the_routine_every_row_count_runs_on_the_int4_kernel(monkeypatch):
    k = forms()["int8"]
    x = torch.randn(64, k.shape[1])
    want = quant.linear(x, k)
    monkeypatch.setattr(ckernel, "_lib", False)
    monkeypatch.setenv("EMOE_NO_CKERNEL", "1")
    assert ckernel.library() is None and ckernel.dequant_t(k) is None
    got = quant.linear(x, k)
    torch.testing.assert_close(got, want, rtol=0, atol=0.02 * want.abs().max().item())


def test_the_int4_kernel_is_given_forms_exactly_where_it_reads_their_layout():
    """ATen packs the int4 kernel's blocks by the vector width it dispatched for (64 rows under AVX512, as the
    forms are laid out; 32 under AVX2). The probe says which, and is right both ways on this CPU."""
    if quant._MM is None:
        pytest.skip("no int4 kernel in this PyTorch")
    k = forms()["int4 asymmetric"]
    x = torch.randn(3, k.shape[1])
    want = x.bfloat16().float() @ quant.dequantize(k).T
    err = (quant._MM(x.bfloat16(), k.planes[0], k.group, k.sz[0]).float() - want).norm() / want.norm()
    assert (err < 0.02) == quant.kernel_reads_forms(), (float(err), torch.backends.cpu.get_cpu_capability())


@pytest.mark.parametrize("bf16_matmul", [True, False])
@pytest.mark.parametrize("routine", [True, False])
def test_where_the_int4_kernel_reads_another_layout_forms_still_multiply_right(bf16_matmul, routine, monkeypatch):
    """As on an AVX2 CPU: the kernel is never given a form; every row count runs on the unpacked matrix (in
    float32 where bf16 matmuls are slow) or, without the C routines, dequantised in torch."""
    monkeypatch.setattr(ckernel, "KQ", "off")
    monkeypatch.setattr(quant, "_READS_FORMS", False)
    monkeypatch.setattr(quant, "_MM", None)  # a call would raise
    monkeypatch.setattr(quant, "bf16_matmul", lambda: bf16_matmul)
    if not routine:
        monkeypatch.setattr(ckernel, "_lib", None)
    for name in ("int4", "int8", "q5"):
        k = forms()[name]
        x = torch.randn(7, k.shape[1])
        want = x.bfloat16().float() @ quant.dequantize(k).T
        for rows in (1, 7):
            got = quant.linear(x[:rows], k)
            assert got.shape == (rows, k.shape[0])
            torch.testing.assert_close(got, want[:rows], rtol=0.02, atol=0.02 * want.abs().max().item())


def test_a_long_prompt_scores_as_on_the_int4_kernel(tmp_path, monkeypatch):
    """A GGUF import at budget 0 (experts and dense projections on forms): a prompt long enough that its
    prefill takes the unpacked matrices scores the tokens after it as near float32 as the int4 kernel does,
    within what bf16 rounding moves them from the kernel's, and picks the same next tokens almost everywhere.
    Decode rows in bf16, as by default (EMOE_KQ=int8 rounds them further; not what this measures)."""
    monkeypatch.setattr(ckernel, "KQ", "bf16")
    monkeypatch.setattr(ckernel, "ROWS", {1: 56, 2: 72})  # the unpacked matrices from 56 rows, as with native bf16 matmuls
    from gguf_writer import write_gguf
    from tiny import make_tiny

    from emoe.engine import Engine, EngineConfig
    from emoe.gguf_import import import_gguf
    hf = make_tiny("qwen3_moe", tmp_path / "hf", hidden_size=256, moe_intermediate_size=256, num_attention_heads=4)
    gguf = write_gguf(hf, tmp_path / "m.gguf", expert_types=("Q4_K", "Q8_0", "Q6_K"), dense_type="Q8_0")
    out = import_gguf(gguf, tmp_path / "imp", dtype=torch.float32)
    eng = Engine(EngineConfig(str(out), miss_policy="host", budget=0, experts_on="ram", dense_blocks=True,
                             device="cpu"))  # the CPU's kernel and float32: what this measures
    ids = [(7 * i) % 200 + 3 for i in range(96)]
    assert len(ids) >= max(quant.DEQUANT_ROWS.values())
    calls = []
    real = quant.dequant_t
    monkeypatch.setattr(quant, "dequant_t", lambda w, *blocks, **kw: calls.append(1) or real(w, *blocks, **kw))
    fast = torch.log_softmax(eng.score(ids[:1], ids[1:]).float(), -1)
    assert calls  # the routine ran
    monkeypatch.setattr(quant, "DEQUANT_ROWS", {1: 1 << 30, 2: 1 << 30})
    slow = torch.log_softmax(eng.score(ids[:1], ids[1:]).float(), -1)
    bf16 = Engine(EngineConfig(str(out), miss_policy="all", dtype="bfloat16", device="cpu"))
    ref = torch.log_softmax(Engine(EngineConfig(str(out), miss_policy="all", device="cpu")).score(ids[:1], ids[1:]).float(), -1)
    moved = (torch.log_softmax(bf16.score(ids[:1], ids[1:]).float(), -1) - ref).abs().mean()
    assert (fast - slow).abs().mean() <= moved  # measured 0.0067 against 0.0091
    assert (fast - ref).abs().mean() <= 1.25 * (slow - ref).abs().mean()  # as near float32 as the kernel (0.96x)
    assert (fast.argmax(-1) == slow.argmax(-1)).float().mean() >= 0.95


def test_wide_matrices_unpack_in_column_parts(monkeypatch):
    """A matrix with more output rows than DEQUANT_COLS (an lm_head over a large vocabulary) is unpacked and
    multiplied a part at a time, so the scratch stays small; the product is the one-part product."""
    monkeypatch.setattr(ckernel, "KQ", "off")  # 64 rows of a two-plane form would take the few-row routine
    k = forms()["int8"]  # 192 rows
    x = torch.randn(64, k.shape[1])
    whole = quant.linear(x, k)
    monkeypatch.setattr(quant, "DEQUANT_COLS", 64)
    parts = []
    real = quant.dequant_t
    monkeypatch.setattr(quant, "dequant_t", lambda w, *blocks, **kw: parts.append(blocks) or real(w, *blocks, **kw))
    assert torch.equal(quant.linear(x, k), whole) and parts == [(0, 1), (1, 2), (2, 3)]


def test_no_compiler_or_cache_means_the_int4_kernel_and_a_line_saying_so(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(ckernel, "_lib", False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # nothing built here yet
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    assert ckernel.library() is None and not ckernel.unpackable(forms()["int4"])
    assert "could not be built" in capsys.readouterr().err


# -- few rows: kq_linear / kq_moe ---------------------------------------------------------------------------
kq = pytest.mark.skipif(not (ckernel.library() and ckernel.library().modes), reason="no vector routine for this CPU")


def _modes():
    lib = ckernel.library()
    return [m for m, bit in ckernel.MODES.items() if lib and lib.modes & bit]


@kq
@pytest.mark.parametrize("name", list(forms()))
def test_few_rows_match_the_forms_product(name, monkeypatch):
    """bf16 activations: at least as near the exact product as PyTorch's int4 kernel (measured 0.6-0.7x its
    error: the sums stay in fp32 to the end), here as the best that kernel can do: the bf16 activations' exact
    product, rounded to its bf16 output. int8 activations (llama.cpp's rounding per 32): within 1%."""
    k = forms()[name]
    if (k.lut is not None or k.group == 16) and not ckernel.lut_able():
        pytest.skip("this build's routines take no codebook or group-16 forms (AVX512's): the next test's fallback")
    x = torch.randn(5, k.shape[1], generator=torch.Generator().manual_seed(1))
    ref = x @ quant.dequantize(k).T
    kernel = ((x.bfloat16().float() @ quant.dequantize(k).T).bfloat16().float() - ref).norm()
    for mode in _modes():
        monkeypatch.setattr(ckernel, "KQ", mode)
        assert ckernel.kq_able(k)
        for rows in (1, 2, 5):
            err = (ckernel.kq_linear(x[:rows].contiguous(), k) - ref[:rows]).norm() / ref[:rows].norm()
            assert err <= (kernel / ref.norm() if mode == "bf16" else 0.01), (mode, rows)


@kq
def test_rows_run_together_give_each_rows_own_bits(monkeypatch):
    """Groups of rows share one unpacking of the weights (int8: up to 8 rows, bf16: pairs); each row's product
    is the one it gets alone, bit for bit, on one and two planes, for row counts across and between groups."""
    for mode in _modes():
        monkeypatch.setattr(ckernel, "KQ", mode)
        for name in ("int4", "int8"):
            k = forms()[name]
            assert ckernel.kq_able(k)
            x = torch.randn(19, k.shape[1], generator=torch.Generator().manual_seed(2))
            alone = torch.cat([ckernel.kq_linear(x[i:i + 1].contiguous(), k) for i in range(len(x))])
            for rows in (3, 8, 9, 19):
                assert torch.equal(ckernel.kq_linear(x[:rows].contiguous(), k), alone[:rows]), (mode, name, rows)


def _layer(seed=0, E=6, H=256, I=128):
    g = torch.Generator().manual_seed(seed)
    ex = [tuple(quant.to_kernel(quant.quantize(torch.randn(*s, generator=g) / 8, 4, 32)) for s in ((I, H), (I, H), (H, I)))
          for _ in range(E)]
    T = 5
    x = torch.randn(T, H, generator=g)
    ids = torch.stack([torch.randperm(E, generator=g)[:2] for _ in range(T)])
    return ex, x, ids, torch.rand(T, 2, generator=g)


@kq
def test_a_layers_experts_in_one_call_match_the_per_expert_loop(monkeypatch):
    """run_experts on forms: one kq_moe call for the layer (not one per expert), the sum of each token's
    experts as the per-expert loop on PyTorch's kernel gives it, and the same bits whatever the thread count."""
    from emoe.dispatch import run_experts
    ex, x, ids, wts = _layer()
    calls = []
    real = ckernel.kq_moe
    import emoe.dispatch as dispatch
    monkeypatch.setattr(dispatch, "kq_moe", lambda *a: calls.append(len(a[2])) or real(*a))
    exact = torch.zeros_like(x)
    for t in range(len(x)):
        for j in range(2):
            gt, up, dn = (quant.dequantize(m) for m in ex[ids[t, j]])
            exact[t] += wts[t, j] * (torch.nn.functional.silu(x[t] @ gt.T) * (x[t] @ up.T)) @ dn.T
    bf16 = torch.zeros_like(x)  # bf16 activations and hidden state, everything else exact: what the bf16 mode rounds
    for t in range(len(x)):
        xb = x[t].bfloat16().float()
        for j in range(2):
            gt, up, dn = (quant.dequantize(m) for m in ex[ids[t, j]])
            bf16[t] += wts[t, j] * ((torch.nn.functional.silu(xb @ gt.T) * (xb @ up.T)).bfloat16().float() @ dn.T)
    monkeypatch.setattr(ckernel, "KQ", "off")
    kernel = run_experts(x, wts, ids, lambda e, n: ex[e], len(ex))
    assert calls == []
    kernel = max((kernel - exact).norm(), (bf16 - exact).norm())  # the int4 kernel's, or what bf16 costs (AVX2: no such kernel)
    for mode in _modes():
        monkeypatch.setattr(ckernel, "KQ", mode)
        calls.clear()
        got = run_experts(x, wts, ids, lambda e, n: ex[e], len(ex))
        assert calls == [len(ids.unique())]
        bound = 1.1 * kernel if mode == "bf16" else 0.02 * exact.norm()
        assert (got - exact).norm() <= bound, mode
        threads = torch.get_num_threads()
        try:
            torch.set_num_threads(1)
            assert torch.equal(run_experts(x, wts, ids, lambda e, n: ex[e], len(ex)), got)
        finally:
            torch.set_num_threads(threads)


@kq
def test_mixed_layers_run_forms_in_c_and_full_weights_in_torch(monkeypatch):
    """A layer whose resident experts are full tensors and whose others are forms: each kind on its own path,
    the sum as the per-expert loop's."""
    from emoe.dispatch import run_experts
    ex, x, ids, wts = _layer(1)
    full = {e: tuple(quant.dequantize(m) for m in ex[e]) for e in (0, 2)}
    fetch = lambda e, n: full.get(e, ex[e])  # noqa: E731
    monkeypatch.setattr(ckernel, "KQ", "off")
    want = run_experts(x, wts, ids, fetch, len(ex))
    monkeypatch.setattr(ckernel, "KQ", "bf16" if "bf16" in _modes() else "int8")
    got = run_experts(x, wts, ids, fetch, len(ex))
    assert (got - want).norm() <= 0.01 * want.norm()


@pytest.mark.parametrize("modes, want", [(7, "bf16"), (3, "int8"), (1, "int8"), (0, "off")])
def test_auto_takes_bf16_where_the_cpu_has_its_dot_products_else_int8(modes, want, monkeypatch):
    """The default: bf16 where AVX512-BF16 makes it about int8's speed, int8 on AVX2 (bf16 there decoded 1.0-1.7x
    slower), PyTorch's kernel where neither routine is built; a mode asked for is kept."""
    monkeypatch.setattr(ckernel, "KQ", "auto")
    ckernel._resolve(modes)
    assert ckernel.KQ == want
    monkeypatch.setattr(ckernel, "KQ", "bf16")
    ckernel._resolve(modes)
    assert ckernel.KQ == "bf16"


def test_without_emoe_kq_the_loaded_routines_pick_the_mode(tmp_path):
    import os
    import subprocess
    import sys
    env = {k: v for k, v in os.environ.items() if k != "EMOE_KQ"}
    code = "from emoe import ckernel; print(ckernel.KQ); lib = ckernel.library(); print(ckernel.KQ, lib.modes)"
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    before, after, modes = r.stdout.split()
    assert before == "auto" and after == ("bf16" if int(modes) & 4 else "int8" if int(modes) & 1 else "off")


def test_the_mode_is_checked_and_off_keeps_the_int4_kernel(monkeypatch):
    import subprocess
    import sys
    bad = subprocess.run([sys.executable, "-c", "import emoe.ckernel"], env={**__import__("os").environ, "EMOE_KQ": "fp8"},
                         capture_output=True, text=True)
    assert bad.returncode != 0 and "EMOE_KQ must be auto, bf16, int8 or off, got 'fp8'" in bad.stderr
    monkeypatch.setattr(ckernel, "KQ", "off")
    assert not ckernel.kq_able(forms()["int4"])


@kq
@pytest.mark.skipif(__import__("platform").machine() != "x86_64", reason="an x86-64 build target")
@pytest.mark.parametrize("mode", ["int8", "bf16"])
def test_the_avx2_build_gives_the_same_products(mode, tmp_path):
    """Built for AVX2 only (EMOE_CKERNEL_MARCH=x86-64-v3, as a CPU without AVX512 builds it): both modes run
    there (bf16 as fp32 FMAs of exact products) and give this CPU's build's products up to float summation
    order, on one and two planes, one row and an odd count; codebook forms, which only that build takes,
    give the two-plane forms' products (MXFP4's, IQ4's), a group of the largest values included (int16 sums);
    forms with scales per 16 values give the exact product up to rounding the activations, and with both
    halves of each 32 alike a group-32 form's products; so do 5- and 6-bit forms (upper bits beside the
    nibbles) and codebook forms with scales per 16, whose prefill unpacking is exact; an int8 plane gives the two
    nibble planes' products."""
    import os
    import subprocess
    import sys
    code = ("import torch; from emoe import ckernel, quant\n"
            "ys = []\n"
            "for bits in (4, 8):\n"
            "    k = quant.to_kernel(quant.quantize(torch.randn(128, 256, generator=torch.Generator().manual_seed(0)), bits, 32))\n"
            "    x = torch.randn(3, 256, generator=torch.Generator().manual_seed(1))\n"
            "    assert ckernel.kq_able(k)\n"
            "    ys += [ckernel.kq_linear(x[:1].contiguous(), k), ckernel.kq_linear(x, k)]\n"
            "print(ckernel.library().modes); torch.save(ys, 'y.pt')\n")
    # MXFP4 as a codebook (this build's own form, so asked of it alone): the two-plane form's products
    book = ("import torch; from emoe import ckernel; from emoe.forms import mxfp4_planes\n"
            "g = torch.Generator().manual_seed(2)\n"
            "vals = torch.tensor([0, 1, 2, 3, 4, 6, 8, 12, -1, -2, -3, -4, -6, -8, -12])\n"
            "q, d = vals[torch.randint(0, 15, (128, 256), generator=g)], 2.0 ** torch.randint(-6, 0, (128, 8), generator=g)\n"
            "q[:64, :32] = 12  # a group at the codebook's largest value times the largest activations\n"
            "x = torch.randn(9, 256, generator=g); x[:, :32] = 1.0\n"
            "book, two = mxfp4_planes(q, d), mxfp4_planes(q, d, codebook=False)\n"
            "assert book.lut is not None and len(two.planes) == 2 and ckernel.kq_able(book) and ckernel.kq_able(two)\n"
            "from emoe.forms import codebook_form; from emoe.gguf_blocks import IQ4_VALUES; from emoe import quant\n"
            "iq, s = torch.tensor(IQ4_VALUES)[torch.randint(0, 16, (128, 256), generator=g)], torch.randn(128, 8, generator=g)\n"
            "iq[:64, :32] = -127\n"
            "iq4, int8 = codebook_form(iq, s, IQ4_VALUES), quant.to_kernel(quant.QTensor(iq.to(torch.int8), s, (128, 256), 8, 32))\n"
            "assert iq4.lut.dtype == torch.int8 and ckernel.kq_able(iq4) and ckernel.kq_able(int8)\n"
            "# scales per 16 (Q2_K's, Q3_K's): with each 32's two halves alike, a group-32 form's products\n"
            "from emoe.gguf_blocks import kernel_copy\n"
            "u = torch.randint(0, 16, (128, 256), generator=g, dtype=torch.uint8); u[:64, :32] = 15\n"
            "sc, mn = torch.rand(128, 8, generator=g) * 0.1, torch.randn(128, 8, generator=g) * 0.1\n"
            "g16, g32 = kernel_copy(u, sc.repeat_interleave(2, 1), mn.repeat_interleave(2, 1), 16), kernel_copy(u, sc, mn)\n"
            "assert ckernel.kq_able(g16) and ckernel.kq_able(g32)\n"
            "other = kernel_copy(u, torch.rand(128, 16, generator=g) * 0.1, torch.randn(128, 16, generator=g) * 0.1, 16)\n"
            "assert ckernel.kq_able(other)\n"
            "# 5- and 6-bit values with their upper bits beside the nibbles (Q5_x per 32, Q6_K per 16), the largest\n"
            "# values times the largest activations in a group included (int16 sums)\n"
            "u5 = torch.randint(0, 32, (128, 256), generator=g, dtype=torch.uint8); u5[:64, :32] = 31\n"
            "u6 = torch.randint(0, 64, (128, 256), generator=g, dtype=torch.uint8); u6[:64, :32] = 63\n"
            "s6 = torch.rand(128, 16, generator=g) * 0.1\n"
            "f5, f6 = kernel_copy(u5, sc, mn, 32, 1), kernel_copy(u6, s6, 32 * s6, 16, 2)\n"
            "assert f5.high is not None and f6.hbits == 2 and ckernel.kq_able(f5) and ckernel.kq_able(f6)\n"
            "# codebooks with scales per 16 (IQ2_XS's, IQ2_S's: int8 tables; IQ1_M's: a small one, offset)\n"
            "t2, t1 = (-43, -25, -8, 8, 25, 43), (-9, -7, -1, 1, 7, 9)\n"
            "c2 = codebook_form(torch.tensor(t2)[torch.randint(0, 6, (128, 256), generator=g)], torch.rand(128, 16, generator=g) * 0.1, t2, group=16)\n"
            "c1 = codebook_form(torch.tensor(t1)[torch.randint(0, 6, (128, 256), generator=g)], torch.rand(128, 16, generator=g) * 0.1, t1, group=16)\n"
            "assert c2.lut.dtype == torch.int8 and c1.lut.dtype == torch.uint8 and ckernel.kq_able(c2) and ckernel.kq_able(c1)\n"
            "# an int8 plane (Q8_0's, int8 forms'), -128 included: the two nibble planes' products\n"
            "q8 = quant.quantize(torch.randn(128, 256, generator=g), 8, 32); q8.data[:64, :32] = -128\n"
            "i8, p8 = quant.int8_form(q8), quant.to_kernel(q8)\n"
            "assert i8.i8 and len(p8.planes) == 2 and ckernel.kq_able(i8) and ckernel.kq_able(p8)\n"
            "for f in (f5, f6, c2, c1, i8):  # the prefill's unpacking, exactly\n"
            "    assert torch.equal(ckernel.dequant_t(f, f32=True)[0].T, quant.dequantize(f))\n"
            "for m in (1, 2, 9):\n"
            "    for f in (other, f5, f6, c2, c1):\n"
            "        ref = x[:m] @ quant.dequantize(f).T\n"
            "        assert (ckernel.kq_linear(x[:m].contiguous(), f) - ref).abs().max() <= 0.01 * ref.abs().max(), f.bits\n"
            "for m in (1, 2, 9):\n"
            "    for a, b in ((book, two), (iq4, int8), (g16, g32), (i8, p8)):\n"
            "        want = ckernel.kq_linear(x[:m].contiguous(), b)\n"
            "        torch.testing.assert_close(ckernel.kq_linear(x[:m].contiguous(), a), want, rtol=1e-5, atol=1e-5 * want.abs().max().item())\n")
    env = {**os.environ, "EMOE_CKERNEL_MARCH": "x86-64-v3", "EMOE_KQ": mode, "XDG_CACHE_HOME": str(tmp_path)}
    r = subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["11"]  # int8, bf16 and codebooks
    got = torch.load(tmp_path / "y.pt")
    b = subprocess.run([sys.executable, "-c", book], env=env, cwd=tmp_path, capture_output=True, text=True)
    assert b.returncode == 0, b.stderr
    env["EMOE_CKERNEL_MARCH"] = "native"
    r = subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    for a, b in zip(torch.load(tmp_path / "y.pt"), got):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@kq
def test_host_experts_of_a_device_layer_run_in_one_call(monkeypatch):
    """Where the layer's tokens live elsewhere than the forms (a GPU's, with the `host` policy), the host's
    experts run in one kq_moe call on a float32 copy of the tokens, and the sum crosses back in x's dtype.
    Simulated here by bf16 tokens (a float32 CPU layer takes the direct path) and a `_runs_beside` that
    calls the forms another tier's."""
    dtype = torch.bfloat16
    import emoe.dispatch as dispatch
    from emoe.dispatch import run_experts
    ex, x, ids, wts = _layer(2)
    x = x.to(dtype)
    monkeypatch.setattr(ckernel, "KQ", "off")
    want = run_experts(x.float(), wts, ids, lambda e, n: ex[e], len(ex))
    monkeypatch.setattr(ckernel, "KQ", _modes()[-1])
    monkeypatch.setattr(dispatch, "_runs_beside", lambda w, x: False)
    calls = []
    real = ckernel.kq_moe
    monkeypatch.setattr(dispatch, "kq_moe", lambda *a: calls.append(len(a[2])) or real(*a))
    got = run_experts(x, wts, ids, lambda e, n: ex[e], len(ex), defers=lambda e, n: True)
    assert calls == [len(ids.unique())] and got.dtype == dtype
    assert (got.float() - want).norm() <= 0.02 * want.norm()


@kq
def test_experts_with_many_rows_leave_the_call_to_the_others(monkeypatch):
    """Per expert: one with ckernel.ROWS rows or more runs outside the C call (a prefill's unpacked matrices),
    the layer's other experts still in one call; the sum as all in one call."""
    import emoe.dispatch as dispatch
    from emoe.dispatch import run_experts
    mode = _modes()[-1]  # whatever EMOE_KQ says: the routine must run
    monkeypatch.setattr(ckernel, "KQ", mode)
    ex, x, ids, wts = _layer(3)
    ids[:, 0] = 1  # expert 1 takes every token
    want = run_experts(x, wts, ids, lambda e, n: ex[e], len(ex))
    monkeypatch.setattr(ckernel, "ROWS", {1: len(x)})
    calls = []
    real = ckernel.kq_moe
    monkeypatch.setattr(dispatch, "kq_moe", lambda *a: calls.append(a[3]) or real(*a))
    got = run_experts(x, wts, ids, lambda e, n: ex[e], len(ex))
    assert len(calls) == 1 and 1 not in calls[0] and sorted(calls[0]) == sorted(set(ids[:, 1].tolist()) - {1})
    assert (got - want).norm() <= (0.01 if mode == "bf16" else 0.02) * want.norm()  # int8 rounds expert 1's input


def test_unpacked_products_pad_their_rows_to_a_bucket(monkeypatch):
    """From DEQUANT_ROWS rows the product runs on rows rounded up to PAD_ROWS (oneDNN makes a primitive per
    new shape, ~0.5 ms, and every prompt length would be one): the rows asked for, as unpadded."""
    monkeypatch.setattr(ckernel, "KQ", "off")
    k = forms()["int4"]
    x = torch.randn(quant.DEQUANT_ROWS[1] + 3, k.shape[1])
    shapes = []
    real = quant.dequant_t
    monkeypatch.setattr(quant, "dequant_t", lambda w, *b, **kw: shapes.append(1) or real(w, *b, **kw))
    got = quant.linear(x, k)
    assert shapes and got.shape == (len(x), k.shape[0])
    monkeypatch.setattr(quant, "PAD_ROWS", 1)
    torch.testing.assert_close(got, quant.linear(x, k), rtol=1e-5, atol=1e-5)


@torch.no_grad()
def _decode_steps(cfg, model, dispatch, kv_dtype=None, caches: list | None = None, n: int = 5) -> list[torch.Tensor]:
    """An n-token prompt then 12 decode steps, two rows in KV slots 2 and 0: each step's last-token logits (the
    KV cache appended to `caches` where given)."""
    from emoe.model import KVCache
    kv = KVCache.empty(cfg, 3, n + 27, torch.float32, "cpu", kv_dtype)
    if caches is not None:
        caches.append(kv)
    g = torch.Generator().manual_seed(2)
    prompt = torch.randint(0, cfg.vocab_size, (2, n), generator=g)
    slots, out = torch.tensor([2, 0]), []
    model.forward(prompt, torch.arange(n).expand(2, n), torch.ones(2, n, dtype=torch.bool), dispatch, kv, slots)
    for t in range(12):
        tok = torch.randint(0, cfg.vocab_size, (2, 1), generator=g)
        out.append(model.forward(tok, torch.full((2, 1), n + t), torch.ones(2, 1, dtype=torch.bool), dispatch,
                                 kv, slots, last_only=True))
    return out


@pytest.mark.parametrize("family,over", [("qwen3_moe", {}), ("gpt_oss", {"sliding_window": 4}),
                                         ("mixtral", {"sliding_window": 3}), ("glm4_moe", {"partial_rotary_factor": 0.5}),
                                         ("ernie4_5_moe", {}), ("hunyuan_v1_moe", {})])
def test_decode_attention_in_c_is_the_torch_path(family, over, tmp_path, monkeypatch):
    """A decode step's rope, cache writes and attention in one C call (cstep.attend): 12 steps of two rows
    in different slots give the logits the torch path gives, through sliding windows (gpt-oss with sinks,
    Mixtral), per-head qk norm (Qwen3; Hunyuan's after the rotary), partial rotary (GLM-4) and rotary pairs
    (ERNIE)."""
    from test_model import load_emoe
    from tiny import make_tiny

    from emoe.model import MoEModel
    path = make_tiny(family, tmp_path / family, **over)
    cfg, model, dispatch = load_emoe(path)
    calls = []
    real = cstep.attend
    monkeypatch.setattr(cstep, "attend", lambda *a: calls.append(1) or real(*a))

    def run(c_path: bool) -> list[torch.Tensor]:
        monkeypatch.setattr(MoEModel, "_c_decode", lambda self, q, cache: c_path and q.dtype == torch.float32)
        return _decode_steps(cfg, model, dispatch)

    want = run(False)
    assert not calls
    got = run(True)
    assert len(calls) == 12 * (cfg.num_layers - len(cfg.linear_layers))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("family,over", [("qwen3_moe", {}), ("gpt_oss", {"sliding_window": 100})])
def test_decode_attention_over_several_chunks_is_the_torch_path(family, over, tmp_path, monkeypatch):
    """Past 64 positions the C attention splits a row's context into chunks of 64 and merges their softmax
    partials (with gpt-oss's sink logit, and a window that starts inside a chunk): a 150-token prompt's 12 decode
    steps (three chunks each) give the torch path's logits."""
    from test_model import load_emoe
    from tiny import make_tiny

    from emoe.model import MoEModel
    cfg, model, dispatch = load_emoe(make_tiny(family, tmp_path / family, **over))
    calls, real = [], cstep.attend
    monkeypatch.setattr(cstep, "attend", lambda *a: calls.append(1) or real(*a))

    def run(c_path: bool) -> list[torch.Tensor]:
        monkeypatch.setattr(MoEModel, "_c_decode", lambda self, q, cache: c_path and q.dtype == torch.float32)
        return _decode_steps(cfg, model, dispatch, n=150)
    want = run(False)
    got = run(True)
    assert len(calls) == 12 * cfg.num_layers
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("family,over", [("qwen3_moe", {}), ("gpt_oss", {"sliding_window": 4})])
def test_a_bf16_kv_cache_is_read_and_written_in_c_as_torch_does(family, over, tmp_path, monkeypatch):
    """With a bf16 KV cache (--kv-dtype bfloat16) the C attention writes each key and value rounded as torch's
    .to(bfloat16) rounds them (the first layer's caches, whose inputs the two paths share, bit-equal after 12
    steps; later layers' inputs differ in their last float32 bits, which can move a rounding by one bf16 step)
    and reads them back: the torch path's logits within 5e-4 (measured 1.5e-4), a small part of what bf16 keys
    move them against the float32 cache's (measured 1.1e-2)."""
    from test_model import load_emoe
    from tiny import make_tiny

    from emoe.model import MoEModel
    cfg, model, dispatch = load_emoe(make_tiny(family, tmp_path / family, **over))
    calls, real = [], cstep.attend
    monkeypatch.setattr(cstep, "attend", lambda *a: calls.append(1) or real(*a))

    def run(c_path: bool, kv_dtype=torch.bfloat16):
        monkeypatch.setattr(MoEModel, "_c_decode", lambda self, q, cache: c_path and q.dtype == torch.float32)
        caches = []
        return _decode_steps(cfg, model, dispatch, kv_dtype, caches), caches[0]
    want, kv_t = run(False)
    got, kv_c = run(True)
    assert len(calls) == 12 * cfg.num_layers and kv_c.k[0].dtype == torch.bfloat16
    assert torch.equal(kv_c.k[0], kv_t.k[0]) and torch.equal(kv_c.v[0], kv_t.v[0])
    worst = max((a - b).abs().max().item() for a, b in zip(got, want))
    full, _ = run(True, torch.float32)
    gap = max((a - b).abs().max().item() for a, b in zip(got, full))
    assert worst <= 5e-4 and 10 * worst < gap < 0.05


def test_the_summary_says_what_runs_the_forms(monkeypatch):
    monkeypatch.setattr(ckernel, "KQ", "off")
    assert ckernel.describe().endswith("EMOE_KQ=off") or "no C routines" in ckernel.describe()
    if ckernel.library() is not None and ckernel.library().modes & ckernel.MODES["int8"]:
        monkeypatch.setattr(ckernel, "KQ", "int8")
        assert ckernel.describe() == "emoe's C routines, int8 activations"
    monkeypatch.setattr(ckernel, "_lib", None)
    monkeypatch.setattr(quant, "_READS_FORMS", True)
    assert ckernel.describe() == "PyTorch's int4 kernel: no C routines built"
    monkeypatch.setattr(quant, "_READS_FORMS", False)  # as under AVX2: the forms are dequantised then
    assert ckernel.describe().startswith("dequantised copies, slowly") and ckernel.describe().endswith("no C routines built")


def test_a_compiler_without_openmp_builds_the_routines_single_threaded(monkeypatch, tmp_path):
    """cc refusing -fopenmp (clang without libomp): the routines are built again without it."""
    import os
    import shutil
    import stat
    cc = shutil.which(os.environ.get("CC", "cc"))
    if cc is None or not ckernel._openmp_flags():
        pytest.skip("no compiler, or no OpenMP to leave out")
    wrapper = tmp_path / "cc"
    wrapper.write_text(f'#!/bin/sh\nfor a in "$@"; do [ "$a" = -fopenmp ] && exit 1; done\nexec {cc} "$@"\n')
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("CC", str(wrapper))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(ckernel, "_lib", False)
    lib = ckernel.library()
    assert lib is not None and ckernel.dequant_t(forms()["int4"]) is not None
    built = list((tmp_path / "cache" / "emoe").glob("ckernel-*.so"))
    assert len(built) == 1 and b"GOMP_parallel" not in built[0].read_bytes()


@pytest.mark.skipif(ckernel.library() is None, reason="no C compiler")
@pytest.mark.parametrize("scoring,norm,choice,scale,groups", [
    ("softmax", True, False, 1.0, (1, 1)), ("softmax", False, False, 1.0, (1, 1)), ("sigmoid", True, True, 2.5, (1, 1)),
    ("sigmoid", True, True, 2.5, (8, 3)), ("softmax", False, False, 1.0, (4, 2))])
def test_the_c_router_routes_as_torch_does(scoring, norm, choice, scale, groups):
    """kq_route (a decode step's router in one call): model.route's scores, weights and ids on the logits of
    x W^T + b, for softmax, unnormalised top-k, DeepSeek's sigmoid with a choice-only bias and a scale, and
    group-limited routing (V3's: a group scores its two best; V2's: its best)."""
    from emoe.model import route
    g = torch.Generator().manual_seed(0)
    x, W, b = torch.randn(5, 256, generator=g), torch.randn(40, 256, generator=g) * 0.05, torch.randn(40, generator=g)
    c = torch.randn(40, generator=g) * 0.1 if choice else None
    got = ckernel.route(x, W, b, 6, norm, scoring, c, scale, groups)
    want = route(torch.nn.functional.linear(x, W, b), 6, norm, scoring=scoring, bias=c, scale=scale,
                 n_group=groups[0], topk_group=groups[1])
    if groups[0] > 1:  # the groups decide: the same call without them picks otherwise for some token
        assert not torch.equal(ckernel.route(x, W, b, 6, norm, scoring, c, scale)[2], want[2])
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-6)
    assert torch.equal(got[2], want[2])


@pytest.mark.skipif(ckernel.library() is None, reason="no C compiler")
def test_the_c_router_breaks_ties_to_the_lower_expert_and_leaves_prefills_to_torch():
    x, W = torch.ones(2, 32), torch.zeros(8, 32)
    W[5] = W[3] = 1.0  # experts 3 and 5 tie first, the rest tie after them
    _, w, ids = ckernel.route(x, W, None, 3, True, "softmax", None, 1.0)
    assert ids.tolist() == [[3, 5, 0], [3, 5, 0]]
    torch.testing.assert_close(w.sum(-1), torch.ones(2))
    assert ckernel.route(torch.ones(ckernel.ROUTE_ROWS + 1, 32), W, None, 3, True, "softmax", None, 1.0) is None
    assert ckernel.route(x.double(), W.double(), None, 3, True, "softmax", None, 1.0) is None


@pytest.mark.skipif(__import__("platform").machine() != "x86_64" or ckernel.library() is None,
                    reason="an x86-64 build target")
def test_a_build_without_vector_units_still_loads_its_portable_routines(tmp_path):
    """Built for the plain x86-64 baseline (as for a CPU with neither AVX2 nor AVX512, or another architecture's
    portable C): no few-row mode, and PyTorch's kernel serves the forms, but the library loads, and rms_norm and
    the router run in it. (The norm once sat inside the vector-only part, so such a build failed to load.)"""
    import os
    import subprocess
    import sys
    code = ("import torch; from emoe import ckernel\n"
            "x, w = torch.randn(3, 64), torch.randn(64)\n"
            "y = ckernel.rms_norm(x, w, 1e-6)\n"
            "assert torch.allclose(y, torch.nn.functional.rms_norm(x, (64,), w, 1e-6), atol=1e-5)\n"
            "assert ckernel.route(x, torch.randn(8, 64), None, 2, True, 'softmax', None, 1.0)[2].shape == (3, 2)\n"
            "print(ckernel.library().modes, ckernel.describe())\n")
    env = {**os.environ, "EMOE_CKERNEL_MARCH": "x86-64", "XDG_CACHE_HOME": str(tmp_path)}
    r = subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split()[0] == "0"


@pytest.mark.parametrize("bits", [4, 8])
def test_stacked_forms_give_each_forms_product(bits):
    """quant.stack_rows' KTensor (q, k and v as one): its product is the three products side by side, bit for
    bit, whichever path runs it (few rows in C or PyTorch's kernel, many rows unpacked)."""
    g = torch.Generator().manual_seed(bits)
    ws = [quant.to_kernel(quant.quantize(torch.randn(n, 256, generator=g), bits, 32)) for n in (256, 64, 64)]
    both = quant.stack_rows(ws)
    for rows in (1, 3, 100):
        x = torch.randn(rows, 256, generator=g)
        assert torch.equal(quant.linear(x, both), torch.cat([quant.linear(x, w) for w in ws], -1))


def _form_attention(model) -> None:
    """The stacked q/k/v and o of every attention layer as int8 kernel forms, as a GGUF's dense blocks load."""
    for i in model.qkv:
        for n in ("qkv_proj", "o_proj"):
            k = f"model.layers.{i}.self_attn.{n}.weight"
            model.w[k] = quant.to_kernel(quant.quantize(model.w[k], 8, 32))


@kq
@pytest.mark.parametrize("family,over", [("qwen3_moe", {}), ("mixtral", {"sliding_window": 3}), ("olmoe", {"clip_qkv": None}),
                                         ("gpt_oss", {"sliding_window": 4}), ("qwen2_moe", {}), ("ernie4_5_moe", {}),
                                         ("hunyuan_v1_moe", {})])
def test_the_attention_half_of_a_layer_in_one_call_is_the_general_path(family, over, tmp_path, monkeypatch):
    """decode_block: with q/k/v stacked in one kernel form and o in another (as a GGUF's dense blocks load), a
    decode step's norm, qkv product, attention (Qwen3's per-head qk norm, OLMoE's over the whole projection;
    Mixtral's window), o product,
    residual and next norm run as one C call, and give the general path's logits bit for bit, 12 steps of two
    rows in different slots; so do layers whose v is of another kind than q and k (stacked apart), gpt-oss's
    (q/k/v and o biases, sink logits, every other layer windowed), Qwen2-MoE's (q/k/v biases), ERNIE's
    (rotary pairs) and Hunyuan's (qk norm after the rotary). A layer with clipping (OLMoE's tiny default)
    keeps the general path."""
    from test_model import load_emoe
    from tiny import make_tiny

    import emoe.model as model_mod
    from emoe import decode_block
    monkeypatch.setattr(ckernel, "KQ", _modes()[-1])  # whatever EMOE_KQ says: the routines must run
    path = make_tiny(family, tmp_path / family, hidden_size=128, **over)
    cfg, model, dispatch = load_emoe(path)
    _form_attention(model)
    calls, real = [], cstep.attn_block
    monkeypatch.setattr(cstep, "attn_block", lambda *a: calls.append(1) or real(*a))

    def run(fused: bool) -> list[torch.Tensor]:
        monkeypatch.setattr(model_mod, "attn_block", decode_block.attn_block if fused else (lambda *a: None))
        return _decode_steps(cfg, model, dispatch)

    want = run(False)
    got = run(True)
    assert len(calls) == 12 * cfg.num_layers
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    if cfg.num_kv_heads * cfg.head_dim % 64 == 0:  # (gpt-oss's, ERNIE's and Hunyuan's tiny k and v are 32 rows: no form)
        # q and k in 4-bit forms and v in 8-bit ones (as a Q4_K_M file's Q6_K v): q and k stack, v stays apart
        from emoe.checkpoint import Checkpoint
        from emoe.model import MoEModel
        dense = {k: v.float() for k, v in Checkpoint(path).dense_state().items()}
        for k in list(dense):
            if k.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight")):
                dense[k] = quant.to_kernel(quant.quantize(dense[k], 8 if k.endswith("v_proj.weight") else 4, 32))
        mixed = MoEModel(cfg, dense)
        assert mixed.qkv and all(len(v) == 2 for v in mixed.qkv.values())
        assert all(f"model.layers.{i}.self_attn.{n}_proj.weight" in mixed.w for i in mixed.qkv for n in ("qk", "v"))
        calls.clear()
        monkeypatch.setattr(model_mod, "attn_block", lambda *a: None)
        want = _decode_steps(cfg, mixed, dispatch)
        monkeypatch.setattr(model_mod, "attn_block", decode_block.attn_block)
        got = _decode_steps(cfg, mixed, dispatch)
        assert len(calls) == 12 * cfg.num_layers and all(torch.equal(a, b) for a, b in zip(got, want))
    _, clipped, _ = load_emoe(make_tiny("olmoe", tmp_path / "olmoe_clip", hidden_size=128, clip_qkv=8.0))
    _form_attention(clipped)
    assert clipped.qkv and all(decode_block.block_weights(clipped, i) is None for i in clipped.qkv)


@kq
def test_an_output_gated_attention_layer_runs_in_one_call(tmp_path, monkeypatch):
    """Qwen3-Next's full-attention layers (each head's q, then its output gate, in q_proj; a quarter of the head
    rotary; per-head qk norm) take the one-call attention half too, and give the general path's logits within
    1e-5 over 12 decode steps (the gate's sigmoid is torch's there, C's here)."""
    from test_model import load_emoe
    from tiny import make_tiny

    import emoe.model as model_mod
    from emoe import decode_block
    monkeypatch.setattr(ckernel, "KQ", _modes()[-1])
    cfg, model, dispatch = load_emoe(make_tiny("qwen3_next", tmp_path / "q3n", hidden_size=128))
    _form_attention(model)
    assert cfg.spec.attn_gate and list(model.qkv) == [1]
    calls, real = [], cstep.attn_block
    monkeypatch.setattr(cstep, "attn_block", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setattr(model_mod, "attn_block", lambda *a: None)
    want = _decode_steps(cfg, model, dispatch)
    monkeypatch.setattr(model_mod, "attn_block", decode_block.attn_block)
    got = _decode_steps(cfg, model, dispatch)
    assert len(calls) == 12
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["mxfp4 codebook", "iq4 codebook", "group 16"])
def test_codebook_forms_run_dequantised_where_the_routines_take_none(name, monkeypatch):
    """A codebook form (MXFP4's) or one with scales per 16 values (Q2_K's) on a build whose routines take
    neither (AVX512's), or under PyTorch's kernel, which has neither: not kq_able, and every row count still
    gets its exact matrix's product: within twice the bf16 activations' error, plus half a bf16 step of the
    output where the CPU's bf16 matmul makes it (AVX512-BF16: quant._kmm's bf16 out)."""
    k = forms()[name]
    want = quant.dequantize(k)
    monkeypatch.setattr(ckernel, "lut_able", lambda: False)
    assert not ckernel.kq_able(k)
    for m in (1, 5, 200):
        x = torch.randn(m, k.shape[1])
        ref = x @ want.T
        act = (x.bfloat16().float() @ want.T - ref).abs().max()
        out = ref.abs().max() * 2.0 ** -8 if quant.bf16_matmul() else 0
        assert (quant.linear(x, k) - ref).abs().max() <= 2 * act + out + 1e-5


def test_codebook_forms_stack_only_with_the_same_codebook():
    """q, k and v stacked into one form (quant.stack_rows) keep the codebook; a plain one-plane form or
    another codebook does not stack with them."""
    from dataclasses import replace
    k = forms()["mxfp4 codebook"]
    both = quant.stack_rows([k, k])
    assert both.lut is not None and torch.equal(quant.dequantize(both), torch.cat([quant.dequantize(k)] * 2))
    assert quant.stack_rows([k, forms()["int4"]]) is None
    assert quant.stack_rows([k, replace(k, lut=k.lut.flip(0))]) is None
