"""StreamDecoder: a stream's text decoded a few ids a step gives the whole list's decode."""
import random

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from emoe import default_model_dir
from emoe.checkpoint import Checkpoint
from emoe.tokenizer import StreamDecoder, TextCodec


def _byte_level() -> Tokenizer:
    """GPT-2-style byte-level BPE over single bytes: a random id list is random bytes, most of them no UTF-8."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE({c: i for i, c in enumerate(alphabet)}, []))
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    return tok


def _sentencepiece() -> Tokenizer:
    """Llama-style: '▁'-words, <0xNN> byte fallback, the leading space of a decode dropped."""
    pieces = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + ["▁the", "▁cat", "▁", "at", "s", "é"]
    tok = Tokenizer(models.BPE({p: i for i, p in enumerate(pieces)}, [], unk_token="<unk>", byte_fallback=True))
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    return tok


def _check_stream(decode, ids: list[int]) -> None:
    """After every id the text is a prefix of the whole list's decode, never ending in a half character, and
    once the list ends on a whole character it is all of it."""
    full, d = decode(ids), StreamDecoder(decode)
    for n in range(1, len(ids) + 1):
        text = d.add(ids[:n])
        assert full.startswith(text) and not text.endswith("\ufffd")
        if not decode(ids[:n]).endswith("\ufffd"):
            assert text == decode(ids[:n])


@pytest.mark.parametrize("seed", range(4))
def test_a_byte_level_stream_decodes_as_the_whole(seed):
    tok, rng = _byte_level(), random.Random(seed)
    ids = tok.encode("héllo → wörld 😀 日本語 " * 3).ids  # whole characters, cut anywhere by the steps
    assert len(ids) > 60
    _check_stream(tok.decode, ids + [rng.randrange(256) for _ in range(40)])  # and bytes that are no UTF-8


def test_a_sentencepiece_stream_keeps_its_spaces_and_byte_fallback_characters():
    tok = _sentencepiece()
    ids = tok.encode("the cat sats → 😀 été the cat").ids
    assert any(tok.id_to_token(i).startswith("<0x") for i in ids)  # the arrow and the emoji go as bytes
    _check_stream(lambda x: tok.decode(x, skip_special_tokens=True), ids)


def test_the_embedded_models_stream_decodes_as_the_whole():
    ck = Checkpoint(default_model_dir())
    codec = TextCodec(ck.dir, ck.tokenizer_path, ck.config.eos_token_ids)
    ids = codec.encode("Is this review positive? Old rooms — dirty windows, the worst Novotel in Poland… ünïcode 😀")
    _check_stream(codec.decode, ids)


def test_the_chat_template_compiles_once_and_follows_a_new_template(monkeypatch):
    import emoe.tokenizer as tz
    ck = Checkpoint(default_model_dir())
    codec = TextCodec(ck.dir, ck.tokenizer_path, ck.config.eos_token_ids)
    compiled = []
    real = tz._compile
    monkeypatch.setattr(tz, "_compile", lambda t: compiled.append(t) or real(t))
    msgs = [{"role": "user", "content": "Hi"}]
    first = [codec.apply_chat(msgs) for _ in range(3)]
    assert len(compiled) == 1 and len(set(first)) == 1 and "Hi" in first[0]
    codec.template = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}"  # (tests swap templates)
    assert codec.apply_chat(msgs) == "<user>Hi" and len(compiled) == 2
