"""Engine behaviour on a tiny random Mixtral (its text is gibberish: compare token ids, not text)."""
import dataclasses
import json

import pytest
import torch

from conftest import same_model_tokens
from emoe.cache import BudgetError
from emoe.engine import Engine, EngineConfig, SamplingParams
from emoe.traces import Trace, load_traces, save_traces

PROMPTS = ["Summarize: the cat sat on the mat.", "hi",
           "SELECT name FROM users WHERE id = 3; Answer the question: who wrote Hamlet?"]
GREEDY = SamplingParams(max_tokens=6, ignore_eos=True)
pytestmark = pytest.mark.usefixtures("one_thread")


def engine(model, **kw):
    kw.setdefault("miss_policy", "all")
    return Engine(EngineConfig(str(model), **kw))


def ids(reqs):
    return [r.output_ids for r in reqs]


@pytest.fixture(scope="module")
def reference(tiny_mixtral):
    """Greedy outputs with every expert resident, one prompt at a time."""
    eng = engine(tiny_mixtral, max_batch=1)
    return ids(eng.generate(PROMPTS, GREEDY, chat=False))


# -- batching and sampling ---------------------------------------------------------------------------
def test_interleaved_prefill_keeps_decoding_the_running_requests(tiny_mixtral, reference):
    """admit(complete=False): a long prompt is prefilled a chunk per step while a running request gets a
    token every step; both end with the tokens of a whole-prompt prefill."""
    eng = engine(tiny_mixtral, max_batch=2, prefill_chunk=4)
    short = eng.make_request(PROMPTS[1], SamplingParams(max_tokens=24, ignore_eos=True), chat=False)
    long_ = eng.make_request(PROMPTS[2], GREEDY, chat=False)
    eng.admit([short])
    assert len(short.output_ids) == 1 and eng.running == [short]
    eng.admit([long_], complete=False)
    chunks = -(-len(long_.prompt_ids) // 4)
    assert 3 <= chunks < 20 and long_.prefilled == 0 and long_.slot >= 0
    for k in range(chunks):
        eng.step()
        assert len(short.output_ids) == 2 + k  # decoding never waits for the prefill
        assert len(long_.output_ids) == (k == chunks - 1) and eng.last_prefill[0] > 0
    while eng.running:
        eng.step()
    assert [short.output_ids[:6], long_.output_ids] == [reference[1], reference[2]]
    aborted = eng.make_request(PROMPTS[2], GREEDY, chat=False)
    eng.admit([aborted], complete=False)
    eng.abort(aborted)  # mid-prefill: its slot comes back, nothing stays queued
    assert not eng.prefilling and len(eng.free_slots) == 2 and aborted.finish_reason == "abort"


def test_prefix_reuse_takes_the_slot_holding_the_conversation_so_far(tiny_mixtral):
    """A chat's next turn re-sends the conversation: with prefix_reuse it goes to the free slot whose last
    occupant wrote that prefix's KV, prefills only the rest, and decodes what a fresh engine decodes."""
    def request(eng, ids):
        r = eng.make_request("x", GREEDY, chat=False)
        r.prompt_ids = list(ids)
        return r
    eng = engine(tiny_mixtral, max_batch=2, prefix_reuse=True)
    other, first = eng.make_request(PROMPTS[1], GREEDY, chat=False), eng.make_request(PROMPTS[2], GREEDY, chat=False)
    eng.admit([other, first])  # other takes slot 0, first slot 1
    while eng.running:
        eng.step()
    follow = first.prompt_ids + first.output_ids + eng.codec.encode(" and then?")
    second = request(eng, follow)
    eng.admit([second])
    held = len(first.prompt_ids) + len(first.output_ids) - 1  # the last sampled token was never fed back
    assert second.slot == first.slot and eng.reused_tokens == held
    while eng.running:
        eng.step()
    fresh = engine(tiny_mixtral, max_batch=1)
    want = request(fresh, follow)
    fresh.admit([want])
    while fresh.running:
        fresh.step()
    assert second.output_ids == want.output_ids and fresh.reused_tokens == 0
    scored = eng.free_slots[0]
    assert scored in eng.slot_tokens
    eng.score(follow[:5], follow[5:9])  # scoring overwrites a free slot's KV: nothing is reused from it
    assert scored not in eng.slot_tokens


def _turn(eng, ids):
    """One request of the token ids, run to its end."""
    r = eng.make_request("x", GREEDY, chat=False)
    r.prompt_ids = list(ids)
    eng.admit([r])
    while eng.running:
        eng.step()
    return r


def test_prompt_cache_restores_a_conversation_whose_slot_was_taken(tiny_mixtral):
    """One KV slot, two conversations alternating: each turn takes the slot over, so prefix reuse alone
    finds nothing. The prompt cache keeps the slot's KV when it is taken and copies it back for the next
    turn of that conversation: only the new tokens are prefilled, and the answer is a fresh engine's. A
    cap smaller than one entry keeps nothing."""
    eng = engine(tiny_mixtral, max_batch=1, prefix_reuse=True, prompt_cache_mb=64)
    a = _turn(eng, eng.codec.encode(PROMPTS[1]))
    _turn(eng, eng.codec.encode(PROMPTS[2]))  # takes the slot: a's KV goes to the cache
    follow = a.prompt_ids + a.output_ids + eng.codec.encode(" and then?")
    before = eng.reused_tokens
    second = _turn(eng, follow)
    held = len(a.prompt_ids) + len(a.output_ids) - 1  # the last sampled token was never fed back
    assert eng.reused_tokens - before == held and eng.prompt_cache.restored_tokens == held
    fresh = engine(tiny_mixtral, max_batch=1)
    assert second.output_ids == _turn(fresh, follow).output_ids
    tiny = engine(tiny_mixtral, max_batch=1, prefix_reuse=True, prompt_cache_mb=0)
    assert tiny.prompt_cache is None
    with pytest.raises(ValueError, match="prompt_cache_mb must be >= 0"):
        engine(tiny_mixtral, prompt_cache_mb=-1)


def test_prompt_cache_restores_latent_attention_too(tmp_path):
    """Under MLA the cache holds only the latents (k; v is empty): they are what is kept and restored."""
    from tiny import make_tiny
    path = make_tiny("deepseek_v3", tmp_path / "ds")
    eng = Engine(EngineConfig(str(path), miss_policy="all", max_batch=1, prefix_reuse=True, prompt_cache_mb=64))
    a = _turn(eng, range(3, 15))
    _turn(eng, range(40, 50))
    follow = a.prompt_ids + a.output_ids + [7, 8, 9]
    second = _turn(eng, follow)
    assert eng.prompt_cache.restored_tokens == len(a.prompt_ids) + len(a.output_ids) - 1 and not eng.kv.v
    fresh = Engine(EngineConfig(str(path), miss_policy="all", max_batch=1))
    assert second.output_ids == _turn(fresh, follow).output_ids


def test_prompt_cache_keeps_the_longest_and_its_cap():
    """An entry whose tokens start a newer one's is dropped; least recently used entries leave first when
    the byte cap is reached; a match needs the first token and stops at the first difference."""
    from emoe.model import KVCache
    from emoe.prompt_cache import PromptCache
    kv = KVCache([torch.arange(2 * 8 * 4, dtype=torch.float32).view(2, 8, 1, 4)], [torch.zeros(2, 8, 1, 4)])
    per_token = 2 * 4 * 4  # k and v, 4 floats each
    pc = PromptCache(6 * per_token)
    pc.save([1, 2], kv, 0)
    pc.save([1, 2, 3], kv, 0)  # supersedes [1, 2]
    assert list(pc.entries) == [(1, 2, 3)] and pc.bytes == 3 * per_token
    pc.save([1, 2], kv, 0)  # already covered
    assert list(pc.entries) == [(1, 2, 3)]
    pc.save([5, 6, 7], kv, 1)
    assert pc.match([1, 2, 9]) == ((1, 2, 3), 2) and pc.match([5, 6, 7, 8]) == ((5, 6, 7), 3)
    assert pc.match([2, 1]) == (None, 0) and pc.match([]) == (None, 0)
    pc.restore((1, 2, 3), 2, kv, 1)  # most recently used now
    assert torch.equal(kv.k[0][1, :2], kv.k[0][0, :2])
    pc.save([9, 9, 9], kv, 0)  # over the cap: the least recently used, [5, 6, 7], leaves
    assert list(pc.entries) == [(1, 2, 3), (9, 9, 9)] and pc.bytes == 6 * per_token
    pc.save(list(range(10, 17)), kv, 0)  # larger than the whole cap: not kept
    assert (10,) + tuple(range(11, 17)) not in pc.entries


def test_penalties_and_sampling_cuts():
    """presence/frequency penalties (OpenAI) act on output tokens, the repetition penalty (HF/vLLM) on
    prompt and output tokens by sign; top_k=1 and min_p=1 leave only the likeliest token."""
    from emoe.sequence import penalise, sample
    logits = torch.tensor([2.0, -1.0, 0.5, 3.0])
    p = SamplingParams(presence_penalty=0.5, frequency_penalty=0.25)
    assert penalise(logits, p, [0], [3, 3, 2]).tolist() == [2.0, -1.0, 0.5 - 0.75, 3.0 - 1.0]
    p = SamplingParams(repetition_penalty=2.0)
    assert penalise(logits, p, [1], [0]).tolist() == [1.0, -2.0, 0.5, 3.0]
    assert not SamplingParams().penalised and p.penalised
    p = SamplingParams(logit_bias={3: -100, 1: 4.0})
    assert p.penalised and penalise(logits, p, [0], []).tolist() == [2.0, 3.0, 0.5, -97.0]
    g = torch.Generator().manual_seed(0)
    for cut in (dict(top_k=1), dict(min_p=1.0)):
        hot = SamplingParams(temperature=5.0, **cut)
        assert {sample(logits, hot, g) for _ in range(20)} == {3}
    assert len({sample(logits, SamplingParams(temperature=5.0), g) for _ in range(200)}) > 1


def test_a_frequency_penalty_changes_what_greedy_decoding_repeats(tiny_mixtral):
    eng = engine(tiny_mixtral)
    long = SamplingParams(max_tokens=24, ignore_eos=True)
    plain = eng.generate([PROMPTS[1]], long, chat=False)[0].output_ids
    pen = eng.generate([PROMPTS[1]], SamplingParams(max_tokens=24, ignore_eos=True, frequency_penalty=2.0),
                       chat=False)[0].output_ids
    assert pen != plain and max(map(pen.count, pen)) <= max(map(plain.count, plain))


def test_logit_bias_bans_and_steers_greedy_tokens(tiny_mixtral):
    """OpenAI's logit_bias: -100 on greedy's own choices makes it choose others (its logprobs stay the
    model's own); a token outside the vocabulary is refused before anything runs."""
    eng = engine(tiny_mixtral)
    plain = eng.generate([PROMPTS[1]], SamplingParams(max_tokens=6, ignore_eos=True), chat=False)[0].output_ids
    banned = {t: -100.0 for t in plain}
    out = eng.generate([PROMPTS[1]], SamplingParams(max_tokens=6, ignore_eos=True, logit_bias=banned), chat=False)[0]
    assert not set(out.output_ids) & set(plain)
    forced = eng.generate([PROMPTS[1]], SamplingParams(max_tokens=3, ignore_eos=True, logit_bias={7: 100.0}),
                          chat=False)[0].output_ids
    assert forced == [7, 7, 7]
    with pytest.raises(ValueError, match="logit_bias names token"):
        eng.make_request(PROMPTS[1], SamplingParams(logit_bias={eng.cfg.vocab_size: 1.0}), chat=False)
    assert sorted(eng.free_slots) == list(range(8)) and not eng.running


def test_prompt_logprobs_are_the_teacher_forced_ones(tiny_mixtral):
    """prompt_logprobs (the API's echo) record, for every prompt token after the first, its log-probability
    given the tokens before it, also across prefill chunks: what teacher-forced scoring gives."""
    eng = engine(tiny_mixtral, max_batch=2, prefill_chunk=4, dtype="float32")  # bf16 on a GPU: chunks round apart
    r = eng.generate([PROMPTS[2]], SamplingParams(max_tokens=1, prompt_logprobs=2), chat=False)[0]
    ids = r.prompt_ids
    assert len(r.prompt_logprobs) == len(ids) - 1 and all(len(top) == 2 for _, top in r.prompt_logprobs)
    want = torch.log_softmax(eng.score(ids[:1], ids[1:]).float().cpu(), -1)
    want = want.gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]
    torch.testing.assert_close(torch.tensor([lp for lp, _ in r.prompt_logprobs]), want, atol=1e-4, rtol=1e-4)


def test_prompts_have_different_lengths(tiny_mixtral):
    eng = engine(tiny_mixtral)
    lens = [len(eng.codec.encode(p)) for p in PROMPTS]
    assert len(set(lens)) == 3, lens


def test_batched_equals_one_at_a_time(tiny_mixtral, reference):
    eng = engine(tiny_mixtral, max_batch=8)
    reqs = eng.generate(PROMPTS, GREEDY, chat=False)
    assert ids(reqs) == reference
    assert all(r.finish_reason == "length" and len(r.output_ids) == 6 for r in reqs)
    # two slots for three prompts: the third joins when the first slot frees up
    assert ids(engine(tiny_mixtral, max_batch=2).generate(PROMPTS, GREEDY, chat=False)) == reference
    assert eng.free_slots and not eng.running


def test_ram_tier_same_ids(tiny_mixtral, reference):
    assert ids(engine(tiny_mixtral, experts_on="ram").generate(PROMPTS, GREEDY, chat=False)) == reference


def test_seeded_sampling_is_reproducible(tiny_mixtral):
    eng = engine(tiny_mixtral)

    def sample(seed):
        p = SamplingParams(max_tokens=20, temperature=0.8, seed=seed, ignore_eos=True)
        return ids(eng.generate(PROMPTS, p, chat=False))

    a, b, c = sample(123), sample(123), sample(7)
    assert a == b
    assert a != c
    assert all(len(x) == 20 for x in a + c)


def test_tiny_top_p_is_greedy(tiny_mixtral, reference):
    eng = engine(tiny_mixtral)
    p = SamplingParams(max_tokens=6, temperature=1.0, top_p=1e-9, seed=1, ignore_eos=True)
    assert ids(eng.generate(PROMPTS, p, chat=False)) == reference


# -- finishing ---------------------------------------------------------------------------------------
def test_max_tokens_respected(tiny_mixtral):
    eng = engine(tiny_mixtral)
    for n in (1, 4):
        reqs = eng.generate(PROMPTS, SamplingParams(max_tokens=n, ignore_eos=True), chat=False)
        assert [len(r.output_ids) for r in reqs] == [n] * 3
        assert {r.finish_reason for r in reqs} == {"length"}


def test_max_len_ends_with_length(tiny_mixtral):
    eng = engine(tiny_mixtral, max_len=24)
    n = len(eng.codec.encode(PROMPTS[0]))
    (r,) = eng.generate(PROMPTS[:1], SamplingParams(max_tokens=100, ignore_eos=True), chat=False)
    assert r.finish_reason == "length" and len(r.output_ids) == 24 - n


def test_checkpoint_eos_is_a_stop_id(tiny_mixtral):
    eng = engine(tiny_mixtral)
    assert eng.cfg.eos_token_ids == (319,)
    assert 319 in eng.codec.stop_ids


def test_stop_token(tiny_mixtral, reference):
    out = reference[0]
    eng = engine(tiny_mixtral, trace=True)
    eng.codec.stop_ids = frozenset({out[0]})
    (r,) = eng.generate(PROMPTS[:1], SamplingParams(max_tokens=6), chat=False)
    assert r.finish_reason == "stop" and r.output_ids == []  # the stop token itself is not returned
    # a stop token later in the greedy output ends generation right before it
    j = next(j for j in range(1, len(out)) if out[j] not in out[:j])
    eng.codec.stop_ids = frozenset({out[j]})
    (r,) = eng.generate(PROMPTS[:1], SamplingParams(max_tokens=6), chat=False)
    assert r.finish_reason == "stop" and r.output_ids == out[:j]
    # the stop token was sampled after j decode inputs (out[0..j-1]) and is never fed back
    assert r.trace.decode.sum(1).tolist() == [j * eng.cfg.top_k] * eng.cfg.num_layers
    # ignore_eos keeps going
    (r,) = eng.generate(PROMPTS[:1], GREEDY, chat=False)
    assert r.finish_reason == "length" and r.output_ids == out


# -- budgets and miss policies -----------------------------------------------------------------------
def test_full_budget_reroute_equals_all(tiny_mixtral, reference):
    eng = engine(tiny_mixtral, miss_policy="reroute", budget=1.0)
    assert eng.cache.used_bytes == eng.total_expert_bytes
    assert ids(eng.generate(PROMPTS, GREEDY, chat=False)) == reference
    assert eng.cache.stats.hit_rate == 1.0 and eng.cache.stats.loads == 0


def test_reroute_at_40_percent(tiny_mixtral):
    eng = engine(tiny_mixtral, miss_policy="reroute", budget=0.4)
    assert eng.cache.budget_bytes == int(0.4 * eng.total_expert_bytes)
    assert 0 < eng.cache.used_bytes <= eng.cache.budget_bytes
    reqs = eng.generate(PROMPTS, GREEDY, chat=False)
    assert [len(r.output_ids) for r in reqs] == [6] * 3
    s = eng.cache.stats
    assert s.hits + s.misses > 0 and s.hit_rate < 1.0
    assert s.loads == 0 and s.bytes_loaded == 0  # reroute never loads
    assert eng.cache.used_bytes <= eng.cache.budget_bytes


def test_load_on_demand_is_lossless(tiny_mixtral, reference):
    eng = engine(tiny_mixtral, miss_policy="load", budget=0.4)
    assert ids(eng.generate(PROMPTS, GREEDY, chat=False)) == reference
    s = eng.cache.stats
    assert s.bytes_loaded > 0 and s.loads > 0 and s.bytes_loaded == s.loads * eng.cache.expert_bytes
    assert s.hit_rate < 1.0
    assert eng.cache.used_bytes <= eng.cache.budget_bytes == int(0.4 * eng.total_expert_bytes)


def test_budget_in_bytes(tiny_mixtral):
    probe = engine(tiny_mixtral)
    eb = probe.cache.expert_bytes
    eng = engine(tiny_mixtral, miss_policy="reroute", budget=6 * eb + 5)
    assert eng.cache.budget_bytes == 6 * eb + 5 and eng.cache.capacity == 6
    assert all(len(eng.cache.resident(l)) == 2 for l in eng.cfg.moe_layers)


# -- bad input ---------------------------------------------------------------------------------------
def test_budget_too_small(tiny_mixtral):
    with pytest.raises(BudgetError) as err:
        engine(tiny_mixtral, miss_policy="reroute", budget=1e-6)
    assert "top-2" in str(err.value) and "budget" in str(err.value)
    with pytest.raises(BudgetError, match="top-2"):
        engine(tiny_mixtral, miss_policy="load", budget=1e-6)


def test_prompt_longer_than_max_len(tiny_mixtral):
    eng = engine(tiny_mixtral, max_len=8)
    n = len(eng.codec.encode(PROMPTS[2]))
    with pytest.raises(ValueError, match=f"prompt is {n} tokens"):
        eng.generate(PROMPTS[2:], GREEDY, chat=False)
    assert eng.free_slots == list(range(8)) and not eng.running


def test_bad_sampling_params():
    with pytest.raises(ValueError, match="max_tokens"):
        SamplingParams(max_tokens=0)
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1)
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0)
    for bias in ({1: 101.0}, {-1: 1.0}, {"1": 1.0}):
        with pytest.raises(ValueError, match="logit_bias"):
            SamplingParams(logit_bias=bias)


def test_bad_engine_config(tiny_mixtral):
    for bad in (-0.5, float("nan")):
        with pytest.raises(ValueError, match="budget"):
            EngineConfig(str(tiny_mixtral), budget=bad)
    with pytest.raises(BudgetError, match="smaller than what 'reroute' needs"):  # 0 only where misses need no expert
        Engine(EngineConfig(str(tiny_mixtral), budget=0))
    with pytest.raises(ValueError, match="experts_on"):
        EngineConfig(str(tiny_mixtral), experts_on="nvme")
    with pytest.raises(ValueError) as err:
        Engine(EngineConfig(str(tiny_mixtral), miss_policy="lru"))
    for name in ("lru", "reroute", "load", "all"):
        assert name in str(err.value)


def test_budget_zero_runs_every_expert_in_the_slow_tier(tiny_mixtral):
    """Budget 0 with host misses: nothing in the fast tier, all-resident's tokens."""
    greedy = SamplingParams(max_tokens=6, ignore_eos=True)
    want = [r.output_ids for r in engine(tiny_mixtral).generate(["hi there", "a b c"], greedy, chat=False)]
    eng = Engine(EngineConfig(str(tiny_mixtral), budget=0, miss_policy="host", experts_on="ram"))
    assert same_model_tokens([r.output_ids for r in eng.generate(["hi there", "a b c"], greedy, chat=False)], want)
    assert eng.cache.used_bytes == 0 and eng.cache.stats.hit_rate == 0 and eng.cache.stats.host_runs > 0


# -- traces ------------------------------------------------------------------------------------------
def test_trace_counts(tiny_mixtral):
    eng = engine(tiny_mixtral, trace=True, max_batch=2)  # the third request reuses a slot
    reqs = eng.generate(PROMPTS, GREEDY, chat=False)
    k, layers = eng.cfg.top_k, eng.cfg.num_layers
    for r in reqs:
        t = r.trace
        assert t is not None and t.request_id == r.id
        assert t.prompt_tokens == len(r.prompt_ids) and t.output_tokens == len(r.output_ids) == 6
        assert t.prefill.shape == t.decode.shape == (layers, eng.cfg.num_experts)
        assert t.prefill.sum(1).tolist() == [len(r.prompt_ids) * k] * layers
        assert t.decode.sum(1).tolist() == [(len(r.output_ids) - 1) * k] * layers
        assert torch.equal(t.total, t.prefill + t.decode)
    # a request that finishes at prefill has no decode steps
    (r,) = eng.generate(PROMPTS[:1], SamplingParams(max_tokens=1, ignore_eos=True), chat=False)
    assert r.trace.decode.sum() == 0 and r.trace.prefill.sum() == len(r.prompt_ids) * k * layers
    assert engine(tiny_mixtral).generate(PROMPTS[:1], GREEDY, chat=False)[0].trace is None


def test_trace_json_round_trip(tiny_mixtral, tmp_path):
    eng = engine(tiny_mixtral, trace=True)
    reqs = eng.generate(PROMPTS, GREEDY, tasks=["summarize", None, "sql"], chat=False)
    traces = [r.trace for r in reqs]
    for t in traces:
        back = Trace.from_json(json.loads(json.dumps(t.to_json())))
        assert (back.request_id, back.task, back.prompt_tokens, back.output_tokens) == \
               (t.request_id, t.task, t.prompt_tokens, t.output_tokens)
        assert torch.equal(back.prefill, t.prefill) and torch.equal(back.decode, t.decode)
    assert traces[0].task == "summarize" and traces[1].task is None
    save_traces(traces, tmp_path / "t.jsonl")
    loaded = load_traces(tmp_path / "t.jsonl")
    assert [t.request_id for t in loaded] == [t.request_id for t in traces]
    assert all(torch.equal(a.total, b.total) for a, b in zip(loaded, traces))


def test_traces_record_wanted_routing(tiny_mixtral):
    """Traces hold the router's top-k before the miss policy rewrites it. The first MoE layer sees the
    same hidden states under any policy, so its prefill counts must be identical; later layers differ
    because rerouting changes their inputs."""
    full = engine(tiny_mixtral, trace=True)
    low = engine(tiny_mixtral, miss_policy="reroute", budget=0.4, trace=True)
    a = full.generate(PROMPTS[:1], GREEDY, chat=False)[0].trace
    b = low.generate(PROMPTS[:1], GREEDY, chat=False)[0].trace
    first = low.cfg.moe_layers[0]
    assert torch.equal(a.prefill[first], b.prefill[first])
    # the executed routing only uses resident experts; the recorded one does not
    resident = low.cache.mask.cpu()
    assert low.cache.stats.misses > 0
    assert int(b.prefill[~resident].sum()) > 0


# -- scoring -----------------------------------------------------------------------------------------
def test_score_reproduces_greedy(tiny_mixtral, reference):
    eng = engine(tiny_mixtral)
    for prompt, out in zip(PROMPTS, reference):
        logits = eng.score(eng.codec.encode(prompt), out)
        assert logits.shape == (len(out), eng.cfg.vocab_size)
        assert logits.argmax(-1).tolist() == out
    assert eng.free_slots == list(range(8))
    with pytest.raises(ValueError):
        eng.score([1, 2], [])


# -- a plan that cannot serve a full top-k is refused up front ----------------------------------------
def test_reroute_plan_with_fewer_than_top_k_in_a_layer(tiny_mixtral):
    from emoe.policies import Reroute
    plan = {0: [3], 1: [0, 1, 2], 2: [4, 5]}  # layer 0 cannot serve a top-2
    with pytest.raises(BudgetError, match="top-2"):
        Engine(EngineConfig(str(tiny_mixtral), miss_policy="reroute", budget=0.5), policy=Reroute(plan=plan))


def test_memory_pool_gives_freed_expert_bytes_to_kv(tiny_mixtral, one_thread):
    full = Engine(EngineConfig(str(tiny_mixtral), miss_policy="all", max_len=64))
    per_slot = full.kv.nbytes // full.max_batch
    memory = full.total_expert_bytes + 2 * per_slot
    a = Engine(EngineConfig(str(tiny_mixtral), miss_policy="all", max_len=64, memory_bytes=memory))
    b = Engine(EngineConfig(str(tiny_mixtral), budget=0.5, max_len=64, memory_bytes=memory))
    assert a.max_batch == 2 and b.max_batch > a.max_batch
    assert b.kv.nbytes + b.cache.budget_bytes <= memory
    with pytest.raises(BudgetError, match="KV slot"):
        Engine(EngineConfig(str(tiny_mixtral), miss_policy="all", max_len=64, memory_bytes=full.total_expert_bytes))


def test_bench_memory_reports_a_budget_too_small_as_a_gap(tmp_path, one_thread):
    """int4 copies of every expert do not fit in 5%: the row says so instead of failing the benchmark."""
    from emoe.bench import memory
    from tiny import make_tiny
    model = str(make_tiny("mixtral", tmp_path / "m"))
    base = {"model": model, "experts_on": "ram", "max_tokens": 2, "prompts": ["hi there"]}
    row = memory.worker({**base, "policy": "shadow", "budget": 0.05})
    assert row["skipped"].startswith("int4 shadow copies")
    ok = memory.worker({**base, "policy": "reroute", "budget": 1.0})
    ok.update(raw_direct_bandwidth=1e9, agreement=1.0)
    text = memory.table([ok, {**row, "raw_direct_bandwidth": 1e9}])
    assert "skipped: int4 shadow copies" in text and "reroute" in text
    on_gpu = torch.cuda.is_available()  # on a GPU the row also reports device memory
    assert (ok["peak_device_bytes"] is not None) == on_gpu and ("peak GPU MiB" in text) == on_gpu
    assert "peak GPU MiB" in memory.table([{**ok, "peak_device_bytes": 3 * 2**20}])
    # hit rate and loads are serving's: scoring the reference (teacher-forced, through the same cache) adds nothing
    lru = {**base, "policy": "load", "budget": 0.5, "max_tokens": 6, "prompts": ["hi there", "the cat sat"]}
    served = memory.worker(lru)
    scored = memory.worker({**lru, "reference": served["outputs"]})
    assert scored["agreement"] == 1.0 and served["bytes_loaded"] > 0
    assert (scored["hit_rate"], scored["bytes_loaded"]) == (served["hit_rate"], served["bytes_loaded"])


@pytest.mark.parametrize("policy", ["load", "shadow"])
def test_warm_up_changes_nothing_a_request_can_see(tiny_mixtral, one_thread, policy):
    """The CUDA warm-up (run here on the CPU) leaves counters, LRU order and outputs as they were."""
    def engine():
        return Engine(EngineConfig(str(tiny_mixtral), budget=0.5, miss_policy=policy, max_batch=2, device="cpu"))
    cold, warm = engine(), engine()
    before = (dataclasses.asdict(warm.cache.stats), warm.cache.resident(), warm.store.stats.reads)
    warm._warm_up()
    assert (dataclasses.asdict(warm.cache.stats), warm.cache.resident(), warm.store.stats.reads) == before
    params = SamplingParams(max_tokens=6, ignore_eos=True)
    a, b = (e.generate(["hello there", "hi"], params) for e in (cold, warm))
    assert [r.output_ids for r in a] == [r.output_ids for r in b]
    counts = lambda e: {k: v for k, v in dataclasses.asdict(e.cache.stats).items() if "seconds" not in k}  # noqa: E731
    assert counts(cold) == counts(warm)


def test_bench_dispatch_compares_the_two_loops_on_identical_outputs(tiny_mixtral, one_thread):
    from emoe.bench import dispatch
    rows = dispatch.run(str(tiny_mixtral), tokens=(1, 9), calls=2, repeats=1, device="cpu")
    assert [r["tokens"] for r in rows] == [1, 9] and all(r["identical"] for r in rows)
    assert rows[1]["experts_used"] > rows[0]["experts_used"] >= 1
    assert all(r["per_expert_us"] > 0 and r["sorted_us"] > 0 for r in rows)
    assert "identical" in dispatch.table(rows)


def test_memory_line_says_where_the_bytes_are(tiny_mixtral):
    eng = Engine(EngineConfig(str(tiny_mixtral), budget=0.5, miss_policy="host", experts_on="ram"))
    line = eng.memory_line()
    gib = 2 ** 30
    assert f"experts {eng.cache.used_bytes / gib:.2f} of a {eng.cache.budget_bytes / gib:.2f} GiB budget" in line
    assert "RAM tier" in line and "KV" in line and "dense" in line
    assert "experts read from disk" in Engine(EngineConfig(str(tiny_mixtral), budget=0.5)).memory_line()


def test_host_int8_holds_full_precision_experts_as_int8_forms(tmp_path):
    """--host-int8: a full-precision checkpoint's experts in RAM as int8 forms of the CPU kernel (0.5%
    weight error, 10 bits a weight) for host runs; off by default and for profiles."""
    from emoe.profile import exact_engine
    from emoe.quant import KTensor, dequantize
    from tiny import make_tiny
    m = make_tiny("qwen3_moe", tmp_path / "m", hidden_size=128, moe_intermediate_size=64, num_attention_heads=4)
    ids, cont = list(range(1, 17)), list(range(40, 50))
    ref = Engine(EngineConfig(str(m), miss_policy="all", device="cpu")).score(ids, cont)
    eng = Engine(EngineConfig(str(m), miss_policy="host", budget=0.5, experts_on="ram", device="cpu", host_int8=True))
    key = next(k for k in eng.store.ckpt.experts if k not in eng.cache)
    forms = eng.store.read_host(*key)
    assert all(isinstance(f, KTensor) for f in forms) and eng.store.forms
    from emoe.store import DiskStore
    for f, w in zip(forms, DiskStore(eng.store.ckpt).read(*key)):
        assert (dequantize(f) - w.float()).abs().max() <= 0.01 * w.float().abs().max()
    assert (eng.score(ids, cont) - ref).abs().max() <= 0.02 * ref.abs().max()
    for kw in (dict(miss_policy="host", budget=0.5), exact_engine(0.5, "ram")):
        plain = Engine(EngineConfig(str(m), **{"experts_on": "ram", "device": "cpu", **kw}))
        assert not plain.store.forms
