"""Write a random-weight Mixtral- or DeepSeek-V3-format checkpoint (config.json, model.safetensors, tokenizer.json).

For benchmarking the memory path before (or besides) a trained model: `python scripts/make_random_model.py
--out runs/random-300m --experts 16 --hidden 512 --inter 768 --layers 8` gives ~290 MB of bf16 experts.
`--family deepseek_v3 --experts 64 --top-k 6` gives fine-grained experts behind latent attention, a shared
expert, one dense first layer and grouped sigmoid routing, as DeepSeek-V2-Lite / Moonlight are laid out.
Routers are scaled up so routing is decisive, as in a trained model.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--inter", type=int, default=768)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--family", default="mixtral", choices=["mixtral", "deepseek_v3", "gpt_oss"])
    ap.add_argument("--mxfp4", action="store_true", help="gpt_oss: experts in MXFP4, as the original release")
    ap.add_argument("--q-lora", type=int, default=0, help="deepseek_v3: compress queries to this rank, as V3/R1 and "
                    "Kimi-K2 do (0: a plain q_proj, as V2-Lite; llama.cpp takes that only at V2-Lite's 27 layers)")
    ap.add_argument("--mla", default="256,64,32,64", help="deepseek_v3: kv_lora_rank, qk_nope, qk_rope and v head "
                    "dims (DeepSeek-V2-Lite and V3: 512,128,64,128)")
    ap.add_argument("--router-std", type=float, default=1.0, help="router weights' std (1.0 makes routing decisive "
                    "under softmax; sigmoid scoring then saturates to exact ties at 1.0, which llama.cpp and emoe "
                    "break differently: take ~3/sqrt(hidden) for deepseek_v3)")
    ap.add_argument("--fp8", action="store_true", help="mixtral, deepseek_v3: projections in block-scaled FP8 "
                    "(128×128 blocks, weight_scale_inv), as the DeepSeek-V3 release")
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(a.seed)
    H, I, heads = a.hidden, a.inter, max(1, a.hidden // 64)

    def r(*shape, std=0.02):
        return (torch.randn(*shape, generator=g) * std).to(torch.bfloat16)

    sd = {"model.embed_tokens.weight": r(a.vocab, H), "lm_head.weight": r(a.vocab, H),
          "model.norm.weight": torch.ones(H, dtype=torch.bfloat16)}
    if a.family == "gpt_oss":
        return write(out, gpt_oss(a, sd, r), a)
    ds = a.family == "deepseek_v3"
    lora, nope, rope_d, vd = map(int, a.mla.split(","))  # MLA sizes
    for i in range(a.layers):
        p = f"model.layers.{i}."
        sd[p + "input_layernorm.weight"] = torch.ones(H, dtype=torch.bfloat16)
        sd[p + "post_attention_layernorm.weight"] = torch.ones(H, dtype=torch.bfloat16)
        if ds:
            if a.q_lora:
                sd[p + "self_attn.q_a_proj.weight"] = r(a.q_lora, H)
                sd[p + "self_attn.q_a_layernorm.weight"] = torch.ones(a.q_lora, dtype=torch.bfloat16)
                sd[p + "self_attn.q_b_proj.weight"] = r(heads * (nope + rope_d), a.q_lora)
            else:
                sd[p + "self_attn.q_proj.weight"] = r(heads * (nope + rope_d), H)
            sd[p + "self_attn.kv_a_proj_with_mqa.weight"] = r(lora + rope_d, H)
            sd[p + "self_attn.kv_a_layernorm.weight"] = torch.ones(lora, dtype=torch.bfloat16)
            sd[p + "self_attn.kv_b_proj.weight"] = r(heads * (nope + vd), lora)
            sd[p + "self_attn.o_proj.weight"] = r(H, heads * vd)
        else:
            for n in "qkvo":
                sd[p + f"self_attn.{n}_proj.weight"] = r(H, H)
        moe, (gk, uk, dk) = ("mlp", ("gate_proj", "up_proj", "down_proj")) if ds else ("block_sparse_moe", ("w1", "w3", "w2"))
        if ds and i == 0:  # first_k_dense_replace = 1
            sd[p + "mlp.gate_proj.weight"], sd[p + "mlp.up_proj.weight"], sd[p + "mlp.down_proj.weight"] = \
                r(4 * I, H), r(4 * I, H), r(H, 4 * I)
            continue
        sd[p + f"{moe}.gate.weight"] = r(a.experts, H, std=a.router_std)
        if ds:
            sd[p + "mlp.gate.e_score_correction_bias"] = torch.zeros(a.experts)
            sd[p + "mlp.shared_experts.gate_proj.weight"], sd[p + "mlp.shared_experts.up_proj.weight"], \
                sd[p + "mlp.shared_experts.down_proj.weight"] = r(2 * I, H), r(2 * I, H), r(H, 2 * I)
        for e in range(a.experts):
            q = p + f"{moe}.experts.{e}."
            sd[q + f"{gk}.weight"], sd[q + f"{uk}.weight"], sd[q + f"{dk}.weight"] = r(I, H), r(I, H), r(H, I)
    if a.fp8:
        from emoe.checkpoint import fp8_quantize
        keep = ("embed_tokens", "lm_head", "norm", "layernorm", ".gate.weight")
        for name in [k for k in sd if k.endswith(".weight") and sd[k].dim() == 2 and not any(x in k for x in keep)]:
            sd[name], sd[name + "_scale_inv"] = fp8_quantize(sd[name], (128, 128))
    save_file(sd, str(out / "model.safetensors"), metadata={"format": "pt"})
    if ds:
        cfg = {"architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "vocab_size": a.vocab,
               "hidden_size": H, "intermediate_size": 4 * I, "moe_intermediate_size": I,
               "num_hidden_layers": a.layers, "num_attention_heads": heads, "num_key_value_heads": heads,
               "n_routed_experts": a.experts, "num_experts_per_tok": a.top_k, "n_shared_experts": 2,
               "first_k_dense_replace": 1, "n_group": 1, "topk_group": 1, "routed_scaling_factor": 1.0,
               "norm_topk_prob": True, "scoring_func": "sigmoid", "q_lora_rank": a.q_lora or None, "kv_lora_rank": lora, "qk_nope_head_dim": nope,
               "qk_rope_head_dim": rope_d, "v_head_dim": vd, "max_position_embeddings": 2048, "rms_norm_eps": 1e-6,
               "rope_parameters": {"rope_theta": 1e4, "rope_type": "default"}, "tie_word_embeddings": False,
               "eos_token_id": 0, "torch_dtype": "bfloat16"}
    else:
        cfg = {"architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "vocab_size": a.vocab,
               "hidden_size": H, "intermediate_size": I, "num_hidden_layers": a.layers, "num_attention_heads": heads,
               "num_key_value_heads": heads, "num_local_experts": a.experts, "num_experts_per_tok": a.top_k,
               "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "rope_parameters": {"rope_theta": 1e4,
               "rope_type": "default"}, "tie_word_embeddings": False, "eos_token_id": 0, "torch_dtype": "bfloat16"}
    if a.fp8:
        cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                      "weight_block_size": [128, 128]}
    write(out, cfg, a)


def gpt_oss(a, sd: dict, r) -> dict:
    """gpt-oss tensors (biased attention with sinks, biased router, fused experts) into sd; the config."""
    H, I, E, hd = a.hidden, a.inter, a.experts, 64
    heads, kv = max(1, H // hd), max(1, H // hd // 4)
    for i in range(a.layers):
        p = f"model.layers.{i}."
        sd[p + "input_layernorm.weight"] = torch.ones(H, dtype=torch.bfloat16)
        sd[p + "post_attention_layernorm.weight"] = torch.ones(H, dtype=torch.bfloat16)
        for n, rows in (("q", heads * hd), ("k", kv * hd), ("v", kv * hd)):
            sd[p + f"self_attn.{n}_proj.weight"], sd[p + f"self_attn.{n}_proj.bias"] = r(rows, H), r(rows)
        sd[p + "self_attn.o_proj.weight"], sd[p + "self_attn.o_proj.bias"] = r(H, heads * hd), r(H)
        sd[p + "self_attn.sinks"] = r(heads, std=1.0)
        sd[p + "mlp.router.weight"], sd[p + "mlp.router.bias"] = r(E, H, std=1.0), r(E)
        q = p + "mlp.experts."
        gate_up, down = r(E, H, 2 * I), r(E, I, H)
        sd[q + "gate_up_proj_bias"], sd[q + "down_proj_bias"] = r(E, 2 * I), r(E, H)
        if a.mxfp4:  # stored as the release does: [E, 2I, H] and [E, H, I], 32 values per scale
            from emoe.checkpoint import mxfp4_quantize
            sd[q + "gate_up_proj_blocks"], sd[q + "gate_up_proj_scales"] = mxfp4_quantize(gate_up.transpose(1, 2))
            sd[q + "down_proj_blocks"], sd[q + "down_proj_scales"] = mxfp4_quantize(down.transpose(1, 2))
        else:
            sd[q + "gate_up_proj"], sd[q + "down_proj"] = gate_up, down
    save_file(sd, str(Path(a.out) / "model.safetensors"), metadata={"format": "pt"})
    return {"architectures": ["GptOssForCausalLM"], "model_type": "gpt_oss", "vocab_size": a.vocab, "hidden_size": H,
            "intermediate_size": I, "num_hidden_layers": a.layers, "num_attention_heads": heads,
            "num_key_value_heads": kv, "head_dim": hd, "num_local_experts": E, "num_experts_per_tok": a.top_k,
            "sliding_window": 128, "layer_types": ["sliding_attention" if i % 2 == 0 else "full_attention"
                                                   for i in range(a.layers)],
            "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "attention_bias": True,
            "rope_parameters": {"rope_theta": 150000.0, "rope_type": "default"}, "swiglu_limit": 7.0,
            "tie_word_embeddings": False, "eos_token_id": 0, "torch_dtype": "bfloat16"}


def write(out: Path, cfg: dict, a) -> None:
    (out / "config.json").write_text(json.dumps(cfg, indent=1))
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    text = Path(pre_tokenizers.__file__).read_text() if Path(pre_tokenizers.__file__).is_file() else "hello world"
    tok.train_from_iterator([text, json.dumps(cfg)] * 4, trainers.BpeTrainer(
        vocab_size=a.vocab, special_tokens=["<|end|>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(str(out / "tokenizer.json"))
    print(f"wrote {out}: {(out / 'model.safetensors').stat().st_size / 2**20:.0f} MiB file")


if __name__ == "__main__":
    main()
