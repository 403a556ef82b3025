"""emoe's tokenizers built from GGUF vocabularies, against llama.cpp's own tokenizer test vectors.

llama.cpp ships vocabulary-only GGUFs (`models/ggml-vocab-*.gguf`) with inputs (`.inp`, tests separated by
`__ggml_vocab_test__` lines) and the ids each model's Hugging Face tokenizer gave them (`.out`, one line
per test), for its `test-tokenizer-0`. Each file here goes through `emoe.gguf_vocab.build_tokenizer`, as
`emoe import-gguf` builds a model's tokenizer, and every test's ids are compared (no special tokens added,
as llama.cpp's test does). A split rule emoe does not know is reported as refused, not guessed.

    python scripts/check_gguf_vocab.py LLAMA_DIR/models

Split rules without test vectors (kimi-k2, glm4, minimax-m2, deepseek-v3, …) are checked against llama.cpp's
implementation instead: `--server LLAMA_DIR FILE.gguf …` tokenizes a fixed set of texts (scripts, cases,
contractions, digits, whitespace, and test-split prompts) with llama-server's /tokenize and with emoe's
tokenizer for each file, e.g. the embedded model converted with its split rule forced to each name
(`scripts/check_llamacpp.py`'s CONVERT with --pre NAME).
"""
from __future__ import annotations

import sys
from pathlib import Path

from emoe.gguf_import import GGUFError
from emoe.gguf_vocab import build_tokenizer

SEP = "\n__ggml_vocab_test__\n"


TEXTS = ["Hello WORLD it's 12345 中文字符mixed日本語 CamelCase", "I'LL go, you'Re late!!\n\n  indented\ttab",
         "東京タワーは333メートル。Tokyo Tower is 333m tall.", "émigré naïve CAFÉ Ωmega ΣΙΓΜΑ straße",
         "x = f(a_b, c-d) // comment\r\nnext", "   ", "a\u0301bc def\u0300", "🦙 llama.cpp ✓ 100% 1234567",
         "한국어 텍스트와 English", "don't DON'T Don't 3.14159 $1,000.00", "line\n\n\nbreaks  \n  here"]


def tokenizer_of(path: Path):
    import gguf
    meta = {k: f.contents() for k, f in gguf.GGUFReader(path).fields.items() if k.startswith("tokenizer.")}
    return meta, build_tokenizer(meta, path.name)


def against_server(llama: Path, files: list[Path]) -> None:
    sys.path.insert(0, str(Path(__file__).parent))
    from check_llamacpp import llama_server, post
    from emoe.datasets import load_split
    texts = TEXTS + [e.prompt for e in load_split("test")[:40]]
    for i, path in enumerate(files):
        meta, tok = tokenizer_of(path)
        with llama_server(llama, path, 8097 + i, 2, 1024):
            same = [post(8097 + i, "/tokenize", {"content": t, "add_special": False, "parse_special": False})["tokens"]
                    == tok.encode(t, add_special_tokens=False).ids for t in texts]
        first = next((repr(t[:30]) for t, ok in zip(texts, same) if not ok), "")
        print(f"{path.name:34} {meta.get('tokenizer.ggml.pre', '-'):14} {sum(same):3}/{len(same)} texts as llama-server "
              f"tokenizes them  {first and 'first differing: ' + first}")


def main() -> None:
    import gguf
    if sys.argv[1] == "--server":
        return against_server(Path(sys.argv[2]), [Path(f) for f in sys.argv[3:]])
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
