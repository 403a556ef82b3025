"""The MoE decoder forward for Mixtral, Qwen2/3-MoE, Qwen3-Next, OLMoE, DeepSeek-V2/V3, GLM-4.5, …, top to bottom.

Dense weights live in a flat dict under their Hugging Face names. Routed experts are *not* here: each
MoE layer computes router probabilities and hands them to a `Dispatch` (see engine.py) that owns
residency, miss handling and traces. The pure functions below are shared with training (train.py).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple, Protocol

import torch
import torch.nn.functional as F

from . import ckernel, cstep, mla
from .config import ModelConfig
from .decode_block import attn_block, decode_layers
from .deltanet import delta_net_rows
from .quant import linear, stack_qkv
from .rope import apply_rope, rope_frequencies, rope_tables


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    dtype = x.dtype
    if dtype == torch.float32 == w.dtype:  # the same ops in one call (fewer dispatches: a CPU pays per op)
        y = ckernel.rms_norm(x, w, eps) if x.device.type == "cpu" else None
        return F.rms_norm(x, (x.shape[-1],), w, eps) if y is None else y
    x = x.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return w * x.to(dtype)


def swiglu(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    return linear(F.silu(linear(x, gate)) * linear(x, up), down)


def route(logits: torch.Tensor, top_k: int, norm_topk: bool, *, scoring: str = "softmax", n_group: int = 1,
          topk_group: int = 1, bias: torch.Tensor | None = None,
          scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Router logits [N, E] → (scores [N, E] fp32, top-k weights [N, k], top-k ids [N, k]).

    DeepSeek routing: sigmoid scores plus a load-balancing bias choose the experts (the bias never weighs
    them), tokens keep only their topk_group best groups (group score: top-2 sum for sigmoid, max for
    softmax), and the routed output is scaled. The scores returned are the router's own (no bias), which is
    what a miss policy ranks resident experts by."""
    probs = torch.sigmoid(logits.float()) if scoring == "sigmoid" else torch.softmax(logits.float(), dim=-1)
    choice = probs if bias is None else probs + bias.float()
    if n_group > 1:
        grouped = choice.view(-1, n_group, choice.shape[-1] // n_group)
        gscore = grouped.topk(2, dim=-1).values.sum(-1) if scoring == "sigmoid" else grouped.amax(-1)
        keep = torch.zeros_like(gscore, dtype=torch.bool).scatter_(1, gscore.topk(topk_group, dim=-1).indices, True)
        choice = choice.masked_fill(~keep.repeat_interleave(grouped.shape[-1], dim=1), float("-inf"))
    ids = torch.topk(choice, top_k, dim=-1).indices
    w = probs.gather(1, ids)
    if norm_topk:
        w = w / (w.sum(-1, keepdim=True) + 1e-20)
    return probs, w * scale if scale != 1.0 else w, ids


class Dispatch(Protocol):
    def __call__(self, layer: int, x: torch.Tensor, probs: torch.Tensor, weights: torch.Tensor,
                 ids: torch.Tensor) -> torch.Tensor: ...


@dataclass(slots=True)
class KVCache:
    """Static per-slot cache: k/v[layer] is [slots, max_len, kv_heads, head_dim]. Under MLA, k[layer] is
    [slots, max_len, 1, kv_lora_rank + qk_rope_head_dim] (the latent and the roped shared key) and v is empty.
    A linear-attention layer caches no tokens (its k/v are empty) but a fixed state per slot: conv[layer]
    [slots, conv_dim, kernel − 1] and state[layer] [slots, v_heads, k_head_dim, v_head_dim], float32. k and v are
    in kv_dtype (default: the compute dtype; bf16 on a CPU halves a float32 cache, and the C attention reads it,
    MLA's latents too)."""
    k: list[torch.Tensor]
    v: list[torch.Tensor]
    conv: dict[int, torch.Tensor] = field(default_factory=dict)
    state: dict[int, torch.Tensor] = field(default_factory=dict)

    @classmethod
    def empty(cls, cfg: ModelConfig, slots: int, max_len: int, dtype, device, kv_dtype=None) -> "KVCache":
        def zeros(shape):
            return [torch.zeros(shape if i not in cfg.linear_layers else (slots, max_len, 0, shape[-1]),
                                dtype=kv_dtype or dtype, device=device) for i in range(cfg.num_layers)]
        if cfg.mla is not None:
            return cls(zeros((slots, max_len, 1, cfg.mla.kv_lora_rank + cfg.mla.qk_rope_head_dim)), [])
        shape = (slots, max_len, cfg.num_kv_heads, cfg.head_dim)
        d = cfg.delta_net
        conv = {i: torch.zeros(slots, d.conv_dim, d.conv_kernel - 1, device=device) for i in cfg.linear_layers}
        state = {i: torch.zeros(slots, d.v_heads, d.k_head_dim, d.v_head_dim, device=device) for i in cfg.linear_layers}
        return cls(zeros(shape), zeros(shape), conv, state)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in [*self.k, *self.v, *self.conv.values(), *self.state.values()])

    @property
    def max_len(self) -> int:
        return self.k[0].shape[1]


class Rows(NamedTuple):
    """Where a step's valid tokens sit, found once per forward: every boolean-mask index is a host sync, and
    a GPU decode step is bound by syncs. flat indexes the flattened [B*T] tokens; slot and pos are each valid
    token's KV-cache slot and position; slots [B] and n_keys (max position + 1) say what to read back."""
    flat: torch.Tensor
    slot: torch.Tensor | None
    pos: torch.Tensor
    slots: torch.Tensor | None
    n_keys: int

    @classmethod
    def of(cls, pos: torch.Tensor, valid: torch.Tensor, slots: torch.Tensor | None) -> "Rows":
        T = pos.shape[1]
        flat = valid.flatten().nonzero().squeeze(1)
        p = pos.flatten()[flat]
        if slots is None:
            return cls(flat, None, p, None, T)
        return cls(flat, slots[flat // T], p, slots, int(p.max()) + 1 if len(p) else 0)


def attention_mask(pos: torch.Tensor, n_keys: int, window: int | None) -> torch.Tensor:
    """[B, 1, T, n_keys] boolean: a query at position p sees keys 0..p (within the sliding window)."""
    keys = torch.arange(n_keys, device=pos.device)
    ok = keys[None, None, :] <= pos[:, :, None]
    if window:
        ok &= keys[None, None, :] > pos[:, :, None] - window
    return ok[:, None]


def sink_attention(q, k, v, mask, sinks):
    """gpt-oss attention: each head's learned sink logit joins the softmax as a key with no value, so a
    head can attend to nothing. q [B, H, T, d]; k, v [B, Hkv, n, d]; mask [B, 1, T, n]; sinks [H]."""
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    scores = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    scores = scores.masked_fill(~mask, float("-inf"))
    sink = sinks.to(scores.dtype).view(1, -1, 1, 1).expand(*scores.shape[:-1], 1)
    probs = torch.softmax(torch.cat((scores, sink), dim=-1).float(), dim=-1)[..., :-1].to(v.dtype)
    return probs @ v


def clamped_swiglu(limit: float, alpha: float, gate_up_bias: torch.Tensor, down_bias: torch.Tensor):
    """gpt-oss experts: biased projections, gate and up clamped to ±limit, glu = gate·σ(α·gate), out =
    down((up + 1)·glu). Biases are per expert ([E, 2I] with gate/up interleaved, [E, H]) and stay in the
    dense weights; weights may be full tensors or low-bit copies (quant.linear)."""
    copies = {}  # biases stay with the dense weights; a host run gets a host copy, made once, not a sync per call

    def biases(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        key = (x.device, x.dtype)
        if key not in copies:
            copies[key] = (gate_up_bias.to(*key), down_bias.to(*key))
        return copies[key]

    def ffn(e: int, x: torch.Tensor, w) -> torch.Tensor:
        gate, up, down = w
        gu_b, d_b = biases(x)
        g = (linear(x, gate) + gu_b[e, 0::2]).clamp(max=limit)
        u = (linear(x, up) + gu_b[e, 1::2]).clamp(-limit, limit)
        return linear((u + 1) * g * torch.sigmoid(alpha * g), down) + d_b[e]

    def kq_act() -> tuple:  # the same for ckernel's kq_moe on forms: biases as float32 CPU copies, gate and up apart
        if "kq" not in copies:
            gu = gate_up_bias.float().cpu()
            copies["kq"] = (gu[:, 0::2].contiguous(), gu[:, 1::2].contiguous(), down_bias.float().cpu().contiguous(),
                            float("inf") if limit is None else float(limit), float(alpha))
        return copies["kq"]
    ffn.kq_act = kq_act
    return ffn


OFFSET_NORMS = ("input_layernorm.weight", "post_attention_layernorm.weight", "self_attn.q_norm.weight",
                "self_attn.k_norm.weight")


class MoEModel:
    def __init__(self, cfg: ModelConfig, weights: dict[str, torch.Tensor]):
        if cfg.spec.norm_offset:  # stored as w − 1: hold the scale itself, so rms_norm stays one function
            weights = {k: v + 1 if k.endswith(OFFSET_NORMS) or k == "model.norm.weight" else v for k, v in weights.items()}
        self.cfg, self.linear = cfg, set(cfg.linear_layers)
        # q, k and v as one qkv_proj (or q and k as one qk_proj) where their kinds allow; self.qkv[i]: the widths
        attn = [] if cfg.mla is not None else [i for i in range(cfg.num_layers) if i not in self.linear]
        self.w, self.qkv = stack_qkv(weights, attn)
        self.moe = set(cfg.moe_layers)
        self._expert_fns: dict[int, object] = {}
        self.inv_freq, self.rope_scale = rope_frequencies(cfg.rotary_dim or cfg.head_dim, cfg.rope_theta, cfg.yarn,
                                                           cfg.rope_factors)
        self._memo: dict = {}  # per forward: rotary tables and masks, the same in every layer (a CPU pays per op)
        self._blocks: dict = {}  # decode_block's weights per layer (None: the general path)
        self._step: dict = {}  # decode_layers' fields for kq_layers, and whether this model's layers route in C
        self.activations: str | None = None  # the few-row routines' mode while forward runs (None: ckernel.KQ)
        self._unit = torch.ones(cfg.head_dim)  # Llama 4's L2 qk norm as the C attention takes it (head_norms)

    def rotate(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        if self.cfg.spec.rope_interleave or (self.cfg.mla is not None and self.cfg.mla.interleave):
            # pairs → halves; q and k alike, so their dot products (all attention reads) agree
            x = torch.cat((x[..., 0::2], x[..., 1::2]), dim=-1)
        if self.inv_freq.device != x.device:  # once, not a host→device copy per layer and step
            self.inv_freq = self.inv_freq.to(x.device)
        tables = self.rope_tables(pos, x.dtype)
        if self.cfg.rotary_dim:  # partial rotary: the leading dims carry position, the rest pass through
            r = self.cfg.rotary_dim
            return torch.cat((apply_rope(x[..., :r], pos, self.inv_freq, tables=tables), x[..., r:]), dim=-1)
        return apply_rope(x, pos, self.inv_freq, tables=tables)

    def rope_tables(self, pos: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        key = ("rope", dtype)
        if key not in self._memo:
            self._memo[key] = rope_tables(pos, self.inv_freq.to(pos.device), self.rope_scale, dtype)
        return self._memo[key]

    def mask(self, pos: torch.Tensor, n_keys: int, window: int | None) -> torch.Tensor:
        key = ("mask", n_keys, window)
        if key not in self._memo:
            self._memo[key] = attention_mask(pos, n_keys, window)
        return self._memo[key]

    @staticmethod
    def cached(i: int, cache: list[torch.Tensor], new: torch.Tensor, rows: Rows) -> torch.Tensor:
        """Write valid tokens of new [B, T, h, d] into their slot at their position; read the slots back."""
        cache[i][rows.slot, rows.pos] = new.flatten(0, 1)[rows.flat].to(cache[i].dtype)
        return cache[i][rows.slots, : rows.n_keys].to(new.dtype)

    def attention(self, i: int, x: torch.Tensor, pos: torch.Tensor, rows: Rows, kv: KVCache | None) -> torch.Tensor:
        if self.cfg.mla is not None:
            return mla.attention(self, i, x, pos, rows, kv)
        cfg, w, p = self.cfg, self.w, f"model.layers.{i}.self_attn."
        B, T, _ = x.shape
        if len(self.qkv.get(i, ())) == 3:
            q, k, v = linear(x, w[p + "qkv_proj.weight"], w.get(p + "qkv_proj.bias")).split(self.qkv[i], -1)
        elif i in self.qkv:  # q and k stacked, v apart
            q, k = linear(x, w[p + "qk_proj.weight"], w.get(p + "qk_proj.bias")).split(self.qkv[i], -1)
            v = linear(x, w[p + "v_proj.weight"], w.get(p + "v_proj.bias"))
        else:
            q, k, v = (linear(x, w[p + n + "_proj.weight"], w.get(p + n + "_proj.bias")) for n in "qkv")
        if cfg.spec.attn_gate:  # per head: the query, then as many gate values (Qwen3-Next)
            q, gate = q.view(B, T, cfg.num_heads, 2 * cfg.head_dim).chunk(2, -1)
            q, gate = q.reshape(B, T, -1), gate.reshape(B, T, -1)
        if cfg.spec.qk_norm == "full" and cfg.qk_norm:
            q, k = rms_norm(q, w[p + "q_norm.weight"], cfg.rms_norm_eps), rms_norm(k, w[p + "k_norm.weight"], cfg.rms_norm_eps)
        if cfg.clip_qkv is not None:
            q, k, v = (t.clamp(-cfg.clip_qkv, cfg.clip_qkv) for t in (q, k, v))
        q = q.view(B, T, cfg.num_heads, cfg.head_dim)
        k = k.view(B, T, cfg.num_kv_heads, cfg.head_dim)
        v = v.view(B, T, cfg.num_kv_heads, cfg.head_dim)
        windowed = cfg.window_layers is None or i in cfg.window_layers
        # a CPU decode step: qk norm, rope, the cache writes and attention in one C call (~25 small ops otherwise)
        c_path = kv is not None and T == 1 and len(rows.flat) == B and rows.n_keys <= kv.k[i].shape[1] \
            and self._c_decode(q, kv.k[i]) and i not in cfg.nope_layers  # (past the slot: the torch path's IndexError)
        norms, flags = self.head_norms(i)
        norms = None if norms is None or flags & 1 else (*norms, cfg.rms_norm_eps)  # (OLMoE's whole-projection: above)
        if norms and not (c_path and norms[0].dtype == torch.float32 == norms[1].dtype):
            if flags & 4:  # after the rotary: the torch path's
                c_path = False
            else:
                q, k, norms = rms_norm(q, norms[0], norms[2]), rms_norm(k, norms[1], norms[2]), None
        if c_path:
            sinks, scale, window = self.c_attention(i)
            out = cstep.attend(q.view(B, -1, cfg.head_dim), k.view(B, -1, cfg.head_dim), v.view(B, -1, cfg.head_dim),
                                 kv.k[i], kv.v[i], rows.slot, rows.pos, self.rope_tables(pos, q.dtype), window, scale,
                                 sinks, norms, flags & 6)
            return self._attn_out(i, out.view(B, T, -1), gate if cfg.spec.attn_gate else None)
        q, k = self._rotated(i, q.transpose(1, 2), k, pos)
        if cfg.spec.qk_norm == "head_after_rope":  # Hunyuan normalises the rotated heads
            q = rms_norm(q, w[p + "query_layernorm.weight"], cfg.rms_norm_eps)
            k = rms_norm(k, w[p + "key_layernorm.weight"], cfg.rms_norm_eps)
        if kv is None:  # training / stateless forward: attend within the given tokens
            keys, vals, n = k, v, T
        else:
            keys, vals = self.cached(i, kv.k, k, rows), self.cached(i, kv.v, v, rows)
            n = keys.shape[1]
        mask = self.mask(pos, n, cfg.sliding_window if windowed else None)
        keys, vals, sinks = keys.transpose(1, 2), vals.transpose(1, 2), w.get(p + "sinks")
        if sinks is None:
            out = F.scaled_dot_product_attention(q, keys, vals, attn_mask=mask, scale=cfg.attention_scale,
                                                 enable_gqa=cfg.num_heads != cfg.num_kv_heads)
        else:
            out = sink_attention(q, keys, vals, mask, sinks)
        return self._attn_out(i, out.transpose(1, 2).reshape(B, T, -1), gate if cfg.spec.attn_gate else None)

    def _rotated(self, i: int, q: torch.Tensor, k: torch.Tensor, pos: torch.Tensor):
        """q [B, h, T, d] and k [B, T, h, d] rotated; Llama 4's rotary layers then L2-normalise each head, its others
        (nope_layers) keep q and k as they are and scale the queries by log position (attn_temperature)."""
        cfg = self.cfg
        if i in cfg.nope_layers:
            if cfg.attn_temperature:
                floor, scale = cfg.attn_temperature
                t = torch.log1p(torch.floor((pos.float() + 1.0) / floor)) * scale + 1.0
                q = (q * t[:, None, :, None]).to(q.dtype)
            return q, k
        q, k = self.rotate(q, pos), self.rotate(k.transpose(1, 2), pos).transpose(1, 2)
        if cfg.spec.qk_norm == "l2" and cfg.qk_norm:
            q, k = (F.rms_norm(t.float(), (t.shape[-1],), None, cfg.rms_norm_eps).type_as(t) for t in (q, k))
        return q, k

    def _attn_out(self, i: int, out: torch.Tensor, gate: torch.Tensor | None) -> torch.Tensor:
        p = f"model.layers.{i}.self_attn."
        out = out if gate is None else out * torch.sigmoid(gate)
        return linear(out, self.w[p + "o_proj.weight"], self.w.get(p + "o_proj.bias"))

    def c_attention(self, i: int) -> tuple[torch.Tensor | None, float, int | None]:
        """Layer i's sink logits, score scale and sliding window as the C attention takes them."""
        cfg, sinks = self.cfg, self.w.get(f"model.layers.{i}.self_attn.sinks")
        scale = cfg.attention_scale if sinks is None and cfg.attention_scale else cfg.head_dim ** -0.5
        return sinks, scale, cfg.sliding_window if cfg.window_layers is None or i in cfg.window_layers else None

    def head_norms(self, i: int) -> tuple[tuple | None, int]:
        """Layer i's q and k norm weights, or None, and how the C attention applies them and the rotary (flags:
        1 over the whole projection, OLMoE; 2 rotary pairs, ERNIE; 4 per head after the rotary, Hunyuan, Llama 4)."""
        spec, p = self.cfg.spec, f"model.layers.{i}.self_attn."
        if spec.qk_norm == "l2":  # Llama 4's: an RMS norm of unit weight per head, after the rotary, rotary layers only
            on = self.cfg.qk_norm and i not in self.cfg.nope_layers
            return (self._unit, self._unit) if on else None, 2 * spec.rope_interleave + 4 * on
        after = spec.qk_norm == "head_after_rope"
        names = ("query_layernorm", "key_layernorm") if after else ("q_norm", "k_norm")
        on = after or (self.cfg.qk_norm and spec.qk_norm in ("head", "full"))
        return ((self.w[p + names[0] + ".weight"], self.w[p + names[1] + ".weight"]) if on else None,
                (on and spec.qk_norm == "full") + 2 * spec.rope_interleave + 4 * after)

    def _c_decode(self, q: torch.Tensor, cache: torch.Tensor) -> bool:
        """Whether a decode step's attention runs in C (cstep): float32 on a CPU, the cache float32 or bf16."""
        return (q.device.type == "cpu" and q.dtype == torch.float32 and cache.is_contiguous()
                and cache.dtype in (torch.float32, torch.bfloat16) and ckernel.library() is not None)

    def linear_attention(self, i: int, x: torch.Tensor, rows: tuple[list[int], list[int]],
                         kv: KVCache | None, slots: torch.Tensor | None) -> torch.Tensor:
        """Each row's valid tokens (left-aligned, lengths[b] of them, from position starts[b]) continue its
        slot's state; a row that starts at position 0 starts from zero state. Padding never touches a state.
        All rows run at once (deltanet.delta_net_rows)."""
        d, p = self.cfg.delta_net, f"model.layers.{i}.linear_attn."
        lengths, starts = rows
        B = x.shape[0]
        if kv is None:
            conv = torch.zeros(B, d.conv_dim, d.conv_kernel - 1, device=x.device)
            state = torch.zeros(B, d.v_heads, d.k_head_dim, d.v_head_dim, device=x.device)
        else:  # the slots' states (a gathered copy); rows that start at position 0 begin from zero
            conv, state = kv.conv[i][slots], kv.state[i][slots]
            fresh = [b for b, s in enumerate(starts) if s == 0]
            if fresh:
                conv[fresh], state[fresh] = 0, 0
        out, conv, state = delta_net_rows(x, lengths, self.w, p, d, self.cfg.rms_norm_eps, conv, state)
        if kv is not None:
            kv.conv[i][slots], kv.state[i][slots] = conv.float(), state
        return out

    def mlp(self, i: int, x: torch.Tensor, dispatch: Dispatch, routed: tuple | None = None) -> torch.Tensor:
        """x: [N, H] valid tokens only, so padding never reaches the router or the traces. routed: the router's
        (probs, weights, ids) for x where a step's C call routed it already."""
        cfg, w = self.cfg, self.w
        if i not in self.moe:
            p = f"model.layers.{i}.mlp."
            return swiglu(x, w[p + "gate_proj.weight"], w[p + "up_proj.weight"], w[p + "down_proj.weight"])
        p = f"model.layers.{i}.{cfg.spec.moe_prefix}."
        gate, bias = w[p + cfg.spec.router + ".weight"], w.get(p + cfg.spec.router + ".bias")
        routed = routed or ckernel.route(x, gate, bias, cfg.top_k, cfg.norm_topk_prob, cfg.spec.scoring,
                               w.get(p + cfg.spec.bias_key), cfg.routed_scaling_factor, (cfg.n_group, cfg.topk_group))
        if routed is None:  # (the C router: a decode step's few float32 CPU tokens)
            logits = F.linear(x.float(), gate.float(), None if bias is None else bias.float()) if cfg.spec.fp32_router \
                else F.linear(x, gate, bias)
            routed = route(logits, cfg.top_k, cfg.norm_topk_prob, scoring=cfg.spec.scoring, n_group=cfg.n_group,
                           topk_group=cfg.topk_group, bias=w.get(p + cfg.spec.bias_key), scale=cfg.routed_scaling_factor)
        probs, weights, ids = routed
        if cfg.spec.weight_input:  # Llama 4: the one expert runs on the token times its weight
            out = dispatch(i, x * weights.to(x.dtype), probs, torch.ones_like(weights, dtype=x.dtype), ids)
        else:
            out = dispatch(i, x, probs, weights.to(x.dtype), ids)
        if cfg.spec.shared == "granite" and cfg.shared_expert_intermediate_size:  # beside the MoE, not in it
            gate, up = w[f"model.layers.{i}.shared_mlp.input_linear.weight"].chunk(2)
            out = out + swiglu(x, gate, up, w[f"model.layers.{i}.shared_mlp.output_linear.weight"])
        elif cfg.spec.shared is not None:
            s = p + cfg.spec.shared_key
            shared = swiglu(x, w[s + "gate_proj.weight"], w[s + "up_proj.weight"], w[s + "down_proj.weight"])
            if cfg.spec.shared == "gated":
                shared = torch.sigmoid(linear(x, w[p + "shared_expert_gate.weight"])) * shared
            out = out + shared
        return out

    def expert_fn(self, i: int):
        """Layer i's expert function for run_experts, where the family's experts are not plain SwiGLU (made
        once per layer: it keeps its host copies of the biases)."""
        if self.cfg.spec.experts != "gpt_oss":
            return None
        if i not in self._expert_fns:
            p = f"model.layers.{i}.{self.cfg.spec.moe_prefix}.experts."
            self._expert_fns[i] = clamped_swiglu(self.cfg.swiglu_limit, self.cfg.swiglu_alpha,
                                                 self.w[p + "gate_up_proj_bias"], self.w[p + "down_proj_bias"])
        return self._expert_fns[i]

    @staticmethod
    def _segments(pos: torch.Tensor, valid: torch.Tensor) -> tuple[list[int], list[int]]:
        """Each row's valid-token count and first position, read once per forward (one host sync)."""
        lengths = valid.sum(1)
        if not torch.equal(valid, torch.arange(valid.shape[1], device=valid.device)[None] < lengths[:, None]):
            raise ValueError("linear attention needs each row's valid tokens first (left-aligned, no gaps)")
        lengths, starts = torch.stack((lengths, pos[:, 0])).tolist()
        return lengths, starts

    @ckernel.running_mode
    def forward(self, tokens: torch.Tensor, pos: torch.Tensor, valid: torch.Tensor, dispatch: Dispatch,
                kv: KVCache | None = None, slots: torch.Tensor | None = None,
                last_only: bool = False) -> torch.Tensor:
        """tokens/pos/valid: [B, T]. Returns logits [B, T, V] (or [B, V] at each row's last valid token)."""
        cfg, w = self.cfg, self.w
        x = F.embedding(tokens, w["model.embed_tokens.weight"])
        if cfg.embedding_multiplier != 1.0:
            x = x * cfg.embedding_multiplier
        r = cfg.residual_multiplier  # a residual branch's weight (muP); 1 elsewhere, and then not multiplied
        B, T, H = x.shape
        rows = Rows.of(pos, valid, slots if kv is not None else None)
        self._memo = {}
        post, eps = cfg.spec.post_norm, cfg.rms_norm_eps  # post: OLMo-2 normalises branch outputs, not inputs
        segments = self._segments(pos, valid) if self.linear else None
        every = len(rows.flat) == B * T
        step = kv is not None and T == 1 and every and x.device.type == "cpu"  # (decode_block: its one C call)
        done = decode_layers(self, x, pos, rows, kv, dispatch) if step else 0  # layers run in C calls, x in place
        for i in range(done, cfg.num_layers):
            p = f"model.layers.{i}."
            h = attn_block(self, i, x, pos, rows, kv) if step else None
            if h is not None:  # x updated in place, h the MLP's input
                flat = x.reshape(B * T, H)
            else:
                h = x if post else rms_norm(x, w[p + "input_layernorm.weight"], eps)
                a = self.linear_attention(i, h, segments, kv, slots) if i in self.linear \
                    else self.attention(i, h, pos, rows, kv)
                a = rms_norm(a, w[p + "post_attention_layernorm.weight"], eps) if post else a
                x = x + (a if r == 1.0 else a * r)
                flat = x.reshape(B * T, H)
                h = flat if every else flat[rows.flat]  # every token valid (a decode step's rows): no gather/scatter
                h = h if post else rms_norm(h, w[p + "post_attention_layernorm.weight"], eps)
            m = self.mlp(i, h, dispatch)
            m = rms_norm(m, w[p + "post_feedforward_layernorm.weight"], eps) if post else m
            m = m if r == 1.0 else m * r
            x = (flat + m if every else flat.index_copy(0, rows.flat, flat[rows.flat] + m)).view(B, T, H)
        if last_only:
            last = valid.long().cumsum(1).argmax(1)
            x = x[torch.arange(x.shape[0], device=x.device), last]
        x = rms_norm(x, w["model.norm.weight"], cfg.rms_norm_eps)
        logits = linear(x, w["lm_head.weight"]).float()
        return logits if cfg.logits_scaling == 1.0 else logits / cfg.logits_scaling
