"""Qwen3-Next's gated delta rule: the chunked form (prompts) against the one-token recurrence (decode), and
a prompt longer than a chunk against transformers."""
import torch

from emoe.deltanet import CHUNK, gated_delta_rule, l2norm


def recurrence(q, k, v, g, beta, state):
    outs = []
    for t in range(q.shape[0]):
        o, state = gated_delta_rule(q[t:t + 1], k[t:t + 1], v[t:t + 1], g[t:t + 1], beta[t:t + 1], state)
        outs.append(o)
    return torch.cat(outs), state


def inputs(n, H=3, dk=8, dv=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k = (l2norm(torch.randn(n, H, dk, generator=g, dtype=torch.float64)) for _ in range(2))
    v = torch.randn(n, H, dv, generator=g, dtype=torch.float64)
    decay = -torch.rand(n, H, generator=g, dtype=torch.float64) * 3  # some heads forget fast
    beta = torch.rand(n, H, generator=g, dtype=torch.float64)
    state = torch.randn(H, dk, dv, generator=g, dtype=torch.float64)
    return q * dk ** -0.5, k, v, decay, beta, state


def test_chunked_rule_equals_the_recurrence_across_chunks_and_from_a_state():
    n = 2 * CHUNK + 7
    q, k, v, g, beta, state = inputs(n)
    want, want_state = recurrence(q, k, v, g, beta, state)
    got, got_state = gated_delta_rule(q, k, v, g, beta, state)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(got_state, want_state)
    cut = 23  # two calls carrying the state give the one call's outputs
    a, s = gated_delta_rule(q[:cut], k[:cut], v[:cut], g[:cut], beta[:cut], state)
    b, s = gated_delta_rule(q[cut:], k[cut:], v[cut:], g[cut:], beta[cut:], s)
    torch.testing.assert_close(torch.cat((a, b)), want)
    torch.testing.assert_close(s, want_state)


def test_a_prompt_longer_than_a_chunk_matches_transformers(tmp_path):
    import transformers
    from test_model import load_emoe
    from tiny import make_tiny
    path = make_tiny("qwen3_next", tmp_path / "q3n")
    ref = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    cfg, model, dispatch = load_emoe(path)
    seq = torch.randint(0, cfg.vocab_size, (1, CHUNK * 2 + 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = ref(seq).logits
        got = model.forward(seq, torch.arange(seq.shape[1])[None], torch.ones_like(seq, dtype=torch.bool), dispatch)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_rows_with_padding_equal_each_row_alone(tmp_path):
    """Right-padded rows of different lengths, some continuing a state, give each row's own outputs, conv
    inputs and state: padding neither decays nor writes."""
    from emoe.checkpoint import Checkpoint
    from emoe.deltanet import delta_net_rows
    from tiny import make_tiny
    ck = Checkpoint(make_tiny("qwen3_next", tmp_path / "q3n"))
    d, w, p = ck.config.delta_net, {k: v.float() for k, v in ck.dense_state().items()}, "model.layers.0.linear_attn."
    g = torch.Generator().manual_seed(0)
    lengths = [7, 1, 70, 0]  # one past a chunk, one empty
    x = torch.randn(4, max(lengths), ck.config.hidden_size, generator=g)
    conv = torch.randn(4, d.conv_dim, d.conv_kernel - 1, generator=g)
    state = torch.randn(4, d.v_heads, d.k_head_dim, d.v_head_dim, generator=g) * 0.1
    out, conv_all, state_all = delta_net_rows(x, lengths, w, p, d, 1e-6, conv, state)
    for b, n in enumerate(lengths):
        if n == 0:
            torch.testing.assert_close(conv_all[b], conv[b])
            torch.testing.assert_close(state_all[b], state[b])
            continue
        one, c, s = delta_net_rows(x[b:b + 1, :n], [n], w, p, d, 1e-6, conv[b:b + 1], state[b:b + 1])
        torch.testing.assert_close(out[b, :n], one[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(conv_all[b], c[0])
        torch.testing.assert_close(state_all[b], s[0], atol=1e-5, rtol=1e-5)
