"""emoe.ckernel: kernel forms unpacked to bf16 W^T in C for many-row products (a prefill's), and the int4
kernel kept for few rows and wherever the routine cannot be built."""
import pytest
import torch

from emoe import ckernel, quant
from emoe.forms import int4_form, kernel_copy5, mxfp4_planes

pytestmark = pytest.mark.skipif(ckernel.library() is None, reason="no C compiler here")


def forms():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(192, 256, generator=g)
    u5 = torch.randint(0, 32, (128, 256), dtype=torch.uint8, generator=g)
    scale, minimum = torch.rand(128, 8, generator=g) * 0.1, torch.randn(128, 8, generator=g) * 0.1
    mx = torch.randint(-12, 13, (128, 256), generator=g)
    return {"int4": quant.to_kernel(quant.quantize(w, 4, 32)), "int8": quant.to_kernel(quant.quantize(w, 8, 32)),
            "int4 asymmetric": int4_form(w), "q5": kernel_copy5(u5, scale, minimum),
            "mxfp4": mxfp4_planes(mx, torch.full((128, 8), 0.25))}


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
    if name == "mxfp4":  # small integers times a power of two: exact
        assert torch.equal(got, want)


def test_many_rows_take_the_unpacked_matrix_and_few_the_int4_kernel(monkeypatch):
    """quant.linear picks per call: past DEQUANT_ROWS rows the unpacked form and oneDNN's bf16 matmul (its
    cost barely grows with rows), below them the int4 kernel (per 4 rows); both within rounding the
    activations and weights to bf16 of the exact product."""
    calls = []
    real = quant.dequant_t
    monkeypatch.setattr(quant, "dequant_t", lambda w, *blocks: calls.append(w.shape) or real(w, *blocks))
    for name in ("int4", "int8"):
        k = forms()[name]
        need = quant.DEQUANT_ROWS[len(k.planes)]
        x = torch.randn(need, k.shape[1])
        ref = x @ quant.dequantize(k).T
        calls.clear()
        few, many = quant.linear(x[: need - 1], k), quant.linear(x, k)
        assert calls == [k.shape]  # only the call with enough rows
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


def test_a_long_prompt_scores_as_on_the_int4_kernel(tmp_path, monkeypatch):
    """A GGUF import at budget 0 (experts and dense projections on forms): a prompt long enough that its
    prefill takes the unpacked matrices scores the tokens after it as near float32 as the int4 kernel does,
    within what bf16 rounding moves them from the kernel's, and picks the same next tokens almost everywhere."""
    from gguf_writer import write_gguf
    from tiny import make_tiny

    from emoe.engine import Engine, EngineConfig
    from emoe.gguf_import import import_gguf
    hf = make_tiny("qwen3_moe", tmp_path / "hf", hidden_size=256, moe_intermediate_size=256, num_attention_heads=4)
    gguf = write_gguf(hf, tmp_path / "m.gguf", expert_types=("Q4_K", "Q8_0", "Q6_K"), dense_type="Q8_0")
    out = import_gguf(gguf, tmp_path / "imp", dtype=torch.float32)
    eng = Engine(EngineConfig(str(out), miss_policy="host", budget=0, experts_on="ram", dense_blocks=True))
    ids = [(7 * i) % 200 + 3 for i in range(96)]
    assert len(ids) >= max(quant.DEQUANT_ROWS.values())
    calls = []
    real = quant.dequant_t
    monkeypatch.setattr(quant, "dequant_t", lambda w, *blocks: calls.append(1) or real(w, *blocks))
    fast = torch.log_softmax(eng.score(ids[:1], ids[1:]).float(), -1)
    assert calls  # the routine ran
    monkeypatch.setattr(quant, "DEQUANT_ROWS", {1: 1 << 30, 2: 1 << 30})
    slow = torch.log_softmax(eng.score(ids[:1], ids[1:]).float(), -1)
    bf16 = Engine(EngineConfig(str(out), miss_policy="all", dtype="bfloat16"))
    ref = torch.log_softmax(Engine(EngineConfig(str(out), miss_policy="all")).score(ids[:1], ids[1:]).float(), -1)
    moved = (torch.log_softmax(bf16.score(ids[:1], ids[1:]).float(), -1) - ref).abs().mean()
    assert (fast - slow).abs().mean() <= moved  # measured 0.0067 against 0.0091
    assert (fast - ref).abs().mean() <= 1.25 * (slow - ref).abs().mean()  # as near float32 as the kernel (0.96x)
    assert (fast.argmax(-1) == slow.argmax(-1)).float().mean() >= 0.95


def test_wide_matrices_unpack_in_column_parts(monkeypatch):
    """A matrix with more output rows than DEQUANT_COLS (an lm_head over a large vocabulary) is unpacked and
    multiplied a part at a time, so the scratch stays small; the product is the one-part product."""
    k = forms()["int8"]  # 192 rows
    x = torch.randn(64, k.shape[1])
    whole = quant.linear(x, k)
    monkeypatch.setattr(quant, "DEQUANT_COLS", 64)
    parts = []
    real = quant.dequant_t
    monkeypatch.setattr(quant, "dequant_t", lambda w, *blocks: parts.append(blocks) or real(w, *blocks))
    assert torch.equal(quant.linear(x, k), whole) and parts == [(0, 1), (1, 2), (2, 3)]


def test_no_compiler_or_cache_means_the_int4_kernel_and_a_line_saying_so(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(ckernel, "_lib", False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # nothing built here yet
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    assert ckernel.library() is None and not ckernel.unpackable(forms()["int4"])
    assert "could not be built" in capsys.readouterr().err
