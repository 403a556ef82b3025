"""A decode step's C calls (ckernel.c's kq_attend, kq_attn_block, kq_mla_block, kq_delta_block and kq_layers): the
step's attention, a layer's attention half (standard, DeepSeek's latent or Qwen3-Next's linear attention) or every
layer at once, on float32 CPU tensors and kernel forms. decode_block decides where they apply and gathers their
weights; the library, its modes (ckernel.KQ) and the forms' descriptors are ckernel's.
"""
from __future__ import annotations

import ctypes

import torch

from . import ckernel as ck


def half_flag(cache: torch.Tensor) -> int:
    """kq_attend's flag for a bf16 KV cache (written rounded as torch rounds, read back exactly)."""
    return 16 if cache.dtype == torch.bfloat16 else 0

def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor, slot: torch.Tensor,
           pos: torch.Tensor, tables: tuple[torch.Tensor, torch.Tensor] | None, window: int | None, scale: float,
           sinks: torch.Tensor | None, norms: tuple[torch.Tensor, torch.Tensor, float] | None = None,
           flags: int = 0) -> torch.Tensor | None:
    """A decode step's attention in one C call (float32, CPU): q [B, H, d], k and v [B, Hkv, d] (one new token
    per row; each head of q and k normalised here by norms' (q weights [d], k weights [d], eps) when given, then
    rotated by tables' cos/sin [B, 1, 1, rd] when given), written into the caches kc/vc [slots,
    L, Hkv, d] at (slot, pos), then each row attends over its slot up to pos (within window), sinks [H] joining
    the softmax. flags: 2, each head's dims reordered from rotary pairs to halves first (model.rotate's, for
    ERNIE); 4, the norms after the rotary (Hunyuan). The caches may be float32 or bf16 (half_flag: said to the routine
    here). Returns out [B, H, d]; None where the routine is not built (nothing written then)."""
    lib = ck.library()
    if lib is None:
        return None
    B, H, d = q.shape
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()  # q and k rotated in place: a step's own tensors
    slot, pos = slot.long().contiguous(), pos.long().contiguous()
    cs, sn = (t.contiguous() for t in tables) if tables is not None else (None, None)
    rd = cs.shape[-1] if cs is not None else 0
    out = torch.empty(B, H, d)
    flags |= half_flag(kc)
    lib.kq_attend(q.data_ptr(), k.data_ptr(), v.data_ptr(), kc.data_ptr(), vc.data_ptr(), slot.data_ptr(),
                  pos.data_ptr(), cs.data_ptr() if cs is not None else None, sn.data_ptr() if sn is not None else None,
                  rd, B, H, k.shape[1], d, kc.shape[1], window or 0, scale,
                  sinks.contiguous().data_ptr() if sinks is not None else None,
                  *((norms[0].contiguous().data_ptr(), norms[1].contiguous().data_ptr(), norms[2]) if norms else (None, None, 0.0)),
                  out.data_ptr(), torch.get_num_threads(), flags)
    return out


def attn_block(x: torch.Tensor, ln: torch.Tensor, ln2: torch.Tensor, eps: float, wqkv, wv, wo, kc: torch.Tensor,
               vc: torch.Tensor, slot: torch.Tensor, pos: torch.Tensor, tables, heads: int, window: int | None,
               scale: float, sinks: torch.Tensor | None, norms: tuple | None, flags: int = 0,
               biases: tuple = (None, None, None)) -> torch.Tensor:
    """A decode step's attention half of a layer in one C call, for x [B, D] float32 on a CPU with q/k/v stacked
    in one form (wqkv; or q/k, with v in wv) and o in another (kq_rows of them all for B rows): rms_norm, the
    products, attend's work (norms: per-head q and k weights; with flags & 1, whole-projection ones applied
    before it; flags 2 and 4 as attend's), the o product added to x in place, and the next rms_norm, returned. biases: the qkv (or qk), v and o
    projections' (float32, contiguous) or None."""
    B, D = x.shape
    d, Hkv = kc.shape[-1], kc.shape[-2]
    cs, sn = (t.contiguous() for t in tables) if tables is not None else (None, None)
    slot, pos = slot.long().contiguous(), pos.long().contiguous()
    hn = torch.empty_like(x)
    ck._lib.kq_attn_block(x.data_ptr(), hn.data_ptr(), B, D, ln.data_ptr(), ln2.data_ptr(), eps, wqkv.cdesc[0],
                       wv.cdesc[0] if wv is not None else None, wo.cdesc[0], kc.data_ptr(), vc.data_ptr(), slot.data_ptr(), pos.data_ptr(),
                       cs.data_ptr() if cs is not None else None, sn.data_ptr() if sn is not None else None,
                       cs.shape[-1] if cs is not None else 0, heads, Hkv, d, kc.shape[1], window or 0, scale,
                       sinks.data_ptr() if sinks is not None else None, *(
                           (norms[0].data_ptr(), norms[1].data_ptr()) if norms else (None, None)),
                       flags | half_flag(kc), *(t.data_ptr() if t is not None else None for t in biases), torch.get_num_threads(),
                       ck.mode() == "bf16")
    return hn


def mla_block(x: torch.Tensor, ln: torch.Tensor, ln2: torch.Tensor, eps: float, forms: tuple, plain: tuple,
              kc: torch.Tensor, slot: torch.Tensor, pos: torch.Tensor, tables, heads: int, dims: tuple, scale: float,
              flags: int, biases: tuple, heads_kv: tuple = (None, None)) -> torch.Tensor:
    """attn_block for DeepSeek's latent attention (kq_mla_block): forms (q_a or None, q (q_b or q), kv_a, o),
    plain (q_a norm or None, kv_a norm, kv_b [H, nope + v, rank] float32), dims (nope, v, rank), biases (q_a, kv_a,
    o) or None, heads_kv kv_b's key and value halves as forms stacked per head ([H rank, nope], [H v, rank]) or
    None (kv_b's floats then); kc [slots, L, 1, rank + rope] gets the step's latents. x [B, D] gets the attention
    added in place; returns the next rms_norm."""
    B, D = x.shape
    cs, sn = (t.contiguous() for t in tables)
    slot, pos = slot.long().contiguous(), pos.long().contiguous()
    hn, ptr = torch.empty_like(x), (lambda t: t.data_ptr() if t is not None else None)
    desc = (lambda f: ck._desc(f)[0] if f is not None else None)
    wqa, wq, wkva, wo = forms
    ck._lib.kq_mla_block(x.data_ptr(), hn.data_ptr(), B, D, ln.data_ptr(), ln2.data_ptr(), eps,
                      desc(wqa), ptr(plain[0]), desc(wq), desc(wkva), ptr(plain[1]), ptr(plain[2]), desc(wo), kc.data_ptr(), slot.data_ptr(), pos.data_ptr(), cs.data_ptr(),
                      sn.data_ptr(), heads, dims[0], cs.shape[-1], dims[1], dims[2], kc.shape[1], scale, flags | half_flag(kc),
                      *map(ptr, biases), *map(desc, heads_kv),
                      torch.get_num_threads(), ck.mode() == "bf16")
    return hn


def delta_block(x: torch.Tensor, ln: torch.Tensor, ln2: torch.Tensor, eps: float, forms: tuple, plain: tuple,
                conv: torch.Tensor, state: torch.Tensor, slot: torch.Tensor, pos: torch.Tensor, dims: tuple) -> torch.Tensor:
    """attn_block for a linear-attention layer (kq_delta_block): forms (in_proj_qkv, in_proj_z, out_proj), plain
    (in_proj_b, in_proj_a, the conv weights [C, K], A_log, dt_bias, the norm weight), float32; conv [slots, C, K - 1]
    and state [slots, hv, dk, dv] updated in place; dims (hk, hv, dk, dv, K). x [B, D] gets the layer's output
    added in place; returns the next rms_norm."""
    B, D = x.shape
    slot, pos = slot.long().contiguous(), pos.long().contiguous()
    hn = torch.empty_like(x)
    wqkv, wz, wo = (ck._desc(f)[0] for f in forms)
    ck._lib.kq_delta_block(x.data_ptr(), hn.data_ptr(), B, D, ln.data_ptr(), ln2.data_ptr(), eps, wqkv, wz,
                        *(t.data_ptr() for t in plain[:3]), conv.data_ptr(), state.data_ptr(), slot.data_ptr(),
                        pos.data_ptr(), *(t.data_ptr() for t in plain[3:]), wo, *dims, torch.get_num_threads(),
                        ck.mode() == "bf16")
    return hn


def layers(fields: torch.Tensor, fl: torch.Tensor, x: torch.Tensor, eps: float, slot: torch.Tensor,
           pos: torch.Tensor, tables, heads: int, kv_heads: int, head_dim: int, experts: int, top_k: int,
           sigmoid: bool, norm: bool, rscale: float, groups: tuple[int, int] = (1, 1), held: torch.Tensor | None = None,
           hn: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, list[int], torch.Tensor, int]:
    """A decode step's layers in one C call (kq_layers: each layer's attn_block or mla_block, route (groups:
    n_group, topk_group) and table of host experts, fields [layers, 40] int64 and fl [layers, 3] float32 as it reads them), x [B, D] float32 updated in place. Returns
    each layer's routing weights and ids [layers, B, k], how many of its experts ran, the routing probabilities
    [layers, B, E] and the layer it stopped at (layers: none). held [layers, E] bool: which experts the tables hold;
    at a layer routed to another, the call stops after routing, with the layer's MLP input in hn [B, D]."""
    nl, (B, D) = fields.shape[0], x.shape
    if held is not None and not (held.dtype == torch.bool and held.is_contiguous() and hn is not None
                                 and hn.shape == x.shape and hn.dtype == torch.float32 and hn.is_contiguous()):
        raise ValueError("held: a contiguous bool tensor [layers, experts], with hn a float32 [B, D] buffer")
    cs, sn = (t.contiguous() for t in tables) if tables is not None else (None, None)
    slot, pos = slot.long().contiguous(), pos.long().contiguous()
    probs, w = torch.empty(nl, B, experts), torch.empty(nl, B, top_k)
    ids, ran = torch.empty(nl, B, top_k, dtype=torch.int64), (ctypes.c_int * nl)()
    stop = ck._lib.kq_layers(fields.data_ptr(), fl.data_ptr(), nl, x.data_ptr(), B, D, eps, slot.data_ptr(),
                             pos.data_ptr(), cs.data_ptr() if cs is not None else None,
                             sn.data_ptr() if sn is not None else None, cs.shape[-1] if cs is not None else 0, heads,
                             kv_heads, head_dim, experts, top_k, sigmoid, norm, rscale, *groups, probs.data_ptr(),
                             w.data_ptr(), ids.data_ptr(), ran, torch.get_num_threads(), ck.mode() == "bf16",
                             held.data_ptr() if held is not None else None, hn.data_ptr() if hn is not None else None)
    return w, ids, list(ran), probs, stop
