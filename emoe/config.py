"""Typed configuration objects, validated on construction.

`ModelConfig.from_hf` reads a Hugging Face `config.json` of a supported MoE family into one flat,
family-neutral description; the table `FAMILIES` is the only place that knows how families differ.
"""
from __future__ import annotations

from dataclasses import dataclass, field


class ConfigError(ValueError):
    """A config value is missing, inconsistent or unsupported."""


@dataclass(frozen=True, slots=True)
class Family:
    expert_keys: tuple[str, str, str]  # (gate, up, down) tensor names inside one expert
    moe_prefix: str                    # module holding router + experts inside a layer
    router_norm_topk: bool | None      # fixed by the family, or None = read `norm_topk_prob`
    qk_norm: str | None                # None | "head" (Qwen3: per head) | "full" (OLMoE: whole projection)
    qkv_bias_key: str | None           # config key that switches q/k/v biases on
    shared_expert: bool                # Qwen2-MoE: an always-on expert with a sigmoid gate


FAMILIES: dict[str, Family] = {
    "mixtral": Family(("w1", "w3", "w2"), "block_sparse_moe", True, None, None, False),
    "qwen2_moe": Family(("gate_proj", "up_proj", "down_proj"), "mlp", None, None, "qkv_bias", True),
    "qwen3_moe": Family(("gate_proj", "up_proj", "down_proj"), "mlp", None, "head", "attention_bias", False),
    "olmoe": Family(("gate_proj", "up_proj", "down_proj"), "mlp", None, "full", "attention_bias", False),
}


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

    @property
    def spec(self) -> Family:
        return FAMILIES[self.family]

    @classmethod
    def from_hf(cls, raw: dict) -> "ModelConfig":
        family = raw.get("model_type")
        if family not in FAMILIES:
            arch = raw.get("architectures")
            raise ConfigError(f"unsupported architecture model_type={family!r} (architectures={arch}); "
                              f"emoe supports {sorted(FAMILIES)}")

        def need(*keys):
            for k in keys:
                if raw.get(k) is not None:
                    return raw[k]
            raise ConfigError(f"config.json is missing {' or '.join(keys)}")

        n_layers = int(need("num_hidden_layers"))
        heads = int(need("num_attention_heads"))
        hidden = int(need("hidden_size"))
        spec = FAMILIES[family]
        rope = raw.get("rope_parameters") or {}
        if rope.get("rope_type", "default") != "default":
            raise ConfigError(f"rope_type {rope.get('rope_type')!r} is not supported (only 'default')")
        if family == "mixtral":
            moe_layers, inter = tuple(range(n_layers)), int(need("intermediate_size"))
            dense_inter = 0
        else:
            step = int(raw.get("decoder_sparse_step", 1) or 1)
            skip = set(raw.get("mlp_only_layers") or [])
            moe_layers = tuple(i for i in range(n_layers) if i not in skip and (i + 1) % step == 0)
            inter = int(need("moe_intermediate_size", "intermediate_size") if family != "olmoe"
                        else need("intermediate_size"))
            dense_inter = int(raw.get("intermediate_size") or 0)
        window = raw.get("sliding_window")
        if family in ("qwen2_moe", "qwen3_moe") and not raw.get("use_sliding_window", False):
            window = None
        eos = raw.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
        vocab = int(need("vocab_size"))
        return cls(
            family=family, vocab_size=vocab, hidden_size=hidden, num_layers=n_layers,
            num_heads=heads, num_kv_heads=int(raw.get("num_key_value_heads") or heads),
            head_dim=int(raw.get("head_dim") or hidden // heads),
            num_experts=int(need("num_local_experts", "num_experts")),
            top_k=int(need("num_experts_per_tok")),
            moe_intermediate_size=inter,
            norm_topk_prob=spec.router_norm_topk if spec.router_norm_topk is not None
            else bool(raw.get("norm_topk_prob", False)),
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            rope_theta=float(rope.get("rope_theta", raw.get("rope_theta", 10000.0))),
            max_position_embeddings=int(raw.get("max_position_embeddings", 4096)),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            qkv_bias=bool(raw.get(spec.qkv_bias_key, False)) if spec.qkv_bias_key else False,
            clip_qkv=raw.get("clip_qkv"),
            sliding_window=int(window) if window else None,
            dense_intermediate_size=dense_inter,
            shared_expert_intermediate_size=int(raw.get("shared_expert_intermediate_size") or 0),
            moe_layers=moe_layers,
            bos_token_id=raw.get("bos_token_id"),
            eos_token_ids=tuple(i for i in eos_ids if 0 <= i < vocab),
        )
