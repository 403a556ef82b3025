"""A GGUF's vocabulary → a `tokenizers.Tokenizer`: byte-level BPE split as the model's own tokenizer splits,
or SentencePiece BPE with byte fallback (llama.cpp's 'gpt2' and 'llama' tokenizer types)."""
from __future__ import annotations

from .gguf_import import GGUFError

# tokenizer.ggml.pre → the split regex(es) of Hugging Face's tokenizer for it (llama.cpp's llama-vocab.cpp)
GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
LLAMA3 = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
IGNORE_MERGES = ("llama-bpe", "glm4", "glm5")  # a word the vocabulary holds whole is one token, merges or not
PRE = {"qwen2": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
                r"|\s+(?!\S)|\s+",
       # Qwen3.5: Qwen2's with combining marks joining letters
       "qwen35": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+",
       "default": GPT2, "gpt-2": GPT2, "olmo": GPT2,
       "llama-bpe": LLAMA3, "glm4": LLAMA3, "glm5": LLAMA3,  # GLM-4.5: Llama 3's rule, merges ignored alike
       "smollm": (r"\p{N}", GPT2),  # digits one by one, then GPT-2's rule (llama.cpp applies them in turn)
       # DeepSeek-V3/R1, Kimi: digits in threes, CJK runs, then words and punctuation (llama-vocab.cpp's list)
       "deepseek-v3": (r"\p{N}{1,3}", r"[一-龥぀-ゟ゠-ヿ]+",
                       r"[!\"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+"
                       r"| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"),
       # DeepSeek-V2/V2-Lite/V2.5, DeepSeek-MoE (and DeepSeek-Coder): llama-vocab.cpp's lists, applied in turn
       "deepseek-llm": ("[\r\n]",
                        "\\s?[A-Za-zµÀ-ÖØ-öø-ƺƼ-ƿǄ-ʓʕ-ʯͰ-ͳͶͷͻ-ͽͿΆΈ-ΊΌΎ-ΡΣ-ϵϷ-ҁҊ-ԯԱ-ՖႠ-ჅᎠ-Ᏽᏸ-ᏽᲐ-ᲺᲽ-Ჿᴀ-ᴫᵫ-ᵷ"
                        "ᵹ-ᶚḀ-ἕἘ-Ἕἠ-ὅὈ-Ὅὐ-ὗὙὛὝὟ-\u1f7dᾀ-ᾴᾶ-ᾼ\u1fbeῂ-ῄῆ-ῌῐ-\u1fd3ῖ-\u1fdbῠ-Ῥῲ-ῴῶ-ῼℂℇℊ-ℓℕℙ-"
                        "ℝℤ\u2126ℨ\u212a-ℭℯ-ℴℹℼ-ℿⅅ-ⅉⅎↃↄⰀ-ⱻⱾ-ⳤⳫ-ⳮⳲⳳꙀ-ꙭꚀ-ꚛꜢ-ꝯꝱ-ꞇꞋ-ꞎꭰ-ꮿﬀ-ﬆﬓ-ﬗＡ-Ｚａ-ｚ𐐀-𐑏𐒰-𐓓𐓘-𐓻"
                        "𐲀-𐲲𐳀-𐳲𑢠-𑣟𞤀-𞥃]+",
                        "\\s?[!-/:-~！-／：-～‘-‟\u3000-。]+", "\\s+$", "[一-龥ࠀ-一가-\ud7ff]+", "\\p{N}+"),
       "deepseek-coder": ("[\r\n]", "\\s?\\p{L}+", "\\s?\\p{P}+", "[一-龥ࠀ-一가-\ud7ff]+", "\\p{N}"),
       # o200k (gpt-oss)
       "gpt-4o": r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
                 r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
                 r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"}
PRE["llama4"] = PRE["gpt-4o"]  # (llama-vocab.cpp: the same pre-type)
# Kimi-K2 (deepseek2 files): o200k's rule with Han runs apart (tokenization_kimi.py's pattern; Oniguruma
# reads its class intersections as tiktoken's regex does)
PRE["kimi-k2"] = (r"[\p{Han}]+|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+"
                  r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+"
                  r"[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE["minimax-m2"] = PRE["gpt-4o"]  # MiniMax-M2: o200k's rule (llama-vocab.cpp treats the two alike)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED = 1, 2, 3, 4  # llama.cpp's token types


def build_tokenizer(m: dict, source: str):
    """A `tokenizers.Tokenizer` from the vocabulary the GGUF carries: byte-level BPE ('gpt2': Qwen, OLMoE, gpt-oss)
    split as the model's own tokenizer splits (tokenizer.ggml.pre), or SentencePiece BPE ('llama':
    Mixtral) with byte fallback, its merges recovered from the pieces' scores as transformers does."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    kind, tokens = m.get("tokenizer.ggml.model"), list(m["tokenizer.ggml.tokens"])
    types = list(m.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens))
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = [tuple(x.split(" ", 1)) for x in m.get("tokenizer.ggml.merges") or []]
    if kind == "gpt2":
        pre = m.get("tokenizer.ggml.pre", "default")
        if pre not in PRE:
            raise GGUFError(f"pre-tokenizer {pre!r} is not supported (known: {sorted(PRE)})")
        tok = Tokenizer(models.BPE(vocab, merges, ignore_merges=pre in IGNORE_MERGES))
        rules = (PRE[pre],) if isinstance(PRE[pre], str) else PRE[pre]
        tok.pre_tokenizer = pre_tokenizers.Sequence([*(pre_tokenizers.Split(Regex(r), "isolated") for r in rules),
                                                     pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        tok.decoder = decoders.ByteLevel()
        special = (CONTROL,)
    elif kind == "llama":
        scores = m.get("tokenizer.ggml.scores")
        if not merges and scores is None:
            raise GGUFError(f"{source}: a SentencePiece vocabulary with neither merges nor scores")
        tok = Tokenizer(models.BPE(vocab, merges or _spm_merges(vocab, dict(zip(tokens, scores))),
                                   fuse_unk=True, byte_fallback=True))
        # as SentencePiece (and Hugging Face's Llama/Mixtral tokenizer.json): every text, and every text after a
        # special token, gets a leading "▁" even where it starts with a space (" Hi" → "▁", "▁Hi")
        spaces = normalizers.Replace(" ", "\u2581")
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), spaces]) \
            if m.get("tokenizer.ggml.add_space_prefix", True) else spaces
        tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])
        special = (UNKNOWN, CONTROL)
    else:
        raise GGUFError(f"tokenizer type {kind!r} is not supported (emoe imports 'gpt2' and 'llama')")
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, k in zip(tokens, types) if k in special])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t, k in zip(tokens, types) if k == USER_DEFINED])
    bos = m.get("tokenizer.ggml.bos_token_id")
    if m.get("tokenizer.ggml.add_bos_token", kind == "llama") and bos is not None:  # llama.cpp's default
        tok.post_processor = processors.TemplateProcessing(single=f"{tokens[bos]} $A", pair=f"{tokens[bos]} $A $B",
                                                           special_tokens=[(tokens[bos], bos)])
    return tok


def _spm_merges(vocab: dict[str, int], scores: dict[str, float]) -> list[tuple[str, str]]:
    """A SentencePiece vocabulary's BPE merges: every split of a piece into two pieces, best score first
    (transformers' generate_merges, which its GGUF reader uses)."""
    merges = []
    for piece, score in scores.items():
        local = [(piece[:i], piece[i:], score) for i in range(1, len(piece)) if piece[:i] in vocab and piece[i:] in vocab]
        merges.extend(sorted(local, key=lambda x: (vocab[x[0]], vocab[x[1]])))
    merges.sort(key=lambda v: (v[2], len(v[0]), len(v[1])), reverse=True)
    return [(a, b) for a, b, _ in merges]
