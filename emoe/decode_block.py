"""A CPU decode step's attention half of a layer in one C call (cstep.attn_block), where the layer allows it;
and where every layer allows it and runs all its experts on host forms, the whole step's layers in one.

Why: with the products, the attention and the norms already in C, a CPU decode step still paid Python and
ctypes per call: a layer's norm, qkv product, attention, o product, residual add and next norm were six calls
and their glue. This runs them as one: for the common layer (q, k and v stacked in one kernel form, or q and k
with v apart, and o in another, as a GGUF's dense blocks load; pre-norm; biases or none; an output gate
(Qwen3-Next) or none; no clipping; qk norm per head, before the rotary or after it (Hunyuan), over the whole
projection (OLMoE) or none; rotary in halves or pairs (ERNIE)), DeepSeek's latent attention (cstep.mla_block)
and Qwen3-Next / Qwen3.5's linear attention (cstep.delta_block). Every other layer, and a prefill, goes
through MoEModel.attention as before; the common layer's call runs the same routines in the same order, so the
two paths agree bit for bit (tests/test_ckernel.py), the other two within the bounds their tests state.

decode_layers: a GGUF at budget 0 on a CPU (llama.cpp's own case) still paid Python between a layer's three C
calls (attention half, router, experts: ~0.2 ms a layer-step of host work on a 2-core EPYC); kq_layers runs
them for every layer in one, and the traces and counters are kept afterwards from the ids it hands back.
"""
from __future__ import annotations

import ctypes

import torch

from . import ckernel, cstep, quant
from .quant import KTensor


def block_weights(model, i: int) -> tuple | None:
    """Layer i's weights for cstep.attn_block, or None where the layer needs the general path."""
    cfg, w, p = model.cfg, model.w, f"model.layers.{i}."
    a = p + "self_attn."
    spec = cfg.spec
    if i in model.linear:
        return delta_weights(model, i)
    if cfg.mla is not None:
        return mla_weights(model, i)
    if i not in model.qkv or spec.post_norm or cfg.residual_multiplier != 1.0 or cfg.clip_qkv is not None \
            or (cfg.qk_norm and spec.qk_norm not in (None, "head", "full", "head_after_rope", "l2")) \
            or i in cfg.nope_layers:  # (Llama 4's layers without rotary scale their queries: the torch path)
        return None
    three = len(model.qkv[i]) == 3  # else q and k stacked, v apart (quant.stack_qkv)
    wqkv, wv, wo = w[a + ("qkv" if three else "qk") + "_proj.weight"], None if three else w[a + "v_proj.weight"], \
        w[a + "o_proj.weight"]
    norms, flags = model.head_norms(i)
    flags |= 8 * spec.attn_gate  # Qwen3-Next: each head's q, then its output gate
    sinks, scale, window = model.c_attention(i)
    biases = (w.get(a + ("qkv" if three else "qk") + "_proj.bias"), None if three else w.get(a + "v_proj.bias"),
              w.get(a + "o_proj.bias"))
    plain = [w[p + "input_layernorm.weight"], w[p + "post_attention_layernorm.weight"], *(norms or ()),
             *((sinks,) if sinks is not None else ()), *(b for b in biases if b is not None)]
    if type(wqkv) is not KTensor or type(wo) is not KTensor or not (wv is None or type(wv) is KTensor) \
            or not all(t.dtype == torch.float32 and t.device.type == "cpu" and t.is_contiguous() for t in plain):
        return None
    return (wqkv, wo) if wv is None else (wqkv, wo, wv), wv, plain[0], plain[1], norms, flags, sinks, scale, window, biases


def delta_weights(model, i: int) -> tuple | None:
    """Linear-attention layer i's weights for cstep.delta_block: (its forms, for kq_rows, then the routine's
    arguments), or None where the layer needs the general path (projections not on forms; plain weights not
    float32 on the CPU). Qwen3-Next's fused projections are split at load (deltanet.unfuse)."""
    cfg, w, d, p = model.cfg, model.w, model.cfg.delta_net, f"model.layers.{i}."
    a = p + "linear_attn."
    if cfg.spec.post_norm or cfg.residual_multiplier != 1.0:
        return None
    forms = tuple(w[a + n + ".weight"] for n in ("in_proj_qkv", "in_proj_z", "out_proj"))
    plain = (w[a + "in_proj_b.weight"], w[a + "in_proj_a.weight"], w[a + "conv1d.weight"].view(d.conv_dim, -1),
             w[a + "A_log"], w[a + "dt_bias"], w[a + "norm.weight"])
    ln, ln2 = w[p + "input_layernorm.weight"], w[p + "post_attention_layernorm.weight"]
    if any(type(f) is not KTensor for f in forms) or not all(
            t.dtype == torch.float32 and t.device.type == "cpu" and t.is_contiguous() for t in (ln, ln2, *plain)):
        return None
    return forms, plain, ln, ln2, (d.k_heads, d.v_heads, d.k_head_dim, d.v_head_dim, d.conv_kernel)


def mla_weights(model, i: int) -> tuple | None:
    """Layer i's weights for cstep.mla_block (DeepSeek's latent attention): (its forms, for kq_rows, then the
    routine's arguments), or None where a projection is not a form or a plain weight is not float32 on the CPU."""
    cfg, m, w, p = model.cfg, model.cfg.mla, model.w, f"model.layers.{i}."
    a = p + "self_attn."
    if cfg.spec.post_norm or cfg.residual_multiplier != 1.0:
        return None
    forms = (w.get(a + "q_a_proj.weight") if m.q_lora_rank else None,
             w[a + ("q_b_proj" if m.q_lora_rank else "q_proj") + ".weight"], w[a + "kv_a_proj_with_mqa.weight"],
             w[a + "o_proj.weight"])
    plain = (w[a + "q_a_layernorm.weight"] if m.q_lora_rank else None, w[a + "kv_a_layernorm.weight"],
             w[a + "kv_b_proj.weight"])
    biases = tuple(w.get(a + n + ".bias") for n in ("q_a_proj", "kv_a_proj_with_mqa", "o_proj"))
    ln, ln2 = w[p + "input_layernorm.weight"], w[p + "post_attention_layernorm.weight"]
    if any(type(f) is not KTensor for f in forms[1:]) or (m.q_lora_rank and type(forms[0]) is not KTensor) \
            or not all(t.dtype == torch.float32 and t.device.type == "cpu" and t.is_contiguous()
                       for t in (ln, ln2, *plain, *biases) if t is not None):
        return None
    scale = (m.qk_nope_head_dim + m.qk_rope_head_dim) ** -0.5 * m.softmax_mscale
    heads_kv = _file_heads(w, a, cfg.num_heads, m) or _kv_b_forms(plain[2], cfg.num_heads, m)
    return (tuple(f for f in (*forms, *heads_kv) if f is not None), forms, plain, ln, ln2, scale, 2 * m.interleave,
            biases, (m.qk_nope_head_dim, m.v_head_dim, m.kv_lora_rank), heads_kv)


def prepare(model) -> None:
    """Every layer's step-call weights made now (a CPU with the routines): DeepSeek's kv_b forms took ~25 ms a layer
    to make, paid by the first request's decode otherwise."""
    if model.cfg.mla is not None and ckernel._mode_on():
        for i in range(model.cfg.num_layers):
            if i not in model._blocks:
                model._blocks[i] = block_weights(model, i)


def _file_heads(w: dict, a: str, heads: int, m) -> tuple | None:
    """A GGUF's own k_b and v_b per head as forms (forms.file_dense: the weights llama.cpp multiplies, at the file's
    bytes: Q4_K's v_b half an int8 form's), where the import holds them and their shapes are _kv_b_forms'."""
    k, v = w.get(a + "k_b_heads"), w.get(a + "v_b_heads")
    if type(k) is KTensor and type(v) is KTensor and tuple(k.shape) == (heads * m.kv_lora_rank, m.qk_nope_head_dim) \
            and tuple(v.shape) == (heads * m.v_head_dim, m.kv_lora_rank):
        return k, v
    return None


def _kv_b_forms(kv_b: torch.Tensor, heads: int, m) -> tuple:
    """kv_b's key half as [H rank, nope] and value half as [H v, rank], each head's rows in turn, as int8 forms
    (per 32 values, 9 bits a weight on AVX2): a step reads them instead of kv_b's float32, which was half a
    DeepSeek-shaped step's time (the whole kv_b read per layer). (None, None) where a head's rows are not whole
    64-row blocks or its columns not whole groups of 32."""
    nope, vd, r = m.qk_nope_head_dim, m.v_head_dim, m.kv_lora_rank
    if r % 64 or vd % 64 or nope % 32:
        return None, None
    w = kv_b.view(heads, nope + vd, r)
    k_b, v_b = w[:, :nope].transpose(1, 2).reshape(heads * r, nope), w[:, nope:].reshape(heads * vd, r)
    return tuple(quant.int8_form(quant.quantize(t.contiguous(), 8, 32)) for t in (k_b, v_b))


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
    if i in model.linear:
        if rows.slot is None or i not in kv.state or kv.state[i].device.type != "cpu":
            return None
        forms, plain, ln, ln2, dims = ws
        return cstep.delta_block(x.view(B, -1), ln, ln2, model.cfg.rms_norm_eps, forms, plain, kv.conv[i],
                                   kv.state[i], rows.slot, rows.pos, dims)
    if model.cfg.mla is not None:
        _, forms, plain, ln, ln2, scale, flags, biases, dims, heads_kv = ws
        return cstep.mla_block(x.view(B, -1), ln, ln2, model.cfg.rms_norm_eps, forms, plain, kv.k[i], rows.slot,
                                 rows.pos, model.rope_tables(pos, x.dtype), model.cfg.num_heads, dims, scale, flags,
                                 biases, heads_kv)
    (wqkv, wo, *_), wv, ln, ln2, norms, flags, sinks, scale, window, biases = ws
    return cstep.attn_block(x.view(B, -1), ln, ln2, model.cfg.rms_norm_eps, wqkv, wv, wo, kv.k[i], kv.v[i], rows.slot,
                              rows.pos, model.rope_tables(pos, x.dtype), model.cfg.num_heads, window, scale, sinks,
                              norms, flags, biases)


def _mlps(model) -> list | None:
    """Per layer, what kq_layers runs after the attention half: (routes, shared) where routes says the layer is a
    MoE layer that ckernel.route takes (softmax or sigmoid, float32 CPU weights) and shared is its
    shared expert's (gate, up, down) forms and gate vector (Qwen2-MoE's; None: weight 1), or a dense layer's MLP
    (routes False); None where some layer has anything else (Granite's shared MLP, weights not on forms)."""
    cfg, w, spec = model.cfg, model.w, model.cfg.spec
    if spec.scoring not in ("softmax", "sigmoid") or spec.shared not in (None, "plain", "gated") or spec.weight_input:
        return None
    f32 = (lambda t: t is None or (type(t) is torch.Tensor and t.dtype == torch.float32 and t.device.type == "cpu"
                                   and t.is_contiguous()))
    out = []
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}.{spec.moe_prefix}."
        routes = i in model.moe
        if routes and not all(map(f32, (w[p + spec.router + ".weight"], w.get(p + spec.router + ".bias"),
                                        w.get(p + spec.bias_key)))):
            return None
        mlp = p + spec.shared_key if routes else f"model.layers.{i}.mlp."
        forms = tuple(w.get(mlp + n + "_proj.weight") for n in ("gate", "up", "down")) if not routes or spec.shared else None
        gate = w[p + "shared_expert_gate.weight"].view(-1) if routes and spec.shared == "gated" else None
        if forms is not None and not (all(type(t) is KTensor for t in forms) and f32(gate)):
            return None
        out.append((routes, forms and (forms, gate)))
    return out


def _fields(model, blocks: list, tables: dict, kv) -> tuple[torch.Tensor, torch.Tensor]:
    """kq_layers' per-layer fields and attention scales, made once per KV cache and tables: they hold their
    addresses, so the same objects are held here too (compared by identity: none can be freed and another
    take its place at the same address)."""
    held = (*kv.k, *kv.v, *kv.conv.values(), *kv.state.values(), *tables.values())
    old = model._step.get("held")
    if old is None or len(old) != len(held) or any(a is not b for a, b in zip(old, held)):
        cfg, w, rows, fl, arrays = model.cfg, model.w, [], [], []
        ptr = (lambda t: t.data_ptr() if t is not None else 0)
        desc = (lambda f: f.cdesc[0] if f is not None else 0)
        for i, block in enumerate(blocks):
            if i in model.linear:  # kq_delta_block's: its projections in wqkv's, wv's and wo's fields, state in kc's and vc's
                (wqkv, wz, wo), (wb, wa, cw, alog, dtb, nw), ln, ln2, dims = block
                attn = [wqkv.cdesc[0], wz.cdesc[0], wo.cdesc[0], kv.conv[i].data_ptr(), kv.state[i].data_ptr(), 0, 0, 0, 0]
                bias3, flags, scale = (0, 0, 0), 0, 0.0
                latent = [2, *map(ptr, (wb, wa, cw, alog, dtb, nw)), *dims]
            elif cfg.mla is not None:  # kq_mla_block's: q (or q_b), v_b and o in wqkv's, wv's and wo's fields, the rest after 28
                _, (wqa, wq, wkva, wo), (qan, kvan, wkvb), ln, ln2, scale, flags, (bqa, bkva, bo), dims, (kb, vb) = block
                attn = [wq.cdesc[0], desc(vb), wo.cdesc[0], kv.k[i].data_ptr(), 0, 0, 0, 0, 0]
                bias3 = (0, 0, ptr(bo))
                latent = [1, desc(wqa), ptr(qan), wkva.cdesc[0], ptr(kvan), ptr(wkvb), ptr(bqa), ptr(bkva), *dims, desc(kb)]
                flags |= cstep.half_flag(kv.k[i])
            else:
                (wqkv, wo, *_), wv, ln, ln2, norms, flags, sinks, scale, window, biases = block
                attn = [wqkv.cdesc[0], desc(wv), wo.cdesc[0], kv.k[i].data_ptr(), kv.v[i].data_ptr(), window or 0,
                        ptr(sinks), *(map(ptr, norms or (None, None)))]
                bias3, latent = tuple(map(ptr, biases)), [0] * 12
                flags |= cstep.half_flag(kv.k[i])
            p = f"model.layers.{i}.{cfg.spec.moe_prefix}."
            routes, shared = model._step["mlps"][i]
            (descs, used, n, _), _, act = tables[i] if routes else ((None, None, 0, 0), 0, None)
            gb, ub, db, limit, alpha = act or (None, None, None, 0.0, 0.0)  # gpt-oss's experts: kq_moe_act's
            if shared is not None:
                arrays.append(ckernel._descs([shared[0]]))  # (held with the fields: they hold its address)
            rows.append([ln.data_ptr(), ln2.data_ptr(), *attn,
                         *(map(ptr, (w[p + cfg.spec.router + ".weight"], w.get(p + cfg.spec.router + ".bias"),
                                     w.get(p + cfg.spec.bias_key))) if routes else (0, 0, 0)),
                         ctypes.addressof(descs) if routes else 0, n, ctypes.addressof(used) if routes else 0,
                         kv.k[i].shape[1], flags, *bias3, ptr(gb), ptr(ub), ptr(db),
                         ctypes.addressof(arrays[-1]) if shared is not None else 0,
                         ptr(shared[1]) if shared is not None else 0, int(routes), *latent])
            fl.append([scale, limit, alpha])
        model._step.update(held=held, arrays=arrays, fields=torch.tensor(rows, dtype=torch.int64), fl=torch.tensor(fl))
    return model._step["fields"], model._step["fl"]


def decode_layers(model, x: torch.Tensor, pos: torch.Tensor, rows, kv, dispatch) -> int:
    """For a decode step on a CPU where every layer takes attn_block and its MLP is one _mlps describes (routed
    experts that all run on their host forms, a shared expert beside them, or a dense layer's, on forms): every
    layer in one C call (cstep.layers), x [B, 1, D] updated in place, the traces and counters kept as the
    per-layer calls keep them. Returns how many layers ran: all, or 0 (nothing run) where some layer needs
    those, or the layer after which the per-layer path goes on.
    Where the fast tier holds only some experts as forms (formstore, dispatch.live_tables), the call stops at a layer
    routed to one it does not hold: that layer's MLP runs as the per-layer path runs it (reading the expert), and
    the next call goes on from the layer after.
    """
    cfg, B = model.cfg, x.shape[0]
    step_tables = getattr(dispatch, "step_tables", None)
    if step_tables is None or B > ckernel.ROUTE_ROWS or not x.is_contiguous():
        return 0
    if "mlps" not in model._step:
        model._step["mlps"] = _mlps(model)
    mlps = model._step["mlps"]
    if mlps is None:
        return 0
    blocks = []
    for i in range(cfg.num_layers):
        if i not in model._blocks:
            model._blocks[i] = block_weights(model, i)
        ws = model._blocks[i]
        if ws is None or rows.n_keys > kv.k[i].shape[1] or not model._c_decode(x, kv.k[i]) or not ckernel.kq_rows(ws[0], B) \
                or (mlps[i][1] is not None and not ckernel.kq_rows(mlps[i][1][0], B)):
            return 0
        blocks.append(ws)
    flat = x.view(B, -1)
    moe = [i for i, (routes, _) in enumerate(mlps) if routes]
    tables, held = step_tables(moe, flat), None
    if tables is None:
        live = getattr(dispatch, "live_tables", None)
        tables, held = (live and live(moe, flat)) or (None, None)
        if tables is None:
            return 0
    tables = dict(zip(moe, tables))
    fields, fl = _fields(model, blocks, tables, kv)
    full = next((i for i in range(cfg.num_layers) if i not in model.linear), 0)  # (a linear layer caches no heads)
    args = (cfg.rms_norm_eps, rows.slot, rows.pos, model.rope_tables(pos, x.dtype), cfg.num_heads, kv.k[full].shape[-2],
            kv.k[full].shape[-1], cfg.num_experts, cfg.top_k, cfg.spec.scoring == "sigmoid", cfg.norm_topk_prob,
            cfg.routed_scaling_factor, (cfg.n_group, cfg.topk_group))
    if held is None:
        _, ids, ran, _, _ = cstep.layers(fields, fl, flat, *args)
        for i in moe:
            dispatch.hosted(i, ids[i], ran[i], tables[i])
        return cfg.num_layers
    hn, l0 = torch.empty_like(flat), 0
    while True:
        w, ids, _, probs, stop = cstep.layers(fields[l0:], fl[l0:], flat, *args, held[l0:], hn)
        for i in moe:
            if l0 <= i < l0 + stop:
                dispatch.held_ran(i, ids[i - l0])
        if l0 + stop == cfg.num_layers:
            return cfg.num_layers
        s, l0 = stop, l0 + stop
        flat += model.mlp(l0, hn, dispatch, (probs[s], w[s], ids[s]))
        l0 += 1
        if not dispatch.sync_live():  # a form the routines do not take was read: the per-layer path from here
            return l0
