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
