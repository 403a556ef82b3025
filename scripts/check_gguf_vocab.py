"""emoe's tokenizers built from GGUF vocabularies, against llama.cpp's own tokenizer test vectors.

llama.cpp ships vocabulary-only GGUFs (`models/ggml-vocab-*.gguf`) with inputs (`.inp`, tests separated by
`__ggml_vocab_test__` lines) and the ids each model's Hugging Face tokenizer gave them (`.out`, one line
per test), for its `test-tokenizer-0`. Each file here goes through `emoe.gguf_vocab.build_tokenizer`, as
`emoe import-gguf` builds a model's tokenizer, and every test's ids are compared (no special tokens added,
as llama.cpp's test does). A split rule emoe does not know is reported as refused, not guessed.

    python scripts/check_gguf_vocab.py LLAMA_DIR/models
"""
from __future__ import annotations

import sys
from pathlib import Path

from emoe.gguf_import import GGUFError
from emoe.gguf_vocab import build_tokenizer

SEP = "\n__ggml_vocab_test__\n"


def main() -> None:
    import gguf
    folder = Path(sys.argv[1])
    files = sorted(p for p in folder.glob("ggml-vocab-*.gguf") if p.with_suffix(".gguf.out").is_file())
    if not files:
        sys.exit(f"no ggml-vocab-*.gguf with .inp/.out test vectors in {folder}")
    for path in files:
        r = gguf.GGUFReader(path)
        meta = {k: f.contents() for k, f in r.fields.items() if k.startswith("tokenizer.")}
        kind = f"{meta.get('tokenizer.ggml.model')}/{meta.get('tokenizer.ggml.pre', '-')}"
        try:
            tok = build_tokenizer(meta, path.name)
        except GGUFError as e:
            print(f"{path.name:34} {kind:22} refused: {e}")
            continue
        tests = path.with_suffix(".gguf.inp").read_text(encoding="utf-8").split(SEP)
        want = path.with_suffix(".gguf.out").read_text(encoding="utf-8").split("\n")
        got = [tok.encode(t, add_special_tokens=False).ids for t in tests[: len(want)]]
        same = [g == [int(x) for x in w.split()] for g, w in zip(got, want)]
        first = next((repr(t[:30]) for t, s in zip(tests, same) if not s), "")
        print(f"{path.name:34} {kind:22} {sum(same):3}/{len(same)} tests equal  {first and 'first differing: ' + first}")


if __name__ == "__main__":
    main()
