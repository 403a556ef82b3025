"""A Hugging Face `config.json` of a supported MoE family → one flat, family-neutral `ModelConfig`: the keys each
family names its sizes, layouts and variants by (the table `families.FAMILIES` says which variants it has)."""
from __future__ import annotations

from .config import MAX_LAYERS, MLA, ConfigError, DeltaNet, ModelConfig, Yarn, yarn_mscale
from .families import DEEPSEEK_LAYOUT, FAMILIES, INDEXED
from .rope import llama3_factors


def read(raw: dict) -> ModelConfig:
    """A Hugging Face config.json (a dict) → ModelConfig; bad values may raise anything (ModelConfig.from_hf
    turns them into ConfigError)."""
    family = raw.get("model_type")
    if family in ("qwen3_5_moe", "llama4") and isinstance(raw.get("text_config"), dict):  # multimodal: its text
        raw = {"tie_word_embeddings": raw.get("tie_word_embeddings"), **raw["text_config"], "model_type": family}
    family = {"qwen3_5_moe_text": "qwen3_5_moe", "llama4_text": "llama4"}.get(family, family)
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
    if heads <= 0 or hidden <= 0:
        raise ConfigError(f"num_attention_heads ({heads}) and hidden_size ({hidden}) must be positive")
    if not 0 < n_layers <= MAX_LAYERS:  # before anything is sized by it: a corrupt value must not exhaust memory
        raise ConfigError(f"num_hidden_layers={n_layers} is outside 1..{MAX_LAYERS}")
    spec = FAMILIES[family]
    rope = dict(raw.get("rope_parameters") or raw.get("rope_scaling") or {})
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type == "dynamic" and rope.get("alpha"):  # Hunyuan's NTK-alpha: a fixed, larger base
        head = int(raw.get("head_dim") or hidden // heads)
        rope = {**rope, "rope_theta": float(rope.get("rope_theta", raw.get("rope_theta", 10000.0)))
                * float(rope["alpha"]) ** (head / (head - 2))}
        rope_type = "default"
    if rope_type not in ("default", "yarn", "llama3"):
        raise ConfigError(f"rope_type {rope_type!r} is not supported (only 'default', 'yarn' and 'llama3')")
    yarn = _yarn(rope, raw) if rope_type == "yarn" else None
    if family == "hunyuan_v1_moe":
        if raw.get("use_cla"):
            raise ConfigError("use_cla=True (cross-layer attention) is not supported")
        for key in ("moe_topk", "num_experts", "moe_intermediate_size", "num_shared_expert"):
            v = raw.get(key)
            if isinstance(v, list):  # per-layer lists: one value is what the released models use
                if len(set(v)) != 1:
                    raise ConfigError(f"{key} differs between layers ({sorted(set(v))}); not supported")
                raw = {**raw, key: v[0]}
        # transformers sizes the experts by intermediate_size (the released models set both alike)
        moe_layers, inter = tuple(range(n_layers)), int(need("intermediate_size"))
        dense_inter = 0
    elif family == "llama4":  # MoE every interleave_moe_layer_step-th layer (or as listed), dense between
        step = int(raw.get("interleave_moe_layer_step") or 1)
        moe_layers = tuple(int(i) for i in (raw.get("moe_layers") or range(step - 1, n_layers, step)))
        inter, dense_inter = int(need("intermediate_size")), int(raw.get("intermediate_size_mlp") or 0)
    elif family in ("mixtral", "gpt_oss", "minimax_m2", "granitemoe", "granitemoeshared"):
        moe_layers, inter = tuple(range(n_layers)), int(need("intermediate_size"))
        dense_inter = 0
    elif family == "ernie4_5_moe":
        if raw.get("use_bias"):
            raise ConfigError("use_bias=True (biased projections and MLPs) is not supported")
        start, step = int(raw.get("moe_layer_start_index", 1)), int(raw.get("moe_layer_interval", 1) or 1)
        end = int(raw.get("moe_layer_end_index", -1))
        end = n_layers - 1 if end < 0 else end
        moe_layers = tuple(i for i in range(n_layers) if (i + 1) % step == 0 and start <= i <= end)
        inter, dense_inter = int(need("moe_intermediate_size")), int(raw.get("intermediate_size") or 0)
    elif family in DEEPSEEK_LAYOUT:
        kinds = raw.get("mlp_layer_types")  # GLM-4.x lite: "dense" / "sparse" per layer
        if kinds is not None:
            if len(kinds) != n_layers or set(kinds) - {"dense", "sparse"} or "sparse" not in kinds:
                raise ConfigError(f"mlp_layer_types must give 'dense' or 'sparse' for each of {n_layers} layers")
            moe_layers = tuple(i for i, k in enumerate(kinds) if k == "sparse")
        else:
            first_dense = int(raw.get("first_k_dense_replace") or 0)
            if not 0 <= first_dense < n_layers:
                raise ConfigError(f"first_k_dense_replace={first_dense} leaves no MoE layer of {n_layers}")
            moe_layers = tuple(range(first_dense, n_layers))
        inter, dense_inter = int(need("moe_intermediate_size")), int(raw.get("intermediate_size") or 0)
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
    types = raw.get("layer_types")
    if types is None and family == "dots1":  # transformers' default: layers from max_window_layers on
        types = ["sliding_attention" if window and i >= int(raw.get("max_window_layers", 62)) else "full_attention"
                 for i in range(n_layers)]
    window_layers = tuple(i for i, t in enumerate(types) if t == "sliding_attention") if types else None
    eos = raw.get("eos_token_id")
    eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
    vocab = int(need("vocab_size"))
    return ModelConfig(
        family=family, vocab_size=vocab, hidden_size=hidden, num_layers=n_layers,
        num_heads=heads, num_kv_heads=int(raw.get("num_key_value_heads") or heads),
        head_dim=int(raw["qk_rope_head_dim"]) if spec.mla and "qk_rope_head_dim" in raw
        else int(raw.get("head_dim") or hidden // heads),
        num_experts=int(need("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")),
        window_layers=window_layers,
        # transformers before 5.2x hard-coded 7.0 and 1.702 and wrote neither into config.json
        swiglu_limit=float(raw.get("swiglu_limit", 7.0)) if family == "gpt_oss" else 0.0,
        swiglu_alpha=float(raw.get("swiglu_alpha", 1.702)) if family == "gpt_oss" else 1.0,
        top_k=int(need("num_experts_per_tok", "experts_per_token", "moe_k", "moe_topk")),
        moe_intermediate_size=inter,
        norm_topk_prob=spec.router_norm_topk if spec.router_norm_topk is not None
        else bool(raw.get("norm_topk_prob", family in ("deepseek_v3", "glm4_moe", "glm4_moe_lite", *INDEXED))),
        rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
        rope_theta=float(rope.get("rope_theta", raw.get("rope_theta", 10000.0))),
        max_position_embeddings=_positions(raw, family),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        qkv_bias=bool(raw.get(spec.qkv_bias_key, False)) if spec.qkv_bias_key else False,
        clip_qkv=raw.get("clip_qkv"),
        sliding_window=int(window) if window else None,
        dense_intermediate_size=dense_inter,
        shared_expert_intermediate_size=_shared_size(raw, family, inter),
        moe_layers=moe_layers,
        bos_token_id=raw.get("bos_token_id"),
        eos_token_ids=tuple(i for i in eos_ids if 0 <= i < vocab),
        mla=_mla(raw, yarn) if spec.mla else None,
        rotary_dim=_rotary_dim(raw, rope, spec.mla, 0.25 if family == "qwen3_5_moe" else 1.0),
        qk_norm=bool(raw.get("use_qk_norm", family == "llama4")) if family in ("glm4_moe", "llama4") else True,
        yarn=yarn,
        **_groups(raw, family),
        **_mup(raw, family),
        **_delta_net(raw, family, n_layers),
        **_llama(raw, family, n_layers, rope if rope_type == "llama3" else None),
    )


def _positions(raw: dict, family: str) -> int:
    """The longest context served: the model's own, or for an indexed family (families.INDEXED) its index_topk,
    within which the indexer keeps every key (beyond it, it drops keys that the dense attention here would read);
    for Llama 4 its attention chunk, within which the chunked layers attend to every earlier position."""
    n = int(raw.get("max_position_embeddings", 4096))
    if family == "llama4" and raw.get("attention_chunk_size"):  # rotary layers attend within chunks of this size
        n = min(n, int(raw["attention_chunk_size"]))
    return min(n, int(raw.get("index_topk") or 2048)) if family in INDEXED else n


def _yarn(rope: dict, raw: dict) -> Yarn:
    try:
        factor = float(rope["factor"])
    except (KeyError, TypeError, ValueError):
        raise ConfigError("yarn rope scaling needs a numeric 'factor'") from None
    mscale, mscale_all = rope.get("mscale"), rope.get("mscale_all_dim")
    attn = rope.get("attention_factor")
    if attn is None:
        attn = yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all) if mscale and mscale_all \
            else yarn_mscale(factor)
    return Yarn(factor, int(rope.get("original_max_position_embeddings") or raw.get("max_position_embeddings", 4096)),
                float(rope.get("beta_fast") or 32), float(rope.get("beta_slow") or 1), float(attn),
                bool(rope.get("truncate", True)))


def _rotary_dim(raw: dict, rope: dict, mla: bool, default: float = 1.0) -> int:
    head = int(raw.get("head_dim") or int(raw["hidden_size"]) // int(raw["num_attention_heads"]))
    factor = float(rope.get("partial_rotary_factor", raw.get("partial_rotary_factor", default)) or 1.0)
    if factor == 1.0 and raw.get("rotary_dim"):  # MiniMax-M2's released configs give the count itself
        factor = int(raw["rotary_dim"]) / head
    if mla or factor == 1.0:
        return 0
    dim = int(head * factor)
    if dim <= 0 or dim % 2:
        raise ConfigError(f"partial_rotary_factor {factor} leaves {dim} rotary dims of {head}; need an even count")
    return dim


def _mla(raw: dict, yarn: Yarn | None) -> MLA:
    if raw.get("mlp_bias"):
        raise ConfigError("mlp_bias=True is not supported")
    mscale_all = float((raw.get("rope_parameters") or raw.get("rope_scaling") or {}).get("mscale_all_dim") or 0)
    m = yarn_mscale(yarn.factor, mscale_all) if yarn is not None and mscale_all else 1.0
    try:
        return MLA(int(raw.get("q_lora_rank") or 0), int(raw["kv_lora_rank"]), int(raw["qk_nope_head_dim"]),
                   int(raw["qk_rope_head_dim"]), int(raw["v_head_dim"]),
                   bool(raw.get("rope_interleave", True)), m * m)
    except (KeyError, TypeError) as e:
        raise ConfigError(f"config.json is missing MLA setting {e}") from None


def _shared_size(raw: dict, family: str, inter: int) -> int:
    """The always-on expert's intermediate size: counted in routed experts' sizes (DeepSeek, ERNIE), in
    dense MLP sizes (Hunyuan), or given (Qwen2-MoE, Granite)."""
    if family in DEEPSEEK_LAYOUT + ("ernie4_5_moe",):
        return inter * int(raw.get("n_shared_experts") or raw.get("moe_num_shared_experts") or 0)
    if family == "hunyuan_v1_moe":
        return int(raw.get("intermediate_size") or 0) * int(raw.get("num_shared_expert", 1) or 0)
    return int(raw.get("shared_expert_intermediate_size") or raw.get("shared_intermediate_size") or 0)


def _delta_net(raw: dict, family: str, n_layers: int) -> dict:
    """Qwen3-Next's linear-attention layers: layer_types, or every full_attention_interval-th layer full."""
    if family not in ("qwen3_next", "qwen3_5_moe"):
        return {}
    types = raw.get("layer_types")
    if types is None:
        every = int(raw.get("full_attention_interval") or 4)
        types = ["full_attention" if (i + 1) % every == 0 else "linear_attention" for i in range(n_layers)]
    if len(types) != n_layers or set(types) - {"linear_attention", "full_attention"}:
        raise ConfigError(f"layer_types must give 'linear_attention' or 'full_attention' for each of {n_layers} layers")
    d = DeltaNet(int(raw["linear_num_key_heads"]), int(raw["linear_num_value_heads"]), int(raw["linear_key_head_dim"]),
                 int(raw["linear_value_head_dim"]), int(raw.get("linear_conv_kernel_dim") or 4))
    return dict(delta_net=d, linear_layers=tuple(i for i, t in enumerate(types) if t == "linear_attention"))


def _llama(raw: dict, family: str, n_layers: int, llama3: dict | None) -> dict:
    """Llama 4's layers without the rotary (no_rope_layers: 0 there; default every fourth), the temperature its
    queries take there, and rope scaling as per-frequency divisors: Llama 3's (Scout's), or an import's."""
    out = {}
    if llama3 is not None:
        head = int(raw.get("head_dim") or int(raw["hidden_size"]) // int(raw["num_attention_heads"]))
        out["rope_factors"] = llama3_factors(head, float(llama3.get("rope_theta", raw.get("rope_theta", 10000.0))),
                                             float(llama3["factor"]), float(llama3.get("low_freq_factor", 1.0)),
                                             float(llama3.get("high_freq_factor", 4.0)),
                                             int(llama3.get("original_max_position_embeddings") or 8192))
    elif raw.get("rope_freq_factors"):  # an import-gguf folder's: the file's rope_freqs as they are
        out["rope_factors"] = tuple(float(f) for f in raw["rope_freq_factors"])
    if family != "llama4":
        return out
    every = int(raw.get("no_rope_layer_interval") or 4)
    rotary = raw.get("no_rope_layers") or [int((i + 1) % every != 0) for i in range(n_layers)]
    if len(rotary) != n_layers:
        raise ConfigError(f"no_rope_layers must give 0 or 1 for each of {n_layers} layers")
    out["nope_layers"] = tuple(i for i, r in enumerate(rotary) if not r)
    if raw.get("attn_temperature_tuning", True):
        out["attn_temperature"] = (float(raw.get("floor_scale") or 8192), float(raw.get("attn_scale", 0.1)))
    return out


def _mup(raw: dict, family: str) -> dict:
    if family not in ("granitemoe", "granitemoeshared"):
        return {}
    vals = {k: float(raw.get(k, 1.0)) for k in ("embedding_multiplier", "residual_multiplier", "logits_scaling")}
    if not all(v > 0 for v in vals.values()):
        raise ConfigError(f"muP multipliers must be positive, got {vals}")
    return dict(vals, attention_scale=float(raw["attention_multiplier"]) if raw.get("attention_multiplier") else None)


def _groups(raw: dict, family: str) -> dict:
    """Group-limited routing and the routed-output scale (DeepSeek); one group and scale 1 elsewhere."""
    if family not in DEEPSEEK_LAYOUT:
        return {}
    limited = family != "deepseek_v2" or raw.get("topk_method") == "group_limited_greedy"
    return dict(n_group=int(raw.get("n_group") or 1) if limited else 1,
                topk_group=int(raw.get("topk_group") or 1) if limited else 1,
                routed_scaling_factor=float(raw.get("routed_scaling_factor") or 1.0))
