import json

import pytest

from emoe.datasets import TASKS, load_split
from emoe.tasks import VERSION, TaskExtractor, accuracy

# Measured (train -> test): classifier 0.9991, keywords 0.9991.
THRESHOLD = {"classifier": 0.98, "keywords": 0.98}


@pytest.fixture(scope="module")
def data():
    return {s: load_split(s) for s in ("train", "test")}


@pytest.fixture(scope="module", params=["classifier", "keywords"])
def extractor(request, data):
    return TaskExtractor.fit(data["train"], kind=request.param)


def test_accuracy_on_test_split(extractor, data):
    acc = accuracy(extractor, data["test"])
    assert acc["n"] == len(data["test"])
    assert set(acc["per_task"]) == set(TASKS)
    assert acc["overall"] >= THRESHOLD[extractor.kind], acc


def test_known_tasks(extractor):
    assert extractor.known_tasks == TASKS


def test_explicit_task_wins(extractor):
    prompt = "Summarize: The council voted on Tuesday to raise parking charges in the city centre."
    assert extractor.extract(prompt) == "summarization"
    assert extractor.extract(prompt, explicit="code") == "code"


def test_unknown_explicit_task_raises(extractor):
    with pytest.raises(ValueError) as err:
        extractor.extract("Answer the question: What is the capital of France?", explicit="poetry")
    msg = str(err.value)
    assert "poetry" in msg
    assert all(t in msg for t in TASKS)


def test_json_round_trip(extractor, data):
    d = json.loads(json.dumps(extractor.to_json()))
    assert d["version"] == VERSION
    back = TaskExtractor.from_json(d)
    assert back.kind == extractor.kind and back.known_tasks == extractor.known_tasks
    prompts = [e.prompt for e in data["test"][::len(data["test"]) // 50]][:50]
    assert len(prompts) == 50
    assert [back.extract(p) for p in prompts] == [extractor.extract(p) for p in prompts]
    if extractor.kind == "classifier":
        p = prompts[0]
        assert back.model.predict_proba(p) == extractor.model.predict_proba(p)
    assert len(json.dumps(d)) < 2_000_000


def test_wrong_version_refused(extractor):
    d = extractor.to_json()
    d["version"] = "emoe-tasks/0"
    with pytest.raises(ValueError, match="emoe-tasks/0"):
        TaskExtractor.from_json(d)
    with pytest.raises(ValueError):
        TaskExtractor.from_json({k: v for k, v in extractor.to_json().items() if k != "version"})


@pytest.mark.parametrize("prompt", ["", "   ", "?!", "\n"])
def test_empty_prompt_gets_a_valid_task(extractor, prompt):
    assert extractor.extract(prompt) in TASKS


def test_predict_proba_is_a_distribution(data):
    ex = TaskExtractor.fit(data["train"][::4], kind="classifier")
    p = ex.model.predict_proba("Write an SQL query: How many singers are there?")
    assert set(p) == set(TASKS)
    assert abs(sum(p.values()) - 1) < 1e-9
    assert max(p, key=p.get) == "code"


def test_unknown_kind_refused(data):
    with pytest.raises(ValueError, match="classifier"):
        TaskExtractor.fit(data["train"][:10], kind="magic")
