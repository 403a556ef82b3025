"""Write a random-weight Mixtral-format checkpoint (config.json, model.safetensors, tokenizer.json).

For benchmarking the memory path before (or besides) a trained model: `python scripts/make_random_model.py
--out runs/random-300m --experts 16 --hidden 512 --inter 768 --layers 8` gives ~290 MB of bf16 experts.
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
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(a.seed)
    H, I, heads = a.hidden, a.inter, max(1, a.hidden // 64)

    def r(*shape, std=0.02):
        return (torch.randn(*shape, generator=g) * std).to(torch.bfloat16)

    sd = {"model.embed_tokens.weight": r(a.vocab, H), "lm_head.weight": r(a.vocab, H),
          "model.norm.weight": torch.ones(H, dtype=torch.bfloat16)}
    for i in range(a.layers):
        p = f"model.layers.{i}."
        sd[p + "input_layernorm.weight"] = torch.ones(H, dtype=torch.bfloat16)
        sd[p + "post_attention_layernorm.weight"] = torch.ones(H, dtype=torch.bfloat16)
        for n in "qkvo":
            sd[p + f"self_attn.{n}_proj.weight"] = r(H, H)
        sd[p + "block_sparse_moe.gate.weight"] = r(a.experts, H, std=1.0)
        for e in range(a.experts):
            q = p + f"block_sparse_moe.experts.{e}."
            sd[q + "w1.weight"], sd[q + "w3.weight"], sd[q + "w2.weight"] = r(I, H), r(I, H), r(H, I)
    save_file(sd, str(out / "model.safetensors"), metadata={"format": "pt"})
    cfg = {"architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "vocab_size": a.vocab,
           "hidden_size": H, "intermediate_size": I, "num_hidden_layers": a.layers, "num_attention_heads": heads,
           "num_key_value_heads": heads, "num_local_experts": a.experts, "num_experts_per_tok": a.top_k,
           "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "rope_parameters": {"rope_theta": 1e4,
           "rope_type": "default"}, "tie_word_embeddings": False, "eos_token_id": 0, "torch_dtype": "bfloat16"}
    (out / "config.json").write_text(json.dumps(cfg, indent=1))
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    text = Path(pre_tokenizers.__file__).read_text() if Path(pre_tokenizers.__file__).is_file() else "hello world"
    tok.train_from_iterator([text, json.dumps(cfg)] * 4, trainers.BpeTrainer(
        vocab_size=a.vocab, special_tokens=["<|end|>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(str(out / "tokenizer.json"))
    n_exp = sum(t.numel() * 2 for k, t in sd.items() if ".experts." in k)
    print(f"wrote {out}: {n_exp / 2**20:.0f} MiB of experts, {(out / 'model.safetensors').stat().st_size / 2**20:.0f} MiB file")


if __name__ == "__main__":
    main()
