"""Tiny random checkpoints of each supported family, written by transformers (test-only dependency)."""
from __future__ import annotations

from pathlib import Path

import torch

VOCAB = 320


def write_tokenizer(directory: Path, vocab: int = VOCAB, specials: tuple[str, ...] = ("<|end|>",)) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab - 1, special_tokens=list(specials),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    text = ["Summarize: the cat sat on the mat.", "Is this review positive or negative? Great food!",
            "SELECT name FROM users WHERE id = 3;", "Answer the question: who wrote Hamlet?"] * 20
    tok.train_from_iterator(text, trainer)
    tok.save(str(directory / "tokenizer.json"))


def make_tiny(family: str, directory: Path, seed: int = 0, **over) -> Path:
    import transformers as tf
    torch.manual_seed(seed)
    common = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, num_experts_per_tok=2, max_position_embeddings=256,
                  eos_token_id=VOCAB - 1, bos_token_id=None, pad_token_id=None)
    table = {
        "mixtral": (tf.MixtralConfig, tf.MixtralForCausalLM, dict(num_local_experts=8, intermediate_size=48)),
        "qwen2_moe": (tf.Qwen2MoeConfig, tf.Qwen2MoeForCausalLM,
                      dict(num_experts=8, moe_intermediate_size=32, intermediate_size=80,
                           shared_expert_intermediate_size=40, mlp_only_layers=[1])),
        "qwen3_moe": (tf.Qwen3MoeConfig, tf.Qwen3MoeForCausalLM,
                      dict(num_experts=8, moe_intermediate_size=32, intermediate_size=80, norm_topk_prob=True)),
        "olmoe": (tf.OlmoeConfig, tf.OlmoeForCausalLM, dict(num_experts=8, intermediate_size=32, clip_qkv=8.0)),
        # V2-Lite's shape: no query compression, greedy softmax routing over all experts, 2 shared experts
        "deepseek_v2": (tf.DeepseekV2Config, tf.DeepseekV2ForCausalLM,
                        dict(n_routed_experts=8, moe_intermediate_size=32, intermediate_size=80, n_shared_experts=2,
                             first_k_dense_replace=1, q_lora_rank=None, kv_lora_rank=24, qk_nope_head_dim=16,
                             qk_rope_head_dim=8, v_head_dim=12, routed_scaling_factor=1.5,
                             num_key_value_heads=4)),
        # V3's shape: compressed queries, sigmoid routing with a selection bias in 4 groups (2 per token), YaRN
        "deepseek_v3": (tf.DeepseekV3Config, tf.DeepseekV3ForCausalLM,
                        dict(n_routed_experts=8, moe_intermediate_size=32, intermediate_size=80, n_shared_experts=1,
                             first_k_dense_replace=1, q_lora_rank=20, kv_lora_rank=24, qk_nope_head_dim=16,
                             qk_rope_head_dim=8, v_head_dim=12, n_group=4, topk_group=2, routed_scaling_factor=2.5,
                             num_key_value_heads=4, num_mtp_layers=0,
                             rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, factor=4.0,
                                                  original_max_position_embeddings=64, beta_fast=32, beta_slow=1,
                                                  mscale=1.0, mscale_all_dim=1.0))),
        # GLM-4.5's shape: V3 routing with grouped-query attention, q/k/v biases, half the head rotary, qk norm
        "glm4_moe": (tf.Glm4MoeConfig, tf.Glm4MoeForCausalLM,
                     dict(n_routed_experts=8, moe_intermediate_size=32, intermediate_size=80, n_shared_experts=1,
                          first_k_dense_replace=1, n_group=2, topk_group=1, routed_scaling_factor=2.5,
                          attention_bias=True, use_qk_norm=True, head_dim=16, num_mtp_layers=0,
                          rope_parameters=dict(rope_type="default", rope_theta=10000.0, partial_rotary_factor=0.5))),
        # dots.llm1's shape: V3 routing, per-head qk norm, the last layer windowed
        "dots1": (tf.Dots1Config, tf.Dots1ForCausalLM,
                  dict(n_routed_experts=8, moe_intermediate_size=32, intermediate_size=80, n_shared_experts=1,
                       first_k_dense_replace=1, n_group=4, topk_group=2, routed_scaling_factor=2.5,
                       norm_topk_prob=True, head_dim=16, sliding_window=4, max_window_layers=2)),
        # MiniMax-M2's shape: sigmoid routing with a selection bias, whole-projection qk norm, half the head rotary
        "minimax_m2": (tf.MiniMaxM2Config, tf.MiniMaxM2ForCausalLM,
                       dict(num_local_experts=8, intermediate_size=32, head_dim=16, rotary_dim=8)),
        # ERNIE-4.5's shape: a dense first layer, MoE from layer 1, shared experts, interleaved rotary pairs
        "ernie4_5_moe": (tf.Ernie4_5_MoeConfig, tf.Ernie4_5_MoeForCausalLM,
                         dict(moe_num_experts=8, moe_k=2, moe_intermediate_size=32, intermediate_size=80,
                              moe_num_shared_experts=1, head_dim=16, tie_word_embeddings=False)),
        # Granite MoE's shape: stacked input/output_linear experts, muP multipliers
        "granitemoe": (tf.GraniteMoeConfig, tf.GraniteMoeForCausalLM,
                       dict(num_local_experts=8, intermediate_size=32, embedding_multiplier=12.0,
                            residual_multiplier=0.22, attention_multiplier=0.03, logits_scaling=6.0)),
        "granitemoeshared": (tf.GraniteMoeSharedConfig, tf.GraniteMoeSharedForCausalLM,
                             dict(num_local_experts=8, intermediate_size=32, shared_intermediate_size=48,
                                  embedding_multiplier=12.0, residual_multiplier=0.22, attention_multiplier=0.03,
                                  logits_scaling=6.0)),
        # Hunyuan-A13B's shape: a shared MLP everywhere, qk norm after the rotary, NTK-alpha rope
        "hunyuan_v1_moe": (tf.HunYuanMoEV1Config, tf.HunYuanMoEV1ForCausalLM,
                           dict(num_experts=8, moe_topk=2, moe_intermediate_size=32, intermediate_size=48,
                                head_dim=16, rope_parameters=dict(rope_type="dynamic", rope_theta=10000.0,
                                                                  alpha=1000.0, factor=1.0))),
        # GLM-4.x lite's shape: V3's latent attention and routing, layer kinds listed
        "glm4_moe_lite": (tf.Glm4MoeLiteConfig, tf.Glm4MoeLiteForCausalLM,
                          dict(n_routed_experts=8, moe_intermediate_size=32, intermediate_size=80, n_shared_experts=1,
                               q_lora_rank=20, kv_lora_rank=24, qk_nope_head_dim=16, qk_rope_head_dim=8,
                               v_head_dim=12, n_group=4, topk_group=2, routed_scaling_factor=1.8,
                               num_key_value_heads=4, mlp_layer_types=["dense", "sparse", "sparse"])),
        # DeepSeek-V3.2's shape: GLM lite's layers with a lightning indexer (its top-k above the tests' contexts)
        "deepseek_v32": (tf.DeepseekV32Config, tf.DeepseekV32ForCausalLM,
                         dict(n_routed_experts=8, moe_intermediate_size=32, intermediate_size=80, n_shared_experts=1,
                              q_lora_rank=20, kv_lora_rank=24, qk_nope_head_dim=16, qk_rope_head_dim=8,
                              v_head_dim=12, n_group=4, topk_group=2, routed_scaling_factor=1.8,
                              num_key_value_heads=4, first_k_dense_replace=1, index_topk=256, index_n_heads=2,
                              index_head_dim=16)),
        # GLM-5's shape (glm_moe_dsa): the same, some layers sharing the previous layer's top-k
        "glm_moe_dsa": (tf.GlmMoeDsaConfig, tf.GlmMoeDsaForCausalLM,
                        dict(n_routed_experts=8, moe_intermediate_size=32, intermediate_size=80, n_shared_experts=1,
                             q_lora_rank=20, kv_lora_rank=24, qk_nope_head_dim=16, qk_rope_head_dim=8,
                             v_head_dim=12, num_key_value_heads=4, first_k_dense_replace=1, index_topk=256,
                             index_n_heads=2, index_head_dim=16, indexer_types=["full", "full", "shared"])),
        # FlexOlmo's shape: OLMoE's experts behind OLMo-2's post-norm layers
        "flex_olmo": (tf.FlexOlmoConfig, tf.FlexOlmoForCausalLM, dict(num_experts=8, intermediate_size=32)),
        # Qwen3-Next's shape: linear attention (gated delta rule, 4 value heads over 2 key heads) around one gated
        # attention layer with a quarter of the head rotary, a gated shared expert, norms stored as w − 1
        "qwen3_next": (tf.Qwen3NextConfig, tf.Qwen3NextForCausalLM,
                       dict(num_experts=8, moe_intermediate_size=32, intermediate_size=80, norm_topk_prob=True,
                            shared_expert_intermediate_size=40, head_dim=16, partial_rotary_factor=0.25,
                            linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=8,
                            linear_value_head_dim=8, linear_conv_kernel_dim=4,
                            layer_types=["linear_attention", "full_attention", "linear_attention"])),
        # Qwen3.5 MoE (text): Qwen3-Next's layers with unfused linear-attention projections, M-RoPE sections
        # (text-only positions: plain rope on a quarter of the head)
        "qwen3_5_moe": (tf.Qwen3_5MoeTextConfig, tf.Qwen3_5MoeForCausalLM,
                        dict(num_experts=8, moe_intermediate_size=32, shared_expert_intermediate_size=40,
                             head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=8,
                             linear_value_head_dim=8, linear_conv_kernel_dim=4,
                             layer_types=["linear_attention", "full_attention", "linear_attention"],
                             rope_parameters=dict(rope_type="default", rope_theta=10000.0, partial_rotary_factor=0.25,
                                                  mrope_section=[1, 1, 0], mrope_interleaved=True))),
        # Llama 4's shape: top-1 sigmoid routing on the expert's input, a shared expert, MoE every other layer (dense
        # between), the last layer without rotary (its queries temperature-scaled from position 4), Llama 3 rope
        "llama4": (tf.Llama4TextConfig, tf.Llama4ForCausalLM,
                   dict(num_local_experts=8, num_experts_per_tok=1, intermediate_size=32, intermediate_size_mlp=80,
                        head_dim=16, interleave_moe_layer_step=2, no_rope_layers=[1, 1, 0], floor_scale=4,
                        attn_scale=0.1, attention_chunk_size=256,
                        rope_parameters=dict(rope_type="llama3", rope_theta=10000.0, factor=8.0, low_freq_factor=1.0,
                                             high_freq_factor=4.0, original_max_position_embeddings=64))),
        # gpt-oss's shape: biased router and experts, interleaved gate/up, sinks, every other layer windowed
        "gpt_oss": (tf.GptOssConfig, tf.GptOssForCausalLM,
                    dict(num_local_experts=8, intermediate_size=32, head_dim=16, sliding_window=4,
                         rope_parameters=dict(rope_type="yarn", rope_theta=150000.0, factor=4.0, beta_fast=32.0,
                                              beta_slow=1.0, truncate=False, original_max_position_embeddings=64))),
    }
    C, M, kw = table[family]
    cfg = C(**{**common, **kw, **over})
    model = M(cfg).eval()
    with torch.no_grad():  # random routers are near-uniform; sharpen them so routing is decisive
        for name, p in model.named_parameters():
            if name.endswith(("gate.weight", "router.weight")) and "shared" not in name:
                p.mul_(20)
            if name.endswith(("sinks", "_bias", "router.bias")):  # zero at init: give them values that matter
                p.copy_(torch.randn(p.shape) * 0.5)
            if family in ("qwen3_next", "qwen3_5_moe") and name.endswith("norm.weight"):  # stored as w − 1, zero at init
                p.add_(torch.randn(p.shape) * 0.2)
        for name, b in model.named_buffers():  # DeepSeek-V3's selection bias starts at zero; make it matter
            if name.endswith("e_score_correction_bias"):
                b.copy_(torch.randn(b.shape) * 0.3)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    write_tokenizer(directory)
    return directory


def make_mxfp4(directory: Path) -> Path:
    """Rewrite a tiny gpt-oss checkpoint's experts as the original release stores them (MXFP4, with
    gate_up as [E, 2I, H] rows interleaved and down as [E, H, I])."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from emoe.checkpoint import mxfp4_quantize
    f = directory / "model.safetensors"
    with safe_open(str(f), framework="pt") as s:
        ts = {k: s.get_tensor(k) for k in s.keys()}
    for name in [k for k in ts if k.endswith(("experts.gate_up_proj", "experts.down_proj"))]:
        ts[name + "_blocks"], ts[name + "_scales"] = mxfp4_quantize(ts.pop(name).transpose(1, 2))
    save_file(ts, str(f), metadata={"format": "pt"})
    return directory


def make_fp8(directory: Path, block: tuple[int, int] = (4, 4)) -> Path:
    """Rewrite a tiny checkpoint as the FP8 releases store it (DeepSeek-V3, Qwen3-FP8): experts one tensor
    each, every projection in float8_e4m3fn with a float32 weight_scale_inv per block; embeddings, norms,
    routers and lm_head as they were; a fp8 quantization_config in config.json."""
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file

    from emoe.checkpoint import fp8_quantize
    f = directory / "model.safetensors"
    with safe_open(str(f), framework="pt") as s:
        ts = {k: s.get_tensor(k) for k in s.keys()}
    for name in [k for k in ts if k.endswith("experts.gate_up_proj")]:  # transformers-5 fused → per expert
        pre, gate_up, down = name[: -len("gate_up_proj")], ts.pop(name), ts.pop(name[: -len("gate_up_proj")] + "down_proj")
        inter = gate_up.shape[1] // 2
        for e in range(gate_up.shape[0]):
            ts[f"{pre}{e}.gate_proj.weight"] = gate_up[e, :inter].contiguous()
            ts[f"{pre}{e}.up_proj.weight"] = gate_up[e, inter:].contiguous()
            ts[f"{pre}{e}.down_proj.weight"] = down[e].contiguous()
    keep = ("embed_tokens", "lm_head", "norm", "layernorm", "mlp.gate.weight")
    for name in [k for k in ts if k.endswith(".weight") and ts[k].dim() == 2 and not any(x in k for x in keep)]:
        ts[name], ts[name + "_scale_inv"] = fp8_quantize(ts[name], block)
    save_file(ts, str(f), metadata={"format": "pt"})
    cfg = json.loads((directory / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                  "weight_block_size": list(block)}
    (directory / "config.json").write_text(json.dumps(cfg))
    return directory


def make_qwen35_multimodal(directory: Path) -> Path:
    """A tiny Qwen3.5-MoE as released: Qwen3_5MoeForConditionalGeneration, its language model under
    model.language_model., a vision tower beside it (which emoe does not serve)."""
    import transformers as tf
    torch.manual_seed(0)
    text = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                num_experts_per_tok=2, max_position_embeddings=256, eos_token_id=VOCAB - 1, num_experts=8,
                moe_intermediate_size=32, shared_expert_intermediate_size=40, head_dim=16, linear_num_key_heads=2,
                linear_num_value_heads=4, linear_key_head_dim=8, linear_value_head_dim=8,
                layer_types=["linear_attention", "full_attention", "linear_attention"],
                rope_parameters=dict(rope_type="default", rope_theta=10000.0, partial_rotary_factor=0.25,
                                     mrope_section=[1, 1, 0], mrope_interleaved=True))
    vision = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, patch_size=4,
                  spatial_merge_size=1, temporal_patch_size=1, num_position_embeddings=16)
    model = tf.Qwen3_5MoeForConditionalGeneration(tf.Qwen3_5MoeConfig(text_config=text, vision_config=vision)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gate.weight") and "shared" not in name:
                p.mul_(20)
            if name.endswith("norm.weight") and "visual" not in name:
                p.add_(torch.randn(p.shape) * 0.2)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    write_tokenizer(directory)
    return directory


def make_llama4_multimodal(directory: Path) -> Path:
    """A tiny Llama 4 as released: Llama4ForConditionalGeneration, its language model under language_model.model.
    (lm_head under language_model.), a vision model and projector beside it (which emoe does not serve)."""
    import transformers as tf
    torch.manual_seed(0)
    text = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                max_position_embeddings=256, eos_token_id=VOCAB - 1, num_local_experts=8, num_experts_per_tok=1,
                intermediate_size=32, intermediate_size_mlp=80, head_dim=16, interleave_moe_layer_step=1,
                no_rope_layers=[1, 0, 1], floor_scale=4, attention_chunk_size=128)
    vision = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, vision_output_dim=32,
                  image_size=32, patch_size=8, projector_input_dim=32, projector_output_dim=64, pixel_shuffle_ratio=0.5)
    model = tf.Llama4ForConditionalGeneration(tf.Llama4Config(text_config=text, vision_config=vision)).eval()
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    write_tokenizer(directory)
    return directory
