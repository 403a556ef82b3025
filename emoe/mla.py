"""DeepSeek's multi-head latent attention (DeepSeek-V2/V3, Kimi-K2, GLM-4.x lite), as MoEModel.attention runs it
for a model whose config has `mla`: the cache holds each token's latent and its roped shared key, not per-head
keys and values."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import model as M  # (model imports this module: M is read at call time)
from .quant import linear


def decompress(T: int, n: int, m) -> bool:
    """Whether T queries over n cached latents cost less with every latent decompressed to per-head keys and values
    (n (nope + v) rank products a head, then T n (nope + rope + v) for the attention) than absorbed into the latent
    space (T (nope + v) rank, then T n (2 rank + rope)): a prefill chunk's case, where the absorbed scores and
    contexts, 3.4x wider on DeepSeek's dims, made a 254-token prompt 1.4x llama.cpp's time."""
    r, nope, v = m.kv_lora_rank, m.qk_nope_head_dim, m.v_head_dim
    return T * n * (2 * r - nope - v) > (n - T) * (nope + v) * r


def attention(model, i: int, x: torch.Tensor, pos: torch.Tensor, rows, kv) -> torch.Tensor:
    """Absorbed MLA: queries move into the latent space (through kv_b_proj's key half), attend over the
    cached latents directly, and the value half maps the result back, so no per-head k/v is built."""
    cfg, m, w, p = model.cfg, model.cfg.mla, model.w, f"model.layers.{i}.self_attn."
    B, T, _ = x.shape
    H, nope, r = cfg.num_heads, m.qk_nope_head_dim, m.kv_lora_rank
    if m.q_lora_rank:
        qa = linear(x, w[p + "q_a_proj.weight"], w.get(p + "q_a_proj.bias"))
        q = linear(M.rms_norm(qa, w[p + "q_a_layernorm.weight"], cfg.rms_norm_eps), w[p + "q_b_proj.weight"])
    else:
        q = linear(x, w[p + "q_proj.weight"])
    q_nope, q_rot = q.view(B, T, H, nope + m.qk_rope_head_dim).transpose(1, 2).split([nope, m.qk_rope_head_dim], -1)
    latent, k_rot = linear(x, w[p + "kv_a_proj_with_mqa.weight"], w.get(p + "kv_a_proj_with_mqa.bias")
                             ).split([r, m.qk_rope_head_dim], -1)
    latent = M.rms_norm(latent, w[p + "kv_a_layernorm.weight"], cfg.rms_norm_eps)
    keys = torch.cat((latent, model.rotate(k_rot[:, None], pos)[:, 0]), -1)[:, :, None]  # [B, T, 1, r + rope]
    n = T
    if kv is not None:
        keys = model.cached(i, kv.k, keys, rows)
        n = keys.shape[1]
    w_kv = w[p + "kv_b_proj.weight"].view(H, nope + m.v_head_dim, r)
    scale = (nope + m.qk_rope_head_dim) ** -0.5 * m.softmax_mscale
    if decompress(T, n, m):
        kv = F.linear(keys[:, :, 0, :r], w[p + "kv_b_proj.weight"]).view(B, n, H, nope + m.v_head_dim).transpose(1, 2)
        k = torch.cat((kv[..., :nope], keys[:, None, :, 0, r:].expand(B, H, n, m.qk_rope_head_dim)), -1)
        out = F.scaled_dot_product_attention(torch.cat((q_nope, model.rotate(q_rot, pos)), -1), k, kv[..., nope:],
                                             attn_mask=model.mask(pos, n, None), scale=scale)
        return linear(out.transpose(1, 2).reshape(B, T, H * m.v_head_dim), w[p + "o_proj.weight"], w.get(p + "o_proj.bias"))
    query = torch.cat((torch.einsum("bhtd,hdr->bhtr", q_nope, w_kv[:, :nope]), model.rotate(q_rot, pos)), -1)
    keys = keys.transpose(1, 2)  # [B, 1, n, r + rope]: one latent "head" shared by every query head
    out = F.scaled_dot_product_attention(query, keys, keys[..., :r], attn_mask=model.mask(pos, n, None),
                                         scale=scale, enable_gqa=True)
    out = torch.einsum("bhtr,hvr->bthv", out, w_kv[:, nope:]).reshape(B, T, H * m.v_head_dim)
    return linear(out, w[p + "o_proj.weight"], w.get(p + "o_proj.bias"))
