"""One random Qwen3-MoE model written twice: as a bf16 safetensors folder, and as a GGUF (experts gate/up
Q4_0, down Q8_0, dense Q8_0: the same weights quantised by gguf-py) imported with `emoe import-gguf`. For
`emoe bench memory` side by side on both. `--k-quants` writes Q4_K/Q4_K/Q6_K experts instead, as llama.cpp's
Q4_K_M lays them out; gguf-py cannot make K-quants, so those blocks are random and the two models' weights
(and routing) then differ.

    python scripts/make_gguf_pair.py --out runs/gguf-pair --hidden 1024 --inter 768 --layers 8 --experts 32
    emoe bench memory --model runs/gguf-pair/hf --experts-on ram --budgets 1.0,0.4 --miss-policy load,auto
    emoe bench memory --model runs/gguf-pair/imported --experts-on ram --budgets 1.0,0.4 --miss-policy load,auto
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the fixtures' HF → GGUF writer
from gguf_writer import write_gguf  # noqa: E402
from tiny import make_tiny  # noqa: E402

from emoe.gguf_import import import_gguf  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--inter", type=int, default=768)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--experts", type=int, default=32)
    ap.add_argument("--top-k", type=int, default=4)
    ap.add_argument("--k-quants", action="store_true")
    a = ap.parse_args()
    out = Path(a.out)
    hf = make_tiny("qwen3_moe", out / "hf", hidden_size=a.hidden, moe_intermediate_size=a.inter,
                   num_hidden_layers=a.layers, num_experts=a.experts, num_experts_per_tok=a.top_k,
                   num_attention_heads=max(1, a.hidden // 64), num_key_value_heads=max(1, a.hidden // 256),
                   intermediate_size=a.inter * 4)
    for f in hf.glob("*.safetensors"):  # bf16, as Qwen3-MoE is released
        sd = load_file(str(f))
        save_file({k: v.to(torch.bfloat16) for k, v in sd.items()}, str(f), metadata={"format": "pt"})
    types = ("Q4_K", "Q4_K", "Q6_K") if a.k_quants else ("Q4_0", "Q4_0", "Q8_0")
    gguf = write_gguf(hf, out / f"model-{'Q4_K_M' if a.k_quants else 'Q4_0'}.gguf", expert_types=types,
                      dense_type="Q8_0")
    imported = import_gguf(gguf, out / ("imported-k" if a.k_quants else "imported"))
    size = lambda p: sum(f.stat().st_size for f in p.glob("*.safetensors")) / 2**20  # noqa: E731
    print(f"{hf}: {size(hf):.0f} MiB safetensors; {gguf}: {gguf.stat().st_size / 2**20:.0f} MiB; "
          f"{imported}: {size(imported):.0f} MiB dense")


if __name__ == "__main__":
    main()
