"""Task-labelled prompt sets shipped as package data in emoe/data/tasks.

The jsonl files are built by scripts/build_data.py; each line is
{"task": ..., "prompt": ..., "answer": ...}.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from importlib.resources import files

TASKS = ("summarization", "sentiment", "qa", "comparison", "conversation", "code")
SPLITS = ("train", "val", "test")


@dataclass(frozen=True, slots=True)
class Example:
    task: str
    prompt: str
    answer: str


def load_split(split: str, task: str | None = None) -> list[Example]:
    """All examples of `split` ("train", "val" or "test"), optionally only those of one task."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; known splits: {', '.join(SPLITS)}")
    if task is not None and task not in TASKS:
        raise ValueError(f"unknown task {task!r}; known tasks: {', '.join(TASKS)}")
    path = files("emoe") / "data" / "tasks" / f"{split}.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; build it with `python scripts/build_data.py`")
    out = []
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            row = json.loads(line)
            try:
                ex = Example(row["task"], row["prompt"], row["answer"])
            except (KeyError, TypeError) as e:
                raise ValueError(f"{path}:{n}: expected an object with task, prompt and answer") from e
            if task is None or ex.task == task:
                out.append(ex)
    return out
