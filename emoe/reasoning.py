"""A thinking model's reasoning, split from its answer: `<think>…</think>` (Qwen3, QwQ, DeepSeek-R1 and its
distills) goes to the chat message's `reasoning_content` (vLLM's and DeepSeek's field), the rest to `content`.

The answer is reasoning from its start when it opens with `<think>`, or when the chat template opened the
block in the prompt (DeepSeek-R1's does); otherwise it has no reasoning (Qwen3 with enable_thinking=false
gets an empty block in the prompt) and is all content. A block cut short by max_tokens is all reasoning.
"""
from __future__ import annotations

from .tools import ToolStream

START, END = "<think>", "</think>"


def parser_for(name: str, template: str | None) -> "Think | None":
    """`serve --reasoning-parser`: think, none, or auto (think when the chat template writes </think>)."""
    if name == "none":
        return None
    if name == "auto":
        return Think() if template and END in template else None
    if name != "think":
        raise ValueError(f"unknown reasoning parser {name!r}; choose auto, think or none")
    return Think()


def _held(buf: str, tag: str) -> int:
    """How many trailing characters of buf could begin tag (held back from a stream until they cannot)."""
    return max((k for k in range(1, len(tag)) if buf.endswith(tag[:k])), default=0)


class Think:
    @staticmethod
    def token_ids(tok) -> tuple[int, int] | None:
        """<think> and </think> as this tokenizer's (tokenizers.Tokenizer) single tokens, as thinking models have
        them; None where they are not: structured output then starts at the first token (grammar.Constraint)."""
        ids = tuple(tok.token_to_id(t) for t in (START, END))
        return None if None in ids else ids

    def opened(self, prompt_tail: str) -> bool:
        """Whether the rendered prompt leaves the answer inside a reasoning block."""
        return prompt_tail.rstrip().endswith(START)

    def split(self, text: str, opened: bool = False) -> tuple[str | None, str | None]:
        """(reasoning, content), either None when empty."""
        body = text.lstrip()
        if body.startswith(START):
            body, opened = body[len(START):], True
        if not opened:
            return None, text or None
        i = body.find(END)
        reasoning, content = (body, "") if i < 0 else (body[:i], body[i + len(END):])
        return reasoning.strip("\n") or None, content.lstrip("\n") or None


class ThinkStream:
    """A streamed answer cut into (reasoning, content) deltas as it arrives. A tail that could begin a tag
    is held back until it cannot; the newlines that open the reasoning and follow </think> are dropped."""

    def __init__(self, opened: bool):
        self.buf, self.sent, self._started = "", 0, False
        self.state = "reasoning" if opened else "start"  # start: not yet known whether a block opens

    def feed(self, text: str) -> tuple[str, str]:
        self.buf += text
        reasoning = content = ""
        if self.state == "start":
            body = self.buf.lstrip()
            if body.startswith(START):
                self.state, self.sent = "reasoning", len(self.buf) - len(body) + len(START)
            elif START.startswith(body):
                return "", ""  # still may be the opening tag
            else:
                self.state = "content"
        if self.state == "reasoning":
            i = self.buf.find(END, self.sent)
            end = i if i >= 0 else len(self.buf) - _held(self.buf, END)
            reasoning, self.sent = self.buf[self.sent:end], end
            if i < 0:
                return self._lead(reasoning), ""
            self.sent, self.state = i + len(END), "after"
            reasoning = self._lead(reasoning)
        if self.state == "after":  # newlines right after </think> are not content
            rest = self.buf[self.sent:]
            if not rest.strip("\n"):
                self.sent = len(self.buf)
                return reasoning, ""
            self.sent += len(rest) - len(rest.lstrip("\n"))
            self.state = "content"
        if self.state == "content":
            content, self.sent = self.buf[self.sent:], len(self.buf)
        return reasoning, content

    def _lead(self, reasoning: str) -> str:
        """Drops the newlines that open the reasoning (until some reasoning text has gone out)."""
        if not self._started:
            reasoning = reasoning.lstrip("\n")
            self._started = bool(reasoning)
        return reasoning

    def finish(self) -> tuple[str, str]:
        """What is still held: the tail of an unterminated block, or text that only looked like a tag."""
        rest, self.sent = self.buf[self.sent:], len(self.buf)
        if self.state == "reasoning":
            return self._lead(rest), ""
        return "", rest if self.state in ("start", "content") else ""


class ChatAnswer:
    """One chat answer's text shaped into OpenAI's message (or stream deltas): reasoning split off first
    (reasoner: Think or None), then tool calls out of the content (parser: tools.Hermes, with tools given)."""

    def __init__(self, reasoner: "Think | None", parser, tools, prompt_tail: str):
        self.opened = reasoner is not None and reasoner.opened(prompt_tail)
        self.reasoner, self.parser = reasoner, parser if tools else None
        self.think = ThinkStream(self.opened) if reasoner is not None else None
        self.held = ToolStream(self.parser) if self.parser is not None else None

    def message(self, text: str, reason: str) -> tuple[dict, str]:
        reasoning, content = self.reasoner.split(text, self.opened) if self.reasoner else (None, text)
        calls = []
        if self.parser is not None:
            content, calls = self.parser.parse(content or "")
        msg = {"role": "assistant", "content": content if self.reasoner is None or content else None}
        if reasoning:
            msg["reasoning_content"] = reasoning
        if calls:
            msg["tool_calls"] = calls
        return msg, "tool_calls" if calls and reason == "stop" else reason

    def delta(self, text: str | None, reason: str | None) -> tuple[dict, str | None]:
        """The delta for one streamed piece (reason: set on the last)."""
        reasoning, content = "", text or ""
        if self.think is not None:
            reasoning, content = self.think.feed(content) if content else ("", "")
            if reason is not None:
                r, c = self.think.finish()
                reasoning, content = reasoning + r, content + c
        calls = []
        if self.held is not None:
            content = self.held.feed(content) if content else ""
            if reason is not None:
                rest, calls = self.held.finish()
                content += rest
        d = {}
        if reasoning:
            d["reasoning_content"] = reasoning
        if content:
            d["content"] = content
        if calls:
            d["tool_calls"] = [{"index": k, **c} for k, c in enumerate(calls)]
            reason = "tool_calls" if reason == "stop" else reason
        return d, reason
