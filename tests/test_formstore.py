"""emoe.formstore: on a CPU, a GGUF's experts on disk as kernel forms, the fast tier holding the budget's share of
them as they are (the model larger than RAM)."""

import pytest

from emoe.ckernel import lut_able
from emoe.engine import Engine, EngineConfig, SamplingParams
from emoe.formstore import FormDiskStore
from emoe.quant import KTensor

GREEDY = SamplingParams(max_tokens=8, ignore_eos=True)
PROMPTS = ["hello there", "the cat sat on"]


def _cfg(model, **kw) -> EngineConfig:
    """The disk forms tier is a CPU's (a GPU holds its fast tier's experts in its own memory): named, so that these
    tests hold on a machine with a GPU too."""
    return EngineConfig(str(model), device="cpu", **kw)


def _run(model, **kw):
    eng = Engine(_cfg(model, **kw))
    return eng, eng.generate(PROMPTS, GREEDY, chat=False)


def test_disk_forms_give_the_ram_tiers_tokens_at_any_budget(qwen_gguf_import, forms_cache_on):
    _, want = _run(qwen_gguf_import, miss_policy="host", budget=0, experts_on="ram")
    for policy, budget in (("host", 0.5), ("load", 0.5), ("host", 0.0), ("load", 0.99)):
        eng, got = _run(qwen_gguf_import, miss_policy=policy, budget=budget, experts_on="disk")
        assert isinstance(eng.store, FormDiskStore) and eng.cache.forms
        assert [r.output_ids for r in got] == [r.output_ids for r in want], (policy, budget)
        assert eng.cache.used_bytes <= eng.cache.budget_bytes
        held = [eng.cache.peek(k) for k in eng.cache.resident()]
        assert all(isinstance(t, KTensor) for w in held for t in w)  # the file's forms, not float copies
        if policy == "load":
            s = eng.cache.stats
            assert s.loads > 0 and s.evictions > 0 and eng.store.stats.reads >= s.loads


def test_the_fast_tier_charges_each_expert_its_forms_not_float32(qwen_gguf_import, forms_cache_on):
    eng, _ = _run(qwen_gguf_import, miss_policy="host", budget=0.5, experts_on="disk")
    store = eng.store
    sizes = {k: sum(t.nbytes for t in store.read(*k)) for k in store._spans}
    assert store.expert_nbytes == max(sizes.values()) and eng.cache.expert_bytes == store.expert_nbytes
    c = eng.cfg
    # Q4_K / Q8_0 / Q6_K as forms: 5 / 9 / 8 bits a weight where ckernel's AVX2 routines take one-plane forms,
    # else Q8_0 and Q6_K as two nibble planes (10 bits each): under 1.1 bytes a weight either way, not float32's 4
    per_weight = 1.0 if lut_able() else 1.1
    assert store.expert_nbytes < per_weight * 3 * c.moe_intermediate_size * c.hidden_size
    assert len(eng.cache) == int(0.5 * eng.total_expert_bytes) // store.expert_nbytes


def test_a_second_start_reads_the_layer_files_and_a_torn_one_is_rebuilt(qwen_gguf_import, forms_cache_on, monkeypatch):
    from emoe import forms
    built = []
    real = forms.host_forms_of
    monkeypatch.setattr(forms, "host_forms_of", lambda *a: built.append(1) or real(*a))
    _run(qwen_gguf_import, miss_policy="host", budget=0.5, experts_on="disk")
    n = len(built)
    assert n
    eng, first = _run(qwen_gguf_import, miss_policy="host", budget=0.5, experts_on="disk")
    assert len(built) == n  # nothing built again
    (folder,) = list(forms_cache_on.iterdir())
    layer0 = folder / "layer-0.safetensors"
    layer0.write_bytes(layer0.read_bytes()[:-100])  # torn: its data ends early
    eng, again = _run(qwen_gguf_import, miss_policy="host", budget=0.5, experts_on="disk")
    assert len(built) > n and [r.output_ids for r in again] == [r.output_ids for r in first]


def test_without_the_forms_cache_misses_repack_the_files_blocks(qwen_gguf_import, monkeypatch, capsys):
    monkeypatch.setenv("EMOE_FORMS_CACHE", "0")
    _, want = _run(qwen_gguf_import, miss_policy="host", budget=0, experts_on="ram")
    eng, got = _run(qwen_gguf_import, miss_policy="load", budget=0.5, experts_on="disk")
    store = eng.store
    assert isinstance(store, FormDiskStore) and store._from_file == set(eng.cfg.moe_layers) and not store._spans
    assert "forms made from the file at each read (the forms cache is off)" in capsys.readouterr().err
    assert [r.output_ids for r in got] == [r.output_ids for r in want]
    assert all(isinstance(t, KTensor) for k in eng.cache.resident() for t in eng.cache.peek(k))
    packed = eng.ckpt.experts[(0, 0)].nbytes  # every expert here has the same types
    assert store.stats.reads > 0 and store.stats.bytes_read == store.stats.reads * packed < store.stats.reads * store.expert_nbytes
    sizes = {k: sum(t.nbytes for t in store.read(*k)) for k in list(eng.ckpt.experts)[:4]}
    assert all(store._sizes[k] == n for k, n in sizes.items())  # each layer's first expert sized them all


def test_low_bit_copies_and_all_resident_keep_the_dequantising_tier(qwen_gguf_import, forms_cache_on):
    for policy, budget in (("shadow", 0.6), ("all", 1.0), ("load", 1.0)):
        eng = Engine(_cfg(qwen_gguf_import, miss_policy=policy, budget=budget, experts_on="disk"))
        assert not isinstance(eng.store, FormDiskStore) and not eng.cache.forms, policy


def test_a_model_larger_than_ram_defaults_to_the_disk_forms_tier(qwen_gguf_import, monkeypatch, capsys):
    from types import SimpleNamespace

    from emoe import commands, store
    args = SimpleNamespace(miss_policy=None, budget=None, experts_on=None, dense_blocks=None, profile=None)
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)  # the default without a GPU
    monkeypatch.setattr(store, "_mem_available", lambda: 2 << 30)  # room for these experts
    commands._default_placement(args, str(qwen_gguf_import), 1.0)
    assert (args.miss_policy, args.budget, args.experts_on) == ("host", 0.0, "ram")
    small = sum(locs.nbytes for locs in __import__("emoe.checkpoint").checkpoint.Checkpoint(qwen_gguf_import).experts.values())
    monkeypatch.setattr(store, "_mem_available", lambda: small)  # less than the experts and the rest
    args = SimpleNamespace(miss_policy=None, budget=None, experts_on=None, dense_blocks=None, profile=None)
    commands._default_placement(args, str(qwen_gguf_import), 1.0)
    assert (args.miss_policy, args.budget, args.experts_on) == ("load", float(int(0.6 * small)), "disk")
    assert "outgrow" in capsys.readouterr().err and args.dense_blocks is True


def test_a_profiled_model_larger_than_ram_serves_its_plan_from_disk(qwen_gguf_import, forms_cache_on, tmp_path,
                                                                     monkeypatch, capsys):
    """With a profile, the larger-than-RAM default holds the profile's plan (-adapt: LRU where it would read
    less) in the same 60% of RAM, the experts on disk as forms; the answer is the exact one."""
    from types import SimpleNamespace

    from emoe import commands, store
    from emoe.checkpoint import Checkpoint
    from emoe.cli import main
    prof = tmp_path / "profile"
    from emoe import similarity  # (exact match: the sentence model of the eval extra is beside this test's point)
    monkeypatch.setattr(similarity, "embedding_similarity", lambda a, b: [float(x == y) for x, y in zip(a, b)])
    main(["profile", "--model", str(qwen_gguf_import), "--out", str(prof), "--per-task", "2", "--max-tokens", "4",
          "--sens-prompts", "1"])
    capsys.readouterr()
    experts = sum(locs.nbytes for locs in Checkpoint(qwen_gguf_import).experts.values())
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    run = ["generate", "hello there", "--model", str(qwen_gguf_import), "--max-tokens", "8", "--raw"]
    main(run + ["--budget", "0", "--miss-policy", "host", "--experts-on", "ram"])
    want = capsys.readouterr().out
    monkeypatch.setattr(store, "_mem_available", lambda: int(experts / 1.2))  # the experts outgrow 80% of it
    main(run + ["--profile", str(prof)])
    out, err = capsys.readouterr()
    assert "outgrow" in err and "task-static-adapt residency" in err and "experts on disk as kernel forms" in err
    assert out == want
    (prof / "predictor-a").mkdir()  # a trained predictor: eMoE-A's plan
    args = SimpleNamespace(miss_policy=None, budget=None, experts_on=None, dense_blocks=None, profile=str(prof),
                           policy=None)
    commands._default_placement(args, str(qwen_gguf_import), 0.4)
    assert (args.miss_policy, args.budget, args.experts_on, args.policy) == (
        "reroute", float(int(0.6 * experts / 1.2)), "disk", "emoe-a-adapt")
    args = SimpleNamespace(miss_policy=None, budget=None, experts_on=None, dense_blocks=None, profile=str(prof),
                           policy="popular-adapt")
    commands._default_placement(args, str(qwen_gguf_import), 0.4)
    assert args.policy == "popular-adapt"  # a policy given is kept


def test_full_precision_experts_take_the_forms_tier_as_int8_forms(tiny_mixtral, forms_cache_on, tmp_path, capsys):
    from tiny import make_tiny
    model = make_tiny("mixtral", tmp_path / "m", hidden_size=128, intermediate_size=128)
    _, want = _run(model, miss_policy="host", budget=0, experts_on="ram", host_int8=True)
    eng, got = _run(model, miss_policy="load", budget=0.5, experts_on="disk", host_int8=True)
    assert isinstance(eng.store, FormDiskStore) and all(
        t.i8 or t.bits == 8 for k in eng.cache.resident() for t in eng.cache.peek(k))
    assert [r.output_ids for r in got] == [r.output_ids for r in want]
    eng, _ = _run(model, miss_policy="load", budget=0.5, experts_on="disk")  # without: float copies
    assert not isinstance(eng.store, FormDiskStore)
    eng, _ = _run(tiny_mixtral, miss_policy="load", budget=0.5, experts_on="disk", host_int8=True)
    assert not isinstance(eng.store, FormDiskStore)  # 48-row experts: the kernel takes no form of them
    assert "some expert matrices have no kernel form" in capsys.readouterr().err


def test_slack_keeps_the_plan_and_loads_misses_into_the_rest(qwen_gguf_import, forms_cache_on):
    from emoe.policies import Slack
    _, want = _run(qwen_gguf_import, miss_policy="host", budget=0, experts_on="ram")
    policy = Slack(share=0.5)
    eng = Engine(_cfg(qwen_gguf_import, miss_policy="slack", budget=0.5, experts_on="disk"), policy=policy)
    planned = set(eng.cache.pinned)
    cap = eng.cache.capacity
    assert len(planned) == cap - cap // 2 and planned <= set(eng.cache.resident())
    got = eng.generate(PROMPTS, GREEDY, chat=False)
    assert [r.output_ids for r in got] == [r.output_ids for r in want]  # exact: misses loaded or read, never rerouted
    assert planned <= set(eng.cache.resident()) and eng.cache.pinned == planned  # the slack never evicted the plan
    s = eng.cache.stats
    assert s.loads > 0 and s.evictions > 0 and eng.cache.used_bytes <= eng.cache.budget_bytes
    with pytest.raises(ValueError, match="share"):
        Slack(share=1.0)


def test_a_decode_step_runs_held_experts_in_one_c_call_and_stops_at_a_miss(qwen_gguf_import, forms_cache_on,
                                                                             monkeypatch):
    """dispatch.live_tables: with some experts held as forms, a decode step's layers run in C calls that stop at a
    layer routed to an expert not held; tokens, counters, reads and the LRU order are the per-layer path's."""
    from emoe import cstep
    from emoe.dispatch import ExpertDispatch
    real, calls = cstep.layers, []

    def layers(*a):
        got = real(*a)
        calls.append((a[0].shape[0], got[-1]))  # (layers asked, layer stopped at)
        return got
    monkeypatch.setattr(cstep, "layers", layers)

    def run(policy):
        eng, got = _run(qwen_gguf_import, miss_policy=policy, budget=0.5, experts_on="disk", dense_blocks=True)
        s = eng.cache.stats
        return [r.output_ids for r in got], (s.hits, s.misses, s.loads, s.evictions, s.host_runs,
                                             eng.store.stats.reads), eng.cache.resident()
    for policy in ("load", "host"):
        calls.clear()
        live = run(policy)
        assert calls and any(stop < n for n, stop in calls) and any(stop == n for n, stop in calls), policy
        with monkeypatch.context() as m:
            m.setattr(ExpertDispatch, "live_tables", lambda self, layers, x: None)
            calls.clear()
            assert run(policy) == live and not calls, policy


def test_a_plans_admissions_are_read_together(qwen_gguf_import, forms_cache_on, monkeypatch):
    """cache.set_resident on the disk forms tier stages the plan's admissions (concurrent reads, after its evictions)
    and admits them from what was staged: nothing left over, each read once."""
    from emoe.policies import Slack
    calls, real = [], FormDiskStore.stage_keys
    monkeypatch.setattr(FormDiskStore, "stage_keys", lambda self, keys: calls.append(list(keys)) or real(self, keys))
    eng = Engine(_cfg(qwen_gguf_import, miss_policy="slack", budget=0.5, experts_on="disk"), policy=Slack(share=0.5))
    assert calls and len(calls[0]) > 1 and set(calls[0]) == set(eng.cache.pinned)
    assert not eng.store._staged and eng.store.stats.reads == len(calls[0])


def test_read_buffers_are_reused_once_nothing_views_them(qwen_gguf_import, forms_cache_on, monkeypatch):
    """A read goes into one of the latest reads' buffers that no tensor views any more (a miss's forms after its layer
    ran), not a new mapping; never into one still viewed, and the tokens are those of fresh buffers."""
    import mmap
    from types import SimpleNamespace

    import torch
    from emoe import formstore
    made = []
    monkeypatch.setattr(formstore, "mmap", SimpleNamespace(mmap=lambda *a: made.append(a) or mmap.mmap(*a)))
    eng = Engine(_cfg(qwen_gguf_import, miss_policy="host", budget=0.3, experts_on="disk"))
    store = eng.store
    a = store._buffer(8192)
    view, a_id = torch.frombuffer(a, dtype=torch.uint8)[16:32], id(a)
    del a  # (as a read's own reference goes when it returns; the ring keeps the buffer)
    assert id(store._buffer(8192)) != a_id  # viewed: not handed out again
    del view
    assert id(store._buffer(8192)) == a_id
    made.clear()
    reads = store.stats.reads
    out = [r.output_ids for r in eng.generate(PROMPTS, GREEDY, chat=False)]
    assert store.stats.reads - reads > 2 * len(made)  # most misses read into a used buffer
    store.spare_bytes = 0
    made.clear()
    reads = store.stats.reads
    assert [r.output_ids for r in eng.generate(PROMPTS, GREEDY, chat=False)] == out
    assert len(made) == store.stats.reads - reads  # spare_bytes 0: a new mapping every read


def test_an_evicted_experts_buffer_serves_the_next_read(qwen_gguf_import, forms_cache_on, monkeypatch):
    """LRU on demand: each load evicts an expert read long before (out of the latest reads' buffers); its buffer
    takes the next read (FormDiskStore.recycle) rather than a new mapping, and the tokens stay the RAM tier's."""
    import mmap
    from types import SimpleNamespace

    from emoe import formstore
    _, want = _run(qwen_gguf_import, miss_policy="host", budget=0, experts_on="ram")
    made = []
    monkeypatch.setattr(formstore, "mmap", SimpleNamespace(mmap=lambda *a: made.append(a) or mmap.mmap(*a)))
    eng = Engine(_cfg(qwen_gguf_import, miss_policy="load", budget=0.3, experts_on="disk"))
    eng.store.spare_bytes = 8 * eng.store.expert_nbytes  # few spares: the latest 8 reads' buffers
    made.clear()
    reads = eng.store.stats.reads
    got = eng.generate(PROMPTS, GREEDY, chat=False)
    assert [r.output_ids for r in got] == [r.output_ids for r in want]
    assert eng.cache.stats.evictions > 2 * len(made) and eng.store.stats.reads - reads > 2 * len(made)
