"""Calibrated int4 copies (emoe.calibrate): GPTQ keeps the plain copies' format and bytes and cuts the error of the
outputs on activations like the calibration ones; the recording expert function is the model's own; `emoe quantize
--calibrate N` writes copies an engine reads."""
import shutil

import pytest
import torch

from emoe import calibrate
from emoe.calibrate import Hessians, gptq_int4
from emoe.quant import dequantize, quantize, swiglu


def _activations(n: int, cols: int, seed: int) -> torch.Tensor:
    """Correlated inputs with a few loud channels, as residual streams have."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(cols, cols, generator=torch.Generator().manual_seed(99)) / cols ** 0.5
    loud = torch.ones(cols)
    loud[::17] = 8.0
    return (torch.randn(n, cols, generator=g) @ mix + 0.3 * torch.randn(n, cols, generator=g)) * loud


def _out_error(w, approx, x):
    return float(((x @ (approx - w).T).norm() / (x @ w.T).norm()) ** 2)


@pytest.mark.parametrize("group", [32, 64])
def test_gptq_keeps_the_format_and_cuts_the_outputs_error(group):
    w = torch.randn(48, 128, generator=torch.Generator().manual_seed(1)) * 0.05
    x = _activations(2000, 128, seed=2)
    q, plain = gptq_int4(w, x.T @ x, group), quantize(w, 4, group)
    assert (q.shape, q.bits, q.group, q.nbytes) == (plain.shape, plain.bits, plain.group, plain.nbytes)
    assert q.data.dtype == plain.data.dtype and q.data.shape == plain.data.shape
    assert q.scale.dtype == q.zero.dtype == torch.float16 and q.scale.shape == q.zero.shape == plain.scale.shape
    fresh = _activations(2000, 128, seed=3)  # scored on other samples of the same distribution
    assert _out_error(w, dequantize(q), fresh) < 0.8 * _out_error(w, dequantize(plain), fresh)
    assert float((dequantize(q) - w).norm() / w.norm()) < 0.2  # still a copy of w, not a refit to noise


def test_gptq_with_dead_channels_or_no_data_stays_finite():
    w = torch.randn(16, 64) * 0.1
    x = _activations(200, 64, seed=4)
    x[:, 5] = 0  # a channel no token used
    for h in (x.T @ x, torch.zeros(64, 64)):
        got = dequantize(gptq_int4(w, h, 32))
        assert torch.isfinite(got).all() and float((got - w).norm() / w.norm()) < 0.2


def test_the_recording_expert_function_is_swiglu_and_sums_each_experts_inputs():
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(24, 16, generator=g), torch.randn(24, 16, generator=g), torch.randn(16, 24, generator=g))
    hess, xs = Hessians(), [torch.randn(n, 16, generator=g) for n in (5, 7)]
    run = hess.ffn(3)
    for x in xs:
        torch.testing.assert_close(run(2, x, w), swiglu(x, *w))
    x = torch.cat(xs)
    torch.testing.assert_close(hess.inputs[(3, 2)], x.T @ x)
    mid = torch.nn.functional.silu(x @ w[0].T) * (x @ w[1].T)
    torch.testing.assert_close(hess.mids[(3, 2)], mid.T @ mid, rtol=1e-4, atol=1e-4)
    assert hess.tokens[(3, 2)] == 12 and hess.of((3, 2)) is None  # under MIN_TOKENS: the plain fit
    assert hess.of((3, 1)) is None


def test_quantize_calibrate_writes_copies_an_engine_reads(tiny_mixtral, tmp_path, monkeypatch, one_thread, capsys):
    from safetensors import safe_open

    from emoe.cli import main
    from emoe.engine import Engine, EngineConfig
    from emoe.policies import Shadow
    from emoe.copies import copies_path
    model = tmp_path / "m"
    shutil.copytree(tiny_mixtral, model)
    main(["quantize", "--model", str(model), "--bits", "4"])
    with safe_open(str(copies_path(model, 4)), "pt") as f:
        plain = {k: f.get_tensor(k) for k in f.keys()}
    for bad, msg in [(["--bits", "8", "--calibrate", "2"], "fits int4"), (["--calibrate", "-1"], "N >= 1"),
                     (["--data", "x.jsonl"], "without --calibrate")]:
        with pytest.raises(SystemExit, match=msg):  # (the CLI's one clear line for bad input)
            main(["quantize", "--model", str(model), *bad])
    monkeypatch.setattr(calibrate, "MIN_TOKENS", 1)
    main(["quantize", "--model", str(model), "--bits", "4", "--calibrate", "1", "--max-tokens", "4"])
    assert "experts had" in capsys.readouterr().err
    with safe_open(str(copies_path(model, 4)), "pt") as f:
        assert f.metadata()["calibrated"] == "6 training prompts"
        cal = {k: f.get_tensor(k) for k in f.keys()}
    assert cal.keys() == plain.keys() and all(cal[k].shape == plain[k].shape for k in cal)
    assert any(not torch.equal(cal[k], plain[k]) for k in cal if k.endswith(".data"))
    eng = Engine(EngineConfig(str(model), budget=0.6, miss_policy="reroute"), policy=Shadow(4))
    from emoe.report import summary
    assert "int4 calibrated on 6 training prompts" in summary(eng, 1.0)  # the startup line says which copies
    key = next(iter(eng.cache._shadow))
    held = eng.cache.copy_files[4].get(key)  # the calibrated values are what the engine holds
    assert torch.equal(held[0].data, cal[f"{key[0]}.{key[1]}.gate.data"])
    torch.testing.assert_close(dequantize(eng.cache._shadow[key][0]).cpu(), dequantize(held[0]))


def test_gptq_in_blocks_of_columns_equals_one_column_at_a_time():
    """The lazy batches move the same errors, only later and as one product."""
    w = torch.randn(24, 256, generator=torch.Generator().manual_seed(5)) * 0.05
    x = _activations(800, 256, seed=6)
    whole, blocks = gptq_int4(w, x.T @ x, 32, block=256), gptq_int4(w, x.T @ x, 32, block=32)
    assert (whole.data == blocks.data).float().mean() > 0.99  # (float32 sums in another order may round a level apart)
    torch.testing.assert_close(dequantize(whole), dequantize(blocks), atol=2e-3, rtol=0)


def test_calibration_whose_hessians_exceed_memory_is_refused_before_loading(tiny_mixtral, monkeypatch):
    from emoe.datasets import load_split
    monkeypatch.setattr(calibrate, "_available_memory", lambda: 1024)
    monkeypatch.setattr("emoe.engine.Engine.__init__", lambda *a, **k: pytest.fail("the model loaded"))
    with pytest.raises(ValueError, match="Hessians: .* more than half"):
        calibrate.collect(str(tiny_mixtral), load_split("train")[:2])


def test_passes_record_a_group_of_layers_at_a_time(tiny_mixtral, one_thread, monkeypatch):
    """Where the Hessians do not all fit, each group of layers is recorded in a pass of its own, once, as the copies
    ask for them in layer order; they equal one pass's over the same prompts (float rounding aside: layers not
    recorded run the model's own expert function)."""
    from emoe.checkpoint import Checkpoint
    from emoe.datasets import load_split
    monkeypatch.setattr(calibrate, "MIN_TOKENS", 1)
    cfg, examples = Checkpoint(str(tiny_mixtral)).config, load_split("train")[:3]
    one = calibrate.collect(str(tiny_mixtral), examples, max_tokens=4)
    runs = []
    passes = calibrate.Passes(str(tiny_mixtral), examples, max_tokens=4, memory=2 * calibrate.layer_bytes(cfg))
    real = passes.run
    passes.run = lambda layers: runs.append(list(layers)) or real(layers)
    keys = sorted((l, e) for l in cfg.moe_layers for e in range(cfg.num_experts))
    assert passes.groups == [[l] for l in cfg.moe_layers] and len(cfg.moe_layers) > 1
    for key in keys:
        got, want = passes.of(key), one.of(key)
        assert (got is None) == (want is None)
        if got is not None:
            for a, b in zip(got, want):
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-3)
    assert runs == passes.groups  # each group's pass once, in order
    assert passes.fitted == sum(one.of(k) is not None for k in keys) > 0
    whole = calibrate.Passes(str(tiny_mixtral), examples, memory=1 << 40)
    assert whole.groups == [list(cfg.moe_layers)]


def test_a_layer_whose_hessians_exceed_memory_is_refused_before_loading(tiny_mixtral, monkeypatch):
    from emoe.checkpoint import Checkpoint
    monkeypatch.setattr("emoe.engine.Engine.__init__", lambda *a, **k: pytest.fail("the model loaded"))
    one = calibrate.layer_bytes(Checkpoint(str(tiny_mixtral)).config)
    with pytest.raises(ValueError, match="Hessians: .* for one MoE layer, more than half"):
        calibrate.Passes(str(tiny_mixtral), [], memory=2 * one - 2)


def test_quantize_calibrates_in_passes_where_memory_is_short(tiny_mixtral, tmp_path, monkeypatch, one_thread, capsys):
    from safetensors import safe_open

    from emoe.checkpoint import Checkpoint
    from emoe.cli import main
    from emoe.copies import copies_path
    model = tmp_path / "m"
    shutil.copytree(tiny_mixtral, model)
    monkeypatch.setattr(calibrate, "MIN_TOKENS", 1)
    cfg = Checkpoint(str(model)).config

    def copies(memory):
        monkeypatch.setattr(calibrate, "_available_memory", lambda: memory)
        main(["quantize", "--model", str(model), "--bits", "4", "--calibrate", "1", "--max-tokens", "4"])
        with safe_open(str(copies_path(model, 4)), "pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    whole = copies(1 << 40)
    assert "1 pass(es)" in capsys.readouterr().err
    parts = copies(2 * calibrate.layer_bytes(cfg))
    assert f"{len(cfg.moe_layers)} pass(es)" in capsys.readouterr().err
    data = [k for k in whole if k.endswith(".data")]
    assert whole.keys() == parts.keys()
    assert sum(int((whole[k] == parts[k]).sum()) for k in data) / sum(whole[k].numel() for k in data) > 0.99
