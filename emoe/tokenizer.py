"""tokenizer.json through the `tokenizers` library, plus the checkpoint's chat template (jinja2)."""
from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer


class TextCodec:
    def __init__(self, directory: Path, tokenizer_path: Path, eos_ids: tuple[int, ...]):
        self.tok = Tokenizer.from_file(str(tokenizer_path))
        cfg_path = directory / "tokenizer_config.json"
        self.cfg = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
        gen_path = directory / "generation_config.json"
        gen = json.loads(gen_path.read_text()) if gen_path.is_file() else {}
        stop = set(eos_ids)
        for src in (gen.get("eos_token_id"),):
            stop |= set(src if isinstance(src, list) else [src] if src is not None else [])
        for name in ("eos_token",):
            tid = self.tok.token_to_id(self._token_str(self.cfg.get(name)) or "")
            if tid is not None:
                stop.add(tid)
        self.stop_ids = frozenset(stop)
        self.template = self.cfg.get("chat_template")
        if isinstance(self.template, list):  # list of named templates: take the default
            self.template = next((t["template"] for t in self.template if t.get("name") == "default"), None)
        jinja = directory / "chat_template.jinja"  # where transformers ≥ 4.43 saves it (GLM-4.5, recent Qwen)
        if not self.template and jinja.is_file():
            self.template = jinja.read_text()
        self._compiled = (None, None)  # (template, its compiled form)

    @staticmethod
    def _token_str(v) -> str | None:
        return v.get("content") if isinstance(v, dict) else v

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size()

    def encode(self, text: str, add_special: bool = False) -> list[int]:
        return self.tok.encode(text, add_special_tokens=add_special).ids

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)

    def apply_chat(self, messages: list[dict], tools: list[dict] | None = None, kwargs: dict | None = None) -> str:
        """Render messages (and tools, for templates that take them) with the checkpoint's template; kwargs:
        the template's own switches (vLLM's chat_template_kwargs, e.g. Qwen3's enable_thinking). Without a
        template, plain role-prefixed text."""
        if not self.template:
            return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"
        if self._compiled[0] is not self.template:  # compiling costs ~3 ms: once per template, not per request
            self._compiled = (self.template, _compile(self.template))
        extra = {**(kwargs or {}), **({"tools": tools} if tools else {})}  # templates test `tools is defined`
        return self._compiled[1].render(
            messages=messages, add_generation_prompt=True, **extra,
            bos_token=self._token_str(self.cfg.get("bos_token")) or "",
            eos_token=self._token_str(self.cfg.get("eos_token")) or "")


def _compile(template: str):
    """The template under the sandbox transformers renders with: immutable, with its helpers; what varies per
    render (the clock for strftime_now) is read at render time, so one compiled template serves every request."""
    from datetime import datetime

    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.globals["raise_exception"] = lambda msg: (_ for _ in ()).throw(ValueError(msg))
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)  # gpt-oss, Llama-style templates
    env.filters["tojson"] = lambda x, ensure_ascii=False, indent=None, separators=None, sort_keys=False: json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)  # no HTML escaping
    return env.from_string(template)


class StreamDecoder:
    """The text of a growing list of token ids, decoding only the ids since the last step that completed a
    character, as vLLM detokenises (decoding the whole list each step costs O(length) a step: 0.33 ms at 4,000
    tokens here, per stream, holding the GIL). Text that ends in U+FFFD (bytes of a character still arriving)
    waits for the next token; only a window's leading piece can decode differently than inside the whole list
    (SentencePiece drops its leading space), and both decodes of a window drop it alike."""
    __slots__ = ("decode", "text", "_prefix", "_read")

    def __init__(self, decode):
        self.decode, self.text, self._prefix, self._read = decode, "", 0, 0

    def add(self, ids: list[int]) -> str:
        """ids: the whole list so far (only its tail is decoded). Returns the text so far."""
        before = self.decode(ids[self._prefix: self._read]) if self._read > self._prefix else ""
        after = self.decode(ids[self._prefix:])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.text += after[len(before):]
            self._prefix, self._read = self._read, len(ids)
        return self.text
