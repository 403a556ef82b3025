"""Routing traces: per request and MoE layer, how many tokens the router sent to each expert.

Prefill and decode are kept apart (answers use experts that prompts do not). What is recorded is the
router's *wanted* top-k, before any miss policy rewrites it: that is the predictor's target.
Off by default and free when off: the engine holds `None` instead of a recorder.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch


@dataclass(slots=True)
class Trace:
    request_id: str
    task: str | None
    prefill: torch.Tensor  # [num_layers, num_experts] int64 token counts (zeros for dense layers)
    decode: torch.Tensor
    prompt_tokens: int = 0
    output_tokens: int = 0

    @property
    def total(self) -> torch.Tensor:
        return self.prefill + self.decode

    def to_json(self) -> dict:
        return {"request_id": self.request_id, "task": self.task, "prompt_tokens": self.prompt_tokens,
                "output_tokens": self.output_tokens, "prefill": self.prefill.tolist(), "decode": self.decode.tolist()}

    @classmethod
    def from_json(cls, d: dict) -> "Trace":
        return cls(d["request_id"], d.get("task"), torch.tensor(d["prefill"]), torch.tensor(d["decode"]),
                   d.get("prompt_tokens", 0), d.get("output_tokens", 0))


@dataclass(slots=True)
class TraceRecorder:
    num_layers: int
    num_experts: int
    rows: int  # batch rows (KV slots) recorded at once
    phase: str = "prefill"
    owners: torch.Tensor | None = None  # [N] batch row of each valid token, set by the engine per step
    # counts stay where routing runs, so recording costs no host sync per layer; rows are read back per request
    device: torch.device | str = "cpu"
    _counts: dict[str, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self):
        for ph in ("prefill", "decode"):
            self._counts[ph] = torch.zeros(self.rows, self.num_layers, self.num_experts, dtype=torch.long,
                                           device=self.device)

    def record(self, layer: int, ids: torch.Tensor) -> None:
        rows = self.owners.to(ids.device)[:, None].expand_as(ids)  # a no-op where the engine put them there
        flat = (rows * self.num_experts + ids).reshape(-1)
        counts = torch.bincount(flat, minlength=self.rows * self.num_experts).view(self.rows, self.num_experts)
        self._counts[self.phase][:, layer] += counts.to(self.device)

    def peek(self, row: int, phase: str = "prefill") -> torch.Tensor:
        return self._counts[phase][row].to("cpu", copy=True)

    def take(self, row: int, request_id: str, task: str | None, prompt_tokens: int, output_tokens: int) -> Trace:
        """Hand over a finished row's trace and clear the row for its next occupant."""
        t = Trace(request_id, task, self.peek(row, "prefill"), self.peek(row, "decode"), prompt_tokens, output_tokens)
        for c in self._counts.values():
            c[row].zero_()
        return t


def save_traces(traces: list[Trace], path: str | Path) -> None:
    Path(path).write_text("\n".join(json.dumps(t.to_json()) for t in traces) + "\n")


def load_traces(path: str | Path) -> list[Trace]:
    return [Trace.from_json(json.loads(line)) for line in Path(path).read_text().splitlines() if line.strip()]
