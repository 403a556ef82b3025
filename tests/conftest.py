import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
# the many checkpoints tests make would each leave their kernel forms in ~/.cache: test_formcache turns it on
os.environ.setdefault("EMOE_FORMS_CACHE", "0")
# the default decode activations (bf16), whatever the shell says: tests that hold results to PyTorch's kernel are
# written for them, and the tests of the other modes set ckernel.KQ themselves
os.environ["EMOE_KQ"] = "bf16"

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_mixtral(tmp_path_factory) -> Path:
    """One tiny random Mixtral checkpoint (per-expert w1/w3/w2 layout + tokenizer.json), shared by the
    whole session. Treat it as read-only: tests that damage a checkpoint copy it first."""
    from tiny import make_tiny
    return make_tiny("mixtral", tmp_path_factory.mktemp("tiny") / "mixtral")


@pytest.fixture(scope="session")
def qwen_gguf_import(tmp_path_factory) -> Path:
    """A tiny Qwen3-MoE GGUF (experts Q4_K / Q8_0 / Q6_K, dense Q8_0) imported with its experts left in the file:
    what the forms tests build kernel forms from. Read-only, as tiny_mixtral."""
    import torch
    from gguf_writer import write_gguf
    from tiny import make_tiny

    from emoe.gguf_import import import_gguf
    d = tmp_path_factory.mktemp("qgguf")
    hf = make_tiny("qwen3_moe", d / "hf", hidden_size=256, moe_intermediate_size=256, num_attention_heads=4)
    gguf = write_gguf(hf, d / "m.gguf", expert_types=("Q4_K", "Q8_0", "Q6_K"), dense_type="Q8_0")
    return import_gguf(gguf, d / "imp", dtype=torch.float32)


@pytest.fixture
def forms_cache_on(monkeypatch, tmp_path) -> Path:
    """The kernel forms cache on, in this test's own folder (returned)."""
    monkeypatch.setenv("EMOE_FORMS_CACHE", "1")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    return tmp_path / "emoe" / "forms"


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run fastest on one intra-op thread, and do not fight a busy machine for cores."""
    import torch
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def same_model_tokens(got: list[list[int]], want: list[list[int]]) -> bool:
    """Greedy tokens of the same model computed partly elsewhere (experts run on the host, reference
    outputs under a budget). On a CPU both paths do the same arithmetic, so the tokens are equal. On a GPU
    the host's matmuls round differently from the device's and a greedy continuation may part after a
    near-tie, so only each answer's first token (the prefill's) is held to equality there."""
    import torch
    if not torch.cuda.is_available():
        return got == want
    return [g[:1] for g in got] == [w[:1] for w in want]


def needs_pinned_transformers(what: str) -> None:
    """Skip a test that compares with transformers' own behaviour where an older transformers than
    constraints.txt pins is installed (a GPU machine's image): its GGUF tokenizer conversion and MiniMax-M2
    changed since 5.17, and the same tests fail there on a CPU too (thirteenth session)."""
    import transformers
    if tuple(int(x) for x in transformers.__version__.split(".")[:2]) < (5, 24):
        pytest.skip(f"{what} changed in transformers after {transformers.__version__}; constraints.txt pins 5.24")
