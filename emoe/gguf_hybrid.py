"""llama.cpp's Qwen3-Next (`qwen3next`) and Qwen3.5-MoE (`qwen35moe`) GGUFs back in Hugging Face's form.

Their converter rewrites the linear-attention layers: norms are stored as 1 + w, A as −exp(A_log), dt_bias
as `ssm_dt.bias`, the conv kernel squeezed to [channels, kernel]; Qwen3-Next's fused in_proj_qkvz is split
into q/k/v (`attn_qkv`) and z (`attn_gate`) (files before that split keep it as `ssm_in`); and for Qwen3.5 the
value heads are tiled across key heads ([G0v0, G1v0, …, G0v1, …]) rather than grouped by key head as
transformers holds them ([G0v0, G0v1, …, G1v0, …]). Each is undone here, so the import's tensors are the
Hugging Face checkpoint's (checked against transformers on files llama.cpp's own converter wrote).
"""
from __future__ import annotations

import re

import torch

ARCHS = {"qwen3next": "qwen3_next", "qwen35moe": "qwen3_5_moe"}
NAMES = {"attn_qkv": "linear_attn.in_proj_qkv", "attn_gate": "linear_attn.in_proj_z", "ssm_in": "linear_attn.in_proj_qkvz",
         "ssm_ba": "linear_attn.in_proj_ba", "ssm_alpha": "linear_attn.in_proj_a", "ssm_beta": "linear_attn.in_proj_b",
         "ssm_conv1d": "linear_attn.conv1d", "ssm_norm": "linear_attn.norm", "ssm_out": "linear_attn.out_proj"}
SCALARS = re.compile(r"blk\.(\d+)\.(ssm_a|ssm_dt\.bias)")  # per value head, no .weight suffix of their own
OFFSET = re.compile(r"(blk\.\d+\.(attn_norm|post_attention_norm|attn_q_norm|attn_k_norm)|output_norm)\.weight")


def hf_name(name: str) -> str | None:
    m = SCALARS.fullmatch(name)
    if m:
        return f"model.layers.{m.group(1)}.linear_attn.{'A_log' if m.group(2) == 'ssm_a' else 'dt_bias'}"
    return None


def config(m, cfg: dict) -> None:
    """The linear-attention settings (llama.cpp keeps them under ssm.*) and the layers that use it."""
    heads_v, inner = m.need("ssm.time_step_rank"), m.need("ssm.inner_size")
    head_dim = m.get("attention.key_length", cfg["hidden_size"] // cfg["num_attention_heads"])
    layers = cfg["num_hidden_layers"]
    recurrent = m.get("attention.recurrent_layers")
    if recurrent is None:
        every = int(m.get("full_attention_interval", 4))
        recurrent = [(i + 1) % every != 0 for i in range(layers)]
    cfg.update(linear_conv_kernel_dim=m.need("ssm.conv_kernel"), linear_key_head_dim=m.need("ssm.state_size"),
               linear_num_key_heads=m.need("ssm.group_count"), linear_num_value_heads=heads_v,
               linear_value_head_dim=inner // heads_v, head_dim=head_dim, norm_topk_prob=True,
               layer_types=["linear_attention" if r else "full_attention" for r in list(recurrent)[:layers]],
               partial_rotary_factor=m.get("rope.dimension_count", head_dim) / head_dim,
               shared_expert_intermediate_size=m.get("expert_shared_feed_forward_length", 0),
               attention_bias=False, mlp_only_layers=[])


def convert(m, name: str, hf: str, w: torch.Tensor, cfg: dict):
    """(Hugging Face name, tensor) pairs for one GGUF tensor of a linear-attention model."""
    if OFFSET.fullmatch(name):
        yield hf, w.float() - 1
        return
    kind = name.split(".")[2] if name.startswith("blk.") else ""
    if SCALARS.fullmatch(name):
        w = w.float()
        w = torch.log(-w) if kind == "ssm_a" else w
        yield hf, _untile(m, w, 0, 1, cfg)
        return
    hk, hv, dk, dv = (cfg[k] for k in ("linear_num_key_heads", "linear_num_value_heads", "linear_key_head_dim",
                                       "linear_value_head_dim"))
    if kind in ("attn_qkv", "ssm_conv1d"):  # q and k channels first, then the value heads'
        qk, v = w[: 2 * hk * dk], w[2 * hk * dk:]
        w = torch.cat((qk, _untile(m, v, 0, dv, cfg)))
        if kind == "ssm_conv1d":
            w = w[:, None, :]
    elif kind in ("attn_gate", "ssm_alpha", "ssm_beta"):
        w = _untile(m, w, 0, dv if kind == "attn_gate" else 1, cfg)
    elif kind == "ssm_out":
        w = _untile(m, w, 1, dv, cfg)
    elif kind == "ssm_ba" and f"blk.{name.split('.')[1]}.attn_qkv.weight" in m.tensors:
        r = hv // hk  # grouped by key head: r betas, then r alphas; with q/k/v apart, b and a go apart too
        b, a = w.reshape(hk, 2 * r, -1).split([r, r], 1)
        pre = hf.removesuffix("in_proj_ba.weight")
        yield pre + "in_proj_b.weight", b.reshape(hv, -1).contiguous()
        yield pre + "in_proj_a.weight", a.reshape(hv, -1).contiguous()
        return
    yield hf, w.contiguous()


def block_rows(m, name: str, rows: torch.Tensor, cfg: dict) -> torch.Tensor | None:
    """A dense projection's packed rows [rows, bytes] (blocks run along each row) in the Hugging Face order
    `convert` gives its values, or None where that is not a reordering of whole rows (Qwen3.5's out_proj: its
    columns move; b and a, split from one tensor or a few rows each). The full-attention layers, shared experts
    and lm_head are stored as they are."""
    kind = name.split(".")[2] if name.startswith("blk.") else ""
    hk, dk, dv = cfg["linear_num_key_heads"], cfg["linear_key_head_dim"], cfg["linear_value_head_dim"]
    if kind == "attn_qkv":
        return torch.cat((rows[: 2 * hk * dk], _untile(m, rows[2 * hk * dk:], 0, dv, cfg)))
    if kind == "attn_gate":
        return _untile(m, rows, 0, dv, cfg)
    if kind == "ssm_out":
        return rows if m.arch != "qwen35moe" or hk == cfg["linear_num_value_heads"] else None
    return None if kind.startswith("ssm_") else rows


def _untile(m, w: torch.Tensor, dim: int, head: int, cfg: dict) -> torch.Tensor:
    """Qwen3.5's value heads from llama.cpp's tiled order back to grouped by key head (Qwen3-Next: as stored)."""
    hk, hv = cfg["linear_num_key_heads"], cfg["linear_num_value_heads"]
    if m.arch != "qwen35moe" or hk == hv:
        return w
    shape = list(w.shape)
    t = w.reshape(*shape[:dim], hv // hk, hk, head, *shape[dim + 1:]).transpose(dim, dim + 1)
    return t.reshape(shape).contiguous()
