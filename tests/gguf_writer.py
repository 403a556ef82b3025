"""Writes a Hugging Face Qwen2-MoE / Qwen3-MoE folder as llama.cpp's convert_hf_to_gguf.py would (tensor
names, metadata keys, experts stacked per layer), with chosen quantisation types: test fixtures for
`emoe import-gguf`. K-quants cannot be made by gguf-py, so those tensors get random valid blocks and the
reference weights are read back from the file."""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import torch

ARCH = {"qwen2_moe": "qwen2moe", "qwen3_moe": "qwen3moe", "olmoe": "olmoe", "mixtral": "llama", "gpt_oss": "gpt-oss",
        "deepseek_v2": "deepseek2", "deepseek_v3": "deepseek2", "deepseek_v32": "deepseek32", "llama4": "llama4",
        "glm_moe_dsa": "glm-dsa"}
# tensor names come from gguf-py's TensorNameMap, the table llama.cpp's converter itself names tensors by,
# not from emoe.gguf_import's, so that a wrong entry there cannot be mirrored by the fixture
MODEL_ARCH = {"qwen2moe": "QWEN2MOE", "qwen3moe": "QWEN3MOE", "olmoe": "OLMOE", "llama": "LLAMA", "gpt-oss": "GPT_OSS",
              "deepseek2": "DEEPSEEK2", "deepseek32": "DEEPSEEK2", "llama4": "LLAMA4",
              "glm-dsa": "DEEPSEEK2"}  # (deepseek32: deepseek2's names, and its indexer's)
# DeepSeek-V3.2's indexer tensors as llama.cpp's converter names them (gguf-py's INDEXER_*)
INDEXER = {"wq_b": "attn_q_b", "wk": "attn_k", "weights_proj": "proj", "k_norm": "k_norm"}


def _random_blocks(shape: tuple[int, ...], qtype, seed: int) -> np.ndarray:
    """Random bytes in qtype's block layout, with every fp16 super-block scale set small and finite (random
    bits there may be inf or nan)."""
    import gguf
    Q = gguf.GGMLQuantizationType
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, size=(*shape[:-1], shape[-1] // block, size), dtype=np.uint8)
    d = np.float16(0.002)
    scale = np.full(raw.shape[:-1], d, dtype=np.float16).view(np.uint8).reshape(*raw.shape[:-1], 2)
    if qtype in (Q.Q4_K, Q.Q5_K):
        raw[..., 0:2], raw[..., 2:4] = scale, scale  # d, dmin lead the block
    elif qtype in (Q.IQ4_NL, Q.IQ4_XS, Q.IQ2_XXS, Q.IQ2_XS, Q.IQ2_S, Q.IQ3_XXS, Q.IQ3_S, Q.IQ1_S):
        raw[..., 0:2] = scale
    elif qtype in (Q.Q6_K, Q.Q3_K, Q.TQ1_0, Q.TQ2_0):
        raw[..., -2:] = scale  # d ends it
    elif qtype == Q.Q2_K:
        raw[..., -4:-2], raw[..., -2:] = scale, scale  # d, dmin end it
    elif qtype == Q.IQ1_M:  # d's four nibbles top the last four u16s, lowest first; the scale bits stay below
        bits = int(d.view(np.uint16))
        for i in range(4):
            raw[..., 49 + 2 * i] = (raw[..., 49 + 2 * i] & 0x0F) | (((bits >> (4 * i)) & 0x0F) << 4)
    else:
        raise ValueError(f"no random-block rule for {qtype!r}")
    return raw.reshape(*shape[:-1], -1)


def _quantised(name: str, w: np.ndarray, qtype, seed: int) -> tuple[np.ndarray, object]:
    import gguf
    Q = gguf.GGMLQuantizationType
    if qtype not in (Q.F32, Q.F16) and w.shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0]:
        qtype = Q.F16  # as llama.cpp's converter falls back for rows its blocks do not divide
    if qtype in (Q.F32, Q.F16):
        return w.astype(np.float32 if qtype == Q.F32 else np.float16), None
    if qtype in (Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K) or qtype.name.startswith(("IQ", "TQ")):
        return _random_blocks(w.shape, qtype, seed), qtype  # types gguf-py cannot quantise
    return gguf.quants.quantize(w.astype(np.float32), qtype), qtype


def write_gguf(hf_dir: Path, out: Path, expert_types=("Q8_0", "Q4_0", "Q6_K"), dense_type="F32",
               chat_template: str | None = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}",
               arch: str | None = None, split_max_tensors: int = 0, per_expert: bool = False,
               fuse: bool = False, kv_b_whole: bool = False, heads_type: str = "F32", mtp: bool = False) -> Path:
    """expert_types: gate, up, down quantisation; dense_type: attention and shared-expert matrices
    (norms, biases and the router stay F32 as llama.cpp keeps them); fuse: gate and up experts stacked in
    one ffn_gate_up_exps tensor, as newer converters may write them. gpt-oss as llama.cpp's GptOssModel
    writes it: gate/up de-interleaved, expert biases split likewise, sinks as attn_sinks.weight. DeepSeek as
    its DeepseekV2Model writes it: MLA as MQA metadata, kv_b split into k_b (transposed) and v_b unless
    kv_b_whole (older files), those two per-head tensors in heads_type. Mixtral is written as llama.cpp
    writes it: architecture 'llama', q/k rows permuted for its rotary, a SentencePiece vocabulary with
    scores; per_expert: the early one-tensor-per-expert layout (blk.N.ffn_gate.E.weight). DeepSeek-V3.2 with its
    indexer's tensors and top_k; mtp: a multi-token-prediction block after the model's (random, nextn_predict_layers
    = 1), as the GLM-4.5 and V3.2 converters append it."""
    import gguf
    from safetensors.torch import load_file
    cfg = json.loads((hf_dir / "config.json").read_text())
    cfg["model_type"] = {"llama4_text": "llama4"}.get(cfg["model_type"], cfg["model_type"])
    arch = arch or ARCH[cfg["model_type"]]
    sd = {}
    for f in sorted(hf_dir.glob("*.safetensors")):
        sd.update(load_file(str(f)))
    w = gguf.GGUFWriter(str(out), arch, split_max_tensors=split_max_tensors)
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_block_count(cfg["num_hidden_layers"] + mtp)
    if mtp:
        w.add_uint32(f"{arch}.nextn_predict_layers", 1)
    if cfg.get("index_topk"):
        w.add_uint32(f"{arch}.attention.indexer.top_k", cfg["index_topk"])
    w.add_feed_forward_length(cfg.get("intermediate_size_mlp") or cfg["intermediate_size"])
    w.add_head_count(cfg["num_attention_heads"])
    deepseek = cfg["model_type"].startswith("deepseek") or cfg["model_type"] == "glm_moe_dsa"  # (GLM-5: its MLA)
    w.add_head_count_kv(1 if deepseek else cfg["num_key_value_heads"])  # the converter writes MLA as MQA
    w.add_rope_freq_base(float(cfg.get("rope_theta") or cfg.get("rope_parameters", {}).get("rope_theta", 10000.0)))
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    if rope.get("rope_type") == "yarn":
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(rope["factor"])
        w.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
    n_experts = cfg.get("num_experts") or cfg.get("n_routed_experts") or cfg["num_local_experts"]
    w.add_expert_count(n_experts)
    if deepseek:
        _deepseek_keys(w, cfg, rope)
    w.add_expert_used_count(cfg["num_experts_per_tok"])
    if cfg["model_type"] == "mixtral":
        w.add_rope_dimension_count(cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"])
    if cfg["model_type"] not in ("olmoe", "mixtral"):  # their expert size is feed_forward_length
        w.add_expert_feed_forward_length(cfg.get("moe_intermediate_size") or cfg["intermediate_size"])
    if cfg["model_type"] == "llama4":  # Llama4Model: feed_forward_length is the dense layers', rope_freqs Llama 3's
        _llama4_keys(w, cfg, rope)
    if cfg.get("shared_expert_intermediate_size"):
        w.add_expert_shared_feed_forward_length(cfg["shared_expert_intermediate_size"])
    if cfg["model_type"] == "gpt_oss":
        w.add_sliding_window(cfg["sliding_window"])
    if cfg["model_type"] in ("qwen3_moe", "gpt_oss"):
        head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    if cfg["model_type"] == "mixtral":
        _spm_tokenizer(w, cfg["vocab_size"])
    else:
        _byte_level_tokenizer(w, hf_dir, cfg)
    w.add_eos_token_id(cfg["eos_token_id"])
    if chat_template:
        w.add_chat_template(chat_template)
    _tensors(w, sd, cfg, expert_types, dense_type, per_expert, fuse, kv_b_whole, heads_type)
    if mtp:  # what emoe must leave alone: a block with its own norms, experts and nextn projection
        n, h = cfg["num_hidden_layers"], cfg["hidden_size"]
        g = np.random.default_rng(7)
        for name, shape in ((f"blk.{n}.attn_norm.weight", (h,)), (f"blk.{n}.nextn.eh_proj.weight", (h, 2 * h)),
                            (f"blk.{n}.ffn_gate_exps.weight", (n_experts, cfg.get("moe_intermediate_size", 8), h))):
            w.add_tensor(name, g.standard_normal(shape).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    if split_max_tensors:  # NAME-00001-of-0000N.gguf …, as llama.cpp's gguf-split names them
        return sorted(out.parent.glob(f"{out.stem}-00001-of-*.gguf"))[0]
    return out


def _byte_level_tokenizer(w, hf_dir: Path, cfg: dict) -> None:
    import gguf
    tok = json.loads((hf_dir / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    tokens = [None] * cfg["vocab_size"]
    types = [gguf.TokenType.NORMAL] * cfg["vocab_size"]
    for t, i in vocab.items():
        tokens[i] = t
    for a in tok.get("added_tokens", []):
        tokens[a["id"]] = a["content"]
        types[a["id"]] = gguf.TokenType.CONTROL if a.get("special") else gguf.TokenType.USER_DEFINED
    for i, t in enumerate(tokens):  # padding rows of the embedding, as the converter names them
        if t is None:
            tokens[i], types[i] = f"[PAD{i}]", gguf.TokenType.UNUSED
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre({"olmoe": "olmo", "gpt_oss": "gpt-4o", "deepseek_v2": "deepseek-v3",
                         "deepseek_v3": "deepseek-v3", "deepseek_v32": "deepseek-v3"}.get(cfg["model_type"], "qwen2"))
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_add_bos_token(False)


def _spm_tokenizer(w, size: int) -> None:
    """A SentencePiece-style vocabulary as Llama/Mixtral files carry it: <unk>, <s>, </s>, 256 byte pieces,
    then learned '▁' pieces scored by merge rank (no merges: readers recover them from the scores)."""
    import gguf
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    T = gguf.TokenType
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    types = [T.UNKNOWN, T.CONTROL, T.CONTROL] + [T.BYTE] * 256
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
    text = ["Summarize: the cat sat on the mat.", "Is this review positive or negative? Great food!",
            "SELECT name FROM users WHERE id = 3;", "Answer the question: who wrote Hamlet?"] * 20
    bpe.train_from_iterator(text, trainers.BpeTrainer(vocab_size=size - len(tokens), show_progress=False))
    learned = sorted(bpe.get_vocab().items(), key=lambda kv: kv[1])
    scores = [0.0] * len(tokens) + [-float(i) for i in range(len(learned))]
    tokens += [t for t, _ in learned]
    types += [T.NORMAL] * len(learned)
    while len(tokens) < size:
        tokens.append(f"[PAD{len(tokens)}]")
        types.append(T.UNUSED)
        scores.append(-1e9)
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_scores(scores)
    w.add_bos_token_id(1)
    w.add_add_bos_token(True)


def _permute(a: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's LlamaModel.permute: each head's rotary halves interleaved."""
    return a.reshape(n_head, 2, a.shape[0] // n_head // 2, *a.shape[1:]).swapaxes(1, 2).reshape(a.shape)


def _llama4_keys(w, cfg: dict, rope: dict) -> None:
    import math
    head = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    w.add_rope_dimension_count(head)
    w.add_interleave_moe_layer_step(cfg.get("interleave_moe_layer_step", 1))
    if rope.get("rope_type") == "llama3":  # LlamaModel.generate_extra_tensors, as written there
        factor, low, high = rope["factor"], rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
        ctx, out = rope["original_max_position_embeddings"], []
        for freq in 1.0 / (rope["rope_theta"] ** (torch.arange(0, head, 2, dtype=torch.float32) / head)):
            wavelen = 2 * math.pi / freq
            smooth = (ctx / wavelen - low) / (high - low) if high != low else 0.0
            out.append(1 if wavelen < ctx / high else factor if wavelen > ctx / low else 1 / ((1 - smooth) / factor + smooth))
        w.add_tensor("rope_freqs.weight", np.array(out, dtype=np.float32))


def _deepseek_keys(w, cfg: dict, rope: dict) -> None:
    """DeepseekV2Model.set_gguf_parameters, with the base class's gating and group keys."""
    import gguf
    rank, r = cfg["kv_lora_rank"], cfg["qk_rope_head_dim"]
    w.add_leading_dense_block_count(cfg.get("first_k_dense_replace") or 0)
    if cfg.get("q_lora_rank"):
        w.add_q_lora_rank(cfg["q_lora_rank"])
    w.add_kv_lora_rank(rank)
    w.add_key_length(rank + r)
    w.add_value_length(rank)
    w.add_key_length_mla(cfg["qk_nope_head_dim"] + r)
    w.add_value_length_mla(cfg["v_head_dim"])
    w.add_expert_shared_count(cfg.get("n_shared_experts") or 0)
    w.add_expert_weights_scale(cfg.get("routed_scaling_factor") or 1.0)
    if cfg.get("norm_topk_prob"):
        w.add_expert_weights_norm(True)
    w.add_rope_dimension_count(r)
    if rope.get("mscale_all_dim"):
        w.add_rope_scaling_yarn_log_mul(0.1 * rope["mscale_all_dim"])
    sigmoid = cfg.get("scoring_func", "softmax") == "sigmoid" or cfg["model_type"] in ("deepseek_v3", "deepseek_v32", "glm_moe_dsa")
    w.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID if sigmoid else gguf.ExpertGatingFuncType.SOFTMAX)
    if (cfg.get("n_group") or 1) > 1:
        w.add_expert_group_count(cfg["n_group"])
        w.add_expert_group_used_count(cfg["topk_group"])


def _tensors(w, sd: dict, cfg: dict, expert_types, dense_type: str, per_expert: bool, fuse: bool,
             kv_b_whole: bool, heads_type: str = "F32") -> None:
    import gguf
    Q = gguf.GGMLQuantizationType
    n_experts = cfg.get("num_experts") or cfg.get("n_routed_experts") or cfg["num_local_experts"]
    llama = cfg["model_type"] == "mixtral"
    dense_q = getattr(Q, dense_type)
    # named as the model's own architecture even where general.architecture is overridden (bad-input tests)
    names = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, MODEL_ARCH[ARCH[cfg["model_type"]]]),
                                     cfg["num_hidden_layers"])
    seed = 0
    for name, t in sd.items():
        if ".experts." in name:
            continue
        a = t.float().numpy()
        if ".self_attn.indexer." in name:  # V3.2's: blk.N.indexer.{attn_q_b,attn_k,proj,k_norm}, F32
            layer, part, kind = re.match(r"model\.layers\.(\d+)\.self_attn\.indexer\.(\w+)\.(weight|bias)", name).groups()
            w.add_tensor(f"blk.{layer}.indexer.{INDEXER[part]}.{kind}", a)
            continue
        if name.endswith("kv_b_proj.weight") and not kv_b_whole:  # DeepseekV2Model.modify_tensors
            h = cfg["num_key_value_heads"]
            kv = t.float().view(h, cfg["qk_nope_head_dim"] + cfg["v_head_dim"], t.shape[-1])
            k_b, v_b = torch.split(kv, [cfg["qk_nope_head_dim"], cfg["v_head_dim"]], dim=1)
            for part, x in (("k_b_proj", k_b.transpose(1, 2)), ("v_b_proj", v_b)):
                pname = names.get_name(name.replace("kv_b_proj", part), try_suffixes=(".weight",))
                data, raw = _quantised(pname, np.ascontiguousarray(x.numpy()), getattr(Q, heads_type), seed)
                w.add_tensor(pname, data, raw_dtype=raw)
            continue
        if name.endswith("e_score_correction_bias"):
            gname = names.get_name(name.removesuffix("_bias")) + ".bias"
        else:
            gname = names.get_name(name, try_suffixes=(".weight", ".bias"))
        assert gname is not None, name
        if not gname.endswith((".weight", ".bias")):  # gpt-oss's sinks: the converter appends .weight
            gname += ".weight"
        stem = gname.rsplit(".", 1)[0].split(".")[-1]
        q = dense_q if a.ndim == 2 and stem not in ("ffn_gate_inp", "ffn_gate_inp_shexp") else Q.F32
        if llama and stem in ("attn_q", "attn_k") and gname.endswith(".weight"):
            a = _permute(a, cfg["num_attention_heads" if stem == "attn_q" else "num_key_value_heads"])
        data, raw = _quantised(gname, a, q, seed)
        seed += 1
        w.add_tensor(gname, data, raw_dtype=raw)
    for layer in range(cfg["num_hidden_layers"]):
        pre = f"model.layers.{layer}.{'block_sparse_moe' if llama else 'feed_forward' if cfg['model_type'] == 'llama4' else 'mlp'}.experts"
        names = ("w1", "w3", "w2") if llama else ("gate_proj", "up_proj", "down_proj")
        biases = None
        if cfg["model_type"] == "llama4" and f"{pre}.gate_up_proj" in sd:  # [E, H, 2I] gate then up, [E, I, H]
            gu, down = sd[f"{pre}.gate_up_proj"].float().transpose(1, 2), sd[f"{pre}.down_proj"].float().transpose(1, 2)
            i = gu.shape[1] // 2
            stacks = (gu[:, :i], gu[:, i:], down)
        elif cfg["model_type"] == "gpt_oss":  # [E, H, 2I] gate/up interleaved, [E, I, H]; biased
            gu, down = sd[f"{pre}.gate_up_proj"].float().transpose(1, 2), sd[f"{pre}.down_proj"].float().transpose(1, 2)
            stacks = (gu[:, ::2], gu[:, 1::2], down)
            gub = sd[f"{pre}.gate_up_proj_bias"].float()
            biases = (gub[:, ::2], gub[:, 1::2], sd[f"{pre}.down_proj_bias"].float())
        elif f"{pre}.gate_up_proj" in sd:  # transformers 5 writes experts fused: [E, 2I, H], [E, H, I]
            gu, down = sd[f"{pre}.gate_up_proj"].float(), sd[f"{pre}.down_proj"].float()
            i = gu.shape[1] // 2
            stacks = (gu[:, :i], gu[:, i:], down)
        elif f"{pre}.0.{names[0]}.weight" in sd:
            stacks = tuple(torch.stack([sd[f"{pre}.{e}.{k}.weight"].float() for e in range(n_experts)]) for k in names)
        else:
            continue
        kinds, types = ["gate", "up", "down"], expert_types
        if fuse:  # one [E, 2I, H] tensor, gate's rows first
            kinds, stacks = ["gate_up", "down"], [torch.cat(stacks[:2], 1), stacks[2]]
            types = (expert_types[0], expert_types[2])
            biases = biases and (torch.cat(biases[:2], -1), biases[2])
        for k, (kind, stack, qname) in enumerate(zip(kinds, stacks, types)):
            if biases is not None:
                w.add_tensor(f"blk.{layer}.ffn_{kind}_exps.bias", biases[k].numpy())
            if per_expert:
                for e in range(n_experts):
                    data, raw = _quantised(kind, stack[e].numpy(), getattr(Q, qname), seed)
                    seed += 1
                    w.add_tensor(f"blk.{layer}.ffn_{kind}.{e}.weight", data, raw_dtype=raw)
            else:
                data, raw = _quantised(kind, stack.numpy(), getattr(Q, qname), seed)
                seed += 1
                w.add_tensor(f"blk.{layer}.ffn_{kind}_exps.weight", data, raw_dtype=raw)
