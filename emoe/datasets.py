"""Task-labelled prompt sets: the six shipped as package data in emoe/data/tasks, or a user's own (`--data FILE`).

The shipped jsonl files are built by scripts/build_data.py, one per split; each line is
{"task": ..., "prompt": ..., "answer": ...}. A user's file has the same lines (answer optional) in one file, for the
traffic they serve: `emoe profile --data FILE` profiles their tasks instead of ours, and the profile remembers the
file (path and digest), so train-predictor and eval draw their test prompts from it too. Its lines are split by a
hash of the prompt, 70% train / 15% val / 15% test, so a line stays in its split however the file is reordered or
grows.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path

TASKS = ("summarization", "sentiment", "qa", "comparison", "conversation", "code")
SPLITS = ("train", "val", "test")
SHARES = (70, 15, 15)  # a user file's split, in percent


@dataclass(frozen=True, slots=True)
class Example:
    task: str
    prompt: str
    answer: str


_source: dict | None = None  # the user's file in use ({"path", "sha256"}), None: the shipped sets
_rows: list[tuple[str, Example]] = []  # its (split, example) lines


def use(data: "str | Path | dict | None") -> dict | None:
    """Draw every split from a user's file from now on (None: the shipped sets). data: a path, or a profile's
    record of one, which must still hold what it held (its digest). Returns the record, for a profile to keep."""
    global _source, _rows
    if data is None:
        _source, _rows = None, []
        return None
    want = data.get("sha256") if isinstance(data, dict) else None
    path = Path(data["path"] if isinstance(data, dict) else data).resolve()
    if not path.is_file():
        raise FileNotFoundError(f"prompt file {path} not found" + (" (the profile was made from it)" if want else ""))
    raw = path.read_bytes()
    digest = hashlib.sha256(raw).hexdigest()
    if want and digest != want:
        raise ValueError(f"{path} changed since the profile was made from it; re-run `emoe profile --data {path}`")
    rows = []
    for n, line in enumerate(raw.decode("utf-8").splitlines(), 1):
        if line.strip():
            ex = _example(line, f"{path}:{n}", answer_required=False)
            rows.append((_split_of(ex.prompt), ex))
    if not rows:
        raise ValueError(f"{path} holds no prompts: expected JSON lines with a task and a prompt")
    short = sorted(t for t in {e.task for _, e in rows} if sum(s == "train" and e.task == t for s, e in rows) < 2)
    if short:
        raise ValueError(f"{path}: task(s) {', '.join(short)} have fewer than 2 training prompts (70% of each "
                         f"task's lines, by a hash of the prompt); give each task at least 5 lines")
    _source, _rows = {"path": str(path), "sha256": digest}, rows
    return _source


def source() -> dict | None:
    """The user file in use ({"path", "sha256"}), or None for the shipped sets."""
    return _source


def tasks() -> tuple[str, ...]:
    """The tasks of the sets in use: the shipped six, or the user file's in order of first appearance."""
    if _source is None:
        return TASKS
    return tuple(dict.fromkeys(e.task for _, e in _rows))


def load_split(split: str, task: str | None = None) -> list[Example]:
    """All examples of `split` ("train", "val" or "test") of the sets in use, optionally only those of one task."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; known splits: {', '.join(SPLITS)}")
    if task is not None and task not in tasks():
        raise ValueError(f"unknown task {task!r}; known tasks: {', '.join(tasks())}")
    if _source is not None:
        return [e for s, e in _rows if s == split and (task is None or e.task == task)]
    path = files("emoe") / "data" / "tasks" / f"{split}.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; build it with `python scripts/build_data.py`")
    out = []
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                ex = _example(line, f"{path}:{n}")
                if task is None or ex.task == task:
                    out.append(ex)
    return out


def _example(line: str, where: str, answer_required: bool = True) -> Example:
    try:
        row = json.loads(line)
        ex = Example(row["task"], row["prompt"], row["answer"] if answer_required else row.get("answer", ""))
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
        need = "task, prompt and answer" if answer_required else "a task and a prompt (an answer optional)"
        raise ValueError(f"{where}: expected a JSON object with {need}") from e
    if not all(isinstance(v, str) for v in (ex.task, ex.prompt, ex.answer)) or not ex.task or not ex.prompt.strip():
        raise ValueError(f"{where}: task and prompt must be non-empty strings (and an answer a string)")
    return ex


def _split_of(prompt: str) -> str:
    h = int.from_bytes(hashlib.sha256(prompt.encode("utf-8")).digest()[:4], "big") % 100
    return SPLITS[0] if h < SHARES[0] else SPLITS[1] if h < SHARES[0] + SHARES[1] else SPLITS[2]
