"""`emoe eval`: accuracy, memory and overhead of every residency policy at every budget, one run.

A mixed stream of test-split prompts (uniformly random task per request, as in the paper) is served
by each policy × budget in arrival order, `batch` requests at a time, so the loader re-plans on every
admission. Each is compared with the all-resident run of the same stream:
  similarity       embedding cosine of generated text (all-MiniLM-L6-v2; paper-comparable)
  token_agreement  teacher-forced next-token agreement on the all-resident outputs (strict)
  ppl_ratio        perplexity of the reference answers relative to all-resident
"""
from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass

import torch

from .adaptive import Adapt
from .cache import BudgetError
from .engine import Engine, EngineConfig, SamplingParams
from .policies import AllResident, Auto, Host, Hybrid, LoadOnDemand, PreGated, Reroute, Selective, Shadow, Slack
from .profile import Profile
from .residency import ByLayer, EMoE, Hindsight, MoEInfinity, Popular, RandomSet, TaskAware

POLICIES = ("all", "random", "popular", "task-static", "lru", "moe-infinity", "pregated",
            "emoe-a", "emoe-l", "emoe-e")
# beyond the paper: per-task hybrid miss policy, prompt-aware refresh, sticky plans (fewer moves), and
# sticky plans with selective loading (a miss on a token's first choice is loaded, the rest rerouted)
# Any reroute-based policy with a -q4 / -q8 / -q48 suffix serves misses from low-bit shadow copies
# instead (policies.Shadow); q4 / q8 alone quantise every expert and keep none at full precision.
EXTRA = ("oracle", "emoe-a-hybrid", "emoe-a-prompt", "emoe-a-sticky", "emoe-a-sticky-prompt", "emoe-a-selective",
         "q4", "q8", "emoe-a-sticky-q4", "emoe-a-sticky-q8", "emoe-a-sticky-q48", "task-static-q48", "popular-q48",
         "layers-host",  # layers-host: llama.cpp's --n-cpu-moe, whole layers in the fast tier, misses on the host
         "emoe-u", "emoe-u-prompt")  # emoe-u: eMoE-A fitted for unlabelled traffic too (train-predictor --unlabelled)
SHADOWED = ("q4", "q8", "q48")  # int4 or int8 copies, or q48: none / int4 / int8 / full per expert by plan
# A -host suffix runs misses on the host CPU with the expert's own weights (policies.Host): exact output,
# the residency plan only decides how much expert work the fast device does. -auto loads the misses that
# have enough tokens for a copy to pay (policies.Auto).
SUFFIXES = SHADOWED + ("host", "auto", "slack", "adapt")  # -slack: the plan in 3/4 of the budget, misses loaded into the rest


ASYNC = "-async"  # any policy, its plans' loads landing on a worker thread (loader.Mover), not in place


def known(name: str) -> bool:
    name = name.removesuffix(ASYNC)
    base, _, q = name.rpartition("-")
    return name in POLICIES + EXTRA or (q in SUFFIXES and base in POLICIES + EXTRA and base not in SHADOWED)


STICKY = 1.0  # emoe-a-sticky: a resident expert yields only to one expecting 2× its tokens


@dataclass(slots=True)
class Setup:
    profile: Profile
    predictors: dict  # "a" / "l" → Predictor (may be empty when no emoe policy is asked for)
    p: int = 40
    adaptive: bool = False
    stickiness: float = 0.0  # task-static and eMoE plans: see loader.plan_top
    # oracle: prompt ids → Trace of the all-resident run (evaluate fills it in)
    routing: dict | None = None

    def __post_init__(self):
        if not 0 <= self.stickiness < float("inf") or self.p < 1:
            raise ValueError(f"stickiness must be >= 0 and p >= 1, got {self.stickiness} and {self.p}")


def build(name: str, s: Setup):
    """Policy name → (miss policy object, residency factory or None)."""
    prof = s.profile
    if name in ("q4", "q8"):
        return _shadow(name, full=False), None
    base, _, q = name.rpartition("-")
    if q in SUFFIXES and base:
        policy, residency = build(base, s)
        if type(policy) is not Reroute:
            raise ValueError(f"{name}: -{q} replaces rerouting; {base} uses the {policy.name} miss policy")
        hosts = {"host": Host, "auto": Auto, "slack": Slack, "adapt": Adapt}
        return (hosts[q]() if q in hosts else _shadow(q)), residency

    def emoe(kind, p, label, **kw):
        if kind not in s.predictors:
            raise ValueError(f"policy {label} needs a trained predictor; run `emoe train-predictor`")
        kw.setdefault("stickiness", s.stickiness)
        return lambda cap: EMoE(prof, cap, s.predictors[kind], p=p, name=label, adaptive=s.adaptive, **kw)

    table = {
        "all": lambda: (AllResident(), None),
        "random": lambda: (Reroute(), lambda cap: RandomSet(prof, cap)),
        "popular": lambda: (Reroute(), lambda cap: Popular(prof, cap)),
        "task-static": lambda: (Reroute(), lambda cap: TaskAware(prof, cap, stickiness=s.stickiness)),
        "lru": lambda: (LoadOnDemand(), None),
        "oracle": lambda: (Reroute(), lambda cap: Hindsight(prof, cap, s.routing)),
        "moe-infinity": lambda: (Reroute(), lambda cap: MoEInfinity(prof, cap)),
        "layers": lambda: (Reroute(), lambda cap: ByLayer(prof, cap)),  # llama.cpp --n-cpu-moe; with -host
        "pregated": lambda: (PreGated(), lambda cap: Popular(prof, cap)),
        "emoe-a": lambda: (Reroute(), emoe("a", s.p, "emoe-a")),
        "emoe-l": lambda: (Reroute(), emoe("l", s.p, "emoe-l")),
        "emoe-e": lambda: (Reroute(), emoe("a", 1, "emoe-e")),
        "emoe-u": lambda: (Reroute(), emoe("u", s.p, "emoe-u")),  # predictor-u: unlabelled traffic too
        "emoe-u-prompt": lambda: (Reroute(), emoe("u", s.p, "emoe-u-prompt", prompt_aware=True)),
        "emoe-a-hybrid": lambda: (Hybrid(prof.sensitivity), emoe("a", s.p, "emoe-a-hybrid")),
        "emoe-a-prompt": lambda: (Reroute(), emoe("a", s.p, "emoe-a-prompt", prompt_aware=True)),
        "emoe-a-sticky": lambda: (Reroute(), emoe("a", s.p, "emoe-a-sticky", stickiness=max(s.stickiness, STICKY))),
        "emoe-a-sticky-prompt": lambda: (Reroute(), emoe("a", s.p, "emoe-a-sticky-prompt", prompt_aware=True,
                                                         stickiness=max(s.stickiness, STICKY))),
        "emoe-a-selective": lambda: (Selective(0.5), emoe("a", s.p, "emoe-a-selective",
                                                          stickiness=max(s.stickiness, STICKY))),
    }
    if name not in table:
        raise ValueError(f"unknown policy {name!r}; choose from {', '.join(POLICIES + EXTRA)}")
    if name == "oracle" and s.routing is None:
        raise ValueError("oracle plans from the routing an all-resident run of the same requests recorded: it is "
                         "a bound that only `emoe eval` can compute, not a policy to serve with")
    return table[name]()


def _shadow(q: str, full: bool = True) -> Shadow:
    return Shadow(4, full=full, hi_bits=8) if q == "q48" else Shadow(int(q[1]), full=full)


def test_stream(n: int, seed: int = 0, tasks=None, fits=None, split: str = "test"):
    """n test-split examples, a uniformly random task per request; `fits` filters out prompts too long.
    split="val" is for design choices, so that the test split only reports them."""
    from .datasets import load_split
    from .datasets import tasks as known
    rng = random.Random(seed)
    by_task = {t: [e for e in load_split(split, t) if fits is None or fits(e.prompt)] for t in (tasks or known())}
    by_task = {t: v for t, v in by_task.items() if v}
    for t in by_task:
        rng.shuffle(by_task[t])
    names = sorted(by_task)
    picks = [rng.choice(names) for _ in range(n)]
    seen = {t: 0 for t in names}
    out = []
    for t in picks:
        out.append(by_task[t][seen[t] % len(by_task[t])])
        seen[t] += 1
    return out


def group_by_task(stream, window: int):
    """Reorder each run of `window` consecutive arrivals by task (stable), so batches are mostly one task:
    what a scheduler that holds requests up to `window` arrivals could do. 0 or 1 = arrival order."""
    if window <= 1:
        return list(stream)
    out = []
    for i in range(0, len(stream), window):
        chunk = stream[i: i + window]
        first = {t: k for k, t in reversed(list(enumerate(e.task for e in chunk)))}
        out += sorted(chunk, key=lambda e: first[e.task])
    return out


def serve_stream(eng: Engine, stream, params: SamplingParams, batch: int, refs=None, unlabelled: bool = False):
    """Serve in arrival order; right after each batch, score it teacher-forced under the residency it
    was served with. Returns per-request dicts. unlabelled: the engine is told no request's task."""
    rows, t0 = [], time.perf_counter()
    score_s = 0.0
    for i in range(0, len(stream), batch):
        chunk = stream[i: i + batch]
        st = eng.cache.stats  # (read through the property: that settles the counts kept on the device)
        h0, m0 = st.hits, st.misses
        reqs = eng.generate([e.prompt for e in chunk], params, tasks=[None if unlabelled else e.task for e in chunk])
        ts = time.perf_counter()
        st = eng.cache.stats
        hits = [st.hits - h0, st.hits - h0 + st.misses - m0]  # the batch's: its requests share the fast tier
        with eng.uncounted():  # the metrics' passes are not served
            rows += _scored(eng, chunk, reqs, refs[i: i + batch] if refs else None, hits, unlabelled)
        score_s += time.perf_counter() - ts
    return rows, time.perf_counter() - t0 - score_s


def _scored(eng: Engine, chunk, reqs, refs, hits, unlabelled: bool) -> list[dict]:
    """A served batch's rows: texts, the answers' NLL and agreement with the reference, teacher-forced."""
    rows = []
    for j, (e, r) in enumerate(zip(chunk, reqs)):
        row = {"task": e.task, "text": eng.text(r), "prompt_ids": r.prompt_ids, "output_ids": r.output_ids,
               "trace": r.trace, "hits": hits if j == 0 else [0, 0]}
        ans = eng.codec.encode(e.answer)[:64] if e.answer else []
        if ans:
            lp = torch.log_softmax(eng.score(r.prompt_ids, ans, None if unlabelled else e.task), -1)
            row["answer_nll"] = float(-lp.gather(1, torch.tensor(ans, device=lp.device)[:, None]).mean())
        ref = refs[j] if refs else None
        if ref and ref["output_ids"]:
            pred = eng.score(ref["prompt_ids"], ref["output_ids"], None if unlabelled else e.task).argmax(-1).cpu()
            row["agree"] = (int((pred == torch.tensor(ref["output_ids"])).sum()), len(ref["output_ids"]))
        rows.append(row)
    return rows


def grid(setup: Setup, policies: list[str], budgets: list[float]) -> list[tuple[str, str, float, Setup]]:
    """(label, policy, budget, setup) for every policy × budget; 'all' runs once, at 1.0."""
    # all and the all-quantised q4/q8 hold the same bytes at every budget: one run each
    return [(p, p, b, setup) for p in policies for b in ([1.0] if p in ("all", "q4", "q8") else budgets)]


def evaluate(model: str, configs: list[tuple[str, str, float, Setup]], n: int = 60, max_tokens: int = 48,
             batch: int = 4, seed: int = 0, experts_on: str = "ram", similarity=None, log=print,
             group_window: int = 0, dtype: str | None = None, split: str = "test",
             reference_budget: float = 1.0, unlabelled: bool = False, host_int8: bool = False) -> list[dict]:
    """dtype: the fast tier's (and compute) dtype; default as the engine's (float32 on CPU). bfloat16
    prices experts as a GPU would, which matters for what a low-bit shadow costs relative to a full copy;
    copies then keep the portable layout a GPU would hold (2-byte scales), not the CPU kernel's.
    reference_budget < 1: the reference outputs of a model larger than memory, with the experts the
    budget leaves out run in the slow tier (the model's own outputs, as all-resident gives them). experts_on disk
    on a CPU, with host_int8 for full-precision experts: the fast tier holds kernel forms and misses read them
    (formstore), so bytes_read is what a model larger than RAM reads from disk while serving."""
    from .profile import exact_engine
    if similarity is None:
        from .similarity import embedding_similarity as similarity
    params = SamplingParams(max_tokens=max_tokens)
    oracle = any(name.partition("-")[0] == "oracle" for _, name, _, _ in configs)  # it needs the routing
    ref_eng = Engine(EngineConfig(model, max_batch=batch, trace=oracle,
                                  **exact_engine(reference_budget, experts_on, dtype)))
    stream = group_by_task(test_stream(n, seed, fits=lambda p: ref_eng.fits(p, max_tokens + 64), split=split),
                           group_window)
    refs, ref_secs = serve_stream(ref_eng, stream, params, batch)
    ref_eng = None  # each engine below holds its budget of the model: never two at once (profile.run_profile's rule)
    ref_nll = _mean([r["answer_nll"] for r in refs if "answer_nll" in r])
    routing = {tuple(r["prompt_ids"]): r["trace"] for r in refs if r["trace"] is not None}
    for *_, setup in configs:
        setup.routing = routing
    records = []
    for label, name, b, setup in configs:
        policy, residency = build(name.removesuffix(ASYNC), setup)
        eng = None
        try:
            eng = Engine(EngineConfig(model, budget=b, miss_policy=policy.name, max_batch=batch,
                                      experts_on=experts_on, dtype=dtype, qkernel=dtype != "bfloat16",
                                      host_int8=host_int8, async_loads=name.endswith(ASYNC)),
                         policy=policy, residency=residency)
        except BudgetError as e:  # e.g. int8 shadows alone exceed a small budget: a gap, not a failed run
            log(f"{label:13} {b:4.2f} skipped: {e}")
            continue
        read0 = eng.store.stats.bytes_read  # the start's fill is not serving
        rows, secs = serve_stream(eng, stream, params, batch, refs, unlabelled)
        sims = similarity([r["text"] for r in rows], [r["text"] for r in refs])
        scored = [r["agree"] for r in rows if "agree" in r]
        agree = sum(a for a, _ in scored) / max(1, sum(n_ for _, n_ in scored))
        st, ld = eng.cache.stats, eng.loader.stats
        rec = {"policy": label, "budget": b, "p": setup.p if name.startswith("emoe") else None,
               "group_window": group_window, "unlabelled": unlabelled, "dtype": str(eng.dtype).removeprefix("torch."),
               "resident_fraction": eng.cache.used_bytes / eng.total_expert_bytes,
               "resident_bytes": eng.cache.used_bytes, "similarity": None, "token_agreement": agree,
               "ppl_ratio": math.exp(_mean([r["answer_nll"] for r in rows if "answer_nll" in r]) - ref_nll),
               "hit_rate": st.hit_rate, "bytes_moved": st.bytes_loaded,
               "overhead_share": (ld.seconds + st.wait_seconds) / secs,  # planning, moves and waits for them
               "stall_share": max(0.0, st.load_seconds - ld.move_seconds) / secs,  # on-demand loads
               "move_share": ld.move_seconds / secs,
               "wait_share": st.wait_seconds / secs,  # layer calls waiting for loads landing (a mover's exposed part)
               "landing_share": getattr(eng.cache.mover, "busy_seconds", 0.0) / secs,  # the mover's own time, overlapped
               "tokens_per_s": sum(len(r["output_ids"]) for r in rows) / secs,
               "relative_speed": ref_secs / secs,
               "predictor_calls": getattr(eng.residency, "calls", 0),
               "shadow_bits": getattr(policy, "shadow_bits", 0), "shadow_uses": st.shadow_uses,
               "host_runs": st.host_runs,
               "bytes_read": eng.store.stats.bytes_read - read0,  # slow-tier reads: loads and host runs (disk, on formstore)
               "switches": getattr(policy, "switches", None),  # adaptive.Adapt's (layer calls, mode) changes
               "per_request": {"agree": [list(r.get("agree", (0, 0))) for r in rows],
                               # hit counts of each batch, on its first request (hit rate resampled by batch)
                               "hits": [r["hits"] for r in rows],
                               # kept so a run on a machine without the embedding model can be rescored
                               "task": [r["task"] for r in rows], "text": [r["text"] for r in rows],
                               "ref_text": [r["text"] for r in refs]}}
        _summarise(rec, sims)
        records.append(rec)
        log(f"{label:13} {b:4.2f} sim {rec['similarity']:.3f} agree {agree:.3f} ppl× {rec['ppl_ratio']:.2f} "
            f"hit {st.hit_rate:.3f} overhead {rec['overhead_share']:.4f} tok/s {rec['tokens_per_s']:.1f} "
            f"read {rec['bytes_read'] / 2**20:.0f} MiB" + (f" switches {rec['switches']}" if rec["switches"] else ""))
    return records


def paired_difference(a: dict, b: dict, key: str = "similarity", n_boot: int = 2000, seed: int = 0):
    """Mean of record a minus record b over the same requests, with a 95% paired-bootstrap interval:
    48–96 requests leave differences of a few hundredths unresolved, and this says which are."""
    def per_request(rec):
        pr = rec["per_request"]
        if key == "similarity":
            return torch.tensor(pr["similarity"]), None
        if key == "hit" and "hits" not in pr:
            raise ValueError("a record without per-batch hit counts (written before they were kept)")
        hits, n = torch.tensor(pr["hits" if key == "hit" else "agree"], dtype=torch.float64).T
        return hits, n
    (xa, na), (xb, nb) = per_request(a), per_request(b)
    if len(xa) != len(xb):
        raise ValueError("records come from different streams")
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(len(xa), (n_boot, len(xa)), generator=g)
    if na is None:
        diffs = (xa[idx] - xb[idx]).mean(1)
        point = float((xa - xb).mean())
    else:  # token agreement (and hit rate) pool tokens: a ratio of sums, resampled by request (by batch)
        diffs = xa[idx].sum(1) / na[idx].sum(1).clamp_min(1) - xb[idx].sum(1) / nb[idx].sum(1).clamp_min(1)
        point = float(xa.sum() / na.sum().clamp_min(1) - xb.sum() / nb.sum().clamp_min(1))
    lo, hi = torch.quantile(diffs.double(), torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return point, (lo, hi)


def versus_table(records: list[dict], base: str) -> str:
    """Every policy minus `base` at the same budget: similarity, agreement and hit rate (where both records kept
    it per batch), 95% paired-bootstrap CIs."""
    lines = [f"paired differences against {base} (95% bootstrap interval over requests)"]
    for r in records:
        b = next((x for x in records if x["policy"] == base and x["budget"] == r["budget"]), None)
        if b is None or r is b:
            continue
        (ds, (sl, sh)), (da, (al, ah)) = (paired_difference(r, b, k) for k in ("similarity", "agree"))
        line = (f"{r['policy']:18} {r['budget']:.2f}  similarity {ds:+.3f} [{sl:+.3f}, {sh:+.3f}]  "
                f"agreement {da:+.3f} [{al:+.3f}, {ah:+.3f}]")
        if "hits" in r["per_request"] and "hits" in b["per_request"]:
            dh, (hl, hh) = paired_difference(r, b, "hit")
            line += f"  hit rate {dh:+.3f} [{hl:+.3f}, {hh:+.3f}]"
        lines.append(line)
    return "\n".join(lines)


def deferred_similarity(a: list[str], b: list[str]) -> list[float]:
    """For machines without the eval extra: NaN now, filled in later by `rescore` from the kept texts."""
    return [math.nan] * len(a)


def _summarise(rec: dict, sims) -> None:
    pr = rec["per_request"]
    pr["similarity"] = [round(float(x), 4) for x in sims]
    rec["similarity"] = _mean(sims)
    rec["per_task"] = {t: {"similarity": _mean([s for s, k in zip(sims, pr["task"]) if k == t]),
                           "n": pr["task"].count(t)} for t in sorted(set(pr["task"]))}


def rescore(records: list[dict], similarity=None) -> list[dict]:
    """Recompute embedding similarity from the texts a run kept (e.g. one run with deferred similarity on a
    GPU machine that lacks the embedding model). Records from before texts were kept are refused."""
    if similarity is None:
        from .similarity import embedding_similarity as similarity
    for rec in records:  # all checked before any is changed
        if not {"text", "ref_text", "task"} <= set(rec.get("per_request", {})):
            raise ValueError(f"record {rec.get('policy')!r} at {rec.get('budget')} kept no texts to rescore "
                             "(written by an older emoe eval)")
    for rec in records:
        _summarise(rec, similarity(rec["per_request"]["text"], rec["per_request"]["ref_text"]))
    return records


def _mean(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else 0.0


def table(records: list[dict]) -> str:
    head = (f"{'policy':13} {'budget':>6} {'resident':>8} {'similarity':>10} {'agree':>6} {'ppl×':>5} "
            f"{'hit':>6} {'MiB moved':>9} {'overhead':>8} {'stall':>6} {'tok/s':>6}")
    lines = [head, "-" * len(head)]
    for r in records:
        lines.append(f"{r['policy']:13} {r['budget']:>6.2f} {r['resident_fraction']:>8.2f} {r['similarity']:>10.3f} "
                     f"{r['token_agreement']:>6.3f} {r['ppl_ratio']:>5.2f} {r['hit_rate']:>6.3f} "
                     f"{r['bytes_moved'] / 2**20:>9.1f} {r['overhead_share']:>8.2%} {r['stall_share']:>6.1%} "
                     f"{r['tokens_per_s']:>6.1f}")
    return "\n".join(lines)


def plot(records: list[dict], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for key, ax, label in (("similarity", axes[0], "embedding similarity to all-resident"),
                           ("token_agreement", axes[1], "teacher-forced token agreement")):
        for i, name in enumerate(dict.fromkeys(r["policy"] for r in records)):
            pts = sorted((r["resident_fraction"], r[key]) for r in records if r["policy"] == name)
            ax.plot(*zip(*pts), marker="osD^v<>pPX*h"[i % 12], linestyle=("-", "--", ":")[i // 10 % 3], label=name)
        ax.set_xlabel("resident fraction of routed-expert bytes")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
