"""Qwen3-Next's linear attention (the gated delta rule, arXiv 2412.06464) as pure functions.

Each sequence carries a fixed-size state instead of a growing KV cache: the last conv_kernel − 1 inputs of
a causal depthwise convolution, and a [v_heads, k_head_dim, v_head_dim] matrix the rule decays and
corrects token by token. Prompts run in chunks of CHUNK tokens (the WY form: within a chunk the delta
corrections solve a triangular system; across chunks the state carries) and a decode step's single
tokens by the one-token recurrence, all of a step's rows at once (padding made inert), in float32 as
transformers' reference does.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .config import DeltaNet
from .quant import linear

CHUNK = 64


def l2norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + eps)


def unfuse(w: dict, d: DeltaNet, layers) -> None:
    """Qwen3-Next's fused in_proj_qkvz / in_proj_ba (grouped by key head: its q, k, then the values and gates
    of the Hv/Hk value heads it serves; its r betas, then r alphas) → Qwen3.5's split projections, in place:
    in_proj_qkv (all q, all k, all v: the conv's channel order, so conv1d is unchanged), in_proj_z, in_proj_b,
    in_proj_a. Done once at load, it leaves one layout for the torch rule and the C step to read."""
    r = d.v_heads // d.k_heads
    for layer in layers:
        p = f"model.layers.{layer}.linear_attn."
        if p + "in_proj_qkvz.weight" in w:
            t = w.pop(p + "in_proj_qkvz.weight")
            q, k, v, z = t.view(d.k_heads, -1, t.shape[-1]).split(
                [d.k_head_dim, d.k_head_dim, r * d.v_head_dim, r * d.v_head_dim], 1)
            w[p + "in_proj_qkv.weight"] = torch.cat([x.reshape(-1, t.shape[-1]) for x in (q, k, v)])
            w[p + "in_proj_z.weight"] = z.reshape(-1, t.shape[-1]).contiguous()
        if p + "in_proj_ba.weight" in w:
            t = w.pop(p + "in_proj_ba.weight")
            b, a = t.view(d.k_heads, 2 * r, t.shape[-1]).split([r, r], 1)
            w[p + "in_proj_b.weight"], w[p + "in_proj_a.weight"] = (x.reshape(-1, t.shape[-1]).contiguous() for x in (b, a))


def gated_delta_rule(q, k, v, g, beta, state):
    """q, k [n, H, dk] (l2-normalised, q scaled); v [n, H, dv]; g (log decay), beta [n, H]; state [H, dk, dv].
    All float32. Returns (out [n, H, dv], final state)."""
    n = q.shape[0]
    if n == 1:
        s = state * g[0].exp()[:, None, None]
        delta = (v[0] - torch.einsum("hkv,hk->hv", s, k[0])) * beta[0][:, None]
        s = s + k[0][:, :, None] * delta[:, None, :]
        return torch.einsum("hkv,hk->hv", s, q[0])[None], s
    outs = []
    for c in range(0, n, CHUNK):
        out, state = _chunk(q[c:c + CHUNK], k[c:c + CHUNK], v[c:c + CHUNK], g[c:c + CHUNK], beta[c:c + CHUNK], state)
        outs.append(out)
    return torch.cat(outs), state


def _chunk(q, k, v, g, beta, state):
    """One chunk of L tokens at once: with cumulative decays G, the corrected values U solve
    (I + tril(β·K·Kᵀ·e^{G_i−G_j}, −1))·U = β·(V − e^{G}·K·S); then out = Q·S·e^{G} + tril(Q·Kᵀ·e^{G_i−G_j})·U
    and S' = e^{G_L}·S + Σ_j e^{G_L−G_j}·k_j·u_jᵀ."""
    L = q.shape[0]
    q, k, v, g, beta = (t.transpose(0, 1) for t in (q, k, v, g, beta))  # heads first
    G = g.cumsum(-1)                                                     # [H, L]
    decay = (G[:, :, None] - G[:, None, :]).tril().exp().tril()          # e^{G_i − G_j}, i ≥ j
    kk = (k @ k.transpose(-1, -2)) * decay                               # [H, L, L]
    a = torch.eye(L, dtype=q.dtype, device=q.device) + (beta[:, :, None] * kk).tril(-1)
    rhs = beta[:, :, None] * (v - (k * G.exp()[:, :, None]) @ state)
    u = torch.linalg.solve_triangular(a, rhs, upper=False, unitriangular=True)
    out = (q * G.exp()[:, :, None]) @ state + ((q @ k.transpose(-1, -2)) * decay) @ u
    tail = (G[:, -1:] - G).exp()                                         # e^{G_L − G_j}
    state = state * G[:, -1].exp()[:, None, None] + (k * tail[:, :, None]).transpose(-1, -2) @ u
    return out.transpose(0, 1), state


def gated_rms_norm(x: torch.Tensor, weight: torch.Tensor, gate: torch.Tensor, eps: float) -> torch.Tensor:
    """RMS-normalise each value head, scale, and gate by silu(z) (transformers' Qwen3NextRMSNormGated)."""
    dtype = x.dtype
    h = x.float()
    h = weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)).to(dtype)
    return (h * F.silu(gate.float())).to(dtype)


def _inputs(x: torch.Tensor, w: dict, p: str, d: DeltaNet):
    """Tokens x [n, hidden] → conv input [n, conv_dim], z [n, Hv, dv], b and a [n, Hv] (split projections: unfuse)."""
    z = linear(x, w[p + "in_proj_z.weight"]).view(-1, d.v_heads, d.v_head_dim)
    return linear(x, w[p + "in_proj_qkv.weight"]), z, linear(x, w[p + "in_proj_b.weight"]), \
        linear(x, w[p + "in_proj_a.weight"])


def _rule_inputs(mixed: torch.Tensor, a: torch.Tensor, b: torch.Tensor, w: dict, p: str, d: DeltaNet):
    """Convolved q/k/v [n, conv_dim] → float32 (q scaled, k) [n, Hv, dk], v [n, Hv, dv], log decay and beta [n, Hv]."""
    kd, r = d.k_heads * d.k_head_dim, d.v_heads // d.k_heads
    q, k, v = mixed.float().split([kd, kd, d.v_heads * d.v_head_dim], -1)
    q, k = (l2norm(t.view(-1, d.k_heads, d.k_head_dim)).repeat_interleave(r, dim=1) for t in (q, k))
    g = -w[p + "A_log"].float().exp() * F.softplus(a.float() + w[p + "dt_bias"].float())
    return q * d.k_head_dim ** -0.5, k, v.view(-1, d.v_heads, d.v_head_dim), g, b.float().sigmoid()


def delta_net_rows(x: torch.Tensor, lengths: list[int], w: dict, p: str, d: DeltaNet, eps: float,
                   conv_prev: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """B sequences' next tokens at once, x [B, T, hidden] right-padded (row b's first lengths[b] are real),
    conv_prev [B, C, K−1], state [B, Hv, dk, dv] → (output [B, T, hidden], new conv inputs, new states). Padding
    neither decays nor writes a state (g = 0, β = 0) and comes after every real token, so it changes nothing
    real; each row's conv inputs end at its last real token. Rows fold into heads: one chunked rule for all."""
    B, T, H = x.shape
    mixed, z, b, a = _inputs(x.reshape(B * T, H), w, p, d)
    C, K1 = mixed.shape[-1], conv_prev.shape[-1]
    seq = torch.cat((conv_prev.to(x.dtype), mixed.view(B, T, C).transpose(1, 2)), -1)  # [B, C, K−1+T]
    mixed = F.silu(F.conv1d(seq, w[p + "conv1d.weight"].to(x.dtype), groups=C)).transpose(1, 2).reshape(B * T, C)
    n = torch.tensor(lengths, device=x.device)
    conv_prev = seq.gather(2, (n[:, None] + torch.arange(K1, device=x.device))[:, None, :].expand(B, C, K1))
    q, k, v, g, beta = _rule_inputs(mixed, a, b, w, p, d)
    real = (torch.arange(T, device=x.device)[None] < n[:, None]).reshape(B * T, 1)
    g, beta = g * real, beta * real

    def fold(t: torch.Tensor) -> torch.Tensor:  # [B·T, Hv, …] → [T, B·Hv, …]
        return t.view(B, T, *t.shape[1:]).transpose(0, 1).reshape(T, B * t.shape[1], *t.shape[2:])
    out, state = gated_delta_rule(fold(q), fold(k), fold(v), fold(g), fold(beta), state.reshape(-1, *state.shape[2:]))
    out = out.view(T, B, d.v_heads, d.v_head_dim).transpose(0, 1).reshape(B * T, d.v_heads, d.v_head_dim)
    out = gated_rms_norm(out.to(x.dtype), w[p + "norm.weight"], z, eps)
    return (linear(out.flatten(1), w[p + "out_proj.weight"]).view(B, T, H), conv_prev,
            state.view(B, d.v_heads, d.k_head_dim, d.v_head_dim))
