"""Writes tests/data/ARCH.gguf with llama.cpp's own converter, one tiny random model per family, and the
logits transformers gives on a fixed token sequence from the same weights, for tests/test_gguf.py: the
families whose GGUF layout only llama.cpp's converter defines (linear attention, GLM-4.5, MiniMax-M2,
dots.llm1, ERNIE-4.5, Granite MoE) and those whose conversion rewrites tensors (gpt-oss's interleaved
gate/up and biases, DeepSeek's split kv_b, Mixtral's permuted q/k).

    python scripts/make_llamacpp_fixtures.py --llama-cpp LLAMA_DIR   (its convert needs sentencepiece)

Tiny random Qwen3-Next and Qwen3.5-MoE checkpoints (tests/tiny.py), weights rounded to fp16 first so the f16
GGUF holds them exactly; the converter's Qwen3.5 value-head tiling applies (4 value heads over 2 key heads).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "scripts"))
from check_llamacpp import CONVERT  # noqa: E402
from tiny import make_tiny, write_tokenizer  # noqa: E402

TOKENS = 40  # past the conv kernel, enough for every state path; one chunk
STRIDE = 5   # the logits kept: positions 0, 5, 10, …


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--llama-cpp", type=Path, required=True)
    ap.add_argument("--out", type=Path, default=ROOT / "tests" / "data")
    a = ap.parse_args()
    import transformers
    a.out.mkdir(parents=True, exist_ok=True)
    for family, arch, pre in (("qwen3_next", "qwen3next", "qwen2"), ("qwen3_5_moe", "qwen35moe", "qwen35"),
                              ("glm4_moe", "glm4moe", "glm4"), ("minimax_m2", "minimax-m2", "minimax-m2"),
                              ("dots1", "dots1", "gpt-2"), ("ernie4_5_moe", "ernie4_5-moe", ""),
                              ("granitemoeshared", "granitemoe", "gpt-2"), ("gpt_oss", "gpt-oss", "gpt-4o"),
                              ("deepseek_v3", "deepseek2", "deepseek-v3"), ("mixtral", "llama", "gpt-2")):
        with tempfile.TemporaryDirectory() as tmp:
            size = {"glm4_moe": dict(n_routed_experts=4, moe_intermediate_size=16),
                    "dots1": dict(n_routed_experts=4, moe_intermediate_size=16, n_group=2, sliding_window=None),
                    "ernie4_5_moe": dict(moe_num_experts=4, moe_intermediate_size=16),
                    "granitemoeshared": dict(num_local_experts=4, intermediate_size=16, shared_intermediate_size=16),
                    "gpt_oss": dict(num_local_experts=4, intermediate_size=16),
                    "deepseek_v3": dict(n_routed_experts=8, moe_intermediate_size=16),
                    "mixtral": dict(num_local_experts=4, intermediate_size=16),
                    "minimax_m2": dict(num_local_experts=4, intermediate_size=16)}.get(
                family, dict(num_experts=4, moe_intermediate_size=16, shared_expert_intermediate_size=16))
            two = dict(num_hidden_layers=2, hidden_size=32)  # small files: the device run carries the whole tree
            if family in ("qwen3_next", "qwen3_5_moe"):
                two["layer_types"] = ["linear_attention", "full_attention"]
            hf = make_tiny(family, Path(tmp) / family, **size, **two)
            if family in ("minimax_m2", "deepseek_v3"):  # the releases' configs say so; transformers drops it
                cfg = json.loads((hf / "config.json").read_text())
                (hf / "config.json").write_text(json.dumps({**cfg, "scoring_func": "sigmoid"}))
            if family == "ernie4_5_moe":  # ERNIE's converter reads a SentencePiece model, as the release ships
                import sentencepiece as spm
                text = ["Summarize: the cat sat on the mat.", "Is this review positive or negative? Great food!",
                        "SELECT name FROM users WHERE id = 3;", "Answer the question: who wrote Hamlet?"] * 50
                spm.SentencePieceTrainer.train(sentence_iterator=iter(text), model_prefix=str(hf / "tokenizer"),
                                               vocab_size=320, model_type="bpe", byte_fallback=True,
                                               hard_vocab_limit=False, character_coverage=1.0, minloglevel=2)
            if family == "glm4_moe":  # the converter names GLM's special tokens
                write_tokenizer(hf, specials=("<|endoftext|>", "[gMASK]", "<sop>", "<|user|>", "<|assistant|>",
                                              "<|observation|>"))
            model = transformers.AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
            with torch.no_grad():
                for p in model.parameters():
                    p.copy_(p.half().float())
            model.save_pretrained(hf)
            gguf = a.out / f"{arch}.gguf"
            mtp = ["--no-mtp"] if family in ("qwen3_next", "qwen3_5_moe", "glm4_moe") else []
            subprocess.run([sys.executable, "-c", CONVERT, str(a.llama_cpp), pre, str(hf), "--outtype", "f16", *mtp,
                            "--outfile", str(gguf)], check=True, stdout=subprocess.DEVNULL)
            seq = torch.randint(0, model.config.vocab_size, (1, TOKENS), generator=torch.Generator().manual_seed(0))
            with torch.no_grad():
                logits = model(seq).logits[0]
            save_file({"tokens": seq[0], "logits": logits[::STRIDE].contiguous()},  # every STRIDE-th position
                      str(a.out / f"{arch}-logits.safetensors"))
            print(f"{gguf}: {gguf.stat().st_size} bytes")


if __name__ == "__main__":
    main()
