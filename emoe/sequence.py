"""A request as the engine runs it, and how to sample its tokens."""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from .traces import Trace


@dataclass(slots=True)
class SamplingParams:
    max_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    top_k: int = 0                   # 0: off
    min_p: float = 0.0               # drop tokens below min_p × the likeliest one's probability
    presence_penalty: float = 0.0    # OpenAI's: subtracted once from every token already in the output
    frequency_penalty: float = 0.0   # OpenAI's: subtracted per occurrence in the output
    repetition_penalty: float = 1.0  # HF/vLLM's: logits of prompt and output tokens divided (>0) or multiplied
    logprobs: int | None = None      # record each output token's log-probability and this many top alternatives
    prompt_logprobs: int | None = None  # the same for every prompt token after the first (`echo`)
    logit_bias: dict[int, float] | None = None  # OpenAI's: added to these tokens' logits before sampling
    grammar: str | None = None       # structured output: only tokens this grammar allows (emoe.grammar)
    think: tuple[int, int] | None = None  # a thinking model's <think> and </think> ids: its reasoning block, free, before the grammar

    def __post_init__(self):
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0: off), got {self.top_k}")
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                raise ValueError(f"{name} must be in [-2, 2], got {getattr(self, name)}")
        if not 0 < self.repetition_penalty <= 10:
            raise ValueError(f"repetition_penalty must be in (0, 10], got {self.repetition_penalty}")
        for name in ("logprobs", "prompt_logprobs"):
            if getattr(self, name) is not None and not 0 <= getattr(self, name) <= 20:
                raise ValueError(f"{name} must be in [0, 20], got {getattr(self, name)}")
        bad = {t: b for t, b in (self.logit_bias or {}).items()
               if isinstance(t, bool) or not isinstance(t, int) or t < 0 or not -100 <= b <= 100}
        if bad:
            raise ValueError(f"logit_bias takes token ids >= 0 with biases in [-100, 100], got {bad}")
        if self.think is not None and not (len(self.think) == 2 and all(isinstance(t, int) and t >= 0 for t in self.think)
                                           and self.think[0] != self.think[1]):
            raise ValueError(f"think takes two different token ids (<think>, </think>), got {self.think}")

    @property
    def penalised(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty or self.logit_bias) or self.repetition_penalty != 1.0


def penalise(logits: torch.Tensor, p: SamplingParams, prompt_ids: list[int], output_ids: list[int]) -> torch.Tensor:
    """One row's logits with the penalties applied (a copy, in fp32)."""
    logits = logits.float().clone()
    if output_ids and (p.presence_penalty or p.frequency_penalty):
        ids, counts = torch.tensor(output_ids, device=logits.device).unique(return_counts=True)
        logits[ids] -= p.frequency_penalty * counts + p.presence_penalty
    if p.repetition_penalty != 1.0:
        ids = torch.tensor(sorted(set(prompt_ids) | set(output_ids)), dtype=torch.long, device=logits.device)
        v = logits[ids]
        logits[ids] = torch.where(v > 0, v / p.repetition_penalty, v * p.repetition_penalty)
    if p.logit_bias:
        ids = torch.tensor(list(p.logit_bias), dtype=torch.long, device=logits.device)
        logits[ids] += torch.tensor(list(p.logit_bias.values()), device=logits.device)
    return logits


def logprob_entries(logits: torch.Tensor, targets: list[int], n: int) -> list[tuple[float, list[tuple[int, float]]]]:
    """For rows of logits [len(targets), V]: each target's log-probability and the n likeliest alternatives,
    of the model's own distribution (before penalties and sampling cuts)."""
    lp = torch.log_softmax(logits.float(), -1)
    chosen = lp.gather(-1, torch.tensor(targets, device=lp.device)[:, None])[:, 0].tolist()
    if not n:
        return [(c, []) for c in chosen]
    top = lp.topk(n, dim=-1)
    return [(c, list(zip(i, v))) for c, i, v in zip(chosen, top.indices.tolist(), top.values.tolist())]


def sample(logits: torch.Tensor, p: SamplingParams, gen: torch.Generator | None) -> int:
    """A token from one row's logits: greedy at temperature 0, else from the tempered distribution cut by
    top_k, min_p and top_p."""
    if p.temperature == 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float().cpu() / p.temperature, -1)
    if p.top_k and p.top_k < probs.numel():
        probs[probs < probs.topk(p.top_k).values[-1]] = 0
    if p.min_p:
        probs[probs < p.min_p * probs.max()] = 0
    if p.top_p < 1:
        sp, si = probs.sort(descending=True)
        mass = sp.sum() if p.top_k or p.min_p else 1.0  # of what top_k and min_p left
        cut = sp.cumsum(-1) - sp > p.top_p * mass  # drop tokens once the mass before them exceeds top_p
        sp[cut] = 0
        probs = torch.zeros_like(probs).scatter_(0, si, sp)
    return int(torch.multinomial(probs, 1, generator=gen))


@dataclass(slots=True, eq=False)
class Request:
    id: str
    prompt_ids: list[int]
    params: SamplingParams
    task: str | None = None
    slot: int = -1
    prefilled: int = 0  # prompt tokens already in the KV cache
    fed: int = 0        # output tokens fed back (their KV written)
    output_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    trace: Trace | None = None
    arrival: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    # with params.logprobs: per output token, (its log-probability, [(token, log-probability)] of the top ones)
    logprobs: list[tuple[float, list[tuple[int, float]]]] = field(default_factory=list)
    prompt_logprobs: list[tuple[float, list[tuple[int, float]]]] = field(default_factory=list)  # tokens 1..
    finished_at: float | None = None
    gen: torch.Generator | None = None
    constraint: object | None = None  # with params.grammar: its grammar.Constraint

    @property
    def length(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    def add_token(self, tok: int, stop_ids, decode, max_len: int) -> str | None:
        """Take an emitted token; the finish reason it brings, if any. An end-of-sequence token is not part of the
        answer (nor its logprobs)."""
        self.output_ids.append(tok)
        p = self.params
        if tok in stop_ids and not p.ignore_eos:
            self.output_ids.pop()
            del self.logprobs[len(self.output_ids):]
            return "stop"
        if p.stop and any(s in decode(self.output_ids[-16:]) for s in p.stop):
            return "stop"
        if self.constraint is not None and self.constraint.done:  # the grammar's document is complete
            return "stop"
        if len(self.output_ids) >= p.max_tokens or self.length >= max_len:
            return "length"
        return None
