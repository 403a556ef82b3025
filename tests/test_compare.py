"""bench compare's bookkeeping: median-of-repeats selection, ratios, the side-by-side table."""
import pytest

from emoe.bench import compare


def fake(goodput, e2e):
    st = {"mean": e2e, "median": e2e, "p99": e2e}
    return {"completed": 10, "num_requests": 10, "duration_s": 1.0, "output_token_throughput": 5.0,
            "goodput": goodput, "slo_attainment": {"overall": 0.5}, "ttft_ms": st, "tpot_ms": st, "e2e_ms": st}


def test_median_run_and_ratios_of_medians():
    runs = [fake(3.0, 100.0), fake(9.0, 50.0), fake(6.0, 80.0)]
    m = compare._median_run(runs)
    assert m["goodput"] == 6.0 and m["runs"]["goodput"] == [3.0, 9.0, 6.0]
    res = {"emoe": m, "emoe-fcfs": compare._median_run([fake(2.0, 90.0), fake(4.0, 120.0), fake(3.0, 100.0)]),
           "lru-fcfs": compare._median_run([fake(1.0, 400.0)]), "all-fcfs": compare._median_run([fake(6.0, 80.0)])}
    r = compare.ratios(res)
    assert r["goodput_taskaware_over_fcfs"] == pytest.approx(6.0 / 3.0)
    assert r["e2e_emoe_over_lru"] == pytest.approx(80.0 / 400.0)     # median of 100/50/80 over 400
    assert r["e2e_emoe_over_all"] == pytest.approx(1.0)
    table = compare.side_by_side(res)
    assert "goodput each run" in table and "3.0/9.0/6.0" in table and "goodput_taskaware_over_fcfs: 2.00x" in table


def test_run_rejects_bad_arguments():
    with pytest.raises(ValueError, match="repeats"):
        compare.run(None, "p", 0.4, {}, None, repeats=0)
    with pytest.raises(ValueError, match="unknown configurations"):
        compare.run(None, "p", 0.4, {}, None, only=["vllm"])
