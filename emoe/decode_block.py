"""A CPU decode step's attention half of a layer in one C call (ckernel.attn_block), where the layer allows it.

Why: with the products, the attention and the norms already in C, a CPU decode step still paid Python and
ctypes per call: a layer's norm, qkv product, attention, o product, residual add and next norm were six calls
and their glue. This runs them as one. It applies to the common layer only: q, k and v stacked in one kernel
form (or q and k, v apart) and o in another (a GGUF's dense blocks), pre-norm, no biases, no output gate or
clipping, qk norm per head or none. Every other layer, and a prefill, goes through MoEModel.attention as
before, with the same routines in the same order, so the two paths agree bit for bit (tests/test_ckernel.py).
"""
from __future__ import annotations

import torch

from . import ckernel
from .quant import KTensor


def block_weights(model, i: int) -> tuple | None:
    """Layer i's weights for ckernel.attn_block, or None where the layer needs the general path."""
    cfg, w, p = model.cfg, model.w, f"model.layers.{i}."
    a = p + "self_attn."
    spec = cfg.spec
    if cfg.mla is not None or i in model.linear or i not in model.qkv or spec.post_norm or cfg.residual_multiplier != 1.0 \
            or spec.attn_gate or cfg.clip_qkv is not None or spec.rope_interleave \
            or (cfg.qk_norm and spec.qk_norm not in (None, "head")) \
            or any(a + n + "_proj.bias" in w for n in ("qkv", "qk", "v", "o")):
        return None
    three = len(model.qkv[i]) == 3  # else q and k stacked, v apart (quant.stack_qkv)
    wqkv, wv, wo = w[a + ("qkv" if three else "qk") + "_proj.weight"], None if three else w[a + "v_proj.weight"], \
        w[a + "o_proj.weight"]
    norms = (w[a + "q_norm.weight"], w[a + "k_norm.weight"]) if cfg.qk_norm and spec.qk_norm == "head" else None
    sinks, scale, window = model.c_attention(i)
    plain = [w[p + "input_layernorm.weight"], w[p + "post_attention_layernorm.weight"], *(norms or ()),
             *((sinks,) if sinks is not None else ())]
    if type(wqkv) is not KTensor or type(wo) is not KTensor or not (wv is None or type(wv) is KTensor) \
            or not all(t.dtype == torch.float32 and t.device.type == "cpu" and t.is_contiguous() for t in plain):
        return None
    return (wqkv, wo) if wv is None else (wqkv, wo, wv), wv, plain[0], plain[1], norms, sinks, scale, window


def attn_block(model, i: int, x: torch.Tensor, pos: torch.Tensor, rows, kv) -> torch.Tensor | None:
    """For a decode step (one token a row, every row valid) on a CPU: layer i's attention added to x [B, 1, D]
    in place, returning the MLP's input, rms_norm(x) [B, D]; None where the general path must run."""
    if i not in model._blocks:
        model._blocks[i] = block_weights(model, i)
    ws = model._blocks[i]
    B = x.shape[0]
    if ws is None or rows.n_keys > kv.k[i].shape[1] or not model._c_decode(x, kv.k[i]) \
            or not x.is_contiguous() or not ckernel.kq_rows(ws[0], B):
        return None
    (wqkv, wo, *_), wv, ln, ln2, norms, sinks, scale, window = ws
    return ckernel.attn_block(x.view(B, -1), ln, ln2, model.cfg.rms_norm_eps, wqkv, wv, wo, kv.k[i], kv.v[i], rows.slot,
                              rows.pos, model.rope_tables(pos, x.dtype), model.cfg.num_heads, window, scale, sinks,
                              norms)
