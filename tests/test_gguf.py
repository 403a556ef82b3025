"""`emoe import-gguf`: a llama.cpp GGUF served with its experts left packed in the file. The references are
independent of emoe's reader: transformers' own GGUF loader (its own parser and torch dequantisers) for
weights, logits and the tokenizer, and the Hugging Face config the GGUF was written from."""
import json

import pytest
import torch

from conftest import needs_pinned_transformers, same_model_tokens
from emoe.checkpoint import Checkpoint, CheckpointError
from emoe.engine import Engine, EngineConfig, SamplingParams
from emoe.gguf_import import GGUFError, import_gguf
from gguf_writer import write_gguf
from test_model import load_emoe
from tiny import make_tiny

pytestmark = pytest.mark.usefixtures("one_thread")
# K-quant rows are 256 wide; Qwen2-MoE without its dense middle layer (llama.cpp's converter has none)
SHAPE = dict(hidden_size=256, moe_intermediate_size=256, num_attention_heads=4)
OVER = {"qwen3_moe": SHAPE, "qwen2_moe": dict(SHAPE, mlp_only_layers=[])}


@pytest.fixture(scope="module", params=sorted(OVER))
def imported(request, tmp_path_factory):
    d = tmp_path_factory.mktemp("gguf")
    hf = make_tiny(request.param, d / "hf", **OVER[request.param])
    gguf = write_gguf(hf, d / "model-Q4_K_M.gguf", expert_types=("Q4_K", "Q8_0", "Q6_K"), dense_type="Q8_0")
    return hf, gguf, import_gguf(gguf, d / "imported", dtype=torch.float32)


def transformers_reference(hf, gguf):
    """transformers' model of the HF config, holding the weights transformers' GGUF loader reads."""
    import transformers as tf
    load_gguf_checkpoint = pytest.importorskip("transformers.modeling_gguf_pytorch_utils").load_gguf_checkpoint
    raw = json.loads((hf / "config.json").read_text())
    cfg = tf.AutoConfig.for_model(**{k: v for k, v in raw.items() if k not in ("architectures", "transformers_version")})
    with torch.device("meta"):
        shell = tf.AutoModelForCausalLM.from_config(cfg)
    sd = load_gguf_checkpoint(str(gguf), return_tensors=True, model_to_load=shell)["tensors"]
    model = tf.AutoModelForCausalLM.from_config(cfg).float().eval()
    own = model.state_dict()
    model.load_state_dict({k: v.reshape(own[k].shape) for k, v in sd.items()}, strict=True)
    return model, sd


def assert_same_logits(model_dir, ref, n: int = 10) -> None:
    """emoe's logits on model_dir equal the transformers model `ref`'s on one random sequence."""
    cfg, model, dispatch = load_emoe(model_dir)
    seq = torch.randint(0, cfg.vocab_size, (n,), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        want = ref(seq[None]).logits[0]
        got = model.forward(seq[None], torch.arange(n)[None], torch.ones(1, n, dtype=torch.bool), dispatch)[0]
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_config_matches_the_model_the_gguf_was_written_from(imported):
    hf, _, out = imported
    mine, theirs = Checkpoint(out).config, Checkpoint(hf).config
    for field in ("family", "vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                  "num_experts", "top_k", "moe_intermediate_size", "norm_topk_prob", "rope_theta", "qkv_bias",
                  "shared_expert_intermediate_size", "moe_layers", "tie_word_embeddings", "eos_token_ids"):
        assert getattr(mine, field) == getattr(theirs, field), field
    assert mine.rms_norm_eps == pytest.approx(theirs.rms_norm_eps)


@pytest.mark.parametrize("family", ["qwen3_moe", "qwen2_moe", "olmoe", "mixtral", "gpt_oss", "deepseek_v2",
                                    "deepseek_v3"])
def test_an_unquantised_gguf_is_the_model_it_was_written_from(family, tmp_path):
    """Every tensor F32: the import must be the Hugging Face model itself, so emoe's logits on it equal
    transformers' on the original folder (config, names, layouts and routing all read right)."""
    import transformers
    over = {"qwen2_moe": dict(SHAPE, mlp_only_layers=[]), "olmoe": dict(SHAPE, clip_qkv=None),
            "mixtral": dict(hidden_size=256, intermediate_size=256),
            "gpt_oss": dict(hidden_size=256, intermediate_size=256)}.get(family, SHAPE)
    hf = make_tiny(family, tmp_path / "hf", **over)
    out = import_gguf(write_gguf(hf, tmp_path / "f32.gguf", expert_types=("F32",) * 3), tmp_path / "imp",
                      dtype=torch.float32)
    assert_same_logits(out, transformers.AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval())
    if family == "olmoe":  # GPT-2's split rule, as the original tokenizer.json splits
        from tokenizers import Tokenizer
        mine, orig = (Tokenizer.from_file(str(d / "tokenizer.json")) for d in (out, hf))
        for text in ["Summarize: the cat sat.\n\n  it's 12345 ok", "héllo — ünïcode\t\ttabs<|end|>x   "]:
            assert mine.encode(text).ids == orig.encode(text).ids


def test_mixtral_files_early_layout_and_sentencepiece_vocabulary(tmp_path):
    """llama.cpp's Mixtral: architecture 'llama' with experts, in the early one-tensor-per-expert layout
    too (read as the stacked one), and a SentencePiece vocabulary whose merges come from scores; the
    tokenizer matches transformers' conversion of the same file, BOS included, except where SentencePiece
    itself differs from that conversion: a text (or a text after a special token) that starts with a space
    gets its own "▁" (checked against llama.cpp's test vectors by scripts/check_gguf_vocab.py)."""
    needs_pinned_transformers("GGUF tokenizer conversion")
    import transformers
    from tokenizers import Tokenizer

    from emoe.store import DiskStore
    hf = make_tiny("mixtral", tmp_path / "hf", hidden_size=256, intermediate_size=256)
    stacked = import_gguf(write_gguf(hf, tmp_path / "s.gguf", expert_types=("Q4_0", "Q4_0", "Q8_0")), tmp_path / "s")
    early = import_gguf(write_gguf(hf, tmp_path / "e.gguf", expert_types=("Q4_0", "Q4_0", "Q8_0"), per_expert=True),
                        tmp_path / "e")
    a, b = DiskStore(Checkpoint(stacked)), DiskStore(Checkpoint(early))
    for key in [(0, 0), (1, 5), (2, 7)]:
        assert all(torch.equal(x, y) for x, y in zip(a.read(*key), b.read(*key)))
    ref = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="s.gguf")
    mine = Tokenizer.from_file(str(stacked / "tokenizer.json"))
    for text in ["Summarize: the cat sat on the mat.", "SELECT name FROM users WHERE id = 3;\n\n  two  spaces",
                 "héllo wörld — ünïcode → byte fallback"]:
        assert mine.encode(text).ids == ref(text).input_ids, text
        assert mine.encode(text).ids[0] == 1  # <s>
    pieces = mine.encode(" leading space</s>after").tokens
    assert pieces[:2] == ["<s>", "\u2581"] and pieces[pieces.index("</s>") + 1].startswith("\u2581")
    assert mine.decode(mine.encode(" leading space").ids) == " leading space"
    assert mine.decode(mine.encode("héllo → wörld").ids) == "héllo → wörld"


def test_gpt_oss_files_fused_experts_mxfp4_and_o200k_split(tmp_path):
    """gpt-oss as llama.cpp writes it (gate/up de-interleaved, biases split, sinks): with gate and up fused
    in one tensor, logits still equal transformers' on the original folder; MXFP4 experts (ggml's block
    layout, dequantised by gguf-py) serve under a budget with all-resident's tokens; the tokenizer splits as
    transformers' conversion of the file does (o200k's rule)."""
    needs_pinned_transformers("GGUF tokenizer conversion")
    import transformers
    from tokenizers import Tokenizer
    hf = make_tiny("gpt_oss", tmp_path / "hf", hidden_size=256, intermediate_size=256)
    fused = import_gguf(write_gguf(hf, tmp_path / "f.gguf", expert_types=("F32",) * 3, fuse=True), tmp_path / "f",
                        dtype=torch.float32)
    assert_same_logits(fused, transformers.AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval())
    mx = import_gguf(write_gguf(hf, tmp_path / "m.gguf", expert_types=("MXFP4",) * 3), tmp_path / "m")
    greedy = SamplingParams(max_tokens=5, ignore_eos=True)
    engines = [Engine(EngineConfig(str(mx), **kw)) for kw in (
        dict(miss_policy="all"), dict(miss_policy="load", budget=0.4, experts_on="ram"),
        dict(miss_policy="host", budget=0, experts_on="ram"))]
    assert engines[2].store.forms  # the last runs every expert on its exact MXFP4 kernel form
    outs = [[r.output_ids for r in e.generate(["hi there", "SELECT"], greedy, chat=False)] for e in engines]
    assert outs[0] == outs[1] and same_model_tokens(outs[2], outs[0])
    # transformers' own conversion of the file's vocabulary (its config reader has no gpt-oss GGUF support)
    conv = pytest.importorskip("transformers.integrations.gguf", reason="transformers without its GGUF tokenizer")
    convert_gguf_tokenizer, get_gguf_tokenizer = conv.convert_gguf_tokenizer, conv.get_gguf_tokenizer
    arch, vocab, _ = get_gguf_tokenizer(str(tmp_path / "m.gguf"))
    ref = convert_gguf_tokenizer(arch, vocab)[0]
    mine = Tokenizer.from_file(str(mx / "tokenizer.json"))
    for text in ["Summarize: the CAT's mat, 12345678.\n\n  x", "héllo wörld — ÜNÏCODE\t\ttabs<|end|>after"]:
        assert mine.encode(text).ids == ref.encode(text).ids, text
        # the split itself, which a vocabulary this small could hide
        assert mine.pre_tokenizer.pre_tokenize_str(text) == ref.pre_tokenizer.pre_tokenize_str(text)


def test_deepseek_files_with_kv_b_whole_and_the_v3_split_rule(tmp_path):
    """Older DeepSeek GGUFs keep kv_b whole (newer ones split it, tested above with every family): the same
    logits. The deepseek-v3 split (llama.cpp's three rules: digits in threes, CJK runs, words) has no
    independent reader here, so its pieces are checked by hand."""
    import transformers
    from tokenizers import Tokenizer
    hf = make_tiny("deepseek_v3", tmp_path / "hf")
    out = import_gguf(write_gguf(hf, tmp_path / "w.gguf", expert_types=("F32",) * 3, kv_b_whole=True), tmp_path / "w",
                      dtype=torch.float32)
    assert_same_logits(out, transformers.AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval())
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "deepseek_v3" and cfg["n_group"] == 4 and cfg["topk_group"] == 2
    split = Tokenizer.from_file(str(out / "tokenizer.json")).pre_tokenizer.pre_tokenize_str
    pieces = [p for p, _ in split("Price: 1234567 yen 日本語テキスト hello,world")]
    assert pieces[:6] == ["Price", ":", "Ġ", "123", "456", "7"] and "æĹ¥æľ¬èªŀãĥĨãĤŃãĤ¹ãĥĪ" in pieces


@pytest.mark.parametrize("family", ["deepseek_v32", "glm_moe_dsa"])
def test_indexed_files_with_an_indexer_and_an_mtp_block(family, tmp_path):
    """A DeepSeek-V3.2 or GLM-5 GGUF (llama.cpp's deepseek32 / glm-dsa: deepseek2's layers, the DSA indexer's
    tensors and top_k) with the multi-token-prediction block its converter appends (nextn_predict_layers; GLM-4.5's
    files carry one too): the import is the model without either, the context capped at the indexer's top_k: its
    logits are those of the checkpoint the file was written from (whose logits test_model holds to transformers')."""
    hf = make_tiny(family, tmp_path / "hf", index_topk=64)
    gguf = write_gguf(hf, tmp_path / "v32.gguf", expert_types=("F32",) * 3, mtp=True)
    out = import_gguf(gguf, tmp_path / "imp", dtype=torch.float32)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == family and cfg["num_hidden_layers"] == 3 and cfg["index_topk"] == 64
    ck = Checkpoint(out)
    assert ck.config.max_position_embeddings == 64 and max(layer for layer, _ in ck.experts) == 2
    seq = torch.randint(0, ck.config.vocab_size, (1, 10), generator=torch.Generator().manual_seed(5))

    def logits(path):
        _, model, dispatch = load_emoe(path)
        with torch.no_grad():
            return model.forward(seq, torch.arange(10)[None], torch.ones_like(seq, dtype=torch.bool), dispatch)
    torch.testing.assert_close(logits(out), logits(hf), atol=1e-6, rtol=1e-6)


def test_deepseek_v2_split_rule():
    """DeepSeek-V2/MoE's split (llama.cpp's 'deepseek-llm' list; all 47 of llama.cpp's test vectors equal with
    scripts/check_gguf_vocab.py): newlines alone, digit runs whole, CJK runs, '_' apart from letters. Its letter
    class holds code points that Unicode normalisation would rewrite (U+1F7D, the Kelvin sign): kept as written."""
    from tokenizers.pre_tokenizers import ByteLevel

    from emoe.gguf_vocab import PRE, build_tokenizer
    tok = build_tokenizer({"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "deepseek-llm",
                           "tokenizer.ggml.tokens": ByteLevel.alphabet()}, "v2.gguf")
    pieces = [p for p, _ in tok.pre_tokenizer.pre_tokenize_str("abc_def 12345 日本\nxy")]
    assert pieces == ["abc", "_", "def", "Ġ", "12345", "Ġ", "æĹ¥æľ¬", "Ċ", "xy"]
    assert "\u1f7d" in PRE["deepseek-llm"][1] and "\u212a-" in PRE["deepseek-llm"][1]


def test_kimi_k2_split_rule_keeps_han_runs_apart():
    """Kimi-K2's rule (its GGUFs are deepseek2 files): o200k's word split, but a Han run is a piece of its own
    even inside a word (checked against llama-server, whose custom handler implements it, on 51 texts with
    scripts/check_gguf_vocab.py --server)."""
    from tokenizers import Regex, pre_tokenizers

    from emoe.gguf_vocab import PRE
    split = pre_tokenizers.Split(Regex(PRE["kimi-k2"]), "isolated").pre_tokenize_str
    pieces = [p for p, _ in split("Hello WORLD it's 12345 中文字符mixed日本語 CamelCase")]
    assert pieces == ["Hello", " WORLD", " it's", " ", "123", "45", " ", "中文字符", "mixed", "日本語", " Camel", "Case"]


def test_fused_gate_up_experts_read_as_the_stacked_ones(tmp_path):
    from emoe.store import DiskStore
    hf = make_tiny("qwen3_moe", tmp_path / "hf", **SHAPE)
    a = import_gguf(write_gguf(hf, tmp_path / "a.gguf", expert_types=("Q8_0",) * 3), tmp_path / "a")
    b = import_gguf(write_gguf(hf, tmp_path / "b.gguf", expert_types=("Q8_0",) * 3, fuse=True), tmp_path / "b")
    sa, sb = DiskStore(Checkpoint(a)), DiskStore(Checkpoint(b))
    for key in [(0, 0), (1, 4), (2, 7)]:
        assert all(torch.equal(x, y) for x, y in zip(sa.read(*key), sb.read(*key)))


def test_yarn_context_extension_is_carried_over(tmp_path):
    yarn = dict(rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=64)
    hf = make_tiny("qwen3_moe", tmp_path / "hf", rope_parameters=yarn, **SHAPE)
    out = import_gguf(write_gguf(hf, tmp_path / "y.gguf", expert_types=("Q8_0",) * 3), tmp_path / "imp")
    assert Checkpoint(out).config.yarn == Checkpoint(hf).config.yarn is not None


def test_experts_are_read_packed_from_the_gguf_and_match_transformers(imported):
    hf, gguf, out = imported
    ck = Checkpoint(out)
    assert {p.path for locs in ck.experts.values() for p in locs.parts()} == {str(gguf.resolve())}
    assert not any("experts" in n for n in ck.tensors)  # nothing of the experts was copied out
    assert sum(f.stat().st_size for f in out.glob("dense-*.safetensors")) < gguf.stat().st_size
    _, sd = transformers_reference(hf, gguf)
    from emoe.store import DiskStore, RamStore
    for store in (DiskStore(ck), RamStore(ck)):
        for layer, e in [(0, 0), (2, 7), (1, 3)]:
            gate, up, down = store.read(layer, e)
            gu, dn = sd[f"model.layers.{layer}.mlp.experts.gate_up_proj"][e], sd[f"model.layers.{layer}.mlp.experts.down_proj"][e]
            i = gu.shape[0] // 2
            torch.testing.assert_close(gate, gu[:i], rtol=0, atol=1e-6)
            torch.testing.assert_close(up, gu[i:], rtol=0, atol=1e-6)
            torch.testing.assert_close(down, dn, rtol=0, atol=1e-6)
    ram = RamStore(ck)
    assert ram.packed and ram.stats.bytes_read == 0
    ram.read(0, 0)
    assert ram.stats.bytes_read == ck.expert_nbytes < 3 * 256 * 256 * 2  # packed: fewer bytes than bf16


def test_logits_match_transformers_reading_the_same_gguf(imported):
    hf, gguf, out = imported
    assert_same_logits(out, transformers_reference(hf, gguf)[0])


def test_dense_tensors_are_written_in_shards_and_a_reimport_replaces_them(imported, tmp_path):
    hf, gguf, out = imported
    small = import_gguf(gguf, tmp_path / "small", dtype=torch.float32, shard_bytes=1 << 20)
    shards = sorted(small.glob("dense-*.safetensors"))
    assert len(shards) > 2
    a, b = Checkpoint(out).dense_state(), Checkpoint(small).dense_state()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    import_gguf(gguf, small, dtype=torch.float32)  # the same folder again: one shard, none left over
    assert [f.name for f in small.glob("dense-*.safetensors")] == ["dense-00001.safetensors"]
    b = Checkpoint(small).dense_state()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_split_gguf_imports_from_its_first_shard_as_the_whole_file(imported, tmp_path):
    hf, _, out = imported
    first = write_gguf(hf, tmp_path / "split.gguf", expert_types=("Q4_K", "Q8_0", "Q6_K"), dense_type="Q8_0",
                       split_max_tensors=12)
    files = sorted(tmp_path.glob("split-*.gguf"))
    assert len(files) > 2 and first == files[0]
    ck = Checkpoint(import_gguf(first, tmp_path / "imp", dtype=torch.float32))
    assert len({p.path for locs in ck.experts.values() for p in locs.parts()}) > 1  # experts in several shards
    from emoe.store import DiskStore
    whole, split = DiskStore(Checkpoint(out)), DiskStore(ck)
    for key in [(0, 1), (1, 5), (2, 7)]:
        for a, b in zip(whole.read(*key), split.read(*key)):
            assert torch.equal(a, b)
    with pytest.raises(GGUFError, match="give the first"):
        import_gguf(files[1], tmp_path / "imp2")
    files[-1].unlink()
    with pytest.raises(GGUFError, match="is missing"):
        import_gguf(first, tmp_path / "imp3")


def test_tokenizer_matches_transformers_conversion(imported):
    needs_pinned_transformers("GGUF tokenizer conversion")
    import transformers as tf
    from tokenizers import Tokenizer
    hf, gguf, out = imported
    ref = tf.AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    mine = Tokenizer.from_file(str(out / "tokenizer.json"))
    for text in ["Summarize: the cat sat on the mat.", "SELECT name FROM users WHERE id = 3;\n\n  it's 12345",
                 "héllo wörld — ünïcode\t\ttabs<|end|>after", "   leading spaces and trailing   "]:
        assert mine.encode(text).ids == ref(text).input_ids, text
        assert mine.pre_tokenizer.pre_tokenize_str(text) == ref.backend_tokenizer.pre_tokenizer.pre_tokenize_str(text)
        assert mine.decode(mine.encode(text).ids, skip_special_tokens=False) == text
    tc = json.loads((out / "tokenizer_config.json").read_text())
    assert tc["chat_template"].startswith("{% for m in messages %}")
    assert mine.token_to_id(tc["eos_token"]) == json.loads((hf / "config.json").read_text())["eos_token_id"]


def test_engine_serves_the_import_under_a_budget_exactly(imported):
    """Loads on demand and host runs give all-resident's tokens; the budget holds. (Host runs here multiply
    the Q4_K and Q8_0 matrices in their kernel forms: bf16 activations, the same greedy tokens.)"""
    _, _, out = imported
    greedy = SamplingParams(max_tokens=6, ignore_eos=True)
    prompts = ["Summarize: the cat sat on the mat.", "hi"]

    def run(**kw):
        eng = Engine(EngineConfig(str(out), **kw))
        return eng, [r.output_ids for r in eng.generate(prompts, greedy, chat=False)]
    _, ref = run(miss_policy="all")
    for kw in (dict(miss_policy="load", budget=0.4), dict(miss_policy="host", budget=0.4, experts_on="ram"),
               dict(miss_policy="auto", budget=0.4, experts_on="ram")):
        eng, got = run(**kw)
        assert got == ref, kw
        assert eng.cache.used_bytes <= eng.cache.budget_bytes


def test_bad_input_is_refused_with_a_reason(imported, tmp_path):
    hf, gguf, out = imported
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf file at all" * 10)
    with pytest.raises(GGUFError, match="not a readable GGUF"):
        import_gguf(junk, tmp_path / "x")
    with pytest.raises(GGUFError, match="does not exist"):
        import_gguf(tmp_path / "missing.gguf", tmp_path / "x")
    with pytest.raises(GGUFError, match="shard 2 of a split GGUF"):
        import_gguf(tmp_path / "m-00002-of-00003.gguf", tmp_path / "x")
    other = write_gguf(hf, tmp_path / "other.gguf", expert_types=("Q8_0",) * 3, arch="bailingmoe")
    with pytest.raises(GGUFError, match="architecture .bailingmoe. is not supported"):
        import_gguf(other, tmp_path / "y")
    assert not (tmp_path / "y").exists()  # refused before anything was written
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    with pytest.raises(GGUFError, match="not an emoe GGUF import"):
        import_gguf(gguf, busy)
    # the import folder is tied to its file: a changed GGUF is refused at load
    moved = tmp_path / "moved"
    import shutil
    shutil.copytree(out, moved)
    meta = json.loads((moved / "gguf.json").read_text())
    meta["files"][0]["bytes"] += 1
    (moved / "gguf.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="changed since `emoe import-gguf`"):
        Checkpoint(moved)


def test_cli_imports_and_points_a_gguf_model_at_the_import(imported, tmp_path, capsys, monkeypatch):
    from emoe.cli import main
    _, gguf, _ = imported
    monkeypatch.setenv("EMOE_CACHE", str(tmp_path / "cache"))
    main(["import-gguf", str(gguf), "--out", str(tmp_path / "cli")])
    assert "Serve it with `emoe serve --model" in capsys.readouterr().out
    assert Checkpoint(tmp_path / "cli").config.num_experts == 8
    main(["generate", "hi", "--model", str(tmp_path / "cli"), "--budget", "0.5", "--miss-policy", "shadow",
          "--max-tokens", "3", "--raw"])
    err = capsys.readouterr().err
    assert "int4 copies of the" in err and "no GPU:" not in err  # choices given: no CPU default
    # a GGUF as --model, as llama.cpp takes one: imported once into $EMOE_CACHE, then reused; without a GPU
    # and without choices, its experts stay in the file's blocks in RAM and run on the CPU kernel
    main(["generate", "hi", "--model", str(gguf), "--max-tokens", "3", "--raw"])
    err = capsys.readouterr().err
    assert "importing" in err
    if not torch.cuda.is_available():
        assert "no GPU:" in err and "resident experts 0.0/" in err and "in CPU kernel forms" in err
        assert "dense projections on its own blocks" in err
    cached = next((tmp_path / "cache" / "gguf").iterdir())
    stamp = (cached / "config.json").stat().st_mtime_ns
    main(["generate", "hi", "--model", str(gguf), "--max-tokens", "3", "--raw"])
    assert "importing" not in capsys.readouterr().err and (cached / "config.json").stat().st_mtime_ns == stamp
    with pytest.raises(SystemExit, match="does not exist"):
        main(["generate", "hi", "--model", str(tmp_path / "missing.gguf")])
    with pytest.raises(SystemExit, match="not a readable GGUF"):
        bad = tmp_path / "bad.gguf"
        bad.write_bytes(b"GGUF" + b"\0" * 40)
        main(["import-gguf", str(bad), "--out", str(tmp_path / "bad")])


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K",
                                   "MXFP4", "IQ4_NL", "IQ4_XS", "IQ2_XXS", "F16"])
def test_torch_dequantisers_equal_gguf_py(qtype):
    """The block formats unpacked with torch ops (on any device) give gguf-py's values (IQ2_XXS through
    gguf_iq); others (F16 here) fall back to it."""
    import gguf
    import numpy as np

    from emoe.gguf_blocks import dequantize
    from gguf_writer import _random_blocks
    q = getattr(gguf.GGMLQuantizationType, qtype)
    w = np.random.default_rng(1).standard_normal((64, 512)).astype(np.float32)
    if qtype in ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K") or qtype.startswith("IQ"):  # gguf-py cannot quantise these
        blocks = _random_blocks(w.shape, q, 1)
    else:
        blocks = gguf.quants.quantize(w, q) if qtype != "F16" else w.astype(np.float16).view(np.uint8)
    if qtype == "MXFP4":  # every exponent byte, the two subnormal ones (0, 1) included
        blocks.reshape(64, -1, 17)[..., 0] = np.arange(blocks.size // 17).reshape(64, -1) % 160
    want = torch.from_numpy(gguf.quants.dequantize(blocks, q).reshape(64, 512))
    got = dequantize(torch.from_numpy(np.ascontiguousarray(blocks)), int(q))
    assert got.shape == want.shape and got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
    if torch.cuda.is_available() and qtype != "F16":  # the packed bytes unpack where they land
        on = dequantize(torch.from_numpy(np.ascontiguousarray(blocks)).cuda(), int(q))
        assert on.is_cuda
        torch.testing.assert_close(on.cpu(), want, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("qtype", ["Q4_0", "Q8_0", "Q4_K", "Q4_1"])
def test_file_copies_hold_the_files_own_values(qtype):
    """Q4_0/Q8_0 → emoe's portable int4/int8 copies, Q4_K → the CPU int4 kernel's layout (zero = its minimum):
    every value equals gguf-py's dequantisation (up to the kernel's bf16 scales), with no second rounding."""
    import gguf
    import numpy as np

    from emoe.gguf_blocks import file_copy, q4_k_parts
    from emoe.quant import dequantize, linear, quantize
    from gguf_writer import _random_blocks
    Q = gguf.GGMLQuantizationType
    w = np.random.default_rng(0).standard_normal((128, 512)).astype(np.float32) * 0.02
    q = getattr(Q, qtype)
    blocks = _random_blocks(w.shape, q, 0) if qtype == "Q4_K" else gguf.quants.quantize(w, q)
    want = torch.from_numpy(gguf.quants.dequantize(blocks, q))
    t = torch.from_numpy(np.ascontiguousarray(blocks))
    if qtype == "Q4_K":
        u, scale, minimum = q4_k_parts(t)
        got = (u.float().view(128, -1, 32) * scale[..., None] - minimum[..., None]).view(128, 512)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
    bits = 8 if qtype == "Q8_0" else 4
    kernel = qtype in ("Q4_K", "Q4_1")
    c = file_copy(t, int(q), bits, kernel=kernel)
    assert c is not None and c.bits == bits and c.shape == tuple(want.shape)
    if not kernel:
        assert torch.equal(dequantize(c), want)  # exact: the file's integers and fp16 scales
    else:
        # scale and zero in bf16: off by at most their rounding, 2^-9 of |8·scale − minimum| per group
        assert (dequantize(c) - want).abs().max() <= 2 ** -8 * want.abs().max()
        x = torch.randn(3, 512)
        err = (linear(x, c) - x @ want.T).abs().mean()
        again = (linear(x, quantize(want, 4)) - x @ want.T).abs().mean()  # emoe re-quantising the file's values
        if qtype != "Q4_1":  # (Q4_1's grid, u·d + m per 32, is one that quant.fit_int4 finds again itself)
            assert err < again / 4
    if qtype == "Q4_0":
        assert torch.equal(dequantize(file_copy(t, int(q), 8, kernel=False)), want)  # int8 holds int4 exactly
    assert file_copy(t, int(Q.Q6_K), 4, kernel=True) is None  # no exact form: quantised as any copy is


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q4_K", "Q8_0", "Q6_K", "Q5_0", "Q5_1", "Q5_K", "MXFP4", "Q3_K",
                                   "Q2_K", "IQ4_NL", "IQ4_XS", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S",
                                   "IQ1_S", "IQ1_M", "TQ1_0", "TQ2_0"])
def test_host_forms_run_the_files_values_on_the_cpu_kernel(qtype):
    """What a RAM tier holds for host runs: the file's values (scales rounded to bf16; Q6_K's and Q2_K's
    quantised again to int8 where the routines take no scales per 16) in the int4 kernel's layout, multiplied
    without dequantising; float matrices have none."""
    import gguf
    import numpy as np

    from emoe.gguf_blocks import dequantize as gguf_dequantize
    from emoe.forms import host_form
    from emoe.quant import KTensor, bf16_matmul, dequantize, linear
    from gguf_writer import _random_blocks
    Q = gguf.GGMLQuantizationType
    q = getattr(Q, qtype)
    w = np.random.default_rng(2).standard_normal((128, 512)).astype(np.float32) * 0.02
    rand = ("Q4_K", "Q6_K", "Q5_K", "Q3_K", "Q2_K", "IQ", "TQ")
    blocks = _random_blocks(w.shape, q, 2) if qtype.startswith(rand) else gguf.quants.quantize(w, q)
    if qtype == "MXFP4":  # exponent bytes 0..239, the subnormal ones included (16x the scale of e >= 252 is inf)
        blocks.reshape(128, -1, 17)[..., 0] = np.arange(blocks.size // 17).reshape(128, -1) % 240
    t = torch.from_numpy(np.ascontiguousarray(blocks))
    want = torch.from_numpy(gguf.quants.dequantize(blocks, q))
    form = host_form(t, int(q))
    from emoe.ckernel import lut_able
    # one plane of the file's nibbles and a codebook (forms.codebook_form; the i-quants' and ternary types' grid
    # values as one), or with scales per 16 (Q2_K, Q3_K, Q6_K, and three i-quants)
    iq = qtype.startswith(("IQ1", "IQ2", "IQ3", "TQ"))
    book = (qtype in ("MXFP4", "IQ4_NL", "IQ4_XS") or iq) and lut_able()
    g16 = qtype in ("Q2_K", "Q3_K", "Q6_K", "IQ2_XS", "IQ2_S", "IQ1_M") and lut_able()
    # 5- and 6-bit values as one plane and their upper bits (Q6_K's with scales per 16)
    hb = qtype in ("Q5_0", "Q5_1", "Q5_K", "Q6_K") and lut_able()
    assert isinstance(form, KTensor) and form.shape == tuple(want.shape) and form.bits == (
        6 if qtype == "Q6_K" and hb else 5 if hb else 4 if qtype[1] == "4" or book or g16 else 8)
    assert (form.lut is not None) == book and (form.group == 16) == g16 and (form.high is not None) == hb
    if hb:  # the file's values; scales and zeros rounded to bf16
        assert form.nbytes <= (1.22 if qtype == "Q6_K" else 1.1) * t.numel()
        assert form.hbits == (2 if qtype == "Q6_K" else 1)
        assert (dequantize(form) - want).abs().max() <= 2 ** -7 * want.abs().max()
    elif iq and book:  # the grid's integers, scales in bf16: 5 bits a weight, 6 with scales per 16
        assert form.nbytes <= (6 if g16 else 5) / (8 * t.numel() / want.numel()) * t.numel() + 16
        assert (dequantize(form) - want).abs().max() <= 2 ** -8 * want.abs().max()
    elif g16:  # the file's values, scales and minimums per 16 in bf16: 6 bits a weight
        assert form.nbytes <= (2.29 if qtype == "Q2_K" else 1.75) * t.numel()
        assert (dequantize(form) - want).abs().max() <= 2 ** -8 * want.abs().max()
    elif qtype in ("Q6_K", "Q2_K") or iq:  # quantised again, as any int8 copy on the kernel: 0.5% of the values' size
        assert form.nbytes <= 10 / (8 * t.numel() / want.numel()) * t.numel()
        err = (dequantize(form) - want).abs()
        assert err.mean() <= 0.01 * want.abs().mean() and err.max() <= 0.01 * want.abs().max()
    elif qtype == "Q3_K":  # its per-16 scales, one plane per half of each 32 (rounded to bf16)
        assert form.nbytes <= 2.92 * t.numel()
        assert (dequantize(form) - want).abs().max() <= 2 ** -8 * want.abs().max()
    elif qtype == "MXFP4":  # exact: small integers times powers of two
        assert form.nbytes <= (1.18 if book else 2.36) * t.numel()
        assert torch.equal(dequantize(form), want)
    elif qtype.startswith("IQ4"):  # the table's integers as int8, scales rounded to bf16
        from emoe.gguf_blocks import file_copy
        assert form.nbytes <= (1.18 if book else 2.36) * t.numel()
        assert (dequantize(form) - want).abs().max() <= 2 ** -8 * want.abs().max()
        copy = file_copy(t, int(q), 8, kernel=False)  # the fast tier's int8 copy: the same integers, fp16 scales
        assert copy.bits == 8 and (dequantize(copy) - want).abs().max() <= 2 ** -11 * want.abs().max()
    elif qtype.startswith("Q5"):  # two planes, the fifth bit stored so that no constant cancels
        assert form.nbytes <= 1.82 * t.numel()
        assert (dequantize(form) - want).abs().max() <= 2 ** -7 * want.abs().max()  # bf16 scales and zeros
    else:
        assert form.nbytes <= 1.18 * t.numel()  # the RAM tier grows by at most 18%
        assert (dequantize(form) - want).abs().max() <= 2 ** -8 * want.abs().max()  # bf16 scales
    assert torch.equal(gguf_dequantize(form, int(q)), dequantize(form))  # a load unpacks the form itself
    x = torch.randn(5, 512)
    ref = x @ want.T
    torch.testing.assert_close(linear(x, form), ref, rtol=0, atol=1e-2 * ref.abs().max().item())
    # the kernel rounds x and each plane's product to bf16: within a few times rounding x alone (MXFP4 split
    # as 16·hi + lo measured 5.2x on a gpt-oss model's weights: the two planes' products cancelled)
    act = (x.bfloat16().float() @ want.T - ref).abs().max()
    out = ref.abs().max() * 2.0 ** -8 if bf16_matmul() else 0  # where the fallback's output is bf16 (AVX512-BF16)
    assert (linear(x, form) - ref).abs().max() <= (6 if qtype in ("Q6_K", "Q2_K") else 4) * act + out
    assert host_form(torch.from_numpy(w.astype(np.float16)), int(Q.F16)) is None
    assert host_form(t[:96], int(q)) is None  # the kernel packs rows in blocks of 64
    four = host_form(t, int(q), bits=4)  # int4 only for types quantised again below 4 bits a weight
    assert four.bits == (4 if qtype in ("Q2_K", "Q4_0", "Q4_1", "Q4_K") or iq else form.bits)
    if qtype == "Q2_K" and not g16:  # 16 levels per 32 against Q2_K's 4 per 16: 3.5% of the values' size here
        assert four.nbytes <= 1.91 * t.numel() and (dequantize(four) - want).abs().mean() <= 0.06 * want.abs().mean()


def test_host_runs_multiply_the_forms_the_ram_tier_holds(imported, monkeypatch):
    """`host` with experts in RAM holds the Q4_K, Q8_0 and Q6_K matrices in kernel forms and runs misses on
    them; without host_kernel, or for profiling (exact_engine), the tier stays packed."""
    from emoe.profile import exact_engine
    from emoe.quant import KTensor
    _, _, out = imported
    greedy = SamplingParams(max_tokens=6, ignore_eos=True)
    eng = Engine(EngineConfig(str(out), miss_policy="host", budget=0.2, experts_on="ram"))
    key = next(k for k in eng.store.ckpt.experts if k not in eng.cache)
    gate, up, down = eng.store._experts[key]
    assert isinstance(gate, KTensor) and isinstance(up, KTensor) and isinstance(down, KTensor)
    got = eng.generate(["hello there"], greedy, chat=False)
    assert len(got[0].output_ids) == 6 and eng.cache.stats.host_runs > 0
    assert eng.cache.used_bytes <= eng.cache.budget_bytes
    # the forms' arithmetic (bf16 activations) against all-resident's float32: greedy tokens can part at a
    # near-tie (qwen2_moe's first token: 0.002 apart), so the logits are held to PyTorch's own kernel's deviation,
    # in float32 on the CPU (a GPU's bf16 dense layers would move both by more than they differ)
    from emoe import ckernel
    ids, cont = list(range(5, 12)), list(range(20, 30))
    eng = Engine(EngineConfig(str(out), miss_policy="host", budget=0.2, experts_on="ram", device="cpu"))
    want = Engine(EngineConfig(str(out), miss_policy="all", device="cpu")).score(ids, cont)
    dev = (eng.score(ids, cont) - want).abs().max()
    monkeypatch.setattr(ckernel, "KQ", "off")
    assert dev <= 1.25 * (eng.score(ids, cont) - want).abs().max() + 1e-4
    for kw in (dict(miss_policy="host", budget=0.2, host_kernel=False), exact_engine(0.2, "ram")):
        plain = Engine(EngineConfig(str(out), **{"experts_on": "ram", **kw}))
        assert all(isinstance(t, torch.Tensor) for t in plain.store._experts[key])


def test_low_bit_files_run_every_expert_on_its_form(tmp_path):
    """A GGUF with llama.cpp's lowest-bit experts (IQ2_XXS gate, IQ4_XS up, Q2_K down) imports, and at budget
    0 every expert runs on its host form (IQ4_XS's values exactly as int8, the others quantised again to
    int8): teacher-forced log-probabilities stay within twice what computing in bf16 moves them."""
    from emoe.quant import KTensor
    hf = make_tiny("qwen3_moe", tmp_path / "hf", **SHAPE)
    gguf = write_gguf(hf, tmp_path / "low.gguf", expert_types=("IQ2_XXS", "IQ4_XS", "Q2_K"), dense_type="Q8_0")
    out = import_gguf(gguf, tmp_path / "imp", dtype=torch.float32)
    assert {q for locs in Checkpoint(out).experts.values() for q in locs.qtypes} == {16, 23, 10}
    ref = Engine(EngineConfig(str(out), miss_policy="all", dtype="float32"))  # on a GPU the default is bf16
    eng = Engine(EngineConfig(str(out), miss_policy="host", budget=0, experts_on="ram", dtype="float32"))
    assert all(isinstance(t, KTensor) for ts in eng.store._experts.values() for t in ts)
    bf16 = Engine(EngineConfig(str(out), miss_policy="all", dtype="bfloat16"))
    ids, cont = ref.codec.encode("hello there, how are"), ref.codec.encode(" you doing today")
    a, b, c = (torch.log_softmax(e.score(ids, cont).float(), -1) for e in (ref, eng, bf16))
    assert torch.isfinite(a).all() and eng.cache.stats.host_runs > 0
    assert (a - b).abs().mean() <= 2 * (a - c).abs().mean()


def test_low_bit_types_take_int4_forms_when_asked_or_short_of_ram(tmp_path, monkeypatch, capsys):
    """host_form_bits=4: the types quantised again below 4 bits a weight (IQ2_XXS, Q2_K) become one-plane int4
    forms, IQ4_XS keeps its exact one (int8): fewer bytes, log-probabilities moved by a fraction of what the
    file's own rounding moved them from the original model. Where int8 forms would not fit the RAM, int4
    ones are made before any type stays packed. Where the routines take codebooks and scales per 16
    (ckernel.lut_able), every one of these types has an exact form of 5-6 bits a weight instead (IQ2_XXS's grid
    values and IQ4_XS's table as codebooks, Q2_K per 16): nothing is quantised again, asked or short of RAM."""
    from emoe import store
    from emoe.ckernel import lut_able
    from emoe.forms import form_parts, form_ratio
    hf = make_tiny("qwen3_moe", tmp_path / "hf", **SHAPE)
    gguf = write_gguf(hf, tmp_path / "low.gguf", expert_types=("IQ2_XXS", "IQ4_XS", "Q2_K"), dense_type="Q8_0")
    out = import_gguf(gguf, tmp_path / "imp", dtype=torch.float32)
    kw = dict(miss_policy="host", budget=0, experts_on="ram", dtype="float32")
    e8, e4 = Engine(EngineConfig(str(out), **kw)), Engine(EngineConfig(str(out), host_form_bits=4, **kw))
    exact = lut_able()
    want8, want4 = ([4, 4, 4], [4, 4, 4]) if exact else ([8, 8, 8], [4, 8, 4])
    assert all([t.bits for t in ts] == want8 for ts in e8.store._experts.values())
    assert all([t.bits for t in ts] == want4 for ts in e4.store._experts.values())
    size = lambda e: sum(t.nbytes for ts in e.store._experts.values() for t in ts)  # noqa: E731
    ref, orig = (Engine(EngineConfig(str(m), miss_policy="all", dtype="float32")) for m in (out, hf))
    ids, cont = ref.codec.encode("hello there, how are"), ref.codec.encode(" you doing today")
    a, b8, b4, o = (torch.log_softmax(e.score(ids, cont).float(), -1) for e in (ref, e8, e4, orig))
    if exact:  # the same forms either way: the file's values, a fraction of int8 forms' bytes
        assert size(e4) == size(e8) and all(ts[0].lut is not None and ts[2].group == 16 for ts in e8.store._experts.values())
        assert torch.equal(b8, b4) and (a - b8).abs().mean() <= 0.25 * (a - o).abs().mean()
    else:
        assert size(e4) < 0.7 * size(e8)
        assert (a - b8).abs().mean() < (a - b4).abs().mean() <= 0.25 * (a - o).abs().mean()
    with pytest.raises(ValueError, match="host_form_bits"):
        EngineConfig(str(out), host_form_bits=2)
    experts = Checkpoint(out).experts
    packed: dict = {}
    for locs in experts.values():
        for kind, n in form_parts(locs):
            packed[kind] = packed.get(kind, 0) + n
    small = sum(locs.nbytes for locs in experts.values()) + sum(
        (form_ratio(k, 4) - 1) * n for k, n in packed.items())  # int4 forms where they may be, IQ4_XS exact
    monkeypatch.setattr(store, "_mem_available", lambda: int(small / 0.85) + 1)
    capsys.readouterr()
    short = Engine(EngineConfig(str(out), **kw))
    err = capsys.readouterr().err
    assert ("low-bit block types held as int4 forms" not in err) if exact else ("2 low-bit block types held as int4 forms" in err)
    assert all([t.bits for t in ts] == want4 for ts in short.store._experts.values())


def test_host_forms_only_where_the_ram_holds_them(imported, monkeypatch, capsys):
    """Forms that would not fit in the RAM available are not built: the block types whose forms grow least
    come first, the rest stay packed, and it says why. Experts that do not fit even packed are refused before
    anything is read, saying what each tier needs."""
    from emoe import store
    from emoe.cache import BudgetError
    from emoe.forms import form_ratio
    from emoe.quant import KTensor
    _, _, out = imported
    experts = Checkpoint(out).experts
    packed = sum(locs.nbytes for locs in experts.values())
    ratio = {q: form_ratio(q) for q in (12, 8, 14)}  # Q4_K, Q8_0, Q6_K: Q4_K's or (one int8 plane) Q8_0's least
    assert max(ratio[12], ratio[8]) < ratio[14]
    least = min(ratio, key=ratio.get)
    grown = sum(p.nbytes for locs in experts.values() for p, q in zip(locs.locs, locs.qtypes) if q == least)
    monkeypatch.setattr(store, "_mem_available", lambda: int((packed + (ratio[least] - 1) * grown) / 0.85) + 1)
    eng = Engine(EngineConfig(str(out), miss_policy="host", budget=0, experts_on="ram"))
    assert "2 of 3 block types stay packed" in capsys.readouterr().err
    for key, locs in experts.items():
        assert [isinstance(t, KTensor) for t in eng.store._experts[key]] == [q == least for q in locs.qtypes]
    assert len(eng.generate(["hi"], SamplingParams(max_tokens=2), chat=False)[0].output_ids) == 2
    monkeypatch.setattr(store, "_mem_available", lambda: int(1.05 * packed))  # packed fits, forms (1.2x+) do not
    eng = Engine(EngineConfig(str(out), miss_policy="host", budget=0, experts_on="ram"))
    assert not eng.store.forms and "stay packed" in capsys.readouterr().err
    assert len(eng.generate(["hi"], SamplingParams(max_tokens=2), chat=False)[0].output_ids) == 2
    monkeypatch.setattr(store, "_mem_available", lambda: packed // 2)
    with pytest.raises(BudgetError, match="GiB in the RAM tier.*--experts-on disk"):
        Engine(EngineConfig(str(out), miss_policy="host", budget=0, experts_on="ram"))
    with pytest.raises(BudgetError, match="cpu fast tier.*lower --budget"):  # all dequantised: 4x+ the packed bytes
        Engine(EngineConfig(str(out), miss_policy="all", experts_on="disk", device="cpu"))
    Engine(EngineConfig(str(out), miss_policy="host", budget=0, experts_on="disk"))  # nothing held: fine


def test_dense_blocks_run_the_files_own_dense_projections(imported):
    """--dense-blocks: a GGUF import's attention, shared-expert and lm_head projections run as host forms of
    the file's own blocks (Q8_0 here), not the import's float copies: the same values up to bf16 scales, and
    teacher-forced log-probabilities within what bf16 activations move them. Norms and routers stay."""
    from emoe.gguf_import import GGUFModel
    from emoe.quant import KTensor, dequantize
    hf, gguf, out = imported
    plain = Engine(EngineConfig(str(out), miss_policy="all", device="cpu"))  # a CPU option: a GPU ignores it
    eng = Engine(EngineConfig(str(out), miss_policy="all", dense_blocks=True, device="cpu"))
    formed = {k for k, v in eng.model.w.items() if isinstance(v, KTensor)}
    names = ("lm_head.weight", "self_attn.qkv_proj.weight", "self_attn.o_proj.weight")  # q, k, v stacked (MoEModel)
    assert all(any(k.endswith(n) for k in formed) for n in names)
    assert not any(k.endswith(("norm.weight", "gate.weight")) for k in formed)
    assert f"{len(formed)} projections in kernel forms" in eng.memory_line()
    if json.loads((hf / "config.json").read_text())["model_type"] == "qwen2_moe":  # 40 rows: the kernel takes 64s
        assert "model.layers.0.mlp.shared_expert.up_proj.weight" in {n for n, _, _ in GGUFModel(gguf).dense_blocks()}
    for k in formed:
        want = plain.model.w[k]
        assert (dequantize(eng.model.w[k]) - want).abs().max() <= 2 ** -8 * want.abs().max()
    ids, cont = eng.codec.encode("hello there, how are"), eng.codec.encode(" you doing today")
    bf16 = Engine(EngineConfig(str(out), miss_policy="all", dtype="bfloat16", device="cpu"))
    a, b, c = (torch.log_softmax(e.score(ids, cont).float(), -1) for e in (plain, eng, bf16))
    assert (a - b).abs().mean() <= 2 * (a - c).abs().mean()  # the kernel's bf16 activations, not other weights
    other = Engine(EngineConfig(str(hf), miss_policy="all", dense_blocks=True, device="cpu"))  # not an import: as it was
    assert not any(isinstance(v, KTensor) for v in other.model.w.values())


def test_a_lean_import_leaves_the_projections_in_the_file(imported, tmp_path):
    """import_gguf(lean=True) writes no float copies of the projections the file quantised (dense_blocks'); its
    folder loads to the full import's dense tensors exactly (dequantised from the file at load, where no form
    replaces them), and serves the same tokens with the projections on the file's blocks or as float copies.
    A gguf.json naming a projection the file lacks is refused with a message saying to import again."""
    from safetensors.torch import load_file

    from emoe.gguf_import import GGUFModel
    hf, gguf, full = imported
    lean = import_gguf(gguf, tmp_path / "lean", dtype=torch.float32, lean=True)
    in_file = json.loads((lean / "gguf.json").read_text())["in_file"]
    assert set(in_file) == {n for n, _, _ in GGUFModel(gguf).dense_blocks()} and "lm_head.weight" in in_file
    written = load_file(str(lean / "dense-00001.safetensors"))
    assert not set(in_file) & set(written) and "model.embed_tokens.weight" in written
    want, got = Checkpoint(full).dense_state(), Checkpoint(lean).dense_state()
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    assert Checkpoint(lean).dense_shapes() == Checkpoint(full).dense_shapes()
    for blocks in (True, False):
        runs = [Engine(EngineConfig(str(d), miss_policy="host", budget=0, experts_on="ram", device="cpu",
                                    dense_blocks=blocks)).generate(
            [[5, 9, 14, 3, 7], [8, 2]], SamplingParams(max_tokens=6, ignore_eos=True, logprobs=1), chat=False)
            for d in (full, lean)]
        assert [(r.output_ids, r.logprobs) for r in runs[0]] == [(r.output_ids, r.logprobs) for r in runs[1]]
    meta = json.loads((lean / "gguf.json").read_text())
    meta["in_file"]["model.layers.0.self_attn.x_proj.weight"] = [4, 4]
    (lean / "gguf.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="x_proj.*import it again"):
        Checkpoint(lean).dense_state()


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss"])
def test_dense_blocks_hold_the_imports_values_in_every_layout(family, tmp_path):
    """The file's dense tensors land under the import's names, in its row order (Mixtral's rotary
    permutation undone on the packed rows) and with its values; a lean import, which leaves them in the file,
    dequantises them at load to the full import's values."""
    from emoe.forms import file_dense
    from emoe.quant import KTensor, dequantize
    over = {"mixtral": dict(hidden_size=256, intermediate_size=256), "gpt_oss": dict(hidden_size=256, intermediate_size=256)}
    hf = make_tiny(family, tmp_path / "hf", **over.get(family, SHAPE))
    gguf = write_gguf(hf, tmp_path / "q8.gguf", expert_types=("Q8_0",) * 3, dense_type="Q8_0")
    out = import_gguf(gguf, tmp_path / "imp", dtype=torch.float32)
    plain = Checkpoint(out).dense_state()
    formed = file_dense(out, {k: v.shape for k, v in plain.items()})
    assert all(isinstance(v, KTensor) for v in formed.values())
    assert "lm_head.weight" in formed and any(k.endswith("o_proj.weight") for k in formed)
    for k, v in formed.items():
        assert (dequantize(v) - plain[k]).abs().max() <= 2 ** -8 * plain[k].abs().max(), k
    lean = Checkpoint(import_gguf(gguf, tmp_path / "lean", dtype=torch.float32, lean=True))
    assert set(formed) <= set(lean.in_file)  # (Mixtral's q and k rows unpermuted on the packed rows here too)
    assert all(torch.equal(v, plain[k]) for k, v in lean.dense_state().items())
    rest = lean.dense_state(skip=formed.keys())  # what the CPU loads beside the forms: those no form holds
    assert set(rest) == set(plain) - set(formed) and all(torch.equal(v, plain[k]) for k, v in rest.items())


def test_shadow_policies_run_on_copies_made_from_the_file(imported):
    """With int8 copies of the experts not held in full, the copies of the Q8_0 up projections are the
    file's bytes, with the CPU kernel or without; the Q4_K and Q6_K matrices are quantised as usual."""
    from emoe.gguf_blocks import GGUFCopies
    from emoe.policies import Shadow
    from emoe.quant import dequantize
    _, _, out = imported
    greedy = SamplingParams(max_tokens=4, ignore_eos=True)
    for qkernel in (True, False):
        eng = Engine(EngineConfig(str(out), budget=0.6, qkernel=qkernel), policy=Shadow(bits=8))
        assert isinstance(eng.cache.copy_files[8], GGUFCopies)
        assert len(eng.generate(["hi there"], greedy, chat=False)[0].output_ids) == 4
        assert eng.cache.used_bytes <= eng.cache.budget_bytes
        key = next(k for k in eng.cache._shadow)
        got, want = dequantize(eng.cache.peek(key)[1]).cpu(), eng.store.read(*key)[1]
        if qkernel:  # the kernel holds the fp16 scales in bf16
            torch.testing.assert_close(got, want, rtol=2 ** -8, atol=0)
        else:
            assert torch.equal(got, want)


@pytest.mark.parametrize("arch,family", [("qwen3next", "qwen3_next"), ("qwen35moe", "qwen3_5_moe"), ("glm4moe", "glm4_moe"),
                                         ("minimax-m2", "minimax_m2"), ("dots1", "dots1"),
                                         ("ernie4_5-moe", "ernie4_5_moe"), ("granitemoe", "granitemoeshared"),
                                         ("gpt-oss", "gpt_oss"), ("deepseek2", "deepseek_v3"), ("llama", "mixtral")])
def test_ggufs_from_llama_cpps_converter(arch, family, tmp_path):
    """GGUFs written by llama.cpp's own convert_hf_to_gguf.py (f16; scripts/make_llamacpp_fixtures.py) of
    the families whose GGUF form only that converter defines: for Qwen3-Next and Qwen3.5-MoE its 1 + w norms,
    −exp(A_log), squeezed conv, split q/k/v and z and (Qwen3.5) tiled value heads are undone; GLM-4.5's grouped
    sigmoid routing, shared expert, dense first layer, biased q/k/v, qk norm and half rotary, and MiniMax-M2's
    biased sigmoid routing and whole-projection qk norm, dots.llm1's grouped sigmoid routing and ERNIE-4.5's
    biased softmax routing, interleaved rotary pairs and SentencePiece vocabulary, and Granite's muP
    multipliers and stacked shared expert are read back; gpt-oss's interleaved gate/up and biases, DeepSeek's
    split kv_b and Mixtral's permuted q/k are undone. The
    import gives the logits transformers gave on the original weights; under a 40% budget with host misses,
    the tokens of all-resident."""
    from pathlib import Path

    from safetensors.torch import load_file
    data = Path(__file__).parent / "data"
    out = import_gguf(data / f"{arch}.gguf", tmp_path / arch, dtype=torch.float32)
    ref = load_file(str(data / f"{arch}-logits.safetensors"))
    cfg, model, dispatch = load_emoe(out)
    assert cfg.family == family and cfg.linear_layers == ((0,) if "qwen" in arch else ())
    assert cfg.rotary_dim == {"glm4moe": 8, "minimax-m2": 8}.get(arch, 4 if "qwen" in arch else 0)
    assert (cfg.mla is not None) == (arch == "deepseek2")
    seq = ref["tokens"][None]
    with torch.no_grad():
        got = model.forward(seq, torch.arange(seq.shape[1])[None], torch.ones_like(seq, dtype=torch.bool), dispatch)
    torch.testing.assert_close(got[0, ::5], ref["logits"], atol=1e-4, rtol=1e-4)  # the positions the fixture keeps
    params = SamplingParams(max_tokens=6, ignore_eos=True)
    want = Engine(EngineConfig(str(out), miss_policy="all")).generate(["hello there"], params, chat=False)
    got = Engine(EngineConfig(str(out), miss_policy="host", budget=0.4)).generate(["hello there"], params, chat=False)
    assert got[0].output_ids == want[0].output_ids


def _rewritten(src, dst, tensors):
    """src's GGUF metadata, with the tensors tensors(reader) yields ((name, array, raw dtype or None) each), as dst."""
    import gguf
    reader = gguf.GGUFReader(src)
    arch = reader.fields["general.architecture"].contents()
    writer = gguf.GGUFWriter(str(dst), arch)
    for f in reader.fields.values():
        if f.name != "general.architecture" and not f.name.startswith("GGUF."):
            sub = f.types[-1] if f.types[0] == gguf.GGUFValueType.ARRAY else None
            writer.add_key_value(f.name, f.contents(), f.types[0], sub_type=sub)
    for name, t, raw in tensors(reader):
        writer.add_tensor(name, t, raw_dtype=raw)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dst


@pytest.mark.parametrize("arch", ["qwen3next", "qwen35moe"])
def test_hybrid_files_dense_blocks_come_in_the_imports_row_order(arch, tmp_path):
    """A quantised Qwen3-Next / Qwen3.5-MoE file's dense projections run on its own blocks too (--dense-blocks):
    the converter fixture with its projections in Q8_0 gives, for each block matrix dense_blocks yields, the
    values the import holds under that name (Qwen3.5's value heads untiled on the packed rows), and leaves out
    only what no row order can give (Qwen3.5's out_proj, whose columns move; b and a)."""
    from pathlib import Path

    import gguf
    import numpy as np
    from safetensors.torch import load_file

    from emoe.gguf_blocks import dequantize
    from emoe.gguf_import import GGUFModel
    q8 = set()

    def tensors(reader):
        for t in reader.tensors:
            a = np.array(t.data)
            if a.dtype == np.float16 and a.ndim == 2 and a.shape[1] % 32 == 0:
                q8.add(t.name)
                yield t.name, gguf.quants.quantize(a.astype(np.float32), Q8), Q8
            else:
                yield t.name, a, gguf.GGMLQuantizationType.F16 if a.dtype == np.float16 else None
    Q8 = gguf.GGMLQuantizationType.Q8_0
    _rewritten(Path(__file__).parent / "data" / f"{arch}.gguf", tmp_path / "q8.gguf", tensors)
    out = import_gguf(tmp_path / "q8.gguf", tmp_path / "imp", dtype=torch.float32)
    plain = load_file(str(out / "dense-00001.safetensors"))
    got = {n: dequantize(rows, qtype) for n, rows, qtype in GGUFModel(tmp_path / "q8.gguf").dense_blocks()}
    kinds = {n.split(".")[2] for n in q8 if n.startswith("blk.")}
    assert {"attn_qkv", "attn_gate", "ssm_out", "attn_q", "attn_output"} <= kinds
    assert any("linear_attn.in_proj_qkv" in n for n in got) and any("linear_attn.in_proj_z" in n for n in got)
    assert any("self_attn.o_proj" in n for n in got) and "lm_head.weight" in got
    assert any("linear_attn.out_proj" in n for n in got) == (arch == "qwen3next")
    for n, w in got.items():
        assert torch.equal(w, plain[n].float()), n


def test_legacy_qwen3next_files_with_the_fused_ssm_in(tmp_path):
    """Qwen3-Next GGUFs from before llama.cpp split in_proj_qkvz keep it whole as `ssm_in` (grouped by key head,
    as transformers holds it); llama.cpp still reads them. The converter fixture rewritten that way gives the
    same logits."""
    from pathlib import Path

    import gguf
    import numpy as np
    from safetensors.torch import load_file
    data = Path(__file__).parent / "data"

    def tensors(reader):
        arch = reader.fields["general.architecture"].contents()
        meta = {k: reader.fields[f"{arch}.{k}"].contents() for k in ("ssm.group_count", "ssm.state_size", "ssm.inner_size")}
        hk, dk, vd = meta["ssm.group_count"], meta["ssm.state_size"], meta["ssm.inner_size"]
        held = {t.name: np.array(t.data) for t in reader.tensors}
        for name, t in held.items():
            if name.endswith("attn_gate.weight"):
                continue
            if name.endswith("attn_qkv.weight"):  # back to [per key head: q, k, its values, their gates]
                z = held[name.replace("attn_qkv", "attn_gate")]
                q, k, v = t[:hk * dk], t[hk * dk:2 * hk * dk], t[2 * hk * dk:]
                parts = [p.reshape(hk, -1, t.shape[-1]) for p in (q, k, v, z)]
                name, t = name.replace("attn_qkv", "ssm_in"), np.concatenate(parts, 1).reshape(-1, t.shape[-1])
                assert t.shape[0] == 2 * hk * dk + 2 * vd
            yield name, t, gguf.GGMLQuantizationType.F16 if t.dtype == np.float16 else None
    _rewritten(data / "qwen3next.gguf", tmp_path / "legacy.gguf", tensors)
    out = import_gguf(tmp_path / "legacy.gguf", tmp_path / "legacy", dtype=torch.float32)
    names = load_file(str(out / "dense-00001.safetensors")).keys()
    assert "model.layers.0.linear_attn.in_proj_qkvz.weight" in names and not any("in_proj_qkv." in n for n in names)
    cfg, model, dispatch = load_emoe(out)
    ref = load_file(str(data / "qwen3next-logits.safetensors"))
    seq = ref["tokens"][None]
    with torch.no_grad():
        got = model.forward(seq, torch.arange(seq.shape[1])[None], torch.ones_like(seq, dtype=torch.bool), dispatch)
    torch.testing.assert_close(got[0, ::5], ref["logits"], atol=1e-4, rtol=1e-4)


@pytest.mark.skipif(not (__import__("emoe.ckernel").ckernel.library() and __import__("emoe.ckernel").ckernel.library().modes),
                    reason="no vector routine for this CPU")
@pytest.mark.parametrize("family", ["qwen3_moe", "qwen2_moe", "olmoe", "gpt_oss"])
@pytest.mark.parametrize("policy", ["host", "auto"])
def test_a_decode_step_whose_layers_all_run_on_host_forms_is_one_call(family, policy, tmp_path, monkeypatch):
    """At budget 0 on a CPU, with the dense projections on the file's blocks (the CPU default for a GGUF), a
    decode step of a model whose layers all take the attention block and the table call (Qwen3-MoE, OLMoE, gpt-oss
    with MXFP4 experts and its biases, sinks and windows) runs every layer in one C call (kq_layers): the same tokens, log-probabilities bit for bit,
    counters and routing traces as layer by layer. Qwen2-MoE's gated shared expert runs in it too, the same but
    for its gate's dot product (C's order, not MKL's): log-probabilities within 1e-4. Policies that change the
    router's choice (the sensitivity probe's random routing) keep the per-layer path."""
    import emoe.model as model_mod
    from emoe import cstep
    from emoe.policies import RandomRouting
    olmoe = dict(hidden_size=256, intermediate_size=256, num_attention_heads=4, clip_qkv=None)  # (OLMoE-1B-7B: no clip)
    over = {"olmoe": olmoe, "gpt_oss": dict(hidden_size=256, intermediate_size=256, sliding_window=4, num_attention_heads=4,
                                            num_key_value_heads=2, head_dim=64),  # (k and v: 128 rows, a form each)
            "qwen2_moe": dict(OVER["qwen2_moe"], shared_expert_intermediate_size=256)}  # (its shared expert on forms)
    hf = make_tiny(family, tmp_path / "hf", **over.get(family) or OVER[family])
    types = ("MXFP4",) * 3 if family == "gpt_oss" else ("Q4_K", "Q8_0", "Q6_K")
    out = import_gguf(write_gguf(hf, tmp_path / "m.gguf", expert_types=types, dense_type="Q8_0"), tmp_path / "imported",
                      dtype=torch.float32)
    ids = [(7 * i) % 200 + 3 for i in range(12)]
    calls = []
    real = cstep.layers
    monkeypatch.setattr(cstep, "layers", lambda *a: calls.append(1) or real(*a))

    def run():
        eng = Engine(EngineConfig(str(out), miss_policy=policy, budget=0, experts_on="ram", device="cpu", trace=True,
                                  max_batch=2, dense_blocks=True))
        got = eng.generate([ids, ids[3:]], SamplingParams(max_tokens=6, ignore_eos=True, logprobs=2))
        s, st = eng.cache.stats, eng.store.stats
        return ([(r.output_ids, r.logprobs) for r in got], [torch.stack((r.trace.prefill, r.trace.decode)) for r in got],
                (s.hits, s.misses, s.host_runs, st.reads, st.bytes_read))
    fast = run()
    assert len(calls) == 5  # one call a decode step (the two rows decode together; the first token is the prefill's)
    monkeypatch.setattr(model_mod, "decode_layers", lambda *a: False)
    slow = run()
    assert [t for t, _ in fast[0]] == [t for t, _ in slow[0]] and fast[2] == slow[2], (fast[2], slow[2])
    assert all(torch.equal(a, b) for a, b in zip(fast[1], slow[1]))
    if family == "qwen2_moe":
        assert max(abs(a[0] - b[0]) for (_, la), (_, lb) in zip(fast[0], slow[0]) for a, b in zip(la, lb)) <= 1e-4
    else:
        assert fast[0] == slow[0]
    monkeypatch.undo()
    eng = Engine(EngineConfig(str(out), miss_policy="host", budget=0, experts_on="ram", device="cpu", dense_blocks=True))
    x = torch.randn(1, eng.cfg.hidden_size)
    from emoe.decode_block import _mlps
    assert eng.dispatch.step_tables(range(eng.cfg.num_layers), x) is not None and _mlps(eng.model) is not None
    eng.dispatch.policy = RandomRouting([0])
    assert eng.dispatch.step_tables(range(eng.cfg.num_layers), x) is None


@pytest.mark.skipif(not (__import__("emoe.ckernel").ckernel.library() and __import__("emoe.ckernel").ckernel.library().modes),
                    reason="no vector routine for this CPU")
@pytest.mark.parametrize("policy", ["host", "auto"])
def test_a_layer_whose_experts_all_run_on_host_forms_takes_one_table_call(imported, policy, monkeypatch):
    """At budget 0 on a CPU every expert runs on its host forms: the layer goes to the C routine as one table of
    all its experts, without a fetch per expert. Same logits bit for bit, same tokens and the same counters
    (misses, host runs, slow-tier reads and bytes) as the per-expert path; with an expert resident, or rows
    past the routine's, the per-expert path runs."""
    from emoe import ckernel
    from emoe.dispatch import ExpertDispatch
    _, _, out = imported
    ids = [(7 * i) % 200 + 3 for i in range(12)]
    calls = []
    real = ckernel.kq_moe_all
    monkeypatch.setattr(ckernel, "kq_moe_all", lambda *a: calls.append(1) or real(*a))

    def run():  # on the CPU: a GPU's host experts take run_experts' one kq_moe call (not yet this table)
        eng = Engine(EngineConfig(str(out), miss_policy=policy, budget=0, experts_on="ram", device="cpu"))
        logits = eng.score(ids[:1], ids[1:])
        toks = [r.output_ids for r in eng.generate([ids], SamplingParams(max_tokens=5, ignore_eos=True))]
        s, st = eng.cache.stats, eng.store.stats
        return logits, toks, (s.hits, s.misses, s.host_runs, st.reads, st.bytes_read)
    fast = run()
    assert calls
    monkeypatch.setattr(ExpertDispatch, "_host_table", lambda self, layer, x: None)
    calls.clear()
    slow = run()
    assert not calls
    assert torch.equal(fast[0], slow[0]) and fast[1] == slow[1] and fast[2] == slow[2], (fast[2], slow[2])
    monkeypatch.undo()
    eng = Engine(EngineConfig(str(out), miss_policy=policy, budget=0.4, experts_on="ram", device="cpu"))  # experts resident
    layer = next(iter(eng.model.moe))
    x = torch.randn(2, eng.cfg.hidden_size)
    assert eng.cache.n_resident[layer] > 0 and eng.dispatch._host_table(layer, x) is None
    eng = Engine(EngineConfig(str(out), miss_policy=policy, budget=0, experts_on="ram", device="cpu"))
    assert eng.dispatch._host_table(layer, x) is not None
    assert eng.dispatch._host_table(layer, torch.randn(256, eng.cfg.hidden_size)) is None  # a prefill's rows


def test_a_gguf_engine_runs_int8_activations_unless_a_mode_was_asked(imported, monkeypatch):
    """`auto`: an engine over a GGUF's forms multiplies them with int8 activations (llama.cpp's rounding, the one
    the file was quantised for), whatever the process's mode; the mode is its own, set only while it runs. A mode
    asked for (EMOE_KQ, --activations) rules every engine."""
    from emoe import ckernel
    from emoe.report import memory_line
    lib = ckernel.library()
    if lib is None or not lib.modes & ckernel.MODES["int8"] or not lib.modes & ckernel.MODES["bf16"]:
        pytest.skip("the routines of both modes are not built on this CPU")
    _, _, out = imported
    ids = Engine(EngineConfig(str(out), miss_policy="all")).codec.encode("Summarize: the cat sat on the mat.")

    def logits(asked, kq):
        monkeypatch.setattr(ckernel, "ASKED", asked)
        monkeypatch.setattr(ckernel, "KQ", kq)
        eng = Engine(EngineConfig(str(out), miss_policy="host", budget=0.4, experts_on="ram"))
        got = eng.score(ids[:6], ids[6:])
        assert ckernel.mode() == kq  # (only while the engine's forward runs)
        return eng, got
    own, got = logits("auto", "bf16")
    assert own.model.activations == "int8" and "int8 activations" in memory_line(own)
    asked_int8, want = logits("int8", "int8")
    assert asked_int8.model.activations is None and torch.equal(got, want)
    asked_bf16, bf16 = logits("bf16", "bf16")
    assert asked_bf16.model.activations is None and "bf16 activations" in memory_line(asked_bf16)
    assert not torch.equal(got, bf16)


@pytest.mark.skipif(not (__import__("emoe.ckernel").ckernel.library() and __import__("emoe.ckernel").ckernel.library().modes),
                    reason="no vector routine for this CPU")
def test_deepseek_decode_runs_the_files_own_k_b_and_v_b(tmp_path, monkeypatch):
    """A GGUF's quantised k_b and v_b (llama.cpp's converter splits kv_b into them) run in the decode step as the
    file holds them, per head: the weights llama.cpp multiplies (scales in bf16), at the file's bytes; the tokens are
    those of int8 forms made from kv_b's floats, the log-probabilities within their rounding."""
    from emoe import decode_block
    from emoe.quant import dequantize
    from emoe.gguf_blocks import dequantize as file_dequantize
    from emoe.gguf_import import open_gguf
    shape = dict(hidden_size=256, moe_intermediate_size=128, intermediate_size=128, num_attention_heads=4,
                 num_key_value_heads=4, kv_lora_rank=64, qk_rope_head_dim=64, qk_nope_head_dim=32, v_head_dim=64,
                 q_lora_rank=64)
    hf = make_tiny("deepseek_v3", tmp_path / "hf", **shape)
    gguf = write_gguf(hf, tmp_path / "m.gguf", expert_types=("Q8_0",) * 3, dense_type="Q8_0", heads_type="Q4_0")
    out = import_gguf(gguf, tmp_path / "imp", dtype=torch.float32)
    heads = {name: file_dequantize(rows, q) for name, rows, q in open_gguf(gguf).head_blocks()}
    assert len(heads) == 2 * 3  # k_b and v_b of each of the 3 layers

    def run(file_heads: bool):
        if not file_heads:
            monkeypatch.setattr(decode_block, "_file_heads", lambda *a: None)
        eng = Engine(EngineConfig(str(out), miss_policy="host", budget=0, experts_on="ram", device="cpu",
                                  dense_blocks=True))
        for i in range(3):
            k, v = decode_block.block_weights(eng.model, i)[-1]
            a = f"model.layers.{i}.self_attn."
            assert (k is eng.model.w.get(a + "k_b_heads") and v is eng.model.w.get(a + "v_b_heads")) == file_heads
            for form, name in ((k, "k_b_heads"), (v, "v_b_heads")) if file_heads else ():  # (scales rounded to bf16)
                assert torch.allclose(dequantize(form), heads[a + name], rtol=2 ** -8, atol=1e-7)
        got = eng.generate([[5, 9, 14, 3, 7], [8, 2, 11]], SamplingParams(max_tokens=6, ignore_eos=True, logprobs=2),
                           chat=False)
        return [(r.output_ids, [lp[0] for lp in r.logprobs]) for r in got]
    own, made = run(True), run(False)
    assert [t for t, _ in own] == [t for t, _ in made]
    assert max(abs(a - b) for (_, x), (_, y) in zip(own, made) for a, b in zip(x, y)) <= 3e-2


def test_llama4_files_as_llama_cpp_runs_them(tmp_path):
    """A Llama 4 GGUF (llama.cpp's llama4: experts split, the dense layers' size as feed_forward_length, Llama 3 rope
    as rope_freqs, no NoPE or temperature keys: llama.cpp fixes them) gives the logits of transformers' model built
    with the settings llama.cpp assumes: every fourth layer without rotary, its queries scaled from position 8192,
    qk norm with fewer than 128 experts."""
    import transformers
    hf = make_tiny("llama4", tmp_path / "hf", num_hidden_layers=4, no_rope_layers=None, floor_scale=8192,
                   attention_chunk_size=8192, interleave_moe_layer_step=2)
    gguf = write_gguf(hf, tmp_path / "l4.gguf", expert_types=("F32",) * 3)
    out = import_gguf(gguf, tmp_path / "imp", dtype=torch.float32)
    ck = Checkpoint(out)
    assert ck.config.family == "llama4" and ck.config.nope_layers == (3,) and ck.config.moe_layers == (1, 3)
    assert ck.config.rope_factors is not None and ck.config.qk_norm
    assert_same_logits(out, transformers.AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval())
