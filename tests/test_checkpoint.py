"""Bad checkpoint folders are refused with a CheckpointError that names the problem."""
import json
import shutil
import struct

import pytest
from safetensors import safe_open
from safetensors.torch import save_file

from emoe.checkpoint import Checkpoint, CheckpointError


@pytest.fixture
def ck_dir(tiny_mixtral, tmp_path):
    """A private, damageable copy of the session's tiny Mixtral checkpoint."""
    return shutil.copytree(tiny_mixtral, tmp_path / "ck")


def edit_config(d, **changes):
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(changes)
    (d / "config.json").write_text(json.dumps(cfg))


def load_tensors(d):
    with safe_open(str(d / "model.safetensors"), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def refused(d, *fragments):
    with pytest.raises(CheckpointError) as err:
        Checkpoint(d)
    msg = str(err.value)
    for frag in fragments:
        assert frag in msg, msg
    return msg


def test_good_checkpoint_loads(ck_dir):
    ck = Checkpoint(ck_dir)
    assert ck.config.family == "mixtral" and len(ck.experts) == 3 * 8
    assert ck.tokenizer_path.name == "tokenizer.json"


def test_folder_missing(tmp_path):
    refused(tmp_path / "nope", "does not exist", "nope")


def test_folder_is_a_file(tmp_path):
    (tmp_path / "f").write_text("x")
    refused(tmp_path / "f", "does not exist")


def test_no_config(ck_dir):
    (ck_dir / "config.json").unlink()
    refused(ck_dir, "no config.json")


def test_config_not_json(ck_dir):
    (ck_dir / "config.json").write_text("{not json")
    refused(ck_dir, "config.json", "not valid JSON")


def test_unknown_model_type(ck_dir):
    edit_config(ck_dir, model_type="llama", architectures=["LlamaForCausalLM"])
    msg = refused(ck_dir, "llama")
    for fam in ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe"):
        assert fam in msg, msg


def test_missing_config_key(ck_dir):
    cfg = json.loads((ck_dir / "config.json").read_text())
    del cfg["num_local_experts"]
    (ck_dir / "config.json").write_text(json.dumps(cfg))
    refused(ck_dir, "num_local_experts")


def test_no_safetensors(ck_dir):
    (ck_dir / "model.safetensors").unlink()
    msg = refused(ck_dir, "no *.safetensors")
    assert "pickle" not in msg


def test_pickle_weights_refused(ck_dir):
    (ck_dir / "model.safetensors").unlink()
    (ck_dir / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    refused(ck_dir, "pytorch_model.bin", "pickle weights are refused")


def test_truncated_safetensors(ck_dir):
    f = ck_dir / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    refused(ck_dir, "model.safetensors", "truncated")


def test_tiny_file_without_header(ck_dir):
    (ck_dir / "model.safetensors").write_bytes(b"\x01\x02")
    refused(ck_dir, "truncated", "no header")


def test_corrupt_header_length(ck_dir):
    f = ck_dir / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(struct.pack("<Q", 1 << 40) + data[8:])
    refused(ck_dir, "corrupt safetensors header")


def test_corrupt_header_json(ck_dir):
    f = ck_dir / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[8] = ord("#")  # the header JSON no longer parses
    f.write_bytes(bytes(data))
    refused(ck_dir, "corrupt safetensors header")


def test_missing_expert_tensor(ck_dir):
    tensors = load_tensors(ck_dir)
    key = "model.layers.1.block_sparse_moe.experts.5.w3.weight"
    del tensors[key]
    save_file(tensors, str(ck_dir / "model.safetensors"), metadata={"format": "pt"})
    refused(ck_dir, key, "missing")


def test_expert_shape_mismatch(ck_dir):
    edit_config(ck_dir, intermediate_size=40)  # the tensors are [48, 64]
    refused(ck_dir, "shape", "(48, 64)", "(40, 64)")


def test_missing_dense_tensor(ck_dir):
    tensors = load_tensors(ck_dir)
    del tensors["model.layers.2.block_sparse_moe.gate.weight"]
    save_file(tensors, str(ck_dir / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="gate.weight"):
        Checkpoint(ck_dir).dense_state()


def test_missing_tokenizer(ck_dir):
    (ck_dir / "tokenizer.json").unlink()
    with pytest.raises(CheckpointError, match="tokenizer.json$"):
        Checkpoint(ck_dir).tokenizer_path
    (ck_dir / "tokenizer.model").write_bytes(b"sentencepiece")  # ERNIE-style: say how to make tokenizer.json
    with pytest.raises(CheckpointError, match=r"tokenizer.model.*save_pretrained"):
        Checkpoint(ck_dir).tokenizer_path


def test_fp8_weights_without_their_scales_are_refused(ck_dir):
    """FP8 is read block-scaled, as the releases store it; an FP8 tensor with no fp8 quantization_config
    (so no scales to apply) is named, not cast to a wrong value."""
    import torch
    ts = load_tensors(ck_dir)
    ts["model.norm.weight"] = ts["model.norm.weight"].to(torch.float8_e4m3fn)
    save_file(ts, str(ck_dir / "model.safetensors"))
    with pytest.raises(CheckpointError, match="model.norm.weight is FP8 but config.json has no fp8 quantization"):
        Checkpoint(ck_dir).dense_state()


def test_other_quantisation_methods_are_refused_by_name(ck_dir):
    cfg = json.loads((ck_dir / "config.json").read_text())
    for qc, match in (({"quant_method": "gptq", "bits": 4}, "quantization 'gptq' is not supported"),
                      ({"quant_method": "fp8", "weight_block_size": [128]}, "two positive integers")):
        (ck_dir / "config.json").write_text(json.dumps({**cfg, "quantization_config": qc}))
        with pytest.raises(CheckpointError, match=match):
            Checkpoint(ck_dir)


def test_fp8_blocks_that_do_not_divide_the_matrix():
    """DeepSeek-V3's grid is ceil(rows/128) × ceil(cols/128): edge blocks are partial."""
    import torch
    from emoe.checkpoint import fp8_dequantize, fp8_quantize
    w = torch.randn(10, 7) * 3
    q, s = fp8_quantize(w, (4, 3))
    assert q.dtype == torch.float8_e4m3fn and s.shape == (3, 3)
    want = torch.empty(10, 7)
    for r in range(10):
        for c in range(7):
            want[r, c] = q[r, c].float() * s[r // 4, c // 3]
    assert torch.equal(fp8_dequantize(q, s, (4, 3), dtype=torch.float32), want)
    assert (want - w).abs().max() <= 0.07 * w.abs().max()  # E4M3 keeps 3 mantissa bits


def test_deepseek_config_errors(tmp_path):
    from emoe.config import ConfigError, ModelConfig
    from tiny import make_tiny
    raw = json.loads((make_tiny("deepseek_v3", tmp_path / "d") / "config.json").read_text())
    ModelConfig.from_hf(raw)
    for bad, match in (({"n_group": 3}, "n_group=3 must divide"), ({"topk_group": 5}, "topk_group=5"),
                       ({"num_experts_per_tok": 5, "topk_group": 1}, "top_k=5 exceeds"),
                       ({"kv_lora_rank": None}, "MLA setting"),
                       ({"n_group": 8, "topk_group": 4}, "fewer than 2 experts per group"),
                       ({"rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4}}, "longrope")):
        with pytest.raises(ConfigError, match=match):
            ModelConfig.from_hf({**raw, **bad})


def test_gpt_oss_swiglu_defaults_are_transformers_hard_coded_ones(tmp_path):
    """transformers before 5.2x wrote no swiglu_limit/alpha into config.json and used 7.0 and 1.702: a config
    without them must clamp as those did (a default of no clamp once gave wrong logits on transformers 5.17)."""
    from emoe.config import ConfigError, ModelConfig
    from tiny import make_tiny
    raw = json.loads((make_tiny("gpt_oss", tmp_path / "g") / "config.json").read_text())
    bare = {k: v for k, v in raw.items() if k not in ("swiglu_limit", "swiglu_alpha")}
    cfg = ModelConfig.from_hf(bare)
    assert (cfg.swiglu_limit, cfg.swiglu_alpha) == (7.0, 1.702)
    assert ModelConfig.from_hf({**bare, "swiglu_limit": 3.5}).swiglu_limit == 3.5
    with pytest.raises(ConfigError, match="swiglu_limit=0.0"):
        ModelConfig.from_hf({**bare, "swiglu_limit": 0})


def test_mxfp4_scales_are_exact_powers_of_two_over_the_whole_range():
    """Every E8M0 scale, the subnormal 2^-127 included, gives transformers' ldexp result bit for bit."""
    import torch
    from emoe.checkpoint import mxfp4_dequantize
    s = torch.arange(255, dtype=torch.uint8)[:, None]
    blocks = torch.arange(256, dtype=torch.int32)[:16].repeat(255, 1).view(255, 1, 16).to(torch.uint8)
    lut = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0])
    nib = torch.stack((blocks & 15, blocks >> 4), -1).flatten(-2).long()
    want = torch.ldexp(lut[nib], (s.int() - 127)[..., None].float()).flatten(-2)
    assert torch.equal(mxfp4_dequantize(blocks, s, dtype=torch.float32), want)


def test_integer_weights_outside_mxfp4_are_refused(ck_dir):
    import torch
    ts = load_tensors(ck_dir)
    ts["model.layers.0.block_sparse_moe.experts.1.w1.weight"] = torch.zeros(48, 64, dtype=torch.uint8)
    save_file(ts, str(ck_dir / "model.safetensors"))
    refused(ck_dir, "expert 0/1 is stored as U8", "quantised format")


def test_malformed_header_entries_get_a_checkpoint_error(tmp_path):
    """Any header entry (dtype, offsets, shape) of the wrong kind, out of range or inconsistent with its
    bytes is a CheckpointError naming the file, never another exception."""
    import os

    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from emoe.checkpoint import read_header
    junk = st.one_of(st.none(), st.text(max_size=3), st.integers(-5, 40), st.floats(allow_nan=True),
                     st.lists(st.integers(-2, 40), max_size=3), st.dictionaries(st.text(max_size=2), st.integers(), max_size=1))
    good = {"dtype": "F32", "data_offsets": [0, 32], "shape": [2, 4]}
    fuzz = int(os.environ.get("EMOE_FUZZ", 0))

    @settings(max_examples=fuzz or 150, derandomize=not fuzz, deadline=None, suppress_health_check=list(HealthCheck))
    @given(st.sampled_from(["dtype", "data_offsets", "shape", None]), junk)
    def check(key, value):
        entry = value if key is None else {**good, key: value}  # one field, or the whole entry, replaced
        header = json.dumps({"t": entry}).encode()
        f = tmp_path / "x.safetensors"
        f.write_bytes(struct.pack("<Q", len(header)) + header + bytes(32))
        try:
            loc = read_header(f)["t"]
        except CheckpointError as e:
            assert str(f) in str(e)
        else:  # accepted: its bytes lie in the file and its shape fills them exactly
            numel = 1
            for d in loc.shape:
                numel *= d
            assert loc.start + loc.nbytes <= f.stat().st_size and numel * loc.torch_dtype.itemsize == loc.nbytes
    check()
