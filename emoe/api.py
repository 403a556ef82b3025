"""The OpenAI API's side of `emoe serve`: request bodies (extra fields a client may send are accepted and
ignored), their limits, and the OpenAI-style error. server.py turns them into engine jobs."""
from __future__ import annotations

from typing import Literal

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _error(status: int, message: str, type_: str, param=None, code=None) -> JSONResponse:
    return JSONResponse(APIError(status, message, type_, param, code).body(), status_code=status)


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Common(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None            # vLLM's extensions: top_k, min_p, repetition_penalty
    min_p: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    logit_bias: dict[str, float] | None = None  # OpenAI's: token id (as a string) → bias in [-100, 100]
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1
    ignore_eos: bool = False          # vLLM's extension: benchmarks ask for exact output lengths
    response_format: dict | None = None  # OpenAI's structured output: {"type": "json_object"} or "json_schema"
    guided_json: dict | str | None = None  # vLLM's: a JSON schema, a regex, or a list of choices (emoe.grammar)
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None     # vLLM's: a context-free grammar (Lark, or GBNF)
    grammar: str | None = None            # llama-server's: GBNF
    json_schema: dict | None = None       # llama-server's: a JSON schema
    task: str | None = None
    ttft_ms: float | None = Field(None, gt=0)
    tpot_ms: float | None = Field(None, gt=0)


MAX_PROMPTS = 64  # prompts in one completions request (lm-eval-harness batches several)
MAX_N = 16  # answers per prompt


class CompletionRequest(_Common):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = Field(None, ge=0, le=20)  # each output token's and this many alternatives'
    echo: bool = False                               # the prompt comes back too (with its logprobs)


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[ContentPart] | None = None


class ChatRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    tools: list[dict] | None = None                 # rendered by the chat template; calls parsed (tools.py)
    tool_choice: str | dict | None = None
    chat_template_kwargs: dict | None = None        # vLLM's: the template's own switches (enable_thinking)
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    prompt: str | None = None
    messages: list[ChatMessage] | None = None  # rendered through the chat template
    tools: list[dict] | None = None
    chat_template_kwargs: dict | None = None


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    tokens: list[int]


def template_kwargs(body) -> dict | None:
    """A request's chat_template_kwargs, refused where they would set what the server renders itself."""
    kw = getattr(body, "chat_template_kwargs", None)
    taken = sorted(set(kw or {}) & {"messages", "tools", "add_generation_prompt", "bos_token", "eos_token"})
    if taken:
        raise APIError(400, f"chat_template_kwargs may not set {taken}", param="chat_template_kwargs")
    return kw


def token_biases(bias: dict[str, float]) -> dict[int, float]:
    """OpenAI's logit_bias keys are token ids written as strings."""
    try:
        return {int(k): float(v) for k, v in bias.items()}
    except ValueError:
        raise APIError(400, f"logit_bias keys must be token ids, got {sorted(bias)[:4]}", param="logit_bias") from None


GUIDES = ("response_format", "guided_json", "guided_regex", "guided_choice", "guided_grammar", "grammar", "json_schema")


def guided(body) -> str | None:
    """A request's structured-output rule (OpenAI's response_format, vLLM's guided_*, llama-server's grammar or
    json_schema) compiled to a grammar (emoe.grammar), or None for free text; more than one rule is refused."""
    from . import grammar
    given = {k: v for k in GUIDES if (v := getattr(body, k)) is not None
             and not (k == "response_format" and isinstance(v, dict) and v.get("type") == "text")}
    if len(given) > 1:
        raise APIError(400, f"give one structured-output rule, got {sorted(given)}", param=sorted(given)[1])
    if not given:
        return None
    (name, value), = given.items()
    compile_ = {"response_format": grammar.response_format, "guided_json": grammar.json_schema,
                "guided_regex": grammar.regex, "guided_choice": grammar.choice, "guided_grammar": grammar.cfg,
                "grammar": grammar.cfg, "json_schema": grammar.json_schema}[name]
    try:
        return compile_(value)
    except grammar.GrammarError as e:
        raise APIError(400, str(e), param=name) from None


def template_message(m: ChatMessage) -> dict:
    """A message as the chat template reads it: role and text, and an assistant's tool_calls or a tool
    result's tool_call_id and name where the client sent them."""
    d = {"role": m.role, "content": _text_of(m)}
    for k in ("tool_calls", "tool_call_id", "name"):
        v = getattr(m, k, None)
        if v is not None:
            d[k] = v
    return d


def _text_of(m: ChatMessage) -> str:
    if m.content is None or isinstance(m.content, str):
        return m.content or ""
    bad = [p.type for p in m.content if p.type != "text"]
    if bad:
        raise APIError(400, f"unsupported content part type {bad[0]!r}; only 'text' is supported", param="messages")
    return "".join(p.text or "" for p in m.content)
