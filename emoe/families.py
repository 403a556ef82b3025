"""The supported MoE families: one literal table of how their checkpoints and layers differ.

`config.ModelConfig.from_hf` reads a family's `config.json` into a family-neutral description; this table is the only
place that knows the tensor names, router and attention variants each family uses.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Family:
    expert_keys: tuple[str, str, str]  # (gate, up, down) tensor names inside one expert
    moe_prefix: str                    # module holding router + experts inside a layer
    router_norm_topk: bool | None      # fixed by the family, or None = read `norm_topk_prob`
    qk_norm: str | None                # None | "head" (Qwen3: per head) | "full" (OLMoE: whole projection) |
                                       # "head_after_rope" (Hunyuan: per head, on the rotated q and k) |
                                       # "l2" (Llama 4: per head, no weight, after the rotary, rotary layers only)
    qkv_bias_key: str | None           # config key that switches q/k/v biases on
    shared: str | None                 # always-on expert: "gated" (Qwen2-MoE, sigmoid gate) | "plain" (DeepSeek)
                                       # | "granite" (a layer-level shared_mlp, gate and up stacked)
    mla: bool = False                  # DeepSeek multi-head latent attention (cache holds one latent per token)
    scoring: str = "softmax"           # router scores: "softmax" | "sigmoid" (DeepSeek-V3, + selection bias)
    fp32_router: bool = False          # DeepSeek computes router logits in fp32 whatever the model dtype
    router: str = "gate"               # the router's module name inside moe_prefix (gpt-oss: "router", with a bias)
    experts: str = "split"             # expert tensors: "split" (gate, up, down or transformers-5 fused) |
                                       # "gpt_oss" (fused [E, H, 2I] with gate/up interleaved, biases, clamped SwiGLU)
                                       # | "llama4" (fused [E, H, 2I], gate then up, and [E, I, H])
    bias_key: str = "gate.e_score_correction_bias"  # the routing's selection bias, inside moe_prefix
    rope_interleave: bool = False      # rotary pairs (x0, x1), (x2, x3), … (ERNIE; MLA says so in its config)
    fused_keys: tuple[str, str] = ("experts.gate_up_proj", "experts.down_proj")  # stacked [E, 2I, H], [E, H, I]
    shared_key: str = "shared_experts."  # the shared expert's module inside moe_prefix
    post_norm: bool = False            # OLMo-2 style: each branch's output is normalised, its input is not
    norm_offset: bool = False          # RMSNorm weights are stored as w − 1 (Qwen3-Next: the scale is 1 + w)
    attn_gate: bool = False            # q_proj also gives a per-head output gate, σ(gate)·attention (Qwen3-Next)
    weight_input: bool = False         # the routing weight scales the expert's input, not its output (Llama 4)


_GUD = ("gate_proj", "up_proj", "down_proj")
FAMILIES: dict[str, Family] = {
    "mixtral": Family(("w1", "w3", "w2"), "block_sparse_moe", True, None, None, None),
    "qwen2_moe": Family(_GUD, "mlp", None, None, "qkv_bias", "gated", shared_key="shared_expert."),
    "qwen3_moe": Family(_GUD, "mlp", None, "head", "attention_bias", None),
    "olmoe": Family(_GUD, "mlp", None, "full", "attention_bias", None),
    "deepseek_v2": Family(_GUD, "mlp", False, None, None, "plain", mla=True, fp32_router=True),
    "deepseek_v3": Family(_GUD, "mlp", None, None, None, "plain", mla=True, scoring="sigmoid", fp32_router=True),
    # GLM-4.5(-Air): DeepSeek-V3's router and layout with grouped-query attention, partial rotary, optional qk norm
    "glm4_moe": Family(_GUD, "mlp", None, "head", "attention_bias", "plain", scoring="sigmoid", fp32_router=True),
    # GLM MoE "lite": DeepSeek-V3's latent attention and routing, dense/sparse layer types
    "glm4_moe_lite": Family(_GUD, "mlp", None, None, None, "plain", mla=True, scoring="sigmoid", fp32_router=True),
    # DeepSeek-V3.2 and GLM-5 (glm_moe_dsa): GLM lite's layers whose latent attention a lightning indexer narrows
    # to each query's top index_topk keys; up to that many keys it keeps every one, so within the context emoe
    # serves them at (config: index_topk) they are that dense attention and the indexer's weights are not read
    "deepseek_v32": Family(_GUD, "mlp", None, None, None, "plain", mla=True, scoring="sigmoid", fp32_router=True),
    "glm_moe_dsa": Family(_GUD, "mlp", None, None, None, "plain", mla=True, scoring="sigmoid", fp32_router=True),
    # FlexOlmo (Ai2): OLMoE's experts and routing with OLMo-2's post-norm layers
    "flex_olmo": Family(_GUD, "mlp", None, "full", "attention_bias", None, post_norm=True),
    # dots.llm1 (rednote): the same router and layout with full rotary, qk norm always, windowed layer_types
    "dots1": Family(_GUD, "mlp", None, "head", "attention_bias", "plain", scoring="sigmoid", fp32_router=True),
    # MiniMax-M2: Mixtral's layout, sigmoid routing with a selection bias (no groups), whole-projection qk
    # norm, partial rotary
    "minimax_m2": Family(("w1", "w3", "w2"), "block_sparse_moe", True, "full", None, None, scoring="sigmoid",
                         bias_key="e_score_correction_bias"),
    # ERNIE-4.5 MoE: softmax routing whose selection adds a bias, shared experts, interleaved rotary pairs,
    # MoE layers from moe_layer_start_index to moe_layer_end_index every moe_layer_interval
    "ernie4_5_moe": Family(_GUD, "mlp", True, None, None, "plain", fp32_router=True,
                           bias_key="moe_statics.e_score_correction_bias", rope_interleave=True),
    # Granite MoE (IBM): Mixtral's routing, stacked experts under other names, muP multipliers on the
    # embeddings, residual branches, attention scores and logits
    "granitemoe": Family(_GUD, "block_sparse_moe", True, None, "attention_bias", None, router="router.layer",
                         fused_keys=("input_linear.weight", "output_linear.weight")),
    # Granite MoE with a shared expert beside the routed ones
    "granitemoeshared": Family(_GUD, "block_sparse_moe", True, None, "attention_bias", "granite",
                               router="router.layer", fused_keys=("input_linear.weight", "output_linear.weight")),
    # Hunyuan-A13B: Qwen's routing with an fp32 router, a shared MLP in every layer, per-head qk norm after
    # the rotary, NTK-alpha rope
    "hunyuan_v1_moe": Family(_GUD, "mlp", True, "head_after_rope", "attention_bias", "plain", fp32_router=True,
                             router="gate.wg", shared_key="shared_mlp."),
    # Qwen3-Next: Qwen2-MoE's routing and gated shared expert; three of every four layers mix tokens with a
    # gated delta rule (linear attention, a fixed-size state per sequence), the fourth with gated attention
    "qwen3_next": Family(_GUD, "mlp", None, "head", "attention_bias", "gated", shared_key="shared_expert.",
                         norm_offset=True, attn_gate=True),
    # Qwen3.5 MoE: Qwen3-Next's layers (its linear attention's projections unfused), every layer MoE; the
    # released multimodal checkpoints are served as text (their language model under model.language_model)
    "qwen3_5_moe": Family(_GUD, "mlp", True, "head", "attention_bias", "gated", shared_key="shared_expert.",
                          norm_offset=True, attn_gate=True),
    # Llama 4 (Scout, Maverick): a top-1 sigmoid router whose weight scales the expert's input, a shared expert in
    # every MoE layer, experts stacked [E, H, 2I] (gate then up); layers rotate interleaved pairs and L2-normalise
    # q and k but for every fourth, which has no rotary and scales its queries by log position; dense layers between
    "llama4": Family(_GUD, "feed_forward", False, "l2", "attention_bias", "plain", scoring="sigmoid", router="router",
                     experts="llama4", rope_interleave=True, shared_key="shared_expert.", weight_input=True),
    # gpt-oss: softmax over the top-k router logits (= top-k renormalised), attention sinks, every other
    # layer windowed; bf16 checkpoints (the MXFP4 release needs dequantising first)
    "gpt_oss": Family(_GUD, "mlp", True, None, "attention_bias", None, router="router", experts="gpt_oss"),
}
# dense first layers (first_k_dense_replace or mlp_layer_types), n_shared_experts, group-limited routing
DEEPSEEK_LAYOUT = ("deepseek_v2", "deepseek_v3", "glm4_moe", "dots1", "glm4_moe_lite", "deepseek_v32", "glm_moe_dsa")
INDEXED = ("deepseek_v32", "glm_moe_dsa")  # sparse attention by a lightning indexer beyond index_topk keys
