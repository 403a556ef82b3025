import pytest

from emoe.datasets import TASKS, Example, load_split


@pytest.fixture(scope="module")
def splits():
    return {s: load_split(s) for s in ("train", "val", "test")}


@pytest.mark.parametrize("task", TASKS)
def test_every_task_has_enough_examples(splits, task):
    assert sum(ex.task == task for ex in splits["train"]) >= 200
    assert sum(ex.task == task for ex in splits["val"]) >= 50
    assert sum(ex.task == task for ex in splits["test"]) >= 50


def test_examples_are_well_formed(splits):
    for rows in splits.values():
        for ex in rows:
            assert isinstance(ex, Example)
            assert ex.task in TASKS
            assert ex.prompt.strip() and ex.answer.strip()


def test_test_prompts_disjoint_from_train_and_val(splits):
    seen = {ex.prompt for ex in splits["train"]} | {ex.prompt for ex in splits["val"]}
    assert not seen & {ex.prompt for ex in splits["test"]}
    assert not {ex.prompt for ex in splits["train"]} & {ex.prompt for ex in splits["val"]}


def test_filter_by_task():
    rows = load_split("test", "qa")
    assert rows and all(ex.task == "qa" for ex in rows)


def test_unknown_task_or_split_raises():
    with pytest.raises(ValueError, match="known tasks"):
        load_split("train", "poetry")
    with pytest.raises(ValueError, match="known splits"):
        load_split("dev")


def test_missing_data_file_says_how_to_build(monkeypatch, tmp_path):
    import emoe.datasets

    monkeypatch.setattr(emoe.datasets, "files", lambda package: tmp_path)
    with pytest.raises(FileNotFoundError, match="scripts/build_data.py"):
        load_split("train")


@pytest.fixture
def user_file(tmp_path):
    """A user's own prompts: two tasks of 40 lines each, answers on some."""
    import json
    from emoe import datasets
    path = tmp_path / "mine.jsonl"
    rows = [{"task": "sql", "prompt": f"Write SQL that counts the rows of table t{i}.", "answer": "SELECT COUNT(*)"}
            for i in range(40)] + [{"task": "support", "prompt": f"My order #{i} has not arrived, what now?"}
                                   for i in range(40)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    yield path
    datasets.use(None)


def test_a_users_file_gives_its_own_tasks_split_by_prompt(user_file):
    from emoe import datasets
    rec = datasets.use(user_file)
    assert rec["path"] == str(user_file.resolve()) and len(rec["sha256"]) == 64 and datasets.source() == rec
    assert datasets.tasks() == ("sql", "support")
    parts = {s: load_split(s) for s in ("train", "val", "test")}
    prompts = [e.prompt for s in parts.values() for e in s]
    assert len(prompts) == len(set(prompts)) == 80  # every line in exactly one split
    assert 0.5 < len(parts["train"]) / 80 < 0.9 and parts["test"]
    assert all(e.task == "sql" for e in load_split("train", "sql"))
    assert load_split("val", "support")[0].answer == ""  # answers are optional
    with pytest.raises(ValueError, match="known tasks: sql, support"):
        load_split("test", "qa")
    datasets.use(rec)  # a profile's record of it: the same lines, the same splits
    assert {s: load_split(s) for s in ("train", "val", "test")} == parts
    datasets.use(None)
    assert datasets.tasks() == TASKS and datasets.source() is None and len(load_split("test")) >= 300


def test_a_users_file_that_is_malformed_changed_or_gone_is_refused(user_file):
    from emoe import datasets
    rec = datasets.use(user_file)
    datasets.use(None)
    text = user_file.read_text()
    user_file.write_text(text + '{"task": "sql", "prompt": "one more"}\n')
    with pytest.raises(ValueError, match="changed since the profile"):
        datasets.use(rec)
    for bad, msg in [('{"prompt": "no task"}', ":1: expected a JSON object with a task and a prompt"),
                     ('{"task": "x", "prompt": "  "}', ":1: task and prompt must be non-empty"),
                     ("not json", ":1: expected"), ("", "holds no prompts"),
                     ('{"task": "x", "prompt": "only one line"}', "fewer than 2 training prompts")]:
        user_file.write_text(bad)
        with pytest.raises(ValueError, match=msg):
            datasets.use(user_file)
        assert datasets.source() is None and datasets.tasks() == TASKS  # a refused file changes nothing
    with pytest.raises(FileNotFoundError, match="profile was made from it"):
        datasets.use({"path": str(user_file.parent / "gone.jsonl"), "sha256": rec["sha256"]})
