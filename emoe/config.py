"""Typed configuration objects, validated on construction.

`ModelConfig.from_hf` reads a Hugging Face `config.json` of a supported MoE family into one flat,
family-neutral description (hf_config.read); the table `families.FAMILIES` says which variants a family has.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from .families import FAMILIES, Family


class ConfigError(ValueError):
    """A config value is missing, inconsistent or unsupported."""


MAX_LAYERS = 4096


@dataclass(frozen=True, slots=True)
class MLA:
    """DeepSeek's multi-head latent attention: keys and values are decompressed from one kv_lora_rank latent
    per token; only the first qk_rope_head_dim dimensions of each head carry position."""
    q_lora_rank: int            # 0: queries come from one q_proj (V2-Lite)
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    interleave: bool = True     # rotary pairs are (x0, x1), (x2, x3), … rather than the two halves
    softmax_mscale: float = 1.0  # YaRN's extra factor on the softmax scale (DeepSeek: mscale(factor, mscale_all_dim)²)


@dataclass(frozen=True, slots=True)
class DeltaNet:
    """Qwen3-Next's linear attention (gated delta rule): per sequence a causal-conv state of conv_kernel − 1
    inputs and a [v_heads, k_head_dim, v_head_dim] state replace the growing KV cache."""
    k_heads: int
    v_heads: int
    k_head_dim: int
    v_head_dim: int
    conv_kernel: int

    @property
    def conv_dim(self) -> int:
        return 2 * self.k_heads * self.k_head_dim + self.v_heads * self.v_head_dim

    @property
    def state_numel(self) -> int:
        return self.conv_dim * (self.conv_kernel - 1) + self.v_heads * self.k_head_dim * self.v_head_dim


@dataclass(frozen=True, slots=True)
class Yarn:
    """YaRN rope scaling (arXiv 2309.00071) as transformers computes it."""
    factor: float
    original_max_position_embeddings: int
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    attention_factor: float = 1.0   # multiplies cos/sin
    truncate: bool = True


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


@dataclass(frozen=True, slots=True)
class ModelConfig:
    family: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    num_experts: int
    top_k: int
    moe_intermediate_size: int
    norm_topk_prob: bool
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    clip_qkv: float | None = None
    sliding_window: int | None = None
    dense_intermediate_size: int = 0          # for layers without experts (Qwen mlp_only_layers)
    shared_expert_intermediate_size: int = 0
    moe_layers: tuple[int, ...] = field(default=())
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = field(default=())
    mla: MLA | None = None
    yarn: Yarn | None = None
    n_group: int = 1                  # group-limited routing: experts in n_group groups, tokens pick topk_group
    topk_group: int = 1
    routed_scaling_factor: float = 1.0
    rotary_dim: int = 0               # leading dims of each head that rotate (0: all; GLM-4.5 rotates half)
    qk_norm: bool = True              # the family's qk norm is on (GLM-4.5 makes it optional)
    window_layers: tuple[int, ...] | None = None  # layers the sliding window applies to (None: all)
    swiglu_limit: float = 0.0         # gpt-oss: gate and up clamped to ±limit, and the GLU's sigmoid slope
    swiglu_alpha: float = 1.0
    # muP (Granite): embeddings × embedding_multiplier, each residual branch × residual_multiplier,
    # attention scores × attention_scale (None: head_dim^-½), logits ÷ logits_scaling
    embedding_multiplier: float = 1.0
    residual_multiplier: float = 1.0
    attention_scale: float | None = None
    logits_scaling: float = 1.0
    delta_net: DeltaNet | None = None          # Qwen3-Next: the linear-attention layers' shape
    linear_layers: tuple[int, ...] = ()        # layers that use it instead of attention
    nope_layers: tuple[int, ...] = ()          # Llama 4: layers without the rotary
    attn_temperature: tuple[float, float] | None = None  # Llama 4's (floor_scale, attn_scale) on those layers' queries
    rope_factors: tuple[float, ...] | None = None  # each rotary frequency divided by its own (Llama 3 scaling)

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ConfigError(f"unknown architecture family {self.family!r}; supported: {sorted(FAMILIES)}")
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                     "num_experts", "top_k", "moe_intermediate_size", "max_position_embeddings"):
            if int(getattr(self, name)) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.top_k > self.num_experts:
            raise ConfigError(f"top_k={self.top_k} exceeds num_experts={self.num_experts}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
        if not self.moe_layers or any(not 0 <= i < self.num_layers for i in self.moe_layers):
            raise ConfigError(f"moe_layers {self.moe_layers} must be a non-empty subset of 0..{self.num_layers - 1}")
        if len(self.moe_layers) < self.num_layers and self.dense_intermediate_size <= 0:
            raise ConfigError("dense (non-MoE) layers need intermediate_size > 0")
        if self.n_group < 1 or self.num_experts % self.n_group or not 1 <= self.topk_group <= self.n_group:
            raise ConfigError(f"n_group={self.n_group} must divide num_experts={self.num_experts} and "
                              f"topk_group={self.topk_group} must lie in 1..n_group")
        if self.spec.scoring == "sigmoid" and self.n_group > 1 and self.num_experts // self.n_group < 2:
            raise ConfigError(f"n_group={self.n_group} leaves fewer than 2 experts per group (a group scores its top 2)")
        if self.top_k > self.topk_group * (self.num_experts // self.n_group):
            raise ConfigError(f"top_k={self.top_k} exceeds the {self.topk_group} groups a token may use")
        if self.spec.mla != (self.mla is not None):
            raise ConfigError(f"family {self.family} {'needs' if self.spec.mla else 'takes no'} MLA settings")
        if (self.delta_net is None) != (not self.linear_layers) or \
                any(not 0 <= i < self.num_layers for i in self.linear_layers):
            raise ConfigError(f"linear_layers {self.linear_layers} need linear-attention settings and must lie in "
                              f"0..{self.num_layers - 1}")
        d = self.delta_net
        if d is not None and (min(d.k_heads, d.v_heads, d.k_head_dim, d.v_head_dim) <= 0 or d.conv_kernel < 2
                              or d.v_heads % d.k_heads):
            raise ConfigError(f"linear attention needs positive sizes, conv kernel >= 2 and value heads a multiple "
                              f"of key heads, got {d}")
        if self.spec.weight_input and self.top_k != 1:
            raise ConfigError(f"num_experts_per_tok={self.top_k}: a router whose weight scales the expert's input is "
                              f"served with one expert a token (as Llama 4 routes)")
        if self.family == "gpt_oss" and not (self.swiglu_limit > 0 and self.swiglu_alpha > 0):
            raise ConfigError(f"swiglu_limit={self.swiglu_limit} and swiglu_alpha={self.swiglu_alpha} must be positive")

    @property
    def kv_numel_per_token(self) -> int:
        """KV-cache elements one token holds across all layers (MLA caches one latent, not per-head k and v;
        linear-attention layers cache nothing per token)."""
        if self.mla is not None:
            return self.num_layers * (self.mla.kv_lora_rank + self.mla.qk_rope_head_dim)
        return 2 * (self.num_layers - len(self.linear_layers)) * self.num_kv_heads * self.head_dim

    @property
    def state_numel_per_slot(self) -> int:
        """Fixed per-sequence state elements (float32) of the linear-attention layers."""
        return len(self.linear_layers) * self.delta_net.state_numel if self.delta_net else 0

    @property
    def spec(self) -> Family:
        return FAMILIES[self.family]

    @classmethod
    def from_hf(cls, raw: dict) -> "ModelConfig":
        """A Hugging Face config.json (as a dict) → ModelConfig; anything malformed is a ConfigError."""
        try:
            from .hf_config import read  # (it builds ModelConfig: imported here, not at the top)
            return read(raw)
        except ConfigError:
            raise
        except (TypeError, ValueError, KeyError, AttributeError, OverflowError, ZeroDivisionError) as e:
            raise ConfigError(f"config.json has a malformed value ({type(e).__name__}: {e})") from None
