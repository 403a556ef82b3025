"""`emoe bench kernel` end to end on the embedded model, at the smallest settings (numbers are not checked:
timing claims live in the benchmark's output, not in tests)."""
import pytest

from emoe import default_model_dir, quant


@pytest.mark.skipif(not quant.kernel_fits((64, 64), 32), reason="no CPU int4 kernel in this torch")
def test_bench_kernel_runs_both_paths_side_by_side(one_thread):
    from emoe.bench import kernel
    ops = kernel.ops(default_model_dir(), tokens=(1,), repeats=1, calls=2)
    assert [r["matrix"] for r in ops] == ["gate/up", "down"]
    assert all(r[k] > 0 for r in ops for k in ("full_fp32_us", "int4_dequant_us", "int4_kernel_us", "int8_kernel_us"))
    e2e = kernel.end_to_end(default_model_dir(), budgets=(0.4,), max_tokens=2, rounds=1)
    assert [(r["budget"], r["kernel"]) for r in e2e] == [(1.0, None), (0.4, True), (0.4, False)]
    assert e2e[0]["agreement"] == 1.0 and all(0 <= r["agreement"] <= 1 for r in e2e)
    assert e2e[1]["shadow_runs"] > 0 and e2e[2]["shadow_runs"] > 0
    out = kernel.table(ops, e2e)
    assert "deq/kern" in out and "speed-up" in out
