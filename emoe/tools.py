"""Tool calling in chat completions (OpenAI's `tools`): the tools go into the model's chat template, and the
calls come back out of the answer's text in the format the model was trained to write them.

One format is parsed: Hermes-style `<tool_call>{"name": …, "arguments": {…}}</tool_call>` blocks, which
Qwen2.5, Qwen3, QwQ and the Hermes models write (vLLM's `hermes` parser). `serve --tool-call-parser auto`
picks it when the chat template writes that tag; a request with tools to a model whose format emoe does
not parse is refused rather than answered with the call left in the text.
"""
from __future__ import annotations

import json
import re
import uuid


class ToolError(ValueError):
    """A request's tools or tool_choice that cannot be served (the server answers 400)."""


class Hermes:
    name = "hermes"
    start = "<tool_call>"
    end = "</tool_call>"
    _block = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.S)

    def parse(self, text: str) -> tuple[str | None, list[dict]]:
        """(content before the first call, or None; the calls in OpenAI's shape). Text with a block that is
        not a well-formed call comes back whole as content, with no calls."""
        i = text.find(self.start)
        if i < 0:
            return text, []
        calls = []
        for m in self._block.finditer(text, i):
            try:
                obj = json.loads(m.group(1))
            except json.JSONDecodeError:
                return text, []
            if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
                return text, []
            args = obj.get("arguments", obj.get("parameters", {}))
            calls.append({"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                          "function": {"name": obj["name"], "arguments": args if isinstance(args, str)
                                       else json.dumps(args, ensure_ascii=False)}})
        return (text[:i] if text[:i].strip() else None), calls

    def call_grammar(self, tools: list[dict]) -> str:
        """An llguidance Lark grammar for an answer that is one call of one of these tools: a block holding the
        function's name and arguments of its `parameters` schema (emoe.grammar's JSON layout). One call, not a
        run of them: a model held to a grammar that allows another block may keep adding blocks to max_tokens."""
        from .grammar import JSON_LAYOUT
        calls = [f'call{i}: %json ' + json.dumps(
            {"type": "object", "properties": {"name": {"const": t["function"]["name"]},
                                              "arguments": t["function"].get("parameters") or {"type": "object"}},
             "required": ["name", "arguments"], "additionalProperties": False, "x-guidance": JSON_LAYOUT})
            for i, t in enumerate(tools)]
        either = " | ".join(f"call{i}" for i in range(len(tools)))
        return "\n".join(['start: block',
                          f'block: {json.dumps(self.start + chr(10))} ({either}) {json.dumps(chr(10) + self.end)}', *calls])


PARSERS = {"hermes": Hermes}


def parser_for(name: str, template: str | None):
    """The parser `serve --tool-call-parser` names; auto: by the chat template's own tag; none: no tools."""
    if name == "none":
        return None
    if name == "auto":
        return Hermes() if template and Hermes.start in template else None
    if name not in PARSERS:
        raise ValueError(f"unknown tool-call parser {name!r}; choose auto, none or one of {sorted(PARSERS)}")
    return PARSERS[name]()


def check_tools(tools: list | None, tool_choice, parser) -> list[dict] | None:
    """The tools to render, or None (no tools, or tool_choice 'none'); ToolError for what cannot be served."""
    if not tools or tool_choice == "none":
        return None
    for k, t in enumerate(tools):
        f = t.get("function") if isinstance(t, dict) else None
        if not isinstance(t, dict) or t.get("type", "function") != "function" or not isinstance(f, dict) \
                or not isinstance(f.get("name"), str) or not f["name"]:
            raise ToolError(f"tools[{k}] must be {{'type': 'function', 'function': {{'name': …, 'parameters': …}}}}")
    if tool_choice not in (None, "auto", "required") and _named(tool_choice) is None:
        raise ToolError(f"tool_choice must be 'auto', 'none', 'required' or {{'type': 'function', 'function': "
                        f"{{'name': …}}}}, got {tool_choice!r}")
    if parser is None:
        raise ToolError("this model's chat template writes no tool-call format emoe parses (Hermes "
                        "<tool_call> blocks); serve with --tool-call-parser hermes if it does")
    return tools


def _named(tool_choice) -> str | None:
    if isinstance(tool_choice, dict) and tool_choice.get("type", "function") == "function" \
            and isinstance(tool_choice.get("function"), dict) and isinstance(tool_choice["function"].get("name"), str):
        return tool_choice["function"]["name"]
    return None


def forced_calls(tools: list[dict] | None, tool_choice, parser) -> str | None:
    """For tool_choice 'required' (some tool) or a named function (that one): the grammar the answer is held to,
    so the model calls it whatever it would have written (structured output, emoe.grammar); None otherwise. A
    name that is not among the tools, or a tool whose parameters schema does not compile, is a ToolError."""
    name = _named(tool_choice)
    if not tools or parser is None or (tool_choice != "required" and name is None):
        return None
    chosen = tools if name is None else [t for t in tools if t["function"]["name"] == name]
    if not chosen:
        raise ToolError(f"tool_choice names {name!r}, which is not among the tools")
    from .grammar import GrammarError, lark
    try:
        return lark(parser.call_grammar(chosen))
    except GrammarError as e:
        raise ToolError(f"a tool's parameters schema does not compile: {e}") from None


def template_messages(messages: list[dict]) -> list[dict]:
    """OpenAI messages as chat templates read them: an assistant's tool-call arguments as objects (they
    arrive as JSON strings; templates write them with tojson), tool results with their call id and name."""
    out = []
    for m in messages:
        m = dict(m)
        if m.get("tool_calls"):
            calls = []
            for c in m["tool_calls"]:
                c = json.loads(json.dumps(c))  # a copy, whatever the client nested
                fn = c.get("function") or {}
                if isinstance(fn.get("arguments"), str):
                    try:
                        fn["arguments"] = json.loads(fn["arguments"])
                    except json.JSONDecodeError:
                        pass  # left as the string it is
                calls.append(c)
            m["tool_calls"] = calls
        out.append(m)
    return out


class ToolStream:
    """A streamed answer: text goes out until a tool call starts (a tail that could begin the tag is held
    back), the rest is held and parsed at the end."""

    def __init__(self, parser):
        self.parser, self.buf, self.sent, self.held = parser, "", 0, False

    def feed(self, text: str) -> str:
        """The content to send now."""
        self.buf += text
        if self.held:
            return ""
        i = self.buf.find(self.parser.start)
        if i >= 0:
            self.held = True
            out, self.sent = self.buf[self.sent:i], i
            return out
        tag = self.parser.start
        keep = max((k for k in range(1, len(tag)) if self.buf.endswith(tag[:k])), default=0)
        out, self.sent = self.buf[self.sent:len(self.buf) - keep], len(self.buf) - keep
        return out

    def finish(self) -> tuple[str, list[dict]]:
        """(content not yet sent, the calls). A held block that is not a well-formed call goes out as text."""
        _, calls = self.parser.parse(self.buf)
        rest = self.buf[self.sent:]
        return ("" if calls else rest), calls
