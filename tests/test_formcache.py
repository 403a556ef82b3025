"""emoe.formcache: the RAM tier's kernel forms written at the first start and read back at the next."""
import os

import torch

from emoe.checkpoint import Checkpoint
from emoe.engine import Engine, EngineConfig, SamplingParams
from emoe.quant import KTensor
from emoe.store import open_store


def _same(a, b) -> bool:
    for k in a._experts:
        for x, y in zip(a._experts[k], b._experts[k]):
            xs = x.planes + x.sz if isinstance(x, KTensor) else (x,)
            ys = y.planes + y.sz if isinstance(y, KTensor) else (y,)
            if type(x) is not type(y) or not all(torch.equal(p, q) for p, q in zip(xs, ys)):
                return False
            if isinstance(x, KTensor) and ((x.shape, x.bits, x.group) != (y.shape, y.bits, y.group) or
                                           (x.lut is None) != (y.lut is None) or
                                           (x.lut is not None and not torch.equal(x.lut, y.lut))):
                return False
    return set(a._experts) == set(b._experts)


def test_the_second_start_reads_the_forms_the_first_built(qwen_gguf_import, forms_cache_on, monkeypatch, capsys):
    built = []
    from emoe import forms
    real = forms.host_forms_of
    monkeypatch.setattr(forms, "host_forms_of", lambda *a: built.append(1) or real(*a))
    ck = Checkpoint(qwen_gguf_import)
    first = open_store(ck, "ram", host_forms=True)
    assert built and "kernel forms saved in" in capsys.readouterr().err
    n = len(built)
    second = open_store(ck, "ram", host_forms=True)
    assert len(built) == n and _same(first, second)  # nothing built again, the same bytes
    assert len(list(forms_cache_on.iterdir())) == 1
    greedy = SamplingParams(max_tokens=6, ignore_eos=True)
    got = Engine(EngineConfig(str(qwen_gguf_import), miss_policy="host", budget=0, experts_on="ram")).generate(["hello"], greedy, chat=False)
    monkeypatch.setenv("EMOE_FORMS_CACHE", "0")
    want = Engine(EngineConfig(str(qwen_gguf_import), miss_policy="host", budget=0, experts_on="ram")).generate(["hello"], greedy, chat=False)
    assert got[0].output_ids == want[0].output_ids


def test_a_changed_checkpoint_or_a_torn_file_builds_afresh(qwen_gguf_import, forms_cache_on, tmp_path):
    import shutil
    copy = tmp_path / "copy"
    shutil.copytree(qwen_gguf_import, copy)
    ck = Checkpoint(copy)
    open_store(ck, "ram", host_forms=True)
    (old,) = list(forms_cache_on.iterdir())
    layer0 = old / "layer-0.safetensors"
    layer0.write_bytes(layer0.read_bytes()[:100])  # torn
    again = open_store(ck, "ram", host_forms=True)
    assert layer0.stat().st_size > 100  # written again, whole
    f = next(p for p in copy.iterdir() if p.suffix == ".safetensors")
    os.utime(f, ns=(f.stat().st_atime_ns, f.stat().st_mtime_ns + 10**9))
    newer = open_store(Checkpoint(copy), "ram", host_forms=True)
    folders = list(forms_cache_on.iterdir())
    assert len(folders) == 1 and folders[0] != old  # the old checkpoint's forms removed, the new ones kept
    assert _same(again, newer) and again.forms


def test_turned_off_writes_nothing(qwen_gguf_import, monkeypatch, tmp_path):
    monkeypatch.setenv("EMOE_FORMS_CACHE", "0")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    open_store(Checkpoint(qwen_gguf_import), "ram", host_forms=True)
    assert not (tmp_path / "emoe" / "forms").exists()


def test_the_key_follows_the_files_the_experts_come_from(qwen_gguf_import, forms_cache_on):
    """A GGUF import reads its experts from the .gguf itself: touching that file (outside the import folder
    or not) changes where the forms are looked for."""
    from emoe import formcache
    ck = Checkpoint(qwen_gguf_import)
    sources = {loc.path for locs in ck.experts.values() for loc in locs.locs}
    before = formcache.folder(ck, {"int8": False})
    assert before == formcache.folder(ck, {"int8": False}) and before != formcache.folder(ck, {"int8": True})
    src = sorted(sources)[0]
    st = os.stat(src)
    try:
        os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
        assert formcache.folder(ck, {"int8": False}) != before
    finally:
        os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_mxfp4_codebook_forms_come_back_with_their_codebook(forms_cache_on, tmp_path, monkeypatch):
    """MXFP4 experts held as a codebook form (where the routines take one) are read back with it, and the key
    says which kind of form was built: a build without codebooks does not read these."""
    from gguf_writer import write_gguf
    from tiny import make_tiny

    from emoe import ckernel, formcache
    from emoe.gguf_import import import_gguf
    hf = make_tiny("qwen3_moe", tmp_path / "hf", hidden_size=256, moe_intermediate_size=256, num_attention_heads=4)
    imp = import_gguf(write_gguf(hf, tmp_path / "m.gguf", expert_types=("MXFP4",) * 3), tmp_path / "imp",
                      dtype=torch.float32)
    ck = Checkpoint(imp)
    first = open_store(ck, "ram", host_forms=True)
    second = open_store(ck, "ram", host_forms=True)
    forms = [t for ts in second._experts.values() for t in ts]
    assert forms and all(isinstance(t, KTensor) and (t.lut is not None) == ckernel.lut_able() for t in forms)
    assert _same(first, second)
    key = formcache.folder(ck, {})
    monkeypatch.setattr(formcache, "lut_able", lambda: not ckernel.lut_able())
    assert formcache.folder(ck, {}) != key
