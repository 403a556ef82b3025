"""A GGUF's metadata → the Hugging Face config.json of its model: what each llama.cpp architecture writes (and what
llama.cpp assumes where it writes nothing), in transformers' keys, for hf_config.read to take like any release's."""
from __future__ import annotations

from . import gguf_hybrid as hybrid
from .gguf_import import ARCHS, GGUFError


def config_json(g) -> dict:
    """A Hugging Face config.json for GGUFModel g's model (what transformers' own config would hold)."""
    layers, heads = g.layers, g.need("attention.head_count")
    hidden = g.need("embedding_length")
    moe = g.moe_layers
    if not moe:
        raise GGUFError(f"{g.files[0].name}: no layer has routed experts (ffn_gate_exps)")
    cfg = {"model_type": ARCHS[g.arch], "architectures": [_class(ARCHS[g.arch])],
           "vocab_size": len(g.meta["tokenizer.ggml.tokens"]), "hidden_size": hidden,
           "num_hidden_layers": layers, "num_attention_heads": heads,
           "num_key_value_heads": g.get("attention.head_count_kv", heads),
           "max_position_embeddings": g.need("context_length"),
           "rms_norm_eps": float(g.need("attention.layer_norm_rms_epsilon")),
           "rope_theta": float(g.get("rope.freq_base", 10000.0)),
           # OLMoE's converter writes the expert size as feed_forward_length, and no expert_ key
           "intermediate_size": g.get("feed_forward_length") or g.need("expert_feed_forward_length"),
           "moe_intermediate_size": g.get("expert_feed_forward_length") or g.need("feed_forward_length"),
           "num_experts": g.need("expert_count"), "num_experts_per_tok": g.need("expert_used_count"),
           "decoder_sparse_step": 1, "mlp_only_layers": [i for i in range(layers) if i not in moe],
           "tie_word_embeddings": "output.weight" not in g.tensors,
           "eos_token_id": g.meta.get("tokenizer.ggml.eos_token_id"),
           "bos_token_id": g.meta.get("tokenizer.ggml.bos_token_id"),
           "hidden_act": "silu", "use_sliding_window": False}
    scaling = g.get("rope.scaling.type", "none")
    if scaling == "yarn":  # Qwen3's 128k-context files
        cfg["rope_scaling"] = {"rope_type": "yarn", "factor": float(g.need("rope.scaling.factor")),
                               "original_max_position_embeddings": g.need("rope.scaling.original_context_length"),
                               "rope_theta": cfg["rope_theta"]}
    elif scaling != "none":
        raise GGUFError(f"{g.files[0].name}: rope scaling {scaling!r} is not supported (none or yarn)")
    bias = f"blk.{moe[0]}.attn_q.bias" in g.tensors
    if g.arch in ("deepseek2", "deepseek32", "glm-dsa"):
        _deepseek(g, cfg, moe)
    elif g.arch in ("glm4moe", "dots1"):  # DeepSeek-V3's routing and layout around grouped-query attention
        head = g.get("attention.key_length", hidden // heads)
        cfg.update(_routing(g, moe), n_routed_experts=cfg.pop("num_experts"), head_dim=head, attention_bias=bias,
                   partial_rotary_factor=g.get("rope.dimension_count", head) / head, sliding_window=None,
                   use_qk_norm=f"blk.{moe[0]}.attn_q_norm.weight" in g.tensors)
        cfg.pop("mlp_only_layers")
    elif g.arch == "gpt-oss":  # every other layer windowed, from the first; clamped SwiGLU (7.0, 1.702)
        cfg.update(num_local_experts=cfg.pop("num_experts"), attention_bias=True,
                   head_dim=g.get("attention.key_length", hidden // heads),
                   sliding_window=g.need("attention.sliding_window"),
                   layer_types=["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)])
        if "rope_scaling" in cfg:  # llama.cpp's defaults for what gpt-oss files leave out
            cfg["rope_scaling"].update(beta_fast=32.0, beta_slow=1.0, truncate=False)
    elif g.arch == "llama":  # Mixtral: q/k rows permuted for llama.cpp's rotary (undone in dense())
        cfg.update(num_local_experts=cfg.pop("num_experts"), head_dim=g.get("rope.dimension_count", hidden // heads))
    elif g.arch == "llama4":
        _llama4(g, cfg, moe)
    elif g.arch == "ernie4_5-moe":  # softmax routing with a selection bias, shared experts, dense first layers
        cfg.update(moe_num_experts=cfg.pop("num_experts"), moe_k=cfg.pop("num_experts_per_tok"),
                   moe_num_shared_experts=g.get("expert_shared_count", 0), moe_layer_start_index=moe[0],
                   moe_layer_interval=g.get("interleave_moe_layer_step", 1),
                   head_dim=g.get("attention.key_length", hidden // heads))
    elif g.arch == "granitemoe":  # muP multipliers; a shared expert makes it granitemoeshared
        shared = g.get("expert_shared_feed_forward_length", 0)
        cfg.update(model_type="granitemoeshared" if shared else "granitemoe",
                   architectures=["GraniteMoeSharedForCausalLM" if shared else "GraniteMoeForCausalLM"],
                   num_local_experts=cfg.pop("num_experts"), shared_intermediate_size=shared,
                   embedding_multiplier=g.get("embedding_scale", 1.0), logits_scaling=g.get("logit_scale", 1.0),
                   residual_multiplier=g.get("residual_scale", 1.0),
                   attention_multiplier=g.get("attention.scale", (hidden // heads) ** -0.5))
    elif g.arch == "minimax-m2":  # sigmoid routing with a selection bias, whole-projection qk norm, partial rotary
        cfg.update(num_local_experts=cfg.pop("num_experts"), head_dim=g.get("attention.key_length", hidden // heads),
                   rotary_dim=g.need("rope.dimension_count"))
    elif g.arch == "olmoe":  # softmax top-k, not renormalised; q/k norms over whole projections
        cfg.update(norm_topk_prob=False, clip_qkv=g.get("attention.clamp_kqv"))
    elif g.arch == "qwen3moe":  # llama.cpp's qwen3moe always renormalises the top-k weights
        cfg.update(norm_topk_prob=True, attention_bias=bias,
                   head_dim=g.get("attention.key_length", hidden // heads))
    elif g.arch in hybrid.ARCHS:
        hybrid.config(g, cfg)
    else:  # qwen2moe: biased q/k/v, a gated shared expert, no renormalisation
        cfg.update(norm_topk_prob=False, qkv_bias=bias,
                   shared_expert_intermediate_size=g.get("expert_shared_feed_forward_length", 0))
    return cfg


def _deepseek(g, cfg: dict, moe: list[int]) -> None:
    """DeepSeek-V2/V3 from llama.cpp's deepseek2 keys. Its converter writes MLA as MQA (one kv head of
    kv_lora_rank + rope dims); newer files give the per-head sizes as key/value_length_mla."""
    rank, rope = g.need("attention.kv_lora_rank"), g.need("rope.dimension_count")
    mla_k = g.get("attention.key_length_mla")
    key, value = (mla_k, g.need("attention.value_length_mla")) if mla_k else \
        (g.need("attention.key_length"), g.need("attention.value_length"))
    sigmoid = g.get("expert_gating_func") == 2 or any(n.endswith("exp_probs_b.bias") for n in g.tensors)
    groups = int(g.get("expert_group_count") or 1)
    cfg.update(_routing(g, moe), model_type="deepseek_v3" if sigmoid else "deepseek_v2",
               architectures=["DeepseekV3ForCausalLM" if sigmoid else "DeepseekV2ForCausalLM"],
               n_routed_experts=cfg.pop("num_experts"), num_key_value_heads=cfg["num_attention_heads"],
               topk_method="noaux_tc" if sigmoid else "group_limited_greedy" if groups > 1 else "greedy",
               scoring_func="sigmoid" if sigmoid else "softmax",
               q_lora_rank=g.get("attention.q_lora_rank"), kv_lora_rank=rank, qk_rope_head_dim=rope,
               qk_nope_head_dim=key - rope, v_head_dim=value, head_dim=rope)
    if g.arch in ("deepseek32", "glm-dsa"):  # its indexer keeps every key up to top_k: the context emoe serves
        if mla_k and g.need("attention.key_length") - rank != rope:  # (GLM's converter scales it by a partial factor)
            raise GGUFError(f"{g.files[0].name}: a partial rotary inside latent attention is not supported")
        cfg.update(model_type=ARCHS[g.arch], architectures=[_class(ARCHS[g.arch])],
                   index_topk=int(g.need("attention.indexer.top_k")))
    log_mul = g.get("rope.scaling.yarn_log_multiplier")
    if "rope_scaling" in cfg and log_mul:  # the converter writes 0.1·mscale_all_dim; releases set mscale alike
        cfg["rope_scaling"].update(mscale=10 * float(log_mul), mscale_all_dim=10 * float(log_mul))
    cfg.pop("mlp_only_layers")


def _llama4(g, cfg: dict, moe: list[int]) -> None:
    """Llama 4 as llama.cpp runs its files: every fourth layer without rotary, queries there scaled by log
    position (floor 8192, scale 0.1), the others chunked by 8192; none of that where the file sets
    sliding_window 0 (MobileLLM); qk norm unless 128 experts (Maverick); Llama 3 rope as rope_freqs."""
    layers, chunked, experts = cfg["num_hidden_layers"], g.get("attention.sliding_window") != 0, cfg.pop("num_experts")
    cfg.update(num_local_experts=experts, intermediate_size=cfg.pop("moe_intermediate_size"),
               intermediate_size_mlp=g.get("feed_forward_length") or 0, moe_layers=moe,
               head_dim=g.get("rope.dimension_count", cfg["hidden_size"] // cfg["num_attention_heads"]),
               no_rope_layers=[int(not chunked or (i + 1) % 4 != 0) for i in range(layers)],
               attention_chunk_size=8192 if chunked else None, attn_temperature_tuning=chunked,
               floor_scale=8192, attn_scale=0.1, use_qk_norm=experts != 128)
    cfg.pop("mlp_only_layers")
    if "rope_freqs.weight" in g.tensors:
        import gguf
        _, t = g.tensors["rope_freqs.weight"]
        cfg["rope_freq_factors"] = [float(f) for f in gguf.quants.dequantize(t.data, t.tensor_type).ravel()]


def _routing(g, moe: list[int]) -> dict:
    """DeepSeek-style MoE settings (DeepSeek, GLM-4.5): shared experts, dense first layers, routed scale,
    renormalisation, groups."""
    return dict(n_shared_experts=g.get("expert_shared_count", 0), first_k_dense_replace=moe[0],
                routed_scaling_factor=float(g.get("expert_weights_scale", 1.0)),
                norm_topk_prob=bool(g.get("expert_weights_norm", False)),
                n_group=int(g.get("expert_group_count") or 1),
                topk_group=int(g.get("expert_group_used_count") or 1))


def _class(model_type: str) -> str:
    return {"qwen2_moe": "Qwen2MoeForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM", "olmoe": "OlmoeForCausalLM",
            "mixtral": "MixtralForCausalLM", "gpt_oss": "GptOssForCausalLM", "deepseek_v3": "DeepseekV3ForCausalLM",
            "deepseek_v2": "DeepseekV2ForCausalLM", "glm4_moe": "Glm4MoeForCausalLM", "qwen3_next": "Qwen3NextForCausalLM",
            "dots1": "Dots1ForCausalLM", "ernie4_5_moe": "Ernie4_5_MoeForCausalLM", "granitemoe": "GraniteMoeForCausalLM",
            "minimax_m2": "MiniMaxM2ForCausalLM", "deepseek_v32": "DeepseekV32ForCausalLM", "llama4": "Llama4ForCausalLM",
            "glm_moe_dsa": "GlmMoeDsaForCausalLM",
            "qwen3_5_moe": "Qwen3_5MoeForCausalLM"}[model_type]
