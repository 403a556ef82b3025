import pytest
import torch

from conftest import needs_pinned_transformers

from emoe.cache import ExpertCache
from emoe.checkpoint import Checkpoint
from emoe.families import FAMILIES as emoe_families
from emoe.dispatch import ExpertDispatch
from emoe.model import KVCache, MoEModel
from emoe.policies import AllResident
from emoe.store import DiskStore
from tiny import make_tiny

FAMILIES = list(emoe_families)  # every family the config table knows


def load_emoe(path):
    ck = Checkpoint(path)
    c = ck.config
    numel = 3 * c.moe_intermediate_size * c.hidden_size
    cache = ExpertCache(DiskStore(ck), 10**9, "cpu", torch.float32, c.num_layers, c.num_experts, numel)
    AllResident().prepare(cache, list(c.moe_layers))
    model = MoEModel(c, {k: v.float() for k, v in ck.dense_state().items()})
    return c, model, ExpertDispatch(cache, AllResident(), None, model.expert_fn)


YARN = dict(rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=8))


@pytest.mark.parametrize("family,over", [(f, {}) for f in FAMILIES] + [("qwen3_moe", YARN)],
                         ids=FAMILIES + ["qwen3_moe-yarn"])
def test_logits_match_transformers(family, over, tmp_path):
    import transformers
    if family == "minimax_m2":
        needs_pinned_transformers("MiniMax-M2's modelling")
    path = make_tiny(family, tmp_path / family, **over)
    ref = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    cfg, model, dispatch = load_emoe(path)
    g = torch.Generator().manual_seed(1)
    seqs = [torch.randint(0, cfg.vocab_size, (n,), generator=g) for n in (11, 6)]
    with torch.no_grad():
        want = [ref(s[None]).logits[0] for s in seqs]
        # batched, right-padded prefill of the first n-1 tokens through the KV cache, then one decode step
        kv = KVCache.empty(cfg, 2, 32, torch.float32, "cpu")
        T = max(len(s) for s in seqs) - 1
        tokens = torch.zeros(2, T, dtype=torch.long)
        valid = torch.zeros(2, T, dtype=torch.bool)
        for b, s in enumerate(seqs):
            tokens[b, : len(s) - 1], valid[b, : len(s) - 1] = s[:-1], True
        pos = torch.arange(T).expand(2, T).clone()
        slots = torch.tensor([1, 0])
        got = model.forward(tokens, pos, valid, dispatch, kv, slots)
        for b, s in enumerate(seqs):
            torch.testing.assert_close(got[b, : len(s) - 1], want[b][:-1], atol=1e-4, rtol=1e-4)
        last = torch.stack([s[-1:] for s in seqs])
        lpos = torch.tensor([[len(s) - 1] for s in seqs])
        step = model.forward(last, lpos, torch.ones(2, 1, dtype=torch.bool), dispatch, kv, slots, last_only=True)
        for b in range(2):
            torch.testing.assert_close(step[b], want[b][-1], atol=1e-4, rtol=1e-4)
        stateless = model.forward(seqs[0][None], torch.arange(len(seqs[0]))[None],
                                  torch.ones(1, len(seqs[0]), dtype=torch.bool), dispatch)
        torch.testing.assert_close(stateless[0], want[0], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", ["qwen2_moe", "qwen3_next"])
def test_q_k_v_stack_into_one_projection_where_their_kinds_allow(family, tmp_path, monkeypatch):
    """One qkv_proj per attention layer (biases too, Qwen2's), split back by width: the logits are those of three
    products. Qwen3-Next's q carries its output gate (twice the width), and its linear-attention layers have no
    q/k/v. Where the kinds differ (a KTensor v beside full q and k) the three stay apart."""
    import emoe.model as model_mod
    from emoe.quant import KTensor, quantize, stack_rows, to_kernel
    path = make_tiny(family, tmp_path / family)
    cfg, model, dispatch = load_emoe(path)
    attn = [i for i in range(cfg.num_layers) if i not in cfg.linear_layers]
    assert sorted(model.qkv) == attn and not any(k.endswith(("q_proj.weight", "k_proj.weight")) for k in model.w)
    assert (family == "qwen2_moe") == (f"model.layers.{attn[0]}.self_attn.qkv_proj.bias" in model.w)
    monkeypatch.setattr(model_mod, "stack_qkv", lambda weights, layers: (weights, {}))
    _, apart, _ = load_emoe(path)
    assert not apart.qkv and f"model.layers.{attn[0]}.self_attn.q_proj.weight" in apart.w
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, cfg.vocab_size, (2, 7), generator=g)
    pos, valid = torch.arange(7).expand(2, 7), torch.ones(2, 7, dtype=torch.bool)
    with torch.no_grad():
        torch.testing.assert_close(model.forward(tokens, pos, valid, dispatch), apart.forward(tokens, pos, valid, dispatch),
                                   rtol=1e-5, atol=1e-5)
    v = to_kernel(quantize(torch.randn(64, 128), 8, 32))
    assert stack_rows([torch.randn(64, 128), torch.randn(64, 128), v]) is None
    assert stack_rows([v, to_kernel(quantize(torch.randn(64, 128), 4, 32))]) is None  # two planes and one
    both = stack_rows([v, v])
    assert isinstance(both, KTensor) and both.shape == (128, 128)
