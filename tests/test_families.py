"""The engine end to end on every supported family other than Mixtral (test_engine covers Mixtral in depth):
batching, budgets and miss policies behave the same whatever the attention and router look like."""
import os

import pytest
import torch

from conftest import same_model_tokens
from emoe.families import FAMILIES
from emoe.engine import Engine, EngineConfig, SamplingParams
from tiny import make_tiny

PROMPTS = ["Summarize: the cat sat on the mat.", "hi",
           "SELECT name FROM users WHERE id = 3; Answer the question: who wrote Hamlet?"]
GREEDY = SamplingParams(max_tokens=6, ignore_eos=True)
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module", params=[f for f in FAMILIES if f != "mixtral"])  # Mixtral: test_engine.py
def model(request, tmp_path_factory):
    return make_tiny(request.param, tmp_path_factory.mktemp("fam") / request.param)


def run(model, **kw):
    kw.setdefault("miss_policy", "all")
    eng = Engine(EngineConfig(str(model), **kw))
    return eng, [r.output_ids for r in eng.generate(PROMPTS, GREEDY, chat=False)]


def test_batched_equals_one_at_a_time_and_load_on_demand_is_lossless(model):
    _, ref = run(model, max_batch=1)
    assert run(model, max_batch=8)[1] == ref
    eng, out = run(model, miss_policy="load", budget=0.4)
    assert out == ref
    s = eng.cache.stats
    assert s.loads > 0 and s.hit_rate < 1.0 and eng.cache.used_bytes <= eng.cache.budget_bytes


def test_chunked_prefill_gives_the_unchunked_tokens_and_routing(model):
    """Prompts prefilled 3 tokens at a time (each chunk attending to the cache before it, sliding windows
    and MLA latents included) give the same tokens and the same recorded routing as in one pass."""
    def requests(**kw):
        eng = Engine(EngineConfig(str(model), miss_policy="all", max_batch=8, trace=True, **kw))
        return eng.generate(PROMPTS, GREEDY, chat=False)
    want, got = requests(), requests(prefill_chunk=3)
    assert same_model_tokens([r.output_ids for r in got], [r.output_ids for r in want])
    if not torch.cuda.is_available():
        assert [r.trace.prefill.tolist() for r in got] == [r.trace.prefill.tolist() for r in want]


def test_interleaved_prefill_gives_the_whole_prompt_tokens(model):
    """A prompt prefilled a chunk per step while another request decodes (the server's default) ends with
    the tokens of a whole-prompt prefill, whatever the attention (latent, windowed, linear with a state)."""
    _, ref = run(model, max_batch=1)
    eng = Engine(EngineConfig(str(model), miss_policy="all", max_batch=2, prefill_chunk=4))
    short = eng.make_request(PROMPTS[1], SamplingParams(max_tokens=12, ignore_eos=True), chat=False)
    long_ = eng.make_request(PROMPTS[2], GREEDY, chat=False)
    eng.admit([short])
    eng.admit([long_], complete=False)
    while eng.running or eng.prefilling:
        eng.step()
    assert [short.output_ids[:6], long_.output_ids] == [ref[1], ref[2]]


def test_bf16_engine_runs_prefill_and_batched_decode(model):
    """A bf16 fast tier (the default on a GPU) through every path a family has: chunked prefill, a batched
    decode, states and caches kept in their own dtypes."""
    eng = Engine(EngineConfig(str(model), miss_policy="all", dtype="bfloat16", prefill_chunk=4))
    out = [r.output_ids for r in eng.generate(PROMPTS, GREEDY, chat=False)]
    assert [len(o) for o in out] == [6] * 3


@pytest.mark.parametrize("policy", ["reroute", "shadow"])
def test_misses_under_a_budget(model, policy):
    eng, out = run(model, miss_policy=policy, budget=0.5)
    assert [len(o) for o in out] == [6] * 3
    assert 0 < eng.cache.used_bytes <= eng.cache.budget_bytes
    assert eng.cache.stats.misses > 0 and eng.cache.stats.bytes_loaded == 0


def test_kv_cache_holds_what_the_attention_needs(model):
    eng = Engine(EngineConfig(str(model), miss_policy="all", max_len=32, max_batch=2))
    c = eng.cfg
    assert eng.kv.nbytes == c.kv_numel_per_token * 32 * 2 * eng.kv.k[0].element_size() + c.state_numel_per_slot * 2 * 4
    if c.linear_layers:  # Qwen3-Next: only its attention layers cache tokens; the others hold a fixed state
        assert c.kv_numel_per_token == 2 * (c.num_layers - len(c.linear_layers)) * c.num_kv_heads * c.head_dim
        assert c.state_numel_per_slot > 0 and set(eng.kv.state) == set(c.linear_layers)
    if c.mla is not None:  # one latent per token and layer, far less than per-head keys and values
        assert c.kv_numel_per_token == c.num_layers * (c.mla.kv_lora_rank + c.mla.qk_rope_head_dim)
        assert c.kv_numel_per_token < 2 * c.num_layers * c.num_heads * (c.mla.qk_nope_head_dim + c.mla.v_head_dim)


def test_deepseek_routing_uses_groups_and_bias(tmp_path):
    """A token only picks experts in its topk_group best groups; the selection bias moves the choice."""
    from emoe.model import route
    logits = torch.tensor([[4.0, 3.9, -5.0, -5.0, 3.8, -5.0, -5.0, -5.0]])
    _, w, ids = route(logits, 2, True, scoring="sigmoid", n_group=4, topk_group=1)
    assert sorted(ids[0].tolist()) == [0, 1] and torch.allclose(w.sum(), torch.tensor(1.0))
    _, _, ids = route(logits, 2, True, scoring="sigmoid", n_group=4, topk_group=2)
    assert sorted(ids[0].tolist()) == [0, 1]  # group 2 (experts 4, 5) is second best, yet 3.8 < 3.9
    bias = torch.zeros(8)
    bias[4] = 1.0
    probs, w, ids = route(logits, 2, False, scoring="sigmoid", n_group=4, topk_group=2, bias=bias, scale=2.5)
    assert sorted(ids[0].tolist()) == [0, 4]
    torch.testing.assert_close(w.sum(), 2.5 * (probs[0, 0] + probs[0, 4]))  # the bias chooses, never weighs


def test_layers_past_the_last_are_not_loaded(tmp_path):
    """DeepSeek-V3 checkpoints carry a multi-token-prediction layer after the last one; it never runs here,
    so its weights stay on disk."""
    from safetensors.torch import save_file

    from emoe.checkpoint import Checkpoint
    path = make_tiny("deepseek_v3", tmp_path / "m")
    n = Checkpoint(path).config.num_layers
    save_file({f"model.layers.{n}.self_attn.kv_a_layernorm.weight": torch.ones(24),
               f"model.layers.{n}.mlp.experts.0.up_proj.weight": torch.ones(32, 64)}, str(path / "mtp.safetensors"))
    ck = Checkpoint(path)
    assert not any(k.startswith(f"model.layers.{n}.") for k in ck.dense_state())
    assert all(layer < n for layer, _ in ck.experts)


@pytest.mark.parametrize("experts_on", ["ram", "disk"])
def test_host_misses_are_exact_and_move_nothing(model, experts_on):
    """llama.cpp --n-cpu-moe / Fiddler: a miss runs in the slow tier on the expert's own weights. The
    output equals all-resident at any budget, nothing is admitted, and the budget holds."""
    _, ref = run(model, max_batch=1)
    eng, out = run(model, miss_policy="host", budget=0.3, experts_on=experts_on)
    assert same_model_tokens(out, ref)
    s = eng.cache.stats
    assert s.misses > 0 and s.host_runs > 0 and s.loads == 0 and s.bytes_loaded == 0
    assert 0 < eng.cache.used_bytes <= eng.cache.budget_bytes
    assert "expert runs on the host" in eng.summary(1.0)


def test_auto_misses_run_on_the_host_for_few_tokens_and_load_for_many(model):
    """Fiddler's rule: with a break-even of 2 tokens, prefill misses are loaded (LRU) and one-token decode
    misses run on the host; output exact, budget held. On a CPU the break-even is infinite (a copy into
    the same memory never pays), so auto measured there is host. A budget of about one expert per MoE layer
    makes decode misses certain (each token picks two distinct experts a layer), whatever the routing."""
    from emoe.policies import Auto
    _, ref = run(model, max_batch=1)
    eng = Engine(EngineConfig(str(model), budget=0.13, max_batch=1, experts_on="ram"), policy=Auto(min_tokens=2))
    out = [r.output_ids for r in eng.generate(PROMPTS, GREEDY, chat=False)]
    assert same_model_tokens(out, ref)
    s = eng.cache.stats
    assert s.loads > 0 and s.host_runs > 0 and 0 < eng.cache.used_bytes <= eng.cache.budget_bytes
    assert "auto: misses of 2+ tokens loaded" in eng.summary(1.0)
    if not torch.cuda.is_available():
        eng, out = run(model, miss_policy="auto", budget=0.3, experts_on="ram")
        assert eng.policy.min_tokens == float("inf") and eng.cache.stats.loads == 0 and out == ref
    eng, out = run(model, miss_policy="auto", budget=0.3, experts_on="disk")  # a host run would reread it
    assert eng.policy.min_tokens == 1 and eng.cache.stats.host_runs == 0 and same_model_tokens(out, ref)


def test_auto_break_even_from_timings():
    """Loading costs 8 ms and the device 0.1 ms; the host 1 ms plus 1 ms a token: loading pays from 9 tokens."""
    from emoe.policies import crossover
    ms = 1e-3
    assert crossover(8 * ms, (1 * ms, 64 * ms), (0.1 * ms, 0.1 * ms), (1, 64)) == 9
    assert crossover(0.0, (5 * ms, 5 * ms), (0.1 * ms, 0.1 * ms), (1, 64)) == float("inf")  # host flat: never
    assert crossover(0.0, (5 * ms, 68 * ms), (0.1 * ms, 0.1 * ms), (1, 64)) == 1  # free copies: always


def test_dots1_windows_from_max_window_layers_when_layer_types_are_absent(tmp_path):
    """dots.llm1's released config.json has no layer_types: as in transformers, layers from
    max_window_layers on are windowed, and none are when sliding_window is null."""
    import json

    from emoe.config import ModelConfig
    raw = json.loads((make_tiny("dots1", tmp_path / "d") / "config.json").read_text())
    assert ModelConfig.from_hf(raw).window_layers == (2,)
    bare = {k: v for k, v in raw.items() if k != "layer_types"}
    assert ModelConfig.from_hf(bare).window_layers == (2,)
    assert ModelConfig.from_hf({**bare, "sliding_window": None}).sliding_window is None


def test_ernie_moe_layers_and_refusals(tmp_path):
    """ERNIE-4.5 places MoE layers by start, end (-1: the last) and interval; biased MLPs are refused."""
    import json

    from emoe.config import ConfigError, ModelConfig
    raw = json.loads((make_tiny("ernie4_5_moe", tmp_path / "e") / "config.json").read_text())
    cfg = ModelConfig.from_hf(raw)
    assert cfg.moe_layers == (1, 2) and cfg.shared_expert_intermediate_size == 32 and cfg.spec.rope_interleave
    six = {**raw, "num_hidden_layers": 6, "moe_layer_end_index": -1}
    assert ModelConfig.from_hf({**six, "moe_layer_interval": 2}).moe_layers == (1, 3, 5)
    assert ModelConfig.from_hf({**six, "moe_layer_end_index": 3}).moe_layers == (1, 2, 3)
    with pytest.raises(ConfigError, match="use_bias"):
        ModelConfig.from_hf({**raw, "use_bias": True})


def test_hunyuan_config_lists_and_refusals(tmp_path):
    """Hunyuan-A13B's config gives per-layer lists (all equal in the release) and an NTK-alpha rope."""
    import json

    from emoe.config import ConfigError, ModelConfig
    raw = json.loads((make_tiny("hunyuan_v1_moe", tmp_path / "h") / "config.json").read_text())
    base = ModelConfig.from_hf(raw)
    assert base.rope_theta == 10000.0 * 1000.0 ** (16 / 14)  # theta · alpha^(d / (d - 2))
    listed = ModelConfig.from_hf({**raw, "moe_topk": [2] * 3, "num_experts": [8] * 3})
    assert (listed.top_k, listed.num_experts) == (2, 8)
    for bad, match in (({"moe_topk": [2, 1, 2]}, "moe_topk differs between layers"), ({"use_cla": True}, "use_cla")):
        with pytest.raises(ConfigError, match=match):
            ModelConfig.from_hf({**raw, **bad})


def test_chat_template_from_its_own_file(tmp_path):
    """Recent checkpoints (GLM-4.5, Qwen3) keep the chat template in chat_template.jinja, not in
    tokenizer_config.json; without any template, messages become role-prefixed text."""
    from emoe.checkpoint import Checkpoint
    from emoe.tokenizer import TextCodec
    path = make_tiny("glm4_moe", tmp_path / "g")
    ck = Checkpoint(path)
    msgs = [{"role": "user", "content": "hi"}]
    (path / "tokenizer_config.json").unlink(missing_ok=True)
    (path / "chat_template.jinja").unlink(missing_ok=True)
    assert TextCodec(path, ck.tokenizer_path, ()).apply_chat(msgs) == "user: hi\nassistant:"
    (path / "chat_template.jinja").write_text(
        "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")
    assert TextCodec(path, ck.tokenizer_path, ()).apply_chat(msgs) == "<|user|>hi<|assistant|>"
    # what real templates use: break, strftime_now (gpt-oss), tojson without HTML escaping (tool calls)
    (path / "chat_template.jinja").write_text(
        "{% for m in messages %}{{ m.content | tojson }}{% break %}{% endfor %}{{ strftime_now('%Y') | length }}")
    assert TextCodec(path, ck.tokenizer_path, ()).apply_chat([{"role": "user", "content": "<a&b>"}] * 2) == '"<a&b>"4'


def test_deepseek_router_stays_fp32_in_a_bf16_engine(tmp_path):
    eng = Engine(EngineConfig(str(make_tiny("deepseek_v3", tmp_path / "d")), miss_policy="all", dtype="bfloat16"))
    w = eng.model.w
    assert w["model.layers.1.mlp.gate.weight"].dtype == torch.float32
    assert w["model.layers.1.mlp.gate.e_score_correction_bias"].dtype == torch.float32
    assert w["model.layers.1.mlp.shared_experts.gate_proj.weight"].dtype == torch.bfloat16
    assert len(eng.generate(PROMPTS[:1], GREEDY, chat=False)[0].output_ids) == 6


# DeepSeek-V2-Lite's config.json as published (legacy `rope_scaling` key), shapes only: no weights needed
V2_LITE = {"architectures": ["DeepseekV2ForCausalLM"], "model_type": "deepseek_v2", "bos_token_id": 100000,
           "eos_token_id": 100001, "first_k_dense_replace": 1, "hidden_act": "silu", "hidden_size": 2048,
           "intermediate_size": 10944, "kv_lora_rank": 512, "max_position_embeddings": 163840,
           "moe_intermediate_size": 1408, "moe_layer_freq": 1, "n_group": 1, "n_routed_experts": 64,
           "n_shared_experts": 2, "norm_topk_prob": False, "num_attention_heads": 16, "num_experts_per_tok": 6,
           "num_hidden_layers": 27, "num_key_value_heads": 16, "q_lora_rank": None, "qk_nope_head_dim": 128,
           "qk_rope_head_dim": 64, "rms_norm_eps": 1e-06, "rope_theta": 10000, "routed_scaling_factor": 1.0,
           "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 0.707, "mscale_all_dim": 0.707,
                            "original_max_position_embeddings": 4096, "type": "yarn"},
           "scoring_func": "softmax", "topk_group": 1, "topk_method": "greedy", "v_head_dim": 128,
           "vocab_size": 102400, "tie_word_embeddings": False}


def test_published_deepseek_v2_lite_config_matches_transformers():
    """The real config's YaRN frequencies, cos/sin factor and softmax scale equal what transformers derives."""
    import transformers
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2Attention

    from emoe.config import ModelConfig
    from emoe.rope import rope_frequencies
    c = ModelConfig.from_hf(V2_LITE)
    assert c.moe_layers == tuple(range(1, 27)) and c.num_experts == 64 and c.top_k == 6 and c.n_group == 1
    assert c.shared_expert_intermediate_size == 2 * 1408 and c.kv_numel_per_token == 27 * (512 + 64)
    ref = transformers.DeepseekV2Config(**{k: v for k, v in V2_LITE.items() if k not in ("architectures", "model_type")})
    inv_ref, factor_ref = ROPE_INIT_FUNCTIONS["yarn"](ref)
    inv, factor = rope_frequencies(c.head_dim, c.rope_theta, c.yarn)
    torch.testing.assert_close(inv, inv_ref)
    assert factor == pytest.approx(factor_ref)
    scale = (c.mla.qk_nope_head_dim + c.mla.qk_rope_head_dim) ** -0.5 * c.mla.softmax_mscale
    assert scale == pytest.approx(DeepseekV2Attention(ref, 0).scaling)


def test_gpt_oss_mxfp4_release_reads_as_transformers_dequantises_it(tmp_path):
    """The original gpt-oss checkpoints keep experts in MXFP4: the store dequantises each expert as it is
    read, to exactly transformers' values, and the engine answers as on those values written in bf16."""
    from safetensors import safe_open
    from safetensors.torch import save_file
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    from emoe.checkpoint import Checkpoint
    from emoe.store import DiskStore, RamStore
    from tiny import make_mxfp4
    mx = make_mxfp4(make_tiny("gpt_oss", tmp_path / "mx"))
    with safe_open(str(mx / "model.safetensors"), framework="pt") as f:
        ts = {k: f.get_tensor(k) for k in f.keys()}
    deq = tmp_path / "deq"  # the same weights as transformers dequantises them, in the bf16 layout
    deq.mkdir()
    for p in mx.iterdir():
        if p.name != "model.safetensors":
            (deq / p.name).write_bytes(p.read_bytes())
    for name in [k[: -len("_blocks")] for k in ts if k.endswith("_blocks")]:
        ts[name] = convert_moe_packed_tensors(ts.pop(name + "_blocks"), ts.pop(name + "_scales"), dtype=torch.float32)
    save_file(ts, str(deq / "model.safetensors"))
    a, b = DiskStore(Checkpoint(mx)), DiskStore(Checkpoint(deq))
    assert Checkpoint(mx).experts[(0, 0)].layout == "mxfp4" and Checkpoint(mx).experts[(0, 0)].nbytes * 3 < \
        Checkpoint(deq).experts[(0, 0)].nbytes  # 4.25 bits a weight against fp32
    ram = RamStore(Checkpoint(mx))  # holds the packed bytes, dequantises per read
    assert all(t.dtype == torch.uint8 for t in ram._experts[(0, 0)])
    for key in [(0, 0), (1, 5), (2, 7)]:
        assert all(torch.equal(x.float(), y) for x, y in zip(a.read(*key), b.read(*key)))
        assert all(torch.equal(x, y) for x, y in zip(a.read(*key), ram.read(*key)))
    # one compute dtype for both (by default a GPU computes in the checkpoint's: bf16 for one, float32 for the other)
    (e_mx, out_mx), (e_deq, out_deq) = run(mx, max_batch=1, dtype="float32"), run(deq, max_batch=1, dtype="float32")
    for key in [(0, 0), (1, 5), (2, 7)]:  # unpacked where they land (on a GPU: on the device) to the same bits
        assert all(torch.equal(x, y) for x, y in zip(e_mx.cache.get(*key), e_deq.cache.get(*key)))
    assert out_mx == out_deq
    eng, out = run(mx, miss_policy="host", budget=0.4)
    assert same_model_tokens(out, run(deq, max_batch=1)[1]) and eng.cache.stats.host_runs > 0


@pytest.mark.parametrize("family", ["deepseek_v3", "qwen3_moe"])
def test_fp8_release_reads_as_transformers_dequantises_it(family, tmp_path):
    """Block-scaled FP8 checkpoints (DeepSeek-V3, Qwen3-FP8) are read as they are released: every FP8
    tensor is dequantised with its weight_scale_inv to transformers' values, bit for bit; the RAM tier keeps
    experts in FP8 (1 byte a weight) and the tokens equal those of the dequantised checkpoint."""
    import json
    import shutil

    from safetensors import safe_open
    from safetensors.torch import save_file
    from transformers.integrations.finegrained_fp8 import Fp8Dequantize

    from emoe.checkpoint import Checkpoint
    from emoe.store import DiskStore, RamStore
    from tiny import make_fp8
    fp8 = make_fp8(make_tiny(family, tmp_path / "fp8"))
    deq = tmp_path / "deq"  # what transformers makes of it with dequantize=True, saved as a bf16 checkpoint
    shutil.copytree(fp8, deq)
    with safe_open(str(fp8 / "model.safetensors"), framework="pt") as f:
        ts = {k: f.get_tensor(k) for k in f.keys()}
    undo = Fp8Dequantize(None)
    for name in [k for k in ts if k.endswith("_scale_inv")]:
        w = name[: -len("_scale_inv")]
        ts[w] = undo._dequantize_one(ts[w], ts.pop(name), output_dtype=torch.bfloat16)
    save_file(ts, str(deq / "model.safetensors"))
    cfg = json.loads((deq / "config.json").read_text())
    del cfg["quantization_config"]
    (deq / "config.json").write_text(json.dumps(cfg))
    a, b = Checkpoint(fp8), Checkpoint(deq)
    # 1 byte a weight plus a 4-byte scale per 4×4 block here (per 128×128 block in the releases), against bf16's 2
    assert a.experts[(1, 0)].layout == "fp8" and a.expert_nbytes == b.expert_nbytes * (1 + 4 / 16) / 2
    da, db = a.dense_state(), b.dense_state()
    assert da.keys() == db.keys() and all(torch.equal(da[k], db[k]) for k in da)
    ram = RamStore(a)
    assert ram._experts[(1, 0)][0].dtype == torch.float8_e4m3fn
    for key in [(1, 0), (1, 5), (2, 7)]:
        want = DiskStore(b).read(*key)
        assert all(torch.equal(x, y) for x, y in zip(DiskStore(a).read(*key), want))
        assert all(torch.equal(x, y) for x, y in zip(ram.read(*key), want))
    _, ref = run(deq, max_batch=1)
    assert run(fp8, max_batch=1)[1] == ref
    eng, out = run(fp8, miss_policy="load", budget=0.4, experts_on="ram")
    assert out == ref and eng.cache.stats.loads > 0
    if not torch.cuda.is_available():  # a host run would unpack FP8 every time, a load once: auto loads
        eng, out = run(fp8, miss_policy="auto", budget=0.4, experts_on="ram")
        assert eng.policy.min_tokens == 1 and eng.cache.stats.host_runs == 0 and out == ref


FAMILY_CONFIGS = {}


def family_config(family, tmp_path_factory):
    if family not in FAMILY_CONFIGS:
        import json
        path = make_tiny(family, tmp_path_factory.mktemp("cfg") / family)
        FAMILY_CONFIGS[family] = json.loads((path / "config.json").read_text())
    return FAMILY_CONFIGS[family]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_malformed_configs_get_a_config_error(family, tmp_path_factory):
    """Any key removed or given a value of the wrong kind: the config parses or is refused with a
    ConfigError (one clear line at the command line), never another exception."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from emoe.config import ConfigError, ModelConfig
    raw = family_config(family, tmp_path_factory)
    junk = st.one_of(st.none(), st.text(max_size=3), st.integers(-3, 3), st.floats(allow_nan=True),
                     st.lists(st.integers(0, 2), max_size=2), st.dictionaries(st.text(max_size=2), st.integers(), max_size=1))

    # fixed examples in CI (a red build should mean a change broke something); EMOE_FUZZ=N explores N new ones
    fuzz = int(os.environ.get("EMOE_FUZZ", 0))
    @settings(max_examples=fuzz or 150, derandomize=not fuzz, deadline=None, suppress_health_check=list(HealthCheck))
    @given(st.sampled_from(sorted(raw)), st.booleans(), junk)
    def check(key, drop, value):
        bad = {k: v for k, v in raw.items() if k != key} if drop else {**raw, key: value}
        try:
            ModelConfig.from_hf(bad)
        except ConfigError:
            pass
    check()


def test_qwen3_next_reuses_a_slot_only_where_its_state_saw_exactly_the_prefix(tmp_path):
    """A linear-attention state holds everything its slot saw: a chat's next turn (the whole conversation so
    far, then more) continues it; a prompt sharing only part of it starts afresh. Both decode what a fresh
    engine decodes."""
    path = make_tiny("qwen3_next", tmp_path / "q3n")

    def decode(eng, ids):
        r = eng.make_request(list(ids), GREEDY)
        eng.admit([r])
        while eng.running:
            eng.step()
        return r
    eng = Engine(EngineConfig(str(path), miss_policy="all", max_batch=1, prefix_reuse=True))
    first = decode(eng, eng.codec.encode(PROMPTS[2]))
    follow = first.prompt_ids + first.output_ids + eng.codec.encode(" and then?")
    second = decode(eng, follow)
    assert eng.reused_tokens == len(first.prompt_ids) + len(first.output_ids) - 1
    branch = follow[:len(first.prompt_ids) - 2] + eng.codec.encode(" instead")  # shares a part only
    before = eng.reused_tokens
    third = decode(eng, branch)
    assert eng.reused_tokens == before
    for r in (second, third):
        fresh = Engine(EngineConfig(str(path), miss_policy="all", max_batch=1))
        assert decode(fresh, r.prompt_ids).output_ids == r.output_ids


def test_qwen35_multimodal_release_serves_its_language_model(tmp_path):
    """Qwen3.5-MoE as released (a vision-language checkpoint): config from text_config, weights from
    model.language_model.*, the vision tower left unread; logits equal transformers' on text, and the
    engine decodes under a budget with host misses exactly as all-resident."""
    import transformers
    from test_model import load_emoe
    from tiny import make_qwen35_multimodal
    path = make_qwen35_multimodal(tmp_path / "q35")
    ref = transformers.AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()
    cfg, model, dispatch = load_emoe(path)
    assert cfg.family == "qwen3_5_moe" and cfg.linear_layers == (0, 2) and cfg.rotary_dim == 4
    seq = torch.randint(0, cfg.vocab_size, (1, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = ref(input_ids=seq).logits
        got = model.forward(seq, torch.arange(20)[None], torch.ones_like(seq, dtype=torch.bool), dispatch)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert run(path, miss_policy="host", budget=0.4)[1] == run(path)[1]


def test_dense_int8_keeps_the_logits_close(model):
    """--dense-int8 on a CPU: the dense projections the kernel fits run as int8 copies (bf16 activations),
    the routers and everything else as they were; teacher-forced logits stay within 5% of float32's and
    within twice what computing all in bf16 moves them (measured: 0.01-1.65x across the families; Llama 4's
    top-1 tiny model 4.1%, where bf16 alone moves them 4.2%)."""
    from emoe.quant import DENSE_PROJECTIONS, KTensor
    ids, cont = list(range(1, 21)), list(range(40, 52))
    ref = Engine(EngineConfig(str(model), miss_policy="all", device="cpu")).score(ids, cont)
    eng = Engine(EngineConfig(str(model), miss_policy="all", device="cpu", dense_int8=True))
    held = [k for k, v in eng.model.w.items() if isinstance(v, KTensor)]
    assert "lm_head.weight" in held and all(k.removesuffix(".weight").rsplit(".", 1)[-1] in DENSE_PROJECTIONS
                                            for k in held)
    err = (eng.score(ids, cont) - ref).abs().max()
    bf16 = Engine(EngineConfig(str(model), miss_policy="all", device="cpu", dtype="bfloat16")).score(ids, cont)
    assert err <= 0.05 * ref.abs().max() and err <= 2 * (bf16.float() - ref).abs().max()


def test_gpt_oss_release_experts_run_on_exact_kernel_forms(tmp_path, capsys):
    """With host misses and experts in RAM, gpt-oss's released MXFP4 experts are held as exact two-plane
    forms of the int4 kernel (gate and up rows de-interleaved): their values are the release's, a load
    unpacks them to the same bf16 weights, and every expert run on them gives all-resident's tokens."""
    from emoe.checkpoint import Checkpoint
    from emoe.quant import KTensor, dequantize
    from emoe.store import DiskStore, RamStore
    from tiny import make_mxfp4
    mx = make_mxfp4(make_tiny("gpt_oss", tmp_path / "mx", hidden_size=256, intermediate_size=256))
    ck = Checkpoint(mx)
    ram, disk = RamStore(ck, host_forms=True), DiskStore(ck)
    assert ram.forms
    for key in [(0, 0), (1, 5), (2, 7)]:
        forms, want = ram.read_host(*key), disk.read(*key)
        assert all(isinstance(f, KTensor) for f in forms)
        assert all(torch.equal(dequantize(f), w.float()) for f, w in zip(forms, want))
        assert all(torch.equal(x, y) for x, y in zip(ram.read(*key), want))
    ref = run(mx, miss_policy="all")[1]
    eng, out = run(mx, miss_policy="host", budget=0, experts_on="ram")
    assert eng.store.forms and eng.cache.stats.host_runs > 0 and same_model_tokens(out, ref)
    if not torch.cuda.is_available():  # the CLI's default without a GPU, as for a GGUF
        from emoe.cli import main
        main(["generate", "hi", "--model", str(mx), "--max-tokens", "2", "--raw"])
        assert "no GPU:" in capsys.readouterr().err


@pytest.mark.skipif(not (__import__("emoe.ckernel").ckernel.library() and __import__("emoe.ckernel").ckernel.library().modes),
                    reason="no vector routine for this CPU")
@pytest.mark.parametrize("budget", [0, 0.4])
def test_gpt_oss_experts_on_forms_run_in_one_c_call_per_layer(tmp_path, budget, monkeypatch):
    """gpt-oss's experts (biases, clamped gate and up, (up + 1)·gate·σ(α·gate)) on host forms run as a layer's one
    kq_moe call with that activation, at budget 0 (the layer's table) and under a budget (the experts it
    fetched): the logits stay within a few hundredths of the per-expert torch path's, whose own distance to
    all-resident float32 (the products' rounding) is ten times that, and the greedy tokens are the same."""
    from emoe import ckernel, dispatch
    from tiny import make_mxfp4
    mx = make_mxfp4(make_tiny("gpt_oss", tmp_path / "mx", hidden_size=256, intermediate_size=256))
    ids = [(37 * j) % 300 + 3 for j in range(24)]
    acts, real = [], ckernel._moe
    monkeypatch.setattr(ckernel, "_moe", lambda *a: acts.append(a[-1] is not None) or real(*a))

    def run_it():
        eng = Engine(EngineConfig(str(mx), miss_policy="host", budget=budget, experts_on="ram", device="cpu"))
        toks = eng.generate([ids[:8]], SamplingParams(max_tokens=6, ignore_eos=True), chat=False)[0].output_ids
        return eng.score(ids[:12], ids[12:]), toks, eng.cache.stats.host_runs
    fast = run_it()
    assert acts and all(acts)
    monkeypatch.setattr(dispatch, "kq_experts", lambda *a: False)
    monkeypatch.setattr(dispatch.ExpertDispatch, "_host_table", lambda *a: None)
    acts.clear()
    slow = run_it()
    assert not acts
    ref = Engine(EngineConfig(str(mx), miss_policy="all", device="cpu")).score(ids[:12], ids[12:])
    moved = (slow[0] - ref).abs().max()
    assert (fast[0] - slow[0]).abs().max() <= 0.1 * moved + 1e-4, ((fast[0] - slow[0]).abs().max(), moved)
    assert fast[1] == slow[1] and fast[2] == slow[2] > 0


def _six_tokens(eng) -> list:
    """Two prompts' 6 greedy tokens each, with their log-probabilities (top 2): what the step-call tests compare."""
    got = eng.generate([[5, 9, 14, 3, 7], [8, 2, 11]], SamplingParams(max_tokens=6, ignore_eos=True, logprobs=2),
                       chat=False)
    return [(r.output_ids, r.logprobs) for r in got]


def _on_forms(path) -> list:
    """_six_tokens of an engine at budget 0 with every expert and dense projection in int8 forms (the C routines')."""
    return _six_tokens(Engine(EngineConfig(str(path), miss_policy="host", budget=0, experts_on="ram", device="cpu",
                                           host_int8=True, dense_int8=True)))


def _close(fast, slow, bound: float = 5e-3) -> None:
    """The same tokens, and log-probabilities within bound."""
    assert [t for t, _ in slow] == [t for t, _ in fast]
    assert max(abs(a[0] - b[0]) for (_, la), (_, lb) in zip(fast, slow) for a, b in zip(la, lb)) <= bound


@pytest.mark.skipif(not (__import__("emoe.ckernel").ckernel.library() and __import__("emoe.ckernel").ckernel.library().modes),
                    reason="no vector routine for this CPU")
def test_a_dense_layer_between_moe_layers_runs_in_the_step_call(tmp_path, monkeypatch):
    """A Qwen3-MoE with a dense middle layer (mlp_only_layers), its FP8 experts on host forms and its dense
    projections int8 forms (--dense-int8), at budget 0: a decode step's layers, the dense one's MLP included,
    run in one C call, with the per-layer path's tokens and log-probabilities bit for bit."""
    import emoe.model as model_mod
    from emoe import cstep
    from tiny import make_fp8
    fp8 = make_fp8(make_tiny("qwen3_moe", tmp_path / "m", hidden_size=256, moe_intermediate_size=128,
                             intermediate_size=256, num_attention_heads=4, mlp_only_layers=[1]))
    calls, real = [], cstep.layers
    monkeypatch.setattr(cstep, "layers", lambda *a: calls.append(1) or real(*a))

    def run_it():
        eng = Engine(EngineConfig(str(fp8), miss_policy="host", budget=0, experts_on="ram", device="cpu", dense_int8=True))
        assert eng.model.moe == {0, 2}
        return _six_tokens(eng), eng.cache.stats.host_runs
    fast = run_it()
    assert len(calls) == 5
    monkeypatch.setattr(model_mod, "decode_layers", lambda *a: False)
    assert run_it() == fast


@pytest.mark.skipif(not (__import__("emoe.ckernel").ckernel.library() and __import__("emoe.ckernel").ckernel.library().modes),
                    reason="no vector routine for this CPU")
@pytest.mark.parametrize("family", ["ernie4_5_moe", "hunyuan_v1_moe"])
def test_rotary_pairs_and_qk_norm_after_the_rotary_run_in_the_step_call(family, tmp_path, monkeypatch):
    """ERNIE-4.5 (rotary pairs, a dense first layer, shared experts) and Hunyuan (qk norm after the rotary, a
    shared MLP in every layer) with int8 forms of their experts and dense projections, at budget 0: a decode
    step's layers run in one C call with the per-layer path's tokens and log-probabilities bit for bit, and
    with the tokens of the same forms run through torch's attention (no C attention)."""
    import emoe.model as model_mod
    from emoe import cstep
    shape = dict(hidden_size=256, moe_intermediate_size=128, intermediate_size=128, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=64)
    path = make_tiny(family, tmp_path / "m", **shape)
    calls, real = [], cstep.layers
    monkeypatch.setattr(cstep, "layers", lambda *a: calls.append(1) or real(*a))

    fast = _on_forms(path)
    assert len(calls) == 5
    monkeypatch.setattr(model_mod, "decode_layers", lambda *a: False)
    assert _on_forms(path) == fast
    monkeypatch.setattr(model_mod.MoEModel, "_c_decode", lambda *a: False)
    # torch's SiLU and attention round their last bits differently from C's: where that moves an activation across
    # a rounding step of the next product's (bf16 or int8) activations, a log-probability moves by up to ~2e-3 on
    # this model (measured: 1.0e-3 / 1.7e-3 in one mode or the other, 0 in the other, by which forms hold the weights)
    _close(fast, _on_forms(path))


@pytest.mark.skipif(not (__import__("emoe.ckernel").ckernel.library() and __import__("emoe.ckernel").ckernel.library().modes),
                    reason="no vector routine for this CPU")
@pytest.mark.parametrize("family,rank,rope,v,kv_dtype", [("deepseek_v2", 48, 16, 32, None),
                                                         ("deepseek_v3", 48, 16, 32, None),
                                                         ("deepseek_v3", 64, 64, 64, None),
                                                         ("deepseek_v3", 64, 64, 64, "bfloat16")])
def test_latent_attention_and_grouped_routing_run_in_the_step_call(family, rank, rope, v, kv_dtype, tmp_path,
                                                                   monkeypatch):
    """DeepSeek's latent attention (V2-Lite's plain queries, V3's compressed ones) with int8 forms of its projections
    and experts, at budget 0: a decode step's layers, V3's group-limited routing included (4 groups, 2 a token),
    run in one C call, with the per-layer path's tokens (its attention in C too: cstep.mla_block) and with the
    tokens of torch's absorbed attention (mla.attention). Where the latent rank and v are whole 64-row blocks, kv_b's
    halves run as int8 forms per head (within 3e-2 of torch's float kv_b; the float kv_b within 5e-3)."""
    import emoe.model as model_mod
    from emoe import cstep, decode_block
    shape = dict(hidden_size=256, moe_intermediate_size=128, intermediate_size=128, num_attention_heads=4,
                 num_key_value_heads=4, kv_lora_rank=rank, qk_rope_head_dim=rope, qk_nope_head_dim=32, v_head_dim=v)
    path = make_tiny(family, tmp_path / "m", **shape, **({"q_lora_rank": 64} if family == "deepseek_v3" else {}))
    calls, real, blocks, real_block = [], cstep.layers, [], cstep.mla_block
    monkeypatch.setattr(cstep, "layers", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setattr(cstep, "mla_block", lambda *a: blocks.append(1) or real_block(*a))

    long = [(7 * t) % 300 + 1 for t in range(150)]  # a context of 3 chunks of 64 positions: their merge
    def run_it():
        eng = Engine(EngineConfig(str(path), miss_policy="host", budget=0, experts_on="ram", device="cpu",
                                  host_int8=True, dense_int8=True, kv_dtype=kv_dtype))
        assert eng.model.cfg.n_group == (4 if family == "deepseek_v3" else 1)
        assert eng.kv.k[0].dtype == (torch.bfloat16 if kv_dtype else torch.float32)
        assert all((decode_block.block_weights(eng.model, i)[-1][0] is not None) == (rank == 64) for i in range(3))
        got = eng.generate([[5, 9, 14, 3, 7], [8, 2, 11], long], SamplingParams(max_tokens=6, ignore_eos=True, logprobs=2),
                           chat=False)
        return [(r.output_ids, r.logprobs) for r in got]

    def worst(a, b):
        return max(abs(x[0] - y[0]) for (_, la), (_, lb) in zip(a, b) for x, y in zip(la, lb))
    fast = run_it()
    assert len(calls) == 5 and not blocks
    monkeypatch.setattr(model_mod, "decode_layers", lambda *a: False)
    layered = run_it()
    assert len(blocks) == 5 * 3
    # the same routines in the same order, but for the shared experts' SiLU (torch's here, C's in the step call)
    assert [t for t, _ in layered] == [t for t, _ in fast] and worst(layered, fast) <= 5e-4
    monkeypatch.setattr(model_mod.MoEModel, "_c_decode", lambda *a: False)
    slow = run_it()
    assert len(blocks) == 5 * 3 and [t for t, _ in slow] == [t for t, _ in fast]
    assert worst(slow, fast) <= (3e-2 if rank == 64 else 5e-3)  # measured 1.1e-2 / 5e-7


@pytest.mark.skipif(not (__import__("emoe.ckernel").ckernel.library() and __import__("emoe.ckernel").ckernel.library().modes),
                    reason="no vector routine for this CPU")
@pytest.mark.parametrize("family", ["qwen3_5_moe", "qwen3_next"])
def test_linear_attention_layers_run_their_decode_step_in_one_call(family, tmp_path, monkeypatch):
    """Qwen3.5's gated delta rule layers and Qwen3-Next's (its fused in_proj_qkvz / in_proj_ba split at load)
    and their output-gated attention layer with int8 forms, at budget 0: a decode step's layers run in one C call
    (cstep.layers), with the per-layer path's tokens (its linear-attention halves one C call each:
    cstep.delta_block) and with torch's (deltanet.delta_net_rows): log-probabilities within 5e-3 (measured
    2.5e-3: the products' int8 activations round what the paths' last bits leave), and the slots' conv inputs
    and recurrent states after the run within 1e-3."""
    import emoe.model as model_mod
    from emoe import cstep
    path = make_tiny(family, tmp_path / "m", hidden_size=256, moe_intermediate_size=128,
                     shared_expert_intermediate_size=128, num_attention_heads=4, head_dim=64, linear_key_head_dim=32,
                     linear_value_head_dim=32)
    calls = {"delta": 0, "layers": 0}
    real, real_layers = cstep.delta_block, cstep.layers
    monkeypatch.setattr(cstep, "delta_block", lambda *a: calls.__setitem__("delta", calls["delta"] + 1) or real(*a))
    monkeypatch.setattr(cstep, "layers",
                        lambda *a, **k: calls.__setitem__("layers", calls["layers"] + 1) or real_layers(*a, **k))

    def run_it():
        eng = Engine(EngineConfig(str(path), miss_policy="host", budget=0, experts_on="ram", device="cpu", max_batch=3,
                                  host_int8=True, dense_int8=True))
        got = eng.generate([[5, 9, 14, 3, 7], [8, 2, 11], [(7 * t) % 300 + 1 for t in range(90)]],
                           SamplingParams(max_tokens=8, ignore_eos=True, logprobs=2), chat=False)
        return [(r.output_ids, r.logprobs) for r in got], eng.kv

    def close(a, b, bound):
        (ra, kva), (rb, kvb) = a, b
        assert [t for t, _ in ra] == [t for t, _ in rb]
        assert max(abs(x[0] - y[0]) for (_, la), (_, lb) in zip(ra, rb) for x, y in zip(la, lb)) <= bound
        for i in (0, 2):
            for x, y in ((kva.conv[i], kvb.conv[i]), (kva.state[i], kvb.state[i])):
                assert (x - y).abs().max() <= 1e-3 * y.abs().max()
    fused = run_it()
    assert calls == {"delta": 0, "layers": 7}  # 7 decode steps
    monkeypatch.setattr(model_mod, "decode_layers", lambda *a: False)
    layered = run_it()
    assert calls == {"delta": 7 * 2, "layers": 7}  # linear layers 0 and 2
    close(fused, layered, 5e-4)  # the same routines, but for the shared expert's SiLU and gate (torch's per layer)
    monkeypatch.setattr(model_mod, "attn_block", lambda *a: None)
    close(fused, run_it(), 5e-3)
    assert calls["delta"] == 7 * 2


@pytest.mark.parametrize("family", ["deepseek_v2", "deepseek_v3"])
def test_latent_attention_decompresses_for_prefill_chunks_and_absorbs_for_decode(family, tmp_path, monkeypatch):
    """mla.attention: a prefill chunk decompresses every cached latent to per-head keys and values, a decode step
    attends in the latent space (mla.decompress says which costs less); either way gives the other's logits, over
    a prompt prefilled in chunks of 7 into the KV cache and the decode steps after it."""
    from emoe import mla
    from emoe.config import MLA
    m = MLA(0, 512, 128, 64, 128)
    assert mla.decompress(254, 254, m) and mla.decompress(512, 2048, m)
    assert not mla.decompress(1, 254, m) and not mla.decompress(2, 4096, m)
    path = make_tiny(family, tmp_path / "m")

    def logits(rule):
        monkeypatch.setattr(mla, "decompress", rule)
        eng = Engine(EngineConfig(str(path), miss_policy="all", device="cpu", prefill_chunk=7))
        for k in [k for k in eng.model.w if k.endswith(("q_proj.weight", "q_b_proj.weight", "kv_b_proj.weight"))]:
            eng.model.w[k] = eng.model.w[k] * 12  # scores far from 0: a random tiny model's attend almost uniformly
        r = eng.generate([list(range(3, 40))], SamplingParams(max_tokens=5, ignore_eos=True, logprobs=3,
                                                               prompt_logprobs=3), chat=False)[0]
        return r.output_ids, torch.tensor([lp for lp, _ in r.prompt_logprobs + r.logprobs])
    real = mla.decompress
    want = logits(real)
    for rule in (lambda *a: True, lambda *a: False):
        ids, lp = logits(rule)
        assert ids == want[0] and torch.allclose(lp, want[1], atol=1e-5)


@pytest.mark.parametrize("family", ["deepseek_v3", "qwen3_moe"])
def test_fp8_release_experts_run_on_int8_kernel_forms(family, tmp_path):
    """With host misses and experts in RAM, an FP8 release's experts are held as int8 forms of the kernel
    (E4M3 quantised again per 32: within 1% of each group's largest value), a load unpacks a form to those
    values, and every expert run on them keeps the teacher-forced logits near the release's own."""
    from emoe.checkpoint import Checkpoint
    from emoe.quant import KTensor, dequantize
    from emoe.store import DiskStore, RamStore
    from tiny import make_fp8
    fp8 = make_fp8(make_tiny(family, tmp_path / "fp8", hidden_size=128, moe_intermediate_size=64,
                             num_attention_heads=4))
    ck = Checkpoint(fp8)
    ram, disk = RamStore(ck, host_forms=True), DiskStore(ck)
    assert ram.forms
    key = next(k for k in ck.experts if ck.experts[k].layout == "fp8")
    forms, want = ram.read_host(*key), disk.read(*key)
    assert all(isinstance(f, KTensor) for f in forms)
    for f, w in zip(forms, want):
        err = (dequantize(f) - w.float()).abs().view(w.shape[0], -1, 32).amax(-1)
        assert (err <= 0.01 * w.float().abs().view(w.shape[0], -1, 32).amax(-1) + 1e-6).all()
    assert all(torch.equal(x, dequantize(f, torch.bfloat16)) for x, f in zip(ram.read(*key), forms))
    ids, cont = list(range(1, 17)), list(range(40, 50))
    ref = Engine(EngineConfig(str(fp8), miss_policy="all", device="cpu")).score(ids, cont)
    eng = Engine(EngineConfig(str(fp8), miss_policy="host", budget=0, experts_on="ram", device="cpu"))
    assert eng.store.forms
    assert (eng.score(ids, cont) - ref).abs().max() <= 0.02 * ref.abs().max()  # measured 0.5%


@pytest.mark.skipif(not (__import__("emoe.ckernel").ckernel.library() and __import__("emoe.ckernel").ckernel.library().modes),
                    reason="no vector routine for this CPU")
def test_a_bf16_kv_cache_runs_in_the_step_call(tmp_path, monkeypatch):
    """--kv-dtype bfloat16 on a CPU: the attention layers' caches are bf16 (half the bytes, so a memory budget
    holds more slots), a decode step's layers still run in one C call, with the per-layer C path's tokens and
    log-probabilities bit for bit, and with the tokens of torch's attention over the same bf16 cache. A dtype
    the cache cannot take is refused before anything loads."""
    import emoe.model as model_mod
    from emoe import cstep
    path = make_tiny("qwen3_moe", tmp_path / "m", hidden_size=256, moe_intermediate_size=128,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=64)
    calls, real = [], cstep.layers
    monkeypatch.setattr(cstep, "layers", lambda *a: calls.append(1) or real(*a))

    def engine(kv_dtype="bfloat16", **kw):
        return Engine(EngineConfig(str(path), miss_policy="host", budget=0, experts_on="ram", device="cpu",
                                   host_int8=True, dense_int8=True, kv_dtype=kv_dtype, **kw))

    def run_it():
        eng = engine()
        assert all(t.dtype == torch.bfloat16 for t in eng.kv.k + eng.kv.v)
        return _six_tokens(eng)
    fast = run_it()
    assert len(calls) == 5
    monkeypatch.setattr(model_mod, "decode_layers", lambda *a: False)
    assert run_it() == fast
    monkeypatch.setattr(model_mod, "attn_block", lambda *a: None)
    monkeypatch.setattr(model_mod.MoEModel, "_c_decode", lambda *a: False)
    assert [t for t, _ in run_it()] == [t for t, _ in fast]
    mem = 64 << 20
    assert engine(memory_bytes=mem, max_len=512).max_batch >= 2 * engine("float32", memory_bytes=mem, max_len=512).max_batch - 1
    with pytest.raises(ValueError, match="kv_dtype"):
        EngineConfig(str(path), kv_dtype="int8")


@pytest.mark.parametrize("family", ["deepseek_v32", "glm_moe_dsa"])
def test_indexed_attention_is_served_within_its_top_k(family, tmp_path):
    """DeepSeek-V3.2 / GLM-5 attend to each query's index_topk best keys (a lightning indexer picks them); up to that
    many keys that is every key, dense attention (test_model holds its logits to transformers'). So the context is
    capped there, and the indexer's weights are never read."""
    path = make_tiny(family, tmp_path / "m", index_topk=12)
    eng = Engine(EngineConfig(str(path), miss_policy="all", max_len=1024))
    assert eng.cfg.max_position_embeddings == 12 and eng.max_len == 12
    assert not any(".indexer." in k for k in eng.model.w) and not any(".indexer." in k for k in eng.ckpt.tensors)
    assert not eng.fits("a prompt of well over twelve tokens, which no slot holds", 4, chat=False)
    assert [len(r.output_ids) for r in eng.generate(["hi"], SamplingParams(max_tokens=4, ignore_eos=True), chat=False)] == [4]


def test_llama4_multimodal_release_serves_its_language_model(tmp_path):
    """Llama 4 as released (Scout, Maverick: Llama4ForConditionalGeneration): config from text_config, weights from
    language_model.model.* and language_model.lm_head, the vision model and projector unread; every layer MoE here
    (Scout's layout), the context capped at the attention chunk; logits equal transformers' on text, and the engine
    decodes under a budget with loads on demand exactly as all-resident."""
    import transformers
    from test_model import load_emoe
    from tiny import make_llama4_multimodal
    path = make_llama4_multimodal(tmp_path / "l4")
    ref = transformers.AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()
    cfg, model, dispatch = load_emoe(path)
    assert cfg.family == "llama4" and cfg.moe_layers == (0, 1, 2) and cfg.nope_layers == (1,)
    assert cfg.max_position_embeddings == 128
    seq = torch.randint(0, cfg.vocab_size, (1, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = ref.language_model(input_ids=seq).logits  # (its own forward fails on text alone in transformers 5)
        got = model.forward(seq, torch.arange(20)[None], torch.ones_like(seq, dtype=torch.bool), dispatch)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert run(path, miss_policy="load", budget=0.4)[1] == run(path)[1]


def test_llama4_with_more_than_one_expert_a_token_is_refused(tmp_path_factory):
    """The routing weight scales the expert's input (Llama 4), which emoe serves with one expert a token, as every
    release routes; two would need each token's input scaled per expert: refused with the reason."""
    from emoe.config import ConfigError, ModelConfig
    raw = family_config("llama4", tmp_path_factory)
    assert ModelConfig.from_hf(raw).top_k == 1
    with pytest.raises(ConfigError, match="one expert a token"):
        ModelConfig.from_hf({**raw, "num_experts_per_tok": 2})


@pytest.mark.skipif(not (__import__("emoe.ckernel").ckernel.library() and __import__("emoe.ckernel").ckernel.library().modes),
                    reason="no vector routine for this CPU")
def test_llama4_rotary_layers_run_their_attention_in_c(tmp_path, monkeypatch):
    """Llama 4 with int8 forms of its experts and dense projections, at budget 0: a decode step's rotary layers run
    their attention half in one C call (the L2 qk norm as a unit-weight RMS norm after the rotary), its layer without
    rotary (temperature-scaled queries) and the input-scaled experts the per-layer path; the tokens are those of the
    same forms through torch's attention."""
    import emoe.model as model_mod
    from emoe import cstep
    path = make_tiny("llama4", tmp_path / "m", hidden_size=256, intermediate_size=128, intermediate_size_mlp=128,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=64, floor_scale=2)
    calls, real = [], cstep.attn_block
    monkeypatch.setattr(cstep, "attn_block", lambda *a: calls.append(1) or real(*a))

    fast = _on_forms(path)
    assert len(calls) == 5 * 2  # five decode steps of the two rotary layers (layer 2 has none)
    monkeypatch.setattr(model_mod.MoEModel, "_c_decode", lambda *a: False)
    _close(fast, _on_forms(path))
