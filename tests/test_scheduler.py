"""Schedulers on fake jobs (exact Eq. 3 arithmetic), and the engine loop's ΔE dry run on a tiny model."""
from dataclasses import dataclass, field

import pytest

from emoe.scheduler import FCFS, SJF, SchedContext, TaskAware, make_scheduler

NOW = 100.0


@dataclass(eq=False)
class FakeJob:
    task: str | None = "qa"
    prompt_len: int = 10
    generated: int = 0
    max_tokens: int = 1000
    arrival: float = NOW
    ttft_slo_s: float = 1.0
    tpot_slo_s: float = 0.1
    first_token_at: float | None = None
    engine_request: object = field(default=None)

    def __post_init__(self):
        self.engine_request = self


def ctx(**kw):
    kw.setdefault("out_len", {"qa": 10.0, "conversation": 200.0, "conv20": 20.0})
    kw.setdefault("prefill_cost_s", 0.002)
    return SchedContext(**kw)


# -- FCFS / SJF ----------------------------------------------------------------------------------
def test_fcfs_arrival_order_slots_and_token_budget():
    a, b, c = FakeJob(arrival=3), FakeJob(arrival=1), FakeJob(arrival=2)
    assert FCFS().select([a, b, c], [], 8, NOW, ctx()) == [b, c, a]
    assert FCFS().select([a, b, c], [], 2, NOW, ctx()) == [b, c]
    # token budget: stops at the first that does not fit (no overtaking) ...
    big = FakeJob(arrival=1.5, prompt_len=95)
    assert FCFS().select([a, b, c, big], [], 8, NOW, ctx(token_budget=100)) == [b]
    # ... but the first job of a step always fits, even over the budget
    assert FCFS().select([big], [], 8, NOW, ctx(token_budget=10)) == [big]


def test_sjf_picks_the_short_task_first():
    long_ = FakeJob(task="conversation", arrival=1)
    short = FakeJob(task="qa", arrival=2)
    c = ctx(token_cost_s=0.01)
    assert SJF().select([long_, short], [], 1, NOW, c) == [short]
    assert SJF().select([long_, short], [], 8, NOW, c) == [short, long_]
    # expected output is capped by max_tokens: a conversation asking for 2 tokens is short
    tiny = FakeJob(task="conversation", arrival=3, max_tokens=2)
    assert SJF().select([long_, short, tiny], [], 1, NOW, c) == [tiny]


# -- task-aware: Eq. 3 ----------------------------------------------------------------------------
def running_s(tpot=0.1, task="conv20"):
    """S arrived 1 s ago, first token at +0.1 s (TTFT 0.5 met), 10 of ~20 tokens done: G_S = 10;
    paced 0.09 s/token so far (≤ tpot)."""
    return FakeJob(task=task, arrival=NOW - 1, generated=10, first_token_at=NOW - 0.9,
                   ttft_slo_s=0.5, tpot_slo_s=tpot)


def test_task_aware_refuses_when_a_running_request_would_miss():
    # c = 0.08, a = 0: without R, t_S = 10·(1·0.08) + 1.0 = 1.8 ≤ D_S = TTFT 0.1 + 0.1·(10 − 1 + 10) = 2.0
    # with R (its expected output 20 ≥ G_S, so n_S = 2): 100·0.002 + 10·(2·0.08) + 1.0 = 2.8 > 2.0
    s, r = running_s(), FakeJob(task="conv20", prompt_len=100)
    c = ctx(token_cost_s=0.08)
    sch = TaskAware()
    assert TaskAware.finish_estimate(s, [s, r], 100, 0.0, NOW, c) == pytest.approx(2.8)
    assert TaskAware.e2e_budget(s, c) == pytest.approx(2.0)
    assert sch.select([r], [s], 4, NOW, c) == []
    assert sch.refusals == 1
    # slack: a looser TPOT gives D_S = 0.1 + 0.2·19 = 3.9, so R fits
    s2 = running_s(tpot=0.2)
    assert TaskAware().select([r], [s2], 4, NOW, c) == [r]
    # a short R (expected 5 < G_S = 10) finishes before S, so n_S stays 1
    short = FakeJob(task="qa", prompt_len=50, max_tokens=5)
    assert TaskAware().select([short], [s], 4, NOW, c) == [short]  # 0.1 + 0.8 + 1.0 = 1.9 ≤ 2.0
    # TTFT slack does not pay for decode: the paper's E2E budget 0.5 + 0.1·20 = 2.5 would admit R
    # (2.8 > 2.5 here too), but with a = 0.05 the step model alone says 0.2 + 10·(0.05 + 2·0.08) + 1.0 = 3.3
    assert TaskAware.finish_estimate(s, [s, r], 100, 0.0, NOW, ctx(token_cost_s=0.08, step_base_s=0.05)) \
        == pytest.approx(3.3)
    # without admission control the scheduler only orders
    assert TaskAware(admission_control=False).select([r], [s], 4, NOW, c) == [r]


def test_task_aware_protects_only_requests_meeting_their_slo():
    late = running_s()
    late.first_token_at = late.arrival + 0.8  # TTFT 0.8 > 0.5: already missed, cannot be saved
    r = FakeJob(task="conv20", prompt_len=100)
    assert TaskAware().select([r], [late], 4, NOW, ctx(token_cost_s=0.08)) == [r]
    # with nothing running, the head of the queue always gets in
    assert TaskAware().select([r], [], 4, NOW, ctx(token_cost_s=10.0)) == [r]


def test_task_aware_serves_feasible_jobs_first_shortest_first_and_counts_late_admissions():
    loose = FakeJob(arrival=NOW - 0.5, ttft_slo_s=5.0)
    tight = FakeJob(arrival=NOW - 0.2, ttft_slo_s=0.1)   # deadline already passed: a sure TTFT miss
    sch = TaskAware()
    assert sch.select([tight, loose], [], 1, NOW, ctx()) == [loose]
    assert sch.late_admissions == 0
    assert sch.select([tight, loose], [], 2, NOW, ctx()) == [loose, tight]  # late jobs still get served
    assert sch.late_admissions == 1
    # among jobs that can still make it, the task's expected job is what orders them (qa ~10 tokens)
    conv = FakeJob(task="conversation", arrival=NOW - 0.3, ttft_slo_s=5.0)
    qa = FakeJob(task="qa", arrival=NOW - 0.1, ttft_slo_s=5.0)
    assert TaskAware().select([conv, qa], [], 1, NOW, ctx()) == [qa]
    # late ones go oldest first
    late1 = FakeJob(arrival=NOW - 3, ttft_slo_s=1.0, task="qa")
    late2 = FakeJob(arrival=NOW - 2, ttft_slo_s=1.0, task="conversation")
    assert TaskAware().select([late2, late1], [], 1, NOW, ctx()) == [late1]


def test_task_aware_w_accumulates_and_late_refused_job_blocks_overtaking():
    s = running_s(tpot=0.2)   # D_S = 0.1 + 0.2·19 = 3.9; c = 0.08 → t_S = W·0.002 + n·0.8 + 1.0
    c = ctx(token_cost_s=0.08)
    r1 = FakeJob(task="qa", prompt_len=500, max_tokens=5, arrival=NOW - 0.1, ttft_slo_s=5)
    r2 = FakeJob(task="qa", prompt_len=500, max_tokens=5, arrival=NOW - 0.05, ttft_slo_s=5)
    # r1 alone: 1.0 + 0.8 + 1.0 = 2.8 fits; r1 + r2 share one prefill: W = 1000 → 2.0 + 0.8 + 1.0 = 3.8 fits
    assert TaskAware().select([r1, r2], [s], 4, NOW, c) == [r1, r2]
    # r1, once chosen, is protected too: with a tight TTFT, r2's prefill would make r1 miss
    # (t_r1 = 2.0 + 5·(3·0.08) + 0.1 = 3.3 > D_r1 = 1.2 + 0.1·4 = 1.6)
    r1.ttft_slo_s = 1.2
    assert TaskAware().select([r1, r2], [s], 4, NOW, c) == [r1]
    # late jobs: a refused one blocks the late ones behind it (oldest first, no starvation) ...
    old = FakeJob(task="conv20", prompt_len=1000, arrival=NOW - 3, ttft_slo_s=0.5)  # 2 + 1.6 + 1 > 3.9
    young = FakeJob(task="qa", prompt_len=10, arrival=NOW - 2, ttft_slo_s=0.5)
    c2 = ctx(token_cost_s=0.08, token_budget=4096)
    assert TaskAware().select([young, old], [s], 4, NOW, c2) == []
    # ... but not a job that can still make its TTFT, which goes first anyway
    fresh = FakeJob(task="qa", prompt_len=10, arrival=NOW, ttft_slo_s=5)
    assert TaskAware().select([old, fresh], [s], 4, NOW, c2) == [fresh]
    # a refused job that is not late is skipped so a later one may go
    big = FakeJob(task="conv20", prompt_len=1000, arrival=NOW, ttft_slo_s=5)
    small = FakeJob(task="qa", prompt_len=10, arrival=NOW, ttft_slo_s=5, max_tokens=50)
    small_first = TaskAware().select([big, small], [s], 4, NOW, c2)
    assert small_first == [small]


def test_g_resets_to_five_percent_when_exhausted():
    c = ctx(out_len={"conversation": 100.0})
    j = FakeJob(task="conversation")
    for gen, want in [(0, 100), (60, 40), (99, 1), (100, 5), (103, 2), (105, 5), (112, 3)]:
        j.generated = gen
        assert c.remaining(j) == pytest.approx(want), gen
    j.max_tokens, j.generated = 102, 100   # never more than max_tokens allows
    assert c.remaining(j) == pytest.approx(2)
    assert ctx(out_len={}).expected_out(FakeJob(task="qa")) == 64  # no profile: default length
    assert ctx().expected_out(FakeJob(task=None, max_tokens=8)) == 8


def test_delta_e_is_included():
    s = running_s(tpot=0.2)  # D_S = 3.9; a short R: t_S = 0.2 + 1·10·0.08 + 1.0 = 2.0, plus ΔE
    r = FakeJob(task="qa", prompt_len=100, max_tokens=5)
    seen = []

    def delta(reqs):
        seen.append(list(reqs))
        return 2.0  # loading stalls S by 2 s: 4.0 > 3.9
    assert TaskAware().select([r], [s], 4, NOW, ctx(token_cost_s=0.08)) == [r]
    assert TaskAware().select([r], [s], 4, NOW, ctx(token_cost_s=0.08, delta_e=delta)) == []
    assert seen and seen[0] == [s, r]  # ΔE is asked for running + candidate
    assert TaskAware().select([r], [s], 4, NOW, ctx(token_cost_s=0.08, delta_e=lambda q: 1.8)) == [r]


def test_make_scheduler():
    assert [make_scheduler(n).name for n in ("fcfs", "sjf", "task-aware")] == ["fcfs", "sjf", "task-aware"]
    with pytest.raises(ValueError, match="unknown scheduler"):
        make_scheduler("edf")


# -- the engine loop on a tiny model: ΔE from the residency plan, never applied ------------------------
@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("interleave", [True, False], ids=["interleaved-prefill", "whole-prefill"])
def test_engine_loop_delta_e_dry_run_and_serving(tiny_mixtral, interleave):
    import torch

    from emoe.engine import Engine, EngineConfig, SamplingParams
    from emoe.policies import Reroute
    from emoe.profile import Profile
    from emoe.residency import TaskAware as TaskAwareResidency
    from emoe.serving import EngineLoop, Job

    tasks = ["qa", "code"]
    prompts = ["Answer the question: who wrote Hamlet?", "SELECT name FROM users WHERE id = 3;"] * 2
    ref = Engine(EngineConfig(str(tiny_mixtral), miss_policy="all", trace=True, max_batch=4))
    done = ref.generate(prompts, SamplingParams(max_tokens=4, ignore_eos=True), tasks=tasks * 2, chat=False)
    c = ref.cfg
    prof = Profile("x", tasks, c.num_layers, c.num_experts, c.top_k, list(c.moe_layers),
                   out_len={"qa": 4.0, "code": 6.0}, prompt_len={"qa": 9.0, "code": 12.0}, load_latency_s=0.01,
                   expert_bytes=ref.cache.expert_bytes, token_cost_s={"decode": 0.01, "prefill": 0.001},
                   sensitivity={t: [1] * c.num_layers for t in tasks}, similarity={},
                   traces=[r.trace for r in done])
    eng = Engine(EngineConfig(str(tiny_mixtral), budget=0.5, max_batch=2), policy=Reroute(),
                 residency=lambda cap: TaskAwareResidency(prof, cap))
    loop = EngineLoop(eng, "task-aware", prof, max_waiting=8, interleave=interleave)
    assert loop.ctx.out_len == prof.out_len and loop.ctx.token_cost_s == 0.01

    # force a resident set the code task's plan disagrees with, then ask for ΔE
    eng.cache.set_resident({l: [0, 1] if l % 2 else [6, 7] for l in c.moe_layers})
    before = sorted(eng.cache.resident())
    params = SamplingParams(max_tokens=5, ignore_eos=True)
    jobs = [Job(eng.make_request(p, params, t, chat=False), ttft_slo_s=5, tpot_slo_s=1)
            for p, t in zip(prompts, tasks * 2)]
    plan = eng.residency.plan([jobs[1].req], eng.cache)
    want = sum(len(set(ids) - set(eng.cache.resident(l))) for l, ids in plan.items())
    assert want > 0
    assert loop._delta_e([jobs[1].req]) == pytest.approx(want * 0.01)
    assert sorted(eng.cache.resident()) == before  # planned, not applied

    loop.start()
    for j in jobs:
        loop.submit(j)
    for j in jobs:
        assert j.done.wait(30)
    loop.shutdown(5)
    assert [j.finish_reason for j in jobs] == ["length"] * 4
    assert all(j.generated == 5 and j.events[-1] == ("done", "length") for j in jobs)
    assert "".join(e[1] for e in jobs[0].events if e[0] == "delta") == eng.text(jobs[0].req)
    assert len(eng.free_slots) == 2 and eng.cache.used_bytes <= eng.cache.budget_bytes
    assert loop.load_latency_s > 0 and torch.get_num_threads() == 1
    text = loop.metrics.text().decode()
    assert 'emoe:request_success_total{finished_reason="length",model_name="emoe"} 4.0' in text
    assert "emoe:expert_bytes_loaded_total" in text and "emoe:slo_met_total" in text


def test_delta_e_prices_precision_plans_and_a_failing_scheduler_fails_requests(tiny_mixtral):
    """With shadow copies the loader's plan sets precisions; ΔE counts the bytes it would bring in.
    A scheduler that raises fails the waiting requests (the loop survives) instead of hanging them."""
    from emoe.cache import Plan
    from emoe.engine import Engine, EngineConfig, SamplingParams
    from emoe.policies import Shadow
    from emoe.profile import Profile
    from emoe.residency import Popular
    from emoe.serving import EngineLoop, Job

    ref = Engine(EngineConfig(str(tiny_mixtral), miss_policy="all", trace=True))
    done = ref.generate(["a b c", "d e f g"], SamplingParams(max_tokens=3, ignore_eos=True), tasks=["qa"] * 2,
                        chat=False)
    c = ref.cfg
    prof = Profile("x", ["qa"], c.num_layers, c.num_experts, c.top_k, list(c.moe_layers), out_len={"qa": 3.0},
                   prompt_len={"qa": 4.0}, load_latency_s=0.01, expert_bytes=ref.cache.expert_bytes,
                   token_cost_s={"decode": 0.01, "prefill": 0.001}, sensitivity={"qa": [1] * c.num_layers},
                   similarity={}, traces=[r.trace for r in done])

    class Planned(Popular):  # a fixed precision plan, so ΔE is known exactly
        def plan(self, batch, cache):
            return Plan({l: [16] + [8] * (c.num_experts - 1) for l in c.moe_layers})

    eng = Engine(EngineConfig(str(tiny_mixtral), budget=0.9, max_batch=2), policy=Shadow(4, hi_bits=8),
                 residency=lambda cap: Planned(prof, cap))
    loop = EngineLoop(eng, "task-aware", prof)
    eng.cache.set_resident(Plan({l: [4] * c.num_experts for l in c.moe_layers}))
    req = eng.make_request("a b", SamplingParams(max_tokens=2), "qa", chat=False)
    plan = eng.residency.plan([req], eng.cache)
    want = eng.cache.incoming_bytes(plan)
    cost = eng.cache.levels().cost
    assert want == len(c.moe_layers) * (cost[16] - cost[4] + (c.num_experts - 1) * (cost[8] - cost[4]))
    assert loop._delta_e([req]) == pytest.approx(want / eng.cache.expert_bytes * loop.load_latency_s)
    loop.start()  # served under the plan: misses run on int8 copies, and /metrics counts them
    job = Job(eng.make_request("a b c d", SamplingParams(max_tokens=4, ignore_eos=True), "qa", chat=False),
              ttft_slo_s=5, tpot_slo_s=1)
    loop.submit(job)
    assert job.done.wait(30) and job.finish_reason == "length"
    loop.shutdown(1)
    runs = [ln for ln in loop.metrics.text().decode().splitlines() if ln.startswith("emoe:expert_shadow_runs_total")]
    assert runs and float(runs[0].split()[-1]) == eng.cache.stats.shadow_uses > 0

    from emoe.scheduler import make_scheduler
    broken = make_scheduler("fcfs")

    def select(*a):
        raise RuntimeError("scheduler bug")
    broken.select = select
    loop = EngineLoop(eng, broken, prof)
    loop.start()
    job = Job(eng.make_request("a b", SamplingParams(max_tokens=2), "qa", chat=False), ttft_slo_s=5, tpot_slo_s=1)
    loop.submit(job)
    assert job.done.wait(10) and job.finish_reason == "error" and "scheduler bug" in job.error
    assert loop.alive and loop.errors == 1
    loop.shutdown(1)


def test_parse_slo_flag():
    """--slo parses alone; its task names are checked once serve knows the profile's tasks (a user's own ones too)."""
    from emoe.datasets import TASKS
    from emoe.scheduler import check_slo_tasks, parse_slo
    assert parse_slo("qa:1000:150") == ("qa", (1000.0, 150.0))
    assert parse_slo("default:2500:80.5") == (None, (2500.0, 80.5))
    for bad, msg in [("qa:1000", "TASK:TTFT_MS:TPOT_MS"), (":1:1", "names no task"),
                     ("qa:fast:1", "milliseconds"), ("qa:0:10", "positive"), ("qa:10:inf", "positive")]:
        with pytest.raises(ValueError, match=msg):
            parse_slo(bad)
    slos = dict([parse_slo("astrology:1:1"), parse_slo("default:5:5")])
    with pytest.raises(ValueError, match="unknown task 'astrology'"):
        check_slo_tasks(slos, TASKS)
    check_slo_tasks(slos, (*TASKS, "astrology"))  # a profile of the user's prompts knows it


def test_fit_step_cost_is_affine_in_batch_size():
    from emoe.scheduler import fit_step_cost
    a, c = fit_step_cost({1: (0.012, 10), 4: (0.018, 10), 8: (0.026, 3)})  # exactly 0.010 + 0.002·n
    assert a == pytest.approx(0.010) and c == pytest.approx(0.002)
    assert fit_step_cost({4: (0.02, 5)}) == (0.0, pytest.approx(0.005))   # one size: the paper's n·c
    assert fit_step_cost({1: (0.03, 5), 8: (0.02, 5)}) == (pytest.approx(0.025), 0.0)  # never a negative c
    a, c = fit_step_cost({2: (0.001, 5), 8: (0.04, 5)})                    # never a negative a
    assert a == 0.0 and c > 0
    with pytest.raises(ValueError):
        fit_step_cost({})


def test_scheduler_metrics_count_deltas_and_show_the_fit():
    from types import SimpleNamespace

    from emoe.metrics import Metrics
    m, sch = Metrics("tiny"), SimpleNamespace(refusals=3, late_admissions=1)
    m.sync_scheduler(sch, ctx(step_base_s=0.007, token_cost_s=0.001))
    sch.refusals = 5
    m.sync_scheduler(sch, ctx(step_base_s=0.008, token_cost_s=0.001))
    text = m.text().decode()
    assert 'emoe:scheduler_refusals_total{model_name="tiny"} 5.0' in text
    assert 'emoe:scheduler_late_admissions_total{model_name="tiny"} 1.0' in text
    assert 'emoe:decode_step_base_seconds{model_name="tiny"} 0.008' in text


def test_the_engine_thread_owns_the_only_openmp_team():
    """EngineLoop.start frees the loading thread's OpenMP workers (torch's CPU ops made them), so that the
    engine thread's are alone on the cores; torch keeps working in both threads afterwards, with the same
    results. (Its speed effect is measured by scripts/bench_serve_llamacpp.py, not here.)"""
    import threading

    import torch

    from emoe.serving import release_openmp
    torch.manual_seed(0)
    a, b = torch.randn(256, 512), torch.randn(512, 384)
    want = a @ b
    import glob
    import os
    gomp = glob.glob(os.path.join(os.path.dirname(torch.__file__), "lib", "libgomp*"))
    assert release_openmp() is bool(gomp)  # the CPU wheels' libgomp has omp_pause_resource_all
    got = []
    th = threading.Thread(target=lambda: got.append(a @ b))
    th.start()
    th.join()
    assert torch.equal(got[0], want) and torch.equal(a @ b, want)
