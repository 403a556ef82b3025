"""The MoE decoder forward for Mixtral, Qwen2-MoE, Qwen3-MoE and OLMoE, top to bottom.

Dense weights live in a flat dict under their Hugging Face names. Routed experts are *not* here: each
MoE layer computes router probabilities and hands them to a `Dispatch` (see engine.py) that owns
residency, miss handling and traces. The pure functions below are shared with training (train.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F

from .config import ModelConfig


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    dtype = x.dtype
    x = x.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return w * x.to(dtype)


def rope(x: torch.Tensor, pos: torch.Tensor, theta: float) -> torch.Tensor:
    """x: [B, heads, T, d]; pos: [B, T]."""
    d = x.shape[-1]
    inv = 1.0 / (theta ** (torch.arange(0, d, 2, dtype=torch.float, device=x.device) / d))
    freqs = pos[:, None, :, None].float() * inv
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
    half = torch.cat((-x[..., d // 2:], x[..., : d // 2]), dim=-1)
    return x * cos + half * sin


def swiglu(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    return F.linear(F.silu(F.linear(x, gate)) * F.linear(x, up), down)


def route(logits: torch.Tensor, top_k: int, norm_topk: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Router logits [N, E] → (probs [N, E] fp32, top-k weights [N, k], top-k ids [N, k])."""
    probs = torch.softmax(logits.float(), dim=-1)
    w, ids = torch.topk(probs, top_k, dim=-1)
    if norm_topk:
        w = w / w.sum(-1, keepdim=True)
    return probs, w, ids


class Dispatch(Protocol):
    def __call__(self, layer: int, x: torch.Tensor, probs: torch.Tensor, weights: torch.Tensor,
                 ids: torch.Tensor) -> torch.Tensor: ...


@dataclass(slots=True)
class KVCache:
    """Static per-slot cache: k/v[layer] is [slots, max_len, kv_heads, head_dim]."""
    k: list[torch.Tensor]
    v: list[torch.Tensor]

    @classmethod
    def empty(cls, cfg: ModelConfig, slots: int, max_len: int, dtype, device) -> "KVCache":
        shape = (slots, max_len, cfg.num_kv_heads, cfg.head_dim)
        return cls([torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_layers)],
                   [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_layers)])

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    @property
    def max_len(self) -> int:
        return self.k[0].shape[1]


def attention_mask(pos: torch.Tensor, n_keys: int, window: int | None) -> torch.Tensor:
    """[B, 1, T, n_keys] boolean: a query at position p sees keys 0..p (within the sliding window)."""
    keys = torch.arange(n_keys, device=pos.device)
    ok = keys[None, None, :] <= pos[:, :, None]
    if window:
        ok &= keys[None, None, :] > pos[:, :, None] - window
    return ok[:, None]


class MoEModel:
    def __init__(self, cfg: ModelConfig, weights: dict[str, torch.Tensor]):
        self.cfg, self.w = cfg, weights
        self.moe = set(cfg.moe_layers)

    def attention(self, i: int, x: torch.Tensor, pos: torch.Tensor, valid: torch.Tensor,
                  kv: KVCache | None, slots: torch.Tensor | None) -> torch.Tensor:
        cfg, w, p = self.cfg, self.w, f"model.layers.{i}.self_attn."
        B, T, _ = x.shape
        q, k, v = (F.linear(x, w[p + n + "_proj.weight"], w.get(p + n + "_proj.bias")) for n in "qkv")
        if cfg.spec.qk_norm == "full":
            q, k = rms_norm(q, w[p + "q_norm.weight"], cfg.rms_norm_eps), rms_norm(k, w[p + "k_norm.weight"], cfg.rms_norm_eps)
        if cfg.clip_qkv is not None:
            q, k, v = (t.clamp(-cfg.clip_qkv, cfg.clip_qkv) for t in (q, k, v))
        q = q.view(B, T, cfg.num_heads, cfg.head_dim)
        k = k.view(B, T, cfg.num_kv_heads, cfg.head_dim)
        v = v.view(B, T, cfg.num_kv_heads, cfg.head_dim)
        if cfg.spec.qk_norm == "head":
            q, k = rms_norm(q, w[p + "q_norm.weight"], cfg.rms_norm_eps), rms_norm(k, w[p + "k_norm.weight"], cfg.rms_norm_eps)
        q = rope(q.transpose(1, 2), pos, cfg.rope_theta)
        k = rope(k.transpose(1, 2), pos, cfg.rope_theta).transpose(1, 2)
        if kv is None:  # training / stateless forward: attend within the given tokens
            keys, vals, n = k, v, T
        else:           # write valid tokens into their slot at their position, then read the slot back
            b_idx = slots[:, None].expand(B, T)[valid]
            kv.k[i][b_idx, pos[valid]] = k[valid].to(kv.k[i].dtype)
            kv.v[i][b_idx, pos[valid]] = v[valid].to(kv.v[i].dtype)
            n = int(pos[valid].max()) + 1
            keys, vals = kv.k[i][slots, :n].to(q.dtype), kv.v[i][slots, :n].to(q.dtype)
        mask = attention_mask(pos, n, cfg.sliding_window)
        out = F.scaled_dot_product_attention(q, keys.transpose(1, 2), vals.transpose(1, 2), attn_mask=mask,
                                             enable_gqa=cfg.num_heads != cfg.num_kv_heads)
        return F.linear(out.transpose(1, 2).reshape(B, T, -1), w[p + "o_proj.weight"])

    def mlp(self, i: int, x: torch.Tensor, dispatch: Dispatch) -> torch.Tensor:
        """x: [N, H] valid tokens only, so padding never reaches the router or the traces."""
        cfg, w = self.cfg, self.w
        if i not in self.moe:
            p = f"model.layers.{i}.mlp."
            return swiglu(x, w[p + "gate_proj.weight"], w[p + "up_proj.weight"], w[p + "down_proj.weight"])
        p = f"model.layers.{i}.{cfg.spec.moe_prefix}."
        probs, weights, ids = route(F.linear(x, w[p + "gate.weight"]), cfg.top_k, cfg.norm_topk_prob)
        out = dispatch(i, x, probs, weights.to(x.dtype), ids)
        if cfg.spec.shared_expert:
            s = p + "shared_expert."
            shared = swiglu(x, w[s + "gate_proj.weight"], w[s + "up_proj.weight"], w[s + "down_proj.weight"])
            out = out + torch.sigmoid(F.linear(x, w[p + "shared_expert_gate.weight"])) * shared
        return out

    def forward(self, tokens: torch.Tensor, pos: torch.Tensor, valid: torch.Tensor, dispatch: Dispatch,
                kv: KVCache | None = None, slots: torch.Tensor | None = None,
                last_only: bool = False) -> torch.Tensor:
        """tokens/pos/valid: [B, T]. Returns logits [B, T, V] (or [B, V] at each row's last valid token)."""
        cfg, w = self.cfg, self.w
        x = F.embedding(tokens, w["model.embed_tokens.weight"])
        for i in range(cfg.num_layers):
            p = f"model.layers.{i}."
            x = x + self.attention(i, rms_norm(x, w[p + "input_layernorm.weight"], cfg.rms_norm_eps),
                                   pos, valid, kv, slots)
            h = rms_norm(x[valid], w[p + "post_attention_layernorm.weight"], cfg.rms_norm_eps)
            x = x.index_put((valid,), x[valid] + self.mlp(i, h, dispatch))
        if last_only:
            last = valid.long().cumsum(1).argmax(1)
            x = x[torch.arange(x.shape[0], device=x.device), last]
        x = rms_norm(x, w["model.norm.weight"], cfg.rms_norm_eps)
        return F.linear(x, w["lm_head.weight"]).float()
