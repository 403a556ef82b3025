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

    def __post_init__(self):
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


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
    finished_at: float | None = None
    gen: torch.Generator | None = None

    @property
    def length(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)
