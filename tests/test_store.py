"""Slow tier: DiskStore/RamStore give exactly the checkpoint's expert tensors, for the per-expert and the
transformers-5 fused layouts."""
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from emoe.checkpoint import Checkpoint
from emoe.store import DiskStore, RamStore, open_store, raw_direct_bandwidth

PRE = "model.layers.{}.block_sparse_moe.experts"


def reference(path):
    """{(layer, e): (w1, w3, w2)} straight from safetensors."""
    ck = Checkpoint(path)
    out = {}
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        for layer, e in ck.experts:
            out[(layer, e)] = tuple(f.get_tensor(f"{PRE.format(layer)}.{e}.{k}.weight") for k in ("w1", "w3", "w2"))
    return out


@pytest.fixture(scope="module")
def ck(tiny_mixtral):
    return Checkpoint(tiny_mixtral)


@pytest.fixture(scope="module")
def want(tiny_mixtral):
    return reference(tiny_mixtral)


def check_store(store, want, nbytes):
    assert len(want) == 3 * 8
    for key, ref in want.items():
        got = store.read(*key)
        assert len(got) == 3
        for g, r in zip(got, ref):
            assert g.shape == r.shape and g.dtype == r.dtype
            assert torch.equal(g, r), key
    assert store.stats.reads == len(want)
    assert store.stats.bytes_read == len(want) * nbytes
    assert store.stats.seconds >= 0


def test_disk_store_reads_every_expert(ck, want):
    store = open_store(ck, "disk")
    assert isinstance(store, DiskStore)
    try:
        check_store(store, want, ck.expert_nbytes)
        # read again (buffer reuse must not alias earlier results)
        a = store.read(0, 0)
        b = store.read(0, 1)
        assert torch.equal(a[0], want[(0, 0)][0]) and torch.equal(b[0], want[(0, 1)][0])
    finally:
        store.close()


def test_ram_store_reads_every_expert(ck, want):
    store = open_store(ck, "ram")
    assert isinstance(store, RamStore)
    check_store(store, want, ck.expert_nbytes)


def test_expert_nbytes(ck):
    c = ck.config
    assert ck.expert_nbytes == 3 * c.moe_intermediate_size * c.hidden_size * 4
    assert len(ck.experts) == c.num_layers * c.num_experts


def test_unknown_tier(ck):
    with pytest.raises(ValueError, match="nvme"):
        open_store(ck, "nvme")


def make_fused(src, dst):
    """Rewrite the per-expert Mixtral checkpoint into the transformers-5 fused expert layout."""
    dst.mkdir(parents=True)
    for name in ("config.json", "tokenizer.json"):
        shutil.copy(src / name, dst / name)
    with safe_open(str(src / "model.safetensors"), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    ck = Checkpoint(src)
    c = ck.config
    for layer in c.moe_layers:
        pre = PRE.format(layer)
        gate_up, down = [], []
        for e in range(c.num_experts):
            w1, w3, w2 = (tensors.pop(f"{pre}.{e}.{k}.weight") for k in ("w1", "w3", "w2"))
            gate_up.append(torch.cat([w1, w3], dim=0))  # [2I, H]
            down.append(w2)                              # [H, I]
        tensors[f"{pre}.gate_up_proj"] = torch.stack(gate_up).contiguous()  # [E, 2I, H]
        tensors[f"{pre}.down_proj"] = torch.stack(down).contiguous()        # [E, H, I]
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


@pytest.fixture(scope="module")
def fused_dir(tiny_mixtral, tmp_path_factory):
    return make_fused(tiny_mixtral, tmp_path_factory.mktemp("fused") / "mixtral")


def test_fused_tensors_are_not_dense(fused_dir):
    dense = Checkpoint(fused_dir).dense_state()
    assert not any("experts" in k for k in dense)
    assert "model.layers.0.block_sparse_moe.gate.weight" in dense


def test_fused_layout_is_indexed(fused_dir, ck):
    fused = Checkpoint(fused_dir)
    c = fused.config
    i, h = c.moe_intermediate_size, c.hidden_size
    assert set(fused.experts) == set(ck.experts)
    assert fused.expert_nbytes == ck.expert_nbytes
    for locs in fused.experts.values():
        assert [p.shape for p in locs.parts()] == [(i, h), (i, h), (h, i)]
        assert [p.nbytes for p in locs.parts()] == [i * h * 4] * 3
    fgu = fused.tensors[f"{PRE.format(0)}.gate_up_proj"]
    fdn = fused.tensors[f"{PRE.format(0)}.down_proj"]
    s = i * h * 4
    gate, up, down = fused.experts[(0, 3)].parts()
    assert (gate.start, up.start, down.start) == (fgu.start + 3 * 2 * s, fgu.start + 3 * 2 * s + s, fdn.start + 3 * s)


@pytest.mark.parametrize("tier", ["disk", "ram"])
def test_fused_layout_reads_same_tensors(fused_dir, want, ck, tier):
    store = open_store(Checkpoint(fused_dir), tier)
    try:
        check_store(store, want, ck.expert_nbytes)
    finally:
        store.close()


def test_raw_direct_bandwidth(tiny_mixtral):
    bw = raw_direct_bandwidth(str(tiny_mixtral / "model.safetensors"))
    assert bw > 0
    small = raw_direct_bandwidth(str(tiny_mixtral / "model.safetensors"), block=4096, limit=8192)
    assert small > 0


def test_memory_available_counts_a_containers_cgroup_limit(tmp_path):
    from emoe.store import _mem_available
    proc, cg = tmp_path / "proc", tmp_path / "cg"
    (proc / "self").mkdir(parents=True)
    (proc / "meminfo").write_text("MemTotal: 32000000 kB\nMemAvailable: 20000000 kB\n")
    (proc / "self" / "cgroup").write_text("4:memory:/box\n1:cpu:/\n")
    assert _mem_available(str(proc), str(cg)) == 20000000 * 1024  # no cgroup files: the kernel's figure
    v1 = cg / "memory" / "box"
    v1.mkdir(parents=True)
    (v1 / "memory.limit_in_bytes").write_text(f"{3 << 30}\n")
    (v1 / "memory.stat").write_text(f"cache {5 << 30}\ntotal_rss {1 << 30}\n")
    assert _mem_available(str(proc), str(cg)) == 2 << 30  # the limit less what is not page cache
    (v1 / "memory.limit_in_bytes").write_text("9223372036854771712\n")  # v1's "no limit"
    assert _mem_available(str(proc), str(cg)) == 20000000 * 1024
    (proc / "self" / "cgroup").write_text("0::/ctr\n")
    v2 = cg / "ctr"
    v2.mkdir()
    (v2 / "memory.max").write_text(f"{4 << 30}\n")
    (v2 / "memory.stat").write_text(f"anon {1 << 30}\nfile {2 << 30}\n")
    assert _mem_available(str(proc), str(cg)) == 3 << 30
    (v2 / "memory.max").write_text("max\n")
    assert _mem_available(str(proc), str(cg)) == 20000000 * 1024
