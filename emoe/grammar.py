"""Structured output: OpenAI's `response_format` (json_object, json_schema), vLLM's guided_json / guided_regex /
guided_choice / guided_grammar and llama-server's grammar (GBNF) / json_schema as grammars, and a per-request
constraint that masks each step's logits to the tokens the grammar allows there.

llguidance (the grammar engine vLLM and llama.cpp use for this) compiles the grammar and computes each step's
token mask from the model's own tokenizer.json: 0.12-0.16 ms a mask on the embedded model, with its unpacking
(docs/results/structured_output.txt). The mask applies to sampling only: logprobs stay the model's own.
"""
from __future__ import annotations

import json

import numpy as np
import torch


class GrammarError(ValueError):
    """A response format, schema, regex or choice list that cannot be compiled (the server's 400)."""


def _llg():
    import llguidance  # (0.1 s to import: paid by the first request with a rule, not by every start)
    return llguidance


def _checked(grammar: str, what: str) -> str:
    is_error, messages = _llg().LLMatcher.validate_grammar_with_warnings(grammar)
    if is_error:
        raise GrammarError(f"{what}: {messages[0] if messages else 'invalid'}")
    return grammar


# one space after ',' and ':', none elsewhere (Python's json.dumps layout, common in what models learn from): with
# whitespace free, a small model wanders in newlines and spaces. A schema's own "x-guidance" options win.
JSON_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def json_schema(schema) -> str:
    """A grammar for JSON documents matching `schema` (a dict or its JSON text)."""
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as e:
            raise GrammarError(f"the JSON schema is not valid JSON: {e}") from None
    if not isinstance(schema, dict):
        raise GrammarError(f"a JSON schema must be an object, got {type(schema).__name__}")
    try:
        compiled = _llg().LLMatcher.grammar_from_json_schema(schema, defaults=JSON_LAYOUT)
    except ValueError as e:
        raise GrammarError(f"JSON schema: {e}") from None
    return _checked(compiled, "JSON schema")


def response_format(fmt: dict | None) -> str | None:
    """OpenAI's response_format → a grammar, or None for free text ({"type": "text"} or none given)."""
    if fmt is None:
        return None
    if not isinstance(fmt, dict):
        raise GrammarError("response_format must be an object")
    kind = fmt.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return json_schema({"type": "object"})
    if kind == "json_schema":
        spec = fmt.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict):
            raise GrammarError("response_format json_schema needs {'json_schema': {'name': ..., 'schema': {...}}}")
        return json_schema(spec.get("schema", {}))  # OpenAI: an absent schema allows any JSON value
    raise GrammarError(f"response_format type must be text, json_object or json_schema, got {kind!r}")


def lark(text: str) -> str:
    """An llguidance Lark grammar (JSON schemas inline as `%json {...}`), checked."""
    return _checked(_llg().LLMatcher.grammar_from_lark(text), "grammar")


def cfg(text: str) -> str:
    """A context-free grammar in GBNF (llama.cpp's, as llama-server's `grammar` takes it) or Lark (vLLM's
    guided_grammar), checked."""
    if not isinstance(text, str) or not text.strip():
        raise GrammarError("a grammar must be non-empty text (GBNF or Lark)")
    try:
        return _checked(_llg().grammar_from("grammar", text), "grammar")
    except GrammarError:
        raise
    except ValueError as e:
        raise GrammarError(f"grammar: {e}") from None


def regex(pattern: str) -> str:
    if not isinstance(pattern, str) or not pattern:
        raise GrammarError("guided_regex must be a non-empty string")
    return _checked(_llg().LLMatcher.grammar_from_regex(pattern), "guided_regex")


def choice(options: list) -> str:
    if not isinstance(options, list) or not options or not all(isinstance(o, str) and o for o in options):
        raise GrammarError("guided_choice must be a non-empty list of non-empty strings")
    return _checked(_llg().grammar_from("choice", json.dumps(options)), "guided_choice")


def tokenizer(tokenizer_json: str, vocab_size: int, eos: list[int]):
    """The model's tokenizer as llguidance reads it (about a second for a 150k vocabulary: build it once). End
    ids past the tokenizer's own vocabulary (a model's padded rows) are left to the grammar's end instead."""
    from tokenizers import Tokenizer
    n = Tokenizer.from_str(tokenizer_json).get_vocab_size(with_added_tokens=True)
    return _llg().LLTokenizer(tokenizer_json, n_vocab=max(vocab_size, n), eos_token=[t for t in eos if t < n] or None)


def think_phase(prompt_ids: list[int], think: tuple[int, int]) -> str:
    """Where a thinking model's answer starts, from the prompt's last tokens: inside a reasoning block the chat
    template opened (DeepSeek-R1's: "reasoning"), after one it opened and closed (Qwen3's enable_thinking=false:
    "grammar", no reasoning), or where it may open one itself (Qwen3's default: "open")."""
    tail = prompt_ids[-6:]
    if think[0] not in tail:
        return "open"
    return "grammar" if think[1] in tail[len(tail) - 1 - tail[::-1].index(think[0]):] else "reasoning"


class Constraint:
    """One request's grammar state: its rows' masks before each token is chosen (mask_rows), advance(token) after.
    With think (a thinking model's <think> and </think> ids, serve's reasoning parser on), the grammar holds the
    answer after its reasoning block, as vLLM's reasoning-aware structured output does: a first token may open the
    block ("open"), and inside it ("reasoning") every token is allowed until </think>. Without it, a schema or a
    forced tool call would forbid <think> at the first token, and a thinking model would answer without reasoning."""
    __slots__ = ("matcher", "vocab", "words", "think", "phase")

    def __init__(self, tok, grammar: str, vocab: int, think: tuple[int, int] | None = None, phase: str = "grammar"):
        self.matcher, self.vocab = _llg().LLMatcher(tok, grammar, log_level=0), vocab
        self.words = (tok.vocab_size + 31) // 32  # the mask's 32-bit words
        if self.matcher.is_error():
            raise GrammarError(self.matcher.get_error())
        if phase not in ("grammar", "open", "reasoning") or (phase != "grammar" and think is None):
            raise ValueError(f"phase {phase!r} needs think ids and is one of grammar, open, reasoning")
        self.think, self.phase = think, phase

    def mask(self, logits: torch.Tensor) -> torch.Tensor:
        """A float32 copy of one row's logits with every token the grammar forbids here at -inf."""
        return mask_rows([self], logits[None])[0]

    def advance(self, token: int) -> None:
        if self.phase == "reasoning":
            if token == self.think[1]:
                self.phase = "grammar"
            return
        if self.phase == "open":
            self.phase = "reasoning" if token == self.think[0] else "grammar"
            if self.phase == "reasoning":
                return
        if not self.matcher.consume_token(token):
            raise GrammarError(f"token {token} broke the grammar: {self.matcher.get_error()}")

    @property
    def done(self) -> bool:
        """The grammar is complete and allows nothing more (end of sequence only)."""
        return self.matcher.is_stopped()


def mask_rows(constraints: list[Constraint], logits: torch.Tensor) -> torch.Tensor:
    """Float32 copies of a step's rows of logits [n, V], each with what its request's grammar forbids at -inf:
    the bit masks written into one buffer, then unpacked and applied once for all rows (that, not llguidance,
    was most of a row's cost). One thread: llguidance's thread pool waited behind torch's spinning OpenMP
    threads and made a 4-row step's masks slower (scripts/bench_grammar.py)."""
    n, words = len(constraints), max(c.words for c in constraints)
    buf = np.zeros((n, words), dtype=np.int32)
    for i, c in enumerate(constraints):
        if c.phase != "reasoning":
            c.matcher.unsafe_compute_mask_ptr(buf[i].ctypes.data, c.words * 4)
    bits = np.unpackbits(buf.view(np.uint8), axis=1, bitorder="little")
    allowed = np.zeros((n, logits.shape[-1]), dtype=bool)  # ids past the tokenizer's (a padded embedding): none
    for i, c in enumerate(constraints):
        k = max(0, min(bits.shape[1], c.vocab, allowed.shape[1]))
        allowed[i, :k] = bits[i, :k]
        if c.phase == "reasoning":  # inside a reasoning block: the model's own tokens, up to its vocabulary
            allowed[i, :min(c.vocab, allowed.shape[1])] = True
        elif c.phase == "open" and c.think[0] < allowed.shape[1]:
            allowed[i, c.think[0]] = True
    return logits.float().masked_fill(~torch.from_numpy(allowed).to(logits.device), float("-inf"))
