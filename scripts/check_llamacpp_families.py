"""emoe against llama.cpp on f32 GGUFs of one tiny random model per family (docs/results/check_llamacpp_families.txt).

Each model is tests/tiny.py's, adjusted where llama.cpp's converter or loader needs what a release has:
the gating function named in config.json (transformers does not write it; llama.cpp falls back to softmax
without it), as many kv heads as heads for dots.llm1 and OLMoE (llama.cpp's loaders take no fewer), GLM's
special tokens, a SentencePiece model and the
shared-expert size rule for ERNIE. Then scripts/check_llamacpp.py runs on each (f32 only).

    python scripts/check_llamacpp_families.py --llama-cpp LLAMA_DIR [--work runs/llamacpp-families]
        [--quants q8_0 --modes all@1.0,host@0,host+db@0]   (quantised files, emoe's CPU default's paths)
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from tiny import make_tiny, write_tokenizer  # noqa: E402

GLM_SPECIALS = ("<|endoftext|>", "[gMASK]", "<sop>", "<|user|>", "<|assistant|>", "<|observation|>")
# family, label, split rule, make_tiny overrides, config.json additions, converter arguments
FAMILIES = [
    ("qwen3_moe", "qwen3_moe", "qwen2", {}, {}, []),
    ("qwen2_moe", "qwen2_moe (mlp_only_layers=[])", "qwen2", {"mlp_only_layers": []}, {}, []),
    ("gpt_oss", "gpt_oss", "gpt-4o", {}, {}, []),
    ("deepseek_v3", "deepseek_v3 (YaRN, q_lora, 4 groups)", "deepseek-v3", {}, {"scoring_func": "sigmoid"}, []),
    ("qwen3_next", "qwen3_next", "qwen2", {}, {}, ["--no-mtp"]),
    ("minimax_m2", "minimax_m2", "minimax-m2", {}, {"scoring_func": "sigmoid"}, []),
    ("dots1", "dots1 (MHA, no window)", "gpt-2", {"sliding_window": None, "num_key_value_heads": 4},
     {"scoring_func": "sigmoid"}, []),
    ("glm4_moe", "glm4_moe (GLM special tokens)", "glm4", {}, {}, ["--no-mtp"]),
    ("ernie4_5_moe", "ernie4_5_moe (SentencePiece)", "", {"intermediate_size": 64}, {}, []),
    ("granitemoeshared", "granitemoeshared", "gpt-2", {}, {}, []),
    ("olmoe", "olmoe (MHA)", "gpt-2", {"num_key_value_heads": 4}, {}, []),
]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--llama-cpp", type=Path, required=True)
    ap.add_argument("--work", type=Path, default=Path("runs/llamacpp-families"))
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--quants", default="f32", help="passed to check_llamacpp.py")
    ap.add_argument("--modes", default="all@1.0", help="passed to check_llamacpp.py")
    a = ap.parse_args()
    for family, label, pre, over, extra, convert in FAMILIES:
        hf = make_tiny(family, a.work / family / "hf", **over)
        if extra:
            cfg = json.loads((hf / "config.json").read_text())
            (hf / "config.json").write_text(json.dumps({**cfg, **extra}))
        if family == "glm4_moe":
            write_tokenizer(hf, specials=GLM_SPECIALS)
        if family == "olmoe":  # else transformers picks GPT-NeoX's tokenizer class, which adds two tokens
            (hf / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast",
                                                                  "eos_token": "<|end|>"}))
        if family == "ernie4_5_moe":
            import sentencepiece as spm
            text = ["Summarize: the cat sat on the mat.", "Is this review positive or negative? Great food!",
                    "SELECT name FROM users WHERE id = 3;", "Answer the question: who wrote Hamlet?"] * 50
            spm.SentencePieceTrainer.train(sentence_iterator=iter(text), model_prefix=str(hf / "tokenizer"),
                                           vocab_size=320, model_type="bpe", byte_fallback=True,
                                           hard_vocab_limit=False, character_coverage=1.0, minloglevel=2)
        print(f"== {label}", flush=True)
        out = subprocess.run([sys.executable, str(ROOT / "scripts/check_llamacpp.py"), "--llama-cpp", str(a.llama_cpp),
                              "--model", str(hf), "--pre", pre, "--work", str(a.work / family / "run"), "--n", str(a.n),
                              "--quants", a.quants, "--modes", a.modes, *(f"--convert-arg={c}" for c in convert)],
                             capture_output=True, text=True)
        rows = [ln for ln in out.stdout.splitlines() if "%" in ln or ln.startswith("gguf ")]
        print("\n".join(rows) if rows else out.stderr[-2000:], flush=True)


if __name__ == "__main__":
    main()
